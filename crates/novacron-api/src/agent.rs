//! Bodies of the calls between node agents, and from the server to an agent
//! (`/agent/v1/...`). Serde types only: the agent serves and sends them, the
//! server's dry-run proxy sends [`PlanRequest`].

use serde::{Deserialize, Serialize};

use crate::migration::{MigrationStrategy, MigrationTransport};
use crate::types::{Node, Vm};

/// Body of `migrations/{id}/prepare`: the source asks the target to get ready
/// to receive `vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub vm: Vm,
    /// The migration's trace, for the target's spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    pub postcopy: bool,
    /// QEMU multifd with zstd on the incoming side.
    #[serde(default)]
    pub multifd: bool,
    /// DWCP session that will carry the streams (the target connects its channels).
    #[serde(default)]
    pub dwcp_session: Option<String>,
    /// The serial log so far, so `vm logs` keeps its history on the target.
    #[serde(default)]
    pub console_log: Vec<u8>,
    /// The node the VM leaves, whose agent serves its snapshot layers.
    #[serde(default)]
    pub source_node: String,
    /// The VM's snapshots: the target fetches their layers before the mirrors start.
    #[serde(default)]
    pub snapshots: Vec<crate::Snapshot>,
    /// The snapshot layer each of the VM's disks is an overlay on, by disk
    /// ("root", "data"): the target's disks sit on the same layers, so the
    /// mirrors copy only what was written since.
    #[serde(default)]
    pub disk_layers: std::collections::BTreeMap<String, String>,
    /// Which backup the VM's change tracking counts from (the agent's
    /// backup chain record): it moves with the disks' tracking bitmaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_chain: Option<serde_json::Value>,
}

/// Target's answer to prepare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub nbd_host: String,
    pub nbd_port: u16,
    pub migrate_uri: String,
    pub disks: Vec<String>,
    /// The target's own steps (image fetch, QEMU start), from the start of the call.
    #[serde(default)]
    pub steps: Vec<crate::MigrationStep>,
}

/// Body of `migrations/{id}/finish` and `migrations/{id}/abort`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRef {
    pub vm_id: String,
    /// The migration's trace, for the target's spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// Serial output written on the source since prepare (finish only).
    #[serde(default)]
    pub console_log: Vec<u8>,
    /// Disks mirrored through DWCP, which must settle before the VM runs (finish only).
    #[serde(default)]
    pub dwcp_disks: usize,
}

/// Target's answer to finish: the VM runs there now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub pid: u32,
    /// When the guest resumed here (Unix ms, this node's clock).
    #[serde(default)]
    pub resumed_at: Option<f64>,
}

/// Body of `migrations/{id}/receive-cold`: the target pulls the disks of a
/// stopped VM from `source_node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdRequest {
    pub vm: Vm,
    pub source_node: String,
    pub disks: Vec<String>,
    #[serde(default)]
    pub console_log: Vec<u8>,
    /// The VM's snapshots, whose layers the target pulls with the disks.
    #[serde(default)]
    pub snapshots: Vec<crate::Snapshot>,
    /// As [`PrepareRequest::backup_chain`] (the bitmaps travel in the disk files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_chain: Option<serde_json::Value>,
}

/// What the caller asks of a migration (or of its dry run).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PlanAsk {
    pub strategy: MigrationStrategy,
    pub transport: MigrationTransport,
    pub bandwidth_mib_s: Option<u64>,
    pub max_downtime_ms: u64,
}

/// Body of `/agent/v1/plan` (a dry run, sent by the server to the source agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRequest {
    pub vm: Vm,
    pub target: Node,
    #[serde(flatten)]
    pub ask: PlanAsk,
}

/// Answer of `/agent/v1/dwcp`: the port the agent takes DWCP sessions on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct DwcpEndpoint {
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field names the server and the agent have always exchanged.
    #[test]
    fn plan_ask_wire_names() {
        let ask = PlanAsk {
            strategy: MigrationStrategy::Auto,
            transport: MigrationTransport::Dwcp,
            bandwidth_mib_s: None,
            max_downtime_ms: 300,
        };
        let v = serde_json::to_value(ask).expect("ask");
        assert_eq!(
            v,
            serde_json::json!({"strategy": "auto", "transport": "dwcp", "bandwidth_mib_s": null, "max_downtime_ms": 300})
        );
    }

    #[test]
    fn abort_needs_only_the_vm_id() {
        let r: VmRef = serde_json::from_value(serde_json::json!({"vm_id": "abc"})).expect("vm ref");
        assert_eq!((r.vm_id.as_str(), r.console_log.len(), r.dwcp_disks), ("abc", 0, 0));
    }
}

/// Body of `vms/{id}/backups`: back the VM up to a store the server serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The store's name (the agent writes to `/v1/backup-stores/{store}`).
    pub store: String,
    /// The VM's name, which names its backups.
    pub vm: String,
    /// The backup key the store keeps chunks sealed with (its id): the
    /// agent seals with its key of that id, or refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// A running VM's counters (`GET /agent/v1/vm-stats`), for the server's
/// metrics. Counters count from the QEMU process's start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmStats {
    pub vm_id: String,
    /// CPU time its QEMU process used (vCPUs and I/O threads), seconds.
    pub cpu_seconds: f64,
    /// Memory of its QEMU process resident in the host's RAM.
    pub resident_bytes: u64,
    /// By drive; absent when its QEMU did not answer in time (a migration
    /// or backup holding its monitor).
    #[serde(default)]
    pub disks: Vec<VmDiskStats>,
    #[serde(default)]
    pub nics: Vec<VmNicStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmDiskStats {
    /// `root`, `data`, or a volume's `volN` (its slot).
    pub drive: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// A NIC's traffic as the guest sees it (its tap's, the other way round).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmNicStats {
    /// `nicN` (its slot).
    pub interface: String,
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
}
