//! The node agent. Registers its node, heartbeats, watches the VMs bound to
//! it through the server API (never the store), and reconciles QEMU processes
//! toward each VM's spec. QEMU runs daemonized, so VMs survive an agent
//! restart; on start the agent re-adopts them from their state directories.

pub mod accel;
pub mod backup;
mod capabilities;
pub mod certs;
mod control;
mod copies;
mod dwcp;
mod guest;
pub mod hollow;
mod hotplug;
mod http;
mod images;
mod migration;
pub mod network;
mod node;
mod peers;
pub mod qemu;
mod reconcile;
mod seed;
mod snapshots;
mod stats;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use backon::Retryable;
use futures::StreamExt;
use novacron_api::error::chain;
use novacron_api::{RegisterNode, Resources};
use novacron_client::{watcher, Client, ClientError, Selector};

use crate::node::{MigrationClaims, NodeContext};
use crate::reconcile::Reconciler;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://...`: the agent authenticates with its certificate (joining
    /// with `join_token` the first time); `http://...`: with `token`.
    pub server: String,
    pub token: Option<String>,
    /// One-time token to get this node's certificate (HTTPS servers).
    pub join_token: Option<String>,
    /// The cluster CA, to trust the server when joining.
    pub ca_cert: Option<PathBuf>,
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// URL the server uses to reach this agent (default: from `listen`).
    pub advertise: Option<String>,
    /// Capacity overrides, so several agents can share one machine.
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
    pub qemu: String,
    /// `auto` (probe), `kvm` or `tcg`.
    pub accel: String,
    pub probe_timeout: Duration,
    /// Memory for DWCP's chunk caches, per peer and direction.
    pub dwcp_cache_bytes: usize,
    /// This host's address for VXLAN (default: the advertised host, when
    /// it is an IPv4 address).
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The backup key file (client-side encryption of backups to stores
    /// that ask for it).
    pub backup_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Cannot use data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create API client")]
    Client(#[from] ClientError),
    #[error("Invalid accelerator {0:?} (use auto, kvm or tcg)")]
    Accel(String),
    #[error("TLS")]
    Tls(#[from] novacron_tls::TlsError),
    #[error("{0}")]
    Credentials(String),
    #[error("Cannot join the cluster")]
    Join(#[source] ClientError),
    #[error(transparent)]
    BackupKey(#[from] novacron_backup::crypt::KeyError),
    #[error("Cannot renew this node's certificate")]
    Renew(#[source] ClientError),
}

/// Host capacity: the flags if given, else what the host has (leaving 512 MiB
/// of memory for the host itself).
fn capacity(cfg: &AgentConfig) -> Resources {
    let vcpus = cfg.vcpus.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let memory_mib = cfg.memory_mib.unwrap_or_else(|| {
        let total_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            })
            .unwrap_or(0);
        (total_kib / 1024).saturating_sub(512).max(1)
    });
    Resources {
        vcpus,
        memory_mib,
        disk_gib: 0,
    }
}

/// The host of the URL this agent advertises, where peers reach its QEMUs
/// (migration, NBD) and what its certificate names.
#[derive(Debug, PartialEq, Eq)]
struct AdvertisedHost {
    /// As written in URLs and `host:port` strings: `[::1]` for IPv6.
    in_url: String,
    /// Without brackets, for certificates: `::1`.
    bare: String,
}

impl AdvertisedHost {
    /// 127.0.0.1 when the URL has no host (or is no URL).
    fn of(address: &str) -> AdvertisedHost {
        let url = url::Url::parse(address).ok().filter(|u| u.has_host());
        match url {
            Some(u) => AdvertisedHost {
                in_url: u.host_str().unwrap_or_default().to_string(),
                bare: novacron_tls::bare_host(&u).unwrap_or_default(),
            },
            None => AdvertisedHost {
                in_url: "127.0.0.1".into(),
                bare: "127.0.0.1".into(),
            },
        }
    }
}

pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let dir_err = |source| AgentError::DataDir {
        path: cfg.data_dir.display().to_string(),
        source,
    };
    let vms_root = cfg.data_dir.join("vms");
    std::fs::create_dir_all(&vms_root).map_err(dir_err)?;
    std::fs::create_dir_all(cfg.data_dir.join("images")).map_err(dir_err)?;

    let accel = match cfg.accel.as_str() {
        "auto" => accel::choose(&cfg.qemu, &cfg.data_dir, cfg.probe_timeout).await,
        "kvm" | "tcg" => cfg.accel.clone(),
        other => return Err(AgentError::Accel(other.to_string())),
    };

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let scheme = if cfg.server.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let address = cfg.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let hosts = AdvertisedHost::of(&address);
    let tls = if cfg.server.starts_with("https://") {
        Some(certs::load_or_join(&cfg.data_dir, certs::JoinWith::of(&cfg), &hosts.bare).await?)
    } else {
        None
    };
    // Two pools of connections to other agents: one for the calls that drive a
    // migration, one for watching the target meanwhile (see `migration`).
    let peer_http = || -> Result<reqwest::Client, AgentError> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(novacron_api::POOL_IDLE_TIMEOUT);
        let builder = match &tls {
            Some(t) => builder.use_preconfigured_tls(t.client_config()?),
            None => builder,
        };
        builder
            .build()
            .map_err(|e| AgentError::Credentials(format!("HTTP client: {e}")))
    };
    let client = match &tls {
        Some(t) => Client::with_tls(&cfg.server, "", Some(t.client_config()?))?,
        None => {
            let token = cfg
                .token
                .clone()
                .ok_or_else(|| AgentError::Credentials("an http:// server needs a token".into()))?;
            Client::new(&cfg.server, &token)?
        }
    };
    let secret = Arc::new(RwLock::new(None));
    let images = Arc::new(images::ImageCache::new(cfg.data_dir.join("images")));
    let underlay_ip = cfg.underlay_ip.or_else(|| hosts.bare.parse().ok());
    let net = Arc::new(network::Overlay::new(
        &cfg.name,
        underlay_ip,
        cfg.data_dir.join("networks"),
    ));
    let backup_key = match &cfg.backup_key {
        Some(path) => {
            let key = novacron_backup::ChunkKey::load(path)?;
            tracing::info!(key_id = %key.id_hex(), "backup key loaded");
            Some(key)
        }
        None => None,
    };
    let node = Arc::new(NodeContext {
        name: cfg.name.clone(),
        backup_key,
        qemu: cfg.qemu.clone(),
        accel: accel.clone(),
        vms_root: vms_root.clone(),
        volumes_root: cfg.data_dir.join("volumes"),
        peers: peer_http()?,
        images,
        client: client.clone(),
        secret: secret.clone(),
        host: hosts.in_url,
        claims: MigrationClaims::default(),
        net: net.clone(),
        guests: Default::default(),
        copies: Default::default(),
        live_restores: Default::default(),
        restores: Default::default(),
    });
    let mut dwcp = None;
    if let Some(t) = &tls {
        match dwcp::DwcpNode::start(
            &cfg.name,
            local.ip(),
            t,
            cfg.dwcp_cache_bytes,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        {
            Ok(d) => dwcp = Some(d),
            Err(e) => tracing::warn!(error = %e, "DWCP unavailable; migrations use QEMU's own stream"),
        }
    }
    let dwcp_port = dwcp.as_ref().map(|d| d.port);
    let migrations = migration::Migrations::new(node.clone(), peer_http()?, peer_http()?, dwcp);
    let http_state = http::HttpState {
        tls: tls.clone(),
        vms_root: vms_root.clone(),
        secret: secret.clone(),
        migrations: migrations.clone(),
        node: node.clone(),
        scrapers: Default::default(),
    };
    // Clients without a certificate get through the handshake for /metrics
    // only (http::require_cluster_cert); a certificate shown must be the cluster's.
    let listener_tls = match &tls {
        Some(t) => Some(t.server_config(novacron_tls::ClientAuth::Optional)?),
        None => None,
    };
    let http = tokio::spawn(async move {
        let served = novacron_tls::serve(
            listener,
            listener_tls,
            http::router(http_state),
            novacron_tls::ServeLimits {
                header_read_timeout: novacron_api::SERVER_IDLE_TIMEOUT,
                ..Default::default()
            },
            tokio_util::sync::CancellationToken::new(),
        );
        if let Err(e) = served.await {
            tracing::error!(error = %e, "agent HTTP server failed");
        }
    });
    tracing::info!(node = %cfg.name, addr = %local, accel = %accel, "agent listening");

    let qemu = match capabilities::probe(&cfg.qemu, &accel, &cfg.data_dir).await {
        Ok(q) => {
            tracing::info!(version = %q.version, machines = q.machine_types.len(), cpu_models = q.cpu_models.len(), "QEMU capabilities");
            q
        }
        Err(e) => {
            // The server then does not filter this node on machine type or CPU model.
            tracing::warn!(error = %chain(&e), "cannot tell what QEMU offers; registering without it");
            Default::default()
        }
    };
    let registration = RegisterNode {
        qemu,
        name: cfg.name.clone(),
        address,
        capacity: capacity(&cfg),
        labels: cfg.labels.clone(),
        accel: accel.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        dwcp_port,
        underlay_ip: underlay_ip.map(|ip| ip.to_string()),
    };
    let heartbeat = register_and_keep_alive(client.clone(), registration, secret.clone(), cfg.heartbeat).await;

    let guest_agents = tokio::spawn(guest::keep_polling(node.clone()));
    let reconciler = Reconciler {
        node,
        runtimes: HashMap::new(),
    };
    let poller = tokio::spawn(migrations.run());
    let peers = tokio::spawn(keep_overlay_peers(net.clone(), client.clone()));
    let groups = tokio::spawn(keep_security_groups(net, client.clone()));
    let certificates = tls.map(|t| {
        tokio::spawn(certs::keep_current(
            t,
            client.clone(),
            cfg.data_dir.clone(),
            cfg.name.clone(),
        ))
    });
    tokio::select! {
        _ = control::control_loop(reconciler, client) => {}
        _ = shutdown => tracing::info!("agent stopping; VMs keep running"),
    }
    heartbeat.abort();
    poller.abort();
    peers.abort();
    groups.abort();
    guest_agents.abort();
    if let Some(c) = certificates {
        c.abort();
    }
    http.abort();
    Ok(())
}

/// Registers the node (retrying until the server takes it: nothing else can
/// start without the agent secret it returns), then heartbeats every
/// `interval`, registering again if the server has forgotten the node.
async fn register_and_keep_alive(
    client: Client,
    registration: RegisterNode,
    secret: Arc<RwLock<Option<String>>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    let name = registration.name.clone();
    let register = {
        let client = client.clone();
        move || {
            let client = client.clone();
            let secret = secret.clone();
            let registration = registration.clone();
            async move {
                let backoff = backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times();
                let registered = (|| client.register_node(&registration))
                    .retry(backoff)
                    .notify(|e, _| tracing::warn!(error = %chain(e), "registration failed; retrying"))
                    .await;
                match registered {
                    Ok(resp) => {
                        *secret.write() = Some(resp.agent_secret);
                        tracing::info!(node = %registration.name, "registered with the server");
                    }
                    // Not reached: the backoff never gives up.
                    Err(e) => tracing::error!(error = %chain(&e), "registration failed"),
                }
            }
        }
    };
    register().await;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            match client.heartbeat(&name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => register().await,
                Err(e) => tracing::warn!(error = %chain(&e), "heartbeat failed"),
            }
        }
    })
}

/// Keeps every network's VXLAN peers (on this host) at the server's list
/// of underlay addresses. One object, changed only as nodes come and go.
async fn keep_overlay_peers(net: Arc<network::Overlay>, client: Client) {
    let mut peers = std::pin::pin!(watcher::watch::<novacron_api::OverlayPeers>(
        client,
        Selector::everything()
    ));
    while let Some(ev) = peers.next().await {
        let list = match ev {
            watcher::Event::Restarted(all) => all.into_iter().next(),
            watcher::Event::Applied(p) => Some(p),
            watcher::Event::Deleted(_) => None,
        };
        net.set_peers(&list.map(|l| l.peers).unwrap_or_default()).await;
    }
}

/// Keeps this host's firewall at the server's security groups (rules and
/// members change as groups are edited and VMs come and go).
async fn keep_security_groups(net: Arc<network::Overlay>, client: Client) {
    let mut events = std::pin::pin!(watcher::watch::<novacron_api::SecurityGroup>(
        client,
        Selector::everything()
    ));
    let mut groups = BTreeMap::new();
    while let Some(ev) = events.next().await {
        match ev {
            watcher::Event::Restarted(all) => {
                groups = all.into_iter().map(|g| (g.metadata.name.clone(), g)).collect();
            }
            watcher::Event::Applied(g) => {
                groups.insert(g.metadata.name.clone(), g);
            }
            watcher::Event::Deleted(g) => {
                groups.remove(&g.metadata.name);
            }
        }
        net.set_groups(groups.clone()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_hosts() {
        let of = |s: &str| {
            let h = AdvertisedHost::of(s);
            (h.in_url, h.bare)
        };
        assert_eq!(of("https://10.99.0.2:8421"), ("10.99.0.2".into(), "10.99.0.2".into()));
        assert_eq!(
            of("http://node-1.example/"),
            ("node-1.example".into(), "node-1.example".into())
        );
        // Split on ':' this used to give "[".
        assert_eq!(of("https://[::1]:8421"), ("[::1]".into(), "::1".into()));
        assert_eq!(of("https://[fd00::7]"), ("[fd00::7]".into(), "fd00::7".into()));
        assert_eq!(of("not a url"), ("127.0.0.1".into(), "127.0.0.1".into()));
    }
}
