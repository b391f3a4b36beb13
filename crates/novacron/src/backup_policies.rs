//! `novacron backup-policy ...`: scheduled backups of the VMs a label
//! selector picks, pruned to keep rules after each run.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use novacron_api::backup::KeepRules;
use novacron_api::backup_policy::PolicyRun;
use novacron_api::{BackupPolicy, BackupPolicySpec, CreateBackupPolicy};

use crate::commands::client;
use crate::output::{age, print_data, table, Format};
use crate::Global;

#[derive(Subcommand)]
pub enum BackupPolicyCommand {
    /// Back up a project's VMs on a schedule.
    Create {
        name: String,
        /// Project (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Replace a policy's settings (every one of them: flags not given
    /// take their defaults).
    Update {
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List the policies with their next and last runs.
    List,
    /// Show a policy and what its last run did.
    Get { name: String },
    /// Delete a policy (its backups stay).
    Delete { name: String },
    /// Run a policy now (also while suspended).
    Run {
        name: String,
        /// Wait for the run to finish and show what it did; fails if any
        /// VM was not backed up.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args)]
pub struct SpecArgs {
    /// When, as a cron expression in UTC: "MIN HOUR DAY MONTH WEEKDAY"
    /// (e.g. "0 2 * * *" for 02:00 daily), six fields with seconds
    /// first, or @hourly/@daily/@weekly/@monthly/@yearly.
    #[arg(long)]
    schedule: String,
    /// The store (default: local).
    #[arg(long)]
    store: Option<String>,
    /// The project's VMs to back up, by label (`k=v,k2!=v2`); default: all.
    #[arg(long, default_value = "")]
    selector: String,
    /// What each run's prune keeps (none: every backup is kept).
    #[command(flatten)]
    keep: crate::backups::KeepArgs,
    /// No scheduled runs (a run by hand still happens).
    #[arg(long)]
    suspended: bool,
}

impl SpecArgs {
    fn spec(self) -> Result<BackupPolicySpec> {
        let keep = self.keep.rules();
        let spec = BackupPolicySpec {
            schedule: self.schedule,
            store: self.store,
            selector: self.selector,
            keep: (keep != KeepRules::default()).then_some(keep),
            suspended: self.suspended,
        };
        spec.validate()
            .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
        Ok(spec)
    }
}

pub async fn backup_policy(g: &Global, cmd: BackupPolicyCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        BackupPolicyCommand::Create { name, project, spec } => {
            let req = CreateBackupPolicy {
                name,
                project,
                labels: Default::default(),
                spec: spec.spec()?,
            };
            let p: BackupPolicy = c.post_json("backup-policies", &req).await?;
            policies(g.output, &[p])
        }
        BackupPolicyCommand::Update { name, spec } => {
            let p: BackupPolicy = c.put_json(&format!("backup-policies/{name}"), &spec.spec()?).await?;
            policies(g.output, &[p])
        }
        BackupPolicyCommand::List => {
            let (all, _) = c.list_all::<BackupPolicy>(&Default::default()).await?;
            policies(g.output, &all)
        }
        BackupPolicyCommand::Get { name } => {
            let p: BackupPolicy = c.get(&name).await?;
            if g.output != Format::Table {
                return print_data(g.output, &p);
            }
            policies(g.output, std::slice::from_ref(&p))?;
            if let Some(run) = p.status.running.as_ref().or(p.status.last_run.as_ref()) {
                show_run(run);
            }
            Ok(())
        }
        BackupPolicyCommand::Delete { name } => {
            c.delete::<BackupPolicy>(&name).await?;
            println!("backup policy {name:?} deleted (its backups stay)");
            Ok(())
        }
        BackupPolicyCommand::Run { name, wait } => {
            let p: BackupPolicy = c
                .post_json(&format!("backup-policies/{name}/run"), &serde_json::json!({}))
                .await?;
            let Some(started) = p.status.running.map(|r| r.started) else {
                bail!("The server did not say when the run began");
            };
            if !wait {
                println!("backup policy {name:?} is running: see `novacron backup-policy get {name}`");
                return Ok(());
            }
            let run = loop {
                let p: BackupPolicy = c.get(&name).await?;
                match p.status.last_run {
                    Some(run) if run.started == started => break run,
                    _ => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            };
            if g.output != Format::Table {
                print_data(g.output, &run)?;
            } else {
                show_run(&run);
            }
            if !run.ok {
                bail!("backup policy {name:?}: not every VM was backed up");
            }
            Ok(())
        }
    }
}

fn show_run(run: &PolicyRun) {
    let state = match (run.finished, run.ok) {
        (None, _) => "running".to_string(),
        (Some(_), true) => "ok".into(),
        (Some(_), false) => "FAILED".into(),
    };
    println!(
        "run begun {} ago{}: {state}",
        age(run.started),
        if run.by_hand { " (by hand)" } else { "" }
    );
    let mut t = table(&["VM", "BACKUP", "KIND / ERROR"]);
    for v in &run.vms {
        let what = match (&v.error, &v.full_reason) {
            (Some(e), _) => e.clone(),
            (None, Some(why)) => format!("full: {why}"),
            (None, None) => "incremental".into(),
        };
        t.add_row(vec![v.vm.clone(), v.backup.clone().unwrap_or_else(|| "-".into()), what]);
    }
    println!("{t}");
    for id in &run.pruned {
        println!("pruned {id}");
    }
}

fn policies(format: Format, items: &[BackupPolicy]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&[
        "NAME", "PROJECT", "SCHEDULE", "STORE", "SELECTOR", "NEXT RUN", "LAST RUN",
    ]);
    for p in items {
        let next = match (p.spec.suspended, p.status.next_run) {
            (true, _) => "suspended".to_string(),
            (false, Some(t)) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
            (false, None) => "-".into(),
        };
        let last = match (&p.status.running, &p.status.last_run) {
            (Some(_), _) => "running".to_string(),
            (None, Some(r)) => format!("{} {} ago", if r.ok { "ok" } else { "FAILED" }, age(r.started)),
            (None, None) => "-".into(),
        };
        t.add_row(vec![
            p.metadata.name.clone(),
            p.metadata.project.clone(),
            p.spec.schedule.clone(),
            p.spec.store().to_string(),
            p.spec.selector.clone(),
            next,
            last,
        ]);
    }
    println!("{t}");
    Ok(())
}
