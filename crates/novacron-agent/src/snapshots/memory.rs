//! Snapshots with memory. The running VM pauses; its RAM and device state
//! go to a file by a migration to `file:`, and its disks are snapshotted at
//! the same instant; then it runs on. Reverting to such a snapshot marks
//! the VM to resume: its next start launches QEMU waiting for an incoming
//! migration and loads the file, so the guest goes on where it was.
//!
//! The state is a file beside the disks' layers rather than QEMU's internal
//! snapshots (`snapshot-save`, which writes into the qcow2 files): a live
//! migration's mirror copies what a disk reads, not the internal snapshots
//! in its qcow2, so only files of their own move with the VM as the layers
//! do.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_api::snapshot::{CreateSnapshot, Snapshot, SnapshotMemory};
use novacron_qmp::commands::{
    BlockdevSetActive, Migrate, MigrateCancel, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    QueryMigrate,
};
use novacron_qmp::types::{MigrationCapability as Cap, MigrationCapabilityStatus, MigrationStatus};
use novacron_qmp::{Qmp, QmpError};

use super::{io, overlays_in_qemu, record, room_for, SnapshotError};
use crate::qemu::VmDir;

/// Longest a save or a load may take (256 MiB take about a second).
const STATE_TIMEOUT: Duration = Duration::from_secs(600);
const POLL_EVERY: Duration = Duration::from_millis(50);

/// The file of snapshot `snapshot`'s saved state, relative to the VM's directory.
pub fn state_name(snapshot: &str) -> String {
    format!("snap-{snapshot}.vmstate")
}

/// Names the snapshot whose memory the VM's next start loads.
fn resume_marker(dir: &VmDir) -> PathBuf {
    dir.path.join("resume-from")
}

pub(super) fn resume_at_next_start(dir: &VmDir, snapshot: &str) -> Result<(), SnapshotError> {
    let marker = resume_marker(dir);
    let tmp = marker.with_extension("partial");
    std::fs::write(&tmp, snapshot).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &marker).map_err(io(format!("replace {}", marker.display())))
}

/// The next start boots the disks.
pub fn clear_resume(dir: &VmDir) {
    match std::fs::remove_file(resume_marker(dir)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(dir = %dir.path.display(), error = %e, "cannot clear the resume marker"),
    }
}

/// The snapshot whose memory the next start loads, and its state file.
pub fn pending_resume(dir: &VmDir) -> Option<(String, PathBuf)> {
    let name = std::fs::read_to_string(resume_marker(dir)).ok()?;
    novacron_api::validate::name("snapshot", &name).ok()?;
    let state = dir.path.join(state_name(&name));
    Some((name, state))
}

/// Takes snapshot `req` of a running VM with its memory. The guest is
/// paused from before the save to after the disks' snapshot, so both hold
/// the same instant; its filesystems are not frozen (a frozen guest would
/// resume frozen). A failure leaves no file and the VM running as before.
pub async fn take_with_memory(dir: &VmDir, qmp: &Qmp, req: &CreateSnapshot) -> Result<Snapshot, SnapshotError> {
    let (snapshots, disks) = room_for(dir, req)?;
    // A paused guest would stay "postmigrate" after the save, which a
    // resume does not leave: only running guests are saved.
    if !qmp.query_status().await?.running {
        return Err(SnapshotError::NotRunning);
    }
    qmp.stop().await?;
    let paused_at = Instant::now();
    let state = dir.path.join(state_name(&req.name));
    let saved = async {
        let size = save_state(qmp, &state).await?;
        // The completed migration left the disks' nodes to a target: take them back.
        qmp.run(&BlockdevSetActive {
            node_name: None,
            active: true,
        })
        .await?;
        overlays_in_qemu(dir, qmp, &req.name, &disks).await?;
        Ok::<_, SnapshotError>(size)
    }
    .await;
    let recorded = match saved {
        Ok(size_bytes) => {
            let memory = SnapshotMemory {
                size_bytes,
                paused_ms: paused_at.elapsed().as_millis() as u64,
            };
            record(dir, snapshots, req, &disks, Some(super::Quiesced(false)), Some(memory))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&state);
            let _ = qmp
                .run(&BlockdevSetActive {
                    node_name: None,
                    active: true,
                })
                .await;
            Err(e)
        }
    };
    // The guest runs on whatever happened (`cont` also takes back the
    // nodes of a save that failed after it completed).
    if let Err(e) = qmp.cont().await {
        tracing::error!(error = %e, "the VM did not run on after its memory snapshot");
        return Err(e.into());
    }
    recorded
}

/// Saves the paused VM's RAM and device state to `path` (a migration to a
/// file, written aside and renamed when complete); returns its size.
async fn save_state(qmp: &Qmp, path: &Path) -> Result<u64, SnapshotError> {
    let partial = path.with_extension("vmstate.partial");
    let _ = std::fs::remove_file(&partial);
    let uri = file_uri(&partial)
        .ok_or_else(|| SnapshotError::SaveMemory(format!("QEMU cannot take the path {}", partial.display())))?;
    // Every capability a live migration may have left on, off: a plain stream.
    let capabilities = [
        Cap::AutoConverge,
        Cap::PostcopyRam,
        Cap::Multifd,
        Cap::Xbzrle,
        Cap::MappedRam,
        Cap::DirtyBitmaps,
    ]
    .into_iter()
    .map(|c| MigrationCapabilityStatus::new(c, false))
    .collect();
    qmp.run(&MigrateSetCapabilities { capabilities }).await?;
    qmp.run(&MigrateSetParameters {
        max_bandwidth: Some(u64::MAX / 2),
        ..Default::default()
    })
    .await?;
    qmp.run(&Migrate { uri }).await?;
    let result = wait_for_migration(qmp).await;
    if result.is_err() {
        let _ = qmp.run(&MigrateCancel).await;
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(SnapshotError::SaveMemory)?;
    let size = std::fs::metadata(&partial)
        .map_err(io(format!("stat {}", partial.display())))?
        .len();
    std::fs::rename(&partial, path).map_err(io(format!("rename {}", partial.display())))?;
    Ok(size)
}

/// `file:PATH`, if QEMU can parse it (a comma would start an option).
fn file_uri(path: &Path) -> Option<String> {
    path.to_str().filter(|p| !p.contains(',')).map(|p| format!("file:{p}"))
}

/// Polls the migration QEMU runs (either way) until it completes; a
/// failure's reason as QEMU gives it.
async fn wait_for_migration(qmp: &Qmp) -> Result<(), String> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let info = qmp.run(&QueryMigrate).await.map_err(|e| e.to_string())?;
        match info.status {
            Some(MigrationStatus::Completed) => return Ok(()),
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(info.error_desc.unwrap_or_else(|| "QEMU gave no reason".into()))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("not done after {} s", STATE_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("QEMU refused")]
    Qmp(#[from] QmpError),
    #[error("QEMU cannot load the saved state: {0}")]
    Load(String),
}

/// Loads a snapshot's saved state into a QEMU started with `-incoming
/// defer` (and so paused); it stays paused until told to run.
pub async fn resume(qmp: &Qmp, state: &Path) -> Result<(), ResumeError> {
    let uri =
        file_uri(state).ok_or_else(|| ResumeError::Load(format!("QEMU cannot take the path {}", state.display())))?;
    if !state.exists() {
        return Err(ResumeError::Load(format!("{} is missing", state.display())));
    }
    qmp.run(&MigrateIncoming {
        uri,
        exit_on_error: Some(false),
    })
    .await?;
    wait_for_migration(qmp).await.map_err(ResumeError::Load)
}
