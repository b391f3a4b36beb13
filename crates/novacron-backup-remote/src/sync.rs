//! Copies the backups one store has and another lacks: the chunks the
//! destination does not have (many in flight at once, so a long round trip
//! does not throttle the copy: each transfer is its own request on its own
//! connection), then each backup's indexes and manifest, oldest first. A
//! chunk arrives as stored at the source and is checked against its digest
//! at the destination. A sync cut short leaves chunks that the next sync
//! does not copy again (and garbage collection takes back if none does);
//! a backup is listed at the destination only once all of it is there.

use std::collections::HashSet;
use std::time::Instant;

use futures::StreamExt;
use novacron_api::backup::{SyncProgress, SyncResult};
use novacron_backup::{BackupInfo, Digest, DiskStats, Manifest};

use crate::handle::{ErrorKind, HandleError, StoreHandle};

/// Chunk transfers in flight unless told otherwise.
pub const DEFAULT_IN_FLIGHT: usize = 32;
/// Most chunk transfers in flight (each holds a 4 MiB chunk in memory).
pub const MAX_IN_FLIGHT: usize = 256;
/// Tries of a chunk transfer that fails as the link does (unreachable,
/// unavailable), the nth after `RETRY_AFTER` times n.
const ATTEMPTS: u32 = 4;
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("Cannot {what}")]
pub struct SyncError {
    pub what: String,
    #[source]
    pub source: HandleError,
}

fn step(what: impl Into<String>) -> impl FnOnce(HandleError) -> SyncError {
    let what = what.into();
    move |source| SyncError { what, source }
}

/// Copies what `src` has and `dst` lacks (of VM `vm`'s backups, or all),
/// with `in_flight` chunk transfers at once; `progress` hears after each.
pub async fn sync(
    src: &StoreHandle,
    dst: &StoreHandle,
    vm: Option<&str>,
    in_flight: usize,
    mut progress: impl FnMut(&SyncProgress),
) -> Result<SyncResult, SyncError> {
    let began = Instant::now();
    let have = src.list(vm).await.map_err(step("list the source's backups"))?;
    let have = have.into_iter().map(|v| v.manifest);
    let there: HashSet<_> = dst
        .list(vm)
        .await
        .map_err(step("list the destination's backups"))?
        .into_iter()
        .map(|v| v.manifest.id)
        .collect();
    let missing: Vec<Manifest> = have.filter(|m| !there.contains(&m.id)).collect();
    let mut backups = Vec::new();
    let mut wanted = Vec::new();
    let mut seen = HashSet::new();
    for m in missing {
        let mut disks = Vec::new();
        for d in &m.disks {
            let index = src
                .index(&m.id, &d.name)
                .await
                .map_err(step(format!("read the index of disk {} of {}", d.name, m.id)))?;
            wanted.extend(index.digests.iter().filter(|x| seen.insert(**x)).copied());
            let stats = DiskStats {
                bytes_read: d.bytes_read,
                bytes_from_previous: d.bytes_from_previous,
                chunks_new: d.chunks_new,
                stored_bytes: d.stored_bytes,
            };
            disks.push((d.name.clone(), index, stats));
        }
        backups.push((m, disks));
    }
    let known = dst
        .known(wanted.clone())
        .await
        .map_err(step("ask the destination which chunks it has"))?;
    let needed: Vec<Digest> = wanted.iter().zip(known).filter(|(_, k)| !k).map(|(d, _)| *d).collect();
    let mut p = SyncProgress {
        chunks_done: 0,
        chunks_total: needed.len() as u64,
        bytes_done: 0,
    };
    progress(&p);
    let mut transfers = futures::stream::iter(needed.into_iter().map(|d| {
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            let file = src.chunk_file(d).await.map_err(step(format!("read chunk {d}")))?;
            let len = file.len() as u64;
            let mut attempt = 1;
            loop {
                match dst.insert_encoded(d, file.clone()).await {
                    Ok(_) => break,
                    // A congested long link drops a connection's SYNs or
                    // resets it now and then: that costs a retry, not the sync.
                    Err(e) if attempt < ATTEMPTS && e.kind() == ErrorKind::Unavailable => {
                        tracing::debug!(chunk = %d, attempt, error = %e, "chunk transfer failed; again");
                        tokio::time::sleep(RETRY_AFTER * attempt).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(step(format!("write chunk {d}"))(e)),
                }
            }
            Ok::<u64, SyncError>(len)
        }
    }))
    .buffer_unordered(in_flight.clamp(1, MAX_IN_FLIGHT));
    while let Some(sent) = transfers.next().await {
        p.bytes_done += sent?;
        p.chunks_done += 1;
        progress(&p);
    }
    drop(transfers);
    let mut copied = Vec::new();
    for (m, disks) in backups {
        let info = BackupInfo {
            vm_id: m.vm_id.clone(),
            project: m.project.clone(),
            full_reason: m.full_reason.clone(),
            duration_ms: m.duration_ms,
            config: m.config.clone(),
            key_id: m.key_id.clone(),
        };
        dst.write_backup(&m.id, disks, info)
            .await
            .map_err(step(format!("write backup {} to the destination", m.id)))?;
        copied.push(m.id.to_string());
    }
    let elapsed = began.elapsed();
    Ok(SyncResult {
        backups_copied: copied,
        backups_present: there.len() as u64,
        chunks_copied: p.chunks_done,
        chunks_present: wanted.len() as u64 - p.chunks_done,
        bytes_copied: p.bytes_done,
        duration_ms: elapsed.as_millis() as u64,
    })
}
