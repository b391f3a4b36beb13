//! HTTP routes, one module per resource.

pub mod health;
pub mod images;
pub mod migrations;
pub mod nodes;
pub mod vms;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use novacron_api::selector::LabelSelector;
use novacron_api::{List, Object, WatchEvent, WatchEventType};
use novacron_store::{decode_record, EventType, StoreExt};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Label selector: `k=v`, `k!=v`, `k`, `!k`, comma-separated.
    pub label_selector: Option<String>,
    /// Page size (1-1000, default 100).
    pub limit: Option<u32>,
    /// Token from the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_token: Option<String>,
    /// Stream changes as newline-delimited JSON instead of listing.
    pub watch: Option<bool>,
    /// With `watch`: send changes after this revision (default: now).
    pub resource_version: Option<u64>,
}

/// Looks an object up by name, then by id.
pub async fn find<T: Object>(state: &AppState, key: &str) -> ApiResult<T> {
    if let Some(obj) = state.store.get_obj::<T>(key).await? {
        return Ok(obj);
    }
    if let Some(obj) = state.store.get_obj_by_id::<T>(key).await? {
        return Ok(obj);
    }
    Err(ApiError::not_found(format!("{} {key:?}", T::KIND)))
}

/// Serves a list page or, with `watch=true`, a watch stream. `present` fills
/// in derived fields before an object is returned.
pub async fn list_or_watch<T: Object>(
    state: &AppState,
    q: ListQuery,
    present: impl FnOnce(&mut [T]) + Send,
) -> ApiResult<Response> {
    let selector = LabelSelector::parse(q.label_selector.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::invalid("label_selector", e.message))?;
    let matches = move |labels: &serde_json::Value| {
        let labels = serde_json::from_value(labels.clone()).unwrap_or_default();
        selector.matches(&labels)
    };
    if q.watch.unwrap_or(false) {
        let from = match q.resource_version {
            Some(rv) => rv,
            None => state.store.revision().await?,
        };
        let events = state.store.watch(T::KIND, from).await?;
        let lines = events.filter_map(move |ev| {
            let out = match ev {
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream ended");
                    Some(Err(std::io::Error::other(e.to_string())))
                }
                Ok(ev) if !matches(&ev.record.value["metadata"]["labels"]) => None,
                Ok(ev) => {
                    let event_type = match ev.event_type {
                        EventType::Added => WatchEventType::Added,
                        EventType::Modified => WatchEventType::Modified,
                        EventType::Deleted => WatchEventType::Deleted,
                    };
                    decode_record::<T>(ev.record).ok().map(|object| {
                        let mut line = serde_json::to_vec(&WatchEvent { event_type, object }).unwrap_or_default();
                        line.push(b'\n');
                        Ok(bytes::Bytes::from(line))
                    })
                }
            };
            futures::future::ready(out)
        });
        return Ok(([(CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response());
    }

    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let after = q
        .continue_token
        .as_deref()
        .map(|c| {
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::invalid("continue", "invalid continue token"))
        })
        .transpose()?;
    let filter = move |r: &novacron_store::Record| matches(&r.value["metadata"]["labels"]);
    let page = state
        .store
        .list(T::KIND, Some(&filter), after.as_deref(), limit as usize)
        .await?;
    let mut items = page
        .items
        .into_iter()
        .map(decode_record::<T>)
        .collect::<Result<Vec<T>, _>>()?;
    present(&mut items);
    Ok(Json(List {
        items,
        continue_token: page.more_after.map(hex::encode),
        resource_version: page.revision,
    })
    .into_response())
}
