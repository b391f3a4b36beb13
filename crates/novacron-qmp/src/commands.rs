//! Every QMP command NovaCron sends, as a type: the value holds the
//! arguments, `Command::NAME` is the command and `Command::Reply` what QEMU
//! answers. Run one with [`Qmp::run`](crate::Qmp::run).
//!
//! Argument members follow QEMU 10.0's schema (kebab-case names; optional
//! ones left out when `None`). Only the members NovaCron uses, or is likely to
//! need next, are modelled.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::*;

mod backup;
mod snapshot;
pub use backup::*;
pub use snapshot::*;

/// A QMP command whose value is its arguments.
pub trait Command: Serialize {
    /// The command's name on the wire.
    const NAME: &'static str;
    /// What a successful command returns.
    type Reply: DeserializeOwned;
}

/// The reply of commands that return nothing: QEMU sends `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// Declares argument-less commands: a unit struct each.
macro_rules! no_args {
    ($( $(#[$meta:meta])* $ty:ident = $name:literal -> $reply:ty; )+) => {
        $(
            $(#[$meta])*
            #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
            pub struct $ty;

            impl Command for $ty {
                const NAME: &'static str = $name;
                type Reply = $reply;
            }
        )+
    };
}
pub(crate) use no_args;

no_args! {
    /// Leaves capability negotiation mode (the first command of a session).
    QmpCapabilities = "qmp_capabilities" -> Empty;
    /// The guest's run state.
    QueryStatus = "query-status" -> StatusInfo;
    /// Pauses the vCPUs.
    Stop = "stop" -> Empty;
    /// Resumes the vCPUs.
    Cont = "cont" -> Empty;
    /// Presses the ACPI power button.
    SystemPowerdown = "system_powerdown" -> Empty;
    /// Hard reset of the guest.
    SystemReset = "system_reset" -> Empty;
    /// QEMU exits.
    Quit = "quit" -> Empty;
    /// The state of the current (or last) migration, incoming or outgoing.
    QueryMigrate = "query-migrate" -> MigrationInfo;
    /// Every migration capability and whether it is on.
    QueryMigrateCapabilities = "query-migrate-capabilities" -> Vec<MigrationCapabilityStatus>;
    /// Switches a running migration to post-copy (`postcopy-ram` must be on).
    MigrateStartPostcopy = "migrate-start-postcopy" -> Empty;
    /// Cancels the outgoing migration.
    MigrateCancel = "migrate_cancel" -> Empty;
    /// The block jobs that run (or wait to be dismissed).
    QueryBlockJobs = "query-block-jobs" -> Vec<BlockJobInfo>;
    /// Stops the NBD server and removes its exports.
    NbdServerStop = "nbd-server-stop" -> Empty;
    /// QEMU's version.
    QueryVersion = "query-version" -> VersionInfo;
    /// Every machine type this QEMU offers.
    QueryMachines = "query-machines" -> Vec<MachineInfo>;
    /// Every CPU model, with what keeps it from running under this
    /// accelerator on this host.
    QueryCpuDefinitions = "query-cpu-definitions" -> Vec<CpuDefinitionInfo>;
}

/// `migrate`: sends the VM's state to `uri` (`tcp:host:port`, `unix:path`,
/// `exec:command`, ...). Returns at once; progress via [`QueryMigrate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Migrate {
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// `human-monitor-command`: one HMP command line; returns what HMP
/// printed. Tests use it for what QMP has no command for (e.g. `qemu-io`
/// on a block node, standing in for a guest's writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Reply = String;
}

/// `getfd`: names the file descriptor sent with this command (SCM_RIGHTS),
/// for later commands to use. Sent with [`crate::Qmp::pass_fd`] only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GetFd {
    pub fdname: String,
}

impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Reply = Empty;
}

/// `announce-self`: the guest's NICs announce themselves (RARP from each
/// MAC), `rounds` times, `initial` ms after the call, then every `step` ms
/// more up to `max`: switches and VXLAN peers learn where the guest now runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AnnounceSelf {
    pub initial: u64,
    pub max: u64,
    pub rounds: u64,
    pub step: u64,
}

impl Command for AnnounceSelf {
    const NAME: &'static str = "announce-self";
    type Reply = Empty;
}

/// `migrate-incoming`: a QEMU started with `-incoming defer` listens on `uri`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateIncoming {
    pub uri: String,
    /// Exit when the incoming migration fails (QEMU's default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

impl MigrateIncoming {
    pub fn new(uri: impl Into<String>) -> Self {
        MigrateIncoming {
            uri: uri.into(),
            exit_on_error: None,
        }
    }
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

/// `migrate-set-parameters` (QAPI `MigrateSetParameters`): only the members
/// that are `Some` change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Dirty-rate threshold (percent of bandwidth) that starts throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// Auto-converge: first throttle percentage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// Auto-converge: throttle increment per pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Bytes per second QEMU assumes for the switchover decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Milliseconds the guest may stay paused at the switchover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bytes per second during post-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u8>,
    /// Which dirty bitmaps the `dirty-bitmaps` capability migrates, under
    /// which names: a node's alias on one side meets the same alias on the
    /// other, so node names may differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<Vec<BitmapMigrationNodeAlias>>,
}

/// QAPI `BitmapMigrationNodeAlias`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapMigrationNodeAlias {
    pub node_name: String,
    pub alias: String,
    pub bitmaps: Vec<BitmapMigrationBitmapAlias>,
}

/// QAPI `BitmapMigrationBitmapAlias`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapMigrationBitmapAlias {
    pub name: String,
    pub alias: String,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// `calc-dirty-rate`: starts measuring the guest's dirty rate; read the
/// result with [`QueryDirtyRate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    /// How long to measure, in `calc_time_unit`s (default seconds).
    pub calc_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calc_time_unit: Option<TimeUnit>,
    /// Pages sampled per GiB (page-sampling mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<DirtyRateMeasureMode>,
}

impl Command for CalcDirtyRate {
    const NAME: &'static str = "calc-dirty-rate";
    type Reply = Empty;
}

/// `query-dirty-rate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryDirtyRate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calc_time_unit: Option<TimeUnit>,
}

impl Command for QueryDirtyRate {
    const NAME: &'static str = "query-dirty-rate";
    type Reply = DirtyRateInfo;
}

/// `drive-mirror`: copies a disk to `target` and keeps it in sync until the
/// job is cancelled or completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DriveMirror {
    /// The job's name (default: `device`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Device or node name of the source.
    pub device: String,
    /// A filename or URL such as `nbd://host:port/export`.
    pub target: String,
    /// The target's format (default: the source's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    pub sync: MirrorSyncMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
    /// Bytes per second (default: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<MirrorCopyMode>,
}

impl DriveMirror {
    pub fn new(device: impl Into<String>, target: impl Into<String>, sync: MirrorSyncMode) -> Self {
        DriveMirror {
            job_id: None,
            device: device.into(),
            target: target.into(),
            format: None,
            sync,
            mode: None,
            speed: None,
            copy_mode: None,
        }
    }
}

impl Command for DriveMirror {
    const NAME: &'static str = "drive-mirror";
    type Reply = Empty;
}

/// `block-job-cancel`. Cancelling a ready mirror without `force` completes it
/// consistently (the target holds the source's contents as of that moment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobCancel {
    /// The job id.
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Reply = Empty;
}

/// `nbd-server-start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    pub addr: SocketAddressLegacy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl NbdServerStart {
    pub fn new(addr: SocketAddressLegacy) -> Self {
        NbdServerStart {
            addr,
            tls_creds: None,
            tls_authz: None,
            max_connections: None,
        }
    }
}

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Reply = Empty;
}

/// `block-export-add` (QAPI `BlockExportOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAdd {
    pub id: String,
    /// The block node to export.
    pub node_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writethrough: Option<bool>,
    #[serde(flatten)]
    pub export: BlockExportKind,
}

impl BlockExportAdd {
    /// An NBD export of `node_name` named after the node.
    pub fn nbd(id: impl Into<String>, node_name: impl Into<String>, writable: bool) -> Self {
        BlockExportAdd {
            id: id.into(),
            node_name: node_name.into(),
            writable: Some(writable),
            writethrough: None,
            export: BlockExportKind::Nbd(BlockExportNbd::default()),
        }
    }
}

impl Command for BlockExportAdd {
    const NAME: &'static str = "block-export-add";
    type Reply = Empty;
}

/// `netdev_add` of a tap backend (QAPI `Netdev`, type `tap`) on a tap the
/// caller made: QEMU opens `ifname` and runs no scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetdevAddTap {
    pub id: String,
    /// Always `tap`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ifname: String,
    pub script: &'static str,
    pub downscript: &'static str,
}

impl NetdevAddTap {
    pub fn new(id: impl Into<String>, ifname: impl Into<String>) -> Self {
        NetdevAddTap {
            id: id.into(),
            kind: "tap",
            ifname: ifname.into(),
            script: "no",
            downscript: "no",
        }
    }
}

impl Command for NetdevAddTap {
    const NAME: &'static str = "netdev_add";
    type Reply = Empty;
}

/// `netdev_del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetdevDel {
    pub id: String,
}

impl Command for NetdevDel {
    const NAME: &'static str = "netdev_del";
    type Reply = Empty;
}

/// `device_add` of a virtio-net PCI NIC. The schema declares only `driver`,
/// `bus` and `id`; the device's own properties ride along (`gen: false`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceAddVirtioNet {
    /// Always `virtio-net-pci`.
    pub driver: &'static str,
    pub id: String,
    pub netdev: String,
    pub mac: String,
    /// The MTU the guest is told.
    #[serde(rename = "host_mtu")]
    pub host_mtu: u32,
    /// PCI slot (`0x10`): fixed, so the target of a migration gets the
    /// same hardware and the guest keeps its interface names.
    pub addr: String,
}

impl Command for DeviceAddVirtioNet {
    const NAME: &'static str = "device_add";
    type Reply = Empty;
}

/// `device_del`: asks the guest to release the device (ACPI hot-unplug);
/// the device is gone when `DEVICE_DELETED` arrives or it leaves `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceDel {
    pub id: String,
}

impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Reply = Empty;
}

/// `qom-list`: the properties (children included) of the object at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QomList {
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Reply = Vec<ObjectPropertyInfo>;
}

/// `blockdev-add` of a qcow2 image in a local file: a format node named
/// `node_name` over a file node (QAPI `BlockdevOptions`, driver `qcow2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAddQcow2 {
    /// Always `qcow2`.
    pub driver: &'static str,
    pub node_name: String,
    /// Always `unmap`: the guest's discards free space in the image.
    pub discard: &'static str,
    pub file: BlockdevFile,
    /// `Some(None)` sends `"backing": null`: an overlay whose backing node
    /// `blockdev-snapshot` attaches (its backing file is not opened);
    /// `Some(Some(node))` puts it on an existing node. `None`: the backing
    /// file its header names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Option<String>>,
}

/// The protocol node under a format node: a local file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevFile {
    /// Always `file`.
    pub driver: &'static str,
    pub filename: String,
}

impl BlockdevAddQcow2 {
    pub fn new(node_name: impl Into<String>, filename: impl Into<String>) -> Self {
        BlockdevAddQcow2 {
            driver: "qcow2",
            node_name: node_name.into(),
            discard: "unmap",
            file: BlockdevFile {
                driver: "file",
                filename: filename.into(),
            },
            backing: None,
        }
    }

    /// An overlay added without its backing node (see [`Transaction`]).
    pub fn overlay(node_name: impl Into<String>, filename: impl Into<String>) -> Self {
        BlockdevAddQcow2 {
            backing: Some(None),
            ..Self::new(node_name, filename)
        }
    }

    /// An overlay on node `backing`: reads of what it does not hold go there.
    pub fn on_node(node_name: impl Into<String>, filename: impl Into<String>, backing: impl Into<String>) -> Self {
        BlockdevAddQcow2 {
            backing: Some(Some(backing.into())),
            ..Self::new(node_name, filename)
        }
    }
}

impl Command for BlockdevAddQcow2 {
    const NAME: &'static str = "blockdev-add";
    type Reply = Empty;
}

/// `blockdev-del`: removes a node no device uses any more (and the file
/// node under it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Reply = Empty;
}

/// `device_add` of a virtio-blk PCI disk on block node `drive`. Like
/// [`DeviceAddVirtioNet`], the device's own properties ride along.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceAddVirtioBlk {
    /// Always `virtio-blk-pci`.
    pub driver: &'static str,
    pub id: String,
    pub drive: String,
    /// Up to 20 bytes; the guest sees it as `/dev/disk/by-id/virtio-SERIAL`.
    pub serial: String,
    /// Fixed PCI slot, as for NICs: the migration target gets the same hardware.
    pub addr: String,
}

impl Command for DeviceAddVirtioBlk {
    const NAME: &'static str = "device_add";
    type Reply = Empty;
}

/// `block_resize`: grows (or shrinks) the image under `node_name`; the
/// guest is told of the new capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockResize {
    pub node_name: String,
    pub size: u64,
}

impl Command for BlockResize {
    const NAME: &'static str = "block_resize";
    type Reply = Empty;
}

/// `query-named-block-nodes`; `flat` leaves out the nodes' backing chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueryNamedBlockNodes {
    pub flat: bool,
}

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Reply = Vec<BlockDeviceInfo>;
}

/// `block-stream`: copies what the node's backing chain holds into the
/// node itself; once done, the node has no backing file (in its image
/// header too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    pub job_id: String,
    /// The node (or device) to fill.
    pub device: String,
    /// False keeps the concluded job, with its error, until `job-dismiss`.
    pub auto_dismiss: bool,
}

impl Command for BlockStream {
    const NAME: &'static str = "block-stream";
    type Reply = Empty;
}

/// `job-dismiss`: forgets a concluded job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobDismiss {
    pub id: String,
}

impl Command for JobDismiss {
    const NAME: &'static str = "job-dismiss";
    type Reply = Empty;
}
