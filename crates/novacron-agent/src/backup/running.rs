//! A backup of a running VM: its disks at one instant (see
//! [`super::export`]), each read in full or, where the change tracking
//! counts from the store's newest backup of the VM, only where it changed.

use std::path::Path;
use std::time::Instant;

use chrono::{SubsecRound, Utc};
use novacron_api::Backup;
use novacron_backup::{BackupId, FixedIndex};
use novacron_nbd::NbdClient;
use novacron_qmp::Qmp;

use super::chain::{self, Base};
use super::export::{self, DiskNode, Tracking};
use super::target::{BackupTarget, DiskIndexes, Latest};
use super::{read_disk, BackupError, Reading, ALLOCATION};

/// Why a disk's backup must read all of it, if it must: the chain is
/// broken, the disk has no tracking to read changes from (`tracked` says
/// whether it has), or the newest backup has no like disk to take the
/// unchanged chunks from.
pub(super) fn why_full(
    tracking: Tracking,
    tracked: bool,
    previous: Option<&FixedIndex>,
    size: u64,
    chain_broken: Option<&str>,
) -> Option<String> {
    match (tracked, previous, chain_broken) {
        (_, _, Some(why)) => Some(why.into()),
        (false, _, None) => Some(match tracking {
            Tracking::Inconsistent => "its change tracking was not saved (its QEMU ended uncleanly)".into(),
            _ => {
                "it has no change tracking (a new disk, a reverted snapshot, a live migration that could not carry it, or its QEMU ended before saving it)".into()
            }
        }),
        (true, None, None) => Some("the newest backup does not have it".into()),
        (true, Some(p), None) if p.size != size => Some("its size changed".into()),
        _ => None,
    }
}

/// Where a backup starts from: its id (the second it starts in), the VM's
/// newest backup in the store, the chain record, and why the chain does
/// not allow an incremental backup, if it does not.
pub(super) struct Begun {
    pub started: Instant,
    pub id: BackupId,
    pub latest: Latest,
    pub record: chain::Chain,
    pub chain_broken: Option<String>,
}

pub(super) async fn begin<T: BackupTarget>(dir: &Path, vm: &str, target: &T) -> Result<Begun, BackupError> {
    let started = Instant::now();
    let id = BackupId {
        vm: vm.into(),
        time: Utc::now().trunc_subsecs(0),
    };
    let latest = target.latest(vm).await?;
    let record = chain::load(dir).map_err(|e| BackupError::Chain(e.to_string()))?;
    let mut chain_broken =
        record.why_not_incremental(target.name(), latest.as_ref().map(|l| l.id.to_string()).as_deref());
    if let Some(l) = latest.as_ref().filter(|l| l.key_id != target.codec().key_id()) {
        // Its unchanged chunks would be taken over as they are: sealed
        // otherwise than this backup's (or not at all).
        chain_broken.get_or_insert_with(|| match &l.key_id {
            Some(k) => format!("the newest backup is sealed with backup key {k}, this one otherwise"),
            None => "the newest backup is not sealed, this one is".into(),
        });
    }
    Ok(Begun {
        started,
        id,
        latest,
        record,
        chain_broken,
    })
}

/// Records that tracking counts from backup `id` in `store` on.
pub(super) fn counts_from(dir: &Path, store: &str, id: &BackupId) -> Result<(), BackupError> {
    let done = chain::Chain {
        base: Some(Base {
            store: store.into(),
            backup: id.to_string(),
        }),
        pending: None,
    };
    chain::save(dir, &done).map_err(|e| BackupError::Chain(e.to_string()))
}

/// Backs up the running VM `vm` (id `vm_id`, directory `dir`) whose disks
/// are `disks` to `target`; `progress` hears (disk, bytes done, size).
pub async fn back_up_running<T: BackupTarget>(
    qmp: &Qmp,
    dir: &Path,
    vm: &str,
    vm_id: &str,
    disks: &[DiskNode],
    target: &T,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Backup, BackupError> {
    let Begun {
        started,
        id,
        latest,
        mut record,
        chain_broken,
    } = begin(dir, vm, target).await?;
    let before = record.clone();
    // From the export on, tracking is reset: a backup cut short must not
    // leave the next one to trust it.
    record.pending = Some(id.to_string());
    chain::save(dir, &record).map_err(|e| BackupError::Chain(e.to_string()))?;
    let pit = match export::start(qmp, dir, disks).await {
        Ok(p) => p,
        Err(e) => {
            let _ = chain::save(dir, &before);
            return Err(BackupError::Export(e.to_string()));
        }
    };
    let read = async {
        let mut read: DiskIndexes = Vec::new();
        let mut reasons = Vec::new();
        for e in &pit.disks {
            let previous = latest.as_ref().and_then(|l| l.disk(&e.disk.disk));
            let why_full = why_full(
                e.tracking,
                e.changed_context.is_some(),
                previous,
                e.disk.size,
                chain_broken.as_deref(),
            );
            let mut contexts = vec![ALLOCATION];
            if let Some(c) = &e.changed_context {
                contexts.push(c);
            }
            let mut nbd = NbdClient::connect(&pit.socket, &e.export, &contexts).await?;
            let reading = match (&why_full, &e.changed_context, previous) {
                (None, Some(context), Some(previous)) => Reading::Changed { context, previous },
                _ => Reading::Full,
            };
            let disk = e.disk.disk.clone();
            let (index, stats) = read_disk(&mut nbd, reading, target, |done, size| progress(&disk, done, size)).await?;
            nbd.disconnect().await?;
            if let Some(why) = why_full {
                reasons.push(format!("{}: {why}", e.disk.disk));
            }
            read.push((e.disk.disk.clone(), index, stats));
        }
        let full_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        target
            .commit(&id, vm_id, read, full_reason, started.elapsed().as_millis() as u64)
            .await
    }
    .await;
    match read {
        Ok(backup) => {
            pit.finish(qmp, true)
                .await
                .map_err(|e| BackupError::Export(e.to_string()))?;
            counts_from(dir, target.name(), &id)?;
            Ok(backup)
        }
        Err(err) => {
            // Tracking gets back what this backup would have taken; only
            // then may the next one trust it again.
            match pit.finish(qmp, false).await {
                Ok(()) => {
                    let _ = chain::save(dir, &before);
                }
                Err(e) => {
                    tracing::error!(vm, error = %e, "a failed backup's tracking could not be restored: the next backup is full")
                }
            }
            Err(err)
        }
    }
}
