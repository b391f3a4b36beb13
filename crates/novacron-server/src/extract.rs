//! Extractors whose rejections use the API error body.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
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
/// How long a JSON body (at most 1 MiB) may take to arrive.
const BODY_TIME: Duration = Duration::from_secs(30);

/// A JSON request body, read but not yet parsed: a handler parses it with
/// [`JsonBody::parse`] after it has authorized the caller, so that someone
/// who may not make the request learns nothing about what it would accept.
/// An oversized body, a wrong content type or a body that cannot be read
/// becomes an error only then, too.
pub struct JsonBody {
    bytes: Result<Bytes, ApiError>,
    json_content_type: bool,
}

impl JsonBody {
    /// The body as `T`: malformed JSON is a 400, JSON of the wrong shape a 422.
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        let bytes = self.bytes?;
        if !self.json_content_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Expected Content-Type: application/json",
            ));
        }
        Self::decode(&bytes)
    }

    /// As [`JsonBody::parse`], where an empty body stands for `T::default()`.
    pub fn parse_or_default<T: DeserializeOwned + Default>(self) -> Result<T, ApiError> {
        match &self.bytes {
            Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
            _ => self.parse(),
        }
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
        match axum::Json::<T>::from_bytes(bytes) {
            Ok(axum::Json(v)) => Ok(v),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let json_content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")));
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
            return Ok(JsonBody {
                bytes: Err(too_large()),
                json_content_type,
            });
        }
        let mut body = req.into_body().into_data_stream();
        let mut read = Vec::new();
        let reading = async {
            loop {
                match body.next().await {
                    None => break Ok(Bytes::from(std::mem::take(&mut read))),
                    Some(Err(e)) => break Err(ApiError::bad_request(format!("Cannot read the request body: {e}"))),
                    // A body without a declared length can still run over.
                    Some(Ok(chunk)) if read.len() + chunk.len() > MAX_JSON_BODY => break Err(too_large()),
                    Some(Ok(chunk)) => read.extend_from_slice(&chunk),
                }
            }
        };
        // A client that trickles its body does not hold a task forever.
        let bytes = tokio::time::timeout(BODY_TIME, reading).await.unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("The request body did not arrive within {} s", BODY_TIME.as_secs()),
            ))
        });
        Ok(JsonBody {
            bytes,
            json_content_type,
        })
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match status {
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
