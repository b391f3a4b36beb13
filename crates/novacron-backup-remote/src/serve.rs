//! The `backup-store` role: one datastore directory served over mTLS.
//! Only clients whose certificate (from the cluster CA, checked in the
//! handshake) names one of `allowed` get in: by default the cluster's
//! servers (`novacron-server`), which relay what agents write and read.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use novacron_backup::{BackupId, BackupInfo, Datastore, Digest};
use novacron_tls::PeerInfo;
use serde::Deserialize;

use crate::handle::{ErrorKind, HandleError, StoreHandle};
use crate::wire::{
    BackupView, KnownAnswer, KnownRequest, Stored, WireError, WriteBackup, MAX_CHUNK_BODY, MAX_KNOWN, MAX_WRITE_BODY,
};

/// The certificate name of the cluster's servers.
pub const SERVER_NAME: &str = "novacron-server";

#[derive(Clone)]
struct Served {
    store: StoreHandle,
    allowed: Arc<Vec<String>>,
}

/// The routes, for `novacron_tls::serve` (which gives each request the
/// client certificate's name).
pub fn router(ds: Datastore, allowed: Vec<String>) -> Router {
    let served = Served {
        store: StoreHandle::Local(ds),
        allowed: Arc::new(allowed),
    };
    Router::new()
        .route("/store/v1/chunks/known", post(known))
        .route("/store/v1/chunks/{digest}", put(put_chunk).get(get_chunk))
        .route("/store/v1/backups", get(list))
        .route(
            "/store/v1/backups/{vm}/{time}",
            get(view).put(write_backup).delete(delete),
        )
        .route("/store/v1/backups/{vm}/{time}/verify", post(verify))
        .route("/store/v1/backups/{vm}/{time}/disks/{disk}/index", get(index))
        .route("/store/v1/gc", post(gc))
        .layer(DefaultBodyLimit::max(MAX_WRITE_BODY))
        .layer(middleware::from_fn_with_state(served.clone(), admit))
        .with_state(served)
}

struct Refused(ErrorKind, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = WireError {
            kind: self.0,
            message: self.1,
        };
        (status, Json(body)).into_response()
    }
}

impl From<HandleError> for Refused {
    fn from(e: HandleError) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Refused(e.kind(), message)
    }
}

type Answer<T> = Result<T, Refused>;

async fn admit(State(s): State<Served>, req: Request, next: Next) -> Response {
    let name = req
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .and_then(|ConnectInfo(p)| p.cert_common_name.clone());
    match name {
        Some(n) if s.allowed.contains(&n) => next.run(req).await,
        Some(n) => {
            tracing::warn!(client = %n, "refused a client this store does not serve");
            Refused(ErrorKind::Forbidden, format!("this backup store does not serve {n:?}")).into_response()
        }
        None => Refused(
            ErrorKind::Forbidden,
            "a client certificate from the cluster CA is needed".into(),
        )
        .into_response(),
    }
}

fn digest(hex: &str) -> Answer<Digest> {
    Digest::from_hex(hex).ok_or_else(|| Refused(ErrorKind::Invalid, format!("{hex:?} is not 64 hex digits")))
}

fn backup_id(vm: &str, time: &str) -> Answer<BackupId> {
    BackupId::parse(vm, time).ok_or_else(|| Refused(ErrorKind::NotFound, format!("No backup {vm}/{time}")))
}

async fn known(State(s): State<Served>, Json(q): Json<KnownRequest>) -> Answer<Json<KnownAnswer>> {
    if q.digests.len() > MAX_KNOWN {
        return Err(Refused(
            ErrorKind::Invalid,
            format!("at most {MAX_KNOWN} digests at once"),
        ));
    }
    let digests = q.digests.iter().map(|d| digest(d)).collect::<Answer<Vec<_>>>()?;
    Ok(Json(KnownAnswer {
        known: s.store.known(digests).await?,
    }))
}

async fn put_chunk(State(s): State<Served>, Path(hex): Path<String>, body: Bytes) -> Answer<Json<Stored>> {
    let d = digest(&hex)?;
    if body.len() > MAX_CHUNK_BODY {
        return Err(Refused(
            ErrorKind::Invalid,
            format!("a chunk is at most {MAX_CHUNK_BODY} bytes"),
        ));
    }
    Ok(Json(Stored {
        stored_bytes: s.store.insert_encoded(d, body).await?,
    }))
}

async fn get_chunk(State(s): State<Served>, Path(hex): Path<String>) -> Answer<Bytes> {
    Ok(s.store.chunk_file(digest(&hex)?).await?)
}

#[derive(Deserialize)]
struct ListQuery {
    vm: Option<String>,
}

async fn list(State(s): State<Served>, Query(q): Query<ListQuery>) -> Answer<Response> {
    Ok(Json(s.store.list(q.vm.as_deref()).await?).into_response())
}

async fn view(State(s): State<Served>, Path((vm, time)): Path<(String, String)>) -> Answer<Json<BackupView>> {
    let (manifest, verified) = s.store.view(&backup_id(&vm, &time)?).await?;
    Ok(Json(BackupView { manifest, verified }))
}

async fn write_backup(
    State(s): State<Served>,
    Path((vm, time)): Path<(String, String)>,
    Json(w): Json<WriteBackup>,
) -> Answer<(StatusCode, Response)> {
    let id = backup_id(&vm, &time)?;
    let mut disks = Vec::new();
    for d in &w.disks {
        let (index, stats) = novacron_backup::from_commit_disk(d)
            .map_err(|e| Refused(ErrorKind::Invalid, format!("disk {}: {e}", d.name)))?;
        disks.push((d.name.clone(), index, stats));
    }
    let info = BackupInfo {
        vm_id: w.vm_id,
        project: w.project,
        full_reason: w.full_reason,
        duration_ms: w.duration_ms,
        config: w.config,
        key_id: w.key_id,
    };
    let manifest = s.store.write_backup(&id, disks, info).await?;
    tracing::info!(backup = %id, "backup stored");
    Ok((StatusCode::CREATED, Json(manifest).into_response()))
}

async fn delete(State(s): State<Served>, Path((vm, time)): Path<(String, String)>) -> Answer<StatusCode> {
    let id = backup_id(&vm, &time)?;
    s.store.delete(&id).await?;
    tracing::info!(backup = %id, "backup deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn verify(State(s): State<Served>, Path((vm, time)): Path<(String, String)>) -> Answer<Response> {
    Ok(Json(s.store.verify(&backup_id(&vm, &time)?).await?).into_response())
}

async fn index(State(s): State<Served>, Path((vm, time, disk)): Path<(String, String, String)>) -> Answer<Vec<u8>> {
    Ok(s.store.index(&backup_id(&vm, &time)?, &disk).await?.to_bytes())
}

#[derive(Deserialize)]
struct GcQuery {
    grace_s: Option<u64>,
}

async fn gc(State(s): State<Served>, Query(q): Query<GcQuery>) -> Answer<Response> {
    let grace = Duration::from_secs(q.grace_s.unwrap_or(300).min(604_800));
    let report = s.store.collect_garbage(grace).await?;
    tracing::info!(
        removed = report.chunks_removed,
        bytes = report.bytes_removed,
        "garbage collected"
    );
    Ok(Json(report).into_response())
}
