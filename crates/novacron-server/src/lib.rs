//! The NovaCron control plane: REST API under `/v1`, watch streams, and the
//! controllers (placement, node liveness) that converge the store's state.

pub mod audit;
pub mod auth;
mod backup_runs;
mod cache;
mod controllers;
pub mod error;
pub mod events;
mod extract;
mod ipam;
pub mod leader;
pub mod limits;
mod metrics;
mod openapi;
pub mod pki;
mod proxy;
mod routes;
pub mod scheduling;
pub(crate) mod shared_secrets;
pub mod totp;
mod ui;
mod watch_hub;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use novacron_store::{EtcdStore, SharedStore, SqliteStore};
pub use pki::ServerTls;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower_http::compression::Predicate;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Where objects live: SQLite in the data dir, or an etcd cluster that
    /// several servers share.
    pub store: StoreLocation,
    /// Where image files are kept (default `DATA_DIR/images`); servers that
    /// share a store must share this too (NFS, say).
    pub images_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// A node is NotReady when its last heartbeat is older than this.
    pub node_grace: Duration,
    /// Requests per second and burst allowed per token; `None` = unlimited.
    pub rate_limit: Option<(u32, u32)>,
    /// Connections open at once (a quarter of them from one address).
    pub max_connections: usize,
    /// Directories backup stores may be added under; empty: anywhere.
    pub backup_store_roots: Vec<PathBuf>,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Default)]
pub enum StoreLocation {
    /// `novacron.db` in the data directory; one server.
    #[default]
    Embedded,
    /// `etcd://HOST:PORT[,...][/ROOT]`; any number of servers.
    Etcd(novacron_store::EtcdUrl),
}

impl std::str::FromStr for StoreLocation {
    type Err = novacron_store::StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" | "sqlite" => Ok(StoreLocation::Embedded),
            _ => Ok(StoreLocation::Etcd(s.parse()?)),
        }
    }
}

#[derive(Debug, Clone)]
pub enum TlsConfig {
    /// Plain HTTP (dev clusters on loopback); agents authenticate with tokens.
    Off,
    /// HTTPS; agents join with one-time tokens and authenticate with
    /// certificates from the cluster CA (`<data-dir>/pki`).
    On {
        /// Certificate and key to serve the API with; default: one from the
        /// cluster CA for localhost, this host's name and `extra_names`.
        given: Option<(PathBuf, PathBuf)>,
        extra_names: Vec<String>,
        /// How long a node certificate is valid; agents renew theirs when
        /// two thirds of it have passed.
        node_cert_lifetime: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Cannot use data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open the store")]
    Store(#[from] novacron_store::StoreError),
    #[error("Cannot create the admin token")]
    Bootstrap(#[from] auth::BootstrapError),
    #[error("Cannot open the audit log")]
    Audit(#[from] audit::AuditError),
    #[error("TLS setup failed")]
    Tls(#[from] novacron_tls::TlsError),
    #[error("Cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
    #[error("Cannot build HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("Cannot build the webhooks' HTTP client")]
    WebhookClient(#[source] reqwest::Error),
    #[error("Cannot open the default backup store: {0}")]
    BackupStore(String),
    #[error("Cannot publish the cluster trust: {0:?}")]
    Trust(ApiError),
}

/// Shared state of every handler: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub auth: Arc<auth::AuthIndex>,
    pub audit: Arc<audit::AuditLog>,
    pub rate_limiter: Option<Arc<auth::RateLimiter>>,
    pub login_throttle: Arc<auth::LoginThrottle>,
    /// Serializes quota checks with the creates they admit; also address
    /// claims for added NICs with the release of removed ones.
    pub quota_lock: Arc<tokio::sync::Mutex<()>>,
    /// Security group membership is recomputed one change at a time.
    pub members_lock: Arc<tokio::sync::Mutex<()>>,
    /// `None` when serving plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
    pub config: Arc<ServerConfig>,
    /// Secret the server presents to agents.
    pub agent_secret: Arc<str>,
    /// Wakes the placement controller.
    pub placement_wakeup: Arc<Notify>,
    /// Every node, kept current by a watch (changes wake placement).
    pub nodes: Arc<cache::Cache<novacron_api::Node>>,
    /// Wakes the backup policy scheduler.
    pub policy_wakeup: Arc<Notify>,
    /// Backup policies with a run going on.
    pub policy_runs: Arc<backup_runs::PolicyRuns>,
    /// Client for calls to agents.
    pub agents: reqwest::Client,
    /// Watch streams and console sessions each token holds open.
    pub open_streams: Arc<limits::OpenStreams>,
    /// One store watch per kind for all API watches.
    pub watch_hub: Arc<watch_hub::WatchHub>,
    pub metrics: Arc<metrics::Metrics>,
    /// Records events and hands them to the webhooks.
    pub events: Arc<events::Recorder>,
    /// Whether this server runs the controllers.
    pub leadership: Arc<leader::Leadership>,
}

/// Held while a quota is checked and what it admits is created: this
/// server's lock, and on a shared store the cluster's too, so two creates
/// through two servers cannot both take the last of a quota.
pub struct QuotaGuard {
    _local: tokio::sync::OwnedMutexGuard<()>,
    cluster: Option<novacron_store::EtcdLock>,
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        if let Some(lock) = self.cluster.take() {
            tokio::spawn(lock.release());
        }
    }
}

impl AppState {
    /// Takes the quota lock (see [`QuotaGuard`]).
    pub async fn lock_quota(&self) -> Result<QuotaGuard, ApiError> {
        let local = self.quota_lock.clone().lock_owned().await;
        let cluster = match self.leadership.etcd() {
            None => None,
            Some(etcd) => Some(
                etcd.lock("quota", Duration::from_secs(15))
                    .await
                    .map_err(|e| ApiError::unavailable(format!("Cannot take the cluster's quota lock: {e}")))?,
            ),
        };
        Ok(QuotaGuard { _local: local, cluster })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.config
            .images_dir
            .clone()
            .unwrap_or_else(|| self.config.data_dir.join("images"))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "NovaCron API", description = "Control plane of the NovaCron VM platform."),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole HTTP application; tests call it without a socket.
pub fn app(state: AppState) -> Router {
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::vms::router())
        .merge(routes::vm_nics::router())
        .merge(routes::vm_stats::router())
        .merge(routes::volumes::router())
        .merge(routes::templates::router())
        .merge(routes::rebuild::router())
        .merge(routes::snapshots::router())
        .merge(routes::backups::router())
        .merge(routes::backup_chunks::router())
        .merge(routes::backup_policies::router())
        .merge(routes::backup_sync::router())
        .merge(routes::events::router())
        .merge(routes::nodes::router())
        .merge(routes::pki::router())
        .merge(routes::images::router())
        .merge(routes::image_download::router())
        .merge(routes::migrations::router())
        .merge(routes::networks::router())
        .merge(routes::security_groups::router())
        .merge(routes::identity::router())
        .merge(routes::projects::router())
        .merge(routes::audit::router())
        .merge(routes::scheduler::router())
        .merge(metrics::router())
        .split_for_parts();
    // Login needs no token, so it is routed outside the token layer but documented with the rest.
    let (login, login_doc) = OpenApiRouter::new()
        .merge(routes::identity::login_router())
        .split_for_parts();
    let mut openapi = openapi;
    openapi.merge(login_doc);
    openapi::declare_layer_responses(&mut openapi);
    // Served as JSON built once. A document that cannot be encoded is served
    // as `null` (the OpenAPI tests then fail) rather than stopping the server.
    let mut openapi = serde_json::to_value(&openapi).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode the OpenAPI document");
        serde_json::Value::Null
    });
    openapi::link_creates_to_their_objects(&mut openapi);
    openapi::constrain_field_selectors(&mut openapi, &routes::selectable_fields());
    let openapi = Arc::new(openapi);
    let protected = api
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .merge(routes::health::router())
        .merge(ui::router())
        .merge(login)
        .merge(protected)
        .fallback(|| async { ApiError::not_found("Route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        // Lists of thousands of objects shrink tenfold; watch and progress
        // streams stay as they are (a compressor holds lines back).
        .layer(
            tower_http::compression::CompressionLayer::new().compress_when(
                tower_http::compression::predicate::DefaultPredicate::new()
                    .and(tower_http::compression::predicate::NotForContentType::new(
                        "application/x-ndjson",
                    ))
                    // Disk images and backup chunks: mostly incompressible, and large.
                    .and(tower_http::compression::predicate::NotForContentType::new(
                        "application/octet-stream",
                    )),
            ),
        )
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Opens the store, bootstraps secrets, builds the state.
pub async fn prepare(config: ServerConfig) -> Result<AppState, ServerError> {
    let dir_err = |source| ServerError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;
    let images_dir = config
        .images_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("images"));
    std::fs::create_dir_all(&images_dir).map_err(|source| ServerError::DataDir {
        path: images_dir.display().to_string(),
        source,
    })?;
    let (store, etcd): (SharedStore, _) = match &config.store {
        StoreLocation::Embedded => (Arc::new(SqliteStore::open(&config.data_dir.join("novacron.db"))?), None),
        StoreLocation::Etcd(url) => {
            let etcd = Arc::new(EtcdStore::connect(url).await?);
            etcd.spawn_compactor();
            tracing::info!(members = ?url.endpoints, root = %url.root, "store on etcd");
            (etcd.clone() as SharedStore, Some(etcd))
        }
    };
    if etcd.is_some() {
        shared_secrets::share(&store, &config.data_dir).await?;
    }
    let leadership = Arc::new(leader::Leadership::new(etcd, server_id()));
    auth::bootstrap(&store, &config.data_dir.join("admin.token")).await?;
    routes::backups::ensure_default_store(&store, &config.data_dir)
        .await
        .map_err(|e| ServerError::BackupStore(e.message))?;
    let audit = Arc::new(audit::AuditLog::open(store.clone(), config.data_dir.join("audit.head")).await?);
    let agent_secret = auth::load_or_create_agent_secret(&config.data_dir)?;
    let tls = match &config.tls {
        TlsConfig::Off => None,
        TlsConfig::On {
            given,
            extra_names,
            node_cert_lifetime,
        } => {
            let mut names = local_names(config.listen);
            names.extend(extra_names.iter().cloned());
            let given = match given {
                Some((cert, key)) => Some(novacron_tls::Identity::load(cert, key)?),
                None => None,
            };
            let tls = ServerTls::new(&config.data_dir.join("pki"), given, names, *node_cert_lifetime)?;
            tls.sync_trust(&store).await.map_err(ServerError::Trust)?;
            Some(Arc::new(tls))
        }
    };
    let auth = Arc::new(auth::AuthIndex::load(&store, tls.is_some()).await?);
    if leadership.etcd().is_some() {
        auth.follow(&store);
    }
    let rate_limiter = config
        .rate_limit
        .and_then(|(per_s, burst)| auth::rate_limiter(per_s, burst))
        .map(Arc::new);
    let agents_builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(novacron_api::POOL_IDLE_TIMEOUT);
    let agents = match &tls {
        Some(t) => agents_builder.use_preconfigured_tls((*t.agent_client).clone()),
        None => agents_builder,
    }
    .build()
    .map_err(ServerError::Http)?;
    let webhooks = Arc::new(webhooks::Dispatcher::new(store.clone()).map_err(ServerError::WebhookClient)?);
    let events = Arc::new(events::Recorder::new(store.clone(), webhooks));
    let placement_wakeup = Arc::new(Notify::new());
    let store_for_nodes = store.clone();
    Ok(AppState {
        events,
        store,
        auth,
        audit,
        rate_limiter,
        login_throttle: Default::default(),
        quota_lock: Default::default(),
        members_lock: Default::default(),
        tls,
        config: Arc::new(config),
        agent_secret: agent_secret.into(),
        nodes: cache::Cache::start(store_for_nodes, placement_wakeup.clone()),
        placement_wakeup,
        policy_wakeup: Arc::new(Notify::new()),
        policy_runs: Default::default(),
        agents,
        open_streams: Default::default(),
        watch_hub: Default::default(),
        metrics: Default::default(),
        leadership,
    })
}

/// This server among its peers: the host name and a random suffix (a
/// restarted server is a new candidate).
fn server_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", host.trim().trim_matches('-').replace(' ', "-"), &suffix[..8])
}

/// Names the generated server certificate is valid for.
fn local_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
    }
    names
}

/// Runs the server until `shutdown` resolves.
/// File in the data dir with the address the server listens on.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listen = config.listen;
    let state = prepare(config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Listen { addr: listen, source })?;
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    let scheme = if state.tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %local, scheme, data_dir = %state.config.data_dir.display(), "server listening");
    // With `--listen HOST:0` this is where to find the port it got.
    let addr_file = state.config.data_dir.join(LISTEN_ADDR_FILE);
    std::fs::write(&addr_file, format!("{local}\n")).map_err(|source| ServerError::DataDir {
        path: addr_file.display().to_string(),
        source,
    })?;
    let controllers = leader::spawn(state.clone());
    // Watch streams never end by themselves, so graceful shutdown gets a
    // short grace period and then the server stops regardless.
    let stop = tokio_util::sync::CancellationToken::new();
    let tls = state.tls.as_ref().map(|t| t.listener.clone());
    let limits = novacron_tls::ServeLimits {
        max_connections: state.config.max_connections,
        max_connections_per_ip: (state.config.max_connections / 4).max(1),
        header_read_timeout: novacron_api::SERVER_IDLE_TIMEOUT,
        ..Default::default()
    };
    let serve = novacron_tls::serve(listener, tls, app(state), limits, stop.clone());
    let serve = async move { serve.await.map_err(ServerError::Serve) };
    let result = tokio::select! {
        r = serve => r,
        _ = async {
            shutdown.await;
            stop.cancel();
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    controllers.abort();
    result
}
