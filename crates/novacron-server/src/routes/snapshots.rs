//! `/v1/vms/{name}/snapshots`: named points in time of a VM's own disks
//! (root and data), and optionally its memory, kept by its agent next to
//! the disks. Snapshots are taken of running or stopped VMs (with memory:
//! running ones); reverting and deleting need the VM stopped (409
//! otherwise); reverting discards what was written since and keeps every
//! snapshot.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use novacron_api::{CreateSnapshot, PowerState, Snapshot, Verb, Vm, VmPhase};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::{proxy, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_snapshots, take_snapshot))
        .routes(routes!(delete_snapshot))
        .routes(routes!(revert_snapshot))
}

/// A stopped VM that no migration moves, and its node.
async fn stopped(state: &AppState, vm: &Vm, doing: &str) -> ApiResult<novacron_api::Node> {
    if vm.spec.power_state != PowerState::Stopped || vm.status.phase != VmPhase::Stopped {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: stop it first; snapshots are {doing} on stopped VMs",
            vm.metadata.name, vm.status.phase
        )));
    }
    super::vms::refuse_while_migrating(state, &vm.metadata.name).await?;
    super::vms::bound_node(state, vm).await
}

/// The VM's snapshots, oldest first; `current` marks the one its disks
/// descend from.
#[utoipa::path(get, path = "/v1/vms/{name}/snapshots", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vec<Snapshot>), (status = 404, body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM's agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn list_snapshots(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?;
    if vm.status.node.is_none() {
        // Never placed: no disks, so no snapshots.
        return Ok(Json(vm.status.snapshots));
    }
    let node = super::vms::bound_node(&state, &vm).await?;
    proxy::snapshots(&state, &node, &vm, reqwest::Method::GET, "snapshots", None)
        .await
        .map(Json)
}

/// Take a snapshot of a VM's root and data disks; a running VM's disks
/// are taken all at one instant (crash-consistent; application-consistent
/// when its guest agent freezes the filesystems). With `memory`, a running
/// VM's RAM and device state too (it pauses while they are saved).
#[utoipa::path(post, path = "/v1/vms/{name}/snapshots", tag = "vms", params(("name" = String, Path)),
    request_body = CreateSnapshot,
    responses((status = 201, body = Snapshot), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is starting or stopping, is migrating, has no disks yet, or has a snapshot of that name", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn take_snapshot(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let req: CreateSnapshot = body.parse()?;
    req.validate()?;
    if !super::vms::settled(&vm) {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: snapshots are taken of running, paused or stopped VMs; try again when it is",
            vm.metadata.name, vm.status.phase
        )));
    }
    if req.memory && vm.status.phase != VmPhase::Running {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: memory snapshots save a running guest (start or resume it first, or take the snapshot without memory)",
            vm.metadata.name, vm.status.phase
        )));
    }
    super::vms::refuse_while_migrating(&state, &vm.metadata.name).await?;
    let node = super::vms::bound_node(&state, &vm).await?;
    let taken = proxy::snapshots(&state, &node, &vm, reqwest::Method::POST, "snapshots", Some(&req)).await?;
    Ok((StatusCode::CREATED, Json(taken)))
}

/// Revert a stopped VM's disks to a snapshot: what was written since is
/// discarded; the other snapshots stay. A snapshot with memory starts the
/// VM, which resumes where the snapshot left it.
#[utoipa::path(post, path = "/v1/vms/{name}/snapshots/{snapshot}/revert", tag = "vms",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not stopped, or is migrating", body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn revert_snapshot(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<Snapshot>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    novacron_api::validate::name("snapshot", &snapshot)?;
    let node = stopped(&state, &vm, "reverted").await?;
    let what = format!("snapshots/{snapshot}/revert");
    let reverted: Snapshot = proxy::snapshots(&state, &node, &vm, reqwest::Method::POST, &what, None).await?;
    if reverted.memory.is_some() {
        // As on Proxmox: a snapshot with memory is reverted to a running guest.
        let _started = super::vms::act(&state, &p, &name, |v| {
            v.spec.power_state = PowerState::Running;
            v.spec.stop_grace_s = None;
            v.spec.start_request += 1;
            Ok(())
        })
        .await?;
    }
    Ok(Json(reverted))
}

/// Delete a snapshot of a stopped VM: its data is merged into the
/// snapshots taken on top of it and into the disks, which read as before.
#[utoipa::path(delete, path = "/v1/vms/{name}/snapshots/{snapshot}", tag = "vms",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not stopped, or is migrating", body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn delete_snapshot(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    novacron_api::validate::name("snapshot", &snapshot)?;
    let node = stopped(&state, &vm, "deleted").await?;
    let what = format!("snapshots/{snapshot}");
    let _: serde_json::Value = proxy::snapshots(&state, &node, &vm, reqwest::Method::DELETE, &what, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
