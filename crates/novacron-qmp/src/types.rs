//! QAPI types that NovaCron's commands send and receive, checked against the
//! schema of QEMU 10.0 (`query-qmp-schema`; `qapi/migration.json`,
//! `qapi/block-core.json`, `qapi/block-export.json`, `qapi/run-state.json`,
//! `qapi/job.json`, `qapi/sockets.json`).
//!
//! Rules, so that an unexpected reply is an error and never a guess:
//! - a member the schema marks mandatory is a plain field (no serde default);
//!   an optional one (`*name`) is an `Option`;
//! - an enum has exactly the schema's values. QAPI's compatibility rules
//!   (docs/devel/qapi-code-gen.rst, "Compatibility considerations") let QEMU
//!   add return *members*, which clients ignore, but list no new enum values
//!   in replies as compatible, so an unknown value fails the reply;
//! - members NovaCron does not read are left out: the QMP spec asks clients
//!   to ignore members they do not know.
//!
//! QAPI's `int` counts (bytes, pages, milliseconds) are read as `u64`: they
//! are never negative, and a negative one is an unexpected reply.

use serde::{Deserialize, Serialize};

/// A QAPI enum: the Rust variants, their wire names, `as_str`, `Display` and
/// `ALL` (which the schema test compares with the installed QEMU).
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $wire)] $variant, )+
        }

        impl $name {
            /// Every value, in schema order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name QEMU uses on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

// ------------------------------------------------------------ run state

qapi_enum! {
    /// QAPI `RunState` (`qapi/run-state.json`).
    pub enum RunState {
        Debug = "debug",
        /// Waiting for an incoming migration.
        Inmigrate = "inmigrate",
        InternalError = "internal-error",
        IoError = "io-error",
        Paused = "paused",
        /// An outgoing migration finished; the guest stays stopped.
        Postmigrate = "postmigrate",
        /// Started with `-S`, never run yet.
        Prelaunch = "prelaunch",
        FinishMigrate = "finish-migrate",
        RestoreVm = "restore-vm",
        Running = "running",
        SaveVm = "save-vm",
        Shutdown = "shutdown",
        Suspended = "suspended",
        Watchdog = "watchdog",
        GuestPanicked = "guest-panicked",
        Colo = "colo",
    }
}

/// Reply of `query-version` (QAPI `VersionInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    /// The distribution's package version, e.g. ` (Debian 1:10.0.2+ds-2)`.
    pub package: String,
}

/// QAPI `VersionTriple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One machine type of `query-machines` (QAPI `MachineInfo`), the members
/// NovaCron reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    pub name: String,
    /// The short name that stands for this type (`q35` for `pc-q35-10.0`).
    pub alias: Option<String>,
    pub cpu_max: u32,
    pub hotpluggable_cpus: bool,
    pub numa_mem_supported: bool,
    pub deprecated: bool,
    pub acpi: bool,
}

/// One CPU model of `query-cpu-definitions` (QAPI `CpuDefinitionInfo`),
/// the members NovaCron reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuDefinitionInfo {
    pub name: String,
    /// What keeps the model from running under the current accelerator on
    /// this host: empty when it runs. Absent where QEMU cannot tell (not on
    /// x86).
    pub unavailable_features: Option<Vec<String>>,
    pub deprecated: bool,
    /// The QOM type that implements the model.
    pub typename: String,
    /// Whether the model expands the same way on every QEMU and host.
    #[serde(rename = "static")]
    pub is_static: bool,
}

/// Reply of `query-status` (QAPI `StatusInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// The vCPUs run.
    pub running: bool,
    pub status: RunState,
}

// ------------------------------------------------------------ migration

qapi_enum! {
    /// QAPI `MigrationStatus`.
    pub enum MigrationStatus {
        None = "none",
        Setup = "setup",
        Cancelling = "cancelling",
        Cancelled = "cancelled",
        Active = "active",
        PostcopyActive = "postcopy-active",
        PostcopyPaused = "postcopy-paused",
        PostcopyRecoverSetup = "postcopy-recover-setup",
        PostcopyRecover = "postcopy-recover",
        Completed = "completed",
        Failed = "failed",
        Colo = "colo",
        PreSwitchover = "pre-switchover",
        Device = "device",
        WaitUnplug = "wait-unplug",
    }
}

/// Reply of `query-migrate` (QAPI `MigrationInfo`), the members NovaCron reads.
///
/// Every member is optional in the schema: before any migration QEMU 10.0
/// answers `{}`, so `status` is `None` then (which is not `Some(None)`:
/// QEMU leaves the member out rather than saying "none").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<MigrationStatus>,
    /// RAM statistics, once the migration has started moving memory.
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started (until it ended, if it did).
    pub total_time: Option<u64>,
    /// Estimated downtime in milliseconds while the migration is active.
    pub expected_downtime: Option<u64>,
    /// Downtime in milliseconds, once the migration completed.
    pub downtime: Option<u64>,
    /// Milliseconds spent in the setup phase.
    pub setup_time: Option<u64>,
    /// Percentage of vCPU time throttled by auto-converge.
    pub cpu_throttle_percentage: Option<u64>,
    /// QEMU's explanation of a failed migration.
    pub error_desc: Option<String>,
    /// Why the VM cannot migrate right now.
    pub blocked_reasons: Option<Vec<String>>,
    /// Where an incoming migration listens: the real port when it was
    /// asked for port 0.
    pub socket_address: Option<Vec<SocketAddress>>,
}

impl MigrationInfo {
    /// The TCP port an incoming migration listens on. `None` when QEMU
    /// names no inet address; a port that is not a number is an error.
    pub fn incoming_port(&self) -> Result<Option<u16>, std::num::ParseIntError> {
        let inet = self.socket_address.iter().flatten().find_map(|a| match a {
            SocketAddress::Inet(inet) => Some(inet),
            _ => None,
        });
        inet.map(|i| i.port.parse()).transpose()
    }
}

/// QAPI `MigrationStats` (`ram` of `query-migrate`): every member mandatory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes transferred so far.
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Guest RAM in bytes.
    pub total: u64,
    /// Zero pages (sent as a marker only).
    pub duplicate: u64,
    /// Pages sent whole.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Completed passes over guest memory.
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    /// Target page size in bytes.
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    pub dirty_sync_missed_zero_copy: u64,
}

qapi_enum! {
    /// QAPI `MigrationCapability`.
    pub enum MigrationCapability {
        Xbzrle = "xbzrle",
        RdmaPinAll = "rdma-pin-all",
        AutoConverge = "auto-converge",
        ZeroBlocks = "zero-blocks",
        Events = "events",
        PostcopyRam = "postcopy-ram",
        XColo = "x-colo",
        ReleaseRam = "release-ram",
        ReturnPath = "return-path",
        PauseBeforeSwitchover = "pause-before-switchover",
        Multifd = "multifd",
        DirtyBitmaps = "dirty-bitmaps",
        PostcopyBlocktime = "postcopy-blocktime",
        LateBlockActivate = "late-block-activate",
        XIgnoreShared = "x-ignore-shared",
        ValidateUuid = "validate-uuid",
        BackgroundSnapshot = "background-snapshot",
        ZeroCopySend = "zero-copy-send",
        PostcopyPreempt = "postcopy-preempt",
        SwitchoverAck = "switchover-ack",
        DirtyLimit = "dirty-limit",
        MappedRam = "mapped-ram",
    }
}

/// QAPI `MigrationCapabilityStatus`: argument of `migrate-set-capabilities`,
/// element of `query-migrate-capabilities`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    pub capability: MigrationCapability,
    pub state: bool,
}

impl MigrationCapabilityStatus {
    pub fn new(capability: MigrationCapability, state: bool) -> Self {
        MigrationCapabilityStatus { capability, state }
    }
}

qapi_enum! {
    /// QAPI `MultiFDCompression`, the values every build has (`qatzip`,
    /// `qpl` and `uadk` exist only in builds configured for them).
    pub enum MultiFdCompression {
        None = "none",
        Zlib = "zlib",
        Zstd = "zstd",
    }
}

// ------------------------------------------------------------ dirty rate

qapi_enum! {
    /// QAPI `DirtyRateStatus`.
    pub enum DirtyRateStatus {
        Unstarted = "unstarted",
        Measuring = "measuring",
        Measured = "measured",
    }
}

qapi_enum! {
    /// QAPI `DirtyRateMeasureMode`.
    pub enum DirtyRateMeasureMode {
        PageSampling = "page-sampling",
        DirtyRing = "dirty-ring",
        DirtyBitmap = "dirty-bitmap",
    }
}

qapi_enum! {
    /// QAPI `TimeUnit`.
    pub enum TimeUnit {
        Second = "second",
        Millisecond = "millisecond",
    }
}

/// Reply of `query-dirty-rate` (QAPI `DirtyRateInfo`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// MB/s; present once `status` is `measured`.
    pub dirty_rate: Option<i64>,
    pub status: DirtyRateStatus,
    /// When the measurement started (seconds of QEMU's monotonic clock).
    pub start_time: i64,
    /// How long it measures, in `calc_time_unit`s.
    pub calc_time: i64,
    pub calc_time_unit: TimeUnit,
    pub sample_pages: u64,
    pub mode: DirtyRateMeasureMode,
    /// Per-vCPU rates (dirty-ring mode only).
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
}

/// QAPI `DirtyRateVcpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateVcpu {
    pub id: i64,
    /// MB/s.
    pub dirty_rate: i64,
}

// ------------------------------------------------------------ block jobs

qapi_enum! {
    /// QAPI `MirrorSyncMode`.
    pub enum MirrorSyncMode {
        Top = "top",
        Full = "full",
        None = "none",
        Incremental = "incremental",
        Bitmap = "bitmap",
    }
}

qapi_enum! {
    /// QAPI `NewImageMode`.
    pub enum NewImageMode {
        /// The target exists already (e.g. an NBD export): use it as it is.
        Existing = "existing",
        AbsolutePaths = "absolute-paths",
    }
}

qapi_enum! {
    /// QAPI `MirrorCopyMode`.
    pub enum MirrorCopyMode {
        Background = "background",
        WriteBlocking = "write-blocking",
    }
}

qapi_enum! {
    /// QAPI `JobType`, the `type` of a block job.
    pub enum JobType {
        Commit = "commit",
        Stream = "stream",
        Mirror = "mirror",
        Backup = "backup",
        Create = "create",
        Amend = "amend",
        SnapshotLoad = "snapshot-load",
        SnapshotSave = "snapshot-save",
        SnapshotDelete = "snapshot-delete",
    }
}

qapi_enum! {
    /// QAPI `JobStatus`.
    pub enum JobStatus {
        Undefined = "undefined",
        Created = "created",
        Running = "running",
        Paused = "paused",
        Ready = "ready",
        Standby = "standby",
        Waiting = "waiting",
        Pending = "pending",
        Aborting = "aborting",
        Concluded = "concluded",
        Null = "null",
    }
}

qapi_enum! {
    /// QAPI `BlockDeviceIoStatus`.
    pub enum BlockDeviceIoStatus {
        Ok = "ok",
        Failed = "failed",
        Nospace = "nospace",
    }
}

/// Element of `query-block-jobs`'s reply (QAPI `BlockJobInfo`, a union on
/// `type`: mirror jobs carry `actively-synced`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    #[serde(flatten)]
    pub job: BlockJobKind,
    /// The job's id (QEMU calls it `device` for compatibility).
    pub device: String,
    /// Work to do, in an arbitrary unit (bytes for mirror).
    pub len: u64,
    /// Work done, in the unit of `len`.
    pub offset: u64,
    pub busy: bool,
    pub paused: bool,
    /// Rate limit in bytes per second (0: none).
    pub speed: u64,
    pub io_status: BlockDeviceIoStatus,
    /// A mirror is in sync and can be completed or cancelled consistently.
    pub ready: bool,
    pub status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Why the job failed, once it did.
    pub error: Option<String>,
}

/// The variant part of `BlockJobInfo`, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BlockJobKind {
    Commit,
    Stream,
    Mirror {
        /// Writes go to source and target at once (copy-mode write-blocking).
        #[serde(rename = "actively-synced")]
        actively_synced: bool,
    },
    Backup,
    Create,
    Amend,
    SnapshotLoad,
    SnapshotSave,
    SnapshotDelete,
}

impl BlockJobKind {
    pub fn job_type(&self) -> JobType {
        match self {
            BlockJobKind::Commit => JobType::Commit,
            BlockJobKind::Stream => JobType::Stream,
            BlockJobKind::Mirror { .. } => JobType::Mirror,
            BlockJobKind::Backup => JobType::Backup,
            BlockJobKind::Create => JobType::Create,
            BlockJobKind::Amend => JobType::Amend,
            BlockJobKind::SnapshotLoad => JobType::SnapshotLoad,
            BlockJobKind::SnapshotSave => JobType::SnapshotSave,
            BlockJobKind::SnapshotDelete => JobType::SnapshotDelete,
        }
    }
}

// ------------------------------------------------------------ NBD

/// QAPI `SocketAddressLegacy` (`nbd-server-start`'s `addr`): the address
/// nested under `data`. `vsock` is not modelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    /// A socket handed to QEMU with [`crate::Qmp::pass_fd`], by its name.
    Fd(QapiString),
}

/// QAPI `SocketAddress`: the flat form, as `query-migrate` reports where
/// an incoming migration listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock(VsockSocketAddress),
    Fd(QapiString),
}

/// QAPI `String`: a string wrapped in an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QapiString {
    pub str: String,
}

/// QAPI `VsockSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VsockSocketAddress {
    pub cid: String,
    pub port: String,
}

/// QAPI `InetSocketAddress`, the members NovaCron sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InetSocketAddress {
    pub host: String,
    /// A port number or service name (QAPI has it as a string).
    pub port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
}

impl InetSocketAddress {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        InetSocketAddress {
            host: host.into(),
            port: port.to_string(),
            ipv4: None,
            ipv6: None,
        }
    }
}

/// QAPI `UnixSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocketAddress {
    pub path: String,
}

/// The variant part of `block-export-add`, chosen by `type` (only NBD is
/// modelled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BlockExportKind {
    Nbd(BlockExportNbd),
}

/// QAPI `BlockExportOptionsNbd`, the members NovaCron sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportNbd {
    /// Export name clients ask for (default: the node name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_depth: Option<bool>,
    /// Dirty bitmaps clients may read as `qemu:dirty-bitmap:NAME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapRef>>,
}

/// QAPI `BlockDirtyBitmapOrStr`: a bitmap of the node in question by
/// name, or of any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BitmapRef {
    Local(String),
    Node { node: String, name: String },
}

#[cfg(test)]
mod tests;

// ------------------------------------------------------------ devices

/// One entry of `qom-list` (QAPI `ObjectPropertyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectPropertyInfo {
    pub name: String,
    /// `child<virtio-net-pci>`, `link<...>`, `string`, ...
    #[serde(rename = "type")]
    pub kind: String,
}

/// One entry of `query-named-block-nodes` (QAPI `BlockDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// Its node name (auto-generated ones start with `#`); optional in
    /// the schema, though `query-named-block-nodes` lists named nodes.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The image's file name (for a format node, its file's).
    pub file: String,
    /// Format driver (`qcow2`, `raw`) or protocol (`file`).
    pub drv: String,
    pub image: ImageInfo,
    /// The node's dirty bitmaps.
    #[serde(default)]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

/// One dirty bitmap of a node (QAPI `BlockDirtyInfo`, the members used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockDirtyInfo {
    /// Optional in the schema (bitmaps without names are a thing of the past).
    #[serde(default)]
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    pub granularity: u32,
    /// Records writes now.
    pub recording: bool,
    /// Stored in the image (qcow2) when QEMU closes it.
    pub persistent: bool,
    /// Left in use by a QEMU that did not close the image: what it says
    /// cannot be trusted.
    #[serde(default)]
    pub inconsistent: bool,
}

/// What `BlockDeviceInfo` says of the image (QAPI `ImageInfo`, the members used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
}
