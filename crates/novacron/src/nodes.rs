//! `novacron node ...`: list, inspect, cordon, drain, delete and revoke nodes.

use anyhow::{bail, Result};
use clap::Subcommand;
use novacron_api::{Node, Vm, VmPhase};
use novacron_client::{Client, Selector};

use crate::commands::{client, list, ListArgs};
use crate::migrations::run_moves;
use crate::output::{self, Format};
use crate::Global;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    List(ListArgs),
    /// Show one node.
    Get { name: String },
    /// Stop placing new VMs on a node.
    Cordon { name: String },
    /// Allow placing VMs on a node again.
    Uncordon { name: String },
    /// Revoke a node's certificates: the server and every agent refuse
    /// them. The node can join again with a new join token.
    Revoke { name: String },
    /// Remove a node without VMs from the cluster (its certificates are revoked).
    Delete { name: String },
    /// Cordon a node and live-migrate every VM off it.
    Drain {
        name: String,
        /// Migrations running at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
    },
}

pub async fn node(g: &Global, cmd: NodeCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        NodeCommand::List(a) => {
            list::<Node>(g, &c, a, output::nodes, |n| {
                format!(
                    "{}  {}",
                    n.metadata.name,
                    if n.status.ready { "Ready" } else { "NotReady" }
                )
            })
            .await
        }
        NodeCommand::Get { name } => output::print_data(
            if g.output == Format::Table {
                Format::Yaml
            } else {
                g.output
            },
            &c.get::<Node>(&name).await?,
        ),
        NodeCommand::Cordon { name } => {
            let n = c.set_schedulable(&name, false).await?;
            println!("node {:?} cordoned", n.metadata.name);
            Ok(())
        }
        NodeCommand::Uncordon { name } => {
            let n = c.set_schedulable(&name, true).await?;
            println!("node {:?} uncordoned", n.metadata.name);
            Ok(())
        }
        NodeCommand::Revoke { name } => crate::pki::revoke_node(g, &name).await,
        NodeCommand::Delete { name } => {
            c.delete::<Node>(&name).await?;
            println!("node {name:?} deleted; its certificates are revoked");
            Ok(())
        }
        NodeCommand::Drain { name, parallel } => drain(&c, &name, parallel.max(1)).await,
    }
}

async fn drain(c: &Client, node: &str, parallel: usize) -> Result<()> {
    c.set_schedulable(node, false).await?;
    println!("node {node:?} cordoned");
    let (vms, _) = c
        .list_all::<Vm>(&Selector::fields(format!("status.node={node}")))
        .await?;
    let mut results: Vec<(String, String)> = Vec::new();
    let mut moves = Vec::new();
    for vm in vms {
        // Running and paused VMs move live, stopped ones cold; others cannot move.
        if matches!(vm.status.phase, VmPhase::Running | VmPhase::Paused | VmPhase::Stopped) {
            moves.push((vm.metadata.name, None));
        } else {
            results.push((vm.metadata.name, format!("not moved: VM is {}", vm.status.phase)));
        }
    }
    results.extend(run_moves(c, moves, parallel).await?);
    let mut failed = 0;
    for (vm, outcome) in &results {
        if outcome.starts_with("not moved") {
            failed += 1;
        }
        println!("{vm}: {outcome}");
    }
    if failed > 0 {
        bail!("{failed} VM(s) could not be moved off {node:?}; they still run there");
    }
    println!("node {node:?} drained");
    Ok(())
}
