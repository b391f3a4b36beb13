//! `novacron hollow`: many hollow nodes in one process, for scale tests and
//! benches only (see `novacron_agent::hollow`): no guest runs on them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use novacron_agent::hollow::{self, HollowCluster, HollowNode, SeenLog};
use novacron_api::identity::{CreateToken, IssuedToken};
use novacron_api::Resources;

use crate::commands::client;
use crate::{parse_duration, Global};

#[derive(clap::Args)]
pub struct HollowArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: u32,
    /// Node names are this and a number (`hollow-0000`, ...).
    #[arg(long, default_value = "hollow-")]
    pub prefix: String,
    /// Each node's certificate is kept under here (`DIR/NAME`), so a second
    /// run reuses the nodes instead of joining new ones.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub vcpus: u32,
    /// Memory of each node, in MiB.
    #[arg(long, default_value_t = 262_144)]
    pub memory: u64,
    /// Spread the nodes over this many zones (label `zone=zone-N`); 0: no zone label.
    #[arg(long, default_value_t = 0)]
    pub zones: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Record each VM's arrival at its node here, one JSON line each
    /// (`{"vm","node","seen_unix_ms"}`).
    #[arg(long)]
    pub seen_log: Option<PathBuf>,
    /// Nodes joining or registering at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

/// Joins the nodes that have no certificate yet (with join tokens made with
/// the caller's token), then runs all of them until interrupted.
pub async fn run(g: &Global, a: HollowArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let server = g
        .server
        .clone()
        .context("hollow nodes need the server URL: --server or NOVACRON_SERVER")?;
    let ca_cert = g
        .ca_cert
        .clone()
        .context("hollow nodes join over TLS: give the cluster CA with --ca-cert")?;
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("Cannot create {}", a.data_dir.display()))?;
    let seen = a
        .seen_log
        .as_deref()
        .map(|p| SeenLog::create(p).with_context(|| format!("Cannot create {}", p.display())))
        .transpose()?;
    let cluster = Arc::new(HollowCluster {
        server,
        ca_cert,
        heartbeat: a.heartbeat,
        seen,
    });
    let admin = client(g)?;
    let nodes = (0..a.nodes).map(|i| {
        let name = format!("{}{i:04}", a.prefix);
        let mut labels = BTreeMap::new();
        if a.zones > 0 {
            labels.insert("zone".to_string(), format!("zone-{}", i % a.zones));
        }
        HollowNode {
            data_dir: a.data_dir.join(&name),
            name,
            join_token: None,
            capacity: Resources {
                vcpus: a.vcpus,
                memory_mib: a.memory,
                disk_gib: 0,
            },
            labels,
        }
    });
    let joined = futures::stream::iter(nodes)
        .map(|mut node| {
            let (admin, cluster) = (admin.clone(), cluster.clone());
            async move {
                if !hollow::has_joined(&node) {
                    let issued: IssuedToken = admin
                        .post_json(
                            "tokens",
                            &CreateToken {
                                name: format!("join-{}", node.name),
                                role: "join".into(),
                                project: None,
                                ttl_s: Some(600),
                                join: true,
                            },
                        )
                        .await
                        .with_context(|| format!("Cannot make a join token for {}", node.name))?;
                    node.join_token = Some(issued.secret);
                }
                let client = hollow::join(&cluster, &node)
                    .await
                    .with_context(|| format!("{} cannot join", node.name))?;
                anyhow::Ok((node, client))
            }
        })
        .buffer_unordered(a.concurrency.max(1));
    let mut joined = std::pin::pin!(joined);
    let mut running = tokio::task::JoinSet::new();
    while let Some(next) = joined.next().await {
        let (node, client) = next?;
        running.spawn(hollow::run_hollow(cluster.clone(), node, client));
        let n = running.len();
        if n % 100 == 0 || n == a.nodes as usize {
            eprintln!("{n}/{} hollow nodes started", a.nodes);
        }
    }
    tracing::info!(nodes = a.nodes, "hollow nodes running (no guest runs on them)");
    tokio::select! {
        _ = shutdown => {}
        _ = running.join_next() => anyhow::bail!("a hollow node stopped: its watch ended"),
    }
    running.shutdown().await;
    Ok(())
}
