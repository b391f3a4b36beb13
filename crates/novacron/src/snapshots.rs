//! `novacron vm snapshot ...`: snapshots of a VM's root and data disks,
//! and optionally its memory.

use anyhow::Result;
use clap::Subcommand;
use novacron_api::{CreateSnapshot, Snapshot};

use crate::output::{age, print_data, table, Format};
use crate::Global;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM's root and data disks (a running VM's all at
    /// one instant).
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name, unique within the VM.
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Also save the running guest's RAM and device state (it pauses
        /// meanwhile): reverting resumes it where it was.
        #[arg(long)]
        memory: bool,
    },
    /// List a VM's snapshots (`*` marks the one its disks descend from).
    List {
        /// The VM.
        vm: String,
    },
    /// Revert a stopped VM's disks to a snapshot: what was written since is
    /// discarded; every snapshot stays. A snapshot with memory starts the
    /// VM, which resumes where it was.
    Revert {
        /// The VM.
        vm: String,
        name: String,
    },
    /// Delete a snapshot of a stopped VM (its data is merged into the newer
    /// snapshots and the disks, which read as before).
    Delete {
        /// The VM.
        vm: String,
        name: String,
    },
}

pub async fn vm_snapshot(g: &Global, c: &novacron_client::Client, cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            description,
            memory,
        } => {
            let req = CreateSnapshot {
                name,
                description,
                memory,
            };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let taken: Snapshot = c.post_json(&format!("vms/{vm}/snapshots"), &req).await?;
            snapshots(g.output, &[taken])
        }
        SnapshotCommand::List { vm } => {
            let all: Vec<Snapshot> = c.get_json(&format!("vms/{vm}/snapshots")).await?;
            snapshots(g.output, &all)
        }
        SnapshotCommand::Revert { vm, name } => {
            let reverted: Snapshot = c
                .post_json(&format!("vms/{vm}/snapshots/{name}/revert"), &serde_json::json!({}))
                .await?;
            snapshots(g.output, &[reverted])
        }
        SnapshotCommand::Delete { vm, name } => {
            c.delete_path(&format!("vms/{vm}/snapshots/{name}")).await?;
            println!("snapshot {name:?} of VM {vm:?} deleted");
            Ok(())
        }
    }
}

fn snapshots(format: Format, items: &[Snapshot]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&[
        "NAME",
        "CURRENT",
        "PARENT",
        "DISKS",
        "MEMORY",
        "TAKEN",
        "AGE",
        "DESCRIPTION",
    ]);
    for s in items {
        t.add_row(vec![
            s.name.clone(),
            if s.current { "*".into() } else { String::new() },
            s.parent.clone().unwrap_or_else(|| "-".into()),
            s.disks.join(","),
            match &s.memory {
                Some(m) => format!("{} MiB", m.size_bytes.div_ceil(1 << 20)),
                None => "-".into(),
            },
            match (s.taken_running, s.quiesced) {
                (false, _) => "stopped",
                (true, false) => "running, crash-consistent",
                (true, true) => "running, quiesced",
            }
            .into(),
            age(s.created_at),
            s.description.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
    Ok(())
}
