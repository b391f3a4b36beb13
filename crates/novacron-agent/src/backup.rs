//! Reading a disk for a backup, from an NBD export of it (QEMU's, of a
//! point-in-time view while the VM runs): cut into the datastore's 4 MiB
//! chunks, each hashed, compressed and handed to a [`ChunkSink`]. A full
//! backup reads every chunk that holds data (zero extents, by
//! `base:allocation`, are not read); an incremental one reads only what a
//! dirty bitmap marks and takes the others' digests from the previous
//! backup's index. A chunk changed in at most half of it is not read
//! whole: its changed extents are laid over the previous backup's chunk,
//! fetched from the store (small writes scattered over a disk would
//! otherwise cost whole chunks of reads).

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

    /// A stored chunk, encoded as it is stored.
    fn get(&self, digest: Digest) -> impl std::future::Future<Output = Result<Vec<u8>, BackupError>> + Send;
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
        Reading::Full => {
            let all = (0..count as u64).map(|i| vec![(i * CHUNK_SIZE, CHUNK_SIZE.min(size - i * CHUNK_SIZE))]);
            (all.collect(), None)
        }
        Reading::Changed { context, previous } => {
            if previous.size != size || previous.chunk_size != CHUNK_SIZE {
                return Err(BackupError::SizeChanged {
                    previous: previous.size,
                    now: size,
                });
            }
            let marked = extents_where(nbd, context, |f| f & STATE_DIRTY != 0, count).await?;
            (marked, Some(previous))
        }
    };
    // A chunk counts as zero only when all of it reads as zeros.
    let zero: Vec<bool> = extents_where(nbd, ALLOCATION, |f| f & STATE_ZERO == 0, count)
        .await?
        .iter()
        .map(|data| data.is_empty())
        .collect();
    let mut stats = DiskStats::default();
    let mut digests: Vec<Option<Digest>> = vec![None; count];
    let mut zero_stored: Vec<(u64, Digest)> = Vec::new();
    // Chunks being hashed and stored: over a long round trip a store
    // that took one chunk at a time would idle the link (PBS's sync).
    let mut in_flight = FuturesUnordered::new();
    // Chunks to read whole after all: their previous version could not be had.
    let mut whole = Vec::new();
    for i in 0..count {
        let start = i as u64 * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(size - start);
        let changed_bytes: u64 = changed[i].iter().map(|(_, l)| l).sum();
        let job = match previous {
            Some(prev) if changed_bytes == 0 => {
                digests[i] = Some(prev.digests[i]);
                None
            }
            _ if zero[i] => {
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
                None
            }
            Some(prev) if changed_bytes * 2 <= len => {
                let mut pieces = Vec::new();
                for (at, l) in &changed[i] {
                    let mut data = vec![0u8; *l as usize];
                    nbd.read(*at, &mut data).await?;
                    pieces.push((at - start, data));
                }
                stats.bytes_read += changed_bytes;
                Some(ChunkJob::Patch {
                    previous: prev.digests[i],
                    len,
                    pieces,
                })
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                nbd.read(start, &mut data).await?;
                stats.bytes_read += len;
                Some(ChunkJob::Whole(data))
            }
        };
        if let Some(job) = job {
            while in_flight.len() >= CHUNKS_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    landed(&mut digests, &mut stats, &mut whole, done)?;
                }
            }
            in_flight.push(store_chunk(sink, i, job));
        }
        progress(start + len, size);
    }
    loop {
        while let Some(done) = in_flight.next().await {
            landed(&mut digests, &mut stats, &mut whole, done)?;
        }
        if whole.is_empty() {
            break;
        }
        for i in std::mem::take(&mut whole) {
            let start = i as u64 * CHUNK_SIZE;
            let mut data = vec![0u8; CHUNK_SIZE.min(size - start) as usize];
            nbd.read(start, &mut data).await?;
            stats.bytes_read += data.len() as u64;
            in_flight.push(store_chunk(sink, i, ChunkJob::Whole(data)));
        }
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

/// A chunk to store: read whole, or its changed extents (offset in the
/// chunk, bytes) to lay over the previous backup's chunk `previous`.
enum ChunkJob {
    Whole(Vec<u8>),
    Patch {
        previous: Digest,
        len: u64,
        pieces: Vec<(u64, Vec<u8>)>,
    },
}

/// What became of a chunk [`store_chunk`] was given.
enum Landed {
    /// Stored as digest, with the bytes it took if it was new, and the
    /// bytes of a previous chunk it was laid over.
    Stored {
        i: usize,
        digest: Digest,
        new: Option<u64>,
        from_previous: u64,
    },
    /// Its previous chunk could not be had: it must be read whole.
    ReadWhole { i: usize, why: String },
}

async fn store_chunk<S: ChunkSink>(sink: &S, i: usize, job: ChunkJob) -> Result<Landed, BackupError> {
    let (data, from_previous) = match job {
        ChunkJob::Whole(data) => (data, 0),
        ChunkJob::Patch { previous, len, pieces } => match fetch_previous(sink, previous, len).await {
            Ok(mut data) => {
                for (at, piece) in pieces {
                    data[at as usize..at as usize + piece.len()].copy_from_slice(&piece);
                }
                (data, len)
            }
            Err(e) => {
                let why = format!("chunk {previous} of the previous backup: {e}");
                return Ok(Landed::ReadWhole { i, why });
            }
        },
    };
    let (digest, new) = store(sink, data).await?;
    Ok(Landed::Stored {
        i,
        digest,
        new,
        from_previous,
    })
}

/// The content of the previous backup's chunk `digest`, checked.
async fn fetch_previous<S: ChunkSink>(sink: &S, digest: Digest, len: u64) -> Result<Vec<u8>, BackupError> {
    let encoded = sink.get(digest).await?;
    let codec = sink.codec().clone();
    let data = tokio::task::spawn_blocking(move || codec.decode(&encoded, &digest))
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
        .map_err(|e| BackupError::Sink(e.to_string()))?;
    if data.len() as u64 != len {
        return Err(BackupError::Sink(format!("it holds {} bytes, not {len}", data.len())));
    }
    Ok(data)
}

/// Records a chunk stored by [`read_disk`]'s uploads, or one to read whole.
fn landed(
    digests: &mut [Option<Digest>],
    stats: &mut DiskStats,
    whole: &mut Vec<usize>,
    done: Result<Landed, BackupError>,
) -> Result<(), BackupError> {
    match done? {
        Landed::Stored {
            i,
            digest,
            new,
            from_previous,
        } => {
            digests[i] = Some(digest);
            stats.bytes_from_previous += from_previous;
            count_new(stats, new);
        }
        Landed::ReadWhole { i, why } => {
            tracing::warn!(chunk = i, error = %why, "cannot lay changes over the previous backup's chunk; reading it whole");
            whole.push(i);
        }
    }
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

/// For each chunk, the extents of `context` in it (offset, length; cut at
/// the chunk's bounds) whose flags `hit` accepts.
async fn extents_where(
    nbd: &mut NbdClient,
    context: &str,
    hit: impl Fn(u32) -> bool,
    count: usize,
) -> Result<Vec<Vec<(u64, u64)>>, BackupError> {
    let mut out = vec![Vec::new(); count];
    let size = nbd.size();
    let mut at = 0;
    while at < size {
        let extents = nbd.block_status(context, at, MAX_REQUEST).await?;
        for e in extents.iter().filter(|e| e.length > 0 && hit(e.flags)) {
            let end = (e.offset + e.length).min(size);
            let mut from = e.offset;
            while from < end {
                let i = (from / CHUNK_SIZE) as usize;
                let to = end.min((i as u64 + 1) * CHUNK_SIZE);
                if let Some(chunk) = out.get_mut(i) {
                    chunk.push((from, to - from));
                }
                from = to;
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
