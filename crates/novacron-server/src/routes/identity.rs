//! Identity: login, users, tokens and roles.

use std::net::SocketAddr;

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{Duration as ChronoDuration, Utc};
use novacron_api::{
    expand_permissions, validate, CreateRole, CreateToken, CreateUser, IssuedToken, List, Login, Metadata, Project,
    Resource, Role, Token, TotpEnrollment, User, Verb, WhoAmI,
};
use novacron_store::StoreExt;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use super::projects::require_project;
use crate::auth::{authorize, hash_password, hash_secret, random_secret, verify_password, AuditContext, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::{totp, AppState};

/// Login lifetime when none is asked for, and the longest allowed.
const LOGIN_TTL_S: u64 = 12 * 3600;
const MAX_TTL_S: u64 = 30 * 24 * 3600;
/// Longest lifetime a token manager may give: ten years (a larger one
/// overflowed the expiry past what RFC 3339 writes, year 9999).
const MAX_MANAGER_TTL_S: u64 = novacron_api::MAX_TOKEN_TTL_S;
const MIN_PASSWORD: usize = 8;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, delete_user))
        .routes(routes!(enable_totp))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_roles, create_role))
        .routes(routes!(get_role, delete_role))
}

/// Routes that need no token.
pub fn login_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login))
}

// ---------------------------------------------------------------- login

/// Exchange a user name and password (and TOTP code) for an API token.
/// Repeated failures lock the user name and the source address out for a
/// growing time (429 with Retry-After).
#[utoipa::path(post, path = "/v1/login", tag = "identity", request_body = Login, security(()),
    responses((status = 200, body = IssuedToken), (status = 401, body = novacron_api::ErrorBody),
        (status = 429, body = novacron_api::ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    source: Option<Extension<ConnectInfo<novacron_tls::PeerInfo>>>,
    body: JsonBody,
) -> Response {
    let req: Login = match body.parse() {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let audit = Arc::new(AuditContext::default());
    audit.set_actor(&req.user);
    let mut resp = match login_inner(&state, source.map(|c| c.0 .0.addr), req).await {
        Ok(issued) => Json(issued).into_response(),
        Err(e) => e.into_response(),
    };
    resp.extensions_mut().insert(audit);
    resp
}

pub(crate) async fn login_inner(state: &AppState, source: Option<SocketAddr>, req: Login) -> ApiResult<IssuedToken> {
    let mut keys = vec![format!("user:{}", req.user)];
    if let Some(addr) = source {
        keys.push(format!("addr:{}", addr.ip()));
    }
    if let Some(wait) = state.login_throttle.locked(&keys) {
        return Err(ApiError::too_many(
            "Too many failed logins; try again later",
            wait.as_secs() + 1,
        ));
    }
    let user = state.store.get_obj::<User>(&req.user).await?;
    // Hash even for unknown users, so timing does not tell which names exist.
    let phc = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_default();
    let password = req.password.clone();
    let password_ok = tokio::task::spawn_blocking(move || {
        if phc.is_empty() {
            let _ = hash_password(&password);
            false
        } else {
            verify_password(&password, &phc)
        }
    })
    .await
    .unwrap_or(false);
    let user = match user {
        Some(u) if password_ok => u,
        _ => {
            state.login_throttle.failed(&keys);
            return Err(ApiError::unauthorized("Invalid user name or password"));
        }
    };
    if user.totp_enabled {
        let secret = user.totp_secret.as_deref().unwrap_or_default();
        let code_ok = req
            .totp
            .as_deref()
            .is_some_and(|code| totp::verify(secret, code, Utc::now().timestamp()));
        if !code_ok {
            state.login_throttle.failed(&keys);
            return Err(ApiError::unauthorized(if req.totp.is_some() {
                "Invalid TOTP code"
            } else {
                "This user needs a TOTP code"
            }));
        }
    }
    state.login_throttle.succeeded(&keys);
    let binding = match &req.project {
        Some(project) => user
            .bindings
            .iter()
            .find(|b| b.project.as_deref() == Some(project))
            .or_else(|| user.bindings.iter().find(|b| b.project.is_none()))
            .map(|b| (b.role.clone(), Some(project.clone()))),
        None => match user.bindings.as_slice() {
            [only] => Some((only.role.clone(), only.project.clone())),
            many => many
                .iter()
                .find(|b| b.project.is_none())
                .map(|b| (b.role.clone(), None)),
        },
    };
    let Some((role, project)) = binding else {
        let projects: Vec<String> = user.bindings.iter().map(|b| b.to_string()).collect();
        return Err(ApiError::invalid(
            "project",
            format!(
                "choose a project; user {:?} has roles {}",
                user.metadata.name,
                if projects.is_empty() {
                    "nowhere".into()
                } else {
                    projects.join(", ")
                }
            ),
        ));
    };
    let ttl = req.ttl_s.unwrap_or(LOGIN_TTL_S);
    if !(60..=MAX_TTL_S).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_s",
            format!("ttl must be between 60 and {MAX_TTL_S} s"),
        ));
    }
    let suffix = &random_secret().map_err(|e| ApiError::internal("Cannot get random bytes", &e))?[..8];
    let name = format!("login-{}-{suffix}", user.metadata.name);
    let issued = issue_token(state, &name, Some(user.metadata.name.clone()), role, project, Some(ttl)).await?;
    tracing::info!(user = %user.metadata.name, token = %name, "login");
    Ok(issued)
}

async fn issue_token(
    state: &AppState,
    name: &str,
    user: Option<String>,
    role: String,
    project: Option<String>,
    ttl_s: Option<u64>,
) -> ApiResult<IssuedToken> {
    let secret = random_secret().map_err(|e| ApiError::internal("Cannot get random bytes", &e))?;
    let mut metadata = Metadata::new(name, Default::default());
    metadata.project = project.clone().unwrap_or_default();
    let token = Token {
        metadata,
        user,
        role,
        project,
        expires_at: ttl_s.map(|s| Utc::now() + ChronoDuration::seconds(s as i64)),
        revoked_at: None,
        secret_sha256: hash_secret(&secret),
    };
    let mut token = state.store.create_obj(&token).await?;
    state.auth.insert_token(&token);
    token.secret_sha256.clear();
    Ok(IssuedToken { token, secret })
}

/// The caller's identity and permissions.
#[utoipa::path(get, path = "/v1/whoami", tag = "identity", responses((status = 200, body = WhoAmI)))]
async fn whoami(Extension(p): Extension<Principal>) -> Json<WhoAmI> {
    Json(p.who())
}

// ---------------------------------------------------------------- users

fn redact_user(mut u: User) -> User {
    u.password_hash.clear();
    u.totp_secret = None;
    u
}

async fn check_bindings(state: &AppState, bindings: &[novacron_api::RoleBinding]) -> ApiResult<()> {
    for (i, b) in bindings.iter().enumerate() {
        if state.auth.permissions(&b.role).is_none() {
            return Err(ApiError::invalid(
                &format!("bindings[{i}].role"),
                format!("unknown role {:?}", b.role),
            ));
        }
        if let Some(project) = &b.project {
            if state.store.get_obj::<Project>(project).await?.is_none() {
                return Err(ApiError::invalid(
                    &format!("bindings[{i}].project"),
                    format!("unknown project {project:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// List users.
#[utoipa::path(get, path = "/v1/users", tag = "identity", responses((status = 200, body = List<User>)))]
async fn list_users(State(state): State<AppState>, Extension(p): Extension<Principal>) -> ApiResult<Json<List<User>>> {
    authorize(&p, Resource::Users, Verb::Read, None)?;
    let items = state
        .store
        .list_all::<User>()
        .await?
        .into_iter()
        .map(redact_user)
        .collect();
    Ok(Json(List {
        items,
        continue_token: None,
        resource_version: state.store.revision().await?,
    }))
}

/// Create a user with role bindings (`role` in `project`, or in every project).
#[utoipa::path(post, path = "/v1/users", tag = "identity", request_body = CreateUser,
    responses((status = 201, body = User), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_user(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<User>)> {
    authorize(&p, Resource::Users, Verb::Create, None)?;
    let req: CreateUser = body.parse()?;
    validate::name("name", &req.name)?;
    if !(MIN_PASSWORD..=1024).contains(&req.password.chars().count()) {
        return Err(ApiError::invalid(
            "password",
            format!("password must be {MIN_PASSWORD} to 1024 characters"),
        ));
    }
    check_bindings(&state, &req.bindings).await?;
    if state.store.get_obj::<User>(&req.name).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("user {:?} already exists", req.name),
        ));
    }
    let password = req.password;
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("Password hashing failed", &e))??;
    let user = User {
        metadata: Metadata::new(&req.name, Default::default()),
        bindings: req.bindings,
        password_hash,
        totp_secret: None,
        totp_enabled: false,
    };
    let user = state.store.create_obj(&user).await?;
    tracing::info!(user = %user.metadata.name, "created user");
    Ok((StatusCode::CREATED, Json(redact_user(user))))
}

/// Get a user.
#[utoipa::path(get, path = "/v1/users/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = User), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_user(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(redact_user(
        find_authorized::<User>(&state, &p, &name, Verb::Read).await?,
    )))
}

/// Delete a user and revoke all of their tokens.
#[utoipa::path(delete, path = "/v1/users/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody)))]
async fn delete_user(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let user = find_authorized::<User>(&state, &p, &name, Verb::Delete).await?;
    let name = user.metadata.name;
    // Tokens first: a failure part-way leaves a user without tokens, never tokens without a user.
    for t in state.store.list_all::<Token>().await? {
        if t.user.as_deref() == Some(name.as_str()) && t.revoked_at.is_none() {
            revoke(&state, &t.metadata.name).await?;
        }
    }
    state.store.delete_obj::<User>(&name, None).await?;
    tracing::info!(user = %name, "deleted user");
    Ok(StatusCode::NO_CONTENT)
}

/// Turn on the TOTP second factor for a user (themselves, or anyone with
/// `users:update`). The secret is shown once; later logins need a code.
#[utoipa::path(post, path = "/v1/users/{name}/totp", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = TotpEnrollment), (status = 404, body = novacron_api::ErrorBody)))]
async fn enable_totp(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<TotpEnrollment>> {
    if p.user.as_deref() != Some(name.as_str()) {
        authorize(&p, Resource::Users, Verb::Update, None)?;
    }
    let secret = totp::new_secret().map_err(|e| ApiError::internal("Cannot get random bytes", &e))?;
    let stored = secret.clone();
    state
        .store
        .modify::<User, _>(&name, move |u| {
            u.totp_secret = Some(stored.clone());
            u.totp_enabled = true;
            true
        })
        .await?;
    tracing::info!(user = %name, "TOTP enabled");
    Ok(Json(TotpEnrollment {
        uri: format!("otpauth://totp/NovaCron:{name}?secret={secret}&issuer=NovaCron"),
        secret,
    }))
}

// ---------------------------------------------------------------- tokens

fn owns(p: &Principal, t: &Token) -> bool {
    p.user.is_some() && t.user == p.user
}

/// List the caller's tokens (all tokens with `tokens:read`). Secrets are never shown.
#[utoipa::path(get, path = "/v1/tokens", tag = "identity", responses((status = 200, body = List<Token>)))]
async fn list_tokens(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<List<Token>>> {
    let all = p.can(Resource::Tokens, Verb::Read);
    let items = state
        .store
        .list_all::<Token>()
        .await?
        .into_iter()
        .filter(|t| all || owns(&p, t))
        .map(|mut t| {
            t.secret_sha256.clear();
            t
        })
        .collect();
    Ok(Json(List {
        items,
        continue_token: None,
        resource_version: state.store.revision().await?,
    }))
}

/// Create a token for the caller, with at most the caller's permissions and
/// project. The secret is in the answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "identity", request_body = CreateToken,
    responses((status = 201, body = IssuedToken), (status = 403, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_token(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<IssuedToken>)> {
    // A node's certificate speaks for its node only; a token it issued would not.
    if let Some(node) = &p.node {
        return Err(ApiError::forbidden(format!("node {node:?} cannot issue tokens")));
    }
    // Any other caller may issue a token with a share of its own rights:
    // which share is in the body.
    let req: CreateToken = body.parse()?;
    validate::name("name", &req.name)?;
    if req.join {
        return create_join_token(&state, &p, req).await;
    }
    let Some(wanted) = state.auth.permissions(&req.role) else {
        return Err(ApiError::invalid("role", format!("unknown role {:?}", req.role)));
    };
    if let Some(missing) = wanted.iter().find(|perm| !p.permissions.contains(perm)) {
        return Err(ApiError::forbidden(format!(
            "role {:?} includes {missing}, which your token does not have",
            req.role
        )));
    }
    let project = match (&p.project, req.project) {
        (Some(own), Some(asked)) if *own != asked => {
            return Err(ApiError::forbidden(format!(
                "this token is limited to project {own:?}, not {asked:?}"
            )))
        }
        (Some(own), _) => Some(own.clone()),
        (None, asked) => asked,
    };
    if let Some(project) = &project {
        require_project(&state, project).await?;
    }
    let manager = p.can(Resource::Tokens, Verb::Create) && p.project.is_none();
    let ttl = match req.ttl_s {
        Some(t) if !(60..=MAX_TTL_S).contains(&t) && !manager => {
            return Err(ApiError::invalid(
                "ttl_s",
                format!("ttl must be between 60 and {MAX_TTL_S} s"),
            ))
        }
        Some(0) => return Err(ApiError::invalid("ttl_s", "ttl must be positive")),
        Some(t) if t > MAX_MANAGER_TTL_S => {
            return Err(ApiError::invalid(
                "ttl_s",
                format!("ttl must be at most {MAX_MANAGER_TTL_S} s (ten years)"),
            ))
        }
        Some(t) => Some(t),
        None if manager => None,
        None => Some(MAX_TTL_S),
    };
    let issued = issue_token(&state, &req.name, p.user.clone(), req.role, project, ttl).await?;
    tracing::info!(token = %req.name, by = %p.actor, "created token");
    Ok((StatusCode::CREATED, Json(issued)))
}

/// A one-time token with which an agent fetches its certificate.
async fn create_join_token(
    state: &AppState,
    p: &Principal,
    req: CreateToken,
) -> ApiResult<(StatusCode, Json<IssuedToken>)> {
    authorize(p, Resource::Nodes, Verb::Create, None)?;
    if state.tls.is_none() {
        return Err(ApiError::conflict(
            "this server runs without TLS; agents authenticate with tokens",
        ));
    }
    let ttl = req.ttl_s.unwrap_or(3600);
    if !(60..=MAX_TTL_S).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_s",
            format!("ttl must be between 60 and {MAX_TTL_S} s"),
        ));
    }
    let issued = issue_token(state, &req.name, p.user.clone(), "join".into(), None, Some(ttl)).await?;
    tracing::info!(token = %req.name, by = %p.actor, "created join token");
    Ok((StatusCode::CREATED, Json(issued)))
}

pub(crate) async fn revoke(state: &AppState, name: &str) -> ApiResult<Token> {
    let t = state
        .store
        .modify::<Token, _>(name, |t| {
            if t.revoked_at.is_some() {
                return false;
            }
            t.revoked_at = Some(Utc::now());
            true
        })
        .await?;
    state.auth.remove_token(&t.secret_sha256);
    Ok(t)
}

/// Revoke a token: the caller's own, or any with `tokens:delete`.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Token), (status = 404, body = novacron_api::ErrorBody)))]
async fn revoke_token(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Token>> {
    let t = state.store.get_obj::<Token>(&name).await?;
    match t {
        Some(t) if owns(&p, &t) => {}
        Some(_) => authorize(&p, Resource::Tokens, Verb::Delete, None)?,
        None => return Err(ApiError::not_found(format!("token {name:?}"))),
    }
    let mut t = revoke(&state, &name).await?;
    tracing::info!(token = %name, by = %p.actor, "revoked token");
    t.secret_sha256.clear();
    Ok(Json(t))
}

// ---------------------------------------------------------------- roles

/// List roles, built-in and custom.
#[utoipa::path(get, path = "/v1/roles", tag = "identity", responses((status = 200, body = List<Role>)))]
async fn list_roles(State(state): State<AppState>, Extension(p): Extension<Principal>) -> ApiResult<Json<List<Role>>> {
    authorize(&p, Resource::Roles, Verb::Read, None)?;
    let mut items = crate::auth::builtin_roles();
    items.extend(state.store.list_all::<Role>().await?);
    Ok(Json(List {
        items,
        continue_token: None,
        resource_version: state.store.revision().await?,
    }))
}

/// Create a custom role from `resource:verb` permissions (`*` allowed).
#[utoipa::path(post, path = "/v1/roles", tag = "identity", request_body = CreateRole,
    responses((status = 201, body = Role), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_role(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Role>)> {
    authorize(&p, Resource::Roles, Verb::Create, None)?;
    let req: CreateRole = body.parse()?;
    validate::name("name", &req.name)?;
    if state.auth.is_builtin(&req.name) {
        return Err(ApiError::conflict(format!("{:?} is a built-in role", req.name)));
    }
    let permissions = expand_permissions(&req.permissions).map_err(|m| ApiError::invalid("permissions", m))?;
    if permissions.is_empty() {
        return Err(ApiError::invalid("permissions", "a role needs at least one permission"));
    }
    let role = Role {
        metadata: Metadata::new(&req.name, Default::default()),
        permissions,
        builtin: false,
    };
    let role = state.store.create_obj(&role).await?;
    state.auth.set_role(&role);
    Ok((StatusCode::CREATED, Json(role)))
}

/// Get a role.
#[utoipa::path(get, path = "/v1/roles/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Role), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_role(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Role>> {
    authorize(&p, Resource::Roles, Verb::Read, None)?;
    if let Some(r) = crate::auth::builtin_roles()
        .into_iter()
        .find(|r| r.metadata.name == name)
    {
        return Ok(Json(r));
    }
    Ok(Json(find_authorized::<Role>(&state, &p, &name, Verb::Read).await?))
}

/// Delete a custom role. Tokens and users holding it lose its permissions.
#[utoipa::path(delete, path = "/v1/roles/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_role(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    authorize(&p, Resource::Roles, Verb::Delete, None)?;
    if state.auth.is_builtin(&name) {
        return Err(ApiError::conflict(format!("{name:?} is a built-in role")));
    }
    let role = find_authorized::<Role>(&state, &p, &name, Verb::Delete).await?;
    state.store.delete_obj::<Role>(&role.metadata.name, None).await?;
    state.auth.remove_role(&role.metadata.name);
    Ok(StatusCode::NO_CONTENT)
}
