//! Backups and the datastores they go to.
//!
//! - `/v1/backup-stores`: datastores the server serves (a directory each;
//!   `local`, under the data dir, always exists).
//! - `/v1/vms/{name}/backups`: take a backup; the VM's agent reads the
//!   disks and streams progress, which is relayed as newline-delimited JSON.
//! - `/v1/backups`: list, get, verify and delete backups, in every store
//!   the caller's projects have backups in.
//! - `/v1/backup-stores/{store}/chunks/...` and `.../backups`: what an
//!   agent writes a backup with (its node's certificate or token, never a
//!   user's): chunks, each checked against its digest, then the commit.

use std::collections::HashMap;
use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use novacron_api::backup::DEFAULT_STORE;
use novacron_api::backup::{GcResult, KeepRules, PruneBackups, PruneResult, RestoreBackup, RestoreSource};
use novacron_api::error::chain;
use novacron_api::{
    Backup, BackupStore, BackupStoreSpec, BackupVerification, CreateBackup, CreateBackupStore, CreateVm, Metadata,
    PowerState, Resource, Verb, Vm, VmSpec,
};
use novacron_backup::{BackupId, Datastore, StoreError};
use novacron_backup_remote::{ErrorKind, HandleError, RemoteStore, StoreHandle};
use novacron_store::{SharedStore, StoreExt};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find, find_authorized};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::{proxy, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_stores, add_store))
        .routes(routes!(get_store, remove_store))
        .routes(routes!(take_backup))
        .routes(routes!(list_backups))
        .routes(routes!(get_backup, delete_backup))
        .routes(routes!(verify_backup))
        .routes(routes!(restore_backup))
        .routes(routes!(prune_backups))
        .routes(routes!(collect_garbage))
}

/// Makes the `local` store (`<data-dir>/backups`) unless it is registered.
pub async fn ensure_default_store(store: &SharedStore, data_dir: &std::path::Path) -> Result<(), ApiError> {
    if store.get_obj::<BackupStore>(DEFAULT_STORE).await?.is_some() {
        return Ok(());
    }
    let path = data_dir.join("backups");
    let made = path.clone();
    blocking(move || Datastore::create(&made)).await?;
    let obj = BackupStore {
        metadata: Metadata::new(DEFAULT_STORE, Default::default()),
        spec: BackupStoreSpec {
            path: path.display().to_string(),
            url: None,
            encryption_key_id: None,
        },
    };
    store.create_obj(&obj).await?;
    Ok(())
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("A backup store task failed", &e))?
        .map_err(|e| store_error(HandleError::Store(e)))
}

pub(super) fn store_error(e: HandleError) -> ApiError {
    let message = chain(&e).to_string();
    match e.kind() {
        ErrorKind::NotFound => ApiError::not_found(message),
        ErrorKind::Conflict => ApiError::conflict(message),
        ErrorKind::Invalid => ApiError::invalid("body", message),
        ErrorKind::Forbidden | ErrorKind::Unavailable => {
            ApiError::unavailable(format!("The backup store failed: {message}"))
        }
    }
}

/// A registered store, opened: a directory of the server's, or a
/// `backup-store` process reached over mTLS with the server's certificate.
pub(super) async fn open(state: &AppState, name: &str) -> ApiResult<(BackupStore, StoreHandle)> {
    let store = find::<BackupStore>(state, name).await?;
    if let Some(url) = &store.spec.url {
        let remote = RemoteStore::new(state.agents.clone(), url);
        return Ok((store, StoreHandle::Remote(remote)));
    }
    let path = PathBuf::from(&store.spec.path);
    let name = store.metadata.name.clone();
    let ds = blocking(move || Datastore::open(&path))
        .await
        .map_err(|e| ApiError::unavailable(format!("Backup store {name:?} cannot be opened: {}", e.message)))?;
    Ok((store, StoreHandle::Local(ds)))
}

/// The backup a path names, if the caller may see it (others' are not found).
pub(super) async fn find_backup(
    state: &AppState,
    p: &Principal,
    store: &str,
    vm: &str,
    time: &str,
    verb: Verb,
) -> ApiResult<(StoreHandle, BackupId, Backup)> {
    authorize(p, Resource::Backups, verb, None)?;
    let not_found = || ApiError::not_found(format!("backup {store}:{vm}/{time}"));
    let id = BackupId::parse(vm, time).ok_or_else(not_found)?;
    let (_, handle) = open(state, store).await?;
    let (manifest, verified) = handle.view(&id).await.map_err(store_error)?;
    let backup = view(&manifest, verified, store);
    if !p.sees(&backup.project) {
        return Err(not_found());
    }
    authorize(p, Resource::Backups, verb, Some(&backup.project))?;
    Ok((handle, id, backup))
}

/// A backup as the API shows it, with its last verify's outcome.
fn view(m: &novacron_backup::Manifest, verified: Option<novacron_backup::Verified>, store: &str) -> Backup {
    let mut b = m.to_api(store);
    b.verified = verified.map(|v| novacron_api::backup::BackupVerified {
        at: v.at,
        ok: v.ok,
        errors: v.errors.len() as u64,
    });
    b
}

// ---------------------------------------------------------------- stores

/// The backup stores.
#[utoipa::path(get, path = "/v1/backup-stores", tag = "backups",
    responses((status = 200, body = Vec<BackupStore>), (status = 403, body = novacron_api::ErrorBody)))]
async fn list_stores(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<BackupStore>>> {
    authorize(&p, Resource::BackupStores, Verb::Read, None)?;
    let mut stores = state.store.list_all::<BackupStore>().await?;
    stores.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(Json(stores))
}

/// Register a datastore directory on the server's machine (made if
/// missing; one that holds a datastore is taken over with its backups).
#[utoipa::path(post, path = "/v1/backup-stores", tag = "backups", request_body = CreateBackupStore,
    responses((status = 201, body = BackupStore), (status = 403, body = novacron_api::ErrorBody),
        (status = 409, description = "A store of that name exists, or one uses that directory", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody),
        (status = 503, description = "The directory cannot be made a datastore", body = novacron_api::ErrorBody)))]
async fn add_store(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<BackupStore>)> {
    authorize(&p, Resource::BackupStores, Verb::Create, None)?;
    let req: CreateBackupStore = body.parse()?;
    req.validate()?;
    let existing = state.store.list_all::<BackupStore>().await?;
    if existing.iter().any(|s| s.metadata.name == req.name) {
        return Err(ApiError::conflict(format!(
            "backup store {:?} already exists",
            req.name
        )));
    }
    let spec = match (req.path, req.url) {
        (Some(path), _) => BackupStoreSpec {
            path,
            url: None,
            encryption_key_id: req.encryption_key_id,
        },
        (None, Some(url)) => BackupStoreSpec {
            path: String::new(),
            url: Some(url.trim_end_matches('/').to_string()),
            encryption_key_id: req.encryption_key_id,
        },
        (None, None) => return Err(ApiError::invalid("path", "either a path or a url")),
    };
    let same = |s: &&BackupStore| match &spec.url {
        Some(url) => s.spec.url.as_ref() == Some(url),
        None => s.spec.path == spec.path,
    };
    if let Some(s) = existing.iter().find(same) {
        return Err(ApiError::conflict(format!(
            "backup store {:?} already uses {}",
            s.metadata.name,
            spec.url.as_deref().unwrap_or(&spec.path)
        )));
    }
    let obj = BackupStore {
        metadata: Metadata::new(&req.name, Default::default()),
        spec,
    };
    match &obj.spec.url {
        Some(url) => reach_remote(&state, url).await?,
        None => make_local(&state, &obj.spec.path).await?,
    }
    let obj = state.store.create_obj(&obj).await?;
    tracing::info!(store = %obj.metadata.name, path = %obj.spec.path, url = ?obj.spec.url, "backup store added");
    Ok((StatusCode::CREATED, Json(obj)))
}

/// A remote store must answer the server (mTLS, its certificate from the
/// cluster CA) before it is added.
async fn reach_remote(state: &AppState, url: &str) -> ApiResult<()> {
    if state.tls.is_none() {
        return Err(ApiError::invalid(
            "url",
            "remote backup stores are reached over mTLS: the server must serve TLS",
        ));
    }
    RemoteStore::new(state.agents.clone(), url)
        .check()
        .await
        .map_err(|e| ApiError::unavailable(format!("The backup store at {url} does not answer: {}", chain(&e))))?;
    Ok(())
}

/// A directory under the allowed roots that is empty, missing or a
/// datastore becomes one.
async fn make_local(state: &AppState, path: &str) -> ApiResult<()> {
    let roots = &state.config.backup_store_roots;
    if !roots.is_empty() && !roots.iter().any(|r| std::path::Path::new(path).starts_with(r)) {
        let allowed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(ApiError::invalid(
            "path",
            format!("backup stores go under {} on this server", allowed.join(" or ")),
        ));
    }
    let dir = PathBuf::from(path);
    let checked = dir.clone();
    let usable = tokio::task::spawn_blocking(move || usable_for_store(&checked))
        .await
        .map_err(|e| ApiError::internal("A backup store task failed", &e))?;
    if let Err(why) = usable {
        return Err(ApiError::conflict(format!("{path}: {why}")));
    }
    blocking(move || Datastore::create(&dir))
        .await
        .map_err(|e| ApiError::unavailable(format!("Cannot make {path} a datastore: {}", e.message)))?;
    Ok(())
}

/// A store goes into a directory that is missing (it is made), empty, or
/// a datastore already: never over other files.
fn usable_for_store(path: &std::path::Path) -> Result<(), String> {
    match std::fs::read_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot read it: {e}")),
        Ok(mut entries) => {
            if path.join(".chunks").is_dir() || entries.next().is_none() {
                Ok(())
            } else {
                Err("the directory holds other files and is not a datastore".into())
            }
        }
    }
}

#[utoipa::path(get, path = "/v1/backup-stores/{store}", tag = "backups", params(("store" = String, Path)),
    responses((status = 200, body = BackupStore), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_store(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<BackupStore>> {
    authorize(&p, Resource::BackupStores, Verb::Read, None)?;
    Ok(Json(find::<BackupStore>(&state, &name).await?))
}

/// Forget a store; its directory and backups stay where they are (adding
/// it again takes them back). `local` stays.
#[utoipa::path(delete, path = "/v1/backup-stores/{store}", tag = "backups", params(("store" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The default store", body = novacron_api::ErrorBody)))]
async fn remove_store(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    authorize(&p, Resource::BackupStores, Verb::Delete, None)?;
    let store = find::<BackupStore>(&state, &name).await?;
    if store.metadata.name == DEFAULT_STORE {
        return Err(ApiError::conflict("The default store cannot be removed"));
    }
    state
        .store
        .delete_obj::<BackupStore>(&store.metadata.name, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- backups

/// Back up a VM (running, paused or stopped): each disk at one instant,
/// read in full the first time and afterwards only where it changed. The answer streams progress
/// as newline-delimited `BackupEvent`s and ends with `done` (the backup)
/// or `failed` (nothing of it is listed). The backup goes on if the
/// caller hangs up.
#[utoipa::path(post, path = "/v1/vms/{name}/backups", tag = "backups", params(("name" = String, Path)),
    request_body = CreateBackup,
    responses((status = 200, content_type = "application/x-ndjson", body = novacron_api::BackupEvent),
        (status = 403, body = novacron_api::ErrorBody), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is starting or stopping, has never run, is migrating, or is being backed up", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody),
        (status = 503, description = "The VM's agent or the store cannot be reached", body = novacron_api::ErrorBody)))]
async fn take_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Response> {
    authorize(&p, Resource::Backups, Verb::Create, None)?;
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?;
    authorize(&p, Resource::Backups, Verb::Create, Some(&vm.metadata.project))?;
    let req: CreateBackup = body.parse_or_default()?;
    req.validate()?;
    let answer = start_backup(&state, &vm, req.store()).await?;
    Ok((
        [(CONTENT_TYPE, "application/x-ndjson")],
        follow_backup(&state, vm, answer),
    )
        .into_response())
}

/// Relays the agent's progress stream to the caller and records the
/// backup's outcome as an event, also when the caller has gone away.
fn follow_backup(state: &AppState, vm: Vm, answer: reqwest::Response) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    let events = state.events.clone();
    tokio::spawn(async move {
        let mut progress = std::pin::pin!(novacron_client::ndjson_body::<novacron_api::BackupEvent>(answer));
        let mut ended = false;
        while let Some(event) = progress.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => novacron_api::BackupEvent::Failed {
                    message: format!("the backup's progress stream broke: {}", chain(&e)),
                },
            };
            match &event {
                novacron_api::BackupEvent::Done(b) => events.backup_ended(&vm, Ok(&b.id)),
                novacron_api::BackupEvent::Failed { message } => events.backup_ended(&vm, Err(message)),
                novacron_api::BackupEvent::Progress { .. } => {}
            }
            ended |= !matches!(event, novacron_api::BackupEvent::Progress { .. });
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            // The caller may have gone: the outcome is still recorded.
            let _ = tx.send(Ok(line.into())).await;
            if ended {
                break;
            }
        }
        if !ended {
            tracing::warn!(vm = %vm.metadata.name, "a backup's progress stream ended without its outcome");
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Has the VM's agent begin a backup of it to `store`; the answer streams
/// its progress (newline-delimited `BackupEvent`s).
pub async fn start_backup(state: &AppState, vm: &Vm, store: &str) -> ApiResult<reqwest::Response> {
    let (store, _) = open(state, store).await?;
    if !super::vms::settled(vm) {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: backups are taken of running, paused or stopped VMs; try again when it is",
            vm.metadata.name, vm.status.phase
        )));
    }
    if vm.status.node.is_none() {
        return Err(ApiError::conflict(format!(
            "VM {:?} has never run: it has no disks to back up yet",
            vm.metadata.name
        )));
    }
    super::vms::refuse_while_migrating(state, &vm.metadata.name).await?;
    let node = super::vms::bound_node(state, vm).await?;
    let ask = novacron_api::agent::BackupRequest {
        store: store.metadata.name.clone(),
        vm: vm.metadata.name.clone(),
        key_id: store.spec.encryption_key_id.clone(),
    };
    tracing::info!(vm = %vm.metadata.name, store = %ask.store, "backup requested");
    proxy::backup(state, &node, vm, &ask).await
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupQuery {
    /// Only this store's backups.
    pub store: Option<String>,
    /// Only backups of the VM of this name.
    pub vm: Option<String>,
}

/// Backups the caller may see, oldest first.
#[utoipa::path(get, path = "/v1/backups", tag = "backups", params(BackupQuery),
    responses((status = 200, body = Vec<Backup>), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, description = "No such store", body = novacron_api::ErrorBody),
        (status = 503, description = "A store cannot be read", body = novacron_api::ErrorBody)))]
async fn list_backups(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<BackupQuery>,
) -> ApiResult<Json<Vec<Backup>>> {
    authorize(&p, Resource::Backups, Verb::Read, None)?;
    let stores = match &q.store {
        Some(s) => vec![find::<BackupStore>(&state, s).await?],
        None => state.store.list_all::<BackupStore>().await?,
    };
    let mut out = Vec::new();
    for s in stores {
        let (_, handle) = open(&state, &s.metadata.name).await?;
        let listed = handle.list(q.vm.as_deref()).await.map_err(store_error)?;
        out.extend(
            listed
                .into_iter()
                .filter(|v| p.sees(&v.manifest.project))
                .map(|v| view(&v.manifest, v.verified, &s.metadata.name)),
        );
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/backups/{store}/{vm}/{time}", tag = "backups",
    params(("store" = String, Path), ("vm" = String, Path), ("time" = String, Path, description = "RFC 3339, seconds, Z")),
    responses((status = 200, body = Backup), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, vm, time)): Path<(String, String, String)>,
) -> ApiResult<Json<Backup>> {
    let (_, _, backup) = find_backup(&state, &p, &store, &vm, &time, Verb::Read).await?;
    Ok(Json(backup))
}

/// Delete a backup; the chunks no other backup uses go at the store's next
/// garbage collection.
#[utoipa::path(delete, path = "/v1/backups/{store}/{vm}/{time}", tag = "backups",
    params(("store" = String, Path), ("vm" = String, Path), ("time" = String, Path)),
    responses((status = 204), (status = 404, body = novacron_api::ErrorBody)))]
async fn delete_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, vm, time)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let (handle, id, backup) = find_backup(&state, &p, &store, &vm, &time, Verb::Delete).await?;
    if let Some(reader) = live_restores(&state).await?.get(&backup.id) {
        return Err(ApiError::conflict(format!(
            "VM {reader:?} is being restored live from backup {}: it reads chunks from it until its restore is done",
            backup.id
        )));
    }
    handle.delete(&id).await.map_err(store_error)?;
    tracing::info!(backup = %backup.id, "backup deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The backups live restores read from (`STORE:VM/TIME`), with the VM
/// each restores: deleting one would pull chunks from under a running guest.
async fn live_restores(state: &AppState) -> ApiResult<HashMap<String, String>> {
    let vms = state.store.list_all::<Vm>().await?;
    Ok(vms
        .into_iter()
        .filter_map(|v| {
            let src = v.spec.restore_from.as_ref().filter(|s| s.live)?;
            // Not started yet: its restore begins at the start.
            let reading = v.status.live_restore.is_some() || v.status.started_at.is_none();
            reading.then(|| (src.to_string(), v.metadata.name))
        })
        .collect())
}

/// Read back every chunk of a backup and check it against its digest
/// (as an operator would before relying on it: it reads the whole backup).
#[utoipa::path(post, path = "/v1/backups/{store}/{vm}/{time}/verify", tag = "backups",
    params(("store" = String, Path), ("vm" = String, Path), ("time" = String, Path)),
    responses((status = 200, body = BackupVerification), (status = 404, body = novacron_api::ErrorBody)))]
async fn verify_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, vm, time)): Path<(String, String, String)>,
) -> ApiResult<Json<BackupVerification>> {
    let (handle, id, backup) = find_backup(&state, &p, &store, &vm, &time, Verb::Update).await?;
    // A damaged backup stays marked (`backup list` shows it) until a
    // verify finds it whole.
    let report = handle.verify(&id).await.map_err(store_error)?;
    if !report.ok() {
        tracing::warn!(backup = %backup.id, errors = ?report.errors, "backup failed verification");
    }
    Ok(Json(BackupVerification {
        id: backup.id,
        chunks_checked: report.chunks_checked,
        bytes_checked: report.bytes_checked,
        ok: report.ok(),
        errors: report.errors,
    }))
}

/// Remove a VM's backups in a store that the keep rules do not keep (a
/// policy's retention applied by hand). The chunks they alone used go at
/// the store's next garbage collection.
#[utoipa::path(post, path = "/v1/backups/prune", tag = "backups", request_body = PruneBackups,
    responses((status = 200, body = PruneResult), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody),
        (status = 503, body = novacron_api::ErrorBody)))]
async fn prune_backups(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<Json<PruneResult>> {
    authorize(&p, Resource::Backups, Verb::Delete, None)?;
    let req: PruneBackups = body.parse()?;
    novacron_api::validate::name("vm", &req.vm)?;
    req.keep.validate()?;
    let store = req.store.clone().unwrap_or_else(|| DEFAULT_STORE.into());
    novacron_api::validate::name("store", &store)?;
    let caller = p.clone();
    let result = prune_vm(&state, &store, &req.vm, &req.keep, req.dry_run, |project| {
        if !caller.sees(project) {
            // Others' backups are not seen.
            return Ok(false);
        }
        authorize(&caller, Resource::Backups, Verb::Delete, Some(project))?;
        Ok(true)
    })
    .await?;
    Ok(Json(result))
}

/// Removes the backups of `vm` in `store` that `keep` does not keep,
/// counting only the backups whose project `counts` says (others are
/// neither counted nor removed).
pub async fn prune_vm(
    state: &AppState,
    store: &str,
    vm: &str,
    keep: &KeepRules,
    dry_run: bool,
    counts: impl Fn(&str) -> ApiResult<bool>,
) -> ApiResult<PruneResult> {
    let (_, handle) = open(state, store).await?;
    let backups = handle.list(Some(vm)).await.map_err(store_error)?;
    let mut mine = Vec::new();
    for v in backups {
        if counts(&v.manifest.project)? {
            mine.push(v.manifest);
        }
    }
    let policy = novacron_backup::retention::KeepPolicy {
        keep_last: keep.keep_last,
        keep_hourly: keep.keep_hourly,
        keep_daily: keep.keep_daily,
        keep_weekly: keep.keep_weekly,
        keep_monthly: keep.keep_monthly,
        keep_yearly: keep.keep_yearly,
    };
    let times: Vec<_> = mine.iter().map(|m| m.id.time).collect();
    let keeps = novacron_backup::retention::select(&policy, &times);
    let reading = live_restores(state).await?;
    let mut result = PruneResult {
        kept: Vec::new(),
        removed: Vec::new(),
    };
    for (m, keep) in mine.iter().zip(keeps).rev() {
        let id = m.to_api(store).id;
        if keep {
            result.kept.push(id);
            continue;
        }
        if let Some(reader) = reading.get(&id) {
            // Removed by a later prune, once the restore is done.
            tracing::info!(backup = %id, vm = %reader, "not pruned: a live restore reads it");
            result.kept.push(id);
            continue;
        }
        if !dry_run {
            handle.delete(&m.id).await.map_err(store_error)?;
            tracing::info!(backup = %id, "pruned");
        }
        result.removed.push(id);
    }
    Ok(result)
}

/// Remove the chunks no backup in the store names (kept: those a backup
/// being written may need). Reads the indexes, then looks only at chunks
/// they do not name.
#[utoipa::path(post, path = "/v1/backup-stores/{store}/gc", tag = "backups", params(("store" = String, Path), GcQuery),
    responses((status = 200, body = GcResult), (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody), (status = 503, body = novacron_api::ErrorBody)))]
async fn collect_garbage(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(store): Path<String>,
    ApiQuery(q): ApiQuery<GcQuery>,
) -> ApiResult<Json<GcResult>> {
    authorize(&p, Resource::BackupStores, Verb::Update, None)?;
    if q.grace_s.is_some_and(|g| g > 604_800) {
        return Err(ApiError::invalid("grace_s", "at most 604800 (a week)"));
    }
    let grace = std::time::Duration::from_secs(q.grace_s.unwrap_or(GC_GRACE_S).into());
    let (_, handle) = open(&state, &store).await?;
    let r = handle.collect_garbage(grace).await.map_err(store_error)?;
    tracing::info!(
        store,
        removed = r.chunks_removed,
        bytes = r.bytes_removed,
        ms = r.duration_ms,
        "garbage collected"
    );
    Ok(Json(GcResult {
        chunks_in_use: r.chunks_in_use,
        chunks_recent: r.chunks_recent,
        chunks_removed: r.chunks_removed,
        bytes_removed: r.bytes_removed,
        abandoned_removed: r.abandoned_removed,
        duration_ms: r.duration_ms,
    }))
}

/// Seconds within which a chunk written is kept by a garbage collection
/// even if no backup names it yet (clocks that disagree, uploads in flight).
const GC_GRACE_S: u32 = 300;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GcQuery {
    /// Keep chunks written in the last this many seconds (default 300).
    #[param(maximum = 604800)]
    pub grace_s: Option<u32>,
}

/// Make a new VM from a backup: the backed-up VM's settings (CPUs,
/// memory, image, networks, cloud-init) with addresses and MACs of its
/// own, and its disks as they were backed up (its agent reads every chunk
/// back, checked against its digest, when the VM is first placed; a
/// damaged chunk fails the VM naming it), or, `live`, as it runs: the VM
/// starts at once and reads what is not restored yet on demand while the
/// rest streams in (`status.live_restore`); a backup with volumes only with
/// `without_volumes`. With `in_place`, the backup's disks replace those of
/// the stopped VM `name` instead (all of them or none, its volumes too,
/// which must be attached to it; its settings stay).
#[utoipa::path(post, path = "/v1/backups/{store}/{vm}/{time}/restore", tag = "backups",
    params(("store" = String, Path), ("vm" = String, Path), ("time" = String, Path)),
    request_body = RestoreBackup,
    responses((status = 201, body = Vm), (status = 200, description = "In place: the VM, its restore requested", body = Vm),
        (status = 403, body = novacron_api::ErrorBody),
        (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "A VM of that name exists, or the quota is exceeded", body = novacron_api::ErrorBody),
        (status = 422, description = "The backup holds no VM settings, or its image is gone", body = novacron_api::ErrorBody)))]
async fn restore_backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((store, vm, time)): Path<(String, String, String)>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    authorize(&p, Resource::Vms, Verb::Create, None)?;
    let (handle, id, backup) = find_backup(&state, &p, &store, &vm, &time, Verb::Read).await?;
    let req: RestoreBackup = body.parse()?;
    novacron_api::validate::name("name", &req.name)?;
    let source = RestoreSource {
        store: backup.store.clone(),
        vm: backup.vm.clone(),
        time: time.clone(),
        live: req.live,
    };
    if req.in_place && req.live {
        return Err(ApiError::invalid(
            "live",
            "a live restore starts a new VM on the backup's disks; a restore in place is of a stopped VM's",
        ));
    }
    let volumes: Vec<&str> = backup
        .disks
        .iter()
        .filter_map(|d| d.name.strip_prefix("vol-"))
        .collect();
    if req.in_place {
        if req.without_volumes {
            return Err(ApiError::invalid(
                "without_volumes",
                "a restore in place puts back every disk of the backup, the VM's volumes too",
            ));
        }
        let vm = restore_in_place(&state, &p, &req, &backup, &volumes, source).await?;
        return Ok((StatusCode::OK, Json(vm)));
    }
    if !volumes.is_empty() && !req.without_volumes {
        return Err(ApiError::invalid(
            "without_volumes",
            format!(
                "backup {} holds volumes ({}): a restore into a new VM does not bring volumes back; restore in place over the VM they are attached to, or restore the VM's own disks only (without_volumes, --without-volumes)",
                backup.id,
                volumes.join(", ")
            ),
        ));
    }
    let (manifest, _) = handle.view(&id).await.map_err(store_error)?;
    let config = manifest.config.ok_or_else(|| {
        ApiError::invalid(
            "backup",
            format!("backup {} holds no VM settings to restore from", backup.id),
        )
    })?;
    let mut spec: VmSpec = serde_json::from_value(config)
        .map_err(|e| ApiError::invalid("backup", format!("backup {} has unusable VM settings: {e}", backup.id)))?;
    // Addresses and MACs of its own; the rest as it was.
    for nic in &mut spec.nics {
        nic.ip = None;
        nic.mac = None;
    }
    spec.volumes.clear();
    spec.power_state = if req.start || req.live {
        PowerState::Running
    } else {
        PowerState::Stopped
    };
    spec.stop_grace_s = None;
    let create = CreateVm {
        name: req.name,
        project: Some(backup.project.clone()),
        labels: Default::default(),
        spec,
        no_default_network: true,
    };
    let vm = super::vms::create(&state, &p, create, Some(source)).await?;
    tracing::info!(vm = %vm.metadata.name, backup = %backup.id, "VM restored from a backup");
    Ok((StatusCode::CREATED, Json(vm)))
}

/// The backup's disks over a stopped VM's (its agent replaces them, all or
/// none, and reports it in `status.observed_restore_generation`).
async fn restore_in_place(
    state: &AppState,
    p: &Principal,
    req: &RestoreBackup,
    backup: &Backup,
    volumes: &[&str],
    source: RestoreSource,
) -> ApiResult<Vm> {
    let vm = find_authorized::<Vm>(state, p, &req.name, Verb::Update).await?;
    // Each volume goes back into the volume it was; one no longer attached
    // has nowhere to go.
    let detached: Vec<&str> = volumes
        .iter()
        .copied()
        .filter(|id| !vm.spec.volumes.iter().any(|a| a.id == *id))
        .collect();
    if !detached.is_empty() {
        return Err(ApiError::conflict(format!(
            "backup {} holds volumes that are not attached to VM {:?} ({}): attach them first",
            backup.id,
            vm.metadata.name,
            detached.join(", ")
        )));
    }
    if req.start {
        return Err(ApiError::invalid(
            "start",
            "a restore in place replaces a stopped VM's disks: start it once restored",
        ));
    }
    if vm.metadata.project != backup.project {
        return Err(ApiError::invalid(
            "name",
            format!(
                "VM {:?} is in project {:?}; backup {} is of project {:?}",
                vm.metadata.name, vm.metadata.project, backup.id, backup.project
            ),
        ));
    }
    let stopped =
        |v: &Vm| v.spec.power_state == PowerState::Stopped && v.status.phase == novacron_api::VmPhase::Stopped;
    if !stopped(&vm) {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: stop it first; a restore in place replaces a stopped VM's disks",
            vm.metadata.name, vm.status.phase
        )));
    }
    // The agent keeps the snapshots (the VM's status may lag).
    let snapshots: Vec<novacron_api::Snapshot> = match vm.status.node {
        None => Vec::new(),
        Some(_) => {
            let node = super::vms::bound_node(state, &vm).await?;
            proxy::snapshots(state, &node, &vm, reqwest::Method::GET, "snapshots", None).await?
        }
    };
    if !snapshots.is_empty() {
        let names: Vec<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
        return Err(ApiError::conflict(format!(
            "VM {:?} has snapshots ({}): delete them first; a restore replaces the disks they are layers of",
            vm.metadata.name,
            names.join(", ")
        )));
    }
    let Json(vm) = super::vms::act(state, p, &vm.metadata.name, |v| {
        if !stopped(v) {
            return Err(ApiError::conflict("the VM was started meanwhile"));
        }
        if volumes.iter().any(|id| !v.spec.volumes.iter().any(|a| a.id == *id)) {
            return Err(ApiError::conflict("a volume of the backup was detached meanwhile"));
        }
        v.spec.restore_from = Some(source.clone());
        v.spec.restore_generation += 1;
        Ok(())
    })
    .await?;
    tracing::info!(vm = %vm.metadata.name, backup = %backup.id, "restore in place requested");
    Ok(vm)
}
