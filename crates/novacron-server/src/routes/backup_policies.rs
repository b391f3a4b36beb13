//! `/v1/backup-policies`: when to back up which VMs of a project, to which
//! store, and what to keep (`backup_runs` carries them out).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::{validate, BackupPolicy, BackupPolicySpec, CreateBackupPolicy, Metadata, Verb};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find, find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_policies, create_policy))
        .routes(routes!(get_policy, update_policy, delete_policy))
        .routes(routes!(run_policy))
}

/// List backup policies, or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/backup-policies", tag = "backups", params(ListQuery),
    responses((status = 200, body = novacron_api::List<BackupPolicy>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_policies(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<BackupPolicy>(&state, &p, q, |_| {}).await
}

/// The store must exist (a policy that names none would fail every run).
async fn check_spec(state: &AppState, spec: &BackupPolicySpec) -> ApiResult<()> {
    spec.validate()?;
    if state
        .store
        .get_obj::<novacron_api::BackupStore>(spec.store())
        .await?
        .is_none()
    {
        return Err(ApiError::invalid(
            "spec.store",
            format!("unknown backup store {:?}", spec.store()),
        ));
    }
    Ok(())
}

/// Create a backup policy; its first run is at the schedule's next time.
#[utoipa::path(post, path = "/v1/backup-policies", tag = "backups", request_body = CreateBackupPolicy,
    responses((status = 201, body = BackupPolicy), (status = 403, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_policy(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<BackupPolicy>)> {
    authorize(&p, novacron_api::Resource::Backups, Verb::Create, None)?;
    let req: CreateBackupPolicy = body.parse()?;
    let project = p.project_for(req.project.clone());
    authorize(&p, novacron_api::Resource::Backups, Verb::Create, Some(&project))?;
    super::projects::require_project(&state, &project).await?;
    validate::name("name", &req.name)?;
    validate::labels("labels", &req.labels)?;
    check_spec(&state, &req.spec).await?;
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project;
    let policy = BackupPolicy {
        metadata,
        spec: req.spec,
        status: Default::default(),
    };
    let policy = state.store.create_obj(&policy).await?;
    state.policy_wakeup.notify_one();
    tracing::info!(policy = %policy.metadata.name, schedule = %policy.spec.schedule, "backup policy created");
    Ok((StatusCode::CREATED, Json(policy)))
}

/// Get a backup policy with its next and last runs.
#[utoipa::path(get, path = "/v1/backup-policies/{name}", tag = "backups", params(("name" = String, Path)),
    responses((status = 200, body = BackupPolicy), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_policy(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<BackupPolicy>> {
    Ok(Json(
        find_authorized::<BackupPolicy>(&state, &p, &name, Verb::Read).await?,
    ))
}

/// Replace a backup policy's spec; the next run is worked out again.
#[utoipa::path(put, path = "/v1/backup-policies/{name}", tag = "backups", params(("name" = String, Path)),
    request_body = BackupPolicySpec,
    responses((status = 200, body = BackupPolicy), (status = 404, body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn update_policy(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<BackupPolicy>> {
    let policy = find_authorized::<BackupPolicy>(&state, &p, &name, Verb::Update).await?;
    let spec: BackupPolicySpec = body.parse()?;
    check_spec(&state, &spec).await?;
    let policy = state
        .store
        .modify::<BackupPolicy, _>(&policy.metadata.name, |x| {
            if x.spec == spec {
                return false;
            }
            x.spec = spec.clone();
            x.metadata.generation += 1;
            true
        })
        .await?;
    state.policy_wakeup.notify_one();
    Ok(Json(policy))
}

/// Delete a backup policy (its backups stay). A run going on finishes.
#[utoipa::path(delete, path = "/v1/backup-policies/{name}", tag = "backups", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody)))]
async fn delete_policy(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let policy = find_authorized::<BackupPolicy>(&state, &p, &name, Verb::Delete).await?;
    state
        .store
        .delete_obj::<BackupPolicy>(&policy.metadata.name, None)
        .await?;
    tracing::info!(policy = %name, "backup policy deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Run a policy now (also while suspended): its VMs' backups, then the
/// prune. Answers at once; the run's progress shows in `status.running`,
/// its outcome in `status.last_run`.
#[utoipa::path(post, path = "/v1/backup-policies/{name}/run", tag = "backups", params(("name" = String, Path)),
    responses((status = 202, body = BackupPolicy), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "A run of the policy is going on", body = novacron_api::ErrorBody)))]
async fn run_policy(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<BackupPolicy>)> {
    let policy = find_authorized::<BackupPolicy>(&state, &p, &name, Verb::Update).await?;
    // Running it is taking its VMs' backups.
    authorize(
        &p,
        novacron_api::Resource::Backups,
        Verb::Create,
        Some(&policy.metadata.project),
    )?;
    let claim = state
        .policy_runs
        .claim(&policy.metadata.name)
        .ok_or_else(|| ApiError::conflict(format!("backup policy {name:?} is running; wait for it to finish")))?;
    let run = crate::backup_runs::start_run(&state, claim, policy, true).await;
    let mut policy = find::<BackupPolicy>(&state, &name).await?;
    // As it was when the run began (a fast run may have finished already).
    policy.status.running = Some(run);
    Ok((StatusCode::ACCEPTED, Json(policy)))
}
