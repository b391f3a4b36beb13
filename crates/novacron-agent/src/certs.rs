//! The agent's certificate and trust, kept current while it runs: joined
//! once with a join token, renewed before it expires (and when the cluster
//! CA rotates), and the cluster's trust (CAs, revoked certificates) watched
//! and applied to every TLS endpoint of the agent without a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use novacron_api::error::chain;
use novacron_api::{ClusterTrust, JoinedNode, CLUSTER_TRUST};
use novacron_client::{watcher, Client};
use novacron_tls::{AgentFiles, Identity, LiveTls, TrustSet};
use tokio::sync::Notify;

use crate::{AgentConfig, AgentError};

/// How a node without a certificate gets one.
pub struct JoinWith<'a> {
    pub server: &'a str,
    pub name: &'a str,
    pub join_token: Option<&'a str>,
    pub ca_cert: Option<&'a std::path::Path>,
}

impl<'a> JoinWith<'a> {
    pub fn of(cfg: &'a AgentConfig) -> Self {
        JoinWith {
            server: &cfg.server,
            name: &cfg.name,
            join_token: cfg.join_token.as_deref(),
            ca_cert: cfg.ca_cert.as_deref(),
        }
    }
}

/// The node's certificate and the cluster CA: from `data_dir`, or fetched
/// once with the join token. `host` goes in the certificate.
pub async fn load_or_join(
    data_dir: &std::path::Path,
    with: JoinWith<'_>,
    host: &str,
) -> Result<Arc<LiveTls>, AgentError> {
    let files = AgentFiles::in_dir(data_dir);
    if !files.exist() {
        let (Some(join_token), Some(ca_path)) = (with.join_token, with.ca_cert) else {
            return Err(AgentError::Credentials(format!(
                "no certificate in {} yet: join with --join-token (from `novacron token create NAME --join`) and --ca-cert",
                files.cert.display()
            )));
        };
        join(with.server, join_token, ca_path, with.name, host, &files).await?;
    }
    let identity = Identity::load(&files.cert, &files.key)?;
    let trust = TrustSet {
        ca_pem: read(&files.ca)?,
        revoked: Default::default(),
    };
    let server_ca = files.server_ca.exists().then(|| read(&files.server_ca)).transpose()?;
    Ok(LiveTls::new(identity, trust, server_ca)?)
}

/// Gets node `name` a certificate for `host` from the cluster CA with a
/// join token, and stores it in `files` (agents, and the backup-store role).
pub async fn join(
    server: &str,
    join_token: &str,
    ca_path: &std::path::Path,
    name: &str,
    host: &str,
    files: &AgentFiles,
) -> Result<(), AgentError> {
    let ca = read(ca_path)?;
    let client = Client::with_tls(server, join_token, Some(novacron_tls::client_config(&ca, None)?))?;
    let joined: JoinedNode = client
        .post_json(
            "nodes/join",
            &novacron_api::JoinNode {
                name: name.to_string(),
                hosts: vec![host.to_string()],
            },
        )
        .await
        .map_err(AgentError::Join)?;
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Credentials(format!("Cannot create {}: {e}", dir.display())))?;
    }
    save(files, &joined)?;
    if ca.trim() != joined.ca_pem.trim() {
        write(&files.server_ca, &ca)?;
    }
    tracing::info!(node = %name, "joined the cluster; certificate stored");
    Ok(())
}

fn read(path: &std::path::Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path).map_err(|e| AgentError::Credentials(format!("Cannot read {}: {e}", path.display())))
}

fn write(path: &std::path::Path, text: &str) -> Result<(), AgentError> {
    novacron_tls::write_private(path, text)
        .map_err(|e| AgentError::Credentials(format!("Cannot write {}: {}", path.display(), chain(&e))))
}

/// Stores a certificate, its key and the trusted CAs, each file written
/// whole. (A crash between the two renames leaves a key that does not match
/// the certificate: the agent then cannot start and says so; joining again
/// recovers.)
fn save(files: &AgentFiles, joined: &JoinedNode) -> Result<(), AgentError> {
    write(&files.ca, &joined.ca_pem)?;
    let staged = |path: &std::path::Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(".new");
        std::path::PathBuf::from(name)
    };
    let (cert, key) = (staged(&files.cert), staged(&files.key));
    write(&key, &joined.key_pem)?;
    write(&cert, &joined.cert_pem)?;
    std::fs::rename(&key, &files.key)
        .and_then(|()| std::fs::rename(&cert, &files.cert))
        .map_err(|e| AgentError::Credentials(format!("Cannot store the certificate: {e}")))
}

/// When to renew: two thirds into the certificate's life.
fn renew_at(tls: &LiveTls) -> Result<SystemTime, AgentError> {
    let (from, until) = tls.validity()?;
    let life = until.duration_since(from).unwrap_or_default();
    Ok(from + life * 2 / 3)
}

/// Keeps the trust current (watching the cluster's) and the certificate
/// fresh (renewing it two thirds into its life, or at once when the cluster
/// issues from another CA). Runs until the agent stops.
pub async fn keep_current(tls: Arc<LiveTls>, client: Client, cfg_data_dir: std::path::PathBuf, node: String) {
    let files = AgentFiles::in_dir(&cfg_data_dir);
    let renew_now = Arc::new(Notify::new());
    let trust = {
        let (tls, renew_now, client) = (tls.clone(), renew_now.clone(), client.clone());
        let ca_path = files.ca.clone();
        async move {
            let mut changes = std::pin::pin!(watcher::watch_object::<ClusterTrust>(client, CLUSTER_TRUST));
            while let Some(trust) = changes.next().await {
                let Some(trust) = trust else { continue };
                apply_trust(&tls, &trust, &ca_path, &renew_now);
            }
        }
    };
    let renewal = async move {
        let mut failures = 0u32;
        loop {
            let wait = match renew_at(&tls) {
                Ok(at) => at.duration_since(SystemTime::now()).unwrap_or_default(),
                Err(e) => {
                    tracing::error!(error = %chain(&e), "cannot read this node's certificate; not renewing it");
                    return;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = renew_now.notified() => {}
            }
            match renew(&tls, &client, &files, &node).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // Retry soon, then less often; the old certificate
                    // works until it expires.
                    let delay = Duration::from_secs(5 * u64::from(failures.min(12)));
                    tracing::warn!(error = %chain(&e), retry_in_s = delay.as_secs(), "certificate renewal failed");
                    tokio::time::sleep(delay).await;
                    renew_now.notify_one();
                }
            }
        }
    };
    tokio::join!(trust, renewal);
}

fn apply_trust(tls: &LiveTls, trust: &ClusterTrust, ca_path: &std::path::Path, renew_now: &Notify) {
    let set = TrustSet {
        ca_pem: trust.ca_pem.clone(),
        revoked: trust.revoked.iter().map(|r| r.cert_sha256.clone()).collect(),
    };
    match tls.set_trust(set) {
        Ok(true) => {
            tracing::info!(revoked = trust.revoked.len(), "applied the cluster's trust");
            if let Err(e) = write(ca_path, &trust.ca_pem) {
                tracing::warn!(error = %chain(&e), "cannot store the cluster's CAs");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %chain(&e), "the cluster's trust is unusable; keeping the previous one"),
    }
    match tls.issued_by(&trust.issuer_pem) {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!("the cluster issues from another CA now: renewing this node's certificate");
            renew_now.notify_one();
        }
        Err(e) => tracing::warn!(error = %chain(&e), "cannot tell which CA issued this node's certificate"),
    }
}

async fn renew(tls: &LiveTls, client: &Client, files: &AgentFiles, node: &str) -> Result<(), AgentError> {
    let renewed: JoinedNode = client
        .post_json(&format!("nodes/{node}/certificate"), &serde_json::json!({}))
        .await
        .map_err(AgentError::Renew)?;
    save(files, &renewed)?;
    tls.set_identity(Identity {
        cert_pem: renewed.cert_pem,
        key_pem: renewed.key_pem,
    })?;
    let (_, until) = tls.validity()?;
    let until = chrono::DateTime::<chrono::Utc>::from(until);
    tracing::info!(node, valid_until = %until.to_rfc3339(), "renewed this node's certificate");
    Ok(())
}
