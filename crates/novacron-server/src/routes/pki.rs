//! Certificates: the published trust (`/v1/trust`), node certificate
//! renewal and revocation, CA rotation.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::{ClusterTrust, JoinedNode, Node, NodeCredential, Resource, RevokedCert, Verb};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use crate::{AppState, ServerTls};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_trust))
        .routes(routes!(renew_node_certificate))
        .routes(routes!(revoke_node))
        .routes(routes!(rotate_ca))
        .routes(routes!(finish_ca_rotation))
}

fn tls(state: &AppState) -> ApiResult<Arc<ServerTls>> {
    state
        .tls
        .clone()
        .ok_or_else(|| ApiError::conflict("this server runs without TLS: there are no certificates"))
}

/// What every party trusts: the CAs and the revoked certificates (one
/// object, `cluster`). Watch it with `watch=true`.
#[utoipa::path(get, path = "/v1/trust", tag = "nodes", params(ListQuery),
    responses((status = 200, body = novacron_api::List<ClusterTrust>)))]
async fn list_trust(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<ClusterTrust>(&state, &p, q, |_| {}).await
}

/// Agent: a new certificate for its own node, issued by the current CA.
/// The one it replaces keeps working until it expires.
#[utoipa::path(post, path = "/v1/nodes/{name}/certificate", tag = "agent", params(("name" = String, Path)),
    responses((status = 200, body = JoinedNode), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody)))]
async fn renew_node_certificate(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<JoinedNode>> {
    authorize(&p, Resource::Nodes, Verb::Status, None)?;
    // Only the node itself, with its certificate: a token holder could
    // otherwise take a node's identity.
    if p.node.as_deref() != Some(name.as_str()) {
        return Err(ApiError::forbidden(
            "only the node itself renews its certificate (with the certificate it has)",
        ));
    }
    let tls = tls(&state)?;
    let credential = state
        .store
        .get_obj::<NodeCredential>(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("credential of node {name:?}")))?;
    if credential.hosts.is_empty() {
        return Err(ApiError::conflict(
            "this node's credential does not record its hosts: join the node again",
        ));
    }
    let (identity, ca_pem) = tls
        .issue_node_cert(&state.store, &state.auth, &name, credential.hosts, true)
        .await?;
    tracing::info!(node = %name, "node certificate renewed");
    Ok(Json(JoinedNode {
        cert_pem: identity.cert_pem,
        key_pem: identity.key_pem,
        ca_pem,
    }))
}

/// Revoke a node's certificates: the server refuses them at once, every
/// agent as soon as it sees the published trust. The node can join again
/// with a new join token.
#[utoipa::path(post, path = "/v1/nodes/{name}/revoke", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, body = Vec<RevokedCert>), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody)))]
async fn revoke_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<RevokedCert>>> {
    authorize(&p, Resource::Nodes, Verb::Delete, None)?;
    let tls = tls(&state)?;
    let revoked = tls.revoke_node(&state.store, &state.auth, &name).await?;
    // The node is down as far as scheduling goes: nothing it says is heard.
    if state.store.get_obj::<Node>(&name).await?.is_some() {
        state
            .store
            .modify::<Node, _>(&name, |n| {
                n.status.ready = false;
                n.status.ready_reason = Some("Its certificate was revoked".into());
                n.status.last_transition = Some(chrono::Utc::now());
                true
            })
            .await?;
    }
    tracing::warn!(node = %name, by = %p.actor, certificates = revoked.len(), "node certificates revoked");
    Ok(Json(revoked))
}

/// Start a CA rotation: a new CA issues from now on; both are trusted until
/// the rotation is finished. Agents renew onto the new CA by themselves.
#[utoipa::path(post, path = "/v1/ca/rotate", tag = "nodes",
    responses((status = 200, body = ClusterTrust), (status = 409, body = novacron_api::ErrorBody)))]
async fn rotate_ca(State(state): State<AppState>, Extension(p): Extension<Principal>) -> ApiResult<Json<ClusterTrust>> {
    authorize(&p, Resource::Nodes, Verb::Delete, None)?;
    let trust = tls(&state)?.rotate_ca(&state.store).await?;
    share_ca(&state).await?;
    tracing::warn!(by = %p.actor, "CA rotation started");
    Ok(Json(trust))
}

/// With servers sharing the store, the stored CA follows this server's.
async fn share_ca(state: &AppState) -> ApiResult<()> {
    if state.leadership.etcd().is_none() {
        return Ok(());
    }
    crate::shared_secrets::store_changed(&state.store, &state.config.data_dir)
        .await
        .map_err(|e| ApiError::internal("Cannot store the rotated CA for the other servers", &e))
}

/// Finish a CA rotation: the previous CA is no longer trusted. Refused
/// while a node still holds a certificate from it.
#[utoipa::path(post, path = "/v1/ca/finish-rotation", tag = "nodes",
    responses((status = 200, body = ClusterTrust), (status = 409, body = novacron_api::ErrorBody)))]
async fn finish_ca_rotation(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<ClusterTrust>> {
    authorize(&p, Resource::Nodes, Verb::Delete, None)?;
    let tls = tls(&state)?;
    let trust = state
        .store
        .get_obj::<ClusterTrust>(novacron_api::CLUSTER_TRUST)
        .await?
        .ok_or_else(|| ApiError::not_found("cluster trust"))?;
    let waiting = nodes_on_previous_ca(&state, &trust).await?;
    if !waiting.is_empty() {
        return Err(ApiError::conflict(format!(
            "nodes still hold certificates from the previous CA: {}; wait for them to renew, or revoke them",
            waiting.join(", ")
        )));
    }
    let trust = tls.finish_ca_rotation(&state.store).await?;
    share_ca(&state).await?;
    tracing::warn!(by = %p.actor, "CA rotation finished");
    Ok(Json(trust))
}

/// Nodes whose current certificate was issued before the rotation began.
async fn nodes_on_previous_ca(state: &AppState, trust: &ClusterTrust) -> ApiResult<Vec<String>> {
    let Some(since) = trust.rotation_started else {
        return Ok(Vec::new());
    };
    let credentials = state.store.list_all::<NodeCredential>().await?;
    Ok(credentials
        .into_iter()
        .filter(|c| c.issued_at.is_none_or(|at| at < since))
        .map(|c| c.metadata.name)
        .collect())
}
