//! `novacron backup-store serve`: the backup-store role, a datastore
//! directory served over mTLS on a machine of its own (for backups that
//! must not live on the hypervisors). It joins the cluster once with a
//! join token, as an agent does (its certificate is a node credential of
//! its name, from the cluster CA; `novacron node revoke NAME` cuts it off),
//! and serves only the cluster's servers, which relay what agents write.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use novacron_tls::{AgentFiles, ClientAuth, Identity};

use crate::Global;

/// In the role's credentials directory: the address it listens on, once it does.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

#[derive(Args)]
pub struct ServeArgs {
    /// The datastore directory (made if missing; an existing datastore is
    /// served with its backups).
    #[arg(long)]
    dir: PathBuf,
    /// Where to listen (port 0 picks a free one; it is written to
    /// CREDENTIALS/listen.addr).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// The store's name in the cluster (its certificate's).
    #[arg(long)]
    name: String,
    /// The host name or address the server reaches it at (in its certificate).
    #[arg(long)]
    host: String,
    /// Join token (from `novacron token create NAME --join`), needed the
    /// first time, with --server and --ca-cert.
    #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where its certificate and key are kept (default: DIR/.store-tls).
    #[arg(long)]
    credentials: Option<PathBuf>,
}

pub async fn serve(g: &Global, a: ServeArgs) -> Result<()> {
    novacron_api::validate::name("name", &a.name).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    let dir = a.dir.clone();
    let ds = tokio::task::spawn_blocking(move || novacron_backup::Datastore::create(&dir))
        .await?
        .with_context(|| format!("Cannot make {} a datastore", a.dir.display()))?;
    let creds = a.credentials.clone().unwrap_or_else(|| a.dir.join(".store-tls"));
    let files = AgentFiles::in_dir(&creds);
    if !files.exist() {
        join(g, &a, &files).await?;
    }
    let identity = Identity::load(&files.cert, &files.key)?;
    let ca = read(&files.ca)?;
    let tls = novacron_tls::server_config(&identity, &ca, ClientAuth::Required)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", a.listen))?;
    let local = listener.local_addr()?;
    let addr_file = creds.join(LISTEN_ADDR_FILE);
    std::fs::write(&addr_file, format!("{local}\n"))
        .with_context(|| format!("Cannot write {}", addr_file.display()))?;
    tracing::info!(store = %a.name, addr = %local, dir = %a.dir.display(), "backup store listening");
    let router = novacron_backup_remote::serve::router(ds, vec![novacron_backup_remote::serve::SERVER_NAME.into()]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    novacron_tls::serve(
        listener,
        Some(tls),
        router,
        novacron_tls::ServeLimits {
            header_read_timeout: novacron_api::SERVER_IDLE_TIMEOUT,
            ..Default::default()
        },
        shutdown,
    )
    .await?;
    Ok(())
}

/// Gets a certificate from the cluster CA with the join token, as an agent does.
async fn join(g: &Global, a: &ServeArgs, files: &AgentFiles) -> Result<()> {
    let (Some(token), Some(server), Some(ca_path)) = (&a.join_token, &g.server, &g.ca_cert) else {
        bail!(
            "No certificate in {} yet: join with --join-token (from `novacron token create NAME --join`), --server and --ca-cert",
            files.cert.display()
        );
    };
    novacron_agent::certs::join(server, token, ca_path, &a.name, &a.host, files).await?;
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))
}
