//! Live restore: the VM starts at once on its backup. Each disk is a new
//! qcow2 whose backing file is an NBD export this agent serves from the
//! backup ([`ChunkedDisk`]: a chunk is fetched from the store, checked
//! against its digest and kept in a sparse file the first time the guest,
//! the fill or the stream asks for it). While the guest runs, all chunks
//! are fetched in the background, and a `block-stream` job copies the
//! backing's blocks into the qcow2; when it is done, QEMU drops the
//! backing (from the image header too) and the files of the restore go.
//!
//! The state in the VM's directory (`live-restore.json`, the disks'
//! indexes) lets a restarted agent serve the exports again: QEMU's NBD
//! client waits for it (`reconnect-delay`), and the stream job goes on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use novacron_api::backup::{LiveRestoreStatus, RestoreSource};
use novacron_backup::Codec;
use novacron_qmp::commands::{BlockStream, JobDismiss, QueryBlockJobs};
use novacron_qmp::types::JobStatus;
use novacron_qmp::Qmp;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::chunked::{serve_export, ChunkedDisk, Keep};
use super::restore::{fetch_index, open_backup, parse_index, vm_disks, CHUNKS_IN_FLIGHT, RESTORED};
use super::BackupError;
use crate::node::NodeContext;
use crate::qemu::{self, VmDir};

const STATE: &str = "live-restore.json";
/// How long QEMU waits for a restarted agent's export before failing reads.
const RECONNECT_DELAY_S: u32 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    source: RestoreSource,
    /// The backup key the backup is sealed with, if it is.
    key_id: Option<String>,
    disks: Vec<LiveDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LiveDisk {
    name: String,
    size: u64,
    /// Streamed into the VM's own file.
    done: bool,
}

fn index_file(dir: &VmDir, disk: &str) -> PathBuf {
    dir.path.join(format!("live-{disk}.index"))
}

fn raw_file(dir: &VmDir, disk: &str) -> PathBuf {
    dir.path.join(format!("live-{disk}.raw"))
}

fn socket(dir: &VmDir, disk: &str) -> PathBuf {
    dir.path.join(format!("live-{disk}.sock"))
}

fn job_id(disk: &str) -> String {
    format!("restore-{disk}")
}

fn sink(what: &str, e: impl std::fmt::Display) -> BackupError {
    BackupError::Restore(format!("{what}: {e}"))
}

/// Whether the VM in `dir` is being restored live.
pub fn active(dir: &VmDir) -> bool {
    dir.path.join(STATE).exists()
}

fn load(dir: &VmDir) -> Result<State, BackupError> {
    let bytes = std::fs::read(dir.path.join(STATE)).map_err(|e| sink("cannot read the live restore's state", e))?;
    serde_json::from_slice(&bytes).map_err(|e| sink("the live restore's state is unreadable", e))
}

fn save(dir: &VmDir, state: &State) -> Result<(), BackupError> {
    let path = dir.path.join(STATE);
    let tmp = path.with_extension("json.partial");
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| sink("cannot write the live restore's state", e))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| sink("cannot write the live restore's state", e))
}

/// The exports this agent serves, by VM id.
#[derive(Clone, Default)]
pub struct LiveRestores(Arc<Mutex<HashMap<String, Arc<Serving>>>>);

struct Serving {
    disks: Vec<Arc<ChunkedDisk>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Why the restore stopped; not retried until the agent restarts.
    failed: Mutex<Option<String>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl LiveRestores {
    /// Stops serving the VM's exports (it is gone from this node, or done).
    pub fn forget(&self, vm_id: &str) {
        self.0.lock().remove(vm_id);
    }

    fn get(&self, vm_id: &str) -> Option<Arc<Serving>> {
        self.0.lock().get(vm_id).cloned()
    }
}

/// Makes the VM's disks in `dir` overlays on exports of backup `src`, and
/// serves them. Any state of an earlier attempt goes first; a failure
/// leaves no disk behind.
pub async fn begin(node: &NodeContext, vm_id: &str, dir: &VmDir, src: &RestoreSource) -> Result<(), BackupError> {
    abandon(node, vm_id, dir);
    let result = begin_fresh(node, vm_id, dir, src).await;
    if result.is_err() {
        abandon(node, vm_id, dir);
        for file in qemu::DISK_NODES.iter().filter_map(|d| dir.disk_file(d)) {
            let _ = std::fs::remove_file(file);
        }
    }
    result
}

async fn begin_fresh(node: &NodeContext, vm_id: &str, dir: &VmDir, src: &RestoreSource) -> Result<(), BackupError> {
    let (backup, codec) = open_backup(&node.client, src, node.backup_key.as_ref()).await?;
    let mut disks = Vec::new();
    let mut targets = Vec::new();
    for (disk, target) in vm_disks(&backup, dir) {
        let (bytes, index) = fetch_index(&node.client, src, disk).await?;
        std::fs::write(index_file(dir, disk), bytes).map_err(|e| sink("cannot keep the disk's index", e))?;
        disks.push(LiveDisk {
            name: disk.to_string(),
            size: index.size,
            done: false,
        });
        targets.push((disk, target, index.size));
    }
    let state = State {
        source: src.clone(),
        key_id: backup.key_id.clone(),
        disks,
    };
    save(dir, &state)?;
    serve(node, vm_id, dir, &state, codec)?;
    for (disk, target, size) in targets {
        let partial = target.with_extension("live.qcow2");
        overlay(&partial, &socket(dir, disk), disk, size).await?;
        std::fs::rename(&partial, &target).map_err(|e| sink("cannot put the disk in place", e))?;
    }
    // The disks have no change tracking: the next backup is full.
    super::chain::save(&dir.path, &Default::default()).map_err(|e| BackupError::Chain(e.to_string()))?;
    tracing::info!(vm = vm_id, backup = %src, "live restore begun");
    Ok(())
}

/// A qcow2 of `size` bytes at `path` whose backing is export `disk` at `sock`.
async fn overlay(path: &std::path::Path, sock: &std::path::Path, disk: &str, size: u64) -> Result<(), BackupError> {
    let backing = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": sock},
            "export": disk,
            "reconnect-delay": RECONNECT_DELAY_S,
        },
    });
    qemu::create_overlay_unchecked(path, &format!("json:{backing}"), "raw", size)
        .await
        .map_err(|e| sink("cannot make the disk's overlay", e))
}

/// Serves the exports of the disks not streamed yet, and fetches their
/// chunks in the background.
fn serve(node: &NodeContext, vm_id: &str, dir: &VmDir, state: &State, codec: Codec) -> Result<(), BackupError> {
    let mut disks = Vec::new();
    let mut tasks = Vec::new();
    for d in state.disks.iter().filter(|d| !d.done) {
        let bytes = std::fs::read(index_file(dir, &d.name)).map_err(|e| sink("cannot read the disk's index", e))?;
        let index = parse_index(&bytes, &d.name, &state.source)?;
        let chunks = Arc::new(ChunkedDisk::create(
            node.client.clone(),
            &state.source.store,
            codec.clone(),
            index,
            &Keep::File(raw_file(dir, &d.name)),
        )?);
        tasks.push(serve_export(&socket(dir, &d.name), &d.name, chunks.clone())?);
        disks.push(chunks);
    }
    let (fill, vm) = (disks.clone(), vm_id.to_string());
    tasks.push(tokio::spawn(async move {
        for d in fill {
            if let Err(e) = d.fill(CHUNKS_IN_FLIGHT, &|_| {}).await {
                tracing::warn!(vm = %vm, error = %e, "live restore cannot fetch a chunk");
            }
        }
    }));
    let serving = Serving {
        disks,
        tasks,
        failed: Mutex::new(None),
    };
    node.live_restores.0.lock().insert(vm_id.to_string(), Arc::new(serving));
    Ok(())
}

/// Serves the VM's exports unless they are served (a restarted agent).
pub fn ensure_serving(node: &NodeContext, vm_id: &str, dir: &VmDir) -> Result<(), BackupError> {
    if !active(dir) || node.live_restores.get(vm_id).is_some() {
        return Ok(());
    }
    let state = load(dir)?;
    let codec = Codec::for_key(state.key_id.as_deref(), node.backup_key.as_ref()).ok_or_else(|| {
        BackupError::Restore(format!(
            "backup {} is sealed with backup key {}, which this node no longer has",
            state.source,
            state.key_id.as_deref().unwrap_or_default()
        ))
    })?;
    serve(node, vm_id, dir, &state, codec)
}

/// Stops the restore and removes its files (not the disks).
fn abandon(node: &NodeContext, vm_id: &str, dir: &VmDir) {
    node.live_restores.forget(vm_id);
    if let Ok(state) = load(dir) {
        for d in &state.disks {
            for f in [index_file(dir, &d.name), raw_file(dir, &d.name), socket(dir, &d.name)] {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let _ = std::fs::remove_file(dir.path.join(STATE));
}

/// One step of a running VM's live restore: starts the stream jobs not
/// running, notes those done (or failed), and once all are done removes
/// the restore's files. Returns how far it has come (none: done, or no
/// live restore).
pub async fn step(node: &NodeContext, vm_id: &str, dir: &VmDir, qmp: &Qmp) -> Option<LiveRestoreStatus> {
    if !active(dir) {
        return None;
    }
    let mut state = match load(dir) {
        Ok(s) => s,
        Err(e) => {
            return Some(LiveRestoreStatus {
                done: 0,
                size: 0,
                error: Some(e.to_string()),
            })
        }
    };
    let mut status = state.status();
    if let Err(e) = ensure_serving(node, vm_id, dir) {
        status.error = Some(e.to_string());
        return Some(status);
    }
    let Some(serving) = node.live_restores.get(vm_id) else {
        return Some(status);
    };
    let jobs = match qmp.run(&QueryBlockJobs).await {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(vm = vm_id, error = %e, "cannot list the live restore's stream jobs");
            return Some(status);
        }
    };
    let mut changed = false;
    for d in state.disks.iter_mut().filter(|d| !d.done) {
        let id = job_id(&d.name);
        match jobs.iter().find(|j| j.device == id) {
            Some(job) if job.status == JobStatus::Concluded => {
                if let Err(e) = qmp.run(&JobDismiss { id: id.clone() }).await {
                    tracing::warn!(vm = vm_id, job = %id, error = %e, "cannot dismiss the stream job");
                    continue;
                }
                match &job.error {
                    Some(error) => {
                        let chunk = serving.disks.iter().find_map(|c| c.failure());
                        let why = match chunk {
                            Some(c) => format!("streaming disk {} failed: {error} ({c})", d.name),
                            None => format!("streaming disk {} failed: {error}", d.name),
                        };
                        tracing::warn!(vm = vm_id, disk = %d.name, error = %why, "live restore failed");
                        *serving.failed.lock() = Some(why);
                    }
                    None => {
                        tracing::info!(vm = vm_id, disk = %d.name, "disk streamed in");
                        d.done = true;
                        status.done += d.size;
                        changed = true;
                    }
                }
            }
            Some(job) => status.done += job.offset.min(d.size),
            None if serving.failed.lock().is_none() => {
                let stream = BlockStream {
                    job_id: id.clone(),
                    device: d.name.clone(),
                    auto_dismiss: false,
                };
                if let Err(e) = qmp.run(&stream).await {
                    tracing::warn!(vm = vm_id, disk = %d.name, error = %e, "cannot start streaming the disk in");
                }
            }
            None => {}
        }
    }
    if changed {
        if let Err(e) = save(dir, &state) {
            status.error = Some(e.to_string());
            return Some(status);
        }
    }
    status.error = serving.failed.lock().clone();
    if state.disks.iter().all(|d| d.done) {
        abandon(node, vm_id, dir);
        if let Err(e) = std::fs::write(dir.path.join(RESTORED), format!("{}\n", state.source)) {
            tracing::warn!(vm = vm_id, error = %e, "cannot mark the restore done");
        }
        tracing::info!(vm = vm_id, backup = %state.source, "live restore done");
        return None;
    }
    Some(status)
}

/// How far the VM's live restore has come by its state (the stream jobs
/// aside); none if there is none.
pub fn describe(dir: &VmDir) -> Option<LiveRestoreStatus> {
    active(dir).then(|| load(dir).map(|s| s.status()).ok()).flatten()
}

impl State {
    fn status(&self) -> LiveRestoreStatus {
        LiveRestoreStatus {
            done: self.disks.iter().filter(|d| d.done).map(|d| d.size).sum(),
            size: self.disks.iter().map(|d| d.size).sum(),
            error: None,
        }
    }
}

/// The refusal of an operation that needs the VM's disks whole.
pub fn refuse(dir: &VmDir, what: &str) -> Result<(), String> {
    if !active(dir) {
        return Ok(());
    }
    let from = load(dir)
        .map(|s| s.source.to_string())
        .unwrap_or_else(|_| "a backup".into());
    Err(format!(
        "cannot {what}: the VM is still being restored live from {from}; try again once its restore is done"
    ))
}
