//! The API objects. Every object has `metadata`, a user-owned `spec` and a
//! controller/agent-owned `status`; writes are compare-and-swap on
//! `metadata.resource_version`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use utoipa::ToSchema;

/// Common object metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Metadata {
    /// Unique, immutable id (UUID).
    pub id: String,
    /// Name, unique per kind (DNS label).
    pub name: String,
    /// Owning project.
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Store revision of the last write; send it back on update for compare-and-swap.
    #[serde(default)]
    pub resource_version: u64,
    /// Incremented on every change of `spec`.
    #[serde(default)]
    pub generation: u64,
    /// Set when deletion was requested and cleanup is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_requested_at: Option<DateTime<Utc>>,
}

pub fn default_project() -> String {
    "default".to_string()
}

impl Metadata {
    pub fn new(name: &str, labels: BTreeMap<String, String>) -> Self {
        let now = Utc::now();
        Metadata {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            project: default_project(),
            labels,
            created_at: now,
            updated_at: now,
            resource_version: 0,
            generation: 1,
            deletion_requested_at: None,
        }
    }
}

/// A typed object that lives in the store.
pub trait Object: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Kind name, used as the store's table key and in events.
    const KIND: &'static str;
    fn meta(&self) -> &Metadata;
    fn meta_mut(&mut self) -> &mut Metadata;
}

macro_rules! impl_object {
    ($t:ty, $kind:literal) => {
        impl Object for $t {
            const KIND: &'static str = $kind;
            fn meta(&self) -> &Metadata {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut Metadata {
                &mut self.metadata
            }
        }
    };
}

// ---------------------------------------------------------------- Node

/// Compute resources of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_gib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeSpec {
    /// Base URL of the node agent (data plane and console).
    pub address: String,
    /// Whether new VMs may be placed here (false = cordoned).
    #[serde(default = "yes")]
    pub schedulable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    pub capacity: Resources,
    /// Ready condition: the agent heartbeats within the grace period.
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<DateTime<Utc>>,
    /// Accelerator the agent uses for guests: `kvm` or `tcg`.
    #[serde(default)]
    pub accel: String,
    #[serde(default)]
    pub agent_version: String,
    /// What the node's QEMU can run; empty when the agent did not say.
    #[serde(default)]
    pub qemu: QemuCapabilities,
    /// Port of the agent's DWCP listener, so that a source agent opens a
    /// session without first asking for it (each question is a round trip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwcp_port: Option<u16>,
    /// Resources reserved by VMs bound to this node (filled in by the server on read).
    #[serde(default)]
    pub allocated: Resources,
    #[serde(default)]
    pub vm_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub metadata: Metadata,
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}
impl_object!(Node, "node");

/// The machine types and CPU models a node's QEMU offers (asked over QMP:
/// `query-machines`, `query-cpu-definitions`): a VM runs, or migrates, only
/// where its versioned machine type and CPU model exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QemuCapabilities {
    /// e.g. `10.0.2`.
    #[serde(default)]
    pub version: String,
    /// Every machine type name, aliases included (`pc`, `pc-i440fx-10.0`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_types: Vec<String>,
    /// What each alias stands for here: `pc` -> `pc-i440fx-10.0`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub machine_aliases: BTreeMap<String, String>,
    /// CPU models that run under the node's accelerator on its host (QEMU
    /// names no unavailable features for them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_models: Vec<String>,
}

impl QemuCapabilities {
    /// Whether the node said what it can run.
    pub fn is_known(&self) -> bool {
        !self.machine_types.is_empty()
    }
}

/// Sent by an agent when it starts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterNode {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    pub address: String,
    pub capacity: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub accel: String,
    #[serde(default)]
    pub agent_version: String,
    #[serde(default)]
    pub qemu: QemuCapabilities,
    /// Port of the agent's DWCP listener (on the host of `address`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwcp_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterNodeResponse {
    pub node: Node,
    /// Shared secret the server presents when it calls this agent.
    pub agent_secret: String,
}

// ---------------------------------------------------------------- Image

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
    /// Direct kernel boot: a kernel and an initrd.
    Kernel,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Kernel => "kernel",
        })
    }
}

/// The files that make up an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImagePart {
    Disk,
    Kernel,
    Initrd,
}

impl ImagePart {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePart::Disk => "disk",
            ImagePart::Kernel => "kernel",
            ImagePart::Initrd => "initrd",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "disk" => Some(ImagePart::Disk),
            "kernel" => Some(ImagePart::Kernel),
            "initrd" => Some(ImagePart::Initrd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageSpec {
    pub format: ImageFormat,
    /// Extra kernel command line for kernel images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Readable and usable by every project (set by all-project admins).
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageFile {
    pub part: ImagePart,
    pub size_bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ImagePhase {
    #[default]
    Uploading,
    Ready,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageStatus {
    pub phase: ImagePhase,
    #[serde(default)]
    pub files: Vec<ImageFile>,
    /// Virtual size of the disk part (bytes), as reported by qemu-img.
    #[serde(default)]
    pub virtual_size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub metadata: Metadata,
    pub spec: ImageSpec,
    #[serde(default)]
    pub status: ImageStatus,
}
impl_object!(Image, "image");

impl Image {
    pub fn file(&self, part: ImagePart) -> Option<&ImageFile> {
        self.status.files.iter().find(|f| f.part == part)
    }
    /// The parts an image of this format must have before it is Ready.
    pub fn required_parts(&self) -> &'static [ImagePart] {
        match self.spec.format {
            ImageFormat::Kernel => &[ImagePart::Kernel, ImagePart::Initrd],
            ImageFormat::Qcow2 | ImageFormat::Raw => &[ImagePart::Disk],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateImage {
    /// DNS label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Owning project; defaults to the caller's token project, else `default`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    pub format: ImageFormat,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// Make the image usable by every project.
    #[serde(default)]
    pub public: bool,
}

// ---------------------------------------------------------------- VM

/// What the agent does when the VM stops on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum RunStrategy {
    /// Restart the VM whenever it is not running (crash or guest shutdown).
    Always,
    /// Run as the user asks; a crash leaves it Failed.
    #[default]
    Manual,
}

/// The power state the user wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum PowerState {
    #[default]
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: u32,
    #[schema(minimum = 32, maximum = 1_048_576)]
    pub memory_mib: u64,
    /// Name of the image the root disk is an overlay of.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub image: String,
    /// Root disk size; defaults to the image's virtual size (1 GiB for kernel images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub disk_mib: Option<u64>,
    /// Size of an optional blank data disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub data_disk_mib: Option<u64>,
    #[serde(default)]
    pub run_strategy: RunStrategy,
    #[serde(default)]
    pub power_state: PowerState,
    /// Seconds a graceful (ACPI) stop may take before QEMU is killed; 0 = force.
    #[serde(default = "default_stop_timeout")]
    #[schema(maximum = 3600)]
    pub stop_timeout_s: u32,
    /// Grace period of the stop in progress (0 = kill at once); cleared by start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_s: Option<u32>,
    /// Bumped by the reboot action; the agent resets the guest when it changes.
    #[serde(default)]
    pub reboot_generation: u64,
    /// Bumped by a start of a Failed or Stopped VM: the user asks again.
    #[serde(default)]
    pub start_request: u64,
    /// Extra guest kernel command line (kernel images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub kernel_args: Option<String>,
    /// Node selector, affinity, zone preference, priority.
    #[serde(default, skip_serializing_if = "crate::Placement::is_empty")]
    pub placement: crate::Placement,
    /// QEMU machine type. Given as a family (`pc`, `q35`) it is pinned to
    /// that family's versioned type on the first node the VM is placed on
    /// (`pc-i440fx-10.0`), and kept from then on, across migrations, so the
    /// guest sees the same virtual hardware everywhere. Default `pc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,63}$")]
    pub machine: Option<String>,
    /// QEMU CPU model (`qemu64`, `Nehalem`, ...); default: the cluster's
    /// baseline (`novacron cluster set-scheduler --cpu-model`), recorded at
    /// create. A named model, unlike `host`, can migrate between hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,63}$")]
    pub cpu_model: Option<String>,
}

pub fn default_stop_timeout() -> u32 {
    30
}

impl VmSpec {
    /// A running VM of `image` with every other field at its default.
    pub fn new(image: &str, vcpus: u32, memory_mib: u64) -> Self {
        VmSpec {
            vcpus,
            memory_mib,
            image: image.to_string(),
            disk_mib: None,
            data_disk_mib: None,
            run_strategy: RunStrategy::default(),
            power_state: PowerState::default(),
            stop_timeout_s: default_stop_timeout(),
            stop_grace_s: None,
            reboot_generation: 0,
            start_request: 0,
            kernel_args: None,
            placement: Default::default(),
            machine: None,
            cpu_model: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmPhase {
    /// Not yet placed on a node.
    #[default]
    Pending,
    /// Bound to a node; the agent is preparing it.
    Scheduled,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Migrating,
    Failed,
    /// Deletion requested; the agent is removing the process and disks.
    Deleting,
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    #[serde(default)]
    pub phase: VmPhase,
    /// Node the VM is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why the VM is in its phase (e.g. why it is Pending or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// `metadata.generation` the agent last acted on.
    #[serde(default)]
    pub observed_generation: u64,
    #[serde(default)]
    pub observed_reboot_generation: u64,
    #[serde(default)]
    pub observed_start_request: u64,
    /// Restarts done by the agent under run strategy Always.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub metadata: Metadata,
    pub spec: VmSpec,
    #[serde(default)]
    pub status: VmStatus,
}
impl_object!(Vm, "vm");

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateVm {
    /// DNS label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Owning project; defaults to the caller's token project, else `default`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: VmSpec,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StopVm {
    /// Kill QEMU at once instead of an ACPI shutdown.
    #[serde(default)]
    pub force: bool,
    /// Grace period for the ACPI shutdown (default: the VM's stop_timeout_s).
    #[serde(default)]
    pub timeout_s: Option<u32>,
}

// ---------------------------------------------------------------- lists and watch

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    /// Pass as `continue` to get the next page; absent on the last page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
    /// Store revision the list was read at; watch from here.
    pub resource_version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
}

/// One line of a watch stream (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub event_type: WatchEventType,
    pub object: T,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

// ---------------------------------------------------------------- Migration

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
impl_object!(Migration, "migration");

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

// ---------------------------------------------------------------- identity (see `identity.rs`)

impl_object!(crate::identity::User, "user");
impl_object!(crate::identity::Token, "token");
impl_object!(crate::identity::Role, "role");
impl_object!(crate::identity::Project, "project");
impl_object!(crate::identity::AuditRecord, "audit");
impl_object!(crate::identity::NodeCredential, "nodecredential");
impl_object!(crate::identity::ClusterTrust, "clustertrust");
impl_object!(crate::scheduling::SchedulerConfig, "schedulerconfig");
