//! `novacron`: one binary for every role (server, agent, dev cluster) and the CLI.

mod backup_policies;
mod backups;
mod commands;
mod config;
mod console;
mod dev;
mod devnet;
mod events;
mod hollow;
mod identity;
mod images;
mod migrations;
mod networks;
mod nodes;
mod output;
mod pki;
mod scheduling;
mod snapshots;
mod store_role;
mod volumes;
mod wait;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::output::Format;

#[derive(Parser)]
#[command(
    name = "novacron",
    version,
    about = "NovaCron: run fleets of QEMU/KVM virtual machines"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// API server URL; several, comma-separated, for a cluster of servers (a
    /// request that cannot reach one goes to the next).
    #[arg(long, env = "NOVACRON_SERVER", global = true)]
    pub server: Option<String>,
    /// API token.
    #[arg(long, env = "NOVACRON_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust for an https:// server (`<server data dir>/pki/ca.crt`).
    #[arg(long, env = "NOVACRON_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Dev cluster data directory (to find its server and token).
    #[arg(long, env = "NOVACRON_DEV_DIR", global = true)]
    pub dev_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Server(ServerArgs),
    /// Run a node agent.
    Agent(AgentArgs),
    /// Run a local cluster: a server and agents, with the demo image imported.
    Dev(dev::DevArgs),
    /// Run many hollow nodes (a simulated hypervisor, no guests) in one
    /// process, for scale tests and benches only.
    Hollow(hollow::HollowArgs),
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(commands::VmCommand),
    /// Inspect, cordon, drain and revoke nodes.
    #[command(subcommand)]
    Node(nodes::NodeCommand),
    /// The cluster CA: show, rotate.
    #[command(subcommand)]
    Ca(pki::CaCommand),
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Manage virtual networks.
    #[command(subcommand)]
    Network(networks::NetworkCommand),
    /// Manage volumes: disks attached to one VM at a time, grown online.
    #[command(subcommand)]
    Volume(volumes::VolumeCommand),
    /// Manage security groups (the firewall of VM NICs).
    #[command(subcommand, name = "security-group")]
    SecurityGroup(networks::SecurityGroupCommand),
    /// Inspect and cancel live migrations.
    #[command(subcommand)]
    Migration(migrations::MigrationCommand),
    /// Back up VMs; list, verify and delete backups.
    #[command(subcommand)]
    Backup(backups::BackupCommand),
    /// Manage the datastores backups go to.
    #[command(subcommand, name = "backup-store")]
    BackupStore(backups::BackupStoreCommand),
    /// Make backup encryption keys (held by agents, never by stores).
    #[command(subcommand, name = "backup-key")]
    BackupKey(backups::BackupKeyCommand),
    /// Back up VMs on a schedule, pruned to keep rules.
    #[command(subcommand, name = "backup-policy")]
    BackupPolicy(backup_policies::BackupPolicyCommand),
    /// What happened to VMs, migrations, nodes, backups (oldest first).
    Events(events::EventsArgs),
    /// Deliver events to HTTP receivers, signed.
    #[command(subcommand)]
    Webhook(events::WebhookCommand),
    /// Log in with a user name and password; saves the token for later commands.
    Login(identity::LoginArgs),
    /// Show the caller's identity and permissions.
    Whoami,
    /// Manage users.
    #[command(subcommand)]
    User(identity::UserCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(identity::TokenCommand),
    /// Manage roles.
    #[command(subcommand)]
    Role(identity::RoleCommand),
    /// Manage projects and quotas.
    #[command(subcommand)]
    Project(identity::ProjectCommand),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(identity::AuditCommand),
    /// Scheduler settings and rebalancing.
    #[command(subcommand)]
    Cluster(scheduling::ClusterCommand),
}

#[derive(Args, Clone)]
pub struct ServerArgs {
    #[arg(long, env = "NOVACRON_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Where objects live: `embedded` (SQLite in the data dir, one server) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/ROOT]` (any number of servers).
    #[arg(long, env = "NOVACRON_STORE", default_value = "embedded")]
    pub store: novacron_server::StoreLocation,
    /// Where image files are kept (default DATA_DIR/images). Servers sharing
    /// an etcd store must share it too (e.g. an NFS mount).
    #[arg(long, env = "NOVACRON_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Export traces (one per migration, with the agents' parts) with OTLP
    /// over HTTP to this URL, e.g. http://collector:4318/v1/traces.
    #[arg(long, env = "NOVACRON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// A node is NotReady after this long without a heartbeat (e.g. 15s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub node_grace: Duration,
    /// Serve plain HTTP instead of HTTPS (agents then authenticate with tokens).
    #[arg(long)]
    pub insecure_http: bool,
    /// Serve the API with this certificate (PEM) instead of one from the cluster CA.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS name or IP address for the generated server certificate (repeatable).
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// How long node certificates are valid (at least 20s); agents renew
    /// theirs when two thirds of it have passed.
    #[arg(long, default_value = "30d", value_parser = parse_cert_lifetime)]
    pub node_cert_lifetime: Duration,
    /// Requests per second allowed per token (0 = no limit).
    #[arg(long, default_value_t = 500)]
    pub rate_limit: u32,
    /// Requests a token may burst above its rate.
    #[arg(long, default_value_t = 1000)]
    pub rate_burst: u32,
    /// Connections open at once; one client address may hold a quarter of them.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(4..))]
    pub max_connections: u32,
    /// Directory backup stores may be added under (repeatable); without
    /// one, any absolute path on this machine.
    #[arg(long = "backup-store-root")]
    pub backup_store_roots: Vec<PathBuf>,
}

#[derive(Args, Clone)]
pub struct AgentArgs {
    /// Node name.
    #[arg(long)]
    pub name: String,
    /// Export this agent's parts of migrations' traces with OTLP over HTTP
    /// to this URL (the server's `--otlp-endpoint`).
    #[arg(long, env = "NOVACRON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the agent's endpoint (console, logs); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// URL the server should use to reach this agent.
    #[arg(long)]
    pub advertise: Option<String>,
    /// vCPUs to offer (default: host CPUs).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory to offer, e.g. 4GiB (default: host memory minus 512 MiB).
    #[arg(long, value_parser = parse_mib)]
    pub memory: Option<u64>,
    /// Node label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// One-time token from `novacron token create NAME --join` (HTTPS servers;
    /// needed until the agent has its certificate in `<data-dir>/tls`).
    #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// How long the KVM probe guest may take before falling back to TCG
    /// (working KVM needs well under a second).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub probe_timeout: Duration,
    /// Memory (MiB) for DWCP's chunk cache per peer and direction: pages a
    /// peer already holds travel as references in later migrations.
    #[arg(long, default_value_t = 1024)]
    pub dwcp_cache_mib: u64,
    /// This host's IPv4 address for VM network (VXLAN) traffic from other
    /// hosts (default: the advertised host, when it is an IPv4 address).
    #[arg(long)]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// Backup key file (`novacron backup-key create FILE`): backups to
    /// stores that keep them sealed with it are encrypted here, and only
    /// nodes holding it restore them.
    #[arg(long)]
    pub backup_key: Option<PathBuf>,
}

/// A duration as humantime reads it: `300ms`, `15s`, `2m`, `2h`, `7d`,
/// `1h 30m`. A bare number is seconds, as it always was here.
fn parse_cert_lifetime(s: &str) -> Result<Duration, String> {
    let lifetime = parse_duration(s)?;
    if lifetime < Duration::from_secs(20) {
        return Err(format!("{s:?} is too short: a certificate must live at least 20s"));
    }
    Ok(lifetime)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("invalid duration {s:?}: too large"));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

pub fn parse_mib(s: &str) -> Result<u64, String> {
    novacron_api::units::parse_mib(s)
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOVACRON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// With an endpoint, spans go there until the returned guard is dropped
/// (flushing them); without, nothing is recorded.
fn export_traces(endpoint: Option<&str>, service: &str, node: Option<&str>) -> Result<Option<novacron_trace::Guard>> {
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let guard = novacron_trace::init(endpoint, service, node)?;
    tracing::info!(endpoint, service, "exporting traces");
    Ok(Some(guard))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub fn server_config(a: &ServerArgs) -> novacron_server::ServerConfig {
    novacron_server::ServerConfig {
        data_dir: a.data_dir.clone(),
        store: a.store.clone(),
        images_dir: a.images_dir.clone(),
        listen: a.listen,
        node_grace: a.node_grace,
        rate_limit: (a.rate_limit > 0).then_some((a.rate_limit, a.rate_burst.max(1))),
        max_connections: a.max_connections as usize,
        backup_store_roots: a.backup_store_roots.clone(),
        tls: if a.insecure_http {
            novacron_server::TlsConfig::Off
        } else {
            novacron_server::TlsConfig::On {
                given: a.tls_cert.clone().zip(a.tls_key.clone()),
                extra_names: a.tls_names.clone(),
                node_cert_lifetime: a.node_cert_lifetime,
            }
        },
    }
}

pub fn agent_config(
    a: &AgentArgs,
    server: String,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
) -> novacron_agent::AgentConfig {
    novacron_agent::AgentConfig {
        server,
        token,
        join_token: a.join_token.clone(),
        ca_cert,
        name: a.name.clone(),
        data_dir: a.data_dir.clone(),
        listen: a.listen,
        advertise: a.advertise.clone(),
        vcpus: a.vcpus,
        memory_mib: a.memory,
        labels: a.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        heartbeat: a.heartbeat,
        qemu: a.qemu.clone(),
        accel: a.accel.clone(),
        probe_timeout: a.probe_timeout,
        dwcp_cache_bytes: (a.dwcp_cache_mib as usize).saturating_mul(1 << 20),
        underlay_ip: a.underlay_ip,
        backup_key: a.backup_key.clone(),
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Server(a) => {
            init_tracing("info,tower_http=warn");
            let _traces = export_traces(a.otlp_endpoint.as_deref(), "novacron-server", None)?;
            novacron_server::run(server_config(&a), shutdown_signal()).await?;
            Ok(())
        }
        Command::Agent(a) => {
            init_tracing("info");
            let _traces = export_traces(a.otlp_endpoint.as_deref(), "novacron-agent", Some(&a.name))?;
            let server = cli
                .global
                .server
                .clone()
                .context("The agent needs the server URL: --server or NOVACRON_SERVER")?;
            let token = cli.global.token.clone();
            novacron_agent::run(
                agent_config(&a, server, token, cli.global.ca_cert.clone()),
                shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Dev(a) => {
            init_tracing("info,tower_http=warn");
            dev::run(a, shutdown_signal()).await
        }
        Command::Hollow(a) => {
            init_tracing("warn");
            hollow::run(&cli.global, a, shutdown_signal()).await
        }
        Command::Vm(c) => commands::vm(&cli.global, c).await,
        Command::Node(c) => nodes::node(&cli.global, c).await,
        Command::Ca(c) => pki::ca(&cli.global, c).await,
        Command::Image(c) => images::image(&cli.global, c).await,
        Command::Migration(c) => migrations::migration(&cli.global, c).await,
        Command::Backup(c) => backups::backup(&cli.global, c).await,
        Command::BackupStore(c) => backups::backup_store(&cli.global, c).await,
        Command::BackupKey(c) => backups::backup_key(c),
        Command::BackupPolicy(c) => backup_policies::backup_policy(&cli.global, c).await,
        Command::Events(a) => events::events(&cli.global, a).await,
        Command::Webhook(c) => events::webhook(&cli.global, c).await,
        Command::Network(c) => networks::network(&cli.global, c).await,
        Command::Volume(c) => volumes::volume(&cli.global, c).await,
        Command::SecurityGroup(c) => networks::security_group(&cli.global, c).await,
        Command::Login(a) => identity::login(&cli.global, a).await,
        Command::Whoami => identity::whoami(&cli.global).await,
        Command::User(c) => identity::user(&cli.global, c).await,
        Command::Token(c) => identity::token(&cli.global, c).await,
        Command::Role(c) => identity::role(&cli.global, c).await,
        Command::Project(c) => identity::project(&cli.global, c).await,
        Command::Audit(c) => identity::audit(&cli.global, c).await,
        Command::Cluster(c) => scheduling::cluster(&cli.global, c).await,
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // One error-chain printer for the whole CLI (and the rest of NovaCron).
        eprintln!("Error: {}", novacron_api::error::chain(e.as_ref()));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_forms_the_docs_use() {
        for (s, want) in [
            ("300ms", Duration::from_millis(300)),
            ("500ms", Duration::from_millis(500)),
            ("15s", Duration::from_secs(15)),
            ("2m", Duration::from_secs(120)),
            ("2h", Duration::from_secs(7_200)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("1h 30m", Duration::from_secs(5_400)),
            ("1.5h", Duration::from_secs(5_400)),
            (" 90 ", Duration::from_secs(90)),
        ] {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        for bad in ["", "s", "2x", "-1s", "2 parsecs"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
    }
}
