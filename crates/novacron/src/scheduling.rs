//! CLI for the scheduler: placement flags of `vm create`, explanations,
//! cluster scheduler settings and rebalancing.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use novacron_api::{
    AffinityRule, AffinityScope, Placement, PlacementExplanation, RebalancePlan, RebalanceRequest, SchedulerConfig,
    SchedulerSettings, SchedulingProfile, ScoreWeights,
};
use novacron_client::Client;

use crate::commands::client;
use crate::output::{self, Format};
use crate::{parse_label, Global};

/// Placement flags of `vm create`.
#[derive(Args, Default)]
pub struct PlacementArgs {
    /// Node label KEY=VALUE the node must have (repeatable).
    #[arg(long = "node-selector", value_parser = parse_label)]
    pub node_selector: Vec<(String, String)>,
    /// Run near VMs with these labels: `app=db`, `app=db@zone` (same zone),
    /// `~app=db` (preferred, not required). Repeatable.
    #[arg(long = "affinity", value_parser = parse_rule)]
    pub affinity: Vec<AffinityRule>,
    /// Stay away from VMs with these labels (same syntax as --affinity).
    #[arg(long = "anti-affinity", value_parser = parse_rule)]
    pub anti_affinity: Vec<AffinityRule>,
    /// Zone (node label topology.novacron.io/zone) to be near.
    #[arg(long)]
    pub zone: Option<String>,
    /// Higher priorities are placed first when VMs wait for room.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Print where the scheduler puts the VM and why, with the runners-up.
    #[arg(long)]
    pub explain: bool,
}

impl PlacementArgs {
    pub fn placement(&self) -> Placement {
        let anti = self.anti_affinity.iter().cloned().map(|mut r| {
            r.anti = true;
            r
        });
        Placement {
            node_selector: self.node_selector.iter().cloned().collect(),
            affinity: self.affinity.iter().cloned().chain(anti).collect(),
            preferred_zone: self.zone.clone(),
            priority: self.priority,
        }
    }
}

fn parse_rule(s: &str) -> Result<AffinityRule, String> {
    let (required, rest) = match s.strip_prefix('~') {
        Some(r) => (false, r),
        None => (true, s),
    };
    let (labels, scope) = match rest.rsplit_once('@') {
        Some((l, "zone")) => (l, AffinityScope::Zone),
        Some((l, "node")) => (l, AffinityScope::Node),
        Some((_, other)) => return Err(format!("scope {other:?} must be node or zone")),
        None => (rest, AffinityScope::Node),
    };
    let selector = labels
        .split(',')
        .map(parse_label)
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
    Ok(AffinityRule {
        selector,
        scope,
        anti: false,
        required,
    })
}

pub fn print_explanation(format: Format, e: &PlacementExplanation) -> Result<()> {
    if format != Format::Table {
        return output::print_data(format, e);
    }
    match &e.node {
        Some(node) => println!(
            "placement: {node}  ({} of {} nodes feasible)",
            e.feasible, e.total_nodes
        ),
        None => println!("placement: none fits ({})", e.summary),
    }
    for r in &e.rejected {
        println!("  {} nodes: {}", r.nodes, r.reason);
    }
    if !e.candidates.is_empty() {
        let mut t = output::table(&["NODE", "SCORE", "PACKING", "COST", "HEADROOM", "LATENCY", "AFFINITY"]);
        for c in &e.candidates {
            t.add_row(vec![
                c.node.clone(),
                format!("{:.3}", c.total),
                format!("{:.3}", c.packing),
                format!("{:.3}", c.cost),
                format!("{:.3}", c.headroom),
                format!("{:.3}", c.latency),
                format!("{:.3}", c.affinity),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

pub async fn explain_vm(c: &Client, format: Format, name: &str) -> Result<()> {
    let e: PlacementExplanation = c.get_json(&format!("vms/{name}/explain")).await?;
    print_explanation(format, &e)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    Binpack,
    Spread,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Balance,
    Consolidate,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show the scheduler settings.
    Scheduler,
    /// Change the scheduler settings (flags not given keep their value).
    SetScheduler {
        #[arg(long, value_enum)]
        profile: Option<ProfileArg>,
        /// vCPUs allocatable per host vCPU, e.g. 4.
        #[arg(long)]
        cpu_overcommit: Option<f64>,
        #[arg(long)]
        memory_overcommit: Option<f64>,
        /// 0 = no limit.
        #[arg(long)]
        max_vms_per_node: Option<u32>,
        /// Objective weights, e.g. packing=1,cost=2,headroom=0,latency=0.5,affinity=0.5
        #[arg(long)]
        weights: Option<String>,
        /// CPU model new VMs get unless they ask for one (a baseline every node offers).
        #[arg(long)]
        cpu_model: Option<String>,
    },
    /// Plan (and with no --dry-run, carry out) live migrations that even out
    /// node use or, with --mode consolidate, empty whole nodes.
    Rebalance {
        #[arg(long, value_enum, default_value_t = ModeArg::Balance)]
        mode: ModeArg,
        #[arg(long, default_value_t = 10)]
        max_moves: usize,
        /// Print the plan and the predicted improvement only.
        #[arg(long)]
        dry_run: bool,
        /// Migrations at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
    },
}

fn parse_weights(s: &str, mut w: ScoreWeights) -> Result<ScoreWeights> {
    for part in s.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            bail!("weight {part:?} must be NAME=NUMBER");
        };
        let v: f64 = v
            .parse()
            .map_err(|_| anyhow::anyhow!("weight {part:?} is not a number"))?;
        match k {
            "packing" => w.packing = v,
            "cost" => w.cost = v,
            "headroom" => w.headroom = v,
            "latency" => w.latency = v,
            "affinity" => w.affinity = v,
            other => bail!("unknown weight {other:?} (packing, cost, headroom, latency, affinity)"),
        }
    }
    Ok(w)
}

fn print_config(format: Format, cfg: &SchedulerConfig) -> Result<()> {
    if format != Format::Table {
        return output::print_data(format, cfg);
    }
    let cfg = &cfg.settings;
    let w = &cfg.weights;
    println!("profile:            {:?}", cfg.profile);
    println!("cpu overcommit:     {}", cfg.cpu_overcommit);
    println!("memory overcommit:  {}", cfg.memory_overcommit);
    println!(
        "max VMs per node:   {}",
        cfg.max_vms_per_node
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "weights:            packing={} cost={} headroom={} latency={} affinity={}",
        w.packing, w.cost, w.headroom, w.latency, w.affinity
    );
    println!("default CPU model:  {}", cfg.default_cpu_model);
    Ok(())
}

fn print_plan(format: Format, plan: &RebalancePlan) -> Result<()> {
    if format != Format::Table {
        return output::print_data(format, plan);
    }
    let mut t = output::table(&["VM", "FROM", "TO", "MEMORY"]);
    for m in &plan.moves {
        t.add_row(vec![
            m.vm.clone(),
            m.from.clone(),
            m.to.clone(),
            novacron_api::units::format_mib(m.memory_mib),
        ]);
    }
    if !plan.moves.is_empty() {
        println!("{t}");
    }
    println!(
        "{} moves, {} to copy; imbalance {:.3} -> {:.3}; nodes used {} -> {}",
        plan.moves.len(),
        novacron_api::units::format_mib(plan.moved_mib),
        plan.imbalance_before,
        plan.imbalance_after,
        plan.nodes_used_before,
        plan.nodes_used_after
    );
    Ok(())
}

pub async fn cluster(g: &Global, cmd: ClusterCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        ClusterCommand::Scheduler => print_config(g.output, &c.get_json("scheduler").await?),
        ClusterCommand::SetScheduler {
            profile,
            cpu_overcommit,
            memory_overcommit,
            max_vms_per_node,
            weights,
            cpu_model,
        } => {
            let cur: SchedulerConfig = c.get_json("scheduler").await?;
            let update = SchedulerSettings {
                profile: match profile {
                    Some(ProfileArg::Binpack) => SchedulingProfile::Binpack,
                    Some(ProfileArg::Spread) => SchedulingProfile::Spread,
                    None => cur.settings.profile,
                },
                cpu_overcommit: cpu_overcommit.unwrap_or(cur.settings.cpu_overcommit),
                memory_overcommit: memory_overcommit.unwrap_or(cur.settings.memory_overcommit),
                max_vms_per_node: match max_vms_per_node {
                    Some(0) => None,
                    Some(n) => Some(n),
                    None => cur.settings.max_vms_per_node,
                },
                weights: match weights {
                    Some(w) => parse_weights(&w, cur.settings.weights)?,
                    None => cur.settings.weights,
                },
                zone_latency_ms: cur.settings.zone_latency_ms,
                default_zone_latency_ms: cur.settings.default_zone_latency_ms,
                default_cpu_model: cpu_model.unwrap_or(cur.settings.default_cpu_model),
            };
            let cfg: SchedulerConfig = c.put_json("scheduler", &update).await?;
            print_config(g.output, &cfg)
        }
        ClusterCommand::Rebalance {
            mode,
            max_moves,
            dry_run,
            parallel,
        } => {
            let plan: RebalancePlan = c
                .post_json(
                    "scheduler/rebalance",
                    &RebalanceRequest {
                        mode: match mode {
                            ModeArg::Balance => novacron_api::RebalanceMode::Balance,
                            ModeArg::Consolidate => novacron_api::RebalanceMode::Consolidate,
                        },
                        max_moves: Some(max_moves),
                    },
                )
                .await?;
            print_plan(g.output, &plan)?;
            if dry_run || plan.moves.is_empty() {
                return Ok(());
            }
            let moves = plan.moves.iter().map(|m| (m.vm.clone(), Some(m.to.clone()))).collect();
            let results = crate::migrations::run_moves(&c, moves, parallel).await?;
            let failed = results.iter().filter(|(_, o)| o.starts_with("not moved")).count();
            for (vm, outcome) in &results {
                println!("{vm}: {outcome}");
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} moves failed; those VMs still run where they were",
                    results.len()
                );
            }
            Ok(())
        }
    }
}
