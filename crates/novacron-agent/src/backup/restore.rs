//! Restoring a VM's disks from a backup in a store the server serves:
//! every chunk is fetched (several at once), decoded and checked against
//! its digest, and held in memory in an NBD export ([`ChunkedDisk`]), from
//! which `qemu-img convert` copies it into the disk's qcow2 as it comes.
//! A chunk that is missing or damaged fails the restore, naming it; the
//! disks take their restored files only once every one of them is
//! restored (all or none: a restore in place that fails leaves the VM's
//! disks as they were).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use novacron_api::backup::RestoreSource;
use novacron_api::error::chain;
use novacron_api::{Backup, Vm, VmStatus};
use novacron_backup::chunk::CHUNK_SIZE;
use novacron_backup::FixedIndex;
use novacron_backup::{ChunkKey, Codec};
use novacron_client::Client;

use super::chunked::{serve_export, ChunkedDisk, Keep};
use super::{remote, BackupError};
use crate::copies::JobPoll;
use crate::node::NodeContext;
use crate::qemu::{self, VmDir};

/// Chunks fetched at once.
pub(super) const CHUNKS_IN_FLIGHT: usize = 8;
/// Chunks a restore holds in memory ahead of `qemu-img convert` (64 MiB).
const WINDOW: usize = 16;

/// Written once every disk is restored: a later start (after a rebuild,
/// say) does not restore again.
pub(super) const RESTORED: &str = "restored-from";

/// Whether the VM in `dir` still needs its disks restored.
pub fn needed(dir: &VmDir) -> bool {
    !dir.path.join(RESTORED).exists()
}

/// Carries out a restore in place the spec asks for and this agent has not
/// done: the stopped VM's disks are replaced by the backup's (all or none),
/// in a task of its own (`status.reason` shows how far). A failure is the
/// VM's reason, and is not tried again (the disks are as they were). True
/// once there is nothing (more) to do and it did not fail, so a start asked
/// for meanwhile waits.
pub fn in_place_if_asked(node: &NodeContext, vm: &Vm, dir: &VmDir, st: &mut VmStatus) -> bool {
    if vm.spec.restore_generation == st.observed_restore_generation {
        return true;
    }
    let Some(src) = &vm.spec.restore_from else {
        st.observed_restore_generation = vm.spec.restore_generation;
        return true;
    };
    let failed = |st: &mut VmStatus, why: String| {
        st.observed_restore_generation = vm.spec.restore_generation;
        st.reason = Some(format!(
            "{RESTORE_FAILED} from {src} (the disks are as they were): {why}"
        ));
        false
    };
    // The server checked too, but a snapshot may have been taken since.
    match crate::snapshots::list(dir) {
        Ok(snaps) if snaps.is_empty() => {}
        Ok(snaps) => {
            let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
            let why = format!(
                "the VM has snapshots ({}), whose layers its disks are",
                names.join(", ")
            );
            return failed(st, why);
        }
        Err(e) => return failed(st, format!("cannot list its snapshots: {}", chain(&e))),
    }
    match restore_in_background(node, vm, dir, src) {
        JobPoll::Running(percent) => {
            st.reason = Some(format!("{RESTORING} from {src}: {percent}%"));
            false
        }
        JobPoll::Done => {
            tracing::info!(vm = %vm.metadata.name, backup = %src, "disks restored in place");
            st.observed_restore_generation = vm.spec.restore_generation;
            crate::reconcile::clear_reason(st, RESTORE_FAILED);
            crate::reconcile::clear_reason(st, RESTORING);
            true
        }
        JobPoll::Failed(why) => {
            tracing::warn!(vm = %vm.metadata.name, backup = %src, error = %why, "restore in place failed");
            failed(st, why)
        }
    }
}

/// How a VM's reason reads while its disks are restored.
pub const RESTORING: &str = "Restoring the disks";

/// [`restore_disks`] for the VM in `dir` in a task of its own: where it stands.
pub fn restore_in_background(node: &NodeContext, vm: &Vm, dir: &VmDir, src: &RestoreSource) -> JobPoll {
    let (client, dir, src, key) = (node.client.clone(), dir.clone(), src.clone(), node.backup_key.clone());
    let span = tracing::info_span!("restore", vm = %vm.metadata.name, backup = %src);
    node.restores.poll(&vm.metadata.id, move |percent| {
        let restoring = async move {
            restore_disks(&client, &dir, &src, key.as_ref(), &percent)
                .await
                .map_err(|e| chain(&e).to_string())
        };
        tracing::Instrument::instrument(restoring, span)
    })
}

const RESTORE_FAILED: &str = "Restore failed";

/// Restores the root and data disks of backup `src` into `dir`; a sealed
/// backup needs `key` (this node's backup key) to be its key.
pub async fn restore_disks(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
    percent: &AtomicU8,
) -> Result<(), BackupError> {
    let mut restored = Vec::new();
    let result = restore_aside(client, dir, src, key, percent, &mut restored).await;
    if result.is_ok() {
        for (partial, target) in &restored {
            std::fs::rename(partial, target)
                .map_err(|e| BackupError::Restore(format!("cannot put the restored disk in place: {e}")))?;
        }
        // The disks have no change tracking now: the next backup is full.
        super::chain::save(&dir.path, &Default::default()).map_err(|e| BackupError::Chain(e.to_string()))?;
        std::fs::write(dir.path.join(RESTORED), format!("{src}\n"))
            .map_err(|e| BackupError::Restore(format!("cannot mark the restore done: {e}")))?;
    }
    for (partial, _) in &restored {
        let _ = std::fs::remove_file(partial);
    }
    result
}

/// A backup `src`'s manifest and how its chunks read with this node's
/// backup `key` (a sealed backup needs its own key).
pub(super) async fn open_backup(
    client: &Client,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
) -> Result<(Backup, Codec), BackupError> {
    let backup: Backup = client
        .get_json(&format!("backups/{}/{}/{}", src.store, src.vm, src.time))
        .await
        .map_err(|e| remote(&format!("backup {src}"), e))?;
    let codec = Codec::for_key(backup.key_id.as_deref(), key).ok_or_else(|| {
        BackupError::Restore(format!(
            "backup {src} is sealed with backup key {}, which this node does not have (novacron agent --backup-key FILE)",
            backup.key_id.as_deref().unwrap_or_default()
        ))
    })?;
    Ok((backup, codec))
}

/// The index of disk `disk` of backup `src`, as stored (bytes) and read.
pub(super) async fn fetch_index(
    client: &Client,
    src: &RestoreSource,
    disk: &str,
) -> Result<(Vec<u8>, FixedIndex), BackupError> {
    let path = format!(
        "backup-stores/{}/backups/{}/{}/disks/{disk}/index",
        src.store, src.vm, src.time
    );
    let bytes = client
        .get_bytes(&path)
        .await
        .map_err(|e| remote(&format!("the index of disk {disk}"), e))?;
    let index = parse_index(&bytes, disk, src)?;
    Ok((bytes.to_vec(), index))
}

pub(super) fn parse_index(bytes: &[u8], disk: &str, src: &RestoreSource) -> Result<FixedIndex, BackupError> {
    let index = FixedIndex::from_bytes(bytes)
        .map_err(|e| BackupError::Restore(format!("the index of disk {disk} of {src}: {e}")))?;
    if index.chunk_size != CHUNK_SIZE {
        return Err(BackupError::Restore(format!(
            "the index of disk {disk} of {src} has {}-byte chunks, not {CHUNK_SIZE}",
            index.chunk_size
        )));
    }
    Ok(index)
}

/// The disks of `backup` this VM has, with their files in `dir`: its root
/// and data disks, and the volumes of the backup attached to it (the
/// server allows a restore in place only when all are).
pub(super) fn vm_disks<'a>(backup: &'a Backup, dir: &VmDir) -> Vec<(&'a str, PathBuf)> {
    backup
        .disks
        .iter()
        .filter_map(|d| dir.disk_file(&d.name).map(|f| (d.name.as_str(), f)))
        .filter(|(name, file)| qemu::DISK_NODES.contains(name) || file.exists())
        .collect()
}

/// Restores each disk of `src` beside its target, recording each one done.
async fn restore_aside(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
    percent: &AtomicU8,
    restored: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), BackupError> {
    let (backup, codec) = open_backup(client, src, key).await?;
    let mut disks = Vec::new();
    for (disk, target) in vm_disks(&backup, dir) {
        let (_, index) = fetch_index(client, src, disk).await?;
        disks.push((disk, target, index));
    }
    // Chunks fetched (of all disks), to the percentage; the conversions
    // take the last bit.
    let total: u64 = disks.iter().map(|(_, _, i)| i.size).sum();
    let done = AtomicU64::new(0);
    let on_chunk = |n: u64| {
        let now = done.fetch_add(n, Ordering::Relaxed) + n;
        percent.store((now * 100 / total.max(1)).min(99) as u8, Ordering::Relaxed);
    };
    for (disk, target, index) in disks {
        let partial = target.with_extension("restore.qcow2");
        // One disk at a time; not named by the disk, whose name (a
        // volume's) would make the path too long for a Unix socket.
        let sock = dir.path.join("restore.sock");
        let size = index.size;
        let mut export = None;
        // The qcow2 takes the data from an export of the chunks as they come
        // in (`qemu-img convert`, several reads at once), while they are
        // fetched several at once.
        let result = async {
            let keep = Keep::Memory { window: WINDOW };
            let chunks = Arc::new(ChunkedDisk::create(
                client.clone(),
                &src.store,
                codec.clone(),
                index,
                &keep,
            )?);
            on_chunk(size - chunks.wanted_bytes());
            export = Some(serve_export(&sock, disk, chunks.clone())?);
            let convert = async {
                let copied = convert_export(&sock, disk, &partial).await;
                chunks.stop_fill();
                copied
            };
            let (filled, copied) = tokio::join!(chunks.fill(CHUNKS_IN_FLIGHT, &on_chunk), convert);
            // A chunk that failed says more than QEMU's I/O error.
            copied.map_err(|e| chunks.failure().map(BackupError::Restore).unwrap_or(e))?;
            filled
        }
        .await;
        if let Some(task) = export {
            task.abort();
        }
        let _ = std::fs::remove_file(&sock);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        restored.push((partial, target));
        tracing::info!(backup = %src, disk, bytes = size, "disk restored");
    }
    Ok(())
}

/// Writes export `disk` at `sock` into the new qcow2 `qcow2` (zeros left
/// unallocated), then syncs it.
async fn convert_export(sock: &Path, disk: &str, qcow2: &Path) -> Result<(), BackupError> {
    let source = format!("nbd+unix:///{disk}?socket={}", sock.display());
    // Cache mode unsafe (no flushes while qcow2 allocates): the file is not
    // the disk until it is synced and renamed. -f raw: the guest's bytes
    // are never taken for an image format.
    let args: [&std::ffi::OsStr; 13] = [
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-t".as_ref(),
        "unsafe".as_ref(),
        "-m".as_ref(),
        "8".as_ref(),
        "-W".as_ref(),
        source.as_ref(),
        qcow2.as_os_str(),
    ];
    qemu::qemu_img_output(&args)
        .await
        .map_err(|e| BackupError::Restore(format!("cannot copy the backup into the disk: {e}")))?;
    let synced = std::fs::File::open(qcow2).and_then(|f| f.sync_all());
    synced.map_err(|e| BackupError::Restore(format!("cannot sync the restored disk: {e}")))
}
