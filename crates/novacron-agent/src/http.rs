//! The agent's own HTTP endpoint, for the server and the other agents (mTLS
//! with cluster certificates): serial console (WebSocket bridged to QEMU's
//! console socket) and console log; the migration calls between agents
//! (prepare, finish, abort, cold receive, dry-run plan, disk files) and the
//! DWCP session endpoint; snapshots and backups; health.

use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use novacron_api::agent::{ColdRequest, DwcpEndpoint, PlanRequest, PrepareRequest, VmRef};
use novacron_api::error::chain;
use novacron_api::{ErrorBody, ErrorDetail, AGENT_SECRET_HEADER};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::migration::Migrations;
use crate::qemu::VmDir;

mod backups;
mod metrics;
mod snapshots;

#[derive(Clone)]
pub struct HttpState {
    /// This agent's TLS (absent on plain HTTP): whom it trusts now.
    pub tls: Option<Arc<novacron_tls::LiveTls>>,
    pub vms_root: std::path::PathBuf,
    /// Secret the server (and peer agents) present; unset until registration succeeds.
    pub secret: Arc<RwLock<Option<String>>>,
    pub migrations: Migrations,
    /// This node (the guest agents of its VMs).
    pub node: Arc<crate::node::NodeContext>,
    /// What the server said about the tokens scrapers presented.
    pub scrapers: Arc<metrics::Verdicts>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/agent/v1/vms/{id}/logs", get(logs))
        .route("/agent/v1/vms/{id}/console", get(console))
        .route("/agent/v1/vms/{id}/exec", post(exec))
        .route("/agent/v1/migrations/{id}/prepare", post(prepare))
        .route("/agent/v1/migrations/{id}/finish", post(finish))
        .route("/agent/v1/migrations/{id}/abort", post(abort))
        .route("/agent/v1/migrations/{id}/receive-cold", post(receive_cold))
        .route("/agent/v1/dwcp", get(dwcp_endpoint))
        .route("/agent/v1/plan", post(plan))
        .route("/agent/v1/vms/{id}/disks/{disk}", get(disk_file))
        .route("/agent/v1/vms/{id}/root-image", get(root_image))
        .route(
            "/agent/v1/vms/{id}/snapshots",
            get(snapshots::list).post(snapshots::take),
        )
        .route(
            "/agent/v1/vms/{id}/snapshots/{name}",
            axum::routing::delete(snapshots::delete),
        )
        .route("/agent/v1/vms/{id}/snapshots/{name}/revert", post(snapshots::revert))
        .route("/agent/v1/vms/{id}/backups", post(backups::take))
        .route(
            "/agent/v1/volumes/{id}",
            get(pooled_volume).delete(delete_pooled_volume),
        )
        .route("/agent/v1/vm-stats", get(vm_stats))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_secret))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_cluster_cert,
        ))
        .route("/agent/v1/healthz", get(|| async { "ok" }))
        // Checks its callers itself: Prometheus holds a token, not the agent secret.
        .route("/metrics", get(metrics::scrape))
        .layer(axum::middleware::from_fn_with_state(state.clone(), refuse_revoked))
        .with_state(state)
}

/// A connection opened before its certificate was revoked gets no further
/// answers: the handshake alone would let it go on until it closes.
async fn refuse_revoked(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<novacron_tls::PeerInfo>>()
        .and_then(|c| c.0.cert_sha256.clone());
    if let (Some(tls), Some(peer)) = (&state.tls, peer) {
        if tls.is_revoked(&peer) {
            return error(StatusCode::FORBIDDEN, "This certificate has been revoked");
        }
    }
    next.run(req).await
}

/// Over TLS, the agent's own calls take callers with a cluster certificate
/// only (the server and other agents). The handshake lets clients without
/// one in, for `/metrics` (Prometheus holds a token), so this says no to
/// them everywhere else.
async fn require_cluster_cert(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let has_cert = req
        .extensions()
        .get::<axum::extract::ConnectInfo<novacron_tls::PeerInfo>>()
        .is_some_and(|c| c.0.cert_sha256.is_some());
    if state.tls.is_some() && !has_cert {
        return error(
            StatusCode::UNAUTHORIZED,
            "This endpoint takes cluster certificates only",
        );
    }
    next.run(req).await
}

async fn require_secret(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let expected = state.secret.read().clone();
    let given = req.headers().get(AGENT_SECRET_HEADER).and_then(|v| v.to_str().ok());
    if secret_matches(expected.as_deref(), given) {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "Missing or wrong agent secret")
    }
}

/// Whether the caller gave the agent secret, compared in constant time so the
/// answer's timing tells nothing about how much of a guess was right. No
/// secret yet (before registration) lets nobody in.
fn secret_matches(expected: Option<&str>, given: Option<&str>) -> bool {
    match (expected, given) {
        (Some(e), Some(g)) => e.as_bytes().ct_eq(g.as_bytes()).into(),
        _ => false,
    }
}

/// The port other agents send DWCP sessions to.
async fn dwcp_endpoint(State(state): State<HttpState>) -> Response {
    match state.migrations.dwcp() {
        Some(d) => Json(DwcpEndpoint { port: d.port }).into_response(),
        None => error(StatusCode::NOT_FOUND, "This agent has no DWCP listener"),
    }
}

async fn plan(State(state): State<HttpState>, Json(req): Json<PlanRequest>) -> Response {
    match state.migrations.dry_run(req).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => migration_error(&e),
    }
}

fn vm_dir(state: &HttpState, id: &str) -> Option<VmDir> {
    if !valid_id(id) {
        return None;
    }
    let dir = VmDir::new(&state.vms_root, id);
    dir.path.exists().then_some(dir)
}

/// Runs a command in the guest through its guest agent.
async fn exec(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Json(req): Json<novacron_api::ExecRequest>,
) -> Response {
    use crate::guest::GuestError;
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    }
    match state.node.guests.exec(&id, &dir, &req.command, req.timeout()).await {
        Ok(out) => Json(out).into_response(),
        Err(
            e @ (GuestError::NotRunning
            | GuestError::NoAgent(_)
            | GuestError::Agent(_)
            | GuestError::EmptyCommand
            | GuestError::Busy),
        ) => error(StatusCode::CONFLICT, chain(&e).to_string()),
        Err(e @ GuestError::Timeout(_)) => error(StatusCode::GATEWAY_TIMEOUT, chain(&e).to_string()),
        Err(e @ GuestError::Output) => error(StatusCode::BAD_GATEWAY, chain(&e).to_string()),
    }
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// The running VMs' counters, for the server's metrics.
async fn vm_stats(State(state): State<HttpState>) -> Json<Vec<novacron_api::agent::VmStats>> {
    Json(crate::stats::collect(&state.node).await)
}

async fn logs(State(state): State<HttpState>, Path(id): Path<String>, Query(q): Query<LogsQuery>) -> Response {
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    let path = dir.console_log();
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return ([(CONTENT_TYPE, "text/plain")], Body::empty()).into_response(),
    };
    if !q.follow {
        let stream = tokio_util::io::ReaderStream::new(file);
        return ([(CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response();
    }
    // Follow: send what is there, then poll for growth until the VM's directory
    // disappears or the client goes away.
    let stream = futures::stream::unfold((file, dir), |(mut file, dir)| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => {
                    if !dir.path.exists() {
                        return None;
                    }
                    // The log may have been truncated by a new QEMU; reopen if shorter.
                    let pos = file.stream_position().await.unwrap_or(0);
                    let len = tokio::fs::metadata(dir.console_log())
                        .await
                        .map(|m| m.len())
                        .unwrap_or(0);
                    if len < pos {
                        let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(n) => {
                    let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                    return Some((Ok::<_, std::io::Error>(chunk), (file, dir)));
                }
                Err(e) => return Some((Err(e), (file, dir))),
            }
        }
    });
    ([(CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response()
}

async fn console(State(state): State<HttpState>, Path(id): Path<String>, ws: WebSocketUpgrade) -> Response {
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    let sock = match tokio::net::UnixStream::connect(dir.console()).await {
        Ok(s) => s,
        Err(e) => return error(StatusCode::CONFLICT, format!("Console not available: {e}")),
    };
    ws.on_upgrade(move |socket| bridge(socket, sock))
}

async fn bridge(socket: WebSocket, sock: tokio::net::UnixStream) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut rd, mut wr) = sock.into_split();
    let to_vm = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    let from_vm = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::select! {
        _ = to_vm => {}
        _ = from_vm => {}
    }
}

/// An error in the server's JSON error body (`{"error": {code, message}}`),
/// so the server and peer agents read agent errors like API errors.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => "invalid",
        StatusCode::BAD_GATEWAY => "upstream",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        _ => "internal",
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
            field: None,
        },
    };
    (status, Json(body)).into_response()
}

fn migration_error(e: &crate::migration::MigrationError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, chain(e).to_string())
}

/// Ids are UUIDs; refuse anything that could leave the VMs directory.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Target side of a migration: make ready to receive the VM.
async fn prepare(
    State(state): State<HttpState>,
    Path(migration): Path<String>,
    Json(req): Json<PrepareRequest>,
) -> Response {
    if !valid_id(&req.vm.metadata.id) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid VM id");
    }
    tracing::info!(migration = %migration, vm = %req.vm.metadata.name, "preparing to receive VM");
    let (trace, vm) = (req.trace_parent.clone(), req.vm.metadata.name.clone());
    let started = std::time::SystemTime::now();
    let prepared = state.migrations.prepare(req).await;
    if let Some(parent) = trace {
        let mut span = novacron_trace::Finished::new("migration.target.prepare", started, std::time::SystemTime::now())
            .attribute("migration", migration.clone())
            .attribute("vm", vm)
            .attribute("node", state.node.name.clone());
        for s in prepared.as_ref().map(|p| p.steps.as_slice()).unwrap_or_default() {
            let at = |ms: u64| started + std::time::Duration::from_millis(ms);
            span.children.push(novacron_trace::Finished::new(
                s.step.as_str(),
                at(s.start_ms),
                at(s.start_ms + s.duration_ms.unwrap_or_default()),
            ));
        }
        novacron_trace::record(&parent, &span);
    }
    match prepared {
        Ok(p) => Json(p).into_response(),
        Err(e) => migration_error(&e),
    }
}

/// Target side: the source has stopped; run the VM here.
async fn finish(State(state): State<HttpState>, Path(migration): Path<String>, Json(req): Json<VmRef>) -> Response {
    if !valid_id(&req.vm_id) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid VM id");
    }
    let started = std::time::SystemTime::now();
    let finished = state.migrations.finish(&migration, &req).await;
    if let Some(parent) = &req.trace_parent {
        let span = novacron_trace::Finished::new("migration.target.finish", started, std::time::SystemTime::now())
            .attribute("migration", migration.clone())
            .attribute("node", state.node.name.clone())
            .attribute("outcome", if finished.is_ok() { "running here" } else { "failed" });
        novacron_trace::record(parent, &span);
    }
    if let Some(d) = state.migrations.dwcp() {
        d.receiver.forget(&migration);
    }
    match finished {
        Ok(f) => {
            tracing::info!(migration = %migration, pid = f.pid, "VM runs here now");
            Json(f).into_response()
        }
        Err(e) => migration_error(&e),
    }
}

/// Target side: the migration failed; remove everything it made here.
async fn abort(State(state): State<HttpState>, Path(migration): Path<String>, Json(req): Json<VmRef>) -> Response {
    if !valid_id(&req.vm_id) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid VM id");
    }
    if let Some(d) = state.migrations.dwcp() {
        d.receiver.forget(&migration);
    }
    state.migrations.discard(&req.vm_id).await;
    tracing::info!(migration = %migration, "discarded incoming VM");
    Json(serde_json::json!({})).into_response()
}

/// Target side of a cold migration: pull the disks from the source.
async fn receive_cold(
    State(state): State<HttpState>,
    Path(migration): Path<String>,
    Json(req): Json<ColdRequest>,
) -> Response {
    if !valid_id(&req.vm.metadata.id) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid VM id");
    }
    tracing::info!(migration = %migration, vm = %req.vm.metadata.name, "receiving a stopped VM's disks");
    match state.migrations.receive_cold(req).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => migration_error(&e),
    }
}

/// A stopped VM's disk file, for a peer receiving it in a cold migration.
async fn disk_file(State(state): State<HttpState>, Path((id, disk)): Path<(String, String)>) -> Response {
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    // Snapshot layers never change: a live migration's target fetches them
    // while the VM runs. A running QEMU changes the disks themselves under
    // us: those are copied only from stopped VMs.
    let path = match crate::snapshots::layer_file(&dir, &disk) {
        Some(layer) => layer,
        None => {
            let Some(path) = dir.disk_file(&disk) else {
                return error(StatusCode::NOT_FOUND, format!("No disk {disk:?}"));
            };
            if dir.running_pid().is_some() {
                return error(
                    StatusCode::CONFLICT,
                    "The VM is running: only a stopped VM's disks are copied",
                );
            }
            path
        }
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => stream(f),
        Err(e) => error(StatusCode::NOT_FOUND, format!("Cannot open {disk}: {e}")),
    }
}

/// An open file as a response body, read as the client takes it.
fn stream(file: tokio::fs::File) -> Response {
    Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)).into_response()
}

/// The disk of a detached volume in this node's pool, for the agent of the
/// VM it is being attached to.
async fn pooled_volume(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    if !novacron_api::volume::valid_id(&id) {
        return error(StatusCode::NOT_FOUND, format!("No volume {id:?}"));
    }
    match tokio::fs::File::open(crate::volumes::pool_file(&state.node, &id)).await {
        Ok(f) => stream(f),
        Err(e) => error(
            StatusCode::NOT_FOUND,
            format!("Volume {id:?} is not in this node's pool: {e}"),
        ),
    }
}

/// Deletes a detached volume's disk from this node's pool (the volume was
/// deleted, or its data now lives on another node). Deleting what is not
/// there succeeds: the caller wants it gone.
async fn delete_pooled_volume(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    if !novacron_api::volume::valid_id(&id) {
        return error(StatusCode::NOT_FOUND, format!("No volume {id:?}"));
    }
    match std::fs::remove_file(crate::volumes::pool_file(&state.node, &id)) {
        Ok(()) => {
            tracing::info!(volume_id = %id, "volume disk deleted from the pool");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Cannot delete volume {id:?}: {e}"),
        ),
    }
}

/// A stopped VM's root disk as one standalone qcow2 (its image and
/// overlay flattened): what a template is made of.
async fn root_image(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    if dir.running_pid().is_some() || state.node.claims.is_claimed(&id) {
        return error(
            StatusCode::CONFLICT,
            "The VM is running or migrating: templates are made of stopped VMs",
        );
    }
    let flat = dir.path.join("template.qcow2.partial");
    if let Err(e) = crate::qemu::flatten_disk(&dir.root_disk(), &flat).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, chain(&e).to_string());
    }
    let file = tokio::fs::File::open(&flat).await;
    // Unlinked at once: the open file streams on, and nothing is left
    // behind however the transfer ends.
    let _ = tokio::fs::remove_file(&flat).await;
    match file {
        Ok(f) => stream(f),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Cannot open the flattened disk: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{migration_error, secret_matches};
    use crate::migration::MigrationError;

    #[tokio::test]
    async fn errors_use_the_servers_json_body_and_status() {
        for (e, status, code) in [
            (
                MigrationError::Conflict("the VM is being migrated".into()),
                409,
                "conflict",
            ),
            (MigrationError::Invalid("unknown disk \"x\"".into()), 422, "invalid"),
            (MigrationError::Target("finish answered 500".into()), 502, "upstream"),
            (MigrationError::QemuFailed("failed".into()), 500, "internal"),
        ] {
            let resp = migration_error(&e);
            assert_eq!(resp.status().as_u16(), status, "{e}");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap_or_default();
            let body: novacron_api::ErrorBody = match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(err) => panic!("not an error body ({err}): {}", String::from_utf8_lossy(&body)),
            };
            assert_eq!(body.error.code, code);
            assert_eq!(body.error.message, e.to_string());
        }
    }

    #[test]
    fn only_the_agent_secret_gets_in() {
        let s = Some("0123456789abcdef");
        assert!(secret_matches(s, Some("0123456789abcdef")));
        assert!(!secret_matches(s, Some("0123456789abcdeF")));
        assert!(!secret_matches(s, Some("0123456789abcde")));
        assert!(!secret_matches(s, Some("")));
        assert!(!secret_matches(s, None));
        // Before registration nothing matches, not even an empty header.
        assert!(!secret_matches(None, Some("")));
        assert!(!secret_matches(None, None));
    }
}
