//! Live migration with storage, driven by the source agent.
//!
//! ```text
//! source agent                         target agent (HTTP, agent secret)
//!  measure dirty rate, pick strategy
//!  PreparingTarget ───── prepare ────▶ disks (same base image), QEMU -S -incoming defer,
//!                                       NBD export of each disk, migrate-incoming
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

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use novacron_api::{
    CompleteMigration, DwcpFigures, Migration, MigrationPhase, MigrationPlan, MigrationPrediction, MigrationProgress,
    MigrationStatus, MigrationStrategy, MigrationTransport, Node, Vm, VmPhase, AGENT_SECRET_HEADER,
};
use novacron_client::{watcher, Client, ClientError, Selector};
use novacron_dwcp::plan::{self, PlanInput, Strategy};
use novacron_dwcp::{Role, Sender};
use novacron_qmp::commands::{
    BlockExportAdd, BlockJobCancel, CalcDirtyRate, DriveMirror, Migrate, MigrateCancel, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrateStartPostcopy, NbdServerStart, NbdServerStop, QueryBlockJobs,
    QueryDirtyRate, QueryMigrate,
};
use novacron_qmp::types::{
    BlockJobInfo, DirtyRateStatus, InetSocketAddress, MigrationCapability as Cap, MigrationCapabilityStatus,
    MigrationInfo, MigrationStats, MigrationStatus as QemuMigration, MirrorSyncMode, MultiFdCompression, NewImageMode,
    SocketAddressLegacy,
};
use novacron_qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::task::AbortOnDropHandle;

use crate::dwcp::DwcpNode;
use crate::images::ImageCache;
use crate::qemu::{self, VmDir, DISK_NODES};
use crate::reconcile::{error_chain, prepare_launch};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source waits for a call to the target agent, and how long the
/// target's `finish` may take (less, so that it never outlives the wait).
const TARGET_CALL_TIMEOUT: Duration = Duration::from_secs(120);
const FINISH_WITHIN: Duration = Duration::from_secs(100);
/// Pre-copy passes after which a plain pre-copy migration is declared non-converging.
const MAX_PRECOPY_PASSES: u64 = 40;
/// How often a running migration asks QEMU how it goes, and how often it
/// reports progress and checks the target (those calls cross the network).
const POLL_EVERY: Duration = Duration::from_millis(20);
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// Assumed link speed for the prediction when nothing better is known.
const DEFAULT_LINK_BYTES_S: f64 = 1e9;
/// QEMU multifd: channels and zstd level of the `qemu-multifd` transport
/// (tuned on the WAN lab: more channels fill long links, level 3 beats 1 on them).
const MULTIFD_CHANNELS: u8 = 4;
const MULTIFD_ZSTD_LEVEL: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
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
    #[error("{0}")]
    Other(String),
}

/// State shared by the migration code, the HTTP endpoint and the reconciler.
#[derive(Clone)]
pub struct Migrations {
    pub node: String,
    pub qemu: String,
    pub accel: String,
    pub vms_root: std::path::PathBuf,
    pub images: Arc<ImageCache>,
    pub client: Client,
    pub secret: Arc<RwLock<Option<String>>>,
    /// Host name or address peers use to reach this node's QEMUs.
    pub host: String,
    /// VM ids whose migration this node drives: the reconciler leaves them alone.
    pub migrating: Arc<Mutex<HashSet<String>>>,
    /// Latest known migration objects (refreshed by the poller).
    pub known: Arc<RwLock<HashMap<String, Migration>>>,
    /// Calls that drive a migration on the target.
    http: reqwest::Client,
    /// Health checks of the target while a migration runs: their own
    /// connections, so that the switchover's call never waits for one to end
    /// nor opens a new connection beside one (each a round trip of the pause).
    watch_http: reqwest::Client,
    /// DWCP, when this agent has cluster certificates.
    pub dwcp: Option<Arc<DwcpNode>>,
    /// Status of the migrations this node drives, reported in the background.
    reports: Arc<Mutex<HashMap<String, StatusReport>>>,
}

/// The status of a migration this agent drives, as the agent knows it, and a
/// task that writes it to the server whenever the server can take it. The
/// data plane never waits on the control plane: a server outage during the
/// switchover must not lengthen the guest's pause.
struct StatusReport {
    status: Arc<Mutex<MigrationStatus>>,
    changed: Arc<tokio::sync::Notify>,
    _writer: AbortOnDropHandle<()>,
}

impl StatusReport {
    fn start(client: Client, name: String, status: MigrationStatus) -> StatusReport {
        let status = Arc::new(Mutex::new(status));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (latest, wake) = (status.clone(), changed.clone());
        let writer = tokio::spawn(async move {
            loop {
                wake.notified().await;
                let mut delay = Duration::from_millis(100);
                loop {
                    let status = lock(&latest).clone();
                    let written = match client.get::<Migration>(&name).await {
                        Ok(mut m) => {
                            // While this agent drives the migration, it owns the status.
                            m.status = status;
                            client.put_migration_status(&m).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok(()) => break,
                        Err(e) if e.is_not_found() => return,
                        Err(e) if e.is_conflict() => continue,
                        Err(e) => {
                            tracing::debug!(migration = %name, error = %error_chain(&e), "status not written yet; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
        });
        StatusReport {
            status,
            changed,
            _writer: AbortOnDropHandle::new(writer),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Target's answer to prepare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub nbd_host: String,
    pub nbd_port: u16,
    pub migrate_uri: String,
    pub disks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub vm: Vm,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdRequest {
    pub vm: Vm,
    pub source_node: String,
    pub disks: Vec<String>,
    #[serde(default)]
    pub console_log: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRef {
    pub vm_id: String,
    /// Serial output written on the source since prepare (finish only).
    #[serde(default)]
    pub console_log: Vec<u8>,
    /// Disks mirrored through DWCP, which must settle before the VM runs (finish only).
    #[serde(default)]
    pub dwcp_disks: usize,
}

/// Most of the serial log that travels with a VM.
const MAX_LOG_CARRIED: u64 = 1024 * 1024;

/// The last `MAX_LOG_CARRIED` bytes of a file from `offset` on, and its length.
fn read_log_from(path: &std::path::Path, offset: u64) -> (Vec<u8>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), offset);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(MAX_LOG_CARRIED)).min(len);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(len - start).read_to_end(&mut buf);
    }
    (buf, len)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub pid: u32,
    /// When the guest resumed here (Unix ms, this node's clock).
    #[serde(default)]
    pub resumed_at: Option<f64>,
}

fn free_port() -> Result<u16, MigrationError> {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| MigrationError::Other(format!("no free port: {e}")))
}

impl Migrations {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        qemu: String,
        accel: String,
        vms_root: std::path::PathBuf,
        images: Arc<ImageCache>,
        client: Client,
        secret: Arc<RwLock<Option<String>>>,
        host: String,
        http: reqwest::Client,
        watch_http: reqwest::Client,
    ) -> Self {
        Migrations {
            node,
            qemu,
            accel,
            vms_root,
            images,
            client,
            secret,
            host,
            migrating: Arc::default(),
            known: Arc::default(),
            http,
            watch_http,
            dwcp: None,
            reports: Arc::default(),
        }
    }

    /// The secret peers' agent endpoints expect (empty until registered).
    fn agent_secret(&self) -> String {
        self.secret
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    pub fn is_migrating(&self, vm_id: &str) -> bool {
        lock(&self.migrating).contains(vm_id)
    }

    fn dir(&self, vm_id: &str) -> VmDir {
        VmDir::new(&self.vms_root, vm_id)
    }

    // ------------------------------------------------------------ poller

    /// Watches the migrations whose source is this node (the server sends no
    /// others), keeps `known` fresh for cancel checks and starts a driver for
    /// each new one. Migrations left half-done by an earlier run of this agent
    /// are rolled back.
    pub async fn run(self) {
        let mut driving: HashSet<String> = HashSet::new();
        let selector = Selector::fields(format!("status.source_node={}", self.node));
        let mut events = std::pin::pin!(watcher::watch::<Migration>(self.client.clone(), selector));
        while let Some(ev) = events.next().await {
            let changed = match ev {
                watcher::Event::Restarted(list) => {
                    let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
                    known.clear();
                    known.extend(list.iter().map(|m| (m.metadata.name.clone(), m.clone())));
                    list
                }
                watcher::Event::Applied(m) => {
                    self.known
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(m.metadata.name.clone(), m.clone());
                    vec![m]
                }
                watcher::Event::Deleted(m) => {
                    self.known
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&m.metadata.name);
                    continue;
                }
            };
            for m in changed {
                if m.status.source_node != self.node || m.status.phase.is_final() || driving.contains(&m.metadata.name)
                {
                    continue;
                }
                driving.insert(m.metadata.name.clone());
                let this = self.clone();
                // A migration past Pending that this process is not driving was
                // started by an earlier run of this agent: roll it back.
                tokio::spawn(async move {
                    if m.status.phase == MigrationPhase::Pending {
                        this.drive(m).await;
                    } else {
                        this.abandon(m, "the source agent restarted during the migration").await;
                    }
                });
            }
        }
    }

    fn latest(&self, name: &str) -> Option<Migration> {
        self.known.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Changes the status of a migration this node drives: at once in the
    /// agent's copy, and on the server in the background (see [`StatusReport`]).
    /// Without a report running (the migration's end), writes and waits.
    async fn write_status(&self, name: &str, change: impl Fn(&mut MigrationStatus)) {
        if let Some(report) = lock(&self.reports).get(name) {
            change(&mut lock(&report.status));
            report.changed.notify_one();
            return;
        }
        self.write_status_now(name, change).await;
    }

    /// Writes the migration's status, retrying on conflicts (the spec may
    /// change under us, e.g. cancel) and while the server is away.
    async fn write_status_now(&self, name: &str, change: impl Fn(&mut MigrationStatus)) -> Option<Migration> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let current = match self.client.get::<Migration>(name).await {
                Ok(m) => m,
                Err(e) if e.is_not_found() => return None,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => return None,
            };
            let mut next = current.clone();
            change(&mut next.status);
            match self.client.put_migration_status(&next).await {
                Ok(m) => {
                    self.known
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.to_string(), m.clone());
                    return Some(m);
                }
                Err(e) if e.is_conflict() => continue,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(_) => return None,
            }
        }
    }

    async fn set_vm_phase(&self, vm: &str, phase: VmPhase, reason: Option<String>) {
        for _ in 0..20 {
            let Ok(mut v) = self.client.get::<Vm>(vm).await else {
                return;
            };
            v.status.phase = phase;
            v.status.reason = reason.clone();
            match self.client.put_vm_status(vm, &v).await {
                Ok(_) => return,
                Err(e) if e.is_conflict() => continue,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    // ------------------------------------------------------------ source

    async fn drive(&self, m: Migration) {
        let name = m.metadata.name.clone();
        let Ok(vm) = self.client.get::<Vm>(&m.spec.vm).await else {
            self.write_status(&name, |s| fail(s, MigrationPhase::Failed, "VM not found".into()))
                .await;
            return;
        };
        let id = vm.metadata.id.clone();
        lock(&self.migrating).insert(id.clone());
        let report = StatusReport::start(self.client.clone(), name.clone(), m.status.clone());
        lock(&self.reports).insert(name.clone(), report);
        tracing::info!(migration = %name, vm = %vm.metadata.name, to = %m.status.target_node, "migration starting");
        let started = Instant::now();
        let mut ctx = SourceCtx::default();
        let result = if m.spec.strategy == MigrationStrategy::Cold {
            self.transfer_cold(&m, &vm, &mut ctx, started).await
        } else {
            self.transfer(&m, &vm, &mut ctx, started).await
        };
        // The end is written and waited for: completion carries the final
        // status, a failure is written after the roll-back.
        lock(&self.reports).remove(&name);
        match result {
            Ok(final_status) => {
                let req = CompleteMigration {
                    target_qemu_pid: ctx.target_pid.unwrap_or_default(),
                    status: final_status,
                };
                // The VM runs on the target now; keep trying until the server knows.
                let mut delay = Duration::from_millis(200);
                loop {
                    match self.client.complete_migration(&name, &req).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(migration = %name, error = %error_chain(&e), "cannot record completion yet; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                self.cleanup_source(&vm).await;
                tracing::info!(migration = %name, vm = %vm.metadata.name, ms = started.elapsed().as_millis() as u64, "migration completed");
            }
            Err(e) => {
                let cancelled = matches!(e, MigrationError::Cancelled);
                let msg = if cancelled {
                    "Cancelled by request".to_string()
                } else {
                    error_chain(&e)
                };
                tracing::warn!(migration = %name, vm = %vm.metadata.name, error = %msg, "migration failed; rolling back");
                self.roll_back(&m, &vm, &ctx).await;
                let phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                self.write_status(&name, |s| fail(s, phase, msg.clone())).await;
                self.set_vm_phase(&vm.metadata.name, VmPhase::Running, None).await;
            }
        }
        lock(&self.migrating).remove(&id);
    }

    /// A migration this agent cannot continue (it restarted mid-way): undo it.
    async fn abandon(&self, m: Migration, why: &str) {
        let Ok(vm) = self.client.get::<Vm>(&m.spec.vm).await else {
            return;
        };
        lock(&self.migrating).insert(vm.metadata.id.clone());
        let ctx = SourceCtx {
            target_prepared: true,
            ..Default::default()
        };
        self.roll_back(&m, &vm, &ctx).await;
        self.write_status(&m.metadata.name, |s| fail(s, MigrationPhase::Failed, why.to_string()))
            .await;
        self.set_vm_phase(&vm.metadata.name, VmPhase::Running, None).await;
        lock(&self.migrating).remove(&vm.metadata.id);
    }

    fn check_cancel(&self, name: &str) -> Result<(), MigrationError> {
        match self.latest(name) {
            Some(m) if m.spec.cancel => Err(MigrationError::Cancelled),
            _ => Ok(()),
        }
    }

    async fn check_target_alive(&self, target: &Node) -> Result<(), MigrationError> {
        target_alive(&self.http, target).await
    }

    /// Checks every `REPORT_EVERY`, in the background, that the target's agent
    /// answers: a dead one could not finish the switchover, and stopping then
    /// also makes the target QEMU exit (its incoming stream fails). The loops that
    /// wait for QEMU must not wait on the network, or they see its end late
    /// and the guest stays paused for it.
    fn watch_target(&self, target: &Node) -> TargetWatch {
        let (http, target) = (self.watch_http.clone(), target.clone());
        let failure = Arc::new(Mutex::new(None));
        let found = failure.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REPORT_EVERY).await;
                if let Err(e) = target_alive(&http, &target).await {
                    *lock(&found) = Some(e);
                    return;
                }
            }
        });
        TargetWatch {
            failure,
            _task: AbortOnDropHandle::new(task),
        }
    }

    async fn target_call<R: for<'de> Deserialize<'de>>(
        &self,
        target: &Node,
        what: &str,
        migration_id: &str,
        body: &Value,
    ) -> Result<R, MigrationError> {
        let secret = self.agent_secret();
        let url = format!(
            "{}/agent/v1/migrations/{migration_id}/{what}",
            target.spec.address.trim_end_matches('/')
        );
        let resp = self
            .http
            .post(&url)
            .header(AGENT_SECRET_HEADER, secret)
            .timeout(TARGET_CALL_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| MigrationError::Target(format!("{what}: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(MigrationError::Target(format!("{what} answered {status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| MigrationError::Target(format!("{what}: bad answer: {e}")))
    }

    async fn transfer(
        &self,
        m: &Migration,
        vm: &Vm,
        ctx: &mut SourceCtx,
        started: Instant,
    ) -> Result<MigrationStatus, MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        let target: Node = self.client.get(&m.status.target_node).await?;
        ctx.target = Some(target.clone());
        self.set_vm_phase(
            &vm.metadata.name,
            VmPhase::Migrating,
            Some(format!("Migrating to {}", target.metadata.name)),
        )
        .await;

        // Transport, link, memory sample, dirty rate → prediction and strategy.
        let planned = self
            .plan(
                &qmp,
                vm,
                &target,
                PlanAsk {
                    strategy: m.spec.strategy,
                    transport: m.spec.transport,
                    bandwidth_mib_s: m.spec.bandwidth_mib_s,
                    max_downtime_ms: m.spec.max_downtime_ms,
                },
                &m.metadata.id,
                true,
            )
            .await?;
        let (strategy, transport, session) = (planned.strategy, planned.transport, planned.session.clone());
        let why = planned.prediction.reason.clone();
        tracing::info!(migration = %name, ?strategy, %transport, predicted_s = planned.prediction.total_s, reason = %why, "strategy chosen");
        self.write_status(name, |s| {
            s.phase = MigrationPhase::PreparingTarget;
            s.started_at = Some(Utc::now());
            s.strategy = Some(strategy);
            s.strategy_reason = Some(why.clone());
            s.transport = Some(transport);
            s.transport_reason = planned.transport_reason.clone();
            s.prediction = Some(planned.prediction.clone());
            s.progress.dirty_rate_bytes_s = planned.prediction.dirty_rate_bytes_s as u64;
            s.progress.eta_s = Some(planned.prediction.total_s);
        })
        .await;
        self.check_cancel(name)?;

        let postcopy = strategy == MigrationStrategy::Postcopy;
        let multifd = transport == MigrationTransport::QemuMultifd;
        ctx.target_prepared = true;
        let (console_log, log_offset) = read_log_from(&dir.console_log(), 0);
        let request = PrepareRequest {
            vm: vm.clone(),
            postcopy,
            multifd,
            dwcp_session: session.as_ref().map(|_| m.metadata.id.clone()),
            console_log,
        };
        let prepared: Prepared = self
            .target_call(
                &target,
                "prepare",
                &m.metadata.id,
                &serde_json::to_value(request).unwrap_or_default(),
            )
            .await?;
        tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, "target prepared");
        self.check_cancel(name)?;
        // While the disks are mirrored (small requests, each waiting for its
        // reply) the link has room: DWCP fills it with the guest pages the
        // probe did not carry, so QEMU's pass finds them in the target's cache.
        // Not during prepare: it would hold up the target's image download and
        // control calls. Stops (the guard drops) when QEMU starts.
        let prefill = match (&session, planned.pages) {
            (Some(s), Some(pages)) => {
                Some(crate::dwcp::start_prefill(s.clone(), pages, &vm.metadata.name).drop_guard())
            }
            _ => None,
        };
        // With DWCP, QEMU talks to local ends of the session instead of the target.
        let local = match &session {
            Some(s) => {
                let (nbd, mig) = (dir.dwcp_nbd_socket(), dir.dwcp_migration_socket());
                s.listen(Role::Nbd, &nbd)
                    .map_err(|e| MigrationError::Other(format!("cannot listen on {}: {e}", nbd.display())))?;
                s.listen(Role::Migration, &mig)
                    .map_err(|e| MigrationError::Other(format!("cannot listen on {}: {e}", mig.display())))?;
                ctx.dwcp_disks = true;
                Some((nbd, mig))
            }
            None => None,
        };
        let nbd_target = |disk: &str| match &local {
            Some((nbd, _)) => format!("nbd+unix:///{disk}?socket={}", nbd.display()),
            None => format!("nbd://{}:{}/{disk}", prepared.nbd_host, prepared.nbd_port),
        };
        let migrate_uri = match &local {
            Some((_, mig)) => format!("unix:{}", mig.display()),
            None => prepared.migrate_uri.clone(),
        };

        // Disks first: mirror each to the target's NBD export until in sync.
        self.write_status(name, |s| s.phase = MigrationPhase::Transferring)
            .await;
        for disk in &prepared.disks {
            let job = format!("mirror-{disk}");
            let mut mirror = DriveMirror::new(disk.as_str(), nbd_target(disk), MirrorSyncMode::Top);
            mirror.job_id = Some(job.clone());
            mirror.mode = Some(NewImageMode::Existing);
            mirror.format = Some("raw".into());
            qmp.run(&mirror).await?;
            ctx.mirrors.push(job);
        }
        let watch = self.watch_target(&target);
        let mut disk_total;
        let mut last_check = Instant::now();
        loop {
            let jobs = qmp.run(&QueryBlockJobs).await?;
            let mine: Vec<&BlockJobInfo> = jobs.iter().filter(|j| ctx.mirrors.contains(&j.device)).collect();
            if mine.len() < ctx.mirrors.len() {
                return Err(MigrationError::QemuFailed("disk mirror stopped".into()));
            }
            let (done, total): (u64, u64) = mine.iter().fold((0, 0), |(d, t), j| (d + j.offset, t + j.len));
            disk_total = total;
            let ready = mine.iter().all(|j| j.ready);
            if ready || last_check.elapsed() >= REPORT_EVERY {
                self.write_status(name, |s| {
                    s.progress.disk_transferred_bytes = done;
                    s.progress.disk_total_bytes = total;
                })
                .await;
            }
            if ready {
                tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, "disks in sync");
                break;
            }
            self.check_cancel(name)?;
            watch.check()?;
            if last_check.elapsed() >= REPORT_EVERY {
                last_check = Instant::now();
                self.check_session(&session, &target).await?;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }

        // Memory.
        // Every capability explicitly: a QEMU that arrived here by migration keeps
        // the capabilities its incoming side had (e.g. postcopy-ram), and a
        // mismatch with the target breaks the stream.
        let capabilities = vec![
            MigrationCapabilityStatus::new(Cap::AutoConverge, strategy == MigrationStrategy::AutoConverge),
            MigrationCapabilityStatus::new(Cap::PostcopyRam, postcopy),
            MigrationCapabilityStatus::new(Cap::LateBlockActivate, false),
            MigrationCapabilityStatus::new(Cap::Multifd, multifd),
        ];
        qmp.run(&MigrateSetCapabilities { capabilities }).await?;
        // DWCP applies the bandwidth cap itself (on wire bytes); QEMU runs uncapped into it.
        let max_bandwidth = match (&session, m.spec.bandwidth_mib_s) {
            (None, Some(b)) => b * 1024 * 1024,
            _ => u64::MAX / 2,
        };
        let mut params = MigrateSetParameters {
            downtime_limit: Some(m.spec.max_downtime_ms),
            max_bandwidth: Some(max_bandwidth),
            ..Default::default()
        };
        if multifd {
            params.multifd_channels = Some(MULTIFD_CHANNELS);
            params.multifd_compression = Some(MultiFdCompression::Zstd);
            params.multifd_zstd_level = Some(MULTIFD_ZSTD_LEVEL);
        }
        qmp.run(&params).await?;
        drop(prefill);
        // From its first check on: QEMU's own view of the bandwidth, bytes into
        // a local socket, would have it stop before its first pass has crossed.
        if let Some(s) = &session {
            tell_qemu_the_link(&qmp, s, m).await;
        }
        ctx.events = Some(qmp.events());
        if let Some(s) = &session {
            s.set_downtime_limit(Duration::from_millis(m.spec.max_downtime_ms));
        }
        let _release = session.as_ref().map(|s| release_at_stop(&qmp, s.clone()));
        qmp.run(&Migrate { uri: migrate_uri }).await?;
        let mut postcopy_started = false;
        let mut last_report = Instant::now();
        let info = loop {
            tokio::time::sleep(POLL_EVERY).await;
            let info = qmp.run(&QueryMigrate).await?;
            let ram = info.ram.as_ref();
            let status = match info.status {
                // QEMU has a migration from the moment `migrate` returns; without
                // one, waiting would never end.
                None | Some(QemuMigration::None) => {
                    return Err(MigrationError::QemuFailed("absent after accepting migrate".into()))
                }
                Some(s) => s,
            };
            match status {
                QemuMigration::Completed => {
                    tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, downtime_ms = info.downtime, "memory moved");
                    break info;
                }
                QemuMigration::Failed | QemuMigration::Cancelled => {
                    // A dead target agent explains a broken stream best.
                    self.check_target_alive(&target).await?;
                    let dwcp = session
                        .as_ref()
                        .and_then(|s| s.error())
                        .map(|e| format!(" (DWCP: {e})"))
                        .unwrap_or_default();
                    return Err(MigrationError::QemuFailed(format!(
                        "{status}: {}{dwcp}",
                        info.error_desc.as_deref().unwrap_or("")
                    )));
                }
                _ => {}
            }
            if !postcopy_started {
                self.check_cancel(name)?;
                watch.check()?;
            }
            let mut progress = progress_from(ram, disk_total);
            let figures = session.as_ref().map(|s| {
                let st = s.stats();
                // What the transport moves in QEMU's bytes, dedup and compression included.
                progress.throughput_bytes_s = st.raw_bytes_s as u64;
                progress.eta_s = plan::eta_remaining(
                    progress.remaining_bytes as f64,
                    st.raw_bytes_s,
                    progress.dirty_rate_bytes_s as f64,
                    postcopy_started,
                );
                dwcp_figures(&st)
            });
            // Plain pre-copy never converges when the guest dirties memory faster than
            // we send it: give up with the numbers instead of looping forever.
            if strategy == MigrationStrategy::Precopy && ram.is_some_and(|r| r.dirty_sync_count > MAX_PRECOPY_PASSES) {
                return Err(MigrationError::Other(format!(
                    "pre-copy did not converge after {MAX_PRECOPY_PASSES} passes (dirty rate {} MiB/s, throughput {} MiB/s); \
                     use --strategy auto-converge or postcopy, or raise --bandwidth",
                    progress.dirty_rate_bytes_s >> 20,
                    progress.throughput_bytes_s >> 20
                )));
            }
            // Post-copy: after the first full pass (or when pre-copy stops converging).
            if postcopy
                && !postcopy_started
                && ram.is_some_and(|r| r.dirty_sync_count >= 2)
                && status == QemuMigration::Active
            {
                qmp.run(&MigrateStartPostcopy).await?;
                postcopy_started = true;
                ctx.postcopy_started = true;
                tracing::info!(migration = %name, "switched to post-copy");
            }
            // Post-copy: once the source has stopped and switched, the guest runs on
            // the target while the rest of its memory follows on demand.
            if postcopy_started && status == QemuMigration::PostcopyActive && !ctx.target_running {
                self.switch_to_target(&qmp, ctx, &target, m, vm, log_offset).await?;
            }
            // QEMU is polled often so that its end is seen at once; the calls
            // that cross the network run less often.
            if last_report.elapsed() < REPORT_EVERY {
                continue;
            }
            last_report = Instant::now();
            if !postcopy_started {
                self.check_session(&session, &target).await?;
            }
            if let (Some(s), false) = (&session, postcopy_started) {
                tell_qemu_the_link(&qmp, s, m).await;
            }
            self.write_status(name, |s| {
                s.progress = progress.clone();
                if figures.is_some() {
                    s.dwcp = figures.clone();
                }
            })
            .await;
        };
        drop(watch);

        if !ctx.target_running {
            self.switch_to_target(&qmp, ctx, &target, m, vm, log_offset).await?;
        }
        // The VM runs on the target; close the session once all is delivered.
        let mut figures = None;
        if let Some(s) = &session {
            match s.finish(Duration::from_secs(60)).await {
                // A migration's delivery rate shows what it needed, not what the
                // link can do: only probes set the remembered link rate.
                Ok(st) => figures = Some(dwcp_figures(&st)),
                Err(e) => tracing::warn!(migration = %name, error = %e, "DWCP session did not end cleanly"),
            }
        }

        let ram = info.ram.as_ref();
        let mut status = self.latest(name).map(|m| m.status).unwrap_or_default();
        status.progress = progress_from(ram, disk_total);
        status.progress.percent = 100.0;
        status.progress.remaining_bytes = 0;
        status.progress.eta_s = Some(0.0);
        status.total_time_ms = Some(started.elapsed().as_millis() as u64);
        status.qemu_downtime_ms = info.downtime;
        status.downtime_ms = match (ctx.stopped_at, ctx.resumed_at) {
            (Some(stop), Some(resume)) if resume >= stop => {
                Some(((resume - stop).round() as u64).max(info.downtime.unwrap_or(0)))
            }
            _ => info.downtime,
        };
        status.bytes_sent = Some(ram.map_or(0, |r| r.transferred) + disk_total);
        status.wire_bytes = Some(
            figures
                .as_ref()
                .map_or(ram.map_or(0, |r| r.transferred) + disk_total, |f| f.wire_bytes),
        );
        if figures.is_some() {
            status.dwcp = figures;
        }
        status.finished_at = Some(Utc::now());
        status.error = None;
        if let Some(t) = info.total_time {
            tracing::debug!(migration = %name, qemu_total_ms = t, "QEMU migration time");
        }
        Ok(status)
    }

    /// Cold migration of a stopped VM: the target pulls the disk files from
    /// this agent; nothing runs anywhere until the user starts the VM.
    async fn transfer_cold(
        &self,
        m: &Migration,
        vm: &Vm,
        ctx: &mut SourceCtx,
        started: Instant,
    ) -> Result<MigrationStatus, MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        if dir.running_pid().is_some() {
            return Err(MigrationError::Other(
                "the VM has a running QEMU; migrate it live".into(),
            ));
        }
        let target: Node = self.client.get(&m.status.target_node).await?;
        ctx.target = Some(target.clone());
        let disks: Vec<(String, u64)> = [(DISK_NODES[0], dir.root_disk()), (DISK_NODES[1], dir.data_disk())]
            .into_iter()
            .filter_map(|(n, p)| std::fs::metadata(&p).ok().map(|md| (n.to_string(), md.len())))
            .collect();
        let total: u64 = disks.iter().map(|(_, len)| len).sum();
        self.write_status(name, |s| {
            s.phase = MigrationPhase::Transferring;
            s.started_at = Some(Utc::now());
            s.strategy = Some(MigrationStrategy::Cold);
            s.strategy_reason = Some("stopped VM: its disks are copied, there is no memory to move".into());
            s.progress.disk_total_bytes = total;
        })
        .await;
        self.check_cancel(name)?;
        ctx.target_prepared = true;
        let (console_log, _) = read_log_from(&dir.console_log(), 0);
        let req = ColdRequest {
            vm: vm.clone(),
            source_node: self.node.clone(),
            disks: disks.iter().map(|(n, _)| n.clone()).collect(),
            console_log,
        };
        let _: Value = self
            .target_call(
                &target,
                "receive-cold",
                &m.metadata.id,
                &serde_json::to_value(req).unwrap_or_default(),
            )
            .await?;
        ctx.target_running = true;
        let mut status = self.latest(name).map(|m| m.status).unwrap_or_default();
        status.progress.disk_transferred_bytes = total;
        status.progress.transferred_bytes = total;
        status.progress.total_bytes = total;
        status.progress.percent = 100.0;
        status.total_time_ms = Some(started.elapsed().as_millis() as u64);
        status.bytes_sent = Some(total);
        status.finished_at = Some(Utc::now());
        Ok(status)
    }

    /// Target side of a cold migration: copy the disks from the source agent
    /// and point the root overlay at this node's copy of the base image.
    pub async fn receive_cold(&self, req: ColdRequest) -> Result<(), MigrationError> {
        let vm = &req.vm;
        let dir = self.begin_incoming(vm)?;
        let result = async {
            std::fs::create_dir_all(&dir.path)
                .map_err(|e| MigrationError::Other(format!("cannot create VM dir: {e}")))?;
            let source: Node = self.client.get(&req.source_node).await?;
            let secret = self
                .secret
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            for disk in &req.disks {
                let path = match disk.as_str() {
                    "root" => dir.root_disk(),
                    "data" => dir.data_disk(),
                    other => return Err(MigrationError::Other(format!("unknown disk {other:?}"))),
                };
                let url = format!(
                    "{}/agent/v1/vms/{}/disks/{disk}",
                    source.spec.address.trim_end_matches('/'),
                    vm.metadata.id
                );
                let resp = self
                    .http
                    .get(&url)
                    .header(AGENT_SECRET_HEADER, &secret)
                    .send()
                    .await
                    .map_err(|e| MigrationError::Target(format!("fetching {disk}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(MigrationError::Target(format!(
                        "fetching {disk}: source answered {}",
                        resp.status()
                    )));
                }
                let partial = path.with_extension("qcow2.partial");
                let mut file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| MigrationError::Other(format!("cannot write {disk}: {e}")))?;
                let mut stream = resp.bytes_stream();
                use tokio::io::AsyncWriteExt;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| MigrationError::Target(format!("fetching {disk}: {e}")))?;
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| MigrationError::Other(format!("cannot write {disk}: {e}")))?;
                }
                file.sync_all()
                    .await
                    .map_err(|e| MigrationError::Other(format!("cannot write {disk}: {e}")))?;
                std::fs::rename(&partial, &path)
                    .map_err(|e| MigrationError::Other(format!("cannot store {disk}: {e}")))?;
            }
            // The root overlay names the source's cached base image: repoint it at ours.
            let image: novacron_api::Image = self.client.get(&vm.spec.image).await?;
            if image.spec.format != novacron_api::ImageFormat::Kernel {
                let base = self
                    .images
                    .ensure(&self.client, &image, novacron_api::ImagePart::Disk)
                    .await
                    .map_err(|e| MigrationError::Other(format!("cannot fetch the base image: {}", error_chain(&e))))?;
                let out = tokio::process::Command::new("qemu-img")
                    .args(["rebase", "-u", "-F", &image.spec.format.to_string(), "-b"])
                    .arg(&base)
                    .arg(dir.root_disk())
                    .output()
                    .await
                    .map_err(|e| MigrationError::Other(format!("cannot run qemu-img: {e}")))?;
                if !out.status.success() {
                    return Err(MigrationError::Other(format!(
                        "qemu-img rebase failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            std::fs::write(dir.console_log(), &req.console_log)
                .map_err(|e| MigrationError::Other(format!("cannot write console log: {e}")))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            self.discard(&vm.metadata.id).await;
        }
        result
    }

    /// The source has stopped for good: drain the disk mirrors (cancelling a
    /// ready mirror completes it consistently), then let the target run.
    async fn switch_to_target(
        &self,
        qmp: &Qmp,
        ctx: &mut SourceCtx,
        target: &Node,
        m: &Migration,
        vm: &Vm,
        log_offset: u64,
    ) -> Result<(), MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        let switching = Instant::now();
        self.write_status(name, |s| s.phase = MigrationPhase::Switchover).await;
        for job in &ctx.mirrors {
            qmp.run(&BlockJobCancel {
                device: job.clone(),
                force: None,
            })
            .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs = qmp.run(&QueryBlockJobs).await?;
            let left = jobs.iter().filter(|j| ctx.mirrors.contains(&j.device)).count();
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(MigrationError::QemuFailed("disk mirrors did not finish".into()));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let mirrored = std::mem::take(&mut ctx.mirrors).len();
        tracing::debug!(migration = %name, ms = switching.elapsed().as_millis() as u64, "disk mirrors complete");
        let (console_log, _) = read_log_from(&dir.console_log(), log_offset);
        let finish = VmRef {
            vm_id: vm.metadata.id.clone(),
            console_log,
            dwcp_disks: if ctx.dwcp_disks { mirrored } else { 0 },
        };
        let finished: Finished = self
            .target_call(
                target,
                "finish",
                &m.metadata.id,
                &serde_json::to_value(finish).unwrap_or_default(),
            )
            .await?;
        ctx.target_pid = Some(finished.pid);
        ctx.target_running = true;
        ctx.resumed_at = finished.resumed_at;
        if let Some(events) = &mut ctx.events {
            ctx.stopped_at = stop_time(events);
        }
        tracing::info!(migration = %name, switch_ms = switching.elapsed().as_millis() as u64, "VM runs on the target");
        Ok(())
    }

    /// Undo a failed migration: the VM keeps (or resumes) running on the source
    /// and nothing is left on the target.
    async fn roll_back(&self, m: &Migration, vm: &Vm, ctx: &SourceCtx) {
        let dir = self.dir(&vm.metadata.id);
        if ctx.target_running {
            // Past the point of no return: the target runs; only finish the bookkeeping.
            return;
        }
        if let Ok(qmp) = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await {
            let _ = qmp.run(&MigrateCancel).await;
            for job in &ctx.mirrors {
                let _ = qmp
                    .run(&BlockJobCancel {
                        device: job.clone(),
                        force: Some(true),
                    })
                    .await;
            }
            // Wait for the migration to leave the active states before resuming.
            for _ in 0..50 {
                match qmp.run(&QueryMigrate).await {
                    Ok(info)
                        if matches!(
                            info.status,
                            Some(
                                QemuMigration::Active
                                    | QemuMigration::Setup
                                    | QemuMigration::Device
                                    | QemuMigration::Cancelling
                                    | QemuMigration::PreSwitchover
                                    | QemuMigration::PostcopyActive
                            )
                        ) => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(vm = %vm.metadata.name, error = %error_chain(&e), "cannot tell whether the migration stopped; resuming the source");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if ctx.postcopy_started {
                tracing::error!(vm = %vm.metadata.name, "post-copy failed after the switch: guest state is split; source left paused");
            } else if let Ok(st) = qmp.query_status().await {
                if !st.running && vm.spec.power_state == novacron_api::PowerState::Running {
                    let _ = qmp.cont().await;
                }
            }
        }
        if ctx.target_prepared {
            let target = match &ctx.target {
                Some(t) => Some(t.clone()),
                None => self.client.get::<Node>(&m.status.target_node).await.ok(),
            };
            if let Some(t) = target {
                if let Err(e) = self
                    .target_call::<Value>(&t, "abort", &m.metadata.id, &json!({ "vm_id": vm.metadata.id }))
                    .await
                {
                    tracing::warn!(migration = %m.metadata.name, error = %error_chain(&e), "target cleanup failed; the target agent removes leftovers when it restarts");
                }
            }
        }
    }

    async fn cleanup_source(&self, vm: &Vm) {
        let dir = self.dir(&vm.metadata.id);
        if let Some(pid) = dir.running_pid() {
            if let Ok(qmp) = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await {
                let _ = qmp.quit().await;
            }
            if !qemu::wait_gone(pid, &dir, Duration::from_secs(5)).await {
                qemu::kill_and_wait(pid, &dir).await;
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir.path) {
            tracing::warn!(vm = %vm.metadata.name, error = %e, "cannot remove the source's VM files");
        }
    }

    // ------------------------------------------------------------ target

    /// Start of every incoming migration: the VM directory here, which must not
    /// have a QEMU yet.
    fn begin_incoming(&self, vm: &Vm) -> Result<VmDir, MigrationError> {
        let dir = self.dir(&vm.metadata.id);
        if dir.running_pid().is_some() {
            return Err(MigrationError::Other(format!(
                "VM {} already has a QEMU on this node",
                vm.metadata.name
            )));
        }
        Ok(dir)
    }

    /// Prepares this node to receive a VM: disks, paused QEMU waiting for the
    /// migration stream, NBD exports of its disks.
    pub async fn prepare(&self, req: PrepareRequest) -> Result<Prepared, MigrationError> {
        let vm = &req.vm;
        let dir = self.begin_incoming(vm)?;
        let result = async {
            let mut spec = prepare_launch(&self.client, &self.images, &self.accel, vm, &dir).await?;
            // QEMU appends to the log (logappend=on): seed it with the source's history.
            std::fs::write(dir.console_log(), &req.console_log)
                .map_err(|e| MigrationError::Other(format!("cannot write console log: {e}")))?;
            spec.incoming = true;
            qemu::launch(&self.qemu, &spec, &dir).await?;
            let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
            let nbd_port = free_port()?;
            let addr = SocketAddressLegacy::Inet(InetSocketAddress::new(self.host.as_str(), nbd_port));
            qmp.run(&NbdServerStart::new(addr)).await?;
            let mut disks = vec![DISK_NODES[0].to_string()];
            if spec.data_disk.is_some() {
                disks.push(DISK_NODES[1].to_string());
            }
            for d in &disks {
                qmp.run(&BlockExportAdd::nbd(d.as_str(), d.as_str(), true)).await?;
            }
            // late-block-activate: the disks become active only at our `cont`,
            // after the source drained its mirrors and the NBD server stopped;
            // otherwise activation at the end of the incoming stream could
            // re-read qcow2 metadata while the last mirror writes still arrive.
            let capabilities = vec![
                MigrationCapabilityStatus::new(Cap::LateBlockActivate, true),
                MigrationCapabilityStatus::new(Cap::PostcopyRam, req.postcopy),
                MigrationCapabilityStatus::new(Cap::Multifd, req.multifd),
            ];
            qmp.run(&MigrateSetCapabilities { capabilities }).await?;
            if req.multifd {
                qmp.run(&MigrateSetParameters {
                    multifd_channels: Some(MULTIFD_CHANNELS),
                    multifd_compression: Some(MultiFdCompression::Zstd),
                    ..Default::default()
                })
                .await?;
            }
            let port = free_port()?;
            let uri = format!("tcp:{}:{port}", self.host);
            qmp.run(&MigrateIncoming::new(uri.as_str())).await?;
            if let (Some(session), Some(d)) = (&req.dwcp_session, &self.dwcp) {
                let at = |port: u16| {
                    format!("{}:{port}", self.host)
                        .parse::<std::net::SocketAddr>()
                        .or_else(|_| format!("127.0.0.1:{port}").parse())
                        .map_err(|e| MigrationError::Other(format!("bad local address: {e}")))
                };
                d.receiver.expect(
                    session,
                    HashMap::from([(Role::Migration, at(port)?), (Role::Nbd, at(nbd_port)?)]),
                );
            }
            Ok::<_, MigrationError>(Prepared {
                nbd_host: self.host.clone(),
                nbd_port,
                migrate_uri: uri,
                disks,
            })
        }
        .await;
        if result.is_err() {
            self.discard(&vm.metadata.id).await;
        }
        result
    }

    /// The source has stopped for good and the disks are in sync: run here.
    pub async fn finish(&self, migration: &str, req: &VmRef) -> Result<Finished, MigrationError> {
        let (vm_id, console_log) = (req.vm_id.as_str(), req.console_log.as_slice());
        let dir = self.dir(vm_id);
        let pid = dir
            .running_pid()
            .ok_or_else(|| MigrationError::Other("target QEMU is gone".into()))?;
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        // Wait until the source's last state has landed: the stream completed, or
        // (post-copy) the switch happened and the rest follows on demand. All of
        // it within the source's wait for this call (`target_call`), so that a
        // source that gave up never finds the VM running here after all.
        let called = Instant::now();
        let deadline = called + FINISH_WITHIN;
        loop {
            let info = qmp.run(&QueryMigrate).await?;
            // No status yet: the stream has not begun arriving; wait for it
            // like for the other unfinished states.
            if matches!(
                info.status,
                Some(QemuMigration::Completed | QemuMigration::PostcopyActive)
            ) {
                break;
            }
            if info.status == Some(QemuMigration::Failed) || Instant::now() > deadline {
                return Err(MigrationError::QemuFailed(format!(
                    "incoming side is {}",
                    describe(&info)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::debug!(
            migration,
            waited_ms = called.elapsed().as_millis() as u64,
            "finish: memory is here"
        );
        // The source answered its mirror's last writes itself: they must have
        // landed here before the disks change hands.
        if req.dwcp_disks > 0 {
            let dwcp = self
                .dwcp
                .as_ref()
                .ok_or_else(|| MigrationError::Other("DWCP disks, but DWCP is off here".into()))?;
            dwcp.receiver
                .disks_settled(
                    migration,
                    req.dwcp_disks,
                    deadline.saturating_duration_since(Instant::now()),
                )
                .await
                .map_err(|e| MigrationError::Other(format!("the disks did not arrive whole: {e}")))?;
            tracing::debug!(
                migration,
                waited_ms = called.elapsed().as_millis() as u64,
                "finish: disks settled"
            );
        }
        qmp.run(&NbdServerStop).await?;
        // Still paused, so QEMU writes nothing to the log while we append.
        if !console_log.is_empty() {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(dir.console_log()) {
                let _ = f.write_all(console_log);
            }
        }
        let st = qmp.query_status().await?;
        if !st.running {
            qmp.cont().await?;
        }
        let resumed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64() * 1e3);
        Ok(Finished { pid, resumed_at })
    }

    /// Removes whatever a migration left here.
    pub async fn discard(&self, vm_id: &str) {
        let dir = self.dir(vm_id);
        if let Some(pid) = dir.running_pid() {
            qemu::kill_and_wait(pid, &dir).await;
        }
        let _ = std::fs::remove_dir_all(&dir.path);
    }
}

/// The session holds QEMU back while the target is behind; once QEMU stops
/// the guest, what it still sends must go at once (`Sender::release`).
fn release_at_stop(qmp: &Qmp, session: Arc<Sender>) -> AbortOnDropHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = qmp.events();
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if ev.event == "STOP" => {
                    session.release();
                    return;
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    }))
}

async fn target_alive(http: &reqwest::Client, target: &Node) -> Result<(), MigrationError> {
    let url = format!("{}/agent/v1/healthz", target.spec.address.trim_end_matches('/'));
    match http.get(&url).timeout(Duration::from_secs(2)).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(MigrationError::Target(format!(
            "agent health check answered {}",
            r.status()
        ))),
        Err(e) => Err(MigrationError::Target(format!(
            "agent on {} is unreachable: {e}",
            target.metadata.name
        ))),
    }
}

/// A background health check of a migration's target (see `watch_target`).
struct TargetWatch {
    failure: Arc<Mutex<Option<MigrationError>>>,
    _task: AbortOnDropHandle<()>,
}

impl TargetWatch {
    /// The check's failure, once: the migration stops on it.
    fn check(&self) -> Result<(), MigrationError> {
        match lock(&self.failure).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// QEMU judges the final pass by the bandwidth it sees into its socket, which
/// DWCP's local end flatters: tell it what the link really delivers, and leave
/// the bytes already on their way their share of the downtime.
async fn tell_qemu_the_link(qmp: &Qmp, session: &Sender, m: &Migration) {
    let st = session.stats();
    if st.raw_bytes_s <= 0.0 {
        return;
    }
    let limit_s = plan::qemu_downtime_limit(
        m.spec.max_downtime_ms as f64 / 1e3,
        st.wire_bytes.saturating_sub(st.acked_wire_bytes) as f64,
        st.wire_bytes_s,
        st.rtt_ms / 1e3,
    );
    tracing::debug!(migration = %m.metadata.name, qemu_limit_ms = (limit_s * 1e3) as u64, "QEMU's share of the downtime");
    let _ = qmp
        .run(&MigrateSetParameters {
            avail_switchover_bandwidth: Some(st.raw_bytes_s as u64),
            downtime_limit: Some((limit_s * 1e3) as u64),
            ..Default::default()
        })
        .await;
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

/// The outcome of planning: transport (and its open session), strategy, prediction.
struct Planned {
    transport: MigrationTransport,
    transport_reason: Option<String>,
    session: Option<Arc<Sender>>,
    /// The rest of the guest's pages still to send ahead (DWCP).
    pages: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    strategy: MigrationStrategy,
    prediction: MigrationPrediction,
}

#[derive(Deserialize)]
struct DwcpEndpoint {
    port: u16,
}

impl Migrations {
    /// Opens a DWCP session to the target agent (asking it for its DWCP port).
    async fn open_dwcp(
        &self,
        target: &Node,
        session: &str,
        bandwidth_mib_s: Option<u64>,
    ) -> Result<Arc<Sender>, String> {
        let Some(d) = &self.dwcp else {
            return Err("this agent has no cluster certificate (plain-HTTP cluster)".into());
        };
        let secret = self.agent_secret();
        let url = format!("{}/agent/v1/dwcp", target.spec.address.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .header(AGENT_SECRET_HEADER, secret)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("cannot ask {} for its DWCP port: {e}", target.metadata.name))?;
        if !resp.status().is_success() {
            return Err(format!(
                "node {} does not offer DWCP ({})",
                target.metadata.name,
                resp.status()
            ));
        }
        let ep: DwcpEndpoint = resp.json().await.map_err(|e| format!("bad DWCP answer: {e}"))?;
        d.connect(target, ep.port, session, bandwidth_mib_s.map(|b| b * 1024 * 1024))
            .await
    }

    /// A failed DWCP session fails the migration now, with its reason (a dead
    /// target agent first: that is what the operator needs to know).
    async fn check_session(&self, session: &Option<Arc<Sender>>, target: &Node) -> Result<(), MigrationError> {
        match session.as_ref().and_then(|s| s.error()) {
            Some(e) => {
                self.check_target_alive(target).await?;
                Err(MigrationError::Other(format!("DWCP: {e}")))
            }
            None => Ok(()),
        }
    }

    /// Measures what the prediction needs and picks transport and strategy.
    async fn plan(
        &self,
        qmp: &Qmp,
        vm: &Vm,
        target: &Node,
        ask: PlanAsk,
        session_name: &str,
        send_ahead: bool,
    ) -> Result<Planned, MigrationError> {
        let measuring = Instant::now();
        let peer = &target.metadata.name;
        let ram_bytes = vm.spec.memory_mib * 1024 * 1024;
        let dir = self.dir(&vm.metadata.id);
        // Before the session opens: a session holds the cache of what the
        // target knows while it runs, and the sample asks that cache.
        let sample = match (&self.dwcp, dir.running_pid()) {
            (Some(d), Some(pid)) => d.sample_memory(pid, ram_bytes, peer),
            (None, Some(pid)) => crate::dwcp::sample_guest(pid, ram_bytes, |_| false),
            _ => None,
        };
        let mut transport = ask.transport;
        let mut transport_reason = None;
        let mut session = None;
        if transport == MigrationTransport::Dwcp {
            match self.open_dwcp(target, session_name, ask.bandwidth_mib_s).await {
                Ok(s) => session = Some(s),
                Err(why) => {
                    tracing::warn!(vm = %vm.metadata.name, reason = %why, "DWCP unavailable; QEMU's own stream instead");
                    transport = MigrationTransport::Qemu;
                    transport_reason = Some(format!("DWCP unavailable: {why}; QEMU's own stream instead"));
                }
            }
        }
        let cap = ask.bandwidth_mib_s.map(|b| b as f64 * 1048576.0);
        let mut pages = match (&session, dir.running_pid()) {
            (Some(_), Some(pid)) if send_ahead => Some(crate::dwcp::guest_pages(pid, ram_bytes)),
            _ => None,
        };
        // The dirty rate is sampled inside QEMU while the link is probed.
        let measure_link = async {
            match (&session, &self.dwcp) {
                (Some(s), Some(d)) => {
                    let rate = d
                        .link_rate(peer, s, pages.as_mut())
                        .await
                        .map_err(MigrationError::Other)?;
                    let st = s.stats();
                    Ok::<_, MigrationError>((rate, st.rtt_ms / 1e3, st.streams))
                }
                // QEMU carries the streams, but DWCP can still measure the link.
                (None, Some(d)) => match self.open_dwcp(target, &format!("{session_name}-probe"), None).await {
                    Ok(probe) => {
                        let rate = d.link_rate(peer, &probe, None).await.unwrap_or(DEFAULT_LINK_BYTES_S);
                        let rtt = probe.stats().rtt_ms / 1e3;
                        let _ = probe.finish(Duration::from_secs(10)).await;
                        Ok((rate, rtt, 1))
                    }
                    Err(_) => Ok((DEFAULT_LINK_BYTES_S, 0.0, 1)),
                },
                _ => Ok((DEFAULT_LINK_BYTES_S, 0.0, 1)),
            }
        };
        let (dirty, link) = tokio::join!(measure_dirty_rate(qmp), measure_link);
        let dirty = dirty?.unwrap_or(0.0);
        let (mut link, rtt_s, streams) = link?;
        if let Some(c) = cap {
            link = link.min(c);
        }
        let disk_bytes = [dir.root_disk(), dir.data_disk()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|md| {
                use std::os::unix::fs::MetadataExt;
                md.blocks() * 512
            })
            .sum();
        let (zero, compression, mut known) = sample
            .as_ref()
            .map_or((0.0, 1.0, 0.0), |s| (s.zero_share, s.compression, s.known_share));
        // What the probe already carried ahead is known to the target now.
        let sent_ahead = session.as_ref().map_or(0, |s| s.stats().prefill_bytes) as f64;
        let working_set = (1.0 - zero) * ram_bytes as f64;
        if working_set > 0.0 {
            known += (1.0 - known) * (sent_ahead / working_set).min(1.0);
        }
        // DWCP re-sends a page the guest changed a little as a delta: what the
        // sampled pages' changes since the sample would cost.
        let rewrite = match (&sample, dir.running_pid(), transport) {
            (Some(s), Some(pid), MigrationTransport::Dwcp) => {
                crate::dwcp::rewrite_cost(pid, ram_bytes, s).map(|c| c.min(compression))
            }
            _ => None,
        };
        // Wire bytes per guest byte. QEMU sends a zero page as a 9-byte record
        // (DWCP compresses runs of them to almost nothing); a known page costs
        // DWCP a 17-byte reference.
        let (first_pass_cost, dirty_cost, disk_cost) = match transport {
            MigrationTransport::Dwcp => (
                zero * 0.5 / 4096.0 + (1.0 - zero) * (known * 17.0 / 4096.0 + (1.0 - known) * compression),
                rewrite.unwrap_or(compression),
                compression,
            ),
            MigrationTransport::QemuMultifd => (zero * 9.0 / 4096.0 + (1.0 - zero) * compression, compression, 1.0),
            MigrationTransport::Qemu => (zero * 9.0 / 4096.0 + (1.0 - zero), 1.0, 1.0),
        };
        // DWCP encodes on one thread; multifd compresses on one thread per
        // channel, as many at once as there are cores; plain QEMU only copies.
        let compress_bytes_s = sample.as_ref().map_or(f64::INFINITY, |s| s.compress_bytes_s);
        let encode_bytes_s = match transport {
            MigrationTransport::Dwcp => compress_bytes_s,
            MigrationTransport::QemuMultifd => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
                compress_bytes_s * f64::from(cores.min(u32::from(MULTIFD_CHANNELS)))
            }
            MigrationTransport::Qemu => f64::INFINITY,
        };
        let input = PlanInput {
            memory_bytes: ram_bytes,
            disk_bytes,
            first_pass_cost,
            dirty_cost,
            disk_cost,
            dirty_bytes_s: dirty,
            working_set_bytes: working_set,
            link_bytes_s: link,
            rtt_s,
            encode_bytes_s,
            measured_s: measuring.elapsed().as_secs_f64(),
            prefill: transport == MigrationTransport::Dwcp && dir.running_pid().is_some(),
            max_downtime_s: ask.max_downtime_ms as f64 / 1000.0,
        };
        let (mut prediction, mut reason) = match ask.strategy {
            MigrationStrategy::Auto => {
                let (p, numbers) = plan::choose(&input);
                (p, format!("auto: {numbers}"))
            }
            requested => {
                let p = plan::predict(&input, to_plan(requested));
                (p, format!("requested; predicted {:.1} s", p.total_s))
            }
        };
        if transport == MigrationTransport::QemuMultifd && prediction.strategy == Strategy::Postcopy {
            prediction = plan::predict(&input, Strategy::AutoConverge);
            reason.push_str("; QEMU multifd cannot switch to post-copy: auto-converge");
        }
        if sample.is_none() {
            reason.push_str("; guest memory not readable: assumed incompressible");
        }
        let strategy = from_plan(prediction.strategy);
        Ok(Planned {
            transport,
            transport_reason,
            session,
            pages,
            strategy,
            prediction: MigrationPrediction {
                strategy: Some(strategy),
                total_s: prediction.total_s,
                downtime_ms: prediction.downtime_s * 1000.0,
                wire_bytes: prediction.wire_bytes as u64,
                link_bytes_s: link,
                rtt_ms: rtt_s * 1000.0,
                streams,
                dirty_rate_bytes_s: dirty,
                zero_page_share: zero,
                compression,
                known_page_share: known,
                reason,
            },
        })
    }

    /// Dry run of a migration from this node: measure and predict, move nothing.
    pub async fn dry_run(&self, req: PlanRequest) -> Result<MigrationPlan, MigrationError> {
        if self.is_migrating(&req.vm.metadata.id) {
            return Err(MigrationError::Other("the VM is being migrated".into()));
        }
        let dir = self.dir(&req.vm.metadata.id);
        if dir.running_pid().is_none() {
            return Err(MigrationError::Other("the VM has no running QEMU on this node".into()));
        }
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        let session = format!("plan-{}-{}", req.vm.metadata.id, Utc::now().timestamp_millis());
        let planned = self.plan(&qmp, &req.vm, &req.target, req.ask, &session, false).await?;
        if let Some(s) = &planned.session {
            let _ = s.finish(Duration::from_secs(10)).await;
        }
        Ok(MigrationPlan {
            vm: req.vm.metadata.name.clone(),
            source_node: self.node.clone(),
            target_node: req.target.metadata.name.clone(),
            transport: planned.transport,
            transport_reason: planned.transport_reason,
            prediction: planned.prediction,
        })
    }
}

fn to_plan(s: MigrationStrategy) -> Strategy {
    match s {
        MigrationStrategy::AutoConverge => Strategy::AutoConverge,
        MigrationStrategy::Postcopy => Strategy::Postcopy,
        _ => Strategy::Precopy,
    }
}

fn from_plan(s: Strategy) -> MigrationStrategy {
    match s {
        Strategy::Precopy => MigrationStrategy::Precopy,
        Strategy::AutoConverge => MigrationStrategy::AutoConverge,
        Strategy::Postcopy => MigrationStrategy::Postcopy,
    }
}

fn dwcp_figures(st: &novacron_dwcp::StatsSnapshot) -> DwcpFigures {
    DwcpFigures {
        streams: st.streams,
        rtt_ms: st.rtt_ms,
        zstd_level: st.zstd_level,
        raw_bytes: st.raw_bytes,
        wire_bytes: st.wire_bytes,
        pages: st.pages,
        pages_known: st.pages_ref,
        pages_delta: st.pages_delta,
        prefill_bytes: st.prefill_bytes,
        link_bytes_s: st.wire_bytes_s,
    }
}

/// What the source has set up, so a rollback undoes exactly that.
#[derive(Default)]
struct SourceCtx {
    target: Option<Node>,
    target_prepared: bool,
    mirrors: Vec<String>,
    /// The mirrors write through DWCP's disk channels: the target waits for them.
    dwcp_disks: bool,
    /// The source QEMU's events, to read when it stopped the guest.
    events: Option<tokio::sync::broadcast::Receiver<novacron_qmp::QmpEvent>>,
    /// When the guest paused on the source and resumed on the target (Unix ms).
    stopped_at: Option<f64>,
    resumed_at: Option<f64>,
    postcopy_started: bool,
    target_pid: Option<u32>,
    target_running: bool,
}

/// When the source QEMU last stopped the guest (Unix ms), from its events.
fn stop_time(events: &mut tokio::sync::broadcast::Receiver<novacron_qmp::QmpEvent>) -> Option<f64> {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut stopped = None;
    loop {
        match events.try_recv() {
            Ok(ev) if ev.event == "STOP" => stopped = ev.unix_ms().or(stopped),
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(_) => return stopped,
        }
    }
}

fn fail(s: &mut MigrationStatus, phase: MigrationPhase, error: String) {
    s.phase = phase;
    s.error = Some(error);
    s.finished_at = Some(Utc::now());
}

fn progress_from(ram: Option<&MigrationStats>, disk_total: u64) -> MigrationProgress {
    let Some(r) = ram else {
        return MigrationProgress {
            disk_total_bytes: disk_total,
            disk_transferred_bytes: disk_total,
            ..Default::default()
        };
    };
    let throughput = (r.mbps * 1e6 / 8.0) as u64;
    let dirty = r.dirty_pages_rate * r.page_size.max(4096);
    let eta = if throughput > dirty {
        Some(r.remaining as f64 / (throughput - dirty) as f64)
    } else {
        None
    };
    let percent = if r.total > 0 {
        (100.0 * (r.total - r.remaining.min(r.total)) as f64 / r.total as f64).min(100.0)
    } else {
        0.0
    };
    MigrationProgress {
        transferred_bytes: r.transferred + disk_total,
        remaining_bytes: r.remaining,
        total_bytes: r.total + disk_total,
        disk_transferred_bytes: disk_total,
        disk_total_bytes: disk_total,
        dirty_rate_bytes_s: dirty,
        throughput_bytes_s: throughput,
        iteration: r.dirty_sync_count,
        eta_s: eta,
        percent,
    }
}

/// Dirty rate of the guest in bytes/s, sampled by QEMU for one second. The
/// most sample pages QEMU allows: the default 512 per GiB misses a moderate
/// rate spread over a large working set. (The dirty-bitmap mode reads 0
/// under TCG on QEMU 10.0.)
///
/// `None` when QEMU cannot measure (it refuses, or takes too long): the
/// prediction then goes without. A reply QEMU's schema does not allow is an
/// error, as everywhere.
async fn measure_dirty_rate(qmp: &Qmp) -> Result<Option<f64>, QmpError> {
    let measure = async {
        let calc = CalcDirtyRate {
            calc_time: 1,
            calc_time_unit: None,
            sample_pages: Some(4096),
            mode: None,
        };
        qmp.run(&calc).await?;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let info = qmp.run(&QueryDirtyRate::default()).await?;
            if info.status == DirtyRateStatus::Measured {
                return Ok(info.dirty_rate.map(|mb| mb as f64 * 1024.0 * 1024.0));
            }
        }
        Ok(None)
    };
    match measure.await {
        Err(e @ QmpError::UnexpectedReply { .. }) => Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "no dirty rate from QEMU");
            Ok(None)
        }
        measured => measured,
    }
}

/// QEMU's migration state in words, for errors.
fn describe(info: &MigrationInfo) -> String {
    match (info.status, &info.error_desc) {
        (Some(s), Some(why)) => format!("{s}: {why}"),
        (Some(s), None) => s.to_string(),
        (None, _) => "without a migration".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_eta_from_qemu_numbers() {
        let ram = MigrationStats {
            transferred: 100,
            remaining: 1000,
            total: 2000,
            duplicate: 0,
            normal: 0,
            normal_bytes: 0,
            dirty_pages_rate: 0,
            mbps: 8.0,
            dirty_sync_count: 1,
            postcopy_requests: 0,
            page_size: 4096,
            multifd_bytes: 0,
            pages_per_second: 0,
            precopy_bytes: 0,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            dirty_sync_missed_zero_copy: 0,
        };
        let p = progress_from(Some(&ram), 50);
        assert_eq!(p.throughput_bytes_s, 1_000_000);
        assert_eq!(p.total_bytes, 2050);
        assert!((p.percent - 50.0).abs() < 1e-9);
        assert!(p.eta_s.is_some_and(|e| (e - 0.001).abs() < 1e-9));
    }
}
