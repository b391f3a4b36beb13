//! `/v1/nodes`: registration and heartbeats from agents; list, get, cordon.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use chrono::Utc;
use novacron_api::{
    validate, JoinNode, JoinedNode, Metadata, Node, NodeSpec, NodeStatus, RegisterNode, RegisterNodeResponse, Resource,
    Resources, Verb, Vm,
};
use novacron_store::{StoreError, StoreExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node, delete_node))
        .routes(routes!(register_node))
        .routes(routes!(join_node))
        .routes(routes!(heartbeat))
        .routes(routes!(cordon_node))
        .routes(routes!(uncordon_node))
}

/// Fills in what bound VMs reserve on each node.
fn fill_allocation(nodes: &mut [Node], vms: &[Vm]) {
    for n in nodes {
        let bound = vms
            .iter()
            .filter(|v| v.status.node.as_deref() == Some(n.metadata.name.as_str()));
        let mut alloc = Resources::default();
        let mut count = 0;
        for v in bound {
            alloc.vcpus += v.spec.vcpus;
            alloc.memory_mib += v.spec.memory_mib;
            count += 1;
        }
        n.status.allocated = alloc;
        n.status.vm_count = count;
    }
}

/// List nodes (paginated), or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Node>)))]
async fn list_nodes(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    authorize(&p, Resource::Nodes, Verb::Read, None)?;
    let vms = if q.watch.unwrap_or(false) {
        Vec::new()
    } else {
        state.store.list_all::<Vm>().await?
    };
    list_or_watch::<Node>(&state, &p, q, move |nodes| fill_allocation(nodes, &vms)).await
}

/// Get a node by name or id.
#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    let mut node = find_authorized::<Node>(&state, &p, &name, Verb::Read).await?;
    let vms = state.store.list_all::<Vm>().await?;
    fill_allocation(std::slice::from_mut(&mut node), &vms);
    Ok(Json(node))
}

/// Remove a node that has no VMs. Its certificates are revoked: it can
/// join again with a new join token.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let node = find_authorized::<Node>(&state, &p, &name, Verb::Delete).await?;
    let vms = state.store.list_all::<Vm>().await?;
    let bound = vms
        .iter()
        .filter(|v| v.status.node.as_deref() == Some(node.metadata.name.as_str()))
        .count();
    if bound > 0 {
        return Err(ApiError::conflict(format!(
            "node {:?} still has {bound} VM(s)",
            node.metadata.name
        )));
    }
    state
        .store
        .delete_obj::<Node>(&node.metadata.name, Some(node.metadata.resource_version))
        .await?;
    super::networks::set_overlay_peer(&state.store, &node.metadata.name, None).await?;
    // A removed host stays removed: its agent would otherwise register it again.
    if let Some(tls) = &state.tls {
        let name = &node.metadata.name;
        if state
            .store
            .get_obj::<novacron_api::NodeCredential>(name)
            .await?
            .is_some()
        {
            tls.revoke_node(&state.store, &state.auth, name).await?;
            tracing::warn!(node = %name, by = %p.actor, "node deleted; its certificates are revoked");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Names of routes beside `/v1/nodes/{name}`: a node named so could not be read or deleted.
const RESERVED_NODE_NAMES: [&str; 2] = ["join", "register"];

fn node_name(name: &str) -> ApiResult<()> {
    validate::name("name", name)?;
    if RESERVED_NODE_NAMES.contains(&name) {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is reserved (a route of its own under /v1/nodes)"),
        ));
    }
    Ok(())
}

/// An agent known by its certificate speaks only for its own node.
fn own_node(p: &Principal, node: &str) -> ApiResult<()> {
    match &p.node {
        Some(me) if me != node => Err(ApiError::forbidden(format!("node {me:?} cannot act for node {node:?}"))),
        _ => Ok(()),
    }
}

/// Agent, with a join token: get the node's certificate from the cluster CA.
/// A join token works once.
#[utoipa::path(post, path = "/v1/nodes/join", tag = "agent", request_body = JoinNode,
    responses((status = 200, body = JoinedNode), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn join_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<JoinedNode>> {
    authorize(&p, Resource::Nodes, Verb::Create, None)?;
    let req: JoinNode = body.parse()?;
    let Some(tls) = state.tls.clone() else {
        return Err(ApiError::conflict(
            "this server runs without TLS; agents authenticate with tokens",
        ));
    };
    node_name(&req.name)?;
    if req.hosts.is_empty() || req.hosts.len() > 16 {
        return Err(ApiError::invalid("hosts", "give 1 to 16 host names or addresses"));
    }
    for h in &req.hosts {
        let ok = !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
        if !ok {
            return Err(ApiError::invalid(
                "hosts",
                format!("{h:?} is not a host name or IP address"),
            ));
        }
    }
    // Spend a join token before anything is issued: it works once even when
    // two agents race with it.
    if p.role == "join" {
        super::identity::revoke(&state, &p.token).await?;
    }
    let (identity, ca_pem) = tls
        .issue_node_cert(&state.store, &state.auth, &req.name, req.hosts.clone(), false)
        .await?;
    tracing::info!(node = %req.name, by = %p.actor, "node joined");
    Ok(Json(JoinedNode {
        cert_pem: identity.cert_pem,
        key_pem: identity.key_pem,
        ca_pem,
    }))
}

/// Agent: register (or re-register) a node. Returns the secret the server
/// will present when it calls the agent.
#[utoipa::path(post, path = "/v1/nodes/register", tag = "agent", request_body = RegisterNode,
    responses((status = 200, body = RegisterNodeResponse), (status = 422, body = novacron_api::ErrorBody)))]
async fn register_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<RegisterNodeResponse>> {
    authorize(&p, Resource::Nodes, Verb::Status, None)?;
    let req: RegisterNode = body.parse()?;
    own_node(&p, &req.name)?;
    node_name(&req.name)?;
    validate::labels("labels", &req.labels)?;
    let address = url::Url::parse(&req.address).ok();
    if !address.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()) {
        return Err(ApiError::invalid("address", "address must be an http(s) URL"));
    }
    if req.capacity.vcpus == 0 || req.capacity.memory_mib == 0 {
        return Err(ApiError::invalid("capacity", "capacity must be positive"));
    }
    if let Some(ip) = &req.underlay_ip {
        let ok = ip
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast());
        if !ok {
            return Err(ApiError::invalid(
                "underlay_ip",
                format!("{ip:?} is not a unicast IPv4 address"),
            ));
        }
    }
    let now = Utc::now();
    let apply = |n: &mut Node| {
        n.spec.address = req.address.clone();
        n.metadata.labels = req.labels.clone();
        n.status.capacity = req.capacity;
        n.status.accel = req.accel.clone();
        n.status.agent_version = req.agent_version.clone();
        n.status.qemu = req.qemu.clone();
        n.status.dwcp_port = req.dwcp_port;
        n.status.underlay_ip = req.underlay_ip.clone();
        n.status.last_heartbeat = Some(now);
        if !n.status.ready {
            n.status.ready = true;
            n.status.ready_reason = None;
            n.status.last_transition = Some(now);
        }
    };
    let node = match state.store.get_obj::<Node>(&req.name).await? {
        Some(_) => {
            state
                .store
                .modify::<Node, _>(&req.name, |n| {
                    apply(n);
                    true
                })
                .await?
        }
        None => {
            let mut n = Node {
                metadata: Metadata::new(&req.name, Default::default()),
                spec: NodeSpec {
                    address: String::new(),
                    schedulable: true,
                },
                status: NodeStatus::default(),
            };
            apply(&mut n);
            match state.store.create_obj(&n).await {
                Ok(n) => n,
                Err(StoreError::AlreadyExists { .. }) => {
                    return Err(ApiError::conflict("node registered concurrently; retry"))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    super::networks::set_overlay_peer(&state.store, &node.metadata.name, req.underlay_ip.as_deref()).await?;
    tracing::info!(node = %node.metadata.name, address = %node.spec.address, "node registered");
    state.placement_wakeup.notify_one();
    Ok(Json(RegisterNodeResponse {
        node,
        agent_secret: state.agent_secret.to_string(),
    }))
}

/// Agent: the node is alive.
#[utoipa::path(post, path = "/v1/nodes/{name}/heartbeat", tag = "agent", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = novacron_api::ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    authorize(&p, Resource::Nodes, Verb::Status, None)?;
    own_node(&p, &name)?;
    let became_ready = std::sync::atomic::AtomicBool::new(false);
    let node = state
        .store
        .modify::<Node, _>(&name, |n| {
            let now = Utc::now();
            n.status.last_heartbeat = Some(now);
            became_ready.store(!n.status.ready, std::sync::atomic::Ordering::Relaxed);
            if !n.status.ready {
                n.status.ready = true;
                n.status.ready_reason = None;
                n.status.last_transition = Some(now);
            }
            true
        })
        .await?;
    if became_ready.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(node = %name, "node is Ready");
        state.placement_wakeup.notify_one();
    }
    Ok(Json(node))
}

async fn set_schedulable(state: &AppState, p: &Principal, name: &str, schedulable: bool) -> ApiResult<Json<Node>> {
    let node = find_authorized::<Node>(state, p, name, Verb::Update).await?;
    let node = state
        .store
        .modify::<Node, _>(&node.metadata.name, |n| {
            let changed = n.spec.schedulable != schedulable;
            n.spec.schedulable = schedulable;
            changed
        })
        .await?;
    state.placement_wakeup.notify_one();
    Ok(Json(node))
}

/// Mark a node unschedulable: running VMs stay, new VMs go elsewhere.
#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = novacron_api::ErrorBody)))]
async fn cordon_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_schedulable(&state, &p, &name, false).await
}

/// Mark a node schedulable again.
#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = novacron_api::ErrorBody)))]
async fn uncordon_node(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_schedulable(&state, &p, &name, true).await
}
