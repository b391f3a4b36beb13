//! `/v1/events` (what happened, listed and watched like any object) and
//! `/v1/webhooks` (where events are delivered, and how each delivery went).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use novacron_api::{CreateWebhook, Event, Metadata, Resource, Verb, Webhook, WebhookSpec};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::ApiResult;
use crate::extract::{ApiQuery, JsonBody};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(get_event))
        .routes(routes!(list_webhooks, create_webhook))
        .routes(routes!(get_webhook, delete_webhook))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsSince {
    /// Only events after this time (RFC 3339), e.g. the last hour's.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// List events, oldest first, or watch them with `watch=true`. Select one
/// object's with `field_selector=involved.kind=vm,involved.name=NAME`.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(ListQuery, EventsSince),
    responses((status = 200, body = novacron_api::List<Event>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_events(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(mut q): ApiQuery<ListQuery>,
    ApiQuery(since): ApiQuery<EventsSince>,
) -> ApiResult<Response> {
    // Event names begin with their time in milliseconds: a list from a
    // time starts after the name that time would have.
    if let (Some(t), None) = (since.since, &q.continue_token) {
        q.continue_token = Some(hex::encode(format!("{:013}", t.timestamp_millis().max(0))));
    }
    list_or_watch::<Event>(&state, &p, q, |_| {}).await
}

/// Get one event.
#[utoipa::path(get, path = "/v1/events/{name}", tag = "events", params(("name" = String, Path)),
    responses((status = 200, body = Event), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_event(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Event>> {
    Ok(Json(find_authorized::<Event>(&state, &p, &name, Verb::Read).await?))
}

/// A webhook as the API shows it: without its secret.
fn shown(mut w: Webhook) -> Webhook {
    w.spec.secret.clear();
    w
}

/// List webhooks with their last deliveries.
#[utoipa::path(get, path = "/v1/webhooks", tag = "events",
    responses((status = 200, body = Vec<Webhook>), (status = 403, body = novacron_api::ErrorBody)))]
async fn list_webhooks(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<Webhook>>> {
    authorize(&p, Resource::Webhooks, Verb::Read, None)?;
    let hooks = state.store.list_all::<Webhook>().await?;
    Ok(Json(hooks.into_iter().map(shown).collect()))
}

/// Create a webhook: events whose topic matches one of its patterns are
/// POSTed to its URL from now on, signed with its secret.
#[utoipa::path(post, path = "/v1/webhooks", tag = "events", request_body = CreateWebhook,
    responses((status = 201, body = Webhook), (status = 403, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_webhook(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Webhook>)> {
    authorize(&p, Resource::Webhooks, Verb::Create, None)?;
    let req: CreateWebhook = body.parse()?;
    req.validate()?;
    let hook = Webhook {
        metadata: Metadata::new(&req.name, Default::default()),
        spec: WebhookSpec {
            url: req.url,
            events: req.events,
            secret: req.secret,
            retry_for_s: req.retry_for_s.unwrap_or(novacron_api::event::DEFAULT_RETRY_FOR_S),
        },
        status: Default::default(),
    };
    let hook = state.store.create_obj(&hook).await?;
    tracing::info!(webhook = %hook.metadata.name, url = %hook.spec.url, events = ?hook.spec.events, "webhook created");
    Ok((StatusCode::CREATED, Json(shown(hook))))
}

/// Get a webhook with its last deliveries (`status.deliveries`, newest last).
#[utoipa::path(get, path = "/v1/webhooks/{name}", tag = "events", params(("name" = String, Path)),
    responses((status = 200, body = Webhook), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_webhook(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Webhook>> {
    Ok(Json(shown(
        find_authorized::<Webhook>(&state, &p, &name, Verb::Read).await?,
    )))
}

/// Delete a webhook; its pending deliveries stop.
#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "events", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody)))]
async fn delete_webhook(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let hook = find_authorized::<Webhook>(&state, &p, &name, Verb::Delete).await?;
    state.store.delete_obj::<Webhook>(&hook.metadata.name, None).await?;
    tracing::info!(webhook = %name, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}
