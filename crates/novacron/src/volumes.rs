//! `novacron volume ...` and `novacron vm volume ...`: volumes and their
//! attachments.

use anyhow::Result;
use clap::Subcommand;
use novacron_api::units::format_mib;
use novacron_api::volume::{settled, VOLUME_CHANGE_FAILED};
use novacron_api::{AttachVolume, CreateVolume, ResizeVolume, Vm, Volume};

use crate::commands::{client, list, ListArgs};
use crate::output::{age, print_data, table, Format};
use crate::{parse_label, parse_mib, Global};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a blank volume; its disk is made on the node of the first VM
    /// it is attached to.
    Create {
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long, value_parser = parse_mib)]
        size: u64,
        /// Project (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List volumes.
    List(ListArgs),
    /// Show a volume.
    Get { name: String },
    /// Delete a detached volume and its data.
    Delete { name: String },
    /// Grow a volume; attached to a running VM, the guest sees it at once.
    Resize {
        name: String,
        /// The new size, larger than the current one.
        #[arg(long, value_parser = parse_mib)]
        size: u64,
    },
}

#[derive(Subcommand)]
pub enum VmVolumeCommand {
    /// Attach a volume; a running VM gets it hot-plugged
    /// (`/dev/disk/by-id/virtio-<first 20 characters of the volume id>`).
    Attach {
        /// The VM.
        name: String,
        volume: String,
        /// Wait until the VM's agent has the volume in place (plugged if it runs).
        #[arg(long)]
        wait: bool,
    },
    /// Detach a volume; a running VM's guest is asked to release it first.
    Detach {
        /// The VM.
        name: String,
        volume: String,
        /// Wait until the guest has let it go.
        #[arg(long)]
        wait: bool,
    },
}

/// How long `vm volume attach|detach --wait` waits for the agent and guest.
const VOLUME_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn volume(g: &Global, cmd: VolumeCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            project,
            labels,
        } => {
            let req = CreateVolume {
                name,
                project,
                labels: labels.into_iter().collect(),
                size_mib: size,
            };
            novacron_api::volume::size("size", req.size_mib).map_err(|e| anyhow::anyhow!(e.message))?;
            let vol: Volume = c.post_json("volumes", &req).await?;
            volumes(g.output, &[vol])
        }
        VolumeCommand::List(a) => list::<Volume>(g, &c, a, volumes, |x| x.metadata.name.clone()).await,
        VolumeCommand::Get { name } => volumes(g.output, &[c.get::<Volume>(&name).await?]),
        VolumeCommand::Delete { name } => {
            c.delete::<Volume>(&name).await?;
            println!("volume {name:?} deleted");
            Ok(())
        }
        VolumeCommand::Resize { name, size } => {
            let vol: Volume = c
                .post_json(&format!("volumes/{name}/resize"), &ResizeVolume { size_mib: size })
                .await?;
            volumes(g.output, &[vol])
        }
    }
}

pub async fn vm_volume(g: &Global, c: &novacron_client::Client, cmd: VmVolumeCommand) -> Result<()> {
    let (name, wait, vm) = match cmd {
        VmVolumeCommand::Attach { name, volume, wait } => {
            let vm: Vm = c
                .post_json(&format!("vms/{name}/volumes"), &AttachVolume { volume })
                .await?;
            (name, wait, vm)
        }
        VmVolumeCommand::Detach { name, volume, wait } => {
            let vm: Vm = c.delete_json(&format!("vms/{name}/volumes/{volume}")).await?;
            (name, wait, vm)
        }
    };
    let vm = if wait && vm.status.node.is_some() {
        wait_settled(c, &name, vm.metadata.generation).await?
    } else {
        vm
    };
    crate::output::vm(g.output, &vm)
}

/// Waits until the VM's agent holds exactly the volumes of its spec (as of
/// `generation`), at their sizes, plugged if it runs.
pub async fn wait_settled(c: &novacron_client::Client, name: &str, generation: u64) -> Result<Vm> {
    let change = crate::wait::VmChange {
        generation,
        timeout: VOLUME_WAIT,
        pending: "is still attaching or detaching volumes",
        failed: VOLUME_CHANGE_FAILED,
    };
    change
        .wait(c, name, |vm| {
            let running = vm.status.qemu_pid.is_some();
            settled(&vm.spec.volumes, &vm.status.volumes) && vm.status.volumes.iter().all(|v| v.plugged == running)
        })
        .await
}

fn volumes(format: Format, items: &[Volume]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["NAME", "PROJECT", "SIZE", "PHASE", "VM", "NODE", "AGE"]);
    for x in items {
        t.add_row(vec![
            x.metadata.name.clone(),
            x.metadata.project.clone(),
            format_mib(x.spec.size_mib),
            format!("{:?}", x.status.phase),
            x.status.vm.clone().unwrap_or_else(|| "-".into()),
            x.status.node.clone().unwrap_or_else(|| "-".into()),
            age(x.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}
