//! `/v1/networks`: virtual L2 networks across hosts, and `/v1/overlay-peers`,
//! the underlay addresses agents send a network's traffic to.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::network::{self, OVERLAY_PEERS};
use novacron_api::{CreateNetwork, Metadata, Network, NetworkStatus, OverlayPeers, Resource, Verb};
use novacron_store::{SharedStore, StoreError, StoreExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::{ipam, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_networks, create_network))
        .routes(routes!(get_network, delete_network))
        .routes(routes!(list_overlay_peers))
}

/// List networks (with the addresses in use), or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/networks", tag = "networks", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Network>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_networks(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    let used = if q.watch.unwrap_or(false) {
        Default::default()
    } else {
        ipam::addresses_used_by_network(&state.store).await?
    };
    list_or_watch::<Network>(&state, &p, q, |nets| {
        for n in nets {
            n.status.addresses_used = used.get(&n.metadata.id).copied().unwrap_or(0);
        }
    })
    .await
}

/// Create a network: a subnet that spans every host that runs one of its
/// VMs, with its own VXLAN identifier.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = Network), (status = 403, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_network(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Network>)> {
    authorize(&p, Resource::Networks, Verb::Create, None)?;
    let req: CreateNetwork = body.parse()?;
    let project = p.project_for(req.project.clone());
    authorize(&p, Resource::Networks, Verb::Create, Some(&project))?;
    let quota = super::projects::require_project(&state, &project).await?.quota;
    let spec = network::network_spec(&req)?;
    let subnet: network::Subnet = spec
        .subnet
        .parse()
        .map_err(|e: String| ApiError::invalid("subnet", e))?;
    // The overlap check, the quota and the create under one lock, so two
    // creates cannot both pass.
    let _guard = state.lock_quota().await?;
    for other in state.store.list_all::<Network>().await? {
        if other.subnet().is_ok_and(|s| s.overlaps(&subnet)) {
            return Err(ApiError::invalid(
                "subnet",
                format!(
                    "{subnet} overlaps network {:?} ({})",
                    other.metadata.name, other.spec.subnet
                ),
            ));
        }
    }
    if state.store.get_obj::<Network>(&req.name).await?.is_some() {
        return Err(ApiError::conflict(format!("network {:?} already exists", req.name)));
    }
    super::projects::check_network_quota(&state, &project, &quota).await?;
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project;
    let vni = ipam::claim_vni(&state.store, &metadata.id).await?;
    let net = Network {
        metadata,
        spec,
        status: NetworkStatus { vni, addresses_used: 0 },
    };
    let net = match state.store.create_obj(&net).await {
        Ok(n) => n,
        Err(e) => {
            ipam::release_owner(&state.store, &net.metadata.id).await;
            return Err(e.into());
        }
    };
    tracing::info!(network = %net.metadata.name, vni, subnet = %net.spec.subnet, "created network");
    Ok((StatusCode::CREATED, Json(net)))
}

/// Get a network by name or id, with the number of addresses in use.
#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path)),
    responses((status = 200, body = Network), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_network(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Network>> {
    let mut net = find_authorized::<Network>(&state, &p, &name, Verb::Read).await?;
    net.status.addresses_used = ipam::addresses_used_by_network(&state.store)
        .await?
        .get(&net.metadata.id)
        .copied()
        .unwrap_or(0);
    Ok(Json(net))
}

/// Delete a network no VM uses.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_network(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let net = find_authorized::<Network>(&state, &p, &name, Verb::Delete).await?;
    // Under the lock VM creates take, so no VM joins it meanwhile.
    let _guard = state.lock_quota().await?;
    let net_name = net.metadata.name.clone();
    super::refuse_while_used(&state, &format!("network {net_name:?}"), |v| {
        v.spec.nics.iter().any(|n| n.network == net_name)
    })
    .await?;
    state
        .store
        .delete_obj::<Network>(&net.metadata.name, Some(net.metadata.resource_version))
        .await?;
    ipam::release_owner(&state.store, &net.metadata.id).await;
    tracing::info!(network = %net.metadata.name, "deleted network");
    Ok(StatusCode::NO_CONTENT)
}

/// The underlay address of every node (one object, `cluster`), or watch it
/// with `watch=true`: agents keep their VXLAN forwarding entries from it.
#[utoipa::path(get, path = "/v1/overlay-peers", tag = "agent", params(ListQuery),
    responses((status = 200, body = novacron_api::List<OverlayPeers>)))]
async fn list_overlay_peers(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<OverlayPeers>(&state, &p, q, |_| {}).await
}

/// Sets (or with `None` removes) a node's underlay address in the peer list.
pub async fn set_overlay_peer(store: &SharedStore, node: &str, underlay_ip: Option<&str>) -> ApiResult<()> {
    let change = |o: &mut OverlayPeers| match underlay_ip {
        Some(ip) => o.peers.insert(node.to_string(), ip.to_string()).as_deref() != Some(ip),
        None => o.peers.remove(node).is_some(),
    };
    loop {
        match store.modify::<OverlayPeers, _>(OVERLAY_PEERS, change).await {
            Ok(_) => return Ok(()),
            Err(StoreError::NotFound { .. }) => {
                let mut first = OverlayPeers {
                    metadata: Metadata::new(OVERLAY_PEERS, Default::default()),
                    peers: Default::default(),
                };
                if !change(&mut first) {
                    return Ok(());
                }
                match store.create_obj(&first).await {
                    Ok(_) => return Ok(()),
                    // Another register made it first: change that one.
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
