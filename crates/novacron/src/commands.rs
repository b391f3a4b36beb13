//! Client commands: thin wrappers over the typed API client.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::{
    CreateImage, CreateVm, Image, ImageFormat, ImagePart, Migration, MigrationPhase, MigrationStrategy, PowerState,
    RunStrategy, StopVm, Vm, VmPhase, VmSpec,
};
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
    Migrate(MigrateArgs),
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

#[derive(Subcommand)]
pub enum ImageCommand {
    /// List images.
    List(ListArgs),
    /// Import a qcow2 or raw disk image, or a kernel + initrd pair.
    Import {
        name: String,
        /// Disk image file (qcow2 or raw; detected).
        file: Option<PathBuf>,
        /// Have the server download the disk from this URL instead.
        #[arg(long, conflicts_with_all = ["file", "kernel"], requires = "sha256")]
        url: Option<String>,
        /// SHA-256 the downloaded file must have.
        #[arg(long, requires = "url")]
        sha256: Option<String>,
        /// Format of the file at --url.
        #[arg(long, value_enum, default_value_t = UrlFormat::Qcow2, requires = "url")]
        format: UrlFormat,
        /// Kernel for direct-kernel boot.
        #[arg(long, requires = "initrd", conflicts_with = "file")]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line added for every VM of this image.
        #[arg(long, requires = "kernel")]
        kernel_args: Option<String>,
        /// Project (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Usable by every project.
        #[arg(long)]
        public: bool,
    },
    /// Delete an image no VM uses.
    Delete { name: String },
    /// Download an image's disk (or `--part kernel|initrd`) to FILE.
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "disk")]
        part: String,
    },
}

/// Disk formats an image downloaded from a URL can have.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum UrlFormat {
    Qcow2,
    Raw,
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
        VmCommand::Migrate(a) => migrate(g, &c, a).await,
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

pub async fn image(g: &Global, cmd: ImageCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        ImageCommand::List(a) => {
            list::<Image>(g, &c, a, output::images, |i| {
                format!("{}  {:?}", i.metadata.name, i.status.phase)
            })
            .await
        }
        ImageCommand::Export { name, file, part } => export_image(&c, &name, &file, &part).await,
        ImageCommand::Delete { name } => {
            c.delete::<Image>(&name).await?;
            println!("image {name:?} deleted");
            Ok(())
        }
        ImageCommand::Import {
            name,
            url: Some(url),
            sha256,
            format,
            kernel_args,
            project,
            public,
            ..
        } => {
            let req = novacron_api::DownloadImage {
                url,
                sha256: sha256.unwrap_or_default(),
            };
            let opts = ImportOptions {
                kernel_args,
                project,
                public,
            };
            let format = match format {
                UrlFormat::Qcow2 => ImageFormat::Qcow2,
                UrlFormat::Raw => ImageFormat::Raw,
            };
            let image = crate::images::import_url(&c, &name, format, req, opts).await?;
            output::images(g.output, &[image])
        }
        ImageCommand::Import {
            name,
            file,
            kernel,
            initrd,
            kernel_args,
            project,
            public,
            ..
        } => {
            let image = import(
                &c,
                &name,
                file.as_deref(),
                kernel.as_deref().zip(initrd.as_deref()),
                ImportOptions {
                    kernel_args,
                    project,
                    public,
                },
            )
            .await?;
            output::images(g.output, &[image])
        }
    }
}

/// Detects a disk file's format with qemu-img.
async fn disk_format(path: &Path) -> Result<ImageFormat> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .context("Cannot run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{} is not a disk image: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    match info["format"].as_str() {
        Some("qcow2") => Ok(ImageFormat::Qcow2),
        Some("raw") => Ok(ImageFormat::Raw),
        other => bail!("Unsupported image format {other:?}: use qcow2 or raw"),
    }
}

/// Where an imported image goes and how VMs boot it.
#[derive(Default)]
pub struct ImportOptions {
    pub kernel_args: Option<String>,
    pub project: Option<String>,
    pub public: bool,
}

pub async fn import(
    c: &Client,
    name: &str,
    file: Option<&Path>,
    kernel: Option<(&Path, &Path)>,
    opts: ImportOptions,
) -> Result<Image> {
    let (format, parts): (ImageFormat, Vec<(ImagePart, &Path)>) = match (file, kernel) {
        (Some(f), None) => (disk_format(f).await?, vec![(ImagePart::Disk, f)]),
        (None, Some((k, i))) => (
            ImageFormat::Kernel,
            vec![(ImagePart::Kernel, k), (ImagePart::Initrd, i)],
        ),
        _ => bail!("Give a disk image FILE, or --kernel and --initrd"),
    };
    for (_, p) in &parts {
        std::fs::metadata(p).with_context(|| format!("Cannot read {}", p.display()))?;
    }
    c.create_image(&CreateImage {
        name: name.to_string(),
        project: opts.project,
        public: opts.public,
        format,
        labels: Default::default(),
        kernel_args: opts.kernel_args,
    })
    .await?;
    let mut image = None;
    for (part, path) in parts {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("Cannot open {}", path.display()))?;
        let len = file.metadata().await?.len();
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("uploading {}", part.as_str()));
        let progress = bar.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
            if let Ok(c) = &chunk {
                progress.inc(c.len() as u64);
            }
            chunk
        });
        let result = c
            .upload_image_part(name, part, reqwest::Body::wrap_stream(stream))
            .await;
        bar.finish_and_clear();
        match result {
            Ok(i) => image = Some(i),
            Err(e) => {
                // Leave nothing half-imported behind.
                let _ = c.delete::<Image>(name).await;
                return Err(e).with_context(|| format!("Uploading {} failed", path.display()));
            }
        }
    }
    image.context("no file uploaded")
}

/// Streams one file of an image to `path` (via `path.partial`, checked
/// against the image's SHA-256 before it takes the name).
async fn export_image(c: &Client, name: &str, path: &Path, part: &str) -> Result<()> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let part = ImagePart::parse(part).with_context(|| format!("unknown part {part:?} (disk, kernel, initrd)"))?;
    let image: Image = c.get(name).await?;
    let file = image
        .file(part)
        .with_context(|| format!("image {name:?} has no {} file", part.as_str()))?
        .clone();
    let partial = path.with_extension("partial");
    let bar = ProgressBar::new(file.size_bytes);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("downloading {}", part.as_str()));
    let result = async {
        let mut out = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("Cannot create {}", partial.display()))?;
        let mut stream = c.download_image_part(name, part).await?;
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bar.inc(chunk.len() as u64);
            out.write_all(&chunk).await?;
        }
        out.sync_all().await?;
        let got = hex::encode(hasher.finalize());
        if got != file.sha256 {
            bail!("downloaded file has SHA-256 {got}, the image's is {}", file.sha256);
        }
        tokio::fs::rename(&partial, path).await?;
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result?;
    println!(
        "image {name:?} {} saved to {} ({} bytes)",
        part.as_str(),
        path.display(),
        file.size_bytes
    );
    Ok(())
}

async fn migrate(g: &Global, c: &Client, a: MigrateArgs) -> Result<()> {
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

/// Cordons the node, then moves its VMs away (live, or cold when stopped), `parallel` at a time,
/// each to a node the scheduler picks. VMs that cannot move stay where they
/// are and are reported; the exit code is non-zero if any could not move.
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
