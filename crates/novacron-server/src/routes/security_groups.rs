//! `/v1/security-groups`: the firewall of VM NICs. Each group's members
//! (the addresses of the NICs in it) are kept in its status by the server,
//! so agents apply rules that name a group without watching every VM.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::security::{self, DEFAULT_GROUP};
use novacron_api::{
    validate, CreateSecurityGroup, Metadata, NicSpec, Resource, SecurityGroup, SecurityRule, UpdateSecurityGroup, Verb,
    Vm,
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
        .routes(routes!(list_security_groups, create_security_group))
        .routes(routes!(
            get_security_group,
            update_security_group,
            delete_security_group
        ))
}

/// List security groups, or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/security-groups", tag = "networks", params(ListQuery),
    responses((status = 200, body = novacron_api::List<SecurityGroup>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_security_groups(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<SecurityGroup>(&state, &p, q, |_| {}).await
}

/// The groups that rules may name must be of the same project.
async fn check_rules(state: &AppState, project: &str, rules: &[SecurityRule]) -> ApiResult<()> {
    security::rules(rules)?;
    for (i, r) in rules.iter().enumerate() {
        if let Some(g) = &r.group {
            let known = state
                .store
                .get_obj::<SecurityGroup>(g)
                .await?
                .is_some_and(|x| x.metadata.project == project);
            if !known {
                return Err(ApiError::invalid(
                    &format!("rules[{i}].group"),
                    format!("unknown security group {g:?} in project {project:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Create a security group.
#[utoipa::path(post, path = "/v1/security-groups", tag = "networks", request_body = CreateSecurityGroup,
    responses((status = 201, body = SecurityGroup), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_security_group(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<SecurityGroup>)> {
    authorize(&p, Resource::Networks, Verb::Create, None)?;
    let req: CreateSecurityGroup = body.parse()?;
    let project = p.project_for(req.project.clone());
    authorize(&p, Resource::Networks, Verb::Create, Some(&project))?;
    super::projects::require_project(&state, &project).await?;
    validate::name("name", &req.name)?;
    validate::labels("labels", &req.labels)?;
    check_rules(&state, &project, &req.rules).await?;
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project.clone();
    let group = SecurityGroup {
        metadata,
        spec: security::SecurityGroupSpec { rules: req.rules },
        status: Default::default(),
    };
    let group = state.store.create_obj(&group).await?;
    refresh_members(&state, &project).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// Get a security group with its members' addresses.
#[utoipa::path(get, path = "/v1/security-groups/{name}", tag = "networks", params(("name" = String, Path)),
    responses((status = 200, body = SecurityGroup), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_security_group(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<SecurityGroup>> {
    Ok(Json(
        find_authorized::<SecurityGroup>(&state, &p, &name, Verb::Read).await?,
    ))
}

/// Replace a security group's rules; every host applies them at once.
#[utoipa::path(put, path = "/v1/security-groups/{name}", tag = "networks", params(("name" = String, Path)),
    request_body = UpdateSecurityGroup,
    responses((status = 200, body = SecurityGroup), (status = 404, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn update_security_group(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<SecurityGroup>> {
    let group = find_authorized::<SecurityGroup>(&state, &p, &name, Verb::Update).await?;
    let req: UpdateSecurityGroup = body.parse()?;
    check_rules(&state, &group.metadata.project, &req.rules).await?;
    let group = state
        .store
        .modify::<SecurityGroup, _>(&group.metadata.name, |g| {
            let changed = g.spec.rules != req.rules;
            g.spec.rules = req.rules.clone();
            changed
        })
        .await?;
    Ok(Json(group))
}

/// Delete a security group no NIC and no other group's rule names.
#[utoipa::path(delete, path = "/v1/security-groups/{name}", tag = "networks", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_security_group(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let group = find_authorized::<SecurityGroup>(&state, &p, &name, Verb::Delete).await?;
    let name = group.metadata.name.clone();
    // Under the lock VM creates take, so no NIC joins it meanwhile.
    let _guard = state.lock_quota().await?;
    super::refuse_while_used(&state, &format!("security group {name:?}"), |v| {
        v.spec.nics.iter().any(|n| n.security_groups.contains(&name))
    })
    .await?;
    let named_by: Vec<String> = state
        .store
        .list_all::<SecurityGroup>()
        .await?
        .into_iter()
        .filter(|g| g.metadata.name != name && g.spec.rules.iter().any(|r| r.group.as_deref() == Some(&name)))
        .map(|g| g.metadata.name)
        .collect();
    if !named_by.is_empty() {
        return Err(ApiError::conflict(format!(
            "security group {name:?} is named in the rules of: {}",
            named_by.join(", ")
        )));
    }
    state
        .store
        .delete_obj::<SecurityGroup>(&name, Some(group.metadata.resource_version))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Gives NICs that name no group the project's `default` (made on first
/// use, with no rules: members reach each other, nothing else gets in)
/// and checks that the groups they name exist.
pub async fn resolve_nic_groups(state: &AppState, project: &str, nics: &mut [NicSpec]) -> ApiResult<()> {
    for (i, nic) in nics.iter_mut().enumerate() {
        if nic.security_groups.is_empty() {
            nic.security_groups.push(DEFAULT_GROUP.to_string());
        }
        for g in &nic.security_groups {
            match state.store.get_obj::<SecurityGroup>(g).await? {
                Some(x) if x.metadata.project == project => {}
                None if g == DEFAULT_GROUP => {
                    let mut metadata = Metadata::new(DEFAULT_GROUP, Default::default());
                    metadata.project = project.to_string();
                    let group = SecurityGroup {
                        metadata,
                        spec: Default::default(),
                        status: Default::default(),
                    };
                    match state.store.create_obj(&group).await {
                        Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                _ => {
                    return Err(ApiError::invalid(
                        &format!("spec.nics[{i}].security_groups"),
                        format!("unknown security group {g:?} in project {project:?}"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Recomputes the members of every group of `project` from its VMs. One at
/// a time, each from a fresh list, so the last one written is current.
pub async fn refresh_members(state: &AppState, project: &str) -> ApiResult<()> {
    let _one_at_a_time = state.members_lock.lock().await;
    let vms = state.store.list_all::<Vm>().await?;
    let groups = state.store.list_all::<SecurityGroup>().await?;
    for g in groups.iter().filter(|g| g.metadata.project == project) {
        let mut members: Vec<String> = vms
            .iter()
            .filter(|v| v.metadata.project == project)
            .flat_map(|v| v.spec.nics.iter())
            .filter(|n| n.security_groups.contains(&g.metadata.name))
            .filter_map(|n| n.ip.clone())
            .collect();
        members.sort();
        members.dedup();
        match state
            .store
            .modify::<SecurityGroup, _>(&g.metadata.name, |x| {
                let changed = x.status.members != members;
                x.status.members = members.clone();
                changed
            })
            .await
        {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
