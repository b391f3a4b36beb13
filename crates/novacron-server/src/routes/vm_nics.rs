//! `/v1/vms/{name}/nics`: NICs added to and removed from a VM, running or
//! not. The spec changes here; the VM's agent plugs or unplugs the device
//! (hot-plug while QEMU runs). A removed NIC's address is released once the
//! agent reports the guest has let the device go.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use novacron_api::network::{assign_slots, Mac};
use novacron_api::{NicSpec, Verb, Vm};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add_nic))
        .routes(routes!(remove_nic))
}

/// Add a NIC to a VM; a running VM gets it hot-plugged. Its address and
/// MAC are chosen as at create unless given.
#[utoipa::path(post, path = "/v1/vms/{name}/nics", tag = "vms", params(("name" = String, Path)), request_body = NicSpec,
    responses((status = 201, body = Vm), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn add_nic(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let nic: NicSpec = body.parse()?;
    let project = vm.metadata.project.clone();
    let index = vm.spec.nics.len();
    // Checked as the VM's NIC list would be with it (count, slots, fields).
    novacron_api::network::nics(&[vm.spec.nics.as_slice(), std::slice::from_ref(&nic)].concat())?;
    let mut added = vec![nic];
    let quota = super::projects::require_project(&state, &project).await?.quota;
    let _quota_guard = state.lock_quota().await?;
    super::projects::check_address_quota(&state, &project, &quota, 1).await?;
    super::security_groups::resolve_nic_groups(&state, &project, &mut added).await?;
    let claimed = crate::ipam::claim_nics_from(&state.store, &project, &vm.metadata.id, index, &mut added).await?;
    let result = super::vms::act(&state, &p, &vm.metadata.name, |v| {
        // Checked again against the VM as it is now (another NIC may have come).
        v.spec.nics.extend(added.iter().cloned());
        novacron_api::network::nics(&v.spec.nics)?;
        assign_slots(&mut v.spec.nics).map_err(ApiError::from)
    })
    .await;
    let vm = match result {
        Ok(Json(vm)) => vm,
        Err(e) => {
            claimed.release(&state.store).await;
            return Err(e);
        }
    };
    super::security_groups::refresh_members(&state, &project).await?;
    if let Some(n) = vm.spec.nics.last() {
        tracing::info!(vm = %vm.metadata.name, network = %n.network, ip = ?n.ip, mac = ?n.mac, "NIC added");
    }
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Remove a NIC (named by its MAC or IP address) from a VM; a running VM
/// gets it hot-unplugged, and its address is released once the guest has
/// let it go.
#[utoipa::path(delete, path = "/v1/vms/{name}/nics/{nic}", tag = "vms",
    params(("name" = String, Path), ("nic" = String, Path, description = "The NIC's MAC or IP address")),
    responses((status = 200, body = Vm), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody)))]
async fn remove_nic(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, nic)): Path<(String, String)>,
) -> ApiResult<Json<Vm>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    let asked_mac = nic.parse::<Mac>().ok();
    let is_it = |n: &NicSpec| {
        n.ip.as_deref() == Some(nic.as_str())
            || (asked_mac.is_some() && n.mac.as_deref().and_then(|m| m.parse().ok()) == asked_mac)
    };
    let Some(gone) = vm.spec.nics.iter().find(|n| is_it(n)).cloned() else {
        return Err(ApiError::not_found(format!(
            "NIC {nic:?} of VM {:?} (give its MAC or IP address)",
            vm.metadata.name
        )));
    };
    let Json(vm) = super::vms::act(&state, &p, &vm.metadata.name, |v| {
        v.spec.nics.retain(|n| n.mac != gone.mac);
        Ok(())
    })
    .await?;
    // Released now if nothing holds it (the VM does not run); else when its
    // agent reports the device unplugged.
    release_removed(&state, &vm.metadata.name).await;
    super::security_groups::refresh_members(&state, &vm.metadata.project).await?;
    tracing::info!(vm = %vm.metadata.name, network = %gone.network, ip = ?gone.ip, mac = ?gone.mac, "NIC removed");
    Ok(Json(vm))
}

/// Releases the addresses of the VM's removed NICs that its QEMU has let
/// go, under the lock NIC adds claim under: an address claimed for a NIC
/// not yet in the spec is not mistaken for a removed one's.
pub async fn release_removed(state: &AppState, vm: &str) {
    let _claims = match state.lock_quota().await {
        Ok(guard) => guard,
        Err(e) => {
            // They stay claimed until the VM's NICs change again or the
            // VM is deleted (etcd unreachable: nothing else would work now).
            tracing::warn!(vm, error = %e.message, "cannot take the quota lock to release removed NICs");
            return;
        }
    };
    match state.store.get_obj::<Vm>(vm).await {
        Ok(Some(vm)) => crate::ipam::release_detached(&state.store, &vm).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(vm, error = %e, "cannot read the VM to release its removed NICs"),
    }
}
