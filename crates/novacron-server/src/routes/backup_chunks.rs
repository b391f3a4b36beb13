//! The calls an agent writes and reads a backup with (its node's
//! certificate or token, never a user's): chunks, each checked against its
//! digest, then the commit; and a backup's disk index to start the next
//! one from.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use novacron_api::backup::{
    ChunkKnown, ChunkQuery, ChunkStored, CommitBackup, MAX_CHUNK_BODY, MAX_CHUNK_QUERY, MAX_COMMIT_BODY,
};
use novacron_api::{Backup, Resource, Verb, Vm};
use novacron_backup::{BackupId, BackupInfo, Digest, DiskStats, FixedIndex};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::backups::{find_backup, open, store_error};
use super::find_authorized;
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_chunk))
        .routes(routes!(known_chunks))
        .routes(routes!(put_chunk))
        .routes(routes!(commit_backup))
        .routes(routes!(backup_index))
}

/// The calls on a store's chunks are store-wide (a chunk belongs to no one
/// project, and reading one or asking whether it exists would tell about
/// others' data): only callers not limited to a project make them.
fn store_wide(p: &Principal) -> ApiResult<()> {
    authorize(p, Resource::Backups, Verb::Status, None)?;
    match &p.project {
        None => Ok(()),
        Some(own) => Err(ApiError::forbidden(format!(
            "writing to a backup store needs a token for all projects; this one is limited to {own:?}"
        ))),
    }
}

fn digest(hex: &str) -> ApiResult<Digest> {
    Digest::from_hex(hex).ok_or_else(|| ApiError::invalid("digest", format!("{hex:?} is not 64 hex digits")))
}

/// Which of these chunks the store has; those it has are kept from
/// garbage collection as if written now. For agents writing a backup.
#[utoipa::path(post, path = "/v1/backup-stores/{store}/chunks/known", tag = "backups",
    params(("store" = String, Path)), request_body = ChunkQuery,
    responses((status = 200, body = ChunkKnown), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn known_chunks(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(store): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<ChunkKnown>> {
    store_wide(&p)?;
    let q: ChunkQuery = body.parse()?;
    if q.digests.len() > MAX_CHUNK_QUERY {
        return Err(ApiError::invalid(
            "digests",
            format!("at most {MAX_CHUNK_QUERY} at once"),
        ));
    }
    let digests = q.digests.iter().map(|d| digest(d)).collect::<ApiResult<Vec<_>>>()?;
    let (_, handle) = open(&state, &store).await?;
    let known = handle.known(digests).await.map_err(store_error)?;
    Ok(Json(ChunkKnown { known }))
}

/// Store one chunk (its encoded file: header, then the data, compressed or
/// not); it is decoded and checked against `digest` first. For agents.
#[utoipa::path(put, path = "/v1/backup-stores/{store}/chunks/{digest}", tag = "backups",
    params(("store" = String, Path), ("digest" = String, Path, description = "SHA-256 of the chunk's data, hex")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ChunkStored), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 413, body = novacron_api::ErrorBody),
        (status = 422, description = "The chunk is malformed or does not match the digest", body = novacron_api::ErrorBody),
        (status = 503, description = "The store cannot take it (full, unwritable)", body = novacron_api::ErrorBody)))]
async fn put_chunk(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, hex)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<ChunkStored>> {
    store_wide(&p)?;
    let d = digest(&hex)?;
    let (_, handle) = open(&state, &store).await?;
    let bytes = axum::body::to_bytes(body, MAX_CHUNK_BODY).await.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("A chunk upload is at most {MAX_CHUNK_BODY} bytes: {e}"),
        )
    })?;
    let stored = handle.insert_encoded(d, bytes).await.map_err(store_error)?;
    Ok(Json(ChunkStored {
        stored_bytes: stored.unwrap_or(0),
        new: stored.is_some(),
    }))
}

/// One chunk's file as stored (header, then the data, compressed or not):
/// the reader decodes it and checks it against the digest. For agents
/// restoring a VM.
#[utoipa::path(get, path = "/v1/backup-stores/{store}/chunks/{digest}", tag = "backups",
    params(("store" = String, Path), ("digest" = String, Path, description = "SHA-256 of the chunk's data, hex")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 403, body = novacron_api::ErrorBody), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The store lacks the chunk", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn get_chunk(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, hex)): Path<(String, String)>,
) -> ApiResult<Response> {
    store_wide(&p)?;
    let d = digest(&hex)?;
    let (_, handle) = open(&state, &store).await?;
    let file = handle.chunk_file(d).await.map_err(store_error)?;
    Ok(([(CONTENT_TYPE, "application/octet-stream")], file).into_response())
}

/// Write a backup whose chunks are all stored: from now on it is listed.
/// For the agent of the VM's node.
#[utoipa::path(post, path = "/v1/backup-stores/{store}/backups", tag = "backups",
    params(("store" = String, Path)), request_body = CommitBackup,
    responses((status = 201, body = Backup), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "A chunk it names is not stored, or the backup exists", body = novacron_api::ErrorBody),
        (status = 413, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn commit_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(store): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    store_wide(&p)?;
    let bytes = axum::body::to_bytes(body, MAX_COMMIT_BODY).await.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("A commit is at most {MAX_COMMIT_BODY} bytes: {e}"),
        )
    })?;
    let req: CommitBackup = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    // The VM is the node's own: a host writes backups of its VMs only.
    let vm = find_authorized::<Vm>(&state, &p, &req.vm_id, Verb::Status).await?;
    if vm.metadata.name != req.vm {
        return Err(ApiError::invalid(
            "vm",
            format!("VM {} is named {:?}", req.vm_id, vm.metadata.name),
        ));
    }
    let id = BackupId {
        vm: req.vm.clone(),
        time: req.time,
    };
    if BackupId::parse(&id.vm, &id.time_name()).as_ref() != Some(&id) {
        return Err(ApiError::invalid("time", "a time to the second"));
    }
    if req.disks.is_empty() {
        return Err(ApiError::invalid("disks", "a backup has at least one disk"));
    }
    let mut disks: Vec<(String, FixedIndex, DiskStats)> = Vec::new();
    for d in &req.disks {
        let (index, stats) = novacron_backup::from_commit_disk(d)
            .map_err(|e| ApiError::invalid(&format!("disks[{}].digests", d.name), e.to_string()))?;
        disks.push((d.name.clone(), index, stats));
    }
    let (registered, handle) = open(&state, &store).await?;
    if req.key_id != registered.spec.encryption_key_id {
        return Err(ApiError::invalid(
            "key_id",
            match &registered.spec.encryption_key_id {
                Some(k) => format!("store {store:?} keeps backups sealed with backup key {k}"),
                None => format!("store {store:?} keeps backups unsealed"),
            },
        ));
    }
    let info = BackupInfo {
        vm_id: vm.metadata.id.clone(),
        project: vm.metadata.project.clone(),
        full_reason: req.full_reason.clone(),
        duration_ms: req.duration_ms,
        config: Some(
            serde_json::to_value(&vm.spec).map_err(|e| ApiError::internal("Cannot encode the VM's spec", &e))?,
        ),
        key_id: req.key_id.clone(),
    };
    let manifest = handle.write_backup(&id, disks, info).await.map_err(store_error)?;
    let backup = manifest.to_api(&store);
    tracing::info!(backup = %backup.id, vm = %vm.metadata.name, incremental = backup.incremental(), "backup stored");
    Ok((StatusCode::CREATED, Json(backup)))
}

/// A disk's index in a backup (its chunks' digests, binary), which the
/// next backup of the VM starts from. For agents.
#[utoipa::path(get, path = "/v1/backup-stores/{store}/backups/{vm}/{time}/disks/{disk}/index", tag = "backups",
    params(("store" = String, Path), ("vm" = String, Path), ("time" = String, Path), ("disk" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = novacron_api::ErrorBody)))]
async fn backup_index(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, vm, time, disk)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let (handle, id, _) = find_backup(&state, &p, &store, &vm, &time, Verb::Read).await?;
    let index = handle.index(&id, &disk).await.map_err(store_error)?;
    Ok(([(CONTENT_TYPE, "application/octet-stream")], index.to_bytes()).into_response())
}
