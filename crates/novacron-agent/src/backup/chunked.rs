//! A disk of a backup read chunk by chunk from the store the server
//! serves, as an NBD export: each chunk is fetched when first asked for
//! (by a reader or by the fill that fetches them all in order, several at
//! once), decoded and checked against its digest. Chunks of zeros are
//! never fetched.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backon::Retryable;
use futures::stream::{self, StreamExt, TryStreamExt};
use novacron_api::error::chain;
use novacron_backup::chunk::{Digest, CHUNK_SIZE};
use novacron_backup::{Codec, FixedIndex};
use novacron_client::Client;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use super::{remote, BackupError};

/// Where fetched chunks are kept.
#[derive(Debug, Clone)]
pub enum Keep {
    /// In a sparse file made anew, for reads in any order, any number of
    /// times (a live restore: the guest and the stream job read it).
    File(PathBuf),
    /// In memory until every byte of the chunk has been read once, with
    /// the fill at most `window` chunks ahead of the reads (a restore:
    /// `qemu-img convert` reads each byte once, in order). Writing them
    /// to a file first cost more than the restore's own writes.
    Memory { window: usize },
}

enum Slot {
    /// Not fetched yet.
    Missing,
    /// In the file.
    InFile,
    /// In memory, with the bytes of it not read yet, and the fill's place
    /// in the window when the fill fetched it.
    InMemory {
        data: Arc<Vec<u8>>,
        unread: u64,
        _window: Option<OwnedSemaphorePermit>,
    },
    /// Held in memory and read through: gone (fetched again if read again).
    Read,
}

/// One disk of a backup, as its chunks come in.
pub struct ChunkedDisk {
    client: Client,
    store: String,
    codec: Codec,
    index: FixedIndex,
    /// [`Keep::File`]'s file.
    file: Option<Arc<std::fs::File>>,
    /// [`Keep::Memory`]'s window: chunks the fill may hold unread.
    window: Option<Arc<Semaphore>>,
    /// Locked while a chunk is fetched, so each is fetched once however
    /// many ask for it at once.
    slots: Vec<Mutex<Slot>>,
    /// Chunks of zeros (never fetched).
    zero: Vec<bool>,
    /// Bytes of the chunks that are not zeros (those fetched).
    wanted: u64,
    /// The last chunk that could not be had, and why.
    failure: parking_lot::Mutex<Option<String>>,
}

impl ChunkedDisk {
    /// Disk `index` of a backup in `store`, its chunks read with `codec`
    /// and kept as `keep` says.
    pub fn create(
        client: Client,
        store: &str,
        codec: Codec,
        index: FixedIndex,
        keep: &Keep,
    ) -> Result<ChunkedDisk, BackupError> {
        let (file, window) = match keep {
            Keep::File(raw) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(raw)
                    .and_then(|f| f.set_len(index.size).map(|()| f))
                    .map_err(|e| BackupError::Restore(format!("cannot make {}: {e}", raw.display())))?;
                (Some(Arc::new(file)), None)
            }
            Keep::Memory { window } => (None, Some(Arc::new(Semaphore::new((*window).max(1))))),
        };
        let zero = zero_chunks(&codec, &index)?;
        let wanted = (0..zero.len()).filter(|i| !zero[*i]).map(|i| index.chunk_len(i)).sum();
        Ok(ChunkedDisk {
            client,
            store: store.to_string(),
            codec,
            file,
            window,
            slots: (0..zero.len()).map(|_| Mutex::new(Slot::Missing)).collect(),
            zero,
            wanted,
            index,
            failure: parking_lot::Mutex::new(None),
        })
    }

    /// Bytes of the chunks to fetch (those that are not zeros).
    pub fn wanted_bytes(&self) -> u64 {
        self.wanted
    }

    /// Why the last chunk that failed did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// Ends a fill waiting for room in the window (its reader is gone).
    pub fn stop_fill(&self) {
        if let Some(window) = &self.window {
            window.close();
        }
    }

    /// Every chunk fetched (into memory, as far as the window allows),
    /// `in_flight` at once; `on_chunk` is told the bytes of each chunk as
    /// the fill passes it, whoever fetched it.
    pub async fn fill(&self, in_flight: usize, on_chunk: &(impl Fn(u64) + Sync)) -> Result<(), BackupError> {
        stream::iter((0..self.slots.len()).filter(|i| !self.zero[*i]))
            .map(|i| async move {
                let place = match &self.window {
                    Some(w) => Some(w.clone().acquire_owned().await.map_err(|_| {
                        BackupError::Restore("the restore stopped before every chunk was fetched".into())
                    })?),
                    None => None,
                };
                let mut slot = self.slots[i].lock().await;
                if matches!(*slot, Slot::Missing) {
                    *slot = self.fetch_into(i, place).await?;
                }
                drop(slot);
                on_chunk(self.index.chunk_len(i));
                Ok::<(), BackupError>(())
            })
            .buffer_unordered(in_flight)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    /// `length` bytes at `offset`, their chunks fetched first if need be.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, BackupError> {
        let end = offset.saturating_add(u64::from(length)).min(self.index.size);
        let offset = offset.min(end);
        let mut buf = vec![0u8; (end - offset) as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let first = (offset / CHUNK_SIZE) as usize;
        let last = ((end - 1) / CHUNK_SIZE) as usize;
        let Some(zero) = self.zero.get(first..=last) else {
            return Err(BackupError::Restore(format!("a read past the end of the disk ({end})")));
        };
        if zero.iter().all(|z| *z) {
            return Ok(buf);
        }
        for i in (first..=last).filter(|i| !self.zero[*i]) {
            let mut slot = self.slots[i].lock().await;
            if matches!(*slot, Slot::Missing | Slot::Read) {
                *slot = self.fetch_into(i, None).await?;
            }
            if let Slot::InMemory { data, unread, .. } = &mut *slot {
                // The part of chunk i in [offset, end), and where it goes.
                let start = i as u64 * CHUNK_SIZE;
                let (from, to) = (offset.max(start), end.min(start + data.len() as u64));
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
                *unread = unread.saturating_sub(to - from);
                if *unread == 0 {
                    *slot = Slot::Read;
                }
            }
        }
        let Some(file) = self.file.clone() else {
            return Ok(buf);
        };
        tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf, offset)
                .map(|()| buf)
                .map_err(|e| BackupError::Restore(format!("cannot read the restored disk: {e}")))
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Chunk `i` fetched and kept; `place` is the fill's place in the
    /// window it takes.
    async fn fetch_into(&self, i: usize, place: Option<OwnedSemaphorePermit>) -> Result<Slot, BackupError> {
        let result = self.fetch(i).await;
        if let Err(e) = &result {
            *self.failure.lock() = Some(e.to_string());
        }
        let data = result?;
        let Some(file) = self.file.clone() else {
            return Ok(Slot::InMemory {
                unread: data.len() as u64,
                data: Arc::new(data),
                _window: place,
            });
        };
        tokio::task::spawn_blocking(move || file.write_all_at(&data, i as u64 * CHUNK_SIZE))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))?
            .map_err(|e| BackupError::Restore(format!("cannot write the restored disk: {e}")))?;
        Ok(Slot::InFile)
    }

    /// Chunk `i`'s content, checked against its digest.
    async fn fetch(&self, i: usize) -> Result<Vec<u8>, BackupError> {
        let digest = self.index.digests[i];
        let hex = digest.to_hex();
        // A server or store that is briefly away must not fail a guest's
        // read (live) or a whole restore; a refusal (e.g. no such chunk) does.
        let path = format!("backup-stores/{}/chunks/{hex}", self.store);
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(2))
            .with_max_times(5);
        let encoded = (|| self.client.get_bytes(&path))
            .retry(backoff)
            .when(|e| e.status().is_none_or(|s| s >= 500))
            .notify(|e, _| tracing::warn!(chunk = %hex, error = %chain(e), "cannot fetch a chunk; retrying"))
            .await
            .map_err(|e| remote(&format!("chunk {hex}"), e))?;
        let (codec, want) = (self.codec.clone(), self.index.chunk_len(i));
        tokio::task::spawn_blocking(move || {
            let data = codec
                .decode(&encoded, &digest)
                .map_err(|e| BackupError::Restore(format!("chunk {hex} is damaged: {e}")))?;
            if data.len() as u64 != want {
                return Err(BackupError::Restore(format!(
                    "chunk {hex} holds {} bytes where the index says {want}",
                    data.len()
                )));
            }
            Ok(data)
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }
}

/// Which chunks of `index` hold only zeros: their digests are those of a
/// chunk of zeros of their length.
fn zero_chunks(codec: &Codec, index: &FixedIndex) -> Result<Vec<bool>, BackupError> {
    let mut zero_digests: Vec<(u64, Digest)> = Vec::new();
    for l in [CHUNK_SIZE, index.size % CHUNK_SIZE].into_iter().filter(|l| *l > 0) {
        let (d, _) = codec
            .encode(&vec![0u8; l as usize])
            .map_err(|e| BackupError::Restore(format!("cannot name a chunk of zeros: {e}")))?;
        zero_digests.push((l, d));
    }
    Ok((0..index.digests.len())
        .map(|i| zero_digests.contains(&(index.chunk_len(i), index.digests[i])))
        .collect())
}

impl novacron_nbd::server::Export for ChunkedDisk {
    fn size(&self) -> u64 {
        self.index.size
    }

    async fn read(&self, offset: u64, length: u32) -> std::io::Result<Vec<u8>> {
        ChunkedDisk::read(self, offset, length).await.map_err(|e| {
            tracing::warn!(offset, length, error = %e, "a read of a backup's export failed");
            std::io::Error::other(e.to_string())
        })
    }
}

/// Serves `chunks` as NBD export `name` on a Unix socket at `sock`, until
/// the task is aborted.
pub(super) fn serve_export(
    sock: &Path,
    name: &str,
    chunks: Arc<ChunkedDisk>,
) -> Result<tokio::task::JoinHandle<()>, BackupError> {
    let _ = std::fs::remove_file(sock);
    let listener = tokio::net::UnixListener::bind(sock)
        .map_err(|e| BackupError::Restore(format!("cannot serve the disk's export: {e}")))?;
    let name = name.to_string();
    Ok(tokio::spawn(async move {
        if let Err(e) = novacron_nbd::server::serve(listener, name.clone(), chunks).await {
            tracing::warn!(disk = %name, error = %e, "a backup's export stopped");
        }
    }))
}
