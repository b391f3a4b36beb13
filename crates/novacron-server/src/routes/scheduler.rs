//! `/v1/scheduler`: cluster scheduler settings, placement explanations and
//! rebalancing plans.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::Utc;
use novacron_api::{
    validate, CreateVm, Migration, Node, PlacementExplanation, RebalancePlan, RebalanceRequest, Resource,
    SchedulerConfig, SchedulerSettings, Verb, Vm,
};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::scheduling;
use crate::AppState;

/// Largest rebalancing plan.
const MAX_MOVES: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_config, put_config))
        .routes(routes!(explain_create))
        .routes(routes!(explain_vm))
        .routes(routes!(rebalance))
}

/// The cluster's scheduler settings.
#[utoipa::path(get, path = "/v1/scheduler", tag = "scheduler", responses((status = 200, body = SchedulerConfig)))]
async fn get_config(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<SchedulerConfig>> {
    authorize(&p, Resource::Nodes, Verb::Read, None)?;
    Ok(Json(scheduling::load_config(&state.store).await?))
}

fn check_ratio(field: &str, v: f64, max: f64) -> ApiResult<()> {
    if !(v.is_finite() && (1.0..=max).contains(&v)) {
        return Err(ApiError::invalid(field, format!("must be between 1 and {max}")));
    }
    Ok(())
}

/// Replace the scheduler settings: profile, overcommit ratios, VMs per node,
/// objective weights and zone latencies. Applies to placements from now on.
#[utoipa::path(put, path = "/v1/scheduler", tag = "scheduler", request_body = SchedulerSettings,
    responses((status = 200, body = SchedulerConfig), (status = 422, body = novacron_api::ErrorBody)))]
async fn put_config(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<SchedulerConfig>> {
    authorize(&p, Resource::Nodes, Verb::Update, None)?;
    let req: SchedulerSettings = body.parse()?;
    check_ratio("cpu_overcommit", req.cpu_overcommit, 16.0)?;
    check_ratio("memory_overcommit", req.memory_overcommit, 4.0)?;
    if req.max_vms_per_node == Some(0) {
        return Err(ApiError::invalid("max_vms_per_node", "must be at least 1"));
    }
    let w = req.weights;
    for (name, v) in [
        ("packing", w.packing),
        ("cost", w.cost),
        ("headroom", w.headroom),
        ("latency", w.latency),
        ("affinity", w.affinity),
    ] {
        if !(v.is_finite() && (0.0..=1000.0).contains(&v)) {
            return Err(ApiError::invalid(
                &format!("weights.{name}"),
                "weights must be between 0 and 1000",
            ));
        }
    }
    if w.packing + w.cost + w.headroom + w.latency + w.affinity <= 0.0 {
        return Err(ApiError::invalid("weights", "at least one weight must be positive"));
    }
    for (i, z) in req.zone_latency_ms.iter().enumerate() {
        validate::name(&format!("zone_latency_ms[{i}].a"), &z.a)?;
        validate::name(&format!("zone_latency_ms[{i}].b"), &z.b)?;
        if !(z.ms.is_finite() && z.ms >= 0.0) {
            return Err(ApiError::invalid(
                &format!("zone_latency_ms[{i}].ms"),
                "must be 0 or more",
            ));
        }
    }
    if !(req.default_zone_latency_ms.is_finite() && req.default_zone_latency_ms >= 0.0) {
        return Err(ApiError::invalid("default_zone_latency_ms", "must be 0 or more"));
    }
    validate::qemu_name("default_cpu_model", &req.default_cpu_model)?;
    if req.default_cpu_model == "host" {
        return Err(ApiError::invalid(
            "default_cpu_model",
            "\"host\" cannot migrate between hosts; name a model every node offers (e.g. qemu64)",
        ));
    }
    let mut config = scheduling::load_config(&state.store).await?;
    let exists = config.metadata.resource_version > 0;
    config.settings = req;
    config.metadata.updated_at = Utc::now();
    let config = if exists {
        state.store.update_obj(&config).await?
    } else {
        state.store.create_obj(&config).await?
    };
    tracing::info!(by = %p.actor, "scheduler settings changed");
    state.placement_wakeup.notify_one();
    Ok(Json(config))
}

async fn snapshot(state: &AppState, leave_out: Option<&str>) -> ApiResult<novacron_scheduler::Cluster> {
    let nodes = state.store.list_all::<Node>().await?;
    let vms = state.store.list_all::<Vm>().await?;
    let migrations = state.store.list_all::<Migration>().await?;
    let config = scheduling::load_config(&state.store).await?;
    Ok(scheduling::snapshot(&nodes, &vms, &migrations, &config, leave_out))
}

/// Where a VM would be placed now, and why (nothing is created).
#[utoipa::path(post, path = "/v1/scheduler/explain", tag = "scheduler", request_body = CreateVm,
    responses((status = 200, body = PlacementExplanation), (status = 422, body = novacron_api::ErrorBody)))]
async fn explain_create(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<PlacementExplanation>> {
    authorize(&p, Resource::Vms, Verb::Create, None)?;
    let req: CreateVm = body.parse()?;
    let project = p.project_for(req.project.clone());
    authorize(&p, Resource::Vms, Verb::Create, Some(&project))?;
    validate::create_vm(&req)?;
    super::vms::validate_placement(&req.spec.placement)?;
    let cluster = snapshot(&state, None).await?;
    let outcome = cluster.place(&scheduling::request_for(&req.spec, &req.labels));
    Ok(Json(scheduling::explain(&cluster, &outcome)))
}

/// Why a VM is where it is (or why it is still pending): the placement
/// decision made now, with the VM's own reservation left out.
#[utoipa::path(get, path = "/v1/vms/{name}/explain", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = PlacementExplanation), (status = 404, body = novacron_api::ErrorBody)))]
async fn explain_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<PlacementExplanation>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?;
    let cluster = snapshot(&state, Some(&vm.metadata.name)).await?;
    let outcome = cluster.place(&scheduling::request(&vm));
    Ok(Json(scheduling::explain(&cluster, &outcome)))
}

/// A rebalancing plan: live migrations that even out node use (`balance`)
/// or empty whole nodes (`consolidate`), with the predicted effect. Nothing
/// moves; `novacron cluster rebalance` carries a plan out as migrations.
#[utoipa::path(post, path = "/v1/scheduler/rebalance", tag = "scheduler", request_body = RebalanceRequest,
    responses((status = 200, body = RebalancePlan), (status = 422, body = novacron_api::ErrorBody)))]
async fn rebalance(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<RebalancePlan>> {
    authorize(&p, Resource::Nodes, Verb::Update, None)?;
    let req: RebalanceRequest = body.parse()?;
    let max_moves = req.max_moves.unwrap_or(10);
    if !(1..=MAX_MOVES).contains(&max_moves) {
        return Err(ApiError::invalid(
            "max_moves",
            format!("max_moves must be between 1 and {MAX_MOVES}"),
        ));
    }
    let cluster = snapshot(&state, None).await?;
    Ok(Json(scheduling::plan(&cluster, req.mode, max_moves)))
}
