//! Controllers: level-triggered loops that converge stored state. They learn
//! of the cluster from caches kept by watchers on the store (no timer lists
//! the whole store):
//! - placement binds Pending VMs to nodes, on every change to VMs, nodes,
//!   migrations or the scheduler settings;
//! - node liveness marks nodes NotReady after missed heartbeats;
//! - backup policies run on their schedules (`backup_runs`);
//! - once at start, address reservations nothing holds are released, and
//!   image downloads and webhook deliveries the last server left
//!   unfinished are marked Failed;
//! - events are read off changes to VMs, migrations and nodes (`events`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use novacron_api::error::chain;
use novacron_api::{Migration, Node, Vm, VmPhase};
use novacron_store::StoreExt;
use tokio::task::JoinSet;

use crate::cache::Cache;
use crate::{scheduling, AppState};

/// What the controllers watch.
struct Caches {
    vms: Arc<Cache<Vm>>,
    nodes: Arc<Cache<Node>>,
    migrations: Arc<Cache<Migration>>,
}

pub fn spawn(state: AppState) -> JoinSet<()> {
    // Any change may make a placement possible; the API also wakes placement.
    let wake = state.placement_wakeup.clone();
    let caches = Arc::new(Caches {
        vms: Cache::start(state.store.clone(), wake.clone()),
        nodes: state.nodes.clone(),
        migrations: Cache::start(state.store.clone(), wake),
    });
    let mut set = JoinSet::new();
    let store = state.store.clone();
    set.spawn(async move {
        match crate::ipam::release_orphans(&store, chrono::Duration::seconds(60)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released addresses no VM or network holds"),
            Err(e) => tracing::warn!(error = %chain(&e), "cannot look for orphaned address reservations"),
        }
    });
    let downloads = state.clone();
    set.spawn(async move { crate::routes::image_download::fail_interrupted(&downloads).await });
    let hooks = state.store.clone();
    set.spawn(async move { crate::webhooks::fail_interrupted(&hooks).await });
    set.spawn(placement_loop(state.clone(), caches.clone()));
    set.spawn(crate::backup_runs::schedule_loop(state.clone()));
    crate::events::spawn(state.events.clone(), state.store.clone(), &mut set);
    set.spawn(node_liveness_loop(state, caches));
    set
}

/// How long placement gathers changes before a pass (measured with 1,000
/// nodes heartbeating: without it, every heartbeat made a pass over all VMs
/// while any VM waited).
const PLACEMENT_BATCH: Duration = Duration::from_millis(20);

async fn placement_loop(state: AppState, caches: Arc<Caches>) {
    loop {
        if caches.vms.synced() && caches.nodes.synced() && caches.migrations.synced() {
            if let Err(e) = place_pending(&state, &caches).await {
                tracing::warn!(error = %chain(&e), "placement pass failed");
            }
        }
        // Woken by every change to what placement reads. The timer only
        // retries a pass that failed on the store.
        let _ = tokio::time::timeout(Duration::from_secs(30), state.placement_wakeup.notified()).await;
        // A pass reads the whole cluster: changes that come together (a
        // burst of creates, a thousand nodes' heartbeats) share one.
        tokio::time::sleep(PLACEMENT_BATCH).await;
    }
}

async fn place_pending(state: &AppState, caches: &Caches) -> Result<(), novacron_store::StoreError> {
    let store = &state.store;
    // Every heartbeat wakes this loop: look at the whole cluster only when
    // some VM waits for a node.
    let mut pending = caches
        .vms
        .select(|v| v.status.node.is_none() && v.metadata.deletion_requested_at.is_none());
    if pending.is_empty() {
        return Ok(());
    }
    // Higher priority first, then first come, first served.
    pending.sort_by_key(|v| (std::cmp::Reverse(v.spec.placement.priority), v.metadata.created_at));
    let nodes: Vec<Node> = caches.nodes.snapshot();
    let migrations: Vec<Migration> = caches.migrations.snapshot();
    let config = scheduling::load_config(store).await?;
    let mut cluster = caches.vms.with(|vms| {
        let vms: Vec<&Vm> = vms.values().collect();
        scheduling::snapshot(&nodes, &vms, &migrations, &config, None)
    });
    for vm in pending {
        let req = scheduling::request(&vm);
        let name = vm.metadata.name.clone();
        let deciding = std::time::Instant::now();
        let outcome = cluster.place(&req);
        state.metrics.placement(deciding.elapsed(), outcome.is_ok());
        let updated = store
            .modify::<Vm, _>(&name, |v| {
                if v.status.node.is_some() || v.metadata.deletion_requested_at.is_some() {
                    return false;
                }
                match &outcome {
                    Ok(d) => {
                        if let Some(node) = nodes.get(d.index) {
                            pin_machine(v, node);
                        }
                        v.status.node = Some(d.node.clone());
                        v.status.phase = VmPhase::Scheduled;
                        v.status.reason = None;
                        true
                    }
                    Err(why) => {
                        let reason = Some(format!("Unschedulable: {why}"));
                        let changed = v.status.reason != reason;
                        v.status.reason = reason;
                        changed
                    }
                }
            })
            .await;
        if let Ok(vm) = &updated {
            caches.vms.write_through(vm.clone());
        }
        match (updated, &outcome) {
            (Ok(_), Ok(d)) => {
                tracing::info!(vm = %name, node = %d.node, score = d.score.total, feasible = d.feasible, "placed VM");
                cluster.commit(&name, d.index, req);
            }
            (Ok(_), Err(why)) => tracing::debug!(vm = %name, reason = %why, "VM stays pending"),
            (Err(novacron_store::StoreError::NotFound { .. }), _) => {}
            (Err(e), _) => return Err(e),
        }
    }
    Ok(())
}

/// A machine family (`pc`) becomes the versioned type it stands for on the
/// VM's first node (`pc-i440fx-10.0`): from then on the guest keeps the
/// same virtual hardware wherever it runs or moves.
fn pin_machine(vm: &mut Vm, node: &Node) {
    if let Some(versioned) = vm
        .spec
        .machine
        .as_ref()
        .and_then(|m| node.status.qemu.machine_aliases.get(m))
    {
        vm.spec.machine = Some(versioned.clone());
    }
}

/// Heartbeats arrive through the node cache; a node is stale when its last
/// one is older than the grace period, so the loop checks the cache (not the
/// store) twice a second.
async fn node_liveness_loop(state: AppState, caches: Arc<Caches>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Err(e) = mark_stale_nodes(&state, &caches.nodes).await {
            tracing::warn!(error = %chain(&e), "node liveness pass failed");
        }
    }
}

async fn mark_stale_nodes(state: &AppState, nodes: &Cache<Node>) -> Result<(), novacron_store::StoreError> {
    let grace = chrono::Duration::from_std(state.config.node_grace).unwrap_or(chrono::Duration::seconds(15));
    let now = Utc::now();
    for node in nodes.snapshot() {
        let stale = node.status.last_heartbeat.is_none_or(|t| now - t > grace);
        if node.status.ready && stale {
            let name = node.metadata.name.clone();
            let reason = format!("No heartbeat for more than {}s", grace.num_seconds());
            let result = state
                .store
                .modify::<Node, _>(&name, |n| {
                    let still_stale = n.status.last_heartbeat.is_none_or(|t| Utc::now() - t > grace);
                    if !n.status.ready || !still_stale {
                        return false;
                    }
                    n.status.ready = false;
                    n.status.ready_reason = Some(reason.clone());
                    n.status.last_transition = Some(Utc::now());
                    true
                })
                .await;
            match result {
                Ok(n) => {
                    let marked = !n.status.ready;
                    nodes.write_through(n);
                    if marked {
                        tracing::warn!(node = %name, "node is NotReady: heartbeat missed");
                    }
                }
                Err(novacron_store::StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
