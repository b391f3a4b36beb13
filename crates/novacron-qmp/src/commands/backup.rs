//! Commands for pulling a backup out of a running VM: a dirty bitmap per
//! disk that survives restarts (persistent: stored in the qcow2), a
//! point-in-time view of the disk (a fleecing overlay on the disk's node
//! that a `blockdev-backup` job with `sync: none` fills with whatever the
//! guest is about to overwrite), exported over NBD together with a frozen
//! copy of the bitmap.

use serde::{Deserialize, Serialize};

use super::{no_args, Command, Empty};
use crate::types::BitmapRef;

/// `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDirtyBitmapAdd {
    pub node: String,
    pub name: String,
    /// Bytes per bit (QEMU's default: the cluster size, 64 KiB for qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Stored in the qcow2 when QEMU closes it, loaded when it opens it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Created not recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl Command for BlockDirtyBitmapAdd {
    const NAME: &'static str = "block-dirty-bitmap-add";
    type Reply = Empty;
}

/// A bitmap of a node: argument of `block-dirty-bitmap-remove` and `-clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmap {
    pub node: String,
    pub name: String,
}

/// `block-dirty-bitmap-remove` (also drops a persistent bitmap from the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapRemove(pub BlockDirtyBitmap);

impl Command for BlockDirtyBitmapRemove {
    const NAME: &'static str = "block-dirty-bitmap-remove";
    type Reply = Empty;
}

/// `block-dirty-bitmap-merge`: `target` (of `node`) gains every bit of `bitmaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapMerge {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<BitmapRef>,
}

impl Command for BlockDirtyBitmapMerge {
    const NAME: &'static str = "block-dirty-bitmap-merge";
    type Reply = Empty;
}

/// `blockdev-backup`: a job copying `device` to `target`. With `sync:
/// none` it copies only what the guest is about to overwrite (the old
/// data), so `target` (an overlay on `device`) reads as `device` did when
/// the job started; it runs until cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    pub job_id: String,
    pub device: String,
    pub target: String,
    /// Always `none` here.
    pub sync: &'static str,
}

impl BlockdevBackup {
    /// The fleecing job: `target` keeps `device`'s content as of now.
    pub fn fleecing(job_id: impl Into<String>, device: impl Into<String>, target: impl Into<String>) -> Self {
        BlockdevBackup {
            job_id: job_id.into(),
            device: device.into(),
            target: target.into(),
            sync: "none",
        }
    }
}

impl Command for BlockdevBackup {
    const NAME: &'static str = "blockdev-backup";
    type Reply = Empty;
}

/// `block-export-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDel {
    pub id: String,
    /// `hard`: clients still connected are cut off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
}

impl Command for BlockExportDel {
    const NAME: &'static str = "block-export-del";
    type Reply = Empty;
}

no_args! {
    /// The block exports (removed ones linger while clients hold them).
    QueryBlockExports = "query-block-exports" -> Vec<BlockExportInfo>;
}

no_args! {
    /// Each block device's I/O counters.
    QueryBlockstats = "query-blockstats" -> Vec<BlockStats>;
}

/// One device's counters (QAPI `BlockStats`, the members used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockStats {
    /// The guest device's id or QOM path, when a device uses the drive.
    #[serde(default)]
    pub qdev: Option<String>,
    pub stats: BlockDeviceStats,
}

/// QAPI `BlockDeviceStats`, the members used.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
}

/// One block export (QAPI `BlockExportInfo`, the members used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    pub id: String,
    pub node_name: String,
    /// Being removed, waiting for its clients to go.
    pub shutting_down: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{Transaction, TransactionAction};

    #[test]
    fn a_backup_starts_with_a_frozen_bitmap_and_a_fleecing_job_in_one_transaction() {
        let start = Transaction {
            actions: vec![
                TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    node: "root".into(),
                    name: "nc-frozen".into(),
                    granularity: None,
                    persistent: Some(false),
                    disabled: Some(true),
                }),
                TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                    node: "root".into(),
                    target: "nc-frozen".into(),
                    bitmaps: vec![BitmapRef::Local("nc-cbt".into())],
                }),
                TransactionAction::BlockDirtyBitmapClear(BlockDirtyBitmap {
                    node: "root".into(),
                    name: "nc-cbt".into(),
                }),
                TransactionAction::BlockdevBackup(BlockdevBackup::fleecing("fleece-job", "root", "fleece")),
            ],
        };
        assert_eq!(
            serde_json::to_value(&start).unwrap_or_default(),
            serde_json::json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "root", "name": "nc-frozen", "persistent": false, "disabled": true}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": "root", "target": "nc-frozen", "bitmaps": ["nc-cbt"]}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "root", "name": "nc-cbt"}},
                {"type": "blockdev-backup", "data": {"job-id": "fleece-job", "device": "root", "target": "fleece", "sync": "none"}},
            ]})
        );
        assert_eq!(
            serde_json::to_value(BitmapRef::Node {
                node: "root".into(),
                name: "b".into()
            })
            .unwrap_or_default(),
            serde_json::json!({"node": "root", "name": "b"})
        );
    }
}
