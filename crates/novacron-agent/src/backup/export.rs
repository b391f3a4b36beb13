//! A running VM's disks at one instant, exported over NBD for a backup
//! (libvirt's "pull mode"). For each disk a fleecing overlay is put on the
//! disk's top node and a `blockdev-backup` job with `sync: none` copies
//! into it whatever the guest is about to overwrite, so the overlay reads
//! as the disk did when the job started, while the guest runs on. In the
//! same transaction the disk's change-tracking bitmap ([`CBT`]) is copied
//! to a frozen bitmap and cleared: the frozen copy says what changed up to
//! this instant (what this backup reads), the cleared one records what
//! changes from it on (what the next backup reads). If the backup fails,
//! the frozen copy is merged back, so nothing it marked is forgotten.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_qmp::commands::{
    BitmapMigrationBitmapAlias, BitmapMigrationNodeAlias, BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge,
    BlockDirtyBitmapRemove, BlockExportAdd, BlockExportDel, BlockJobCancel, BlockdevAddQcow2, BlockdevBackup,
    BlockdevDel, NbdServerStart, NbdServerStop, QueryBlockExports, QueryBlockJobs, QueryNamedBlockNodes, Transaction,
    TransactionAction,
};
use novacron_qmp::types::{BitmapRef, BlockExportKind, BlockExportNbd, SocketAddressLegacy, UnixSocketAddress};
use novacron_qmp::{Qmp, QmpError};

/// The persistent bitmap on each disk's top node that records writes
/// since the last backup.
pub const CBT: &str = "nc-cbt";
/// Its copy frozen at a backup's instant.
const FROZEN: &str = "nc-frozen";
/// How long an export or job may take to go away.
const TEARDOWN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("QEMU refused")]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
    #[error("{0}")]
    Teardown(String),
}

/// One disk to export: its name ("root", a volume's id), the node on top
/// of it in QEMU, and its size.
#[derive(Debug, Clone)]
pub struct DiskNode {
    pub disk: String,
    pub top: String,
    pub size: u64,
}

/// Where a disk's change tracking stands, as QEMU holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// The bitmap is there and was saved cleanly.
    Consistent,
    /// No bitmap (a new disk, a snapshot reverted, a disk from elsewhere).
    Missing,
    /// The bitmap was not saved by the QEMU that last had the disk (it
    /// ended uncleanly): it cannot be trusted.
    Inconsistent,
}

/// The state of [`CBT`] on node `top`.
pub async fn tracking(qmp: &Qmp, top: &str) -> Result<Tracking, QmpError> {
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true }).await?;
    let bitmap = nodes
        .iter()
        .filter(|n| n.node_name.as_deref() == Some(top))
        .flat_map(|n| &n.dirty_bitmaps)
        .find(|b| b.name.as_deref() == Some(CBT));
    Ok(match bitmap {
        None => Tracking::Missing,
        Some(b) if b.inconsistent => Tracking::Inconsistent,
        Some(_) => Tracking::Consistent,
    })
}

/// What carries each disk's change tracking across a live migration (with
/// the `dirty-bitmaps` capability on both sides): the bitmap of the disk's
/// top node, under the disk's name as alias, since the two QEMUs' node
/// names differ (an overlay's after a snapshot of the running VM).
pub fn migration_mapping(tops: &std::collections::BTreeMap<String, String>) -> Vec<BitmapMigrationNodeAlias> {
    tops.iter()
        .map(|(disk, top)| BitmapMigrationNodeAlias {
            node_name: top.clone(),
            alias: disk.clone(),
            bitmaps: vec![BitmapMigrationBitmapAlias {
                name: CBT.into(),
                alias: CBT.into(),
            }],
        })
        .collect()
}

/// Transaction actions that give node `to` (an overlay put on top of
/// `from` in the same transaction) `from`'s tracking bitmap as it is then:
/// the writes that go to `to` from then on are tracked there.
pub fn carry_tracking(from: &str, to: &str) -> [TransactionAction; 2] {
    [
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            node: to.into(),
            name: CBT.into(),
            granularity: None,
            persistent: Some(true),
            disabled: None,
        }),
        TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: to.into(),
            target: CBT.into(),
            bitmaps: vec![BitmapRef::Node {
                node: from.into(),
                name: CBT.into(),
            }],
        }),
    ]
}

fn bitmap(node: &str, name: &str) -> BlockDirtyBitmap {
    BlockDirtyBitmap {
        node: node.into(),
        name: name.into(),
    }
}

/// A disk exported at the backup's instant.
#[derive(Debug)]
pub struct Exported {
    pub disk: DiskNode,
    /// The NBD export's name.
    pub export: String,
    /// The disk's change tracking before this backup.
    pub tracking: Tracking,
    /// The frozen bitmap's meta context, when the disk had a consistent
    /// bitmap (an incremental backup is possible).
    pub changed_context: Option<String>,
    fleece_node: String,
    fleece_file: PathBuf,
    job: String,
}

/// The VM's disks as they were at one instant, over NBD at `socket`.
#[derive(Debug)]
pub struct PointInTime {
    pub socket: PathBuf,
    pub disks: Vec<Exported>,
}

/// Exports `disks` of the VM whose directory is `dir` as they are now.
/// A failure takes back whatever it had set up.
pub async fn start(qmp: &Qmp, dir: &Path, disks: &[DiskNode]) -> Result<PointInTime, ExportError> {
    let socket = dir.join("backup-nbd.sock");
    let mut pit = PointInTime {
        socket: socket.clone(),
        disks: Vec::new(),
    };
    let result = async {
        let mut actions = Vec::new();
        for d in disks {
            let fleece_node = format!("fleece-{}", d.top);
            let fleece_file = dir.join(format!("fleece-{}.qcow2", d.disk));
            crate::qemu::create_scratch_qcow2(&fleece_file, d.size).await?;
            qmp.run(&BlockdevAddQcow2::on_node(
                &fleece_node,
                fleece_file.display().to_string(),
                &d.top,
            ))
            .await?;
            let state = tracking(qmp, &d.top).await?;
            let consistent = state == Tracking::Consistent;
            if consistent {
                actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    node: d.top.clone(),
                    name: FROZEN.into(),
                    granularity: None,
                    persistent: Some(false),
                    disabled: Some(true),
                }));
                actions.push(TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                    node: d.top.clone(),
                    target: FROZEN.into(),
                    bitmaps: vec![BitmapRef::Local(CBT.into())],
                }));
                actions.push(TransactionAction::BlockDirtyBitmapClear(bitmap(&d.top, CBT)));
            } else {
                // This backup is full; tracking for the next one starts at
                // its instant.
                // An untrusted bitmap goes first (a transaction cannot
                // remove and add one name).
                if state == Tracking::Inconsistent {
                    qmp.run(&BlockDirtyBitmapRemove(bitmap(&d.top, CBT))).await?;
                }
                actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    node: d.top.clone(),
                    name: CBT.into(),
                    granularity: None,
                    persistent: Some(true),
                    disabled: None,
                }));
            }
            let job = format!("backup-{}", d.top);
            actions.push(TransactionAction::BlockdevBackup(BlockdevBackup::fleecing(
                &job,
                &d.top,
                &fleece_node,
            )));
            pit.disks.push(Exported {
                disk: d.clone(),
                export: d.disk.clone(),
                tracking: state,
                changed_context: consistent.then(|| format!("qemu:dirty-bitmap:{FROZEN}")),
                fleece_node,
                fleece_file,
                job,
            });
        }
        let _ = std::fs::remove_file(&socket);
        qmp.run(&Transaction { actions }).await?;
        qmp.run(&NbdServerStart::new(SocketAddressLegacy::Unix(UnixSocketAddress {
            path: socket.display().to_string(),
        })))
        .await?;
        for e in &pit.disks {
            let bitmaps = e.changed_context.as_ref().map(|_| {
                vec![BitmapRef::Node {
                    node: e.disk.top.clone(),
                    name: FROZEN.into(),
                }]
            });
            qmp.run(&BlockExportAdd {
                export: BlockExportKind::Nbd(BlockExportNbd {
                    name: Some(e.export.clone()),
                    bitmaps,
                    ..Default::default()
                }),
                ..BlockExportAdd::nbd(format!("backup-{}", e.disk.disk), &e.fleece_node, false)
            })
            .await?;
        }
        Ok::<_, ExportError>(())
    }
    .await;
    match result {
        Ok(()) => Ok(pit),
        Err(e) => {
            if let Err(undo) = pit.finish_inner(qmp, false).await {
                tracing::error!(error = %undo, "cannot take back a backup export that failed to start");
            }
            Err(e)
        }
    }
}

impl PointInTime {
    /// Takes the exports, jobs and overlays down. After a backup that
    /// `succeeded` the frozen bitmaps go; otherwise they are merged back
    /// into the tracking bitmaps (the next backup reads what this one
    /// would have).
    pub async fn finish(self, qmp: &Qmp, succeeded: bool) -> Result<(), ExportError> {
        self.finish_inner(qmp, succeeded).await
    }

    async fn finish_inner(&self, qmp: &Qmp, succeeded: bool) -> Result<(), ExportError> {
        let mut problems = Vec::new();
        for e in &self.disks {
            let id = format!("backup-{}", e.disk.disk);
            if let Err(err) = qmp.run(&BlockExportDel { id, mode: Some("hard") }).await {
                tracing::debug!(error = %err, "no export to delete");
            }
        }
        wait_gone(|| async {
            let left = qmp.run(&QueryBlockExports).await?;
            Ok(left.iter().any(|x| x.id.starts_with("backup-")))
        })
        .await
        .unwrap_or_else(|e| problems.push(format!("exports: {e}")));
        if let Err(err) = qmp.run(&NbdServerStop).await {
            tracing::debug!(error = %err, "no NBD server to stop");
        }
        for e in &self.disks {
            let _ = qmp
                .run(&BlockJobCancel {
                    device: e.job.clone(),
                    force: Some(true),
                })
                .await;
        }
        wait_gone(|| async {
            let jobs = qmp.run(&QueryBlockJobs).await?;
            Ok(jobs.iter().any(|j| self.disks.iter().any(|e| e.job == j.device)))
        })
        .await
        .unwrap_or_else(|e| problems.push(format!("jobs: {e}")));
        for e in &self.disks {
            let _ = qmp
                .run(&BlockdevDel {
                    node_name: e.fleece_node.clone(),
                })
                .await;
            let _ = std::fs::remove_file(&e.fleece_file);
            if e.changed_context.is_some() {
                if !succeeded {
                    let merged = qmp
                        .run(&BlockDirtyBitmapMerge {
                            node: e.disk.top.clone(),
                            target: CBT.into(),
                            bitmaps: vec![BitmapRef::Local(FROZEN.into())],
                        })
                        .await;
                    if let Err(err) = merged {
                        problems.push(format!("merging back disk {}'s changes: {err}", e.disk.disk));
                    }
                }
                if let Err(err) = qmp.run(&BlockDirtyBitmapRemove(bitmap(&e.disk.top, FROZEN))).await {
                    problems.push(format!("removing disk {}'s frozen bitmap: {err}", e.disk.disk));
                }
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ExportError::Teardown(problems.join("; ")))
        }
    }
}

/// Polls `still_there` until it says no, for up to [`TEARDOWN`].
async fn wait_gone<F, Fut>(mut still_there: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, QmpError>>,
{
    let deadline = Instant::now() + TEARDOWN;
    loop {
        match still_there().await {
            Ok(false) => return Ok(()),
            Ok(true) if Instant::now() > deadline => return Err(format!("still there after {TEARDOWN:?}")),
            Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(e.to_string()),
        }
    }
}
