//! Backups of VMs (running: through their QEMU; stopped: from their disk
//! files) to a store the server serves. The answer streams
//! the backup's progress as newline-delimited `BackupEvent`s; the backup
//! runs in a task of its own under the VM's claim (no start, stop or
//! migration meanwhile), so a caller that hangs up does not cut it short.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use novacron_api::agent::BackupRequest;
use novacron_api::error::chain;
use novacron_api::BackupEvent;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{error, vm_dir, HttpState};
use crate::backup::export::DiskNode;
use crate::backup::running::back_up_running;
use crate::backup::stopped::back_up_stopped;
use crate::backup::target::RemoteTarget;
use crate::qemu::{self, VmDir};

/// Events a slow reader may fall behind by before progress is dropped.
const EVENTS_QUEUED: usize = 64;

pub(super) async fn take(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Json(req): Json<BackupRequest>,
) -> Response {
    if novacron_api::validate::name("store", &req.store).is_err()
        || novacron_api::validate::name("vm", &req.vm).is_err()
    {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid store or VM name");
    }
    let Some(dir) = vm_dir(&state, &id) else {
        return error(
            StatusCode::CONFLICT,
            format!(
                "VM {:?} has no disks on node {}: it has never run there",
                req.vm, state.node.name
            ),
        );
    };
    if let Err(why) = crate::backup::live::refuse(&dir, "back the VM up") {
        return error(StatusCode::CONFLICT, why);
    }
    let Some(claim) = state.node.claims.claim(&id) else {
        return error(
            StatusCode::CONFLICT,
            format!(
                "VM {:?} is busy (a backup, snapshot or migration of it is running)",
                req.vm
            ),
        );
    };
    let codec = match novacron_backup::Codec::for_key(req.key_id.as_deref(), state.node.backup_key.as_ref()) {
        Some(codec) => codec,
        None => {
            let want = req.key_id.as_deref().unwrap_or_default();
            return error(
                StatusCode::CONFLICT,
                format!(
                    "store {:?} keeps backups sealed with backup key {want}, which node {} does not have (novacron agent --backup-key FILE)",
                    req.store, state.node.name
                ),
            );
        }
    };
    let target = RemoteTarget {
        name: req.store.clone(),
        client: state.node.client.clone(),
        codec,
    };
    let (tx, rx) = mpsc::channel::<BackupEvent>(EVENTS_QUEUED);
    let span = tracing::info_span!("backup", vm = %req.vm, store = %req.store);
    let task = async move {
        let _claim = claim;
        let result = run(&dir, &id, &req.vm, &target, &tx).await;
        let last = match result {
            Ok(backup) => {
                tracing::info!(vm = %req.vm, backup = %backup.id, full_reason = ?backup.full_reason, "backup stored");
                BackupEvent::Done(backup)
            }
            Err(message) => {
                tracing::warn!(vm = %req.vm, error = %message, "backup failed");
                BackupEvent::Failed { message }
            }
        };
        // The caller may be gone; the outcome is in the log and the store.
        let _ = tx.send(last).await;
    };
    tokio::spawn(task.instrument(span));
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    ([(CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}

/// The volumes of the VM in `dir` that its QEMU has open, by disk name
/// (`vol-ID`), with their nodes (never under a snapshot's overlay: a
/// snapshot is of the VM's own disks).
async fn plugged_volumes(
    qmp: &novacron_qmp::Qmp,
    dir: &VmDir,
) -> Result<std::collections::BTreeMap<String, String>, novacron_qmp::QmpError> {
    let nodes = qmp
        .run(&novacron_qmp::commands::QueryNamedBlockNodes { flat: true })
        .await?;
    Ok(dir
        .volume_ids()
        .into_iter()
        .filter_map(|id| {
            let file = dir.volume(&id).display().to_string();
            let node = nodes
                .iter()
                .find(|n| n.drv == "qcow2" && n.file == file)?
                .node_name
                .clone()?;
            Some((format!("vol-{id}"), node))
        })
        .collect())
}

async fn run(
    dir: &VmDir,
    id: &str,
    vm: &str,
    target: &RemoteTarget,
    events: &mpsc::Sender<BackupEvent>,
) -> Result<novacron_api::Backup, String> {
    // Progress goes out at most every 64 MiB per disk; a reader that
    // lags loses progress lines, never the outcome.
    let mut reported = (String::new(), 0u64);
    let progress = |disk: &str, done: u64, size: u64| {
        if reported.0 != disk || done >= reported.1 + 64 * 1024 * 1024 || done == size {
            reported = (disk.to_string(), done);
            let _ = events.try_send(BackupEvent::Progress {
                disk: disk.into(),
                done,
                size,
            });
        }
    };
    if dir.running_pid().is_none() {
        // Root, data and the attached volumes.
        let disks = dir.disk_files();
        if disks.is_empty() {
            return Err(format!("VM {vm:?} has no disks yet"));
        }
        return back_up_stopped(&dir.path, vm, id, &disks, target, progress)
            .await
            .map_err(|e| chain(&e).to_string());
    }
    let qmp = novacron_qmp::Qmp::connect(&dir.qmp_migrate(), Duration::from_secs(10))
        .await
        .map_err(|e| format!("Cannot reach the VM's QEMU: {}", chain(&e)))?;
    let mut tops = crate::snapshots::top_nodes(&qmp)
        .await
        .map_err(|e| format!("Cannot list the VM's disks: {}", chain(&e)))?;
    tops.extend(
        plugged_volumes(&qmp, dir)
            .await
            .map_err(|e| format!("Cannot list the VM's volumes: {}", chain(&e)))?,
    );
    let mut disks = Vec::new();
    // Root first, as everywhere else; then the volumes plugged into QEMU
    // (one being attached or detached is not, and is left out).
    for (disk, file) in dir.disk_files() {
        let Some(top) = tops.get(&disk).cloned() else {
            continue;
        };
        let size = qemu::virtual_size(&file)
            .await
            .map_err(|e| format!("Cannot read disk {disk}: {}", chain(&e)))?;
        disks.push(DiskNode { disk, top, size });
    }
    back_up_running(&qmp, &dir.path, vm, id, &disks, target, progress)
        .await
        .map_err(|e| chain(&e).to_string())
}
