//! `/v1/volumes` and `/v1/vms/{name}/volumes`: volumes made, grown,
//! deleted, attached to and detached from VMs. Which VM holds a volume is
//! read from the VMs (its spec, or its agent's report while a detach is
//! under way), so it cannot disagree with them; the volume keeps only the
//! node its data was last seen on, for the next attach.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::volume::{self, AttachVolume, CreateVolume, ResizeVolume, VolumeAttachment, VolumePhase};
use novacron_api::{validate, Metadata, Node, Resource, Verb, Vm, Volume, VolumeSpec, VolumeStatus};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_volumes, create_volume))
        .routes(routes!(get_volume, delete_volume))
        .routes(routes!(resize_volume))
        .routes(routes!(attach_volume))
        .routes(routes!(detach_volume))
}

/// The VM holding volume `id`, and how: in its spec (Attached), or only
/// still held by its agent (Detaching).
fn holder<'a>(vms: &'a [Vm], id: &str) -> Option<(&'a Vm, VolumePhase)> {
    vms.iter().find_map(|vm| {
        if vm.spec.volumes.iter().any(|a| a.id == id) {
            Some((vm, VolumePhase::Attached))
        } else if vm.status.volumes.iter().any(|h| h.id == id) {
            Some((vm, VolumePhase::Detaching))
        } else {
            None
        }
    })
}

/// Fills in each volume's phase, VM and node from the VMs.
fn present(volumes: &mut [Volume], vms: &[Vm]) {
    for v in volumes {
        let Some((vm, phase)) = holder(vms, &v.metadata.id) else {
            v.status.phase = VolumePhase::Available;
            v.status.vm = None;
            continue;
        };
        v.status.phase = phase;
        v.status.vm = Some(vm.metadata.name.clone());
        // Once the VM's agent has the volume, its data is on the VM's node.
        if vm.status.volumes.iter().any(|h| h.id == v.metadata.id) {
            v.status.node = vm.status.node.clone();
        }
    }
}

/// List volumes, or watch them with `watch=true` (a watch does not fill in
/// `status.phase` and `status.vm`).
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Volume>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_volumes(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    let vms = if q.watch.unwrap_or(false) {
        Vec::new()
    } else {
        state.store.list_all::<Vm>().await?
    };
    list_or_watch::<Volume>(&state, &p, q, |volumes| present(volumes, &vms)).await
}

/// Create a volume: a blank disk, made on the node of the first VM it is
/// attached to. Its size counts against the project's disk quota.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 403, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    authorize(&p, Resource::Volumes, Verb::Create, None)?;
    let req: CreateVolume = body.parse()?;
    validate::name("name", &req.name)?;
    validate::labels("labels", &req.labels)?;
    volume::size("size_mib", req.size_mib)?;
    let project = p.project_for(req.project.clone());
    authorize(&p, Resource::Volumes, Verb::Create, Some(&project))?;
    let quota = super::projects::require_project(&state, &project).await?.quota;
    let _guard = state.lock_quota().await?;
    if state.store.get_obj::<Volume>(&req.name).await?.is_some() {
        return Err(ApiError::conflict(format!("volume {:?} already exists", req.name)));
    }
    super::projects::check_disk_quota(&state, &project, &quota, req.size_mib).await?;
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project;
    let vol = Volume {
        metadata,
        spec: VolumeSpec { size_mib: req.size_mib },
        status: VolumeStatus::default(),
    };
    let vol = state.store.create_obj(&vol).await?;
    tracing::info!(volume = %vol.metadata.name, size_mib = vol.spec.size_mib, "created volume");
    Ok((StatusCode::CREATED, Json(vol)))
}

/// Get a volume by name or id, with the VM holding it.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    let vol = find_authorized::<Volume>(&state, &p, &name, Verb::Read).await?;
    let vms = state.store.list_all::<Vm>().await?;
    let mut one = [vol];
    present(&mut one, &vms);
    let [vol] = one;
    Ok(Json(vol))
}

/// Delete a detached volume and its data. An attached one is refused (409).
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The volume is attached to a VM", body = novacron_api::ErrorBody),
        (status = 502, description = "The agent keeping its data failed", body = novacron_api::ErrorBody),
        (status = 503, description = "The agent keeping its data cannot be reached", body = novacron_api::ErrorBody)))]
async fn delete_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let vol = find_authorized::<Volume>(&state, &p, &name, Verb::Delete).await?;
    // No attach can start between the check and the delete.
    let _guard = state.lock_quota().await?;
    let vms = state.store.list_all::<Vm>().await?;
    if let Some((vm, phase)) = holder(&vms, &vol.metadata.id) {
        let how = if phase == VolumePhase::Detaching {
            "is still being detached from"
        } else {
            "is attached to"
        };
        return Err(ApiError::conflict(format!(
            "volume {:?} {how} VM {:?}: detach it first (vm volume detach)",
            vol.metadata.name, vm.metadata.name
        )));
    }
    // The data first: a failure leaves the volume as it was.
    if let Some(node_name) = &vol.status.node {
        match state.store.get_obj::<Node>(node_name).await? {
            Some(node) => crate::proxy::delete_volume(&state, &node, &vol.metadata.id).await?,
            None => tracing::warn!(volume = %vol.metadata.name, node = %node_name,
                "the node keeping the volume's data is gone; deleting the volume only"),
        }
    }
    state
        .store
        .delete_obj::<Volume>(&vol.metadata.name, Some(vol.metadata.resource_version))
        .await?;
    tracing::info!(volume = %vol.metadata.name, "deleted volume");
    Ok(StatusCode::NO_CONTENT)
}

/// Grow a volume; attached to a running VM, the guest sees the new size at once.
#[utoipa::path(post, path = "/v1/volumes/{name}/resize", tag = "volumes", params(("name" = String, Path)),
    request_body = ResizeVolume,
    responses((status = 200, body = Volume), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn resize_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Volume>> {
    let vol = find_authorized::<Volume>(&state, &p, &name, Verb::Update).await?;
    let req: ResizeVolume = body.parse()?;
    volume::size("size_mib", req.size_mib)?;
    if req.size_mib < vol.spec.size_mib {
        return Err(ApiError::invalid(
            "size_mib",
            format!(
                "volumes only grow: {:?} is {} MiB, {} MiB asked",
                vol.metadata.name, vol.spec.size_mib, req.size_mib
            ),
        ));
    }
    let quota = super::projects::require_project(&state, &vol.metadata.project)
        .await?
        .quota;
    let _guard = state.lock_quota().await?;
    super::projects::check_disk_quota(&state, &vol.metadata.project, &quota, req.size_mib - vol.spec.size_mib).await?;
    let vms = state.store.list_all::<Vm>().await?;
    match holder(&vms, &vol.metadata.id) {
        Some((vm, VolumePhase::Detaching)) => {
            return Err(ApiError::conflict(format!(
                "volume {:?} is being detached from VM {:?}; grow it once it is detached",
                vol.metadata.name, vm.metadata.name
            )))
        }
        // The VM's agent grows the disk (block_resize while QEMU runs).
        Some((vm, _)) => {
            let id = vol.metadata.id.clone();
            let _ = super::vms::act(&state, &p, &vm.metadata.name, |v| {
                for a in v.spec.volumes.iter_mut().filter(|a| a.id == id) {
                    a.size_mib = req.size_mib;
                }
                Ok(())
            })
            .await?;
        }
        None => {}
    }
    let mut vol = state
        .store
        .modify::<Volume, _>(&vol.metadata.name, |v| {
            v.spec.size_mib = req.size_mib;
            true
        })
        .await?;
    present(std::slice::from_mut(&mut vol), &vms);
    tracing::info!(volume = %vol.metadata.name, size_mib = req.size_mib, "volume grown");
    Ok(Json(vol))
}

/// Attach a volume to a VM; a running VM gets it hot-plugged. A volume is
/// attached to one VM at a time.
#[utoipa::path(post, path = "/v1/vms/{name}/volumes", tag = "vms", params(("name" = String, Path)),
    request_body = AttachVolume,
    responses((status = 201, body = Vm), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The volume is attached already, or the VM has no free slot", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn attach_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let req: AttachVolume = body.parse()?;
    let vol = find_authorized::<Volume>(&state, &p, &req.volume, Verb::Update).await?;
    if vol.metadata.project != vm.metadata.project {
        return Err(ApiError::invalid(
            "volume",
            format!(
                "volume {:?} belongs to project {:?}, VM {:?} to {:?}",
                vol.metadata.name, vol.metadata.project, vm.metadata.name, vm.metadata.project
            ),
        ));
    }
    if vm.metadata.deletion_requested_at.is_some() {
        return Err(ApiError::conflict(format!(
            "VM {:?} is being deleted",
            vm.metadata.name
        )));
    }
    // One attach at a time: two cannot both find the volume free.
    let _guard = state.lock_quota().await?;
    let vms = state.store.list_all::<Vm>().await?;
    if let Some((holder, _)) = holder(&vms, &vol.metadata.id) {
        return Err(ApiError::conflict(format!(
            "volume {:?} is already attached to VM {:?}",
            vol.metadata.name, holder.metadata.name
        )));
    }
    let attachment = VolumeAttachment {
        volume: vol.metadata.name.clone(),
        id: vol.metadata.id.clone(),
        size_mib: vol.spec.size_mib,
        slot: 0,
        from_node: vol.status.node.clone(),
    };
    let Json(vm) = super::vms::act(&state, &p, &vm.metadata.name, |v| {
        let slot = volume::free_slot(&v.spec.volumes, &v.status.volumes).ok_or_else(|| {
            ApiError::conflict(format!(
                "VM {:?} has {} volumes attached or detaching, the most it may have",
                v.metadata.name,
                volume::MAX_VOLUMES
            ))
        })?;
        v.spec.volumes.push(VolumeAttachment {
            slot,
            ..attachment.clone()
        });
        Ok(())
    })
    .await?;
    tracing::info!(vm = %vm.metadata.name, volume = %vol.metadata.name, "volume attached");
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Detach a volume from a VM; a running VM's guest is asked to release the
/// device first (the volume shows Detaching until it has).
#[utoipa::path(delete, path = "/v1/vms/{name}/volumes/{volume}", tag = "vms",
    params(("name" = String, Path), ("volume" = String, Path, description = "The volume's name or id")),
    responses((status = 200, body = Vm), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn detach_volume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, volume)): Path<(String, String)>,
) -> ApiResult<Json<Vm>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let Some(gone) = vm
        .spec
        .volumes
        .iter()
        .find(|a| a.volume == volume || a.id == volume)
        .cloned()
    else {
        if volume == "root" || volume == "data" {
            return Err(ApiError::invalid(
                "volume",
                format!(
                    "the {volume} disk is part of VM {:?}, not a volume: it cannot be detached",
                    vm.metadata.name
                ),
            ));
        }
        return Err(ApiError::not_found(format!(
            "volume {volume:?} attached to VM {:?}",
            vm.metadata.name
        )));
    };
    let Json(vm) = super::vms::act(&state, &p, &vm.metadata.name, |v| {
        v.spec.volumes.retain(|a| a.id != gone.id);
        Ok(())
    })
    .await?;
    tracing::info!(vm = %vm.metadata.name, volume = %gone.volume, "volume detached");
    Ok(Json(vm))
}

/// Records where the data of the volumes an agent took or let go is now:
/// on `vm`'s node (in its directory, or its pool once let go).
pub async fn record_location(state: &AppState, vm: &Vm, before: &[novacron_api::AttachedVolume]) {
    let Some(node) = &vm.status.node else {
        return;
    };
    let now = &vm.status.volumes;
    let moved = now
        .iter()
        .filter(|h| !before.iter().any(|b| b.id == h.id))
        .chain(before.iter().filter(|b| !now.iter().any(|h| h.id == b.id)));
    for h in moved {
        let result = state
            .store
            .modify::<Volume, _>(&h.volume, |v| {
                let changed = v.metadata.id == h.id && v.status.node.as_deref() != Some(node.as_str());
                if changed {
                    v.status.node = Some(node.clone());
                }
                changed
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(vm = %vm.metadata.name, volume = %h.volume, error = %e, "cannot record where the volume's data is");
        }
    }
}
