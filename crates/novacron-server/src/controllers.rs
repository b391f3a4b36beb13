//! Controllers: level-triggered loops that converge stored state.
//! - placement binds Pending VMs to nodes (woken on changes, and on a timer);
//! - node liveness marks nodes NotReady after missed heartbeats.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use novacron_api::{Migration, Node, Vm, VmPhase};
use novacron_scheduler::{NodeView, Request};
use novacron_store::StoreExt;
use tokio::task::JoinSet;

use crate::{AppState, ErrorChain};

pub fn spawn(state: AppState) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(placement_loop(state.clone()));
    set.spawn(node_liveness_loop(state));
    set
}

async fn placement_loop(state: AppState) {
    loop {
        if let Err(e) = place_pending(&state).await {
            tracing::warn!(error = %ErrorChain(&e), "placement pass failed");
        }
        // Woken by writes that may make a placement possible; the timer is a backstop.
        let _ = tokio::time::timeout(Duration::from_secs(2), state.placement_wakeup.notified()).await;
    }
}

/// Node views with the resources already reserved by bound VMs and by
/// migrations in progress (on their target).
pub fn node_views(nodes: &[Node], vms: &[Vm], migrations: &[Migration]) -> Vec<NodeView> {
    let mut used: HashMap<&str, (u32, u64)> = HashMap::new();
    for vm in vms {
        if let Some(node) = vm.status.node.as_deref() {
            let e = used.entry(node).or_default();
            e.0 += vm.spec.vcpus;
            e.1 += vm.spec.memory_mib;
        }
    }
    for m in migrations.iter().filter(|m| !m.status.phase.is_final()) {
        if let Some(vm) = vms.iter().find(|v| v.metadata.name == m.spec.vm) {
            let e = used.entry(m.status.target_node.as_str()).or_default();
            e.0 += vm.spec.vcpus;
            e.1 += vm.spec.memory_mib;
        }
    }
    nodes
        .iter()
        .map(|n| {
            let (cpu, mem) = used.get(n.metadata.name.as_str()).copied().unwrap_or_default();
            NodeView {
                name: n.metadata.name.clone(),
                ready: n.status.ready,
                schedulable: n.spec.schedulable,
                capacity_vcpus: n.status.capacity.vcpus,
                capacity_memory_mib: n.status.capacity.memory_mib,
                allocated_vcpus: cpu,
                allocated_memory_mib: mem,
            }
        })
        .collect()
}

async fn place_pending(state: &AppState) -> Result<(), novacron_store::StoreError> {
    let store = &state.store;
    let mut vms: Vec<Vm> = store.list_all::<Vm>().await?;
    let pending: Vec<Vm> = {
        let mut p: Vec<Vm> = vms
            .iter()
            .filter(|v| v.status.node.is_none() && v.metadata.deletion_requested_at.is_none())
            .cloned()
            .collect();
        p.sort_by_key(|v| v.metadata.created_at);
        p
    };
    if pending.is_empty() {
        return Ok(());
    }
    let nodes: Vec<Node> = store.list_all::<Node>().await?;
    let migrations: Vec<Migration> = store.list_all::<Migration>().await?;
    for vm in pending {
        let views = node_views(&nodes, &vms, &migrations);
        let req = Request {
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
        };
        let name = vm.metadata.name.clone();
        let outcome = novacron_scheduler::place(&req, &views).map(|n| n.name.clone());
        let updated = store
            .modify::<Vm, _>(&name, |v| {
                if v.status.node.is_some() || v.metadata.deletion_requested_at.is_some() {
                    return false;
                }
                match &outcome {
                    Ok(node) => {
                        v.status.node = Some(node.clone());
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
            (Ok(v), Ok(node)) => {
                tracing::info!(vm = %name, node = %node, "placed VM");
                if let Some(slot) = vms.iter_mut().find(|x| x.metadata.name == name) {
                    *slot = v;
                }
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
            tracing::warn!(error = %ErrorChain(&e), "node liveness pass failed");
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
