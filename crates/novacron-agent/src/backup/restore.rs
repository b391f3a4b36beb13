//! Restoring a VM's disks from a backup in a store the server serves:
//! every chunk is fetched (several at once), decoded and checked against
//! its digest, and written into a sparse raw file, which `qemu-img
//! convert` turns into the disk's qcow2. A chunk that is missing or
//! damaged fails the restore, naming it; the disks take their restored
//! files only once every one of them is restored (all or none: a restore
//! in place that fails leaves the VM's disks as they were).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
/// done: the stopped VM's disks are replaced by the backup's (all or none).
/// A failure is the VM's reason, and is not tried again (the disks are as
/// they were); false then, so a start asked for meanwhile does not go on.
pub async fn in_place_if_asked(node: &NodeContext, vm: &Vm, dir: &VmDir, st: &mut VmStatus) -> bool {
    if vm.spec.restore_generation == st.observed_restore_generation {
        return true;
    }
    st.observed_restore_generation = vm.spec.restore_generation;
    let Some(src) = &vm.spec.restore_from else {
        return true;
    };
    // The server checked too, but a snapshot may have been taken since.
    match crate::snapshots::list(dir) {
        Ok(snaps) if snaps.is_empty() => {}
        Ok(snaps) => {
            let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
            st.reason = Some(format!(
                "{RESTORE_FAILED} from {src} (the disks are as they were): the VM has snapshots ({}), whose layers its disks are",
                names.join(", ")
            ));
            return false;
        }
        Err(e) => {
            st.reason = Some(format!(
                "{RESTORE_FAILED} from {src} (the disks are as they were): cannot list its snapshots: {}",
                chain(&e)
            ));
            return false;
        }
    }
    let span = tracing::info_span!("restore_in_place", vm = %vm.metadata.name, backup = %src);
    let restoring = restore_disks(&node.client, dir, src, node.backup_key.as_ref());
    let restored = tracing::Instrument::instrument(restoring, span);
    match restored.await {
        Ok(()) => {
            tracing::info!(vm = %vm.metadata.name, backup = %src, "disks restored in place");
            crate::reconcile::clear_reason(st, RESTORE_FAILED);
            true
        }
        Err(e) => {
            tracing::warn!(vm = %vm.metadata.name, backup = %src, error = %chain(&e), "restore in place failed");
            st.reason = Some(format!(
                "{RESTORE_FAILED} from {src} (the disks are as they were): {}",
                chain(&e)
            ));
            false
        }
    }
}

const RESTORE_FAILED: &str = "Restore failed";

/// Restores the root and data disks of backup `src` into `dir`; a sealed
/// backup needs `key` (this node's backup key) to be its key.
pub async fn restore_disks(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
) -> Result<(), BackupError> {
    let mut restored = Vec::new();
    let result = restore_aside(client, dir, src, key, &mut restored).await;
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
    let codec = match (&backup.key_id, key) {
        (None, _) => Codec::Plain,
        (Some(want), Some(k)) if k.id_hex() == *want => Codec::Sealed(k.clone()),
        (Some(want), _) => {
            return Err(BackupError::Restore(format!(
                "backup {src} is sealed with backup key {want}, which this node does not have (novacron agent --backup-key FILE)"
            )))
        }
    };
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
    restored: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), BackupError> {
    let (backup, codec) = open_backup(client, src, key).await?;
    for (disk, target) in vm_disks(&backup, dir) {
        let (_, index) = fetch_index(client, src, disk).await?;
        let partial = target.with_extension("restore.qcow2");
        let raw = target.with_extension("restore.raw");
        let size = index.size;
        let result = async {
            let chunks = ChunkedDisk::create(client.clone(), &src.store, codec.clone(), index, &raw)?;
            chunks.fill(CHUNKS_IN_FLIGHT).await?;
            convert(&raw, &partial).await
        }
        .await;
        let _ = std::fs::remove_file(&raw);
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
        let present = (0..index.digests.len())
            .map(|i| {
                if zero_digests.contains(&(index.chunk_len(i), index.digests[i])) {
                    OnceCell::new_with(Some(()))
                } else {
                    OnceCell::new()
                }
            })
            .collect();
        Ok(ChunkedDisk {
            client,
            store: store.to_string(),
            codec,
            index,
            file: Arc::new(file),
            present,
            failure: parking_lot::Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.index.size
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
        let encoded = self
            .client
            .get_bytes(&format!("backup-stores/{}/chunks/{hex}", self.store))
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

    /// Every chunk in the file, `in_flight` fetched at once.
    pub async fn fill(&self, in_flight: usize) -> Result<(), BackupError> {
        stream::iter(0..self.present.len())
            .map(|i| self.ensure(i))
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
        for i in first..=last {
            self.ensure(i).await?;
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (end - offset.min(end)) as usize];
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

/// With `-f raw`, unlike `qemu::copy_disk` (which probes a trusted image):
/// the guest's bytes must never be taken for an image format.
async fn convert(raw: &Path, qcow2: &Path) -> Result<(), BackupError> {
    let args: [&std::ffi::OsStr; 8] = [
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        qcow2.as_os_str(),
    ];
    qemu::qemu_img_output(&args)
        .await
        .map(drop)
        .map_err(|e| BackupError::Restore(format!("cannot convert the restored disk: {e}")))
}
