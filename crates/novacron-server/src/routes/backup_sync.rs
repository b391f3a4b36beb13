//! `POST /v1/backup-stores/{store}/sync`: copies into a store the backups
//! another store has and it lacks (off-site copies), streaming progress.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use novacron_api::backup::{SyncBackups, SyncEvent};
use novacron_api::error::chain;
use novacron_api::{Resource, Verb};
use novacron_backup_remote::sync::{sync, DEFAULT_IN_FLIGHT};
use tokio_stream::wrappers::ReceiverStream;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::backups::open;
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(sync_stores))
}

/// Progress lines a slow reader may fall behind by before some are dropped.
const EVENTS_QUEUED: usize = 64;

/// Copy into `store` the backups store `from` has and it lacks: the chunks
/// it lacks (many transfers in flight), then the backups, oldest first.
/// Streams `SyncEvent`s as newline-delimited JSON, ending with `done` or
/// `failed`; the sync goes on if the caller hangs up.
#[utoipa::path(post, path = "/v1/backup-stores/{store}/sync", tag = "backups", params(("store" = String, Path)),
    request_body = SyncBackups,
    responses((status = 200, content_type = "application/x-ndjson", body = SyncEvent),
        (status = 403, body = novacron_api::ErrorBody), (status = 404, body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody), (status = 503, body = novacron_api::ErrorBody)))]
async fn sync_stores(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(store): Path<String>,
    body: JsonBody,
) -> ApiResult<Response> {
    authorize(&p, Resource::BackupStores, Verb::Update, None)?;
    let req: SyncBackups = body.parse()?;
    req.validate()?;
    if req.from == store {
        return Err(ApiError::invalid("from", "a store other than the destination"));
    }
    let (_, src) = open(&state, &req.from).await?;
    let (_, dst) = open(&state, &store).await?;
    let in_flight = req.in_flight.map_or(DEFAULT_IN_FLIGHT, |n| n as usize);
    let (tx, rx) = tokio::sync::mpsc::channel::<SyncEvent>(EVENTS_QUEUED);
    let span = tracing::info_span!("backup_sync", from = %req.from, to = %store, in_flight);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            tracing::info!("sync begins");
            let progress_tx = tx.clone();
            let outcome = sync(&src, &dst, req.vm.as_deref(), in_flight, |p| {
                // A reader that falls behind misses progress, never the end.
                let _ = progress_tx.try_send(SyncEvent::Progress(*p));
            })
            .await;
            let event = match outcome {
                Ok(r) => {
                    tracing::info!(
                        backups = r.backups_copied.len(),
                        chunks = r.chunks_copied,
                        bytes = r.bytes_copied,
                        ms = r.duration_ms,
                        "sync done"
                    );
                    SyncEvent::Done(r)
                }
                Err(e) => {
                    let message = chain(&e).to_string();
                    tracing::warn!(error = %message, "sync failed");
                    SyncEvent::Failed { message }
                }
            };
            let _ = tx.send(event).await;
        },
        span,
    ));
    let lines = futures::StreamExt::map(ReceiverStream::new(rx), |event| {
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    Ok(([(CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
}
