//! Reconciling one VM: compare its spec with the QEMU process on this node,
//! take at most one step toward the spec, and report the resulting status.
//! Every step is idempotent, so running it again after a crash, a restart or
//! a missed event is safe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use novacron_api::error::chain;
use novacron_api::network::NIC_CHANGE_FAILED;
use novacron_api::{Image, ImageFormat, ImagePart, PowerState, RunStrategy, Vm, VmPhase, VmStatus};
use novacron_qmp::{Qmp, RunState};

use crate::backup::restore::RESTORING;
use crate::copies::JobPoll;
use crate::node::NodeContext;
use crate::qemu::{self, LaunchSpec, VmDir};

/// What the agent remembers about a VM between reconciles (lost on restart,
/// which is fine: everything essential is re-derived from the process and
/// the stored status).
#[derive(Default)]
pub struct Runtime {
    qmp: Option<Arc<Qmp>>,
    /// When the ACPI power button was first pressed for the stop in progress.
    powerdown_sent: Option<Instant>,
    /// Last press; the button is pressed again while waiting, because a guest
    /// still booting (no ACPI listener yet) drops the first press.
    last_press: Option<Instant>,
    /// The guest agent was asked to shut down (the guest ignored ACPI).
    agent_shutdown_sent: bool,
    /// QEMU reported a guest-initiated shutdown.
    guest_shutdown: Arc<AtomicBool>,
    /// Earliest time of the next start attempt after a failure (run strategy Always).
    retry_at: Option<Instant>,
    failures: u32,
    /// NICs plugged into the running QEMU.
    plugged: crate::hotplug::Plugged,
    /// The generation whose removed NICs were cleared away while stopped.
    pruned_generation: Option<u64>,
    /// Volume unplug requests pending on the running QEMU.
    volume_plugs: crate::volumes::VolumePlugs,
    /// The generation whose volumes could not be brought to the spec (not
    /// retried until the spec changes), with why.
    volumes_failed: Option<(u64, String)>,
}

pub struct Reconciler {
    /// This node (shared with the migrations: a VM one of them claims is theirs).
    pub node: Arc<NodeContext>,
    pub runtimes: HashMap<String, Runtime>,
}

/// Result of one reconcile.
pub enum Outcome {
    /// Write this status back.
    Status(Box<VmStatus>),
    /// The VM was deleted and cleaned up.
    Finalized,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Cannot read image {0:?}")]
    Image(String, #[source] novacron_client::ClientError),
    #[error("Cannot fetch image file")]
    Cache(#[from] crate::images::CacheError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("Cannot create VM directory")]
    Io(#[source] std::io::Error),
    #[error("Cannot connect the VM's NICs")]
    Network(#[from] crate::network::NetError),
    #[error("Cannot make the cloud-init seed")]
    Seed(#[from] crate::seed::SeedError),
    #[error("Cannot attach the VM's volumes")]
    Volume(#[from] crate::volumes::VolumeError),
    /// Not an error: the full clone's disk is still being copied.
    #[error("{COPYING}: {0}%")]
    Copying(u8),
    /// Not an error: the disks are still being restored from backup .0.
    #[error("{RESTORING} from {0}: {1}%")]
    Restoring(String, u8),
    #[error("Cannot copy the image for a full clone: {0}")]
    Copy(String),
    #[error("Cannot restore the disks from backup {backup}")]
    Restore {
        backup: String,
        #[source]
        source: crate::backup::BackupError,
    },
    #[error(
        "Cannot resume from snapshot {snapshot:?}'s memory (the VM's hardware may have changed since it was taken); its next start boots the snapshot's disks"
    )]
    Resume {
        snapshot: String,
        #[source]
        source: crate::snapshots::ResumeError,
    },
}

/// How a VM's reason reads while its full-clone disk is copied.
const COPYING: &str = "Copying the image for a full clone";

const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const REPRESS_EVERY: Duration = Duration::from_secs(3);
const GUEST_AGENT_SHUTDOWN_AFTER: Duration = Duration::from_secs(10);

impl Reconciler {
    pub fn vm_dir(&self, id: &str) -> VmDir {
        self.node.vm_dir(id)
    }

    pub async fn reconcile(&mut self, vm: &Vm) -> Outcome {
        let id = vm.metadata.id.clone();
        let dir = self.vm_dir(&id);
        let pid = dir.running_pid();
        let mut st = vm.status.clone();
        st.observed_generation = vm.metadata.generation;

        if vm.metadata.deletion_requested_at.is_some() {
            if let Some(pid) = pid {
                self.force_off(&id, pid, &dir).await;
            }
            self.node.net.detach(&id).await;
            self.node.copies.forget(&id);
            self.node.live_restores.forget(&id);
            self.node.restores.forget(&id);
            // Volumes outlive their VM: back to the pool, detached.
            crate::volumes::rescue_all(&self.node, &dir);
            if let Err(e) = std::fs::remove_dir_all(&dir.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %vm.metadata.name, error = %e, "cannot remove VM directory");
                    st.reason = Some(format!("Cannot remove VM files: {e}"));
                    return Outcome::Status(Box::new(st));
                }
            }
            self.runtimes.remove(&id);
            tracing::info!(vm = %vm.metadata.name, "VM process and disks removed");
            return Outcome::Finalized;
        }

        if !self.runtimes.contains_key(&id) {
            if let Some(pid) = pid {
                tracing::info!(vm = %vm.metadata.name, pid, "adopted running QEMU");
            }
        }
        let desired = vm.spec.power_state;
        match (desired, pid) {
            (PowerState::Stopped, None) => {
                let _ = rebuild_if_asked(vm, &dir, &mut st);
                let _ = crate::backup::restore::in_place_if_asked(&self.node, vm, &dir, &mut st);
                let rt = self.runtimes.entry(id.clone()).or_default();
                rt.powerdown_sent = None;
                rt.agent_shutdown_sent = false;
                rt.qmp = None;
                if rt.pruned_generation != Some(vm.metadata.generation) {
                    rt.pruned_generation = Some(vm.metadata.generation);
                    self.node.net.prune(vm).await;
                }
                // A reason set while stopping (e.g. forced off) was written with
                // phase Stopped already and is kept; older reasons are cleared.
                if st.phase != VmPhase::Stopped {
                    st.reason = None;
                }
                st.phase = VmPhase::Stopped;
                st.qemu_pid = None;
                st.observed_start_request = vm.spec.start_request;
            }
            (PowerState::Stopped, Some(pid)) => {
                let grace = vm.spec.stop_grace_s.unwrap_or(vm.spec.stop_timeout_s);
                let sent = self.runtimes.entry(id.clone()).or_default().powerdown_sent;
                match sent {
                    _ if grace == 0 => {
                        self.force_off(&id, pid, &dir).await;
                        st.reason = Some("Forced off".into());
                        st.phase = VmPhase::Stopped;
                        st.qemu_pid = None;
                    }
                    None => {
                        match self.qmp(&id, &dir).await {
                            Some(q) => {
                                if let Err(e) = q.system_powerdown().await {
                                    tracing::warn!(vm = %vm.metadata.name, error = %e, "ACPI power button failed");
                                }
                            }
                            None => {
                                tracing::warn!(vm = %vm.metadata.name, "no QMP connection for ACPI shutdown")
                            }
                        }
                        self.runtimes.entry(id.clone()).or_default().powerdown_sent = Some(Instant::now());
                        tracing::info!(vm = %vm.metadata.name, grace_s = grace, "ACPI shutdown requested");
                        st.phase = VmPhase::Stopping;
                        st.reason = None;
                    }
                    Some(t) if t.elapsed() >= Duration::from_secs(grace.into()) => {
                        self.force_off(&id, pid, &dir).await;
                        tracing::warn!(vm = %vm.metadata.name, grace_s = grace, "guest ignored ACPI shutdown; forced off");
                        st.reason = Some(format!("ACPI shutdown timed out after {grace}s; forced off"));
                        st.phase = VmPhase::Stopped;
                        st.qemu_pid = None;
                    }
                    Some(t) => {
                        st.phase = VmPhase::Stopping;
                        self.ask_guest_agent_to_shut_down(vm, &dir, t, grace).await;
                        let due = self
                            .runtimes
                            .get(&id)
                            .and_then(|r| r.last_press)
                            .is_none_or(|t| t.elapsed() >= REPRESS_EVERY);
                        if due {
                            if let Some(q) = self.qmp(&id, &dir).await {
                                let _ = q.system_powerdown().await;
                            }
                            self.runtimes.entry(id.clone()).or_default().last_press = Some(Instant::now());
                        }
                    }
                }
                if st.phase == VmPhase::Stopped {
                    st.observed_start_request = vm.spec.start_request;
                }
            }
            (PowerState::Running | PowerState::Paused, None) => self.ensure_started(vm, &dir, &mut st).await,
            (PowerState::Running | PowerState::Paused, Some(pid)) => self.steer_running(vm, &dir, pid, &mut st).await,
        }
        st.guest = if st.qemu_pid.is_some() {
            self.node.guests.info(&id)
        } else {
            self.node.guests.forget(&id);
            None
        };
        match crate::snapshots::list(&dir) {
            Ok(s) => st.snapshots = s,
            Err(e) => tracing::warn!(vm = %vm.metadata.name, error = %chain(&e), "cannot read the VM's snapshots"),
        }
        if st.qemu_pid.is_none() {
            st.nics.clear();
            if let Some(rt) = self.runtimes.get_mut(&id) {
                rt.plugged = Default::default();
                rt.volume_plugs = Default::default();
            }
            self.sync_volumes(vm, &dir, None, &mut st).await;
        }
        Outcome::Status(Box::new(st))
    }

    /// A guest that has not acted on the ACPI button for a while (half the
    /// grace, at most GUEST_AGENT_SHUTDOWN_AFTER) but runs a guest agent is
    /// asked through the agent instead: a clean shutdown, not a kill.
    async fn ask_guest_agent_to_shut_down(&mut self, vm: &Vm, dir: &VmDir, pressed: Instant, grace: u32) {
        let id = &vm.metadata.id;
        let wait = GUEST_AGENT_SHUTDOWN_AFTER.min(Duration::from_secs(grace.into()) / 2);
        let rt = self.runtimes.entry(id.clone()).or_default();
        if rt.agent_shutdown_sent || pressed.elapsed() < wait || self.node.guests.info(id).is_none() {
            return;
        }
        rt.agent_shutdown_sent = true;
        match self.node.guests.shutdown(id, dir).await {
            Ok(()) => tracing::info!(vm = %vm.metadata.name, "guest ignored ACPI; asked its guest agent to shut down"),
            Err(e) => tracing::warn!(vm = %vm.metadata.name, error = %chain(&e), "guest agent shutdown failed"),
        }
    }

    /// The process is not there but should be: start it, unless it went away on
    /// its own and the run strategy says to leave it.
    async fn ensure_started(&mut self, vm: &Vm, dir: &VmDir, st: &mut VmStatus) {
        let id = vm.metadata.id.clone();
        let name = vm.metadata.name.clone();
        let rt = self.runtimes.entry(id.clone()).or_default();
        let always = vm.spec.run_strategy == RunStrategy::Always;
        // A start someone asked for; otherwise a restart of a crashed VM.
        let asked = vm.spec.start_request != st.observed_start_request;
        if let Some(pid) = st.qemu_pid.take() {
            // It was running and nobody here stopped it.
            rt.qmp = None;
            let guest_off = rt.guest_shutdown.swap(false, Ordering::SeqCst);
            let why = if guest_off {
                "Guest powered off".to_string()
            } else {
                format!("QEMU process {pid} exited unexpectedly")
            };
            tracing::warn!(vm = %name, pid, reason = %why, "VM is not running");
            st.reason = Some(why);
            st.observed_start_request = vm.spec.start_request;
            if !always {
                st.phase = if guest_off { VmPhase::Stopped } else { VmPhase::Failed };
                return;
            }
            st.restarts += 1;
        } else {
            let held = matches!(st.phase, VmPhase::Failed | VmPhase::Stopped)
                && vm.spec.start_request == st.observed_start_request
                && st.started_at.is_some()
                && !always;
            if held {
                return;
            }
            if rt.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
        }

        // Starting a process on a stale view could run a VM twice (e.g. one that
        // just migrated away): confirm with the server that it is still bound here.
        match self.node.client.get::<Vm>(&name).await {
            Ok(fresh) if fresh.status.node.as_deref() == Some(self.node.name.as_str()) && fresh.metadata.id == id => {}
            Ok(_) => {
                tracing::info!(vm = %name, "not starting: the VM is no longer bound to this node");
                return;
            }
            Err(e) => {
                tracing::warn!(vm = %name, error = %chain(&e), "not starting: cannot confirm the binding");
                return;
            }
        }
        // A rebuild asked for just before this start; never start the old disk instead.
        if !rebuild_if_asked(vm, dir, st) || !crate::backup::restore::in_place_if_asked(&self.node, vm, dir, st) {
            return;
        }
        st.phase = VmPhase::Starting;
        match self.start(vm, dir).await {
            Ok(pid) => {
                let rt = self.runtimes.entry(id).or_default();
                rt.failures = 0;
                rt.retry_at = None;
                st.phase = if vm.spec.power_state == PowerState::Paused {
                    VmPhase::Paused
                } else {
                    VmPhase::Running
                };
                st.qemu_pid = Some(pid);
                st.started_at = Some(Utc::now());
                st.live_restore = crate::backup::live::describe(dir);
                st.accel = Some(self.node.accel.clone());
                st.observed_start_request = vm.spec.start_request;
                st.observed_reboot_generation = vm.spec.reboot_generation;
                // An automatic restart keeps why it restarted; a start
                // someone asked for leaves the last stop behind.
                if asked
                    || !st
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains("exited") || r.contains("powered off"))
                {
                    st.reason = None;
                }
                tracing::info!(vm = %name, pid, accel = %self.node.accel, "VM started");
            }
            Err(e @ (ReconcileError::Copying(_) | ReconcileError::Restoring(..))) => {
                // Asked again every pass until the copy or restore is done.
                st.reason = Some(e.to_string());
            }
            Err(e) => {
                let rt = self.runtimes.entry(id).or_default();
                rt.failures += 1;
                let backoff = Duration::from_secs(2u64.saturating_pow(rt.failures.min(5)));
                rt.retry_at = Some(Instant::now() + backoff);
                let msg = chain(&e).to_string();
                tracing::error!(vm = %name, error = %msg, "VM failed to start");
                st.phase = VmPhase::Failed;
                st.reason = Some(format!("Start failed: {msg}"));
                st.qemu_pid = None;
                st.observed_start_request = vm.spec.start_request;
                // Mark as "was started" so Manual VMs hold in Failed until asked again.
                st.started_at.get_or_insert_with(Utc::now);
            }
        }
    }

    async fn start(&mut self, vm: &Vm, dir: &VmDir) -> Result<u32, ReconcileError> {
        let resume = crate::snapshots::pending_resume(dir);
        let mut spec = prepare_launch(&self.node, vm, dir, false).await?;
        spec.incoming = resume.is_some();
        let pid = qemu::launch(&self.node.qemu, &spec, dir).await?;
        if let Some((snapshot, state)) = resume {
            // Once only: a state that does not load now will not later, and
            // the next start boots the snapshot's disks.
            crate::snapshots::clear_resume(dir);
            let loaded = async {
                let qmp = Qmp::connect(&dir.qmp(), QMP_TIMEOUT).await?;
                crate::snapshots::resume(&qmp, &state).await
            }
            .await;
            if let Err(source) = loaded {
                qemu::kill_and_wait(pid, dir).await;
                return Err(ReconcileError::Resume { snapshot, source });
            }
            tracing::info!(vm = %vm.metadata.name, snapshot = %snapshot, "resumed from the snapshot's memory");
        }
        let rt = self.runtimes.entry(vm.metadata.id.clone()).or_default();
        rt.qmp = None;
        rt.powerdown_sent = None;
        rt.guest_shutdown.store(false, Ordering::SeqCst);
        Ok(pid)
    }

    /// The process runs: match paused/running to the spec and apply reboots.
    async fn steer_running(&mut self, vm: &Vm, dir: &VmDir, pid: u32, st: &mut VmStatus) {
        let id = vm.metadata.id.clone();
        let name = &vm.metadata.name;
        let rt = self.runtimes.entry(id.clone()).or_default();
        rt.powerdown_sent = None;
        rt.agent_shutdown_sent = false;
        st.qemu_pid = Some(pid);
        st.accel.get_or_insert_with(|| self.node.accel.clone());
        let Some(qmp) = self.qmp(&id, dir).await else {
            st.reason = Some("QMP is not answering".into());
            return;
        };
        let state = match qmp.query_status().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "query-status failed");
                self.runtimes.entry(id).or_default().qmp = None;
                return;
            }
        };
        let want_paused = vm.spec.power_state == PowerState::Paused;
        let result = if want_paused && state.running {
            qmp.stop().await.map(|_| VmPhase::Paused)
        } else if !want_paused && state.status == RunState::Paused {
            qmp.cont().await.map(|_| VmPhase::Running)
        } else if state.running {
            Ok(VmPhase::Running)
        } else if state.status == RunState::Paused {
            Ok(VmPhase::Paused)
        } else {
            Ok(st.phase)
        };
        match result {
            Ok(phase) => {
                if phase != st.phase {
                    tracing::info!(vm = %name, from = %st.phase, to = %phase, "VM phase changed");
                }
                st.phase = phase;
                if matches!(st.reason.as_deref(), Some("QMP is not answering")) {
                    st.reason = None;
                }
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "cannot change run state"),
        }
        self.sync_nics(vm, &qmp, st).await;
        self.sync_volumes(vm, dir, Some(&qmp), st).await;
        st.live_restore = crate::backup::live::step(&self.node, &id, dir, &qmp).await;
        if vm.spec.reboot_generation != st.observed_reboot_generation {
            match qmp.system_reset().await {
                Ok(()) => {
                    tracing::info!(vm = %name, "VM reset");
                    st.observed_reboot_generation = vm.spec.reboot_generation;
                }
                Err(e) => tracing::warn!(vm = %name, error = %e, "reset failed"),
            }
        }
    }

    /// Hot-plugs and unplugs NICs until QEMU has those of the spec.
    async fn sync_nics(&mut self, vm: &Vm, qmp: &Qmp, st: &mut VmStatus) {
        let generation = vm.metadata.generation;
        let rt = self.runtimes.entry(vm.metadata.id.clone()).or_default();
        let mut plugged = std::mem::take(&mut rt.plugged);
        let failed_now = plugged
            .failed
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, why)| why.clone());
        if let Some(why) = failed_now {
            st.reason = Some(why);
        } else if !plugged.settled(vm) {
            match crate::hotplug::sync_nics(&self.node, vm, qmp, &mut plugged).await {
                Ok(now) => {
                    plugged.nics = Some(now);
                    plugged.failed = None;
                    clear_reason(st, NIC_CHANGE_FAILED);
                }
                Err(e) => {
                    let why = format!("{NIC_CHANGE_FAILED}: {}", chain(&e));
                    tracing::warn!(vm = %vm.metadata.name, error = %why, "NIC hot-plug failed");
                    st.reason = Some(why.clone());
                    plugged.failed = Some((generation, why));
                    plugged.nics = None;
                }
            }
        }
        if let Some(nics) = &plugged.nics {
            st.nics = nics.clone();
        }
        if let Some(rt) = self.runtimes.get_mut(&vm.metadata.id) {
            rt.plugged = plugged;
        }
    }

    /// Brings the VM's volumes to the spec: hot-plugged into the running
    /// QEMU (`qmp`), or their disks in the VM's directory while it does not run.
    async fn sync_volumes(&mut self, vm: &Vm, dir: &VmDir, qmp: Option<&Qmp>, st: &mut VmStatus) {
        use novacron_api::volume::{settled, VOLUME_CHANGE_FAILED};
        let generation = vm.metadata.generation;
        let rt = self.runtimes.entry(vm.metadata.id.clone()).or_default();
        if let Some((_, why)) = rt.volumes_failed.as_ref().filter(|(g, _)| *g == generation) {
            st.reason = Some(why.clone());
            return;
        }
        let running = qmp.is_some();
        let in_place = settled(&vm.spec.volumes, &st.volumes)
            && st
                .volumes
                .iter()
                .all(|v| v.plugged == running && dir.volume(&v.id).exists());
        // Nothing to do (and so nothing failing) when the agent holds what the spec asks.
        let result = if in_place && dir.volume_ids().len() == st.volumes.len() {
            Ok(st.volumes.clone())
        } else {
            let mut plugs = std::mem::take(&mut rt.volume_plugs);
            let result = match qmp {
                Some(qmp) => crate::volumes::sync_running(&self.node, vm, dir, qmp, &mut plugs).await,
                None => crate::volumes::sync_stopped(&self.node, vm, dir).await,
            };
            self.runtimes.entry(vm.metadata.id.clone()).or_default().volume_plugs = plugs;
            result
        };
        let rt = self.runtimes.entry(vm.metadata.id.clone()).or_default();
        match result {
            Ok(held) => {
                st.volumes = held;
                rt.volumes_failed = None;
                clear_reason(st, VOLUME_CHANGE_FAILED);
            }
            Err(e) => {
                let why = format!("{VOLUME_CHANGE_FAILED}: {}", chain(&e));
                tracing::warn!(vm = %vm.metadata.name, error = %why, "volume change failed");
                st.reason = Some(why.clone());
                rt.volumes_failed = Some((generation, why));
                // What the directory holds now, so the server knows where the data is.
                st.volumes = crate::volumes::held_in(vm, dir);
            }
        }
    }

    /// The QMP connection of a VM, connecting (and watching events) if needed.
    async fn qmp(&mut self, id: &str, dir: &VmDir) -> Option<Arc<Qmp>> {
        let rt = self.runtimes.entry(id.to_string()).or_default();
        if let Some(q) = &rt.qmp {
            return Some(q.clone());
        }
        match Qmp::connect(&dir.qmp(), QMP_TIMEOUT).await {
            Ok(q) => {
                let q = Arc::new(q);
                let mut events = q.events();
                let flag = rt.guest_shutdown.clone();
                tokio::spawn(async move {
                    while let Ok(ev) = events.recv().await {
                        if ev.event == "SHUTDOWN" && ev.data["guest"].as_bool() == Some(true) {
                            flag.store(true, Ordering::SeqCst);
                        }
                    }
                });
                rt.qmp = Some(q.clone());
                Some(q)
            }
            Err(e) => {
                tracing::warn!(vm_id = %id, error = %e, "cannot connect to QMP");
                None
            }
        }
    }

    /// Stops QEMU now: QMP quit, then SIGKILL if it lingers.
    async fn force_off(&mut self, id: &str, pid: u32, dir: &VmDir) {
        if let Some(q) = self.qmp(id, dir).await {
            let _ = q.quit().await;
        }
        if !qemu::wait_gone(pid, dir, Duration::from_secs(3)).await {
            qemu::kill_and_wait(pid, dir).await;
        }
        if let Some(rt) = self.runtimes.get_mut(id) {
            rt.qmp = None;
            rt.powerdown_sent = None;
        }
    }

    /// Removes VM directories this cluster no longer knows (a VM deleted
    /// while this agent was away), killing any QEMU still running there.
    pub async fn remove_orphans(&mut self, known_ids: &std::collections::HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.node.vms_root) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if !known_ids.contains(&id) {
                self.remove_vm_state(&id).await;
            }
        }
    }

    /// Kills the QEMU of a VM this node no longer runs (deleted, or bound
    /// elsewhere) and removes its directory; nothing if there is none.
    pub async fn remove_vm_state(&mut self, id: &str) {
        self.runtimes.remove(id);
        self.node.copies.forget(id);
        self.node.live_restores.forget(id);
        self.node.restores.forget(id);
        let dir = self.vm_dir(id);
        if !dir.path.exists() {
            return;
        }
        self.node.net.detach(id).await;
        if let Some(pid) = dir.running_pid() {
            tracing::warn!(vm_id = %id, pid, "killing QEMU of a VM this node no longer runs");
            self.force_off(id, pid, &dir).await;
        }
        // A VM force-deleted while this agent was away may have had volumes.
        crate::volumes::rescue_all(&self.node, &dir);
        if let Err(e) = std::fs::remove_dir_all(&dir.path) {
            tracing::warn!(vm_id = %id, error = %e, "cannot remove the directory of a VM this node no longer runs");
        } else {
            tracing::info!(vm_id = %id, "removed the directory of a VM this node no longer runs");
        }
    }
}

impl crate::control::Driver for Reconciler {
    fn node_name(&self) -> &str {
        &self.node.name
    }

    fn is_claimed(&self, vm_id: &str) -> bool {
        self.node.claims.is_claimed(vm_id)
    }

    async fn reconcile(&mut self, vm: &Vm) -> Outcome {
        Reconciler::reconcile(self, vm).await
    }

    fn retain(&mut self, ids: &std::collections::HashSet<String>) {
        self.runtimes.retain(|id, _| ids.contains(id));
    }

    async fn remove_orphans(&mut self, keep: &std::collections::HashSet<String>) {
        Reconciler::remove_orphans(self, keep).await
    }

    async fn remove_vm_state(&mut self, id: &str) {
        Reconciler::remove_vm_state(self, id).await
    }

    async fn work_ended(&self) {
        tokio::select! {
            _ = self.node.copies.ended() => {}
            _ = self.node.restores.ended() => {}
        }
    }
}

/// Clears the VM's reason if it is a failure of the kind `prefix` names.
pub(crate) fn clear_reason(st: &mut VmStatus, prefix: &str) {
    if st.reason.as_deref().is_some_and(|r| r.starts_with(prefix)) {
        st.reason = None;
    }
}

/// Carries out a rebuild the spec asks for and this agent has not done:
/// the root disk goes (the next start makes it anew from the image). The
/// seed is written at every start anyway.
/// False if it could not be done.
fn rebuild_if_asked(vm: &Vm, dir: &VmDir, st: &mut VmStatus) -> bool {
    if vm.spec.rebuild_generation == st.observed_rebuild_generation {
        return true;
    }
    match std::fs::remove_file(dir.root_disk()) {
        Ok(()) => tracing::info!(vm = %vm.metadata.name, image = %vm.spec.image, "root disk removed for the rebuild"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(vm = %vm.metadata.name, error = %e, "cannot remove the root disk for the rebuild");
            st.reason = Some(format!("Rebuild failed: cannot remove the root disk: {e}"));
            return false;
        }
    }
    st.observed_rebuild_generation = vm.spec.rebuild_generation;
    true
}

/// Everything a VM needs before QEMU can start on this node: its directory,
/// the image files in the cache, the overlay root disk and the data disk.
/// Used for a normal start and for the target of a migration.
pub async fn prepare_launch(
    node: &NodeContext,
    vm: &Vm,
    dir: &VmDir,
    incoming: bool,
) -> Result<LaunchSpec, ReconcileError> {
    let (client, images, accel) = (&node.client, &node.images, node.accel.as_str());
    std::fs::create_dir_all(&dir.path).map_err(ReconcileError::Io)?;
    let image: Image = client
        .get(&vm.spec.image)
        .await
        .map_err(|e| ReconcileError::Image(vm.spec.image.clone(), e))?;
    let kernel = if image.spec.format == ImageFormat::Kernel {
        let k = images.ensure(client, &image, ImagePart::Kernel).await?;
        let i = images.ensure(client, &image, ImagePart::Initrd).await?;
        let mut cmdline = format!("console=ttyS0 novacron.name={}", vm.metadata.name);
        for extra in [&image.spec.kernel_args, &vm.spec.kernel_args].into_iter().flatten() {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        Some((k, i, cmdline))
    } else {
        None
    };
    // A VM restored from a backup gets its disks from there, once: not on a
    // migration's target (its disks come from the source), nor once it has
    // disks, nor after a rebuild (the root disk then comes from the image).
    if let (Some(src), false) = (&vm.spec.restore_from, incoming) {
        if crate::backup::restore::needed(dir) && !dir.root_disk().exists() && vm.spec.rebuild_generation == 0 {
            let restored = if src.live {
                crate::backup::live::begin(node, &vm.metadata.id, dir, src).await
            } else {
                match crate::backup::restore::restore_in_background(node, vm, dir, src) {
                    JobPoll::Done => Ok(()),
                    JobPoll::Running(percent) => return Err(ReconcileError::Restoring(src.to_string(), percent)),
                    JobPoll::Failed(why) => Err(crate::backup::BackupError::Restore(why)),
                }
            };
            restored.map_err(|source| ReconcileError::Restore {
                backup: src.to_string(),
                source,
            })?;
        }
    }
    // A live restore that a stop (or an agent restart) cut short goes on.
    crate::backup::live::ensure_serving(node, &vm.metadata.id, dir).map_err(|source| ReconcileError::Restore {
        backup: vm.spec.restore_from.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        source,
    })?;
    if !dir.root_disk().exists() {
        match image.spec.format {
            ImageFormat::Kernel => {
                qemu::create_disk(&dir.root_disk(), None, Some(vm.spec.disk_mib.unwrap_or(1024))).await?;
            }
            fmt => {
                let base = images.ensure(client, &image, ImagePart::Disk).await?;
                let virtual_mib = image.status.virtual_size_bytes.div_ceil(1024 * 1024);
                let size = vm.spec.disk_mib.filter(|s| *s > virtual_mib);
                if vm.spec.full_copy && !incoming {
                    match node.copies.poll(&vm.metadata.id, &dir.root_disk(), &base, size) {
                        JobPoll::Done => {}
                        JobPoll::Running(percent) => return Err(ReconcileError::Copying(percent)),
                        JobPoll::Failed(why) => return Err(ReconcileError::Copy(why)),
                    }
                } else if vm.spec.full_copy {
                    // A migration's target: the copy is what its mirror writes to.
                    qemu::copy_disk(&dir.root_disk(), &base, size, &Default::default()).await?;
                } else {
                    qemu::create_disk(&dir.root_disk(), Some((&base, &fmt.to_string())), size).await?;
                }
            }
        }
    }
    // Disk images boot a distribution that runs cloud-init; a kernel image
    // is NovaCron's test guest, which does not.
    let seed = if image.spec.format == ImageFormat::Kernel {
        None
    } else {
        crate::seed::write(client, vm, dir).await?;
        Some(dir.seed())
    };
    for id in dir.volume_ids() {
        if !vm.spec.volumes.iter().any(|a| a.id == id) {
            crate::volumes::release(node, dir, &id)?;
        }
    }
    for a in &vm.spec.volumes {
        crate::volumes::obtain(node, dir, a).await?;
    }
    let data_disk = match vm.spec.data_disk_mib {
        Some(size) => {
            if !dir.data_disk().exists() {
                qemu::create_disk(&dir.data_disk(), None, Some(size)).await?;
            }
            Some(dir.data_disk())
        }
        None => None,
    };
    Ok(LaunchSpec {
        name: vm.metadata.name.clone(),
        project: vm.metadata.project.clone(),
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        accel: accel.to_string(),
        machine: vm.spec.machine.clone().unwrap_or_else(|| "pc".into()),
        cpu_model: vm.spec.cpu_model.clone(),
        kernel,
        root_disk: dir.root_disk(),
        data_disk,
        seed,
        paused: vm.spec.power_state == PowerState::Paused,
        incoming: false,
        nics: node.net.attach(client, vm).await?,
        volumes: vm
            .spec
            .volumes
            .iter()
            .map(|a| (a.slot, a.id.clone(), dir.volume(&a.id)))
            .collect(),
    })
}
