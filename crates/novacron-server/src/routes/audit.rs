//! The audit log: records, filtered, and the verification of their hash chain.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::Utc;
use novacron_api::{AuditRecord, AuditVerification, List, Resource, Verb};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit))
        .routes(routes!(verify_audit))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only records at or after this time (RFC 3339).
    pub since: Option<chrono::DateTime<Utc>>,
    /// Only records by this user (or `token:<name>`, `anonymous`).
    pub user: Option<String>,
    pub project: Option<String>,
    /// Page size (1-1000, default 100).
    pub limit: Option<u32>,
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_token: Option<String>,
}

/// Audit records, oldest first, filtered.
#[utoipa::path(get, path = "/v1/audit", tag = "identity", params(AuditQuery),
    responses((status = 200, body = List<AuditRecord>)))]
async fn list_audit(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<List<AuditRecord>>> {
    authorize(&p, Resource::Audit, Verb::Read, None)?;
    let limit = q.limit.unwrap_or(super::DEFAULT_PAGE);
    if !(1..=super::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {}", super::MAX_PAGE),
        ));
    }
    let after = super::decode_continue(q.continue_token.as_deref())?;
    // A token limited to a project sees only that project's records.
    let project = q.project.clone().or_else(|| p.project.clone());
    if let (Some(own), Some(asked)) = (&p.project, &q.project) {
        if own != asked {
            return Err(ApiError::forbidden(format!("this token is limited to project {own:?}")));
        }
    }
    let filter = move |r: &novacron_store::Record| {
        let e = &r.value["entry"];
        q.since.is_none_or(|since| {
            e["time"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= since)
        }) && q.user.as_deref().is_none_or(|u| e["actor"].as_str() == Some(u))
            && project.as_deref().is_none_or(|pr| e["project"].as_str() == Some(pr))
    };
    let page = state
        .store
        .list(
            <AuditRecord as novacron_api::Object>::KIND,
            Some(&filter),
            after.as_deref(),
            limit as usize,
        )
        .await?;
    let items = page
        .items
        .into_iter()
        .map(novacron_store::decode_record::<AuditRecord>)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(List {
        items,
        continue_token: page.more_after.map(hex::encode),
        resource_version: page.revision,
    }))
}

/// Check the whole audit chain: any changed, reordered or deleted record is reported.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "identity", responses((status = 200, body = AuditVerification)))]
async fn verify_audit(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<AuditVerification>> {
    authorize(&p, Resource::Audit, Verb::Read, None)?;
    if p.project.is_some() {
        return Err(ApiError::forbidden(
            "verifying the audit log needs a token for all projects",
        ));
    }
    state
        .audit
        .verify()
        .await
        .map(Json)
        .map_err(|e| ApiError::internal("Audit verification failed", &e))
}
