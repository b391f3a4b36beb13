//! `novacron vm migrate` and `novacron migration ...`: moving VMs between
//! nodes, one at a time or several (drain, rebalance).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::{Migration, MigrationPhase, MigrationStrategy};
use novacron_client::{watcher, Client};

use crate::commands::{client, list, ListArgs};
use crate::output;
use crate::{parse_mib, Global};

#[derive(Args)]
pub struct MigrateArgs {
    pub name: String,
    /// Target node (default: chosen by the scheduler).
    #[arg(long = "to")]
    pub to: Option<String>,
    #[arg(long, value_enum, default_value_t = MigrateStrategy::Auto)]
    pub strategy: MigrateStrategy,
    /// Longest acceptable guest pause at switchover, e.g. 300ms.
    #[arg(long, value_parser = crate::parse_duration)]
    pub max_downtime: Option<Duration>,
    /// Bandwidth cap for memory, e.g. 200MiB/s.
    #[arg(long, value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// Follow the migration with a progress bar; non-zero exit if it fails.
    #[arg(long)]
    pub wait: bool,
    /// What carries the streams: dwcp (NovaCron's WAN data plane), qemu
    /// (QEMU's single stream) or qemu-multifd (QEMU multifd + zstd).
    #[arg(long, value_enum, default_value_t = MigrateTransport::Dwcp)]
    pub transport: MigrateTransport,
    /// Measure and predict (time, downtime, bytes, strategy); move nothing.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MigrateTransport {
    Dwcp,
    Qemu,
    QemuMultifd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MigrateStrategy {
    Precopy,
    AutoConverge,
    Postcopy,
    Auto,
}

/// `200MiB/s` (or `200MiB`, `1GiB/s`) → MiB/s.
fn parse_bandwidth(s: &str) -> Result<u64, String> {
    parse_mib(s.trim_end_matches("/s"))
}

#[derive(Subcommand)]
pub enum MigrationCommand {
    /// List migrations.
    List(ListArgs),
    /// Show one migration.
    Get { name: String },
    /// Cancel a migration in progress (the VM stays on its source).
    Cancel { name: String },
}

pub async fn migrate(g: &Global, c: &Client, a: MigrateArgs) -> Result<()> {
    let req = novacron_api::CreateMigration {
        vm: a.name.clone(),
        target_node: a.to,
        strategy: match a.strategy {
            MigrateStrategy::Precopy => MigrationStrategy::Precopy,
            MigrateStrategy::AutoConverge => MigrationStrategy::AutoConverge,
            MigrateStrategy::Postcopy => MigrationStrategy::Postcopy,
            MigrateStrategy::Auto => MigrationStrategy::Auto,
        },
        max_downtime_ms: a.max_downtime.map(|d| d.as_millis() as u64),
        bandwidth_mib_s: a.bandwidth,
        transport: Some(match a.transport {
            MigrateTransport::Dwcp => novacron_api::MigrationTransport::Dwcp,
            MigrateTransport::Qemu => novacron_api::MigrationTransport::Qemu,
            MigrateTransport::QemuMultifd => novacron_api::MigrationTransport::QemuMultifd,
        }),
    };
    if a.dry_run {
        let spinner = ProgressBar::new_spinner();
        spinner.set_message("measuring link, guest memory and dirty rate");
        spinner.enable_steady_tick(Duration::from_millis(120));
        let plan = c.plan_migration(&req).await;
        spinner.finish_and_clear();
        return output::migration_plan(g.output, &plan?);
    }
    let m = c.create_migration(&req).await?;
    if !a.wait {
        return output::migration(g.output, &m);
    }
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>15} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let name = m.metadata.name.clone();
    let mut changes = std::pin::pin!(watcher::watch_object::<Migration>(c.clone(), &name));
    let done = loop {
        let m = match changes.next().await {
            Some(Some(m)) => m,
            Some(None) => bail!("Migration {name} was deleted"),
            None => bail!("Watch of migration {name} ended"),
        };
        let p = &m.status.progress;
        let disk_phase = p.total_bytes == 0 && p.disk_total_bytes > 0;
        let fraction = if disk_phase {
            p.disk_transferred_bytes as f64 / p.disk_total_bytes.max(1) as f64 * 0.3
        } else if m.status.phase == MigrationPhase::Transferring && p.total_bytes > 0 {
            0.3 + p.percent / 100.0 * 0.7
        } else if m.status.phase.is_final() || m.status.phase == MigrationPhase::Switchover {
            1.0
        } else {
            0.0
        };
        bar.set_position((fraction * 1000.0) as u64);
        bar.set_prefix(format!("{}", m.status.phase));
        let eta = p.eta_s.map(|e| format!(" ETA {e:.0}s")).unwrap_or_default();
        let what = if disk_phase { "disks" } else { "memory" };
        bar.set_message(format!(
            "{what} {}/s{eta} -> {}",
            output::human_bytes(p.throughput_bytes_s),
            m.status.target_node
        ));
        if m.status.phase.is_final() {
            break m;
        }
    };
    bar.finish_and_clear();
    output::migration(g.output, &done)?;
    match done.status.phase {
        MigrationPhase::Completed => Ok(()),
        phase => bail!("Migration {name} {phase}: {}", done.status.error.unwrap_or_default()),
    }
}

pub async fn migration(g: &Global, cmd: MigrationCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        MigrationCommand::List(a) => {
            list::<Migration>(g, &c, a, output::migrations, |m| {
                format!(
                    "{}  {}  {}%",
                    m.metadata.name, m.status.phase, m.status.progress.percent as u32
                )
            })
            .await
        }
        MigrationCommand::Get { name } => output::migration(g.output, &c.get::<Migration>(&name).await?),
        MigrationCommand::Cancel { name } => {
            let m = c.cancel_migration(&name).await?;
            println!("migration {:?} cancel requested", m.metadata.name);
            Ok(())
        }
    }
}

/// Runs live (or, for stopped VMs, cold) migrations, at most `parallel` at a
/// time; `None` as the target lets the scheduler choose. Returns each VM's
/// outcome ("moved to X" or "not moved: why").
pub async fn run_moves(
    c: &Client,
    moves: Vec<(String, Option<String>)>,
    parallel: usize,
) -> Result<Vec<(String, String)>> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (name, target_node) in moves {
        let (c, slots) = (c.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let outcome = move_one(&c, &name, target_node).await;
            (name, outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        results.push(done?);
    }
    Ok(results)
}

/// Migrates one VM and follows the migration to its end.
async fn move_one(c: &Client, name: &str, target_node: Option<String>) -> String {
    let req = novacron_api::CreateMigration {
        vm: name.to_string(),
        target_node,
        strategy: MigrationStrategy::Auto,
        max_downtime_ms: None,
        bandwidth_mib_s: None,
        transport: None,
    };
    let m = match c.create_migration(&req).await {
        Ok(m) => m,
        Err(e) => return format!("not moved: {e}"),
    };
    println!("migrating {name} to {} ({})", m.status.target_node, m.metadata.name);
    let mut changes = std::pin::pin!(watcher::watch_object::<Migration>(c.clone(), &m.metadata.name));
    while let Some(state) = changes.next().await {
        let Some(m) = state else {
            return "not moved: the migration was deleted".to_string();
        };
        match m.status.phase {
            MigrationPhase::Completed => return format!("moved to {}", m.status.target_node),
            p if p.is_final() => return format!("not moved: migration {p}: {}", m.status.error.unwrap_or_default()),
            _ => {}
        }
    }
    "not moved: the watch ended".to_string()
}
