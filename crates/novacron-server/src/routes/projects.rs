//! Projects with quotas, and the usage they are checked against.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use novacron_api::{
    validate, CreateProject, List, Metadata, Network, Project, Quota, Resource, UpdateProject, Usage, Verb, Vm, Volume,
};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project, update_project, delete_project))
}

/// Root plus data disk of a VM.
pub fn vm_disk_mib(vm: &Vm) -> u64 {
    vm.spec.disk_mib.unwrap_or(1024) + vm.spec.data_disk_mib.unwrap_or(0)
}

fn usage_of<'a>(vms: impl Iterator<Item = &'a Vm>) -> Usage {
    let mut u = Usage::default();
    for vm in vms {
        u.vcpus += u64::from(vm.spec.vcpus);
        u.memory_mib += vm.spec.memory_mib;
        u.disk_mib += vm_disk_mib(vm);
        u.vms += 1;
        u.addresses += vm.spec.nics.len() as u64;
    }
    u
}

/// The project, or 422 when it does not exist.
pub async fn require_project(state: &AppState, name: &str) -> ApiResult<Project> {
    state
        .store
        .get_obj::<Project>(name)
        .await?
        .ok_or_else(|| ApiError::invalid("project", format!("unknown project {name:?}")))
}

/// Disk the project's volumes take.
async fn volume_mib(state: &AppState, project: &str) -> ApiResult<u64> {
    let volumes = state.store.list_all::<Volume>().await?;
    Ok(volumes
        .iter()
        .filter(|v| v.metadata.project == project)
        .map(|v| v.spec.size_mib)
        .sum())
}

/// Whether `quota` limits anything a VM takes.
pub fn limits_vms(quota: &Quota) -> bool {
    let Quota {
        vcpus,
        memory_mib,
        disk_mib,
        vms,
        networks: _,
        addresses,
    } = quota;
    [vcpus, memory_mib, disk_mib, vms, addresses]
        .iter()
        .any(|l| l.is_some())
}

/// Refuses (403, naming the quota) a VM that would take its project over quota.
pub async fn check_quota(state: &AppState, project: &str, quota: &Quota, vm: &Vm) -> ApiResult<()> {
    let vms = state.store.list_all::<Vm>().await?;
    let mut used = usage_of(vms.iter().filter(|v| v.metadata.project == project));
    used.disk_mib += volume_mib(state, project).await?;
    let asked = usage_of(std::iter::once(vm));
    let checks = [
        ("vcpus", quota.vcpus, used.vcpus, asked.vcpus),
        ("memory_mib", quota.memory_mib, used.memory_mib, asked.memory_mib),
        ("disk_mib", quota.disk_mib, used.disk_mib, asked.disk_mib),
        ("vms", quota.vms, used.vms, asked.vms),
        ("addresses", quota.addresses, used.addresses, asked.addresses),
    ];
    refused(state, project, over_quota(project, &checks))
}

/// Refuses (403) `asked` more addresses (NICs added to a VM) over quota.
pub async fn check_address_quota(state: &AppState, project: &str, quota: &Quota, asked: u64) -> ApiResult<()> {
    let vms = state.store.list_all::<Vm>().await?;
    let used = usage_of(vms.iter().filter(|v| v.metadata.project == project));
    refused(
        state,
        project,
        over_quota(project, &[("addresses", quota.addresses, used.addresses, asked)]),
    )
}

/// Refuses (403) `asked` more MiB of disk (a volume made or grown) over quota.
pub async fn check_disk_quota(state: &AppState, project: &str, quota: &Quota, asked: u64) -> ApiResult<()> {
    let vms = state.store.list_all::<Vm>().await?;
    let used =
        usage_of(vms.iter().filter(|v| v.metadata.project == project)).disk_mib + volume_mib(state, project).await?;
    refused(
        state,
        project,
        over_quota(project, &[("disk_mib", quota.disk_mib, used, asked)]),
    )
}

/// Refuses (403) a network that would take its project over quota.
pub async fn check_network_quota(state: &AppState, project: &str, quota: &Quota) -> ApiResult<()> {
    let used = count_networks(state, project).await?;
    refused(
        state,
        project,
        over_quota(project, &[("networks", quota.networks, used, 1)]),
    )
}

async fn count_networks(state: &AppState, project: &str) -> ApiResult<u64> {
    let networks = state.store.list_all::<Network>().await?;
    Ok(networks.iter().filter(|n| n.metadata.project == project).count() as u64)
}

/// A refusal over quota is also an event of the project.
fn refused(state: &AppState, project: &str, checked: ApiResult<()>) -> ApiResult<()> {
    if let Err(e) = &checked {
        state.events.quota_exceeded(project, &e.message);
    }
    checked
}

/// The first quota (name, limit, in use, asked) that the request would pass.
fn over_quota(project: &str, checks: &[(&str, Option<u64>, u64, u64)]) -> ApiResult<()> {
    for &(name, limit, used, asked) in checks {
        if let Some(limit) = limit {
            if used + asked > limit {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "quota_exceeded",
                    format!(
                        "quota {name} of project {project:?} exceeded: limit {limit}, in use {used}, requested {asked}"
                    ),
                )
                .with_field(format!("quota.{name}")));
            }
        }
    }
    Ok(())
}

async fn with_usage(state: &AppState, mut projects: Vec<Project>) -> ApiResult<Vec<Project>> {
    let vms = state.store.list_all::<Vm>().await?;
    let networks = state.store.list_all::<Network>().await?;
    let volumes = state.store.list_all::<Volume>().await?;
    for p in &mut projects {
        p.usage = usage_of(vms.iter().filter(|v| v.metadata.project == p.metadata.name));
        p.usage.disk_mib += volumes
            .iter()
            .filter(|v| v.metadata.project == p.metadata.name)
            .map(|v| v.spec.size_mib)
            .sum::<u64>();
        p.usage.networks = networks
            .iter()
            .filter(|n| n.metadata.project == p.metadata.name)
            .count() as u64;
    }
    Ok(projects)
}

fn validate_quota(q: &Quota) -> ApiResult<()> {
    for (name, v) in [
        ("vcpus", q.vcpus),
        ("memory_mib", q.memory_mib),
        ("disk_mib", q.disk_mib),
        ("vms", q.vms),
        ("networks", q.networks),
        ("addresses", q.addresses),
    ] {
        if v.is_some_and(|v| v > novacron_api::MAX_QUOTA) {
            return Err(ApiError::invalid(&format!("quota.{name}"), "quota is too large"));
        }
    }
    Ok(())
}

/// List the projects the caller sees, with their usage.
#[utoipa::path(get, path = "/v1/projects", tag = "identity", responses((status = 200, body = List<Project>)))]
async fn list_projects(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<List<Project>>> {
    authorize(&p, Resource::Projects, Verb::Read, None)?;
    let visible = state
        .store
        .list_all::<Project>()
        .await?
        .into_iter()
        .filter(|x| p.sees(&x.metadata.name))
        .collect();
    Ok(Json(List {
        items: with_usage(&state, visible).await?,
        continue_token: None,
        resource_version: state.store.revision().await?,
    }))
}

/// Create a project with a quota.
#[utoipa::path(post, path = "/v1/projects", tag = "identity", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_project(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Project>)> {
    authorize(&p, Resource::Projects, Verb::Create, None)?;
    let req: CreateProject = body.parse()?;
    validate::name("name", &req.name)?;
    validate_quota(&req.quota)?;
    let mut metadata = Metadata::new(&req.name, Default::default());
    metadata.project = req.name.clone();
    let project = Project {
        metadata,
        quota: req.quota,
        usage: Usage::default(),
    };
    let project = state.store.create_obj(&project).await?;
    tracing::info!(project = %project.metadata.name, "created project");
    Ok((StatusCode::CREATED, Json(project)))
}

async fn visible_project(state: &AppState, p: &Principal, name: &str, verb: Verb) -> ApiResult<Project> {
    // The audit record, of a refusal too, names the project of the path.
    p.audit.set_project(name);
    authorize(p, Resource::Projects, verb, None)?;
    match state.store.get_obj::<Project>(name).await? {
        Some(project) if p.sees(name) => Ok(project),
        _ => Err(ApiError::not_found(format!("project {name:?}"))),
    }
}

/// Get a project with its quota and usage.
#[utoipa::path(get, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_project(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Project>> {
    let project = visible_project(&state, &p, &name, Verb::Read).await?;
    let mut list = with_usage(&state, vec![project]).await?;
    list.pop()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("project {name:?}")))
}

/// Set a project's quota. Lowering it below current use is allowed; it stops new VMs.
#[utoipa::path(put, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)), request_body = UpdateProject,
    responses((status = 200, body = Project), (status = 404, body = novacron_api::ErrorBody)))]
async fn update_project(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Project>> {
    visible_project(&state, &p, &name, Verb::Update).await?;
    let req: UpdateProject = body.parse()?;
    validate_quota(&req.quota)?;
    let project = state
        .store
        .modify::<Project, _>(&name, |x| {
            let changed = x.quota != req.quota;
            x.quota = req.quota;
            changed
        })
        .await?;
    Ok(Json(project))
}

/// Delete an empty project.
#[utoipa::path(delete, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_project(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    visible_project(&state, &p, &name, Verb::Delete).await?;
    if name == novacron_api::default_project() {
        return Err(ApiError::conflict("the default project cannot be deleted"));
    }
    let vms = state.store.list_all::<Vm>().await?;
    let images = state.store.list_all::<novacron_api::Image>().await?;
    let in_use = vms.iter().filter(|v| v.metadata.project == name).count()
        + images.iter().filter(|i| i.metadata.project == name).count()
        + count_networks(&state, &name).await? as usize
        + state
            .store
            .list_all::<Volume>()
            .await?
            .iter()
            .filter(|v| v.metadata.project == name)
            .count();
    if in_use > 0 {
        return Err(ApiError::conflict(format!(
            "project {name:?} still has {in_use} VM(s), image(s), network(s) or volume(s)"
        )));
    }
    state.store.delete_obj::<Project>(&name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
