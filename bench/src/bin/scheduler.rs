//! Scheduler benchmark (`bash bench/scheduler.sh`, pinned to one core):
//! 10,000 nodes (64 vCPU, 256 GiB, ten zones) and 100,000 VMs of mixed cloud
//! flavours arriving in random order; 5% of the VMs are in groups of three
//! with required node anti-affinity, 20% prefer a zone.
//! - placement: VMs/s and per-decision latency (place + commit) with the
//!   binpack profile;
//! - packing: nodes used vs the lower bound max over resources of
//!   ceil(total demand / node capacity), and vs first-fit-decreasing (offline,
//!   sorted by size, the classic baseline);
//! - rebalancer: after 40% of the VMs are deleted at random, the balance
//!   plan's imbalance before/after and moves used.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use novacron_scheduler::{
    AffinityTerm, Cluster, NodeInfo, Profile, RebalanceMode, Request, Scope, Settings, Weights, ZONE_LABEL,
};

const NODES: usize = 10_000;
const VMS: usize = 100_000;
const NODE_VCPUS: u64 = 64;
const NODE_MIB: u64 = 256 * 1024;
const ZONES: usize = 10;
const REBALANCE_MOVES: usize = 1000;

/// Deterministic pseudo-random numbers (splitmix64), so every run places the same VMs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// (vCPU, GiB, relative frequency): small flavours are the most common.
const FLAVOURS: [(u64, u64, u64); 8] = [
    (1, 2, 20),
    (2, 4, 20),
    (2, 8, 15),
    (4, 8, 15),
    (4, 16, 12),
    (8, 16, 8),
    (8, 32, 6),
    (16, 64, 4),
];

fn requests(rng: &mut Rng) -> Vec<(String, Request)> {
    let total: u64 = FLAVOURS.iter().map(|f| f.2).sum();
    let mut out = Vec::with_capacity(VMS);
    let mut group = 0;
    for i in 0..VMS {
        let mut pick = rng.below(total);
        let &(vcpus, gib, _) = FLAVOURS
            .iter()
            .find(|f| {
                if pick < f.2 {
                    true
                } else {
                    pick -= f.2;
                    false
                }
            })
            .unwrap_or(&FLAVOURS[0]);
        let mut req = Request::new(vcpus, gib * 1024);
        let roll = rng.below(100);
        if roll < 5 {
            // Groups of three that must not share a node.
            if i % 3 == 0 {
                group += 1;
            }
            let label = BTreeMap::from([("group".to_string(), format!("g{group}"))]);
            req.labels = label.clone();
            req.affinity = vec![AffinityTerm {
                selector: label,
                scope: Scope::Node,
                anti: true,
                required: true,
            }];
        } else if roll < 25 {
            req.preferred_zone = Some(format!("z{}", rng.below(ZONES as u64)));
        }
        out.push((format!("vm{i}"), req));
    }
    out
}

fn nodes() -> Vec<NodeInfo> {
    (0..NODES)
        .map(|i| {
            let mut n = NodeInfo::new(&format!("n{i:05}"), NODE_VCPUS, NODE_MIB);
            n.labels.insert(ZONE_LABEL.into(), format!("z{}", i % ZONES));
            n
        })
        .collect()
}

fn settings() -> Settings {
    Settings {
        profile: Profile::Binpack,
        weights: Weights {
            packing: 1.0,
            cost: 0.0,
            headroom: 0.0,
            latency: 0.1,
            affinity: 0.0,
        },
        ..Default::default()
    }
}

/// Offline first-fit-decreasing: VMs sorted by their largest share of a
/// node, each into the first node it fits (capacity and anti-affinity).
fn first_fit_decreasing(reqs: &[(String, Request)]) -> usize {
    let mut order: Vec<&(String, Request)> = reqs.iter().collect();
    let share = |r: &Request| (r.vcpus as f64 / NODE_VCPUS as f64).max(r.memory_mib as f64 / NODE_MIB as f64);
    order.sort_by(|a, b| share(&b.1).total_cmp(&share(&a.1)).then_with(|| a.0.cmp(&b.0)));
    let mut used: Vec<(u64, u64, Vec<String>)> = Vec::new();
    for (_, r) in order {
        let group = r.labels.get("group");
        let slot = used.iter().position(|(c, m, groups)| {
            c + r.vcpus <= NODE_VCPUS && m + r.memory_mib <= NODE_MIB && group.is_none_or(|g| !groups.contains(g))
        });
        let i = match slot {
            Some(i) => i,
            None => {
                used.push((0, 0, Vec::new()));
                used.len() - 1
            }
        };
        used[i].0 += r.vcpus;
        used[i].1 += r.memory_mib;
        if let Some(g) = group {
            used[i].2.push(g.clone());
        }
    }
    used.len()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let mut rng = Rng(0x5EED);
    let reqs = requests(&mut rng);

    // Online placement in arrival order.
    let mut cluster = Cluster::new(nodes(), settings());
    let mut lat_us = Vec::with_capacity(VMS);
    let mut unplaced = 0;
    let start = Instant::now();
    for (name, req) in &reqs {
        let t = Instant::now();
        match cluster.place(req) {
            Ok(d) => cluster.commit(name, d.index, req.clone()),
            Err(_) => unplaced += 1,
        }
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let placements_per_s = VMS as f64 / elapsed;
    lat_us.sort_by(f64::total_cmp);
    let p50 = percentile(&lat_us, 0.50);
    let p99 = percentile(&lat_us, 0.99);
    let nodes_used = cluster.nodes_used();
    let cpu_demand: u64 = reqs.iter().map(|(_, r)| r.vcpus).sum();
    let mem_demand: u64 = reqs.iter().map(|(_, r)| r.memory_mib).sum();
    let lb_cpu = cpu_demand.div_ceil(NODE_VCPUS) as usize;
    let lb_mem = mem_demand.div_ceil(NODE_MIB) as usize;
    let lower_bound = lb_cpu.max(lb_mem);
    let ffd = first_fit_decreasing(&reqs);
    eprintln!("placed {VMS} VMs in {elapsed:.1}s; nodes used {nodes_used} (lower bound {lower_bound}, FFD {ffd})");

    // Rebalancer: delete 40% of the VMs at random, then plan.
    let mut churned = Cluster::new(nodes(), settings());
    for vm in &cluster.vms {
        if rng.below(100) >= 40 {
            churned.commit(&vm.name, vm.node, vm.request.clone());
        }
    }
    let t = Instant::now();
    let plan = churned.rebalance(RebalanceMode::Balance, REBALANCE_MOVES);
    let rebalance_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let consolidate = churned.rebalance(RebalanceMode::Consolidate, REBALANCE_MOVES);
    let consolidate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "balance: {} moves, imbalance {:.4} -> {:.4} in {rebalance_s:.1}s; consolidate: {} moves, nodes {} -> {}",
        plan.moves.len(),
        plan.imbalance_before,
        plan.imbalance_after,
        consolidate.moves.len(),
        consolidate.nodes_used_before,
        consolidate.nodes_used_after
    );

    let ratio = nodes_used as f64 / lower_bound as f64;
    let json = serde_json::json!({
        "nodes": NODES,
        "vms": VMS,
        "unplaced": unplaced,
        "placements_per_s": placements_per_s.round(),
        "p50_decision_us": (p50 * 10.0).round() / 10.0,
        "p99_decision_us": (p99 * 10.0).round() / 10.0,
        "nodes_used": nodes_used,
        "lower_bound": lower_bound,
        "lower_bound_cpu": lb_cpu,
        "lower_bound_memory": lb_mem,
        "nodes_used_vs_lower_bound": (ratio * 1000.0).round() / 1000.0,
        "ffd_nodes_used": ffd,
        "ffd_vs_lower_bound": ((ffd as f64 / lower_bound as f64) * 1000.0).round() / 1000.0,
        "imbalance_before": (plan.imbalance_before * 10000.0).round() / 10000.0,
        "imbalance_after": (plan.imbalance_after * 10000.0).round() / 10000.0,
        "moves": plan.moves.len(),
        "moves_budget": REBALANCE_MOVES,
        "moved_mib": plan.moved_mib,
        "rebalance_plan_s": (rebalance_s * 100.0).round() / 100.0,
        "consolidate_moves": consolidate.moves.len(),
        "consolidate_nodes_before": consolidate.nodes_used_before,
        "consolidate_nodes_after": consolidate.nodes_used_after,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("scheduler.json"), serde_json::to_string_pretty(&json)? + "\n")?;

    let mut md = String::new();
    writeln!(md, "# Scheduler benchmark\n")?;
    writeln!(
        md,
        "Command: `bash bench/scheduler.sh` (release build, pinned to one core with taskset). Generated {}.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )?;
    writeln!(
        md,
        "{NODES} nodes (64 vCPU, 256 GiB, {ZONES} zones), {VMS} VMs of 8 cloud flavours (1 vCPU/2 GiB to 16 vCPU/64 GiB, small ones most common) in random arrival order; 5% in groups of three with required node anti-affinity, 20% preferring a zone. Binpack profile, no overcommit. Each decision runs every node through the filters and scores the feasible ones (no sampling).\n"
    )?;
    writeln!(md, "| placement | value |\n|---|---|")?;
    writeln!(
        md,
        "| placements/s (place + commit, one core) | {placements_per_s:.0} |"
    )?;
    writeln!(md, "| decision latency p50 / p99 | {p50:.0} µs / {p99:.0} µs |")?;
    writeln!(md, "| VMs left unplaced | {unplaced} |")?;
    writeln!(md, "\n| packing | nodes used | vs lower bound |\n|---|---|---|")?;
    writeln!(
        md,
        "| lower bound: max(ceil(vCPU demand / 64) = {lb_cpu}, ceil(memory demand / 256 GiB) = {lb_mem}) | {lower_bound} | 1.000 |"
    )?;
    writeln!(
        md,
        "| NovaCron binpack, online (arrival order) | {nodes_used} | {ratio:.3} |"
    )?;
    writeln!(
        md,
        "| first-fit-decreasing, offline (sorted, baseline) | {ffd} | {:.3} |",
        ffd as f64 / lower_bound as f64
    )?;
    writeln!(
        md,
        "\n| rebalancer (after deleting 40% of the VMs at random) | value |\n|---|---|"
    )?;
    writeln!(
        md,
        "| balance: imbalance (std. dev. of node utilisation) before → after | {:.4} → {:.4} |",
        plan.imbalance_before, plan.imbalance_after
    )?;
    writeln!(
        md,
        "| balance: moves used (budget {REBALANCE_MOVES}), memory copied | {}, {} GiB |",
        plan.moves.len(),
        plan.moved_mib / 1024
    )?;
    writeln!(md, "| balance: planning time | {rebalance_s:.1} s |")?;
    writeln!(
        md,
        "| consolidate: nodes used before → after ({} moves) | {} → {} ({consolidate_s:.1} s) |",
        consolidate.moves.len(),
        consolidate.nodes_used_before,
        consolidate.nodes_used_after
    )?;
    std::fs::write(dir.join("scheduler.md"), &md)?;
    print!("{md}");
    Ok(())
}
