//! Commands for external snapshots of the disks of a running VM: a new
//! overlay is added as a node of its own, then put on top of each disk's
//! node in one transaction (every disk at the same instant); and for taking
//! the disks back after the memory was saved to a file.

use serde::{Deserialize, Serialize};

use super::{no_args, Command, Empty};

/// `transaction`: all actions take effect together, or none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transaction {
    pub actions: Vec<TransactionAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// Puts node `overlay` on top of node `node` (which becomes its backing).
    BlockdevSnapshot {
        node: String,
        overlay: String,
    },
    BlockDirtyBitmapAdd(super::BlockDirtyBitmapAdd),
    BlockDirtyBitmapMerge(super::BlockDirtyBitmapMerge),
    BlockDirtyBitmapClear(super::BlockDirtyBitmap),
    BlockdevBackup(super::BlockdevBackup),
}

impl Command for Transaction {
    const NAME: &'static str = "transaction";
    type Reply = Empty;
}

/// `blockdev-set-active` (QEMU 10.0): activates or inactivates block
/// nodes (all of them when `node_name` is `None`). A migration that
/// completes leaves the source's nodes inactive for the target to take;
/// after one to a file, the nodes are taken back before anything else
/// changes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSetActive {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub active: bool,
}

impl Command for BlockdevSetActive {
    const NAME: &'static str = "blockdev-set-active";
    type Reply = Empty;
}

no_args! {
    /// The VM's block devices and the node each one reads from.
    QueryBlock = "query-block" -> Vec<BlockInfo>;
}

/// One block device (QAPI `BlockInfo`, the members used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockInfo {
    /// The device's id (or QOM path) when a guest device uses it.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium, absent for an empty drive.
    #[serde(default)]
    pub inserted: Option<BlockInserted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInserted {
    /// The node on top of the device's chain.
    pub node_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_is_added_without_backing_and_snapshotted_in_one_transaction() {
        let add = serde_json::to_value(crate::commands::BlockdevAddQcow2::overlay("root-s1", "/v/root.qcow2"))
            .unwrap_or_default();
        assert_eq!(
            add,
            serde_json::json!({"driver": "qcow2", "node-name": "root-s1", "discard": "unmap",
                "file": {"driver": "file", "filename": "/v/root.qcow2"}, "backing": null})
        );
        let t = Transaction {
            actions: vec![TransactionAction::BlockdevSnapshot {
                node: "root".into(),
                overlay: "root-s1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(t).unwrap_or_default(),
            serde_json::json!({"actions": [{"type": "blockdev-snapshot", "data": {"node": "root", "overlay": "root-s1"}}]})
        );
    }
}
