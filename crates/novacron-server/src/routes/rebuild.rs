//! `POST /v1/vms/{name}/rebuild`: a stopped VM gets a fresh root disk from
//! its image (or another one), and new cloud-init settings if given; its
//! agent removes the old root disk, and the next start makes it anew.
//! Data disk, volumes, NICs, addresses and the VM's id stay (so cloud-init,
//! finding no state on the new disk, runs as on a first boot).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use novacron_api::{ImageFormat, PowerState, RebuildVm, Verb, Vm, VmPhase};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(rebuild_vm))
}

/// Rebuild a stopped VM: its root disk is made anew from the image (the
/// VM's own, or `image`) at its next start; `cloud_init` replaces the VM's
/// cloud-init settings. A running VM is refused (409): stop it first.
#[utoipa::path(post, path = "/v1/vms/{name}/rebuild", tag = "vms", params(("name" = String, Path)),
    request_body = RebuildVm,
    responses((status = 200, body = Vm), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not stopped", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn rebuild_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Vm>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let req: RebuildVm = body.parse_or_default()?;
    if vm.spec.power_state != PowerState::Stopped || vm.status.phase != VmPhase::Stopped {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: stop it first; a rebuild replaces the root disk of a stopped VM",
            vm.metadata.name, vm.status.phase
        )));
    }
    let image_name = req.image.clone().unwrap_or_else(|| vm.spec.image.clone());
    let image = super::vms::usable_image(&state, &image_name, &vm.metadata.project, "image").await?;
    let kernel = image.spec.format == ImageFormat::Kernel;
    if let Some(ci) = &req.cloud_init {
        novacron_api::cloudinit::validate("cloud_init", ci)?;
    }
    if kernel && (req.cloud_init.is_some() || vm.spec.cloud_init.is_some()) {
        return Err(ApiError::invalid(
            "image",
            format!("image {image_name:?} boots a kernel directly and runs no cloud-init"),
        ));
    }
    if kernel && vm.spec.full_copy {
        return Err(ApiError::invalid(
            "image",
            format!("image {image_name:?} has no disk to copy for a full clone"),
        ));
    }
    // The root disk is at least the new image's size; a larger disk counts
    // against the quota like any other growth.
    let image_mib = image.status.virtual_size_bytes.div_ceil(1024 * 1024);
    let disk_mib = if kernel {
        vm.spec.disk_mib
    } else {
        Some(vm.spec.disk_mib.unwrap_or(0).max(image_mib))
    };
    let grown = disk_mib.unwrap_or(0).saturating_sub(vm.spec.disk_mib.unwrap_or(0));
    let quota = super::projects::require_project(&state, &vm.metadata.project)
        .await?
        .quota;
    let _guard = state.lock_quota().await?;
    if grown > 0 {
        super::projects::check_disk_quota(&state, &vm.metadata.project, &quota, grown).await?;
    }
    let Json(vm) = super::vms::act(&state, &p, &vm.metadata.name, |v| {
        if v.spec.power_state != PowerState::Stopped {
            return Err(ApiError::conflict("the VM was started meanwhile"));
        }
        v.spec.image = image_name.clone();
        v.spec.disk_mib = disk_mib;
        if let Some(ci) = &req.cloud_init {
            v.spec.cloud_init = Some(ci.clone());
        }
        v.spec.rebuild_generation += 1;
        Ok(())
    })
    .await?;
    tracing::info!(vm = %vm.metadata.name, image = %image_name, "rebuild requested");
    Ok(Json(vm))
}
