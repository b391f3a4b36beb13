//! Migrations: how a VM moves, what the agents report while it does, and
//! the calls that end one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::types::*;

/// How memory moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStrategy {
    /// Iterative pre-copy; the guest pauses for the final pass.
    Precopy,
    /// Pre-copy that throttles the guest's vCPUs when it dirties memory faster than we send.
    AutoConverge,
    /// Pre-copy first, then switch to post-copy (pages fetched on demand by the target).
    Postcopy,
    /// Chosen from the measured dirty rate and link throughput.
    #[default]
    Auto,
    /// A stopped VM: only its disks move (chosen automatically).
    Cold,
}

/// What carries the migration's memory and disk streams between the agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationTransport {
    /// QEMU's own stream over one TCP connection (the baseline).
    Qemu,
    /// QEMU multifd (4 channels) with zstd compression: QEMU's best native settings.
    QemuMultifd,
    /// NovaCron's WAN data plane: parallel TLS streams, dedup, delta and adaptive
    /// compression, link measurement. Falls back to `qemu` when the agents cannot use it.
    #[default]
    Dwcp,
}

impl std::fmt::Display for MigrationTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationTransport::Qemu => "qemu",
            MigrationTransport::QemuMultifd => "qemu-multifd",
            MigrationTransport::Dwcp => "dwcp",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum MigrationPhase {
    #[default]
    Pending,
    PreparingTarget,
    Transferring,
    Switchover,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationSpec {
    /// Name of the VM to move.
    pub vm: String,
    /// Target node; chosen by the scheduler when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(default)]
    pub strategy: MigrationStrategy,
    /// Longest acceptable pause of the guest at switchover.
    #[serde(default = "default_max_downtime")]
    pub max_downtime_ms: u64,
    /// Bandwidth cap for the memory stream (MiB/s); none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<u64>,
    #[serde(default)]
    pub transport: MigrationTransport,
    /// Set by the cancel action.
    #[serde(default)]
    pub cancel: bool,
    /// W3C `traceparent` of the migration's trace (the server makes one when
    /// it exports traces; the agents record their parts under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

pub fn default_max_downtime() -> u64 {
    300
}

/// Live progress, updated about once a second while transferring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// Memory and disk bytes sent so far.
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub disk_transferred_bytes: u64,
    pub disk_total_bytes: u64,
    /// Guest memory dirty rate (bytes/s).
    pub dirty_rate_bytes_s: u64,
    /// Memory stream throughput (bytes/s).
    pub throughput_bytes_s: u64,
    /// Pre-copy pass number.
    pub iteration: u64,
    /// Estimated seconds left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Percentage done (0-100).
    pub percent: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStatus {
    #[serde(default)]
    pub phase: MigrationPhase,
    #[serde(default)]
    pub source_node: String,
    #[serde(default)]
    pub target_node: String,
    /// Strategy in use and why it was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<MigrationStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_reason: Option<String>,
    #[serde(default)]
    pub progress: MigrationProgress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Transport in use, and why when it is not the one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<MigrationTransport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_reason: Option<String>,
    /// The prediction made before the transfer started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<MigrationPrediction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwcp: Option<DwcpFigures>,
    /// Final figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<u64>,
    /// How long the guest was paused: from its stop on the source to its
    /// resume on the target (the two nodes' clocks; never less than QEMU's figure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// QEMU's own downtime: the source's view, from the stop to the end of its
    /// stream, without the last bytes' way across or the target's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// Bytes that crossed the network (after DWCP encoding; QEMU's own count otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// Where the time went: each step of the migration with its start and
    /// length, in the order the steps began (some run at the same time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<MigrationStep>,
}

/// A step of a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStepKind {
    /// Opening DWCP's session to the target (also when it only probes the link).
    SessionOpen,
    /// Reading a sample of guest memory (zero pages, compressibility, known pages).
    MemorySample,
    /// QEMU's dirty-rate measurement.
    DirtyRate,
    /// Measuring the link; DWCP sends guest pages ahead meanwhile.
    LinkProbe,
    /// The target's preparation: disks, image, paused QEMU, NBD exports.
    PrepareTarget,
    /// Part of the target's preparation: the VM's image (fetched unless the
    /// target has it already) and the disks made from it.
    ImageFetch,
    /// Part of the target's preparation: starting its QEMU.
    QemuStart,
    /// Mirroring the disks until they are in sync.
    DiskMirror,
    /// QEMU's memory passes, from `migrate` to the end of its stream.
    MemoryPasses,
    /// Post-copy: the guest runs on the target while the rest of its memory follows.
    Postcopy,
    /// From the guest's stop on the source to its resume on the target.
    Switchover,
    /// Part of the switchover: the target waits for the last state and resumes the guest.
    TargetFinish,
    /// Closing DWCP's session once everything is delivered.
    SessionClose,
}

impl MigrationStepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStepKind::SessionOpen => "session_open",
            MigrationStepKind::MemorySample => "memory_sample",
            MigrationStepKind::DirtyRate => "dirty_rate",
            MigrationStepKind::LinkProbe => "link_probe",
            MigrationStepKind::PrepareTarget => "prepare_target",
            MigrationStepKind::ImageFetch => "image_fetch",
            MigrationStepKind::QemuStart => "qemu_start",
            MigrationStepKind::DiskMirror => "disk_mirror",
            MigrationStepKind::MemoryPasses => "memory_passes",
            MigrationStepKind::Postcopy => "postcopy",
            MigrationStepKind::Switchover => "switchover",
            MigrationStepKind::TargetFinish => "target_finish",
            MigrationStepKind::SessionClose => "session_close",
        }
    }
}

impl std::fmt::Display for MigrationStepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a migration's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStep {
    pub step: MigrationStepKind,
    /// Milliseconds after the migration started (on the source agent's clock;
    /// the target's steps are placed from its own measure of their length).
    pub start_ms: u64,
    /// Absent while the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// What the step did, when a figure says it (e.g. passes, bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub metadata: Metadata,
    pub spec: MigrationSpec,
    #[serde(default)]
    pub status: MigrationStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateMigration {
    pub vm: String,
    #[serde(default)]
    pub target_node: Option<String>,
    #[serde(default)]
    pub strategy: MigrationStrategy,
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    #[serde(default)]
    pub transport: Option<MigrationTransport>,
}

/// What a migration is predicted to take, from measured link, memory and dirty rate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationPrediction {
    pub strategy: Option<MigrationStrategy>,
    pub total_s: f64,
    pub downtime_ms: f64,
    /// Bytes on the wire (memory and disk).
    pub wire_bytes: u64,
    /// Measured: what the link delivers (bytes/s), its round trip, streams used.
    pub link_bytes_s: f64,
    pub rtt_ms: f64,
    pub streams: u64,
    pub dirty_rate_bytes_s: f64,
    /// Sampled guest memory: share of zero pages, wire bytes per byte of the rest.
    pub zero_page_share: f64,
    pub compression: f64,
    /// Share of sampled pages the target already holds (DWCP cache).
    pub known_page_share: f64,
    /// The numbers behind the strategy choice.
    pub reason: String,
}

/// Answer of a dry run: where the VM would go, how, and what it would take.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationPlan {
    pub vm: String,
    pub source_node: String,
    pub target_node: String,
    pub transport: MigrationTransport,
    /// Why the transport differs from the one asked for, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_reason: Option<String>,
    pub prediction: MigrationPrediction,
}

/// DWCP's own figures for a migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DwcpFigures {
    pub streams: u64,
    pub rtt_ms: f64,
    pub zstd_level: u64,
    /// Bytes read from QEMU (memory and disk streams) and bytes sent on the wire.
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub pages: u64,
    /// Pages sent as references to the target's cache, and as small deltas.
    pub pages_known: u64,
    pub pages_delta: u64,
    /// Guest memory sent ahead of QEMU into the target's cache (bytes).
    #[serde(default)]
    pub prefill_bytes: u64,
    /// Delivery rate measured from the target's acknowledgements (wire bytes/s).
    pub link_bytes_s: f64,
}

/// Sent by the source agent when the VM runs on the target.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompleteMigration {
    pub target_qemu_pid: u32,
    pub status: MigrationStatus,
}
