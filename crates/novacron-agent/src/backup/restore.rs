//! Restoring a VM's disks from a backup in a store the server serves:
//! every chunk is fetched (several at once), decoded and checked against
//! its digest, and written into a sparse raw file, which `qemu-img
//! convert` turns into the disk's qcow2. A chunk that is missing or
//! damaged fails the restore, naming it; the disks take their restored
//! files only once every one of them is restored (all or none: a restore
//! in place that fails leaves the VM's disks as they were).

use std::os::unix::fs::FileExt;
use std::path::Path;

use futures::stream::{self, StreamExt, TryStreamExt};
use novacron_api::backup::RestoreSource;
use novacron_api::Backup;
use novacron_backup::chunk::{Digest, CHUNK_SIZE};
use novacron_backup::FixedIndex;
use novacron_backup::{ChunkKey, Codec};
use novacron_client::Client;

use super::{remote, BackupError};
use crate::qemu::{self, VmDir};

/// Chunks fetched at once.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Written once every disk is restored: a later start (after a rebuild,
/// say) does not restore again.
const RESTORED: &str = "restored-from";

/// Whether the VM in `dir` still needs its disks restored.
pub fn needed(dir: &VmDir) -> bool {
    !dir.path.join(RESTORED).exists()
}

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
                .map_err(|e| BackupError::Sink(format!("cannot put the restored disk in place: {e}")))?;
        }
        // The disks have no change tracking now: the next backup is full.
        super::chain::save(&dir.path, &Default::default()).map_err(|e| BackupError::Chain(e.to_string()))?;
        std::fs::write(dir.path.join(RESTORED), format!("{src}\n"))
            .map_err(|e| BackupError::Sink(format!("cannot mark the restore done: {e}")))?;
    }
    for (partial, _) in &restored {
        let _ = std::fs::remove_file(partial);
    }
    result
}

/// Restores each disk of `src` beside its target, recording each one done.
async fn restore_aside(
    client: &Client,
    dir: &VmDir,
    src: &RestoreSource,
    key: Option<&ChunkKey>,
    restored: &mut Vec<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<(), BackupError> {
    let backup: Backup = client
        .get_json(&format!("backups/{}/{}/{}", src.store, src.vm, src.time))
        .await
        .map_err(|e| remote(&format!("backup {src}"), e))?;
    let codec = match (&backup.key_id, key) {
        (None, _) => Codec::Plain,
        (Some(want), Some(k)) if k.id_hex() == *want => Codec::Sealed(k.clone()),
        (Some(want), _) => {
            return Err(BackupError::Sink(format!(
                "backup {src} is sealed with backup key {want}, which this node does not have (novacron agent --backup-key FILE)"
            )))
        }
    };
    for disk in &backup.disks {
        let Some(target) = dir
            .disk_file(&disk.name)
            .filter(|_| qemu::DISK_NODES.contains(&disk.name.as_str()))
        else {
            continue;
        };
        let path = format!(
            "backup-stores/{}/backups/{}/{}/disks/{}/index",
            src.store, src.vm, src.time, disk.name
        );
        let bytes = client
            .get_bytes(&path)
            .await
            .map_err(|e| remote(&format!("the index of disk {}", disk.name), e))?;
        let index = FixedIndex::from_bytes(&bytes)
            .map_err(|e| BackupError::Sink(format!("the index of disk {} of {src}: {e}", disk.name)))?;
        let partial = target.with_extension("restore.qcow2");
        restore_disk(client, &src.store, &codec, &index, &partial).await?;
        restored.push((partial, target));
        tracing::info!(backup = %src, disk = %disk.name, bytes = index.size, "disk restored");
    }
    Ok(())
}

/// Writes the disk `index` describes to `target` (a qcow2), through a
/// sparse raw file beside it; a failure leaves no `target`.
async fn restore_disk(
    client: &Client,
    store: &str,
    codec: &Codec,
    index: &FixedIndex,
    target: &Path,
) -> Result<(), BackupError> {
    if index.chunk_size != CHUNK_SIZE {
        return Err(BackupError::Sink(format!(
            "the index has {}-byte chunks, not {CHUNK_SIZE}",
            index.chunk_size
        )));
    }
    let raw = target.with_extension("restore.raw");
    let result = async {
        let file = std::fs::File::create(&raw)
            .and_then(|f| f.set_len(index.size).map(|()| f))
            .map_err(|e| BackupError::Sink(format!("cannot make {}: {e}", raw.display())))?;
        let file = std::sync::Arc::new(file);
        // Chunks of zeros stay holes.
        let mut zero_digests: Vec<(u64, Digest)> = Vec::new();
        for l in [CHUNK_SIZE, index.size % CHUNK_SIZE].into_iter().filter(|l| *l > 0) {
            let (d, _) = codec
                .encode(&vec![0u8; l as usize])
                .map_err(|e| BackupError::Sink(format!("cannot name a chunk of zeros: {e}")))?;
            zero_digests.push((l, d));
        }
        let wanted: Vec<(usize, Digest)> = index
            .digests
            .iter()
            .enumerate()
            .filter(|(i, d)| !zero_digests.contains(&(index.chunk_len(*i), **d)))
            .map(|(i, d)| (i, *d))
            .collect();
        stream::iter(wanted)
            .map(|(i, digest)| {
                let file = file.clone();
                let codec = codec.clone();
                async move {
                    let hex = digest.to_hex();
                    let encoded = client
                        .get_bytes(&format!("backup-stores/{store}/chunks/{hex}"))
                        .await
                        .map_err(|e| remote(&format!("chunk {hex}"), e))?;
                    tokio::task::spawn_blocking(move || {
                        let data = codec
                            .decode(&encoded, &digest)
                            .map_err(|e| BackupError::Sink(format!("chunk {hex} is damaged: {e}")))?;
                        file.write_all_at(&data, i as u64 * CHUNK_SIZE)
                            .map_err(|e| BackupError::Sink(format!("cannot write the restored disk: {e}")))
                    })
                    .await
                    .map_err(|e| BackupError::Task(e.to_string()))?
                }
            })
            .buffer_unordered(CHUNKS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        convert(&raw, target).await
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    if result.is_err() {
        let _ = std::fs::remove_file(target);
    }
    result
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
        .map_err(|e| BackupError::Sink(format!("cannot convert the restored disk: {e}")))
}
