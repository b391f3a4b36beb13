//! Extractors whose rejections use the API error body.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use axum::http::StatusCode;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::MAX_JSON_BODY;

/// A body declared over the limit but under this is read (and dropped) before
/// the refusal goes out: a connection closed with request bytes unread may be
/// reset under the client while it still writes, and it then sees a broken
/// pipe instead of the 413.
const DRAIN_MAX: u64 = 16 * MAX_JSON_BODY as u64;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// JSON body; malformed, wrongly typed or oversized bodies become API errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&len| len > MAX_JSON_BODY as u64) {
            if len <= DRAIN_MAX {
                let mut body = req.into_body().into_data_stream();
                let _ = tokio::time::timeout(DRAIN_TIME, async { while let Some(Ok(_)) = body.next().await {} }).await;
            }
            return Err(too_large());
        }
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "Expected Content-Type: application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::new(status, "invalid", text),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", text),
    }
}

fn too_large() -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "Request body is too large")
}

/// Query string parameters.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::bad_request(r.body_text())
}
