//! Reading a disk for a backup, from an NBD export of it (QEMU's, of a
//! point-in-time view while the VM runs): cut into the datastore's 4 MiB
//! chunks, each hashed, compressed and handed to a [`ChunkSink`]. A full
//! backup reads every chunk that holds data (zero extents, by
//! `base:allocation`, are not read); an incremental one reads only the
//! chunks a dirty bitmap marks and takes the others' digests from the
//! previous backup's index.

use futures::stream::{FuturesUnordered, StreamExt};
use novacron_backup::chunk::{self, Digest, CHUNK_SIZE};
use novacron_backup::{DiskStats, FixedIndex};
use novacron_nbd::{NbdClient, NbdError, MAX_REQUEST, STATE_DIRTY, STATE_ZERO};

pub mod chain;
pub mod chunked;
pub mod export;
pub mod live;
pub mod restore;
pub mod running;
pub mod stopped;
pub mod target;

/// Chunks hashed and stored at once while a disk is read.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The meta context that says which extents read as zeros.
pub const ALLOCATION: &str = "base:allocation";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("Cannot read the disk's export")]
    Nbd(#[from] NbdError),
    #[error("Cannot store a chunk: {0}")]
    Sink(String),
    #[error("A chunk's hashing task failed: {0}")]
    Task(String),
    #[error(
        "The previous backup's index is of a disk of {previous} bytes, this one has {now}: a full backup is needed"
    )]
    SizeChanged { previous: u64, now: u64 },
    #[error("Cannot export the VM's disks: {0}")]
    Export(String),
    #[error("{0}")]
    Chain(String),
    #[error("{0}")]
    Restore(String),
}

/// Where a backup's chunks go: a datastore, here or the server's.
pub trait ChunkSink {
    /// How chunks are written there: plain, or sealed with a backup key.
    fn codec(&self) -> &chunk::Codec;

    /// Stores an encoded chunk unless the store has it; the bytes it takes
    /// when it was new.
    fn put(
        &self,
        digest: Digest,
        encoded: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Option<u64>, BackupError>> + Send;
}

/// A failed call to the server's store, about `what`.
fn remote(what: &str, e: novacron_client::ClientError) -> BackupError {
    BackupError::Sink(format!("{what}: {}", novacron_api::error::chain(&e)))
}

/// Which chunks a backup reads.
pub enum Reading<'a> {
    /// All that hold data.
    Full,
    /// Those that bitmap `context` (`qemu:dirty-bitmap:NAME`, exported with
    /// the disk) marks as changed since `previous` was taken.
    Changed { context: &'a str, previous: &'a FixedIndex },
}

/// Reads the export `nbd` serves as one disk of a backup; returns its index
/// and what it took. `progress` is told the bytes gone through so far.
pub async fn read_disk<S: ChunkSink>(
    nbd: &mut NbdClient,
    reading: Reading<'_>,
    sink: &S,
    mut progress: impl FnMut(u64, u64),
) -> Result<(FixedIndex, DiskStats), BackupError> {
    let size = nbd.size();
    let count = FixedIndex::chunks_for(size, CHUNK_SIZE) as usize;
    let (changed, previous) = match reading {
        Reading::Full => (vec![true; count], None),
        Reading::Changed { context, previous } => {
            if previous.size != size || previous.chunk_size != CHUNK_SIZE {
                return Err(BackupError::SizeChanged {
                    previous: previous.size,
                    now: size,
                });
            }
            let marked = chunks_where(nbd, context, |f| f & STATE_DIRTY != 0, count).await?;
            (marked, Some(previous))
        }
    };
    // A chunk counts as zero only when all of it reads as zeros.
    let zero = chunks_where(nbd, ALLOCATION, |f| f & STATE_ZERO == 0, count)
        .await?
        .into_iter()
        .map(|has_data| !has_data)
        .collect::<Vec<_>>();
    let mut stats = DiskStats::default();
    let mut digests: Vec<Option<Digest>> = vec![None; count];
    let mut zero_stored: Vec<(u64, Digest)> = Vec::new();
    // Chunks being hashed and stored: over a long round trip a store
    // that took one chunk at a time would idle the link (PBS's sync).
    let mut in_flight = FuturesUnordered::new();
    for i in 0..count {
        let len = CHUNK_SIZE.min(size - i as u64 * CHUNK_SIZE);
        if let (false, Some(prev)) = (changed[i], previous) {
            digests[i] = Some(prev.digests[i]);
        } else if zero[i] {
            // Zeros of one length are one chunk: hashed and stored once per disk.
            let digest = match zero_stored.iter().find(|(l, _)| *l == len) {
                Some((_, d)) => *d,
                None => {
                    let (d, new) = store(sink, vec![0u8; len as usize]).await?;
                    count_new(&mut stats, new);
                    zero_stored.push((len, d));
                    d
                }
            };
            digests[i] = Some(digest);
        } else {
            let mut data = vec![0u8; len as usize];
            nbd.read(i as u64 * CHUNK_SIZE, &mut data).await?;
            stats.bytes_read += len;
            while in_flight.len() >= CHUNKS_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    landed(&mut digests, &mut stats, done)?;
                }
            }
            in_flight.push(async move {
                let (d, new) = store(sink, data).await?;
                Ok((i, d, new))
            });
        }
        progress(i as u64 * CHUNK_SIZE + len, size);
    }
    while let Some(done) = in_flight.next().await {
        landed(&mut digests, &mut stats, done)?;
    }
    let digests = digests
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.ok_or_else(|| BackupError::Task(format!("chunk {i} was never stored"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        FixedIndex {
            size,
            chunk_size: CHUNK_SIZE,
            digests,
        },
        stats,
    ))
}

/// Records a chunk stored by [`read_disk`]'s uploads.
fn landed(
    digests: &mut [Option<Digest>],
    stats: &mut DiskStats,
    done: Result<(usize, Digest, Option<u64>), BackupError>,
) -> Result<(), BackupError> {
    let (i, d, new) = done?;
    digests[i] = Some(d);
    count_new(stats, new);
    Ok(())
}

fn count_new(stats: &mut DiskStats, new: Option<u64>) {
    if let Some(bytes) = new {
        stats.chunks_new += 1;
        stats.stored_bytes += bytes;
    }
}

/// Encodes (and seals) `data` off the async threads, then hands it to the sink.
async fn store<S: ChunkSink>(sink: &S, data: Vec<u8>) -> Result<(Digest, Option<u64>), BackupError> {
    let codec = sink.codec().clone();
    let (digest, encoded) = tokio::task::spawn_blocking(move || codec.encode(&data))
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
        .map_err(|e| BackupError::Sink(e.to_string()))?;
    let new = sink.put(digest, encoded).await?;
    Ok((digest, new))
}

/// For each chunk, whether any extent of `context` in it has flags that
/// `hit` accepts.
async fn chunks_where(
    nbd: &mut NbdClient,
    context: &str,
    hit: impl Fn(u32) -> bool,
    count: usize,
) -> Result<Vec<bool>, BackupError> {
    let mut out = vec![false; count];
    let size = nbd.size();
    let mut at = 0;
    while at < size {
        let extents = nbd.block_status(context, at, MAX_REQUEST).await?;
        for e in &extents {
            if e.length > 0 && hit(e.flags) {
                let first = (e.offset / CHUNK_SIZE) as usize;
                let last = ((e.offset + e.length - 1) / CHUNK_SIZE) as usize;
                for marked in out.iter_mut().take(last.min(count - 1) + 1).skip(first) {
                    *marked = true;
                }
            }
        }
        let end = extents.last().map(|e| e.offset + e.length).unwrap_or(at);
        if end <= at {
            return Err(BackupError::Nbd(NbdError::Protocol(format!(
                "block status for {context} did not move past {at}"
            ))));
        }
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
