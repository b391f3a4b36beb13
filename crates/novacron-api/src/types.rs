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
    /// IPv4 address other hosts reach this one's overlay (VXLAN) traffic on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<String>,
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
    /// The agent's base URL: `http(s)://HOST[:PORT]`.
    #[schema(pattern = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,4})?/?$", max_length = 300)]
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
    /// IPv4 address of this host on the underlay, for VXLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")]
    pub underlay_ip: Option<String>,
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
    /// Set on a template (`vm template`): the VM it was made of, stamped
    /// onto every clone (`vm clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<VmTemplate>,
}

/// What a clone of a template gets from the VM the template was made of.
/// Addresses, MACs, host name and instance id are each clone's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmTemplate {
    /// The VM the template was made of.
    pub source_vm: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// Networks of the source VM's NICs, in slot order.
    #[serde(default)]
    pub networks: Vec<String>,
    /// The source VM's cloud-init settings, host name left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInitSpec>,
}

/// `POST /v1/vms/{name}/template`
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MakeTemplate {
    /// Name of the template image (default: the VM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub image: Option<String>,
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
    /// The server is downloading the disk from a URL (`status.download`).
    Downloading,
    Ready,
    /// The download failed (`status.reason`); no file was kept.
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageStatus {
    pub phase: ImagePhase,
    #[serde(default)]
    pub files: Vec<ImageFile>,
    /// Virtual size of the disk part (bytes), as reported by qemu-img.
    #[serde(default)]
    pub virtual_size_bytes: u64,
    /// The download from a URL, while it runs and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<ImageDownload>,
    /// Why the image is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Progress of an image's download by the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageDownload {
    pub url: String,
    /// The SHA-256 the file must have.
    pub sha256: String,
    pub bytes_done: u64,
    /// From the response's Content-Length, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
}

/// Body of `POST /v1/images/{name}/download`: the server fetches the disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DownloadImage {
    /// An `http://` or `https://` URL of a qcow2 or raw disk.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Hex SHA-256 of the file; the image is Ready only if it matches.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: String,
}

impl DownloadImage {
    pub fn validate(&self) -> Result<(), crate::FieldError> {
        let scheme_ok = self.url.starts_with("http://") || self.url.starts_with("https://");
        if !scheme_ok || self.url.len() > 2048 || self.url.chars().any(char::is_whitespace) {
            return Err(crate::FieldError::new(
                "url",
                "give an http:// or https:// URL of at most 2048 characters",
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(crate::FieldError::new("sha256", "a SHA-256 is 64 hexadecimal digits"));
        }
        Ok(())
    }
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
    /// Bumped by a rebuild: the agent makes the root disk anew from the image.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rebuild_generation: u64,
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
    #[schema(pattern = r"^(?!host$)[A-Za-z0-9][-_.A-Za-z0-9]{0,63}$")]
    pub cpu_model: Option<String>,
    /// Network interfaces (virtio-net), at most 8; the server fills in
    /// each one's `ip` and `mac` at create.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 8)]
    pub nics: Vec<crate::network::NicSpec>,
    /// cloud-init settings for a disk-image VM (NoCloud seed); fixed at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInitSpec>,
    /// The root disk is an independent copy of the image (a full clone)
    /// rather than an overlay on it (a linked clone, the default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_copy: bool,
    /// Volumes attached (`POST /v1/vms/{name}/volumes`; not set at create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 8)]
    pub volumes: Vec<crate::volume::VolumeAttachment>,
    /// The backup the VM's disks are restored from when it is first placed,
    /// or (with `restore_generation`) over its disks while it is stopped
    /// (set by `POST /v1/backups/{store}/{vm}/{time}/restore`, not at create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<crate::backup::RestoreSource>,
    /// Bumped by a restore in place: the agent replaces the stopped VM's
    /// disks with `restore_from`'s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restore_generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
            rebuild_generation: 0,
            restore_generation: 0,
            kernel_args: None,
            placement: Default::default(),
            machine: None,
            cpu_model: None,
            nics: Vec::new(),
            cloud_init: None,
            full_copy: false,
            volumes: Vec::new(),
            restore_from: None,
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
    /// The rebuild the agent last carried out (`spec.rebuild_generation`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed_rebuild_generation: u64,
    /// The restore in place the agent last carried out (`spec.restore_generation`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed_restore_generation: u64,
    /// Restarts done by the agent under run strategy Always.
    #[serde(default)]
    pub restarts: u32,
    /// NICs plugged into the running QEMU (empty while it does not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::network::NicStatus>,
    /// Volumes this VM's agent holds (plugged while QEMU runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::AttachedVolume>,
    /// The VM's snapshots, oldest first, as its agent keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::snapshot::Snapshot>,
    /// What the QEMU guest agent inside the VM reports; absent while none answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// A live restore still streaming the VM's disks in from its backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_restore: Option<crate::backup::LiveRestoreStatus>,
}

/// The guest OS as its QEMU guest agent describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestInfo {
    /// e.g. `Debian GNU/Linux 12 (bookworm)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Interfaces other than loopback.
    #[serde(default)]
    pub interfaces: Vec<GuestInterface>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `address/prefix`, IPv4 and IPv6.
    #[serde(default)]
    pub addresses: Vec<String>,
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
    /// A VM created without NICs joins its project's default network (the
    /// one labelled `novacron.io/default=true`, if any) unless this is set.
    #[serde(default)]
    pub no_default_network: bool,
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

/// Body of `POST /v1/vms/{name}/rebuild`: a stopped VM's root disk is made
/// anew from its image (or another one); data disk, volumes, NICs and
/// identity stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RebuildVm {
    /// Rebuild from this image instead of the VM's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub image: Option<String>,
    /// New cloud-init settings (user-data changes take effect only through a rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInitSpec>,
}

/// A command to run in the guest through its QEMU guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// Program and arguments (no shell: wrap in `sh -c` for one).
    #[schema(min_items = 1, max_items = 256)]
    pub command: Vec<String>,
    /// Seconds the command may run (default 60, at most 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 600)]
    pub timeout_s: Option<u32>,
}

pub const DEFAULT_EXEC_TIMEOUT_S: u32 = 60;
pub const MAX_EXEC_TIMEOUT_S: u32 = 600;

impl ExecRequest {
    pub fn validate(&self) -> Result<(), crate::FieldError> {
        if self.command.is_empty() || self.command.len() > 256 {
            return Err(crate::FieldError::new(
                "command",
                "give the program and 0-255 arguments",
            ));
        }
        if self.command[0].is_empty() || self.command.iter().any(|a| a.contains('\0') || a.len() > 64 * 1024) {
            return Err(crate::FieldError::new(
                "command",
                "the program must be named; arguments hold no NUL and at most 64 KiB each",
            ));
        }
        if self.timeout_s.is_some_and(|t| t == 0 || t > MAX_EXEC_TIMEOUT_S) {
            return Err(crate::FieldError::new(
                "timeout_s",
                format!("between 1 and {MAX_EXEC_TIMEOUT_S} seconds"),
            ));
        }
        Ok(())
    }
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S).into())
    }
}

/// What a command run in the guest did. Output is kept up to 1 MiB a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Absent when a signal ended the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output was cut at the limit.
    #[serde(default)]
    pub truncated: bool,
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

/// A watch line with no change in it, sent only to watches that ask with
/// `allow_bookmarks`: the stream has passed `resource_version`, so a watcher
/// of a quiet selection resumes from there, not from its last change (which
/// a new server would have to replay the kind's history from).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WatchBookmark {
    #[serde(rename = "type")]
    pub kind: BookmarkType,
    pub resource_version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum BookmarkType {
    Bookmark,
}

/// A line of a watch stream that allows bookmarks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WatchLine<T> {
    Bookmark(WatchBookmark),
    Event(WatchEvent<T>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// This server's id among the servers of a cluster (readiness only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Whether this server runs the controllers now (readiness only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<bool>,
}

// ---------------------------------------------------------------- kinds defined elsewhere

impl_object!(crate::migration::Migration, "migration");
impl_object!(crate::identity::User, "user");
impl_object!(crate::identity::Token, "token");
impl_object!(crate::identity::Role, "role");
impl_object!(crate::identity::Project, "project");
impl_object!(crate::identity::AuditRecord, "audit");
impl_object!(crate::identity::NodeCredential, "nodecredential");
impl_object!(crate::identity::ClusterTrust, "clustertrust");
impl_object!(crate::scheduling::SchedulerConfig, "schedulerconfig");
impl_object!(crate::network::Network, "network");
impl_object!(crate::network::OverlayPeers, "overlaypeers");
impl_object!(crate::network::Reservation, "reservation");
impl_object!(crate::volume::Volume, "volume");
impl_object!(crate::security::SecurityGroup, "securitygroup");
impl_object!(crate::backup::BackupStore, "backupstore");
impl_object!(crate::backup_policy::BackupPolicy, "backuppolicy");
impl_object!(crate::event::Event, "event");
impl_object!(crate::event::Webhook, "webhook");
