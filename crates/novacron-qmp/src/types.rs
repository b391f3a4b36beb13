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
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::commands::*;
    use crate::{parse_reply, Command, QmpError};

    /// Replies as QEMU 10.0.2 sent them (captured from `qemu-system-x86_64`).
    fn reply<C: Command>(text: &str) -> Result<C::Reply, QmpError> {
        let v: Value = serde_json::from_str(text).expect("json");
        parse_reply::<C::Reply>(C::NAME, v)
    }

    #[test]
    fn query_migrate_before_during_and_after() {
        let before = reply::<QueryMigrate>("{}").expect("empty");
        assert_eq!(before.status, None);
        assert!(before.ram.is_none());

        let setup = reply::<QueryMigrate>(
            r#"{"status": "setup", "socket-address": [{"port": "10811", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]}"#,
        )
        .expect("setup");
        assert_eq!(setup.status, Some(MigrationStatus::Setup));

        let active = reply::<QueryMigrate>(
            r#"{"expected-downtime": 300, "status": "active", "setup-time": 3, "total-time": 506, "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 1, "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 65518, "page-size": 4096, "remaining": 37822464, "postcopy-bytes": 0, "mbps": 0, "transferred": 32957, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0, "duplicate": 7280, "dirty-pages-rate": 0, "normal-bytes": 0, "normal": 0}}"#,
        )
        .expect("active");
        assert_eq!(active.status, Some(MigrationStatus::Active));
        assert_eq!(active.expected_downtime, Some(300));
        let ram = active.ram.expect("ram");
        assert_eq!(
            (ram.remaining, ram.page_size, ram.dirty_sync_count),
            (37822464, 4096, 1)
        );
        assert_eq!(ram.mbps, 0.0);

        let done = reply::<QueryMigrate>(
            r#"{"status": "completed", "setup-time": 3, "downtime": 4, "total-time": 2012, "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 3641, "downtime-bytes": 361666, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 1.7451110004977601, "transferred": 438241, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0, "duplicate": 16462, "dirty-pages-rate": 0, "normal-bytes": 212992, "normal": 52}}"#,
        )
        .expect("completed");
        assert_eq!(done.status, Some(MigrationStatus::Completed));
        assert_eq!(done.downtime, Some(4));
        assert!((done.ram.expect("ram").mbps - 1.745).abs() < 1e-3);

        let failed = reply::<QueryMigrate>(
            r#"{"status": "failed", "error-desc": "Failed to connect to '127.0.0.1:1': Connection refused"}"#,
        )
        .expect("failed");
        assert_eq!(failed.status, Some(MigrationStatus::Failed));
        assert!(failed.error_desc.is_some_and(|d| d.contains("Connection refused")));
    }

    #[test]
    fn a_malformed_query_migrate_is_an_error_naming_the_command_and_quoting_qemu() {
        for bad in [
            // A status this QEMU does not have.
            r#"{"status": "warp-speed"}"#,
            // A mandatory RAM member missing.
            r#"{"status": "active", "ram": {"transferred": 1}}"#,
            // A member of the wrong type.
            r#"{"status": "completed", "downtime": "soon"}"#,
            // Not an object at all.
            r#"[]"#,
        ] {
            match reply::<QueryMigrate>(bad) {
                Err(e @ QmpError::UnexpectedReply { .. }) => {
                    let QmpError::UnexpectedReply { command, reply, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!(command, "query-migrate");
                    assert_eq!(
                        serde_json::from_str::<Value>(reply).ok(),
                        serde_json::from_str(bad).ok()
                    );
                    let shown = e.to_string();
                    assert!(shown.contains("query-migrate") && shown.contains(&reply[..]), "{shown}");
                    assert!(std::error::Error::source(&e).is_some());
                }
                other => panic!("{bad} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn query_status_run_states() {
        for (text, running, status) in [
            (
                r#"{"status": "prelaunch", "running": false}"#,
                false,
                RunState::Prelaunch,
            ),
            (
                r#"{"status": "inmigrate", "running": false}"#,
                false,
                RunState::Inmigrate,
            ),
            (
                r#"{"status": "postmigrate", "running": false}"#,
                false,
                RunState::Postmigrate,
            ),
            (r#"{"status": "running", "running": true}"#, true, RunState::Running),
        ] {
            let st = reply::<QueryStatus>(text).expect(text);
            assert_eq!((st.running, st.status), (running, status));
        }
        assert!(reply::<QueryStatus>(r#"{"status": "running"}"#).is_err());
        assert!(reply::<QueryStatus>(r#"{"status": "sleepwalking", "running": false}"#).is_err());
    }

    #[test]
    fn query_block_jobs_mirror() {
        let jobs = reply::<QueryBlockJobs>(
            r#"[{"auto-finalize": true, "io-status": "ok", "device": "mirror-root", "auto-dismiss": true, "busy": false, "len": 16777216, "offset": 16777216, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror", "actively-synced": false}]"#,
        )
        .expect("jobs");
        let [job] = jobs.as_slice() else { panic!("{jobs:?}") };
        assert_eq!(job.job, BlockJobKind::Mirror { actively_synced: false });
        assert_eq!(job.job.job_type(), JobType::Mirror);
        assert_eq!(
            (job.device.as_str(), job.len, job.offset),
            ("mirror-root", 16777216, 16777216)
        );
        assert!(job.ready);
        assert_eq!(job.status, JobStatus::Ready);
        assert_eq!(job.io_status, BlockDeviceIoStatus::Ok);
        assert!(reply::<QueryBlockJobs>("[]").expect("none").is_empty());

        // A mirror without its branch's mandatory member, a job without `len`.
        let no_sync = r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "len": 1, "offset": 1, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror"}]"#;
        assert!(matches!(
            reply::<QueryBlockJobs>(no_sync),
            Err(QmpError::UnexpectedReply { .. })
        ));
        let no_len = r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "offset": 1, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "stream"}]"#;
        assert!(reply::<QueryBlockJobs>(no_len).is_err());
    }

    #[test]
    fn every_job_type_selects_its_branch() {
        for t in JobType::ALL {
            let job = json!({"type": t.as_str(), "actively-synced": true});
            let kind: BlockJobKind = serde_json::from_value(job).expect("kind");
            assert_eq!(kind.job_type(), *t);
        }
    }

    #[test]
    fn query_dirty_rate() {
        let unstarted = reply::<QueryDirtyRate>(
            r#"{"status": "unstarted", "sample-pages": 4096, "mode": "page-sampling", "calc-time-unit": "second", "start-time": 1796230955, "calc-time": 1}"#,
        )
        .expect("unstarted");
        assert_eq!(
            (unstarted.status, unstarted.dirty_rate),
            (DirtyRateStatus::Unstarted, None)
        );
        let measured = reply::<QueryDirtyRate>(
            r#"{"status": "measured", "sample-pages": 4096, "dirty-rate": 12, "mode": "page-sampling", "calc-time-unit": "second", "start-time": 1796230955, "calc-time": 1}"#,
        )
        .expect("measured");
        assert_eq!(
            (measured.status, measured.dirty_rate),
            (DirtyRateStatus::Measured, Some(12))
        );
        assert!(reply::<QueryDirtyRate>(r#"{"status": "measured", "dirty-rate": 12}"#).is_err());
    }

    #[test]
    fn commands_without_a_return_value_take_an_empty_object() {
        assert!(reply::<Stop>("{}").is_ok());
        assert!(reply::<MigrateSetCapabilities>("{}").is_ok());
        assert!(matches!(reply::<Cont>("null"), Err(QmpError::UnexpectedReply { .. })));
    }

    fn args<C: Command>(c: &C) -> Value {
        serde_json::to_value(c).expect("serialize")
    }

    #[test]
    fn arguments_are_what_qemu_expects() {
        assert_eq!(args(&Stop), Value::Null);
        let mut mirror = DriveMirror::new("root", "nbd://10.0.0.2:10809/root", MirrorSyncMode::Top);
        mirror.job_id = Some("mirror-root".into());
        mirror.mode = Some(NewImageMode::Existing);
        mirror.format = Some("raw".into());
        assert_eq!(
            args(&mirror),
            json!({"job-id": "mirror-root", "device": "root", "target": "nbd://10.0.0.2:10809/root",
                   "format": "raw", "sync": "top", "mode": "existing"})
        );
        assert_eq!(
            args(&NbdServerStart::new(SocketAddressLegacy::Inet(InetSocketAddress::new(
                "10.0.0.2", 10809
            )))),
            json!({"addr": {"type": "inet", "data": {"host": "10.0.0.2", "port": "10809"}}})
        );
        assert_eq!(
            args(&BlockExportAdd::nbd("root", "root", true)),
            json!({"type": "nbd", "id": "root", "node-name": "root", "writable": true})
        );
        assert_eq!(
            args(&MigrateSetCapabilities {
                capabilities: vec![
                    MigrationCapabilityStatus::new(MigrationCapability::LateBlockActivate, true),
                    MigrationCapabilityStatus::new(MigrationCapability::PostcopyRam, false),
                ]
            }),
            json!({"capabilities": [{"capability": "late-block-activate", "state": true},
                                    {"capability": "postcopy-ram", "state": false}]})
        );
        assert_eq!(
            args(&MigrateSetParameters {
                downtime_limit: Some(300),
                max_bandwidth: Some(u64::MAX / 2),
                multifd_channels: Some(4),
                multifd_compression: Some(MultiFdCompression::Zstd),
                multifd_zstd_level: Some(3),
                ..Default::default()
            }),
            json!({"downtime-limit": 300, "max-bandwidth": u64::MAX / 2, "multifd-channels": 4,
                   "multifd-compression": "zstd", "multifd-zstd-level": 3})
        );
        assert_eq!(
            args(&CalcDirtyRate {
                calc_time: 1,
                calc_time_unit: None,
                sample_pages: Some(4096),
                mode: None
            }),
            json!({"calc-time": 1, "sample-pages": 4096})
        );
        assert_eq!(
            args(&BlockJobCancel {
                device: "mirror-root".into(),
                force: Some(true)
            }),
            json!({"device": "mirror-root", "force": true})
        );
        assert_eq!(args(&MigrateIncoming::new("tcp:0:1")), json!({"uri": "tcp:0:1"}));
        assert_eq!(args(&QueryDirtyRate::default()), json!({}));
    }

    #[test]
    fn enum_names_round_trip() {
        for s in MigrationStatus::ALL {
            let v = serde_json::to_value(s).expect("ser");
            assert_eq!(v, json!(s.as_str()));
            assert_eq!(serde_json::from_value::<MigrationStatus>(v).expect("de"), *s);
        }
        assert_eq!(MigrationStatus::PostcopyActive.to_string(), "postcopy-active");
        assert_eq!(RunState::GuestPanicked.to_string(), "guest-panicked");
    }
}
