//! Snapshot endpoints: list, take (stopped or running VMs), revert and
//! delete (stopped VMs).

use std::future::Future;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use novacron_api::error::chain;

use super::{error, vm_dir, HttpState};
use crate::qemu::VmDir;
use crate::snapshots::{Quiesced, SnapshotError};

fn snapshot_error(e: &SnapshotError) -> Response {
    use SnapshotError as E;
    let status = match e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Exists(_) | E::Running | E::Busy | E::NoDisks | E::NotRunning => StatusCode::CONFLICT,
        E::TooMany => StatusCode::UNPROCESSABLE_ENTITY,
        E::Qemu(_) | E::Qmp(_) | E::Io { .. } | E::Record { .. } | E::Fetch { .. } | E::SaveMemory(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, chain(e).to_string())
}

pub(super) async fn list(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(dir) = vm_dir(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    match crate::snapshots::list(&dir) {
        Ok(s) => Json(s).into_response(),
        Err(e) => snapshot_error(&e),
    }
}

/// Runs a snapshot operation under the VM's claim, which keeps the
/// reconciler (a start) and migrations (the other user of the second QMP
/// socket) away meanwhile. It runs in a task of its own: a client that hangs
/// up cannot cut it short and leave the guest's filesystems frozen or a
/// snapshot half made.
async fn under_claim<T, F, Fut>(state: &HttpState, id: &str, dir: VmDir, op: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(VmDir) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, SnapshotError>> + Send + 'static,
{
    if let Err(why) = crate::backup::live::refuse(&dir, "snapshot the VM") {
        return error(StatusCode::CONFLICT, why);
    }
    let Some(claim) = state.node.claims.claim(id) else {
        return snapshot_error(&SnapshotError::Busy);
    };
    let task = tokio::spawn(async move {
        let _claim = claim;
        op(dir).await
    });
    match task.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => snapshot_error(&e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("The snapshot operation failed: {e}"),
        ),
    }
}

/// Snapshots every disk of the VM at one instant: of a stopped VM by
/// renaming files, of a running one through QEMU (with the guest's
/// filesystems frozen when its agent answers).
pub(super) async fn take(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Json(req): Json<novacron_api::CreateSnapshot>,
) -> Response {
    if let Err(e) = req.validate() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{}: {}", e.field, e.message));
    }
    // A VM that never started has no disks yet.
    let Some(dir) = vm_dir(&state, &id) else {
        return snapshot_error(&SnapshotError::NoDisks);
    };
    let node = state.node.clone();
    under_claim(&state, &id.clone(), dir, move |dir| async move {
        if dir.running_pid().is_none() {
            if req.memory {
                return Err(SnapshotError::NotRunning);
            }
            let taken = crate::snapshots::take(&dir, &req).await?;
            tracing::info!(vm = %id, snapshot = %taken.name, "snapshot taken");
            return Ok(taken);
        }
        let qmp = novacron_qmp::Qmp::connect(&dir.qmp_migrate(), Duration::from_secs(10)).await?;
        if req.memory {
            let taken = crate::snapshots::take_with_memory(&dir, &qmp, &req).await?;
            tracing::info!(vm = %id, snapshot = %taken.name, memory = ?taken.memory, "snapshot of the running VM with its memory taken");
            return Ok(taken);
        }
        let taken = node
            .guests
            .while_frozen(&id, &dir, |frozen| {
                crate::snapshots::take_running(&dir, &qmp, &req, Quiesced(frozen))
            })
            .await?;
        tracing::info!(vm = %id, snapshot = %taken.name, quiesced = taken.quiesced, "snapshot of the running VM taken");
        Ok(taken)
    })
    .await
}

/// Runs `op` on a stopped VM's directory under its claim.
async fn on_stopped_vm<T, F, Fut>(state: &HttpState, id: &str, op: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(VmDir) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, SnapshotError>> + Send + 'static,
{
    let Some(dir) = vm_dir(state, id) else {
        return error(StatusCode::NOT_FOUND, format!("No VM {id:?} on this node"));
    };
    under_claim(state, id, dir, |dir| async move {
        if dir.running_pid().is_some() {
            return Err(SnapshotError::Running);
        }
        op(dir).await
    })
    .await
}

pub(super) async fn revert(State(state): State<HttpState>, Path((id, name)): Path<(String, String)>) -> Response {
    on_stopped_vm(&state, &id.clone(), |dir| async move {
        let reverted = crate::snapshots::revert(&dir, &name).await?;
        tracing::info!(vm = %id, snapshot = %name, "reverted to snapshot");
        Ok(reverted)
    })
    .await
}

pub(super) async fn delete(State(state): State<HttpState>, Path((id, name)): Path<(String, String)>) -> Response {
    on_stopped_vm(&state, &id.clone(), |dir| async move {
        crate::snapshots::delete(&dir, &name).await?;
        tracing::info!(vm = %id, snapshot = %name, "snapshot deleted");
        Ok(serde_json::json!({}))
    })
    .await
}
