//! Garbage collection: chunks that no finished backup names are removed,
//! unless they may belong to a backup being written.
//!
//! Proxmox Backup Server marks every used chunk by touching its atime (a
//! syscall per chunk, which on remote storage is what makes a few TB take
//! hours) and then stats every chunk. Here the mark phase only reads the
//! indexes into a set in memory (32 bytes per chunk: 1 M chunks, 4 TiB of
//! unique data, is 32 MiB), and the sweep stats only the chunks that set
//! does not hold. A chunk a backup being written may need is safe in two
//! ways: the writer touches every chunk it names before its index is
//! written, and the sweep keeps every chunk changed after the oldest
//! running backup began (less a grace for clocks).

use std::fs;
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::chunk::Digest;
use crate::store::{Datastore, StoreError};

/// A backup being written that began this long ago is taken as abandoned:
/// it is removed and no longer protects recent chunks.
const ABANDONED_AFTER: Duration = Duration::from_secs(48 * 3600);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Chunks finished backups name.
    pub chunks_in_use: u64,
    /// Chunks no backup names yet, kept as they are recent.
    pub chunks_recent: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Abandoned backups (begun long ago, never finished) removed.
    pub abandoned_removed: u64,
    pub duration_ms: u64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// Collects garbage in `store`. `grace` covers clocks that disagree and
/// writes in flight.
pub fn collect_garbage(store: &Datastore, grace: Duration) -> Result<GcReport, StoreError> {
    let began = Instant::now();
    let mut report = GcReport::default();
    let mut cutoff = SystemTime::now() - grace;
    // Backups being written, before the marks: one that finishes in
    // between has its chunks touched after its start, so kept either way.
    for (path, started) in store.in_progress()? {
        let age = started.map(|t| (Utc::now() - t).to_std().unwrap_or_default());
        match (started, age) {
            (Some(t), Some(age)) if age < ABANDONED_AFTER => {
                cutoff = cutoff.min(SystemTime::from(t) - grace);
            }
            _ => {
                tracing::info!(path = %path.display(), "removing an abandoned backup");
                fs::remove_dir_all(&path).map_err(io(format!("remove {}", path.display())))?;
                report.abandoned_removed += 1;
            }
        }
    }
    let used = store.referenced()?;
    let chunks = store.chunks_dir();
    for dir in fs::read_dir(&chunks).map_err(io(format!("list {}", chunks.display())))? {
        let dir = dir.map_err(io(format!("list {}", chunks.display())))?.path();
        if !dir.is_dir() {
            continue;
        }
        for e in fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
            let e = e.map_err(io(format!("list {}", dir.display())))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if Digest::from_hex(&name).is_some_and(|d| used.contains(&d)) {
                report.chunks_in_use += 1;
                continue;
            }
            // Not named by any backup (or a write's leftover): its age decides.
            let meta = e.metadata().map_err(io(format!("stat {}", e.path().display())))?;
            let changed = meta.modified().map_err(io(format!("stat {}", e.path().display())))?;
            if changed >= cutoff {
                report.chunks_recent += 1;
                continue;
            }
            match fs::remove_file(e.path()) {
                Ok(()) => {
                    report.chunks_removed += 1;
                    report.bytes_removed += meta.len();
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io(format!("remove {}", e.path().display()))(err)),
            }
        }
    }
    report.duration_ms = began.elapsed().as_millis() as u64;
    tracing::info!(
        in_use = report.chunks_in_use,
        removed = report.chunks_removed,
        bytes_removed = report.bytes_removed,
        recent = report.chunks_recent,
        ms = report.duration_ms,
        "garbage collection done"
    );
    Ok(report)
}
