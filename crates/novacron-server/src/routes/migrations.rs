//! `/v1/migrations`: live migration as an object. The server validates and
//! picks the target; the source agent drives the transfer and reports
//! progress; completion rebinds the VM to the target node.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use chrono::Utc;
use novacron_api::agent::{PlanAsk, PlanRequest};
use novacron_api::{
    CompleteMigration, CreateMigration, Metadata, Migration, MigrationPhase, MigrationPlan, MigrationSpec,
    MigrationStatus, MigrationTransport, Node, Resource, Verb, Vm, VmPhase,
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
        .routes(routes!(list_migrations, create_migration))
        .routes(routes!(plan_migration))
        .routes(routes!(get_migration))
        .routes(routes!(cancel_migration))
        .routes(routes!(put_migration_status))
        .routes(routes!(complete_migration))
}

/// List migrations, or watch them with `watch=true` (progress shows up here).
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Migration>)))]
async fn list_migrations(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<Migration>(&state, &p, q, |_| {}).await
}

/// Get a migration by name or id.
#[utoipa::path(get, path = "/v1/migrations/{name}", tag = "migrations", params(("name" = String, Path)),
    responses((status = 200, body = Migration), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_migration(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Migration>> {
    Ok(Json(find_authorized::<Migration>(&state, &p, &name, Verb::Read).await?))
}

/// The migration of `vm` still in progress, if any.
pub async fn active_migration(state: &AppState, vm: &str) -> Result<Option<Migration>, StoreError> {
    Ok(state
        .store
        .list_all::<Migration>()
        .await?
        .into_iter()
        .find(|m| m.spec.vm == vm && !m.status.phase.is_final()))
}

/// Start a live migration. Everything is checked before anything starts: the
/// VM runs and has no other migration, and the target is Ready, schedulable,
/// not the source, and has room.
#[utoipa::path(post, path = "/v1/migrations", tag = "migrations", request_body = CreateMigration,
    responses((status = 201, body = Migration), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_migration(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    authorize(&p, Resource::Migrations, Verb::Create, None)?;
    let req: CreateMigration = body.parse()?;
    let Resolved {
        vm,
        source,
        target,
        cold,
        max_downtime_ms,
    } = resolve(&state, &p, &req).await?;
    let vm_name = vm.metadata.name.clone();
    let short = uuid::Uuid::new_v4().simple().to_string();
    let name = format!(
        "{}-{}",
        vm_name.chars().take(50).collect::<String>().trim_end_matches('-'),
        &short[..8]
    );
    let mut metadata = Metadata::new(&name, [("novacron.io/vm".to_string(), vm_name.clone())].into());
    metadata.project = vm.metadata.project.clone();
    let migration = Migration {
        metadata,
        spec: MigrationSpec {
            vm: vm_name.clone(),
            target_node: req.target_node,
            strategy: if cold {
                novacron_api::MigrationStrategy::Cold
            } else {
                req.strategy
            },
            max_downtime_ms,
            bandwidth_mib_s: req.bandwidth_mib_s,
            transport: req.transport.unwrap_or_default(),
            cancel: false,
            // The migration's trace begins here (when traces are exported).
            trace_parent: novacron_trace::start_trace(
                "migration",
                &[
                    ("migration", &name),
                    ("vm", &vm_name),
                    ("source", &source),
                    ("target", &target),
                ],
            ),
        },
        status: MigrationStatus {
            phase: MigrationPhase::Pending,
            source_node: source.clone(),
            target_node: target.clone(),
            ..Default::default()
        },
    };
    let migration = state.store.create_obj(&migration).await?;
    tracing::info!(migration = %name, vm = %vm_name, from = %source, to = %target, "migration created");
    Ok((StatusCode::CREATED, Json(migration)))
}

/// Dry run: the source agent measures the link to the target, samples the
/// VM's memory and dirty rate, and predicts time, downtime and bytes.
/// Nothing moves.
#[utoipa::path(post, path = "/v1/migrations/plan", tag = "migrations", request_body = CreateMigration,
    responses((status = 200, body = MigrationPlan), (status = 400, body = novacron_api::ErrorBody),
        (status = 404, description = "No such VM", body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 502, body = novacron_api::ErrorBody),
        (status = 503, body = novacron_api::ErrorBody)))]
async fn plan_migration(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<MigrationPlan>> {
    authorize(&p, Resource::Migrations, Verb::Create, None)?;
    let req: CreateMigration = body.parse()?;
    let r = resolve(&state, &p, &req).await?;
    if r.cold {
        return Err(ApiError::conflict(format!(
            "VM {:?} is stopped: a cold migration copies its disks, there is nothing to predict live",
            r.vm.metadata.name
        )));
    }
    let source = node_named(&state, &r.source).await?;
    let target = node_named(&state, &r.target).await?;
    let body = PlanRequest {
        vm: r.vm,
        target,
        ask: PlanAsk {
            strategy: req.strategy,
            transport: req.transport.unwrap_or_default(),
            bandwidth_mib_s: req.bandwidth_mib_s,
            max_downtime_ms: r.max_downtime_ms,
        },
    };
    let plan = crate::proxy::plan(&state, &source, &body).await?;
    Ok(Json(plan))
}

async fn node_named(state: &AppState, name: &str) -> ApiResult<Node> {
    state
        .store
        .get_obj::<Node>(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {name:?}")))
}

struct Resolved {
    vm: Vm,
    source: String,
    target: String,
    cold: bool,
    max_downtime_ms: u64,
}

/// Checks a migration request and picks its target (the scheduler's choice
/// when none is named). The caller's role was checked before its body was read.
async fn resolve(state: &AppState, p: &Principal, req: &CreateMigration) -> ApiResult<Resolved> {
    let max_downtime_ms = req.max_downtime_ms.unwrap_or_else(novacron_api::default_max_downtime);
    if !(1..=60_000).contains(&max_downtime_ms) {
        return Err(ApiError::invalid(
            "max_downtime_ms",
            "max downtime must be between 1 ms and 60 s",
        ));
    }
    if req.bandwidth_mib_s == Some(0) {
        return Err(ApiError::invalid("bandwidth_mib_s", "bandwidth limit must be positive"));
    }
    // Moving a VM needs the right to create migrations in the VM's project.
    let vm = find_authorized::<Vm>(state, p, &req.vm, Verb::Read).await?;
    authorize(p, Resource::Migrations, Verb::Create, Some(&vm.metadata.project))?;
    let vm_name = vm.metadata.name.clone();
    if vm.metadata.deletion_requested_at.is_some() {
        return Err(ApiError::conflict(format!("VM {vm_name:?} is being deleted")));
    }
    // Running or paused VMs move live; a stopped VM moves cold (disks only).
    let cold = vm.status.phase == VmPhase::Stopped && vm.spec.power_state == novacron_api::PowerState::Stopped;
    if !cold && !matches!(vm.status.phase, VmPhase::Running | VmPhase::Paused) {
        return Err(ApiError::conflict(format!(
            "VM {vm_name:?} is {}: only running, paused or stopped VMs can be migrated",
            vm.status.phase
        )));
    }
    if req.strategy == novacron_api::MigrationStrategy::Cold && !cold {
        return Err(ApiError::invalid(
            "strategy",
            "cold migration is for stopped VMs; a running VM moves live",
        ));
    }
    let Some(source) = vm.status.node.clone() else {
        return Err(ApiError::conflict(format!("VM {vm_name:?} is not placed on a node")));
    };
    // Its disks read from exports its agent serves from the backup.
    if let Some(l) = &vm.status.live_restore {
        let from = vm.spec.restore_from.as_ref().map(|s| s.to_string()).unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "VM {vm_name:?} is still being restored live from {from} ({} of {} bytes in); migrate it once its restore is done",
            l.done, l.size
        )));
    }
    // The target builds the NICs of the spec: a live VM must have exactly
    // those plugged, or the two sides' hardware would differ.
    if !cold && !novacron_api::network::plugged_as_specified(&vm.spec.nics, &vm.status.nics) {
        return Err(ApiError::conflict(format!(
            "VM {vm_name:?} is still plugging or unplugging NICs; migrate it once `vm get` shows them all plugged"
        )));
    }
    // The target makes the spec's volumes at their sizes: the agent must
    // hold exactly those (live or cold), none coming or going.
    if !novacron_api::volume::settled(&vm.spec.volumes, &vm.status.volumes) {
        return Err(ApiError::conflict(format!(
            "VM {vm_name:?} is still attaching, detaching or growing a volume; migrate it once `vm get` shows them settled"
        )));
    }
    if req.transport == Some(MigrationTransport::QemuMultifd)
        && req.strategy == novacron_api::MigrationStrategy::Postcopy
    {
        return Err(ApiError::invalid(
            "strategy",
            "QEMU cannot switch a multifd migration to post-copy; use --transport dwcp or qemu",
        ));
    }
    if let Some(m) = active_migration(state, &vm_name).await? {
        return Err(ApiError::conflict(format!(
            "VM {vm_name:?} is already being migrated by {:?}",
            m.metadata.name
        )));
    }

    let nodes = state.store.list_all::<Node>().await?;
    let vms = state.store.list_all::<Vm>().await?;
    let migrations = state.store.list_all::<Migration>().await?;
    let config = crate::scheduling::load_config(&state.store).await?;
    // The VM itself is left out: it is leaving its node, and must not count
    // against its own affinity rules.
    let cluster = crate::scheduling::snapshot(&nodes, &vms, &migrations, &config, Some(&vm_name));
    let request = crate::scheduling::request(&vm);
    let source_index = cluster.node_index(&source);
    let target = match &req.target_node {
        Some(t) => {
            let Some(index) = cluster.node_index(t) else {
                return Err(ApiError::invalid("target_node", format!("unknown node {t:?}")));
            };
            if *t == source {
                return Err(ApiError::invalid(
                    "target_node",
                    format!("VM {vm_name:?} already runs on {t:?}"),
                ));
            }
            match cluster.check(index, &request) {
                Ok(()) => {}
                Err(novacron_scheduler::Rejection::NotReady) => {
                    return Err(ApiError::invalid("target_node", format!("node {t:?} is not Ready")))
                }
                Err(novacron_scheduler::Rejection::Cordoned) => {
                    return Err(ApiError::invalid("target_node", format!("node {t:?} is cordoned")))
                }
                Err(
                    why @ (novacron_scheduler::Rejection::InsufficientMemory
                    | novacron_scheduler::Rejection::InsufficientCpu),
                ) => {
                    let (used, limit) = (cluster.allocated(index), cluster.allocatable(index));
                    return Err(ApiError::invalid(
                        "target_node",
                        format!(
                            "node {t:?} has {} MiB and {} vCPU free ({why}); the VM needs {} MiB and {} vCPU",
                            limit.memory_mib.saturating_sub(used.memory_mib),
                            limit.vcpus.saturating_sub(used.vcpus),
                            request.memory_mib,
                            request.vcpus
                        ),
                    ));
                }
                Err(why) => {
                    return Err(ApiError::invalid(
                        "target_node",
                        format!("node {t:?} cannot take VM {vm_name:?}: {why}"),
                    ))
                }
            }
            t.clone()
        }
        None => match cluster.place_excluding(&request, source_index) {
            Ok(d) => d.node,
            Err(why) => {
                return Err(ApiError::invalid(
                    "target_node",
                    format!("no target for VM {vm_name:?}: {why}"),
                ))
            }
        },
    };

    Ok(Resolved {
        vm,
        source,
        target,
        cold,
        max_downtime_ms,
    })
}

/// Cancel a migration in progress: the VM keeps running on the source.
#[utoipa::path(post, path = "/v1/migrations/{name}/cancel", tag = "migrations", params(("name" = String, Path)),
    responses((status = 200, body = Migration), (status = 409, body = novacron_api::ErrorBody)))]
async fn cancel_migration(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Migration>> {
    let m = find_authorized::<Migration>(&state, &p, &name, Verb::Update).await?;
    if m.status.phase.is_final() {
        return Err(ApiError::conflict(format!(
            "migration {:?} already ended ({})",
            m.metadata.name, m.status.phase
        )));
    }
    let m = state
        .store
        .modify::<Migration, _>(&m.metadata.name, |m| {
            let changed = !m.spec.cancel;
            m.spec.cancel = true;
            changed
        })
        .await?;
    Ok(Json(m))
}

/// Agent: report a migration's status (compare-and-swap).
#[utoipa::path(put, path = "/v1/migrations/{name}/status", tag = "agent", params(("name" = String, Path)), request_body = Migration,
    responses((status = 200, body = Migration), (status = 409, body = novacron_api::ErrorBody)))]
async fn put_migration_status(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Migration>> {
    let mut m = find_authorized::<Migration>(&state, &p, &name, Verb::Status).await?;
    let body: Migration = body.parse()?;
    // The caller's revision makes the store's compare-and-swap reject stale writers (409).
    m.metadata.resource_version = body.metadata.resource_version;
    if m.status.phase.is_final() && body.status.phase != m.status.phase {
        return Err(ApiError::conflict("migration already ended"));
    }
    let ends = !m.status.phase.is_final() && body.status.phase.is_final();
    m.status = body.status;
    let m = state.store.update_obj(&m).await?;
    if ends {
        state.metrics.migration_ended(&m);
    }
    Ok(Json(m))
}

/// Agent: the VM runs on the target. Rebinds the VM, then records the
/// migration as Completed. Idempotent, so the agent can retry it.
#[utoipa::path(post, path = "/v1/migrations/{name}/complete", tag = "agent", params(("name" = String, Path)), request_body = CompleteMigration,
    responses((status = 200, body = Migration), (status = 409, body = novacron_api::ErrorBody)))]
async fn complete_migration(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Migration>> {
    let m = find_authorized::<Migration>(&state, &p, &name, Verb::Status).await?;
    let body: CompleteMigration = body.parse()?;
    if m.status.phase == MigrationPhase::Completed {
        return Ok(Json(m));
    }
    if m.status.phase.is_final() {
        return Err(ApiError::conflict(format!(
            "migration {:?} already ended ({})",
            m.metadata.name, m.status.phase
        )));
    }
    let target = m.status.target_node.clone();
    let pid = body.target_qemu_pid;
    state
        .store
        .modify::<Vm, _>(&m.spec.vm, |vm| {
            vm.status.node = Some(target.clone());
            // Cold migrations have no process on the target (pid 0).
            vm.status.qemu_pid = (pid != 0).then_some(pid);
            vm.status.phase = if pid == 0 {
                VmPhase::Stopped
            } else if vm.spec.power_state == novacron_api::PowerState::Paused {
                VmPhase::Paused
            } else {
                VmPhase::Running
            };
            vm.status.reason = None;
            true
        })
        .await?;
    let m = state
        .store
        .modify::<Migration, _>(&m.metadata.name, |m| {
            m.status = body.status.clone();
            m.status.phase = MigrationPhase::Completed;
            m.status.finished_at.get_or_insert_with(Utc::now);
            true
        })
        .await?;
    tracing::info!(migration = %m.metadata.name, vm = %m.spec.vm, node = %target, "migration completed");
    if let Some(parent) = &m.spec.trace_parent {
        let now = std::time::SystemTime::now();
        let span = novacron_trace::Finished::new("migration.complete", now, now)
            .attribute("migration", m.metadata.name.clone())
            .attribute("vm", m.spec.vm.clone())
            .attribute("node", target.clone());
        novacron_trace::record(parent, &span);
    }
    state.metrics.migration_ended(&m);
    state.placement_wakeup.notify_one();
    Ok(Json(m))
}
