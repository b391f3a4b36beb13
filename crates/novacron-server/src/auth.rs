//! Authentication (bearer tokens) and the one place authorization is decided.
//! Token secrets are stored as SHA-256 hashes, passwords as argon2id hashes;
//! the bootstrap admin token's secret exists only in the file written at
//! first start (mode 0600).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::num::NonZeroU32;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use novacron_api::{Metadata, NodeCredential, Permission, Project, Resource, Role, Token, Verb};
use novacron_client::watcher;
use novacron_store::{SharedStore, StoreExt};
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};

use novacron_tls::PeerInfo;

use crate::error::ApiError;
use crate::AppState;

/// Who is calling, resolved from the bearer token.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user, or `token:<name>` for a token without one.
    pub actor: String,
    pub user: Option<String>,
    pub token: String,
    pub role: String,
    pub permissions: Arc<BTreeSet<Permission>>,
    /// The project the token acts in; `None` = every project.
    pub project: Option<String>,
    /// The node, for an agent known by its certificate.
    pub node: Option<String>,
    /// What [`authorize`] saw, for the audit record of this request.
    pub audit: Arc<AuditContext>,
}

impl Principal {
    /// The caller as `GET /v1/whoami` shows it.
    pub fn who(&self) -> novacron_api::WhoAmI {
        novacron_api::WhoAmI {
            actor: self.actor.clone(),
            user: self.user.clone(),
            token: self.token.clone(),
            role: self.role.clone(),
            project: self.project.clone(),
            permissions: self.permissions.iter().map(|x| x.to_string()).collect(),
        }
    }

    /// Whether objects of `project` are visible to this caller.
    pub fn sees(&self, project: &str) -> bool {
        self.project.as_deref().is_none_or(|p| p == project)
    }

    /// The project a new object goes to: the one asked for, else the
    /// token's, else `default`.
    pub fn project_for(&self, asked: Option<String>) -> String {
        asked
            .or_else(|| self.project.clone())
            .unwrap_or_else(novacron_api::default_project)
    }

    pub fn can(&self, resource: Resource, verb: Verb) -> bool {
        self.permissions.contains(&Permission { resource, verb })
    }
}

/// Request facts the audit log records; filled in while the request runs and
/// carried out on the response.
#[derive(Debug, Default)]
pub struct AuditContext {
    pub actor: Mutex<Option<String>>,
    pub project: Mutex<Option<String>>,
}

impl AuditContext {
    pub fn set_actor(&self, actor: &str) {
        *self.actor.lock() = Some(actor.to_string());
    }
    pub fn set_project(&self, project: &str) {
        *self.project.lock() = Some(project.to_string());
    }
    pub fn actor(&self) -> Option<String> {
        self.actor.lock().clone()
    }
    pub fn project(&self) -> Option<String> {
        self.project.lock().clone()
    }
}

/// The single authorization decision. `project` is the project of the object
/// acted on (or created in); `None` for cluster-wide objects and for lists,
/// which are filtered by [`Principal::sees`] instead.
///
/// Rules: the role must grant `resource:verb`; a token limited to a project
/// acts only in that project; changing cluster-wide objects needs a token for
/// every project.
pub fn authorize(p: &Principal, resource: Resource, verb: Verb, project: Option<&str>) -> Result<(), ApiError> {
    if let Some(project) = project {
        p.audit.set_project(project);
    }
    if !p.can(resource, verb) {
        return Err(ApiError::forbidden(format!(
            "role {:?} does not allow {}:{}",
            p.role,
            resource.as_str(),
            verb.as_str()
        )));
    }
    match (project, &p.project) {
        (Some(wanted), Some(own)) if wanted != own => Err(ApiError::forbidden(format!(
            "this token is limited to project {own:?}, not {wanted:?}"
        ))),
        (None, Some(own)) if !resource.in_project() && verb != Verb::Read => Err(ApiError::forbidden(format!(
            "changing {} needs a token for all projects; this one is limited to {own:?}",
            resource.as_str()
        ))),
        _ => Ok(()),
    }
}

fn perms(list: &[(Resource, &[Verb])]) -> BTreeSet<Permission> {
    list.iter()
        .flat_map(|(resource, verbs)| {
            verbs.iter().map(|&verb| Permission {
                resource: *resource,
                verb,
            })
        })
        .collect()
}

/// The built-in roles: admin (everything), operator (VM lifecycle and
/// migration in a project), viewer (read-only), agent (what node agents do)
/// and join (what a join token may do: get an agent certificate).
pub fn builtin_roles() -> Vec<Role> {
    use Resource::*;
    use Verb::*;
    let all_verbs: &[Verb] = &Verb::ALL;
    let admin: Vec<(Resource, &[Verb])> = Resource::ALL.iter().map(|r| (*r, all_verbs)).collect();
    let read: &[Verb] = &[Read];
    let operator = perms(&[
        (Vms, &[Read, Create, Update, Delete, Console, Exec]),
        (Migrations, &[Read, Create, Update]),
        (Images, &[Read, Create, Delete]),
        (Networks, &[Read, Create, Update, Delete]),
        (Volumes, &[Read, Create, Update, Delete]),
        // Update: verify (it reads a whole backup back).
        (Backups, &[Read, Create, Update, Delete]),
        (BackupStores, read),
        (Nodes, read),
        (Projects, read),
        (Events, read),
    ]);
    let viewer = perms(&[
        (Vms, read),
        (Migrations, read),
        (Images, read),
        (Networks, read),
        (Volumes, read),
        (Backups, read),
        (BackupStores, read),
        (Nodes, read),
        (Projects, read),
        (Events, read),
    ]);
    let agent = perms(&[
        (Nodes, &[Read, Status]),
        (Vms, &[Read, Status]),
        (Migrations, &[Read, Status]),
        (Images, read),
        (Networks, read),
        // Writing chunks and committing the backups their VMs' agents take.
        (Backups, &[Read, Status]),
        (BackupStores, read),
    ]);
    // One-time join tokens can only fetch an agent certificate.
    let join = perms(&[(Nodes, &[Create])]);
    // For Prometheus: the metrics, nothing else.
    let monitoring = perms(&[(Metrics, read)]);
    [
        ("admin", perms(&admin)),
        ("operator", operator),
        ("viewer", viewer),
        ("agent", agent),
        ("join", join),
        ("monitoring", monitoring),
    ]
    .into_iter()
    .map(|(name, permissions)| Role {
        metadata: Metadata::new(name, Default::default()),
        permissions,
        builtin: true,
    })
    .collect()
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn random_bytes(buf: &mut [u8]) -> Result<(), std::io::Error> {
    getrandom::getrandom(buf).map_err(|e| std::io::Error::other(e.to_string()))
}

pub fn random_secret() -> Result<String, std::io::Error> {
    let mut buf = [0u8; 32];
    random_bytes(&mut buf)?;
    Ok(hex::encode(buf))
}

/// Argon2id hash (PHC string) of a password.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let failed =
        |e: &dyn std::fmt::Display| ApiError::internal("Cannot hash password", &std::io::Error::other(e.to_string()));
    let mut salt = [0u8; 16];
    random_bytes(&mut salt).map_err(|e| failed(&e))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| failed(&e))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| failed(&e))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Writes a secret file readable only by its owner.
/// The secret the server presents to agents (`DATA_DIR/agent.secret`),
/// made the first time.
pub fn load_or_create_agent_secret(data_dir: &Path) -> Result<String, crate::ServerError> {
    let path = data_dir.join("agent.secret");
    let err = |source| crate::ServerError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(_) => {
            let s = random_secret().map_err(err)?;
            write_secret_file(&path, &s).map_err(err)?;
            Ok(s)
        }
    }
}

pub fn write_secret_file(path: &Path, secret: &str) -> Result<(), std::io::Error> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// In-memory index of live tokens (by secret hash) and custom roles, loaded
/// from the store and kept current by the routes that change them.
#[derive(Default)]
pub struct AuthIndex {
    tokens: RwLock<HashMap<String, Token>>,
    /// Agent certificate SHA-256 -> node name.
    credentials: RwLock<HashMap<String, String>>,
    /// With TLS, agents authenticate with certificates, never with tokens.
    pub agent_tokens_refused: bool,
    custom_roles: RwLock<HashMap<String, Arc<BTreeSet<Permission>>>>,
    builtin: HashMap<String, Arc<BTreeSet<Permission>>>,
}

impl AuthIndex {
    pub async fn load(store: &SharedStore, agent_tokens_refused: bool) -> Result<Self, novacron_store::StoreError> {
        let index = AuthIndex {
            agent_tokens_refused,
            builtin: builtin_roles()
                .into_iter()
                .map(|r| (r.metadata.name, Arc::new(r.permissions)))
                .collect(),
            ..Default::default()
        };
        for t in store.list_all::<Token>().await? {
            index.insert_token(&t);
        }
        for r in store.list_all::<Role>().await? {
            index.set_role(&r);
        }
        for c in store.list_all::<NodeCredential>().await? {
            index.set_credential(&c);
        }
        Ok(index)
    }

    /// With servers sharing the store, tokens, roles and node credentials
    /// change on other servers too: the index follows the store's changes
    /// (a re-list replaces what it holds). Tasks end with the index.
    pub fn follow(self: &Arc<Self>, store: &SharedStore) {
        follow_kind::<Token>(store, self, |index, ev| match ev {
            watcher::Event::Restarted(all) => {
                let live = all.into_iter().filter(|t| t.revoked_at.is_none());
                *index.tokens.write() = live.map(|t| (t.secret_sha256.clone(), t)).collect();
            }
            watcher::Event::Applied(t) if t.revoked_at.is_some() => index.remove_token(&t.secret_sha256),
            watcher::Event::Applied(t) => index.insert_token(&t),
            watcher::Event::Deleted(t) => index.remove_token(&t.secret_sha256),
        });
        follow_kind::<Role>(store, self, |index, ev| match ev {
            watcher::Event::Restarted(all) => {
                *index.custom_roles.write() = all
                    .into_iter()
                    .map(|r| (r.metadata.name, Arc::new(r.permissions)))
                    .collect();
            }
            watcher::Event::Applied(r) => index.set_role(&r),
            watcher::Event::Deleted(r) => index.remove_role(&r.metadata.name),
        });
        follow_kind::<NodeCredential>(store, self, |index, ev| match ev {
            watcher::Event::Restarted(all) => {
                index.credentials.write().clear();
                for c in &all {
                    index.set_credential(c);
                }
            }
            watcher::Event::Applied(c) => index.set_credential(&c),
            watcher::Event::Deleted(c) => index.remove_credential(&c.metadata.name),
        });
    }

    pub fn set_credential(&self, c: &NodeCredential) {
        let mut map = self.credentials.write();
        // The node's current certificate, and the one a renewal replaced
        // (until it expires); a re-join replaces both.
        map.retain(|_, node| *node != c.metadata.name);
        map.insert(c.cert_sha256.clone(), c.metadata.name.clone());
        if let Some(previous) = &c.previous {
            map.insert(previous.cert_sha256.clone(), c.metadata.name.clone());
        }
    }

    /// The node's certificates no longer authenticate it.
    pub fn remove_credential(&self, node: &str) {
        self.credentials.write().retain(|_, n| n != node);
    }

    /// The agent principal of a node presenting a certificate the server issued.
    pub fn authenticate_cert(&self, sha256: &str) -> Option<Principal> {
        let node = self.credentials.read().get(sha256).cloned()?;
        let actor = format!("node:{node}");
        Some(Principal {
            audit: Arc::new(AuditContext {
                actor: Mutex::new(Some(actor.clone())),
                project: Mutex::new(None),
            }),
            actor: actor.clone(),
            user: None,
            token: actor,
            role: "agent".into(),
            permissions: self.permissions("agent").unwrap_or_default(),
            project: None,
            node: Some(node),
        })
    }

    pub fn insert_token(&self, t: &Token) {
        if t.revoked_at.is_some() {
            return;
        }
        self.tokens.write().insert(t.secret_sha256.clone(), t.clone());
    }

    pub fn remove_token(&self, secret_sha256: &str) {
        self.tokens.write().remove(secret_sha256);
    }

    pub fn set_role(&self, r: &Role) {
        self.custom_roles
            .write()
            .insert(r.metadata.name.clone(), Arc::new(r.permissions.clone()));
    }

    pub fn remove_role(&self, name: &str) {
        self.custom_roles.write().remove(name);
    }

    pub fn is_builtin(&self, role: &str) -> bool {
        self.builtin.contains_key(role)
    }

    /// The permissions of a role; an unknown (deleted) role grants nothing.
    pub fn permissions(&self, role: &str) -> Option<Arc<BTreeSet<Permission>>> {
        self.builtin
            .get(role)
            .cloned()
            .or_else(|| self.custom_roles.read().get(role).cloned())
    }

    /// Resolves a bearer secret; expired and revoked tokens resolve to `Err`
    /// with the reason.
    ///
    /// The lookup is by the SHA-256 of the secret, never the secret itself:
    /// how long the map takes to compare keys can at most tell a caller about
    /// the digest of a guess, which cannot be turned back into a secret. So
    /// a hash-map lookup is safe here, where a constant-time scan over every
    /// token would cost O(tokens) per request for nothing.
    pub fn authenticate(&self, secret: &str) -> Result<Principal, &'static str> {
        let token = self
            .tokens
            .read()
            .get(&hash_secret(secret))
            .cloned()
            .ok_or("Invalid token")?;
        if token.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err("Token expired");
        }
        if self.agent_tokens_refused && token.role == "agent" {
            return Err("Agents authenticate with their certificate, not a token");
        }
        let permissions = self.permissions(&token.role).unwrap_or_default();
        let actor = match &token.user {
            Some(u) => u.clone(),
            None => format!("token:{}", token.metadata.name),
        };
        Ok(Principal {
            audit: Arc::new(AuditContext {
                actor: Mutex::new(Some(actor.clone())),
                project: Mutex::new(None),
            }),
            actor,
            user: token.user,
            token: token.metadata.name,
            role: token.role,
            permissions,
            project: token.project,
            node: None,
        })
    }
}

/// Applies the store's changes to objects of `T` to the index until the
/// index is dropped.
fn follow_kind<T>(
    store: &SharedStore,
    index: &Arc<AuthIndex>,
    apply: impl Fn(&AuthIndex, watcher::Event<T>) + Send + 'static,
) where
    T: novacron_api::Object + Send + 'static,
{
    use futures::StreamExt;
    let index = Arc::downgrade(index);
    let source = crate::cache::StoreSource::<T>::new(store.clone());
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher::watcher(source));
        while let Some(ev) = events.next().await {
            let Some(index) = index.upgrade() else {
                return;
            };
            apply(&index, ev);
        }
    });
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("Cannot write token file")]
    Io(#[from] std::io::Error),
    #[error("Cannot store token")]
    Store(#[from] novacron_store::StoreError),
}

/// At first start: the `default` project and the admin token, whose secret
/// goes to `path`.
pub async fn bootstrap(store: &SharedStore, path: &Path) -> Result<(), BootstrapError> {
    if store.get_obj::<Project>("default").await?.is_none() {
        let project = Project {
            metadata: Metadata::new("default", Default::default()),
            quota: Default::default(),
            usage: Default::default(),
        };
        match store.create_obj(&project).await {
            Ok(_) | Err(novacron_store::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if store.get_obj::<Token>("admin").await?.is_some() {
        if !path.exists() {
            tracing::warn!(path = %path.display(), "admin token exists in the store but its file is missing");
        }
        return Ok(());
    }
    let secret = random_secret()?;
    let token = Token {
        metadata: Metadata::new("admin", Default::default()),
        user: None,
        role: "admin".into(),
        project: None,
        expires_at: None,
        revoked_at: None,
        secret_sha256: hash_secret(&secret),
    };
    // Write the file first: a crash between the two leaves a file and no token,
    // which the next start repairs by failing loudly on create_new.
    let _ = std::fs::remove_file(path);
    write_secret_file(path, &secret)?;
    store.create_obj(&token).await?;
    tracing::info!(path = %path.display(), "created admin token");
    Ok(())
}

/// Per-token request rate limit.
pub type RateLimiter = governor::DefaultKeyedRateLimiter<String>;

pub fn rate_limiter(per_s: u32, burst: u32) -> Option<RateLimiter> {
    let quota = governor::Quota::per_second(NonZeroU32::new(per_s)?).allow_burst(NonZeroU32::new(burst)?);
    Some(governor::RateLimiter::keyed(quota))
}

/// Middleware: every request must carry a valid bearer token, within its rate.
pub async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let secret = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let client_cert = req
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .and_then(|c| c.0.cert_sha256.clone());
    // A browser of the dashboard sends its session as a cookie instead.
    let from_cookie = match (secret, &client_cert) {
        (None, None) => crate::ui::session_cookie(req.headers()),
        _ => None,
    };
    if from_cookie.is_some() {
        crate::ui::check_browser_request(&req)?;
    }
    let secret = secret.or(from_cookie.as_deref());
    let principal = match (secret, client_cert) {
        (Some(secret), _) => match state.auth.authenticate(secret) {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(reason, "request with an unusable token");
                return Err(ApiError::unauthorized(reason));
            }
        },
        (None, Some(cert)) => match state.auth.authenticate_cert(&cert) {
            Some(p) => p,
            None => return Err(ApiError::unauthorized("Unknown or revoked agent certificate")),
        },
        (None, None) => return Err(ApiError::unauthorized("Missing bearer token")),
    };
    if let Some(limiter) = &state.rate_limiter {
        if let Err(not_until) = limiter.check_key(&principal.token) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            let mut resp = ApiError::too_many(
                format!("Rate limit of token {:?} exceeded", principal.token),
                wait.as_secs() + 1,
            )
            .into_response();
            resp.extensions_mut().insert(principal.audit);
            return Ok(resp);
        }
    }
    let audit = principal.audit.clone();
    req.extensions_mut().insert(principal);
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(audit);
    Ok(resp)
}

/// Locks out a user name or a source address after repeated login failures.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    /// Failures allowed before a lockout starts.
    pub const FREE_FAILURES: u32 = 5;

    /// Time left in the lockout of any of `keys`, if one is locked.
    pub fn locked(&self, keys: &[String]) -> Option<Duration> {
        let map = self.failures.lock();
        keys.iter()
            .filter_map(|k| map.get(k))
            .filter_map(|(count, last)| {
                let lock = Self::lockout(*count)?;
                lock.checked_sub(last.elapsed())
            })
            .max()
    }

    /// 5 s after the fifth failure, doubling with each further one, up to 15 min.
    fn lockout(count: u32) -> Option<Duration> {
        let over = count.checked_sub(Self::FREE_FAILURES)?;
        Some(Duration::from_secs((5u64 << over.min(8)).min(900)))
    }

    pub fn failed(&self, keys: &[String]) {
        let mut map = self.failures.lock();
        for k in keys {
            let e = map.entry(k.clone()).or_insert((0, Instant::now()));
            // Failures older than an hour are forgotten.
            if e.1.elapsed() > Duration::from_secs(3600) {
                e.0 = 0;
            }
            e.0 += 1;
            e.1 = Instant::now();
        }
    }

    pub fn succeeded(&self, keys: &[String]) {
        let mut map = self.failures.lock();
        for k in keys {
            map.remove(k);
        }
    }
}
