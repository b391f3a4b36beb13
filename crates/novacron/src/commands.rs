//! Client commands: thin wrappers over the typed API client.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::{CreateVm, PowerState, RunStrategy, StopVm, Vm, VmPhase, VmSpec};
use novacron_client::{watcher, Client, Resource, Selector};

use crate::output::{self, Format};
use crate::{config, parse_label, parse_mib, Global};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM (and start it, unless --no-start).
    Create(Box<CreateArgs>),
    /// List VMs.
    List(ListArgs),
    /// Show one VM.
    Get { name: String },
    /// Start a VM.
    Start(ActionArgs),
    /// Stop a VM: ACPI shutdown, forced off after the timeout.
    Stop {
        #[command(flatten)]
        action: ActionArgs,
        /// Kill at once instead of an ACPI shutdown.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to shut down.
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Reset a running VM.
    Reboot(ActionArgs),
    /// Pause a VM's vCPUs.
    Pause(ActionArgs),
    /// Resume a paused VM.
    Resume(ActionArgs),
    /// Delete a VM with its disks.
    Delete {
        #[command(flatten)]
        action: ActionArgs,
        /// Remove the record even if the node cannot clean up.
        #[arg(long)]
        force: bool,
    },
    /// Live-migrate a running VM to another node (disks move with it).
    Migrate(crate::migrations::MigrateArgs),
    /// Attach to the serial console (detach with Ctrl-]).
    Console { name: String },
    /// Why the VM runs where it does, or why it is still pending.
    Explain { name: String },
    /// Add or remove a NIC (hot-plugged while the VM runs).
    #[command(subcommand)]
    Nic(crate::networks::NicCommand),
    /// Attach or detach a volume (hot-plugged while the VM runs).
    #[command(subcommand)]
    Volume(crate::volumes::VmVolumeCommand),
    /// Take, list, revert and delete snapshots of a VM's disks.
    #[command(subcommand)]
    Snapshot(crate::snapshots::SnapshotCommand),
    /// Give a stopped VM a fresh root disk from its image (or --image) at its
    /// next start; cloud-init options replace its cloud-init settings. Data
    /// disk, volumes, NICs and addresses stay.
    Rebuild {
        name: String,
        /// Rebuild from this image instead.
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        cloud_init: CloudInitArgs,
    },
    /// Make a template image of a stopped VM (its root disk, flattened, with
    /// its hardware and cloud-init settings); the VM stays, stopped.
    Template {
        name: String,
        /// Name of the template image (default: the VM's name).
        #[arg(long)]
        image: Option<String>,
    },
    /// Create a VM from a template: a linked clone (an overlay on the
    /// template, the default) or a full clone (an independent copy).
    Clone {
        template: String,
        name: String,
        /// An overlay on the template (instant; the template cannot be deleted while it is used).
        #[arg(long, conflicts_with = "full")]
        linked: bool,
        /// An independent copy of the template's disk.
        #[arg(long)]
        full: bool,
        /// Override the template's memory, e.g. 1GiB.
        #[arg(long, value_parser = parse_mib)]
        memory: Option<u64>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Start QEMU with the vCPUs paused (`vm resume` runs the guest).
        #[arg(long)]
        paused: bool,
        /// Wait until the VM is Running (Paused with --paused).
        #[arg(long)]
        wait: bool,
    },
    /// Run a command in the guest through its QEMU guest agent; prints its
    /// output and exits with its exit status.
    Exec {
        name: String,
        /// Seconds the command may run (at most 600).
        #[arg(long, default_value_t = novacron_api::DEFAULT_EXEC_TIMEOUT_S)]
        timeout: u32,
        /// Program and arguments, after `--` (no shell: use `sh -c '...'`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the serial console log.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long)]
    pub image: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory, e.g. 256MiB or 1GiB.
    #[arg(long, default_value = "256MiB", value_parser = parse_mib)]
    pub memory: u64,
    /// Root disk size (default: the image's size; 1 GiB for kernel images).
    #[arg(long, value_parser = parse_mib)]
    pub disk: Option<u64>,
    /// Add a blank data disk of this size.
    #[arg(long, value_parser = parse_mib)]
    pub data_disk: Option<u64>,
    #[arg(long, value_enum, default_value_t = Strategy::Manual)]
    pub run_strategy: Strategy,
    /// Create without starting.
    #[arg(long)]
    pub no_start: bool,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Extra guest kernel command line (kernel images).
    #[arg(long)]
    pub kernel_args: Option<String>,
    /// Seconds a graceful stop may take before the VM is forced off.
    #[arg(long, default_value_t = novacron_api::default_stop_timeout())]
    pub stop_timeout: u32,
    /// QEMU machine type: a family (pc, q35), pinned to its versioned type on
    /// the first node, or a versioned type (pc-i440fx-10.0). Default pc.
    #[arg(long)]
    pub machine: Option<String>,
    /// QEMU CPU model (default: the cluster's baseline, see `cluster scheduler`).
    #[arg(long)]
    pub cpu_model: Option<String>,
    /// Wait until the VM is Running.
    #[arg(long)]
    pub wait: bool,
    /// Project (default: the token's project, else `default`).
    #[arg(long)]
    pub project: Option<String>,
    /// A NIC on network NAME, with address IP if given (repeatable).
    #[arg(long = "network", value_name = "NAME[:IP]", value_parser = crate::networks::parse_nic)]
    pub networks: Vec<novacron_api::NicSpec>,
    /// No NIC at all: without --network the VM would join the project's
    /// default network (if it has one, as `novacron dev` makes).
    #[arg(long, conflicts_with = "networks")]
    pub no_network: bool,
    /// Security group of every NIC (repeatable; default: the project's `default`).
    #[arg(long = "security-group", requires = "networks")]
    pub security_groups: Vec<String>,
    #[command(flatten)]
    pub placement: crate::scheduling::PlacementArgs,
    #[command(flatten)]
    pub cloud_init: CloudInitArgs,
}

/// cloud-init for disk images (a NoCloud seed the agent attaches).
#[derive(Args)]
pub struct CloudInitArgs {
    /// user-data file (#cloud-config YAML, a script, or MIME multipart).
    #[arg(long = "cloud-init", value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// OpenSSH public key file for the image's default user (repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// Guest host name (default: the VM's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// crypt(3) hash of the default user's password (`mkpasswd -m sha-512`).
    #[arg(long)]
    pub password_hash: Option<String>,
}

impl CloudInitArgs {
    /// The spec, with the files read; `None` when no option was given.
    pub fn spec(&self) -> Result<Option<novacron_api::CloudInitSpec>> {
        let read =
            |path: &PathBuf| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
        let user_data = self.user_data.as_ref().map(read).transpose()?;
        let mut keys = Vec::new();
        for path in &self.ssh_keys {
            // A .pub file may hold several keys, one a line.
            keys.extend(
                read(path)?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        let spec = novacron_api::CloudInitSpec {
            user_data,
            ssh_authorized_keys: keys,
            hostname: self.hostname.clone(),
            password_hash: self.password_hash.clone(),
        };
        Ok((spec != novacron_api::CloudInitSpec::default()).then_some(spec))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Strategy {
    Always,
    Manual,
}

#[derive(Args)]
pub struct ListArgs {
    /// Label selector, e.g. app=web,tier!=db
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Field selector, e.g. status.node=node-1 (VMs: status.node, status.phase;
    /// migrations: status.source_node, status.target_node, status.phase, spec.vm)
    #[arg(long)]
    pub field_selector: Option<String>,
    /// Keep printing changes.
    #[arg(short, long)]
    pub watch: bool,
}

#[derive(Args)]
pub struct ActionArgs {
    pub name: String,
    /// Wait until the VM reaches the resulting phase.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
}

pub fn client(g: &Global) -> Result<Client> {
    config::resolve(g.server.clone(), g.token.clone(), g.ca_cert.clone(), g.dev_dir.clone())?.client()
}

pub async fn vm(g: &Global, cmd: VmCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        VmCommand::Create(a) => {
            let req = CreateVm {
                name: a.name.clone(),
                project: a.project.clone(),
                labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
                no_default_network: a.no_network,
                spec: VmSpec {
                    disk_mib: a.disk,
                    data_disk_mib: a.data_disk,
                    run_strategy: match a.run_strategy {
                        Strategy::Always => RunStrategy::Always,
                        Strategy::Manual => RunStrategy::Manual,
                    },
                    power_state: if a.no_start {
                        PowerState::Stopped
                    } else {
                        PowerState::Running
                    },
                    stop_timeout_s: a.stop_timeout,
                    kernel_args: a.kernel_args,
                    placement: a.placement.placement(),
                    machine: a.machine,
                    cpu_model: a.cpu_model,
                    nics: a
                        .networks
                        .into_iter()
                        .map(|nic| novacron_api::NicSpec {
                            security_groups: a.security_groups.clone(),
                            ..nic
                        })
                        .collect(),
                    cloud_init: a.cloud_init.spec()?,
                    ..VmSpec::new(&a.image, a.vcpus, a.memory)
                },
            };
            novacron_api::validate::create_vm(&req).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            if a.placement.explain {
                let e: novacron_api::PlacementExplanation = c.post_json("scheduler/explain", &req).await?;
                crate::scheduling::print_explanation(g.output, &e)?;
            }
            let vm = c.create_vm(&req).await?;
            let vm = if a.wait {
                let want = if a.no_start { VmPhase::Stopped } else { VmPhase::Running };
                wait_phase(
                    &c,
                    &vm.metadata.name,
                    want,
                    vm.metadata.generation,
                    Duration::from_secs(300),
                )
                .await?
            } else {
                vm
            };
            output::vm(g.output, &vm)
        }
        VmCommand::List(a) => list::<Vm>(g, &c, a, output::vms, |vm| output::vm_row(vm).join("  ")).await,
        VmCommand::Get { name } => output::vm(g.output, &c.get::<Vm>(&name).await?),
        VmCommand::Start(a) => action(g, &c, a, "start", None, VmPhase::Running).await,
        VmCommand::Stop {
            action: a,
            force,
            timeout,
        } => {
            let body = StopVm {
                force,
                timeout_s: timeout,
            };
            action(g, &c, a, "stop", Some(&body), VmPhase::Stopped).await
        }
        VmCommand::Reboot(a) => action(g, &c, a, "reboot", None, VmPhase::Running).await,
        VmCommand::Pause(a) => action(g, &c, a, "pause", None, VmPhase::Paused).await,
        VmCommand::Resume(a) => action(g, &c, a, "resume", None, VmPhase::Running).await,
        VmCommand::Delete { action: a, force } => {
            c.delete_vm(&a.name, force).await?;
            if a.wait {
                let mut changes = std::pin::pin!(watcher::watch_object::<Vm>(c.clone(), &a.name));
                let gone = async { while let Some(Some(_)) = changes.next().await {} };
                if tokio::time::timeout(Duration::from_secs(a.wait_timeout), gone)
                    .await
                    .is_err()
                {
                    bail!("VM {:?} still exists after {}s", a.name, a.wait_timeout)
                }
                println!("vm {:?} deleted", a.name);
            } else {
                println!("vm {:?} deletion requested", a.name);
            }
            Ok(())
        }
        VmCommand::Migrate(a) => crate::migrations::migrate(g, &c, a).await,
        VmCommand::Explain { name } => crate::scheduling::explain_vm(&c, g.output, &name).await,
        VmCommand::Console { name } => {
            let target = config::resolve(g.server.clone(), g.token.clone(), g.ca_cert.clone(), g.dev_dir.clone())?;
            crate::console::attach(&c, target.tls()?.map(std::sync::Arc::new), &name).await
        }
        VmCommand::Logs { name, follow, tail } => logs(&c, &name, follow, tail).await,
        VmCommand::Rebuild {
            name,
            image,
            cloud_init,
        } => {
            let req = novacron_api::RebuildVm {
                image,
                cloud_init: cloud_init.spec()?,
            };
            let vm: Vm = c.post_json(&format!("vms/{name}/rebuild"), &req).await?;
            crate::output::vm(g.output, &vm)
        }
        VmCommand::Template { name, image } => {
            let req = novacron_api::MakeTemplate { image };
            let spinner = ProgressBar::new_spinner();
            spinner.set_message(format!("flattening {name}'s disk into a template"));
            spinner.enable_steady_tick(Duration::from_millis(200));
            let made: Result<novacron_api::Image, _> = c.post_json(&format!("vms/{name}/template"), &req).await;
            spinner.finish_and_clear();
            crate::output::print_data(g.output, &made?)
        }
        VmCommand::Clone {
            template,
            name,
            linked: _,
            full,
            memory,
            vcpus,
            paused,
            wait,
        } => {
            let image: novacron_api::Image = c.get(&template).await?;
            let Some(t) = image.spec.template.clone() else {
                bail!("image {template:?} is not a template: make one with `novacron vm template VM`");
            };
            let req = CreateVm {
                name: name.clone(),
                project: Some(image.metadata.project.clone()),
                labels: BTreeMap::new(),
                // The clone has the source's NICs, no more.
                no_default_network: true,
                spec: VmSpec {
                    machine: t.machine,
                    cpu_model: t.cpu_model,
                    nics: t.networks.iter().map(|n| novacron_api::NicSpec::on(n)).collect(),
                    cloud_init: t.cloud_init,
                    full_copy: full,
                    power_state: if paused {
                        PowerState::Paused
                    } else {
                        PowerState::Running
                    },
                    ..VmSpec::new(&template, vcpus.unwrap_or(t.vcpus), memory.unwrap_or(t.memory_mib))
                },
            };
            let vm = c.create_vm(&req).await?;
            let want = if paused { VmPhase::Paused } else { VmPhase::Running };
            let vm = if wait {
                wait_phase(&c, &name, want, vm.metadata.generation, Duration::from_secs(600)).await?
            } else {
                vm
            };
            output::vm(g.output, &vm)
        }
        VmCommand::Exec { name, timeout, command } => {
            let req = novacron_api::ExecRequest {
                command,
                timeout_s: Some(timeout),
            };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let out: novacron_api::ExecResult = c.post_json(&format!("vms/{name}/exec"), &req).await?;
            if g.output != crate::output::Format::Table {
                return crate::output::print_data(g.output, &out);
            }
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            if out.truncated {
                eprintln!("(output cut at 1 MiB a stream)");
            }
            match (out.exit_code, out.signal) {
                (Some(0), _) => Ok(()),
                (Some(code), _) => std::process::exit(code),
                (None, signal) => {
                    eprintln!("killed by signal {}", signal.unwrap_or(0));
                    std::process::exit(128 + signal.unwrap_or(0));
                }
            }
        }
        VmCommand::Nic(cmd) => crate::networks::vm_nic(g, &c, cmd).await,
        VmCommand::Volume(cmd) => crate::volumes::vm_volume(g, &c, cmd).await,
        VmCommand::Snapshot(cmd) => crate::snapshots::vm_snapshot(g, &c, cmd).await,
    }
}

async fn action(g: &Global, c: &Client, a: ActionArgs, what: &str, stop: Option<&StopVm>, want: VmPhase) -> Result<()> {
    let vm = c.vm_action(&a.name, what, stop).await?;
    let vm = if a.wait {
        wait_phase(
            c,
            &a.name,
            want,
            vm.metadata.generation,
            Duration::from_secs(a.wait_timeout),
        )
        .await?
    } else {
        vm
    };
    output::vm(g.output, &vm)
}

/// Polls until the VM reaches `want`; fails early on Failed. Shows a spinner.
/// Only statuses that observed `min_generation` (the spec the caller wrote) count.
pub async fn wait_phase(c: &Client, name: &str, want: VmPhase, min_generation: u64, timeout: Duration) -> Result<Vm> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = std::pin::pin!(watcher::watch_object::<Vm>(c.clone(), name));
    let mut last: Option<Vm> = None;
    let result = loop {
        let vm = match tokio::time::timeout_at(deadline, changes.next()).await {
            Ok(Some(Some(vm))) => vm,
            Ok(Some(None)) => break Err(anyhow::anyhow!("VM {name:?} was deleted")),
            Ok(None) => break Err(anyhow::anyhow!("Watch of VM {name:?} ended")),
            Err(_) => {
                let phase = last
                    .map(|v| v.status.phase.to_string())
                    .unwrap_or_else(|| "unknown".into());
                break Err(anyhow::anyhow!(
                    "VM {name:?} is {phase} after {}s, not {want}",
                    timeout.as_secs()
                ));
            }
        };
        bar.set_message(format!(
            "{name}: {} {}",
            vm.status.phase,
            vm.status.reason.clone().unwrap_or_default()
        ));
        let current = vm.status.observed_generation >= min_generation;
        if current && vm.status.phase == want {
            break Ok(vm);
        }
        if current && vm.status.phase == VmPhase::Failed && want != VmPhase::Failed {
            break Err(anyhow::anyhow!(
                "VM {name:?} failed: {}",
                vm.status.reason.unwrap_or_default()
            ));
        }
        last = Some(vm);
    };
    bar.finish_and_clear();
    result
}

async fn logs(c: &Client, name: &str, follow: bool, tail: Option<usize>) -> Result<()> {
    let mut stream = c.vm_logs(name, follow).await?;
    let mut stdout = std::io::stdout();
    if let Some(n) = tail {
        // Print the last n lines of what is there, then (with --follow) continue live.
        let mut buf = Vec::new();
        if follow {
            // A short window collects the existing log before streaming live.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await {
                buf.extend_from_slice(&chunk?);
            }
        } else {
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk?);
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(n)..] {
            writeln!(stdout, "{l}")?;
        }
        if !follow {
            return Ok(());
        }
    }
    while let Some(chunk) = stream.next().await {
        stdout.write_all(&chunk?)?;
        stdout.flush()?;
    }
    Ok(())
}

/// Lists every page; with `--watch`, then prints each change as a line.
pub(crate) async fn list<T: Resource + serde::Serialize>(
    g: &Global,
    c: &Client,
    a: ListArgs,
    print: fn(Format, &[T]) -> Result<()>,
    line: fn(&T) -> String,
) -> Result<()> {
    let selector = Selector {
        label: a.selector.clone(),
        field: a.field_selector.clone(),
    };
    let (items, revision) = c.list_all::<T>(&selector).await?;
    print(g.output, &items)?;
    if !a.watch {
        return Ok(());
    }
    let mut watch = c.watch::<T>(revision, &selector).await?;
    while let Some(ev) = watch.next().await {
        let ev = ev?;
        match g.output {
            Format::Table => println!("{:<9} {}", format!("{:?}", ev.event_type), line(&ev.object)),
            _ => println!("{}", serde_json::to_string(&ev)?),
        }
    }
    Ok(())
}
