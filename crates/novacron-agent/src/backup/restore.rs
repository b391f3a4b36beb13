//! Restoring a VM's disks from a backup in a store the server serves:
//! every chunk is fetched (several at once), decoded and checked against
//! its digest, and kept in a sparse raw file served over NBD, from which
//! `qemu-img convert` copies it into the disk's qcow2 as it comes. A chunk
//! that is missing or damaged fails the restore, naming it; the disks take
//! their restored files only once every one of them is restored (all or
//! none: a restore in place that fails leaves the VM's disks as they were).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use backon::Retryable;
use futures::stream::{self, StreamExt, TryStreamExt};
use novacron_api::backup::RestoreSource;
use novacron_api::error::chain;
use novacron_api::{Backup, Vm, VmStatus};
use novacron_backup::chunk::{Digest, CHUNK_SIZE};
use novacron_backup::FixedIndex;
use novacron_backup::{ChunkKey, Codec};
use novacron_client::Client;
use tokio::sync::OnceCell;

use super::{remote, BackupError};
use crate::copies::JobPoll;
use crate::node::NodeContext;
use crate::qemu::{self, VmDir};

/// Chunks fetched at once.
pub(super) const CHUNKS_IN_FLIGHT: usize = 8;

/// Written once every disk is restored: a later start (after a rebuild,
/// say) does not restore again.
pub(super) const RESTORED: &str = "restored-from";

/// Whether the VM in `dir` still needs its disks restored.
pub fn needed(dir: &VmDir) -> bool {
    !dir.path.join(RESTORED).exists()
}

/// Carries out a restore in place the spec asks for and this agent has not
/// done: the stopped VM's disks are replaced by the backup's (all or none),
/// in a task of its own (`status.reason` shows how far). A failure is the
/// VM's reason, and is not tried again (the disks are as they were). True
/// once there is nothing (more) to do and it did not fail, so a start asked
/// for meanwhile waits.
pub fn in_place_if_asked(node: &NodeContext, vm: &Vm, dir: &VmDir, st: &mut VmStatus) -> bool {
    if vm.spec.restore_generation == st.observed_restore_generation {
        return true;
    }
    let Some(src) = &vm.spec.restore_from else {
        st.observed_restore_generation = vm.spec.restore_generation;
        return true;
    };
    let failed = |st: &mut VmStatus, why: String| {
        st.observed_restore_generation = vm.spec.restore_generation;
        st.reason = Some(format!(
            "{RESTORE_FAILED} from {src} (the disks are as they were): {why}"
        ));
        false
    };
    // The server checked too, but a snapshot may have been taken since.
    match crate::snapshots::list(dir) {
        Ok(snaps) if snaps.is_empty() => {}
        Ok(snaps) => {
            let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
            let why = format!(
                "the VM has snapshots ({}), whose layers its disks are",
                names.join(", ")
            );
            return failed(st, why);
        }
        Err(e) => return failed(st, format!("cannot list its snapshots: {}", chain(&e))),
    }
    match restore_in_background(node, vm, dir, src) {
        JobPoll::Running(percent) => {
            st.reason = Some(format!("{RESTORING} from {src}: {percent}%"));
            false
        }
        JobPoll::Done => {
            tracing::info!(vm = %vm.metadata.name, backup = %src, "disks restored in place");
            st.observed_restore_generation = vm.spec.restore_generation;
            crate::reconcile::clear_reason(st, RESTORE_FAILED);
            crate::reconcile::clear_reason(st, RESTORING);
            true
        }
        JobPoll::Failed(why) => {
            tracing::warn!(vm = %vm.metadata.name, backup = %src, error = %why, "restore in place failed");
            failed(st, why)
        }
    }
}

/// How a VM's reason reads while its disks are restored.
pub const RESTORING: &str = "Restoring the disks";

/// [`restore_disks`] for the VM in `dir` in a task of its own: where it stands.
pub fn restore_in_background(node: &NodeContext, vm: &Vm, dir: &VmDir, src: &RestoreSource) -> JobPoll {
    let (client, dir, src, key) = (node.client.clone(), dir.clone(), src.clone(), node.backup_key.clone());
    let span = tracing::info_span!("restore", vm = %vm.metadata.name, backup = %src);
    node.restores.poll(&vm.metadata.id, move |percent| {
        let restoring = async move {
            restore_disks(&client, &dir, &src, key.as_ref(), &percent)
                .await
                .map_err(|e| chain(&e).to_string())
        };
        tracing::Instrument::instrument(restoring, span)
    })
}

const RESTORE_FAILED: &str = "Restore failed";

/// Restores the root and data disks of backup `src` into `dir`; a sealed
/// backup needs `key` (this node's backup key) to be its key.
pub async fn restore_disks(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
    percent: &AtomicU8,
) -> Result<(), BackupError> {
    let mut restored = Vec::new();
    let result = restore_aside(client, dir, src, key, percent, &mut restored).await;
    if result.is_ok() {
        for (partial, target) in &restored {
            std::fs::rename(partial, target)
                .map_err(|e| BackupError::Restore(format!("cannot put the restored disk in place: {e}")))?;
        }
        // The disks have no change tracking now: the next backup is full.
        super::chain::save(&dir.path, &Default::default()).map_err(|e| BackupError::Chain(e.to_string()))?;
        std::fs::write(dir.path.join(RESTORED), format!("{src}\n"))
            .map_err(|e| BackupError::Restore(format!("cannot mark the restore done: {e}")))?;
    }
    for (partial, _) in &restored {
        let _ = std::fs::remove_file(partial);
    }
    result
}

/// A backup `src`'s manifest and how its chunks read with this node's
/// backup `key` (a sealed backup needs its own key).
pub(super) async fn open_backup(
    client: &Client,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
) -> Result<(Backup, Codec), BackupError> {
    let backup: Backup = client
        .get_json(&format!("backups/{}/{}/{}", src.store, src.vm, src.time))
        .await
        .map_err(|e| remote(&format!("backup {src}"), e))?;
    let codec = Codec::for_key(backup.key_id.as_deref(), key).ok_or_else(|| {
        BackupError::Restore(format!(
            "backup {src} is sealed with backup key {}, which this node does not have (novacron agent --backup-key FILE)",
            backup.key_id.as_deref().unwrap_or_default()
        ))
    })?;
    Ok((backup, codec))
}

/// The index of disk `disk` of backup `src`, as stored (bytes) and read.
pub(super) async fn fetch_index(
    client: &Client,
    src: &RestoreSource,
    disk: &str,
) -> Result<(Vec<u8>, FixedIndex), BackupError> {
    let path = format!(
        "backup-stores/{}/backups/{}/{}/disks/{disk}/index",
        src.store, src.vm, src.time
    );
    let bytes = client
        .get_bytes(&path)
        .await
        .map_err(|e| remote(&format!("the index of disk {disk}"), e))?;
    let index = parse_index(&bytes, disk, src)?;
    Ok((bytes.to_vec(), index))
}

pub(super) fn parse_index(bytes: &[u8], disk: &str, src: &RestoreSource) -> Result<FixedIndex, BackupError> {
    let index = FixedIndex::from_bytes(bytes)
        .map_err(|e| BackupError::Restore(format!("the index of disk {disk} of {src}: {e}")))?;
    if index.chunk_size != CHUNK_SIZE {
        return Err(BackupError::Restore(format!(
            "the index of disk {disk} of {src} has {}-byte chunks, not {CHUNK_SIZE}",
            index.chunk_size
        )));
    }
    Ok(index)
}

/// The disks of `backup` this VM has, with their files in `dir`.
pub(super) fn vm_disks<'a>(backup: &'a Backup, dir: &VmDir) -> Vec<(&'a str, PathBuf)> {
    backup
        .disks
        .iter()
        .filter(|d| qemu::DISK_NODES.contains(&d.name.as_str()))
        .filter_map(|d| dir.disk_file(&d.name).map(|f| (d.name.as_str(), f)))
        .collect()
}

/// Restores each disk of `src` beside its target, recording each one done.
async fn restore_aside(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
    percent: &AtomicU8,
    restored: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), BackupError> {
    let (backup, codec) = open_backup(client, src, key).await?;
    let mut disks = Vec::new();
    for (disk, target) in vm_disks(&backup, dir) {
        let (_, index) = fetch_index(client, src, disk).await?;
        disks.push((disk, target, index));
    }
    // Chunks fetched (of all disks), to the percentage; the conversions
    // take the last bit.
    let total: u64 = disks.iter().map(|(_, _, i)| i.size).sum();
    let done = AtomicU64::new(0);
    let on_chunk = |n: u64| {
        let now = done.fetch_add(n, Ordering::Relaxed) + n;
        percent.store((now * 100 / total.max(1)).min(99) as u8, Ordering::Relaxed);
    };
    for (disk, target, index) in disks {
        let partial = target.with_extension("restore.qcow2");
        let raw = target.with_extension("restore.raw");
        let sock = dir.path.join(format!("restore-{disk}.sock"));
        let size = index.size;
        let mut export = None;
        // The qcow2 takes the data from an export of the chunks as they come
        // in (`qemu-img convert`, several reads at once), while they are
        // fetched several at once.
        let result = async {
            let chunks = Arc::new(ChunkedDisk::create(
                client.clone(),
                &src.store,
                codec.clone(),
                index,
                &raw,
            )?);
            on_chunk(size - chunks.wanted_bytes());
            export = Some(serve_export(&sock, disk, chunks.clone())?);
            let (filled, copied) = tokio::join!(
                chunks.fill(CHUNKS_IN_FLIGHT, &on_chunk),
                convert_export(&sock, disk, &partial)
            );
            filled?;
            // A chunk that failed says more than QEMU's I/O error.
            copied.map_err(|e| chunks.failure().map(BackupError::Restore).unwrap_or(e))
        }
        .await;
        if let Some(task) = export {
            task.abort();
        }
        let _ = std::fs::remove_file(&raw);
        let _ = std::fs::remove_file(&sock);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        restored.push((partial, target));
        tracing::info!(backup = %src, disk, bytes = size, "disk restored");
    }
    Ok(())
}

/// A disk of a backup coming into a sparse raw file, chunk by chunk: each
/// fetched at most once (whether a reader or the fill asks first), decoded
/// and checked against its digest. Chunks of zeros are never fetched: the
/// file's holes read as zeros.
pub struct ChunkedDisk {
    client: Client,
    store: String,
    codec: Codec,
    index: FixedIndex,
    file: Arc<std::fs::File>,
    present: Vec<OnceCell<()>>,
    /// Chunks of zeros (never fetched).
    zero: Vec<bool>,
    /// Bytes of the chunks that are not zeros (those fetched).
    wanted: u64,
    /// The last chunk that could not be had, and why.
    failure: parking_lot::Mutex<Option<String>>,
}

impl ChunkedDisk {
    /// `raw` made anew, sized to the disk, holding nothing yet.
    pub fn create(
        client: Client,
        store: &str,
        codec: Codec,
        index: FixedIndex,
        raw: &Path,
    ) -> Result<ChunkedDisk, BackupError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(raw)
            .and_then(|f| f.set_len(index.size).map(|()| f))
            .map_err(|e| BackupError::Restore(format!("cannot make {}: {e}", raw.display())))?;
        let mut zero_digests: Vec<(u64, Digest)> = Vec::new();
        for l in [CHUNK_SIZE, index.size % CHUNK_SIZE].into_iter().filter(|l| *l > 0) {
            let (d, _) = codec
                .encode(&vec![0u8; l as usize])
                .map_err(|e| BackupError::Restore(format!("cannot name a chunk of zeros: {e}")))?;
            zero_digests.push((l, d));
        }
        let zero: Vec<bool> = (0..index.digests.len())
            .map(|i| zero_digests.contains(&(index.chunk_len(i), index.digests[i])))
            .collect();
        let present: Vec<OnceCell<()>> = zero
            .iter()
            .map(|z| {
                if *z {
                    OnceCell::new_with(Some(()))
                } else {
                    OnceCell::new()
                }
            })
            .collect();
        let wanted = (0..present.len())
            .filter(|i| !zero[*i])
            .map(|i| index.chunk_len(i))
            .sum();
        Ok(ChunkedDisk {
            client,
            store: store.to_string(),
            codec,
            index,
            file: Arc::new(file),
            present,
            zero,
            wanted,
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

    /// Chunk `i` in the file, fetched now unless it is there or coming.
    pub async fn ensure(&self, i: usize) -> Result<(), BackupError> {
        let Some(cell) = self.present.get(i) else {
            return Err(BackupError::Restore(format!("chunk {i} is past the end of the disk")));
        };
        let result = cell.get_or_try_init(|| self.fetch(i)).await.map(drop);
        if let Err(e) = &result {
            *self.failure.lock() = Some(e.to_string());
        }
        result
    }

    async fn fetch(&self, i: usize) -> Result<(), BackupError> {
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
        let (file, codec, want) = (self.file.clone(), self.codec.clone(), self.index.chunk_len(i));
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
            file.write_all_at(&data, i as u64 * CHUNK_SIZE)
                .map_err(|e| BackupError::Restore(format!("cannot write the restored disk: {e}")))
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Every chunk in the file, `in_flight` fetched at once; `on_chunk` is
    /// told the bytes of each fetched.
    pub async fn fill(&self, in_flight: usize, on_chunk: &(impl Fn(u64) + Sync)) -> Result<(), BackupError> {
        stream::iter((0..self.present.len()).filter(|i| !self.present[*i].initialized()))
            .map(|i| async move {
                self.ensure(i).await?;
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
        let first = (offset / CHUNK_SIZE) as usize;
        let last = (end.saturating_sub(1) / CHUNK_SIZE) as usize;
        let len = (end - offset.min(end)) as usize;
        if self.zero.get(first..=last).is_some_and(|z| z.iter().all(|z| *z)) {
            return Ok(vec![0u8; len]);
        }
        for i in first..=last {
            self.ensure(i).await?;
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map(|()| buf)
                .map_err(|e| BackupError::Restore(format!("cannot read the restored disk: {e}")))
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }
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

/// Writes export `disk` at `sock` into the new qcow2 `qcow2` (zeros left
/// unallocated), then syncs it.
async fn convert_export(sock: &Path, disk: &str, qcow2: &Path) -> Result<(), BackupError> {
    let source = format!("nbd+unix:///{disk}?socket={}", sock.display());
    // Cache mode unsafe (no flushes while qcow2 allocates): the file is not
    // the disk until it is synced and renamed. -f raw: the guest's bytes
    // are never taken for an image format.
    let args: [&std::ffi::OsStr; 13] = [
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-t".as_ref(),
        "unsafe".as_ref(),
        "-m".as_ref(),
        "8".as_ref(),
        "-W".as_ref(),
        source.as_ref(),
        qcow2.as_os_str(),
    ];
    qemu::qemu_img_output(&args)
        .await
        .map_err(|e| BackupError::Restore(format!("cannot copy the backup into the disk: {e}")))?;
    let synced = std::fs::File::open(qcow2).and_then(|f| f.sync_all());
    synced.map_err(|e| BackupError::Restore(format!("cannot sync the restored disk: {e}")))
}
