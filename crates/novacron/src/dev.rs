//! `novacron dev`: a whole cluster in one process for first contact, demos
//! and tests: a server, N agents with their own data directories, and the
//! demo guest image imported.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use novacron_api::{CreateToken, Image, ImagePhase, IssuedToken};
use novacron_client::Client;
use tokio_util::sync::CancellationToken;

use crate::{config, parse_duration, parse_mib, AgentArgs, ServerArgs};

/// As `novacron server`'s default.
const NODE_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Args)]
pub struct DevArgs {
    /// Data directory (default: ~/.local/share/novacron/dev).
    #[arg(long, env = "NOVACRON_DEV_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// Number of node agents.
    #[arg(long, default_value_t = 2)]
    pub agents: u32,
    /// vCPUs each agent offers.
    #[arg(long, default_value_t = 4)]
    pub agent_vcpus: u32,
    /// Memory each agent offers.
    #[arg(long, default_value = "4GiB", value_parser = parse_mib)]
    pub agent_memory: u64,
    /// Directory with the demo guest (vmlinuz, initrd.img) built by scripts/build-guest-image.sh.
    #[arg(long, env = "NOVACRON_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub node_grace: Duration,
    /// Plain HTTP with the admin token for the agents, instead of the
    /// production path (cluster CA, agents joined with join tokens, mTLS and
    /// the DWCP migration transport). Loopback only.
    #[arg(long)]
    pub insecure_http: bool,
    /// Where the agents run: `namespaces` (one network namespace each, so
    /// VMs get networks: needs root), `process` (inside this process, no VM
    /// networks), or `auto` (namespaces when possible).
    #[arg(long, value_enum, default_value_t = DevHosts::Auto)]
    pub hosts: DevHosts,
    /// `embedded` (SQLite) or `etcd`: a local etcd member (Debian's `etcd`)
    /// with its data in the dev directory, stopped with the cluster.
    #[arg(long, value_enum, default_value_t = DevStore::Embedded)]
    pub store: DevStore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DevStore {
    Embedded,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DevHosts {
    Auto,
    Namespaces,
    Process,
}

/// Dev agents' DWCP cache, and their label.
const DEV_DWCP_CACHE_MIB: u64 = 256;
const DEV_LABEL: (&str, &str) = ("novacron.io/dev", "true");

/// The default network `novacron dev` gives VMs created without one.
const DEFAULT_NETWORK: &str = "default";
const DEFAULT_SUBNET: &str = "10.210.0.0/24";

/// Finds the demo guest: the flag, else `target/guest` beside the binary's
/// target directory, else `./target/guest`.
fn guest_dir(flag: Option<PathBuf>) -> Option<PathBuf> {
    let has_guest = |d: &Path| d.join("vmlinuz").exists() && d.join("initrd.img").exists();
    if let Some(d) = flag {
        return Some(d);
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("guest")));
    [beside_exe, Some(PathBuf::from("target/guest"))]
        .into_iter()
        .flatten()
        .find(|d| has_guest(d))
}

async fn wait_ready(base: &str, http: &reqwest::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("Server did not become ready at {base}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster CA, once the server starting beside us has written it.
async fn read_when_written(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match std::fs::read_to_string(path) {
            Ok(pem) if pem.contains("END CERTIFICATE") => return Ok(pem),
            _ if Instant::now() > deadline => bail!("The server did not write its CA to {}", path.display()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A one-time join token for an agent that has no certificate yet.
async fn join_token(client: &Client, node: &str) -> Result<String> {
    let issued: IssuedToken = client
        .post_json(
            "tokens",
            &CreateToken {
                name: format!("join-{node}-{}", chrono::Utc::now().timestamp_millis()),
                role: "join".into(),
                project: None,
                ttl_s: Some(600),
                join: true,
            },
        )
        .await
        .with_context(|| format!("Cannot create a join token for {node}"))?;
    Ok(issued.secret)
}

pub async fn run(a: DevArgs, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let dir = a.data_dir.clone().unwrap_or_else(config::default_dev_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    if a.insecure_http && !a.listen.ip().is_loopback() {
        bail!("--insecure-http serves plain HTTP, so it listens on loopback only");
    }
    let stop = CancellationToken::new();
    let namespaces = match a.hosts {
        DevHosts::Process => false,
        _ if a.insecure_http => {
            if a.hosts == DevHosts::Namespaces {
                bail!("--insecure-http keeps the server on loopback, which agents in namespaces cannot reach");
            }
            false
        }
        DevHosts::Namespaces => {
            if !crate::devnet::available() {
                bail!("--hosts namespaces needs root and `ip netns`");
            }
            true
        }
        DevHosts::Auto => crate::devnet::available(),
    };
    if namespaces {
        crate::devnet::ensure(a.agents)?;
    }

    // Kept until the cluster stops: dropping it stops etcd.
    let (store, _etcd) = match a.store {
        DevStore::Embedded => (novacron_server::StoreLocation::Embedded, None),
        DevStore::Etcd => {
            let etcd_dir = dir.join("etcd");
            let cluster =
                tokio::task::spawn_blocking(move || novacron_store::etcd_process::EtcdCluster::start(&etcd_dir, 1))
                    .await?
                    .context("Cannot start a local etcd")?;
            let url = cluster.url("/novacron");
            tracing::info!(%url, "started a local etcd");
            println!("etcd: {url}");
            (url.parse().context("etcd URL")?, Some(cluster))
        }
    };
    let server_args = ServerArgs {
        // The dev cluster runs its server and agents in this one process, without traces.
        otlp_endpoint: None,
        store,
        images_dir: None,
        data_dir: dir.join("server"),
        listen: a.listen,
        node_grace: a.node_grace,
        rate_limit: 500,
        rate_burst: 1000,
        max_connections: 1024,
        backup_store_roots: Vec::new(),
        insecure_http: a.insecure_http,
        tls_cert: None,
        tls_key: None,
        // Agents in namespaces reach the server at the underlay's gateway.
        tls_names: if namespaces {
            vec![crate::devnet::GATEWAY.to_string()]
        } else {
            Vec::new()
        },
        node_cert_lifetime: NODE_CERT_LIFETIME,
    };
    let server = tokio::spawn(novacron_server::run(
        crate::server_config(&server_args),
        stop.clone().cancelled_owned(),
    ));
    let scheme = if a.insecure_http { "http" } else { "https" };
    let base = format!("{scheme}://{}", a.listen);
    let ca_path = dir.join("server/pki/ca.crt");
    let tls = if a.insecure_http {
        None
    } else {
        let ca = read_when_written(&ca_path).await?;
        Some(novacron_tls::client_config(&ca, None)?)
    };
    let probe = match &tls {
        Some(cfg) => reqwest::Client::builder()
            .use_preconfigured_tls(cfg.clone())
            .pool_idle_timeout(novacron_api::POOL_IDLE_TIMEOUT)
            .build()?,
        None => reqwest::Client::new(),
    };
    wait_ready(&base, &probe).await?;
    std::fs::write(dir.join("server.url"), format!("{base}\n"))?;
    let token = std::fs::read_to_string(dir.join("server/admin.token"))
        .context("Cannot read the admin token")?
        .trim()
        .to_string();
    let client = Client::with_tls(&base, &token, tls)?;

    let mut agents = Vec::new();
    let mut agent_processes = Vec::new();
    if namespaces {
        let relay_at = SocketAddr::new(crate::devnet::GATEWAY.into(), a.listen.port());
        tokio::spawn(crate::devnet::relay(relay_at, a.listen, stop.clone()));
        for i in 1..=a.agents {
            agent_processes.push(spawn_agent_in_namespace(&a, &dir, i, &client, &relay_at, &ca_path).await?);
        }
        ensure_default_network(&client).await?;
    }
    for i in (1..=a.agents).filter(|_| !namespaces) {
        let name = format!("node-{i}");
        let data_dir = dir.join(format!("agent-{i}"));
        // Agents join like production ones: a join token the first time,
        // their certificate from then on.
        let joining = !a.insecure_http && !novacron_tls::AgentFiles::in_dir(&data_dir).exist();
        let args = AgentArgs {
            join_token: if joining {
                Some(join_token(&client, &name).await?)
            } else {
                None
            },
            ..agent_args(&a, &name, data_dir)
        };
        let cfg = if a.insecure_http {
            crate::agent_config(&args, base.clone(), Some(token.clone()), None)
        } else {
            crate::agent_config(&args, base.clone(), None, Some(ca_path.clone()))
        };
        agents.push(tokio::spawn(novacron_agent::run(cfg, stop.clone().cancelled_owned())));
    }

    match client.get::<Image>("demo").await {
        Ok(img) if img.status.phase == ImagePhase::Ready => {}
        _ => match guest_dir(a.guest_dir.clone()) {
            Some(g) => {
                let _ = client.delete::<Image>("demo").await;
                crate::images::import(
                    &client,
                    "demo",
                    None,
                    Some((&g.join("vmlinuz"), &g.join("initrd.img"))),
                    // Public, so VMs of every project can boot it.
                    crate::images::ImportOptions {
                        public: true,
                        ..Default::default()
                    },
                )
                .await
                .context("Cannot import the demo image")?;
                tracing::info!(dir = %g.display(), "imported demo image");
            }
            None => tracing::warn!("demo guest not found: run scripts/build-guest-image.sh (or pass --guest-dir)"),
        },
    }

    eprintln!(
        "NovaCron dev cluster is up: server {base} ({}), {} agent(s){}, data in {}\n  try: novacron vm create demo-1 --image demo --memory 256MiB --wait\n  stop with Ctrl-C (VMs keep running and are re-adopted next time)",
        if a.insecure_http {
            "plain HTTP"
        } else {
            "mTLS, agents joined with join tokens"
        },
        a.agents,
        if namespaces {
            format!(" in network namespaces ncdev-N; VMs join network {DEFAULT_NETWORK:?} ({DEFAULT_SUBNET}, DHCP, NAT)")
        } else {
            " in this process (no VM networks: run as root for them)".into()
        },
        dir.display()
    );
    shutdown.await;
    stop.cancel();
    for agent in agents {
        let _ = agent.await;
    }
    for mut child in agent_processes {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    match server.await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

/// The arguments of dev agent `name` (as `novacron agent` would take them).
fn agent_args(a: &DevArgs, name: &str, data_dir: PathBuf) -> AgentArgs {
    AgentArgs {
        name: name.to_string(),
        otlp_endpoint: None,
        data_dir,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        vcpus: Some(a.agent_vcpus),
        memory: Some(a.agent_memory),
        labels: vec![(DEV_LABEL.0.into(), DEV_LABEL.1.into())],
        heartbeat: a.heartbeat,
        qemu: "qemu-system-x86_64".into(),
        accel: a.accel.clone(),
        probe_timeout: Duration::from_secs(2),
        dwcp_cache_mib: DEV_DWCP_CACHE_MIB,
        underlay_ip: None,
        backup_key: None,
        join_token: None,
    }
}

/// Starts dev agent `i` as a `novacron agent` process in its namespace.
async fn spawn_agent_in_namespace(
    a: &DevArgs,
    dir: &Path,
    i: u32,
    client: &Client,
    server: &SocketAddr,
    ca: &Path,
) -> Result<tokio::process::Child> {
    let name = format!("node-{i}");
    let data_dir = dir.join(format!("agent-{i}"));
    let ip = crate::devnet::host_ip(i);
    let exe = std::env::current_exe().context("Cannot find this program to start agents")?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &crate::devnet::netns(i)])
        .arg(exe)
        .args(["agent", "--name", &name, "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &format!("{ip}:0"), "--underlay-ip", &ip.to_string()])
        .args(["--vcpus", &a.agent_vcpus.to_string()])
        .args(["--memory", &format!("{}MiB", a.agent_memory)])
        .args(["--heartbeat", &format!("{}ms", a.heartbeat.as_millis())])
        .args(["--accel", &a.accel, "--dwcp-cache-mib", &DEV_DWCP_CACHE_MIB.to_string()])
        .args(["--label", &format!("{}={}", DEV_LABEL.0, DEV_LABEL.1)])
        .env("NOVACRON_SERVER", format!("https://{server}"))
        .env("NOVACRON_CA_CERT", ca)
        .env_remove("NOVACRON_TOKEN")
        .kill_on_drop(true);
    if !novacron_tls::AgentFiles::in_dir(&data_dir).exist() {
        cmd.env("NOVACRON_JOIN_TOKEN", join_token(client, &name).await?);
    }
    let child = cmd.spawn().with_context(|| format!("Cannot start agent {name}"))?;
    tracing::info!(node = %name, netns = %crate::devnet::netns(i), %ip, "started agent in its namespace");
    Ok(child)
}

/// The dev cluster's network for VMs created without one: DHCP and NAT,
/// labelled as the `default` project's default network.
async fn ensure_default_network(client: &Client) -> Result<()> {
    match client.get::<novacron_api::Network>(DEFAULT_NETWORK).await {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(404) => {
            let req = novacron_api::CreateNetwork {
                name: DEFAULT_NETWORK.into(),
                project: None,
                labels: [("novacron.io/default".to_string(), "true".to_string())].into(),
                subnet: DEFAULT_SUBNET.into(),
                gateway: None,
                dhcp: true,
                nat: true,
                mtu: None,
            };
            let _: novacron_api::Network = client
                .post_json("networks", &req)
                .await
                .context("Cannot create the default network")?;
            tracing::info!(
                network = DEFAULT_NETWORK,
                subnet = DEFAULT_SUBNET,
                "created the default network"
            );
            Ok(())
        }
        Err(e) => Err(e).context("Cannot read the default network"),
    }
}
