use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use novacron_api::Health;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Liveness: the process serves requests.
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        server: None,
        leader: None,
    })
}

/// Readiness: the store answers; says which server this is and whether it
/// leads.
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state
        .store
        .revision()
        .await
        .map_err(|e| ApiError::unavailable(format!("Store unavailable: {e}")))?;
    Ok(Json(Health {
        status: "ready".into(),
        server: Some(state.leadership.id.clone()),
        leader: Some(state.leadership.is_leader()),
    }))
}
