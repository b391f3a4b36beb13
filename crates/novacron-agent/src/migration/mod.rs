//! Live migration with storage, driven by the source agent.
//!
//! ```text
//! source agent                         target agent (HTTP, agent secret)
//!  PreparingTarget ───── prepare ────▶ disks (same base image), QEMU -S -incoming defer,
//!   meanwhile: open DWCP, probe the       NBD export of each disk, migrate-incoming
//!   link, sample memory and dirty rate,
//!   pick the strategy
//!  Transferring: drive-mirror (sync=top) each disk → NBD; wait until in sync
//!                migrate → tcp; progress every second; post-copy switch if chosen
//!  Switchover:   RAM done (source paused) → block-job-cancel (flushes, completes)
//!               ───── finish ──────▶ nbd-server-stop, cont → target runs
//!  complete (server rebinds the VM) → quit source QEMU, remove its files
//!  any failure before finish: migrate_cancel, cancel mirrors, cont source,
//!               ───── abort ───────▶ kill target QEMU, remove its files
//! ```
//! The VM never runs on two nodes: the target only continues after the source
//! has stopped for good, and the source only goes away after the target runs.
//!
//! The files: [`driver`] runs each migration from start to end, [`planning`]
//! measures and predicts, [`source`] and [`target`] are the two ends of a
//! live migration, [`timeline`] records where its time goes, [`cold`] moves
//! a stopped VM, [`peer`] calls the other
//! agent; [`progress`] and [`console_log`] are their small helpers.

mod cold;
mod console_log;
mod driver;
mod peer;
mod planning;
mod progress;
mod source;
mod target;
mod timeline;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use novacron_api::Migration;
use novacron_client::ClientError;
use novacron_qmp::QmpError;

use crate::dwcp::DwcpNode;
use crate::node::NodeContext;
use crate::qemu::{self, VmDir};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source waits for a call to the target agent (the target's
/// `finish` takes less, see `target::FINISH_WITHIN`).
const TARGET_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a running migration asks QEMU how it goes, and how often it
/// reports progress and checks the target (those calls cross the network).
const POLL_EVERY: Duration = Duration::from_millis(20);
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// QEMU multifd: channels of the `qemu-multifd` transport (tuned on the WAN
/// lab: more channels fill long links).
const MULTIFD_CHANNELS: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrationError {
    #[error("QMP")]
    Qmp(#[from] QmpError),
    #[error("API")]
    Api(#[from] ClientError),
    #[error("Target agent: {0}")]
    Target(String),
    #[error("Preparing the target failed")]
    Prepare(#[from] crate::reconcile::ReconcileError),
    #[error("QEMU")]
    Qemu(#[from] qemu::QemuError),
    #[error("QEMU reports the migration {0}")]
    QemuFailed(String),
    #[error("Cancelled")]
    Cancelled,
    /// The VM is not in a state this call can act on.
    #[error("{0}")]
    Conflict(String),
    /// The request names something that does not exist or cannot be.
    #[error("{0}")]
    Invalid(String),
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot fetch the base image")]
    Image(#[source] crate::images::CacheError),
    #[error("The VM's snapshots")]
    Snapshots(#[from] crate::snapshots::SnapshotError),
    #[error("DWCP: {0}")]
    Dwcp(String),
    #[error("DWCP cannot {what}")]
    Session {
        what: String,
        #[source]
        source: novacron_dwcp::DwcpError,
    },
    #[error("Pre-copy did not converge after {passes} passes (dirty rate {dirty_mib_s} MiB/s, throughput {sent_mib_s} MiB/s); use --strategy auto-converge or postcopy, or raise --bandwidth")]
    NoConvergence {
        passes: u64,
        dirty_mib_s: u64,
        sent_mib_s: u64,
    },
}

impl MigrationError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
        let what = what.into();
        move |source| MigrationError::Io { what, source }
    }

    /// The HTTP status an agent endpoint answers this error with.
    pub(crate) fn status(&self) -> u16 {
        match self {
            MigrationError::Conflict(_) | MigrationError::Cancelled => 409,
            MigrationError::Invalid(_) => 422,
            MigrationError::Target(_)
            | MigrationError::Api(_)
            | MigrationError::Dwcp(_)
            | MigrationError::Session { .. } => 502,
            _ => 500,
        }
    }
}

/// The migrations of this node, as source and as target: shared by the
/// poller, its drivers and the HTTP endpoint.
#[derive(Clone)]
pub(crate) struct Migrations {
    /// This node (shared with the reconciler, which leaves a claimed VM alone).
    node: Arc<NodeContext>,
    /// Latest known migration objects (refreshed by the poller).
    known: Arc<RwLock<HashMap<String, Migration>>>,
    /// Calls that drive a migration on the target.
    http: reqwest::Client,
    /// Health checks of the target while a migration runs: their own
    /// connections, so that the switchover's call never waits for one to end
    /// nor opens a new connection beside one (each a round trip of the pause).
    watch_http: reqwest::Client,
    /// DWCP, when this agent has cluster certificates.
    dwcp: Option<Arc<DwcpNode>>,
    /// Status of the migrations this node drives, reported in the background.
    reports: Arc<Mutex<HashMap<String, driver::StatusReport>>>,
}

impl Migrations {
    /// `http` drives migrations on the other agent, `watch_http` checks its
    /// health meanwhile (see the fields).
    pub(crate) fn new(
        node: Arc<NodeContext>,
        http: reqwest::Client,
        watch_http: reqwest::Client,
        dwcp: Option<Arc<DwcpNode>>,
    ) -> Self {
        Migrations {
            node,
            known: Arc::default(),
            http,
            watch_http,
            dwcp,
            reports: Arc::default(),
        }
    }

    /// This agent's end of DWCP, if it has one.
    pub(crate) fn dwcp(&self) -> Option<&Arc<DwcpNode>> {
        self.dwcp.as_ref()
    }

    fn dir(&self, vm_id: &str) -> VmDir {
        self.node.vm_dir(vm_id)
    }
}
