//! The driver of the migrations this node is the source of: a poller that
//! starts one for each new migration, the driver that runs it from start to
//! its recorded end (or rolls back one an earlier run of this agent left), and
//! the status it reports meanwhile.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use novacron_api::{CompleteMigration, Migration, MigrationPhase, MigrationStatus, MigrationStrategy, Vm, VmPhase};
use novacron_client::{watcher, Client, Selector};
use tokio_util::task::AbortOnDropHandle;

use super::source::SourceCtx;
use super::timeline::Timeline;
use super::{MigrationError, Migrations, POLL_EVERY};
use crate::node::MigrationClaim;
use novacron_api::error::chain;

/// How long a new driver waits for the previous one to let go of the VM.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// The status of a migration this agent drives, as the agent knows it, and a
/// task that writes it to the server whenever the server can take it. The
/// data plane never waits on the control plane: a server outage during the
/// switchover must not lengthen the guest's pause.
pub(super) struct StatusReport {
    status: Arc<Mutex<MigrationStatus>>,
    changed: Arc<tokio::sync::Notify>,
    _writer: AbortOnDropHandle<()>,
}

impl StatusReport {
    fn start(client: Client, name: String, status: MigrationStatus, timeline: Timeline) -> StatusReport {
        let status = Arc::new(Mutex::new(status));
        let changed = timeline.changed();
        let (latest, wake) = (status.clone(), changed.clone());
        let writer = tokio::spawn(async move {
            loop {
                wake.notified().await;
                let mut delay = Duration::from_millis(100);
                loop {
                    let mut status = latest.lock().clone();
                    status.timeline = timeline.steps();
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
                            tracing::debug!(migration = %name, error = %chain(&e), "status not written yet; retrying");
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

impl Migrations {
    /// Watches the migrations whose source is this node (the server sends no
    /// others), keeps `known` fresh for cancel checks and starts a driver for
    /// each new one. Migrations left half-done by an earlier run of this agent
    /// are rolled back.
    pub(crate) async fn run(self) {
        let mut driving: HashSet<String> = HashSet::new();
        let selector = Selector::fields(format!("status.source_node={}", self.node.name));
        let mut events = std::pin::pin!(watcher::watch::<Migration>(self.node.client.clone(), selector));
        while let Some(ev) = events.next().await {
            let changed = match ev {
                watcher::Event::Restarted(list) => {
                    let mut known = self.known.write();
                    known.clear();
                    known.extend(list.iter().map(|m| (m.metadata.name.clone(), m.clone())));
                    list
                }
                watcher::Event::Applied(m) => {
                    self.known.write().insert(m.metadata.name.clone(), m.clone());
                    vec![m]
                }
                watcher::Event::Deleted(m) => {
                    self.known.write().remove(&m.metadata.name);
                    continue;
                }
            };
            for m in changed {
                if m.status.source_node != self.node.name
                    || m.status.phase.is_final()
                    || driving.contains(&m.metadata.name)
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

    pub(super) fn latest(&self, name: &str) -> Option<Migration> {
        self.known.read().get(name).cloned()
    }

    /// Changes the status of a migration this node drives: at once in the
    /// agent's copy, and on the server in the background (see [`StatusReport`]).
    /// Without a report running (the migration's end), writes and waits.
    pub(super) async fn write_status(&self, name: &str, change: impl Fn(&mut MigrationStatus)) {
        if let Some(report) = self.reports.lock().get(name) {
            change(&mut report.status.lock());
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
            let current = match self.node.client.get::<Migration>(name).await {
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
            match self.node.client.put_migration_status(&next).await {
                Ok(m) => {
                    self.known.write().insert(name.to_string(), m.clone());
                    return Some(m);
                }
                Err(e) if e.is_conflict() => continue,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(_) => return None,
            }
        }
    }

    pub(super) async fn set_vm_phase(&self, vm: &str, phase: VmPhase, reason: Option<String>) {
        for _ in 0..20 {
            let Ok(mut v) = self.node.client.get::<Vm>(vm).await else {
                return;
            };
            v.status.phase = phase;
            v.status.reason = reason.clone();
            match self.node.client.put_vm_status(vm, &v).await {
                Ok(_) => return,
                Err(e) if e.is_conflict() => continue,
                // Refused (e.g. 403: the VM is bound to another node now):
                // asking again cannot change the answer.
                Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                    tracing::warn!(vm, ?phase, error = %e, "the server refused the VM's phase");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn drive(&self, m: Migration) {
        let name = m.metadata.name.clone();
        let Ok(vm) = self.node.client.get::<Vm>(&m.spec.vm).await else {
            self.write_status(&name, |s| fail(s, MigrationPhase::Failed, "VM not found".into()))
                .await;
            return;
        };
        // The VM is this driver's until the end: the reconciler leaves a claimed VM alone.
        let Some(_claim) = self.claim(&vm.metadata.id).await else {
            let why = "Another migration of the VM runs on this node";
            tracing::warn!(migration = %name, vm = %vm.metadata.name, "{why}");
            self.write_status(&name, |s| fail(s, MigrationPhase::Failed, why.into()))
                .await;
            return;
        };
        let started = Instant::now();
        let timeline = Timeline::new(started);
        let report = StatusReport::start(
            self.node.client.clone(),
            name.clone(),
            m.status.clone(),
            timeline.clone(),
        );
        self.reports.lock().insert(name.clone(), report);
        tracing::info!(migration = %name, vm = %vm.metadata.name, to = %m.status.target_node, "migration starting");
        let mut ctx = SourceCtx::new(timeline.clone());
        let result = if m.spec.strategy == MigrationStrategy::Cold {
            self.transfer_cold(&m, &vm, &mut ctx, started).await
        } else {
            self.transfer(&m, &vm, &mut ctx, started).await
        };
        // The end is written and waited for: completion carries the final
        // status, a failure is written after the roll-back.
        self.reports.lock().remove(&name);
        if let Some(parent) = &m.spec.trace_parent {
            let outcome = match &result {
                Ok(_) => "completed".to_string(),
                Err(e) => chain(e).to_string(),
            };
            let span = timeline
                .as_span("migration.source")
                .attribute("migration", name.clone())
                .attribute("vm", vm.metadata.name.clone())
                .attribute("node", self.node.name.clone())
                .attribute("outcome", outcome);
            novacron_trace::record(parent, &span);
        }
        match result {
            Ok(final_status) => {
                let req = CompleteMigration {
                    target_qemu_pid: ctx.target_pid.unwrap_or_default(),
                    status: final_status,
                };
                // The VM runs on the target now; keep trying until the server knows.
                let mut delay = Duration::from_millis(200);
                loop {
                    match self.node.client.complete_migration(&name, &req).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(migration = %name, error = %chain(&e), "cannot record completion yet; retrying");
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
                    chain(&e).to_string()
                };
                tracing::warn!(migration = %name, vm = %vm.metadata.name, error = %msg, "migration failed; rolling back");
                self.roll_back(&m, &vm, &ctx).await;
                let phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                self.write_status(&name, |s| {
                    fail(s, phase, msg.clone());
                    s.timeline = timeline.steps();
                })
                .await;
                self.set_vm_phase(&vm.metadata.name, VmPhase::Running, None).await;
            }
        }
    }

    /// A migration this agent cannot continue (it restarted mid-way): undo it.
    async fn abandon(&self, m: Migration, why: &str) {
        let Ok(vm) = self.node.client.get::<Vm>(&m.spec.vm).await else {
            return;
        };
        let Some(_claim) = self.claim(&vm.metadata.id).await else {
            tracing::warn!(migration = %m.metadata.name, "not rolled back: another migration of the VM runs on this node");
            return;
        };
        let ctx = SourceCtx::left_by_earlier_run();
        self.roll_back(&m, &vm, &ctx).await;
        self.write_status(&m.metadata.name, |s| fail(s, MigrationPhase::Failed, why.to_string()))
            .await;
        self.set_vm_phase(&vm.metadata.name, VmPhase::Running, None).await;
    }

    /// Claims a VM for this driver. The server lets a new migration of a VM
    /// start once the last one's status is final, a moment before that one's
    /// driver has let go of the VM: wait for it (a while, not forever).
    async fn claim(&self, vm_id: &str) -> Option<MigrationClaim> {
        let deadline = Instant::now() + CLAIM_WAIT;
        loop {
            if let Some(claim) = self.node.claims.claim(vm_id) {
                return Some(claim);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub(super) fn check_cancel(&self, name: &str) -> Result<(), MigrationError> {
        match self.latest(name) {
            Some(m) if m.spec.cancel => Err(MigrationError::Cancelled),
            _ => Ok(()),
        }
    }
}

fn fail(s: &mut MigrationStatus, phase: MigrationPhase, error: String) {
    s.phase = phase;
    s.error = Some(error);
    s.finished_at = Some(Utc::now());
}
