//! Controllers: level-triggered loops that converge stored state.
//! - placement binds Pending VMs to nodes (woken on changes, and on a timer);
//! - node liveness marks nodes NotReady after missed heartbeats.

use std::time::Duration;

use chrono::Utc;
use novacron_api::error::chain;
use novacron_api::{Migration, Node, Vm, VmPhase};
use novacron_store::StoreExt;
use tokio::task::JoinSet;

use crate::{scheduling, AppState};

pub fn spawn(state: AppState) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(placement_loop(state.clone()));
    set.spawn(node_liveness_loop(state));
    set
}

async fn placement_loop(state: AppState) {
    loop {
        if let Err(e) = place_pending(&state).await {
            tracing::warn!(error = %chain(&e), "placement pass failed");
        }
        // Woken by writes that may make a placement possible; the timer is a backstop.
        let _ = tokio::time::timeout(Duration::from_secs(2), state.placement_wakeup.notified()).await;
    }
}

async fn place_pending(state: &AppState) -> Result<(), novacron_store::StoreError> {
    let store = &state.store;
    let vms: Vec<Vm> = store.list_all::<Vm>().await?;
    let mut pending: Vec<Vm> = vms
        .iter()
        .filter(|v| v.status.node.is_none() && v.metadata.deletion_requested_at.is_none())
        .cloned()
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    // Higher priority first, then first come, first served.
    pending.sort_by_key(|v| (std::cmp::Reverse(v.spec.placement.priority), v.metadata.created_at));
    let nodes: Vec<Node> = store.list_all::<Node>().await?;
    let migrations: Vec<Migration> = store.list_all::<Migration>().await?;
    let config = scheduling::load_config(store).await?;
    let mut cluster = scheduling::snapshot(&nodes, &vms, &migrations, &config, None);
    for vm in pending {
        let req = scheduling::request(&vm);
        let name = vm.metadata.name.clone();
        let outcome = cluster.place(&req);
        let updated = store
            .modify::<Vm, _>(&name, |v| {
                if v.status.node.is_some() || v.metadata.deletion_requested_at.is_some() {
                    return false;
                }
                match &outcome {
                    Ok(d) => {
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

async fn node_liveness_loop(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Err(e) = mark_stale_nodes(&state).await {
            tracing::warn!(error = %chain(&e), "node liveness pass failed");
        }
    }
}

async fn mark_stale_nodes(state: &AppState) -> Result<(), novacron_store::StoreError> {
    let grace = chrono::Duration::from_std(state.config.node_grace).unwrap_or(chrono::Duration::seconds(15));
    let now = Utc::now();
    for node in state.store.list_all::<Node>().await? {
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
                Ok(_) => tracing::warn!(node = %name, "node is NotReady: heartbeat missed"),
                Err(novacron_store::StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
