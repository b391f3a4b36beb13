//! Runs backup policies: each when its schedule says, and by hand. A run
//! backs up the policy's VMs one after another (as Proxmox's vzdump does,
//! so a policy never loads a host with many backups at once), then prunes
//! each backed-up VM's backups in the store to the policy's keep rules.
//!
//! A run missed while the server was down happens once when it is back,
//! not once per missed time; a run the server was in the middle of when it
//! stopped is recorded as interrupted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use novacron_api::backup_policy::{PolicyRun, PolicyRunVm, Schedule};
use novacron_api::error::chain;
use novacron_api::selector::LabelSelector;
use novacron_api::{Backup, BackupEvent, BackupPolicy, Vm};
use novacron_store::{StoreError, StoreExt};
use tracing::Instrument;

use crate::cache::Cache;
use crate::AppState;

/// The policies with a run going on.
#[derive(Debug, Default)]
pub struct PolicyRuns(Mutex<HashSet<String>>);

/// A policy's run, held while it goes on.
pub struct RunClaim {
    runs: Arc<PolicyRuns>,
    policy: String,
}

impl PolicyRuns {
    /// The right to run `policy`, unless a run of it is going on.
    pub fn claim(self: &Arc<Self>, policy: &str) -> Option<RunClaim> {
        let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(policy.to_string()).then(|| RunClaim {
            runs: self.clone(),
            policy: policy.to_string(),
        })
    }
}

impl Drop for RunClaim {
    fn drop(&mut self) {
        let mut running = self.runs.0.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.policy);
    }
}

/// Wakes for every change to a policy, and sleeps until the next one is due.
pub async fn schedule_loop(state: AppState) {
    let policies: Arc<Cache<BackupPolicy>> = Cache::start(state.store.clone(), state.policy_wakeup.clone());
    let mut interrupted_recorded = false;
    loop {
        let mut sleep = Duration::from_secs(60);
        if policies.synced() {
            if !interrupted_recorded {
                record_interrupted(&state, &policies).await;
                interrupted_recorded = true;
            }
            let now = Utc::now();
            for policy in policies.snapshot() {
                match pass(&state, &policies, policy, now).await {
                    Ok(Some(due)) => sleep = sleep.min((due - now).to_std().unwrap_or_default()),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %chain(&e), "backup policy pass failed"),
                }
            }
        }
        let _ = tokio::time::timeout(sleep.max(Duration::from_millis(50)), state.policy_wakeup.notified()).await;
    }
}

/// Starts the policy's run if it is due, or works out when it is. Returns
/// when the loop should look again for this policy.
async fn pass(
    state: &AppState,
    cache: &Cache<BackupPolicy>,
    policy: BackupPolicy,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let name = policy.metadata.name.clone();
    let schedule = match Schedule::parse(&policy.spec.schedule) {
        Ok(s) => s,
        Err(e) => {
            // Checked when written: only a store edited by hand gets here.
            tracing::warn!(policy = %name, error = %e.message, "backup policy has an unusable schedule");
            return Ok(None);
        }
    };
    let current = policy.status.observed_generation == policy.metadata.generation;
    let next = match (policy.spec.suspended, policy.status.next_run) {
        (true, None) if current => return Ok(None),
        (true, _) => None,
        (false, Some(t)) if current && t > now => return Ok(Some(t)),
        (false, Some(_)) if current => {
            let next = schedule.next_after(now);
            match state.policy_runs.claim(&name) {
                Some(claim) => {
                    start_run(state, claim, policy.clone(), false).await;
                }
                None => tracing::info!(policy = %name, "scheduled run skipped: a run is going on"),
            }
            next
        }
        (false, _) => schedule.next_after(now),
    };
    let generation = policy.metadata.generation;
    let written = state
        .store
        .modify::<BackupPolicy, _>(&name, |p| {
            // Unchanged (a schedule with no next time, say): no write, so
            // the write's own event does not wake this loop again.
            if p.metadata.generation != generation
                || (p.status.next_run == next && p.status.observed_generation == generation)
            {
                return false;
            }
            p.status.next_run = next;
            p.status.observed_generation = generation;
            true
        })
        .await;
    match written {
        Ok(p) => cache.write_through(p),
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(next)
}

/// Runs the last server stopped in the middle of end as interrupted.
async fn record_interrupted(state: &AppState, cache: &Cache<BackupPolicy>) {
    for policy in cache.select(|p| p.status.running.is_some()) {
        let name = policy.metadata.name.clone();
        if state.policy_runs.claim(&name).is_none() {
            continue;
        }
        let result = state
            .store
            .modify::<BackupPolicy, _>(&name, |p| {
                let Some(mut run) = p.status.running.take() else {
                    return false;
                };
                run.finished = Some(Utc::now());
                run.vms.push(PolicyRunVm {
                    vm: String::new(),
                    backup: None,
                    full_reason: None,
                    error: Some("interrupted: the server stopped during the run".into()),
                });
                run.ok = run.all_backed_up();
                p.status.last_run = Some(run);
                true
            })
            .await;
        match result {
            Ok(p) => cache.write_through(p),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => tracing::warn!(policy = %name, error = %chain(&e), "cannot record an interrupted run"),
        }
    }
}

/// Starts a run of a policy: recorded in its status as running when this
/// returns, carried out in the background.
pub async fn start_run(state: &AppState, claim: RunClaim, policy: BackupPolicy, by_hand: bool) -> PolicyRun {
    let run = PolicyRun {
        started: Utc::now(),
        finished: None,
        by_hand,
        vms: Vec::new(),
        pruned: Vec::new(),
        ok: false,
    };
    publish(state, &policy.metadata.name, &run).await;
    let span = tracing::info_span!("backup_policy_run", policy = %policy.metadata.name, by_hand);
    tokio::spawn(carry_out(state.clone(), claim, policy, run.clone()).instrument(span));
    run
}

/// One run of a policy; its progress is written to the policy's status
/// after each VM.
async fn carry_out(state: AppState, _claim: RunClaim, policy: BackupPolicy, mut run: PolicyRun) {
    let name = policy.metadata.name.clone();
    let store = policy.spec.store().to_string();
    let vms = match selected(&state, &policy).await {
        Ok(vms) => vms,
        Err(message) => {
            run.vms.push(PolicyRunVm {
                vm: String::new(),
                backup: None,
                full_reason: None,
                error: Some(message),
            });
            finish(&state, &name, run).await;
            return;
        }
    };
    tracing::info!(policy = %name, vms = vms.len(), "backup policy run begins");
    let mut backed_up = Vec::new();
    for vm in &vms {
        let vm_name = vm.metadata.name.clone();
        let outcome = match back_up(&state, vm, &store).await {
            Ok(b) => {
                backed_up.push(vm_name.clone());
                PolicyRunVm {
                    vm: vm_name,
                    backup: Some(b.id),
                    full_reason: b.full_reason,
                    error: None,
                }
            }
            Err(message) => {
                tracing::warn!(policy = %name, vm = %vm_name, error = %message, "policy backup failed");
                PolicyRunVm {
                    vm: vm_name,
                    backup: None,
                    full_reason: None,
                    error: Some(message),
                }
            }
        };
        run.vms.push(outcome);
        publish(&state, &name, &run).await;
    }
    if let Some(keep) = &policy.spec.keep {
        let project = policy.metadata.project.clone();
        for vm in &backed_up {
            let pruned = crate::routes::backups::prune_vm(&state, &store, vm, keep, false, |p| Ok(p == project)).await;
            match pruned {
                Ok(r) => run.pruned.extend(r.removed),
                Err(e) => {
                    if let Some(entry) = run.vms.iter_mut().find(|v| &v.vm == vm) {
                        entry.error = Some(format!("backed up, but the prune failed: {}", e.message));
                    }
                }
            }
        }
    }
    tracing::info!(policy = %name, ok = run.all_backed_up(), backups = backed_up.len(), pruned = run.pruned.len(), "backup policy run done");
    finish(&state, &name, run).await;
}

/// The VMs of the policy's project its selector picks, by name.
async fn selected(state: &AppState, policy: &BackupPolicy) -> Result<Vec<Vm>, String> {
    let selector = LabelSelector::parse(&policy.spec.selector).map_err(|e| e.message)?;
    let mut vms: Vec<Vm> = state
        .store
        .list_all::<Vm>()
        .await
        .map_err(|e| format!("cannot list VMs: {}", chain(&e)))?
        .into_iter()
        .filter(|v| v.metadata.project == policy.metadata.project)
        .filter(|v| v.metadata.deletion_requested_at.is_none())
        .filter(|v| selector.matches(&v.metadata.labels))
        .collect();
    vms.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(vms)
}

/// Takes one backup and follows its progress stream to the outcome.
async fn back_up(state: &AppState, vm: &Vm, store: &str) -> Result<Backup, String> {
    let outcome = take(state, vm, store).await;
    state
        .events
        .backup_ended(vm, outcome.as_ref().map(|b| b.id.as_str()).map_err(String::as_str));
    outcome
}

async fn take(state: &AppState, vm: &Vm, store: &str) -> Result<Backup, String> {
    let answer = crate::routes::backups::start_backup(state, vm, store)
        .await
        .map_err(|e| e.message)?;
    let mut events = std::pin::pin!(novacron_client::ndjson_body::<BackupEvent>(answer));
    while let Some(event) = events.next().await {
        match event.map_err(|e| format!("the backup's progress stream broke: {}", chain(&e)))? {
            BackupEvent::Progress { .. } => {}
            BackupEvent::Done(b) => return Ok(b),
            BackupEvent::Failed { message } => return Err(message),
        }
    }
    Err("the backup's progress stream ended without its outcome".into())
}

async fn publish(state: &AppState, policy: &str, run: &PolicyRun) {
    write_status(state, policy, |p| p.status.running = Some(run.clone())).await;
}

async fn finish(state: &AppState, policy: &str, mut run: PolicyRun) {
    run.finished = Some(Utc::now());
    run.ok = run.all_backed_up();
    write_status(state, policy, |p| {
        p.status.running = None;
        p.status.last_run = Some(run.clone());
    })
    .await;
}

async fn write_status(state: &AppState, policy: &str, change: impl Fn(&mut BackupPolicy) + Send + Sync) {
    let result = state
        .store
        .modify::<BackupPolicy, _>(policy, |p| {
            change(p);
            true
        })
        .await;
    match result {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(policy, error = %chain(&e), "cannot record the backup policy's run"),
    }
}
