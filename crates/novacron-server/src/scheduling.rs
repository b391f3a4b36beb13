//! Between the store's objects and the pure scheduler: cluster snapshots,
//! requests from VM specs, settings, and explanations in API form.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use novacron_api::{
    AffinityScope, CandidateScore, Migration, Node, PlacementExplanation, PlannedMove, RebalanceMode, RebalancePlan,
    RejectionCount, SchedulerConfig, SchedulingProfile, Vm, VmPhase,
};
use novacron_scheduler::{
    AffinityTerm, Cluster, Decision, NodeInfo, Profile, Request, Runtime, Scope, Settings, Unschedulable, Weights,
};
use novacron_store::{SharedStore, StoreError, StoreExt};

/// Node label with the node's cost per hour, for the cost objective.
pub const COST_LABEL: &str = "novacron.io/cost-per-hour";
pub const CONFIG_NAME: &str = "cluster";

pub async fn load_config(store: &SharedStore) -> Result<SchedulerConfig, StoreError> {
    Ok(store.get_obj::<SchedulerConfig>(CONFIG_NAME).await?.unwrap_or_default())
}

pub fn settings(cfg: &SchedulerConfig) -> Settings {
    let cfg = &cfg.settings;
    Settings {
        profile: match cfg.profile {
            SchedulingProfile::Binpack => Profile::Binpack,
            SchedulingProfile::Spread => Profile::Spread,
        },
        cpu_overcommit: cfg.cpu_overcommit,
        memory_overcommit: cfg.memory_overcommit,
        max_vms_per_node: cfg.max_vms_per_node,
        weights: Weights {
            packing: cfg.weights.packing,
            cost: cfg.weights.cost,
            headroom: cfg.weights.headroom,
            latency: cfg.weights.latency,
            affinity: cfg.weights.affinity,
        },
        zone_latency_ms: cfg
            .zone_latency_ms
            .iter()
            .map(|z| {
                let (a, b) = if z.a <= z.b { (&z.a, &z.b) } else { (&z.b, &z.a) };
                ((a.clone(), b.clone()), z.ms)
            })
            .collect(),
        default_zone_latency_ms: cfg.default_zone_latency_ms,
    }
}

pub fn request(vm: &Vm) -> Request {
    let mut req = request_for(&vm.spec, &vm.metadata.labels);
    // A running guest's memory moves only to a node with the same accelerator.
    if matches!(vm.status.phase, VmPhase::Running | VmPhase::Paused | VmPhase::Migrating) {
        req.accel = vm.status.accel.clone();
    }
    req
}

/// The scheduler's view of a VM that may not exist yet.
pub fn request_for(spec: &novacron_api::VmSpec, labels: &BTreeMap<String, String>) -> Request {
    let p = &spec.placement;
    Request {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        labels: labels.clone(),
        node_selector: p.node_selector.clone(),
        affinity: p
            .affinity
            .iter()
            .map(|r| AffinityTerm {
                selector: r.selector.clone(),
                scope: match r.scope {
                    AffinityScope::Node => Scope::Node,
                    AffinityScope::Zone => Scope::Zone,
                },
                anti: r.anti,
                required: r.required,
            })
            .collect(),
        preferred_zone: p.preferred_zone.clone(),
        machine: spec.machine.clone(),
        cpu_model: spec.cpu_model.clone(),
        accel: None,
    }
}

fn node_info(n: &Node) -> NodeInfo {
    NodeInfo {
        name: n.metadata.name.clone(),
        ready: n.status.ready,
        schedulable: n.spec.schedulable,
        capacity: novacron_scheduler::Resources {
            vcpus: u64::from(n.status.capacity.vcpus),
            memory_mib: n.status.capacity.memory_mib,
        },
        cost_per_hour: n
            .metadata
            .labels
            .get(COST_LABEL)
            .and_then(|c| c.parse::<f64>().ok())
            .filter(|c| c.is_finite() && *c >= 0.0)
            .unwrap_or(0.0),
        labels: n.metadata.labels.clone(),
        runtime: n.status.qemu.is_known().then(|| Runtime {
            accel: n.status.accel.clone(),
            machine_types: n.status.qemu.machine_types.iter().cloned().collect(),
            cpu_models: n.status.qemu.cpu_models.iter().cloned().collect(),
        }),
    }
}

/// The cluster as the scheduler sees it: every bound VM (except `leave_out`)
/// and, on their targets, the room migrations in progress have reserved.
pub fn snapshot<N: Borrow<Node>, V: Borrow<Vm>>(
    nodes: &[N],
    vms: &[V],
    migrations: &[Migration],
    cfg: &SchedulerConfig,
    leave_out: Option<&str>,
) -> Cluster {
    let mut cluster = Cluster::new(nodes.iter().map(|n| node_info(n.borrow())).collect(), settings(cfg));
    let moving: Vec<&Migration> = migrations.iter().filter(|m| !m.status.phase.is_final()).collect();
    for vm in vms.iter().map(V::borrow) {
        if Some(vm.metadata.name.as_str()) == leave_out {
            continue;
        }
        let Some(index) = vm.status.node.as_deref().and_then(|n| cluster.node_index(n)) else {
            continue;
        };
        let settled = matches!(vm.status.phase, VmPhase::Running | VmPhase::Stopped | VmPhase::Paused);
        let is_moving = moving.iter().any(|m| m.spec.vm == vm.metadata.name);
        if settled && !is_moving {
            cluster.commit(&vm.metadata.name, index, request(vm));
        } else {
            cluster.commit_fixed(&vm.metadata.name, index, request(vm));
        }
    }
    for m in moving {
        let (Some(vm), Some(index)) = (
            vms.iter().map(V::borrow).find(|v| v.metadata.name == m.spec.vm),
            cluster.node_index(&m.status.target_node),
        ) else {
            continue;
        };
        cluster.commit_fixed(&format!("migration:{}", m.metadata.name), index, request(vm));
    }
    cluster
}

pub fn explain(cluster: &Cluster, outcome: &Result<Decision, Unschedulable>) -> PlacementExplanation {
    let score = |node: &str, s: &novacron_scheduler::Score| CandidateScore {
        node: node.to_string(),
        total: round(s.total),
        packing: round(s.packing),
        cost: round(s.cost),
        headroom: round(s.headroom),
        latency: round(s.latency),
        affinity: round(s.affinity),
    };
    let rejected = |r: &std::collections::BTreeMap<novacron_scheduler::Rejection, usize>| {
        r.iter()
            .map(|(reason, nodes)| RejectionCount {
                reason: reason.to_string(),
                nodes: *nodes,
            })
            .collect::<Vec<_>>()
    };
    match outcome {
        Ok(d) => {
            let rejected = rejected(&d.rejections);
            let mut summary = format!(
                "{} (score {:.2}); {}/{} nodes feasible",
                d.node,
                d.score.total,
                d.feasible,
                cluster.nodes.len()
            );
            if !rejected.is_empty() {
                let parts: Vec<String> = rejected.iter().map(|r| format!("{} {}", r.nodes, r.reason)).collect();
                summary.push_str(&format!("; rejected: {}", parts.join(", ")));
            }
            PlacementExplanation {
                node: Some(d.node.clone()),
                total_nodes: cluster.nodes.len(),
                feasible: d.feasible,
                rejected,
                candidates: std::iter::once(score(&d.node, &d.score))
                    .chain(d.runners_up.iter().map(|c| score(&c.node, &c.score)))
                    .collect(),
                summary,
            }
        }
        Err(u) => PlacementExplanation {
            node: None,
            total_nodes: u.total_nodes,
            feasible: 0,
            rejected: rejected(&u.rejections),
            candidates: Vec::new(),
            summary: u.to_string(),
        },
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn plan(cluster: &Cluster, mode: RebalanceMode, max_moves: usize) -> RebalancePlan {
    let p = cluster.rebalance(
        match mode {
            RebalanceMode::Balance => novacron_scheduler::RebalanceMode::Balance,
            RebalanceMode::Consolidate => novacron_scheduler::RebalanceMode::Consolidate,
        },
        max_moves,
    );
    RebalancePlan {
        mode,
        moves: p
            .moves
            .into_iter()
            .map(|m| PlannedMove {
                vm: m.vm,
                from: m.from,
                to: m.to,
                memory_mib: m.memory_mib,
            })
            .collect(),
        imbalance_before: round(p.imbalance_before),
        imbalance_after: round(p.imbalance_after),
        nodes_used_before: p.nodes_used_before,
        nodes_used_after: p.nodes_used_after,
        moved_mib: p.moved_mib,
    }
}
