//! `/v1/vms/{name}/stats`: a running VM's counters now, from its agent (the
//! dashboard's CPU and memory charts sample them).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use novacron_api::agent::VmStats;
use novacron_api::{Verb, Vm};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(vm_stats))
}

/// The VM's counters (CPU seconds, resident memory, drive and NIC
/// traffic), counted from its QEMU's start; 409 while it does not run.
#[utoipa::path(get, path = "/v1/vms/{name}/stats", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = VmStats), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not running", body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn vm_stats(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStats>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?;
    let node = super::vms::bound_node(&state, &vm).await?;
    let all = crate::proxy::vm_stats(&state, &node).await?;
    all.into_iter()
        .find(|s| s.vm_id == vm.metadata.id)
        .map(Json)
        .ok_or_else(|| ApiError::conflict(format!("VM {:?} is not running", vm.metadata.name)))
}
