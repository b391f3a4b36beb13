//! Restoring a VM's disks from a backup in a store the server serves:
//! every chunk is fetched (several at once), decoded and checked against
//! its digest, and written into a sparse raw file, which `qemu-img
//! convert` turns into the disk's qcow2. A chunk that is missing or
//! damaged fails the restore, naming it; nothing half-written takes a
//! disk's name.

use std::os::unix::fs::FileExt;
use std::path::Path;

use futures::stream::{self, StreamExt, TryStreamExt};
use novacron_api::backup::RestoreSource;
use novacron_api::Backup;
use novacron_backup::chunk::{self, Digest, CHUNK_SIZE};
use novacron_backup::FixedIndex;
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

/// Restores the root and data disks of backup `src` into `dir`.
pub async fn restore_disks(client: &Client, dir: &VmDir, src: &RestoreSource) -> Result<(), BackupError> {
    let backup: Backup = client
        .get_json(&format!("backups/{}/{}/{}", src.store, src.vm, src.time))
        .await
        .map_err(|e| remote(&format!("backup {src}"), e))?;
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
        restore_disk(client, &src.store, &index, &target).await?;
        tracing::info!(backup = %src, disk = %disk.name, bytes = index.size, "disk restored");
    }
    std::fs::write(dir.path.join(RESTORED), format!("{src}\n"))
        .map_err(|e| BackupError::Sink(format!("cannot mark the restore done: {e}")))
}

/// Writes the disk `index` describes to `target` (a qcow2), through a
/// sparse raw file beside it.
async fn restore_disk(client: &Client, store: &str, index: &FixedIndex, target: &Path) -> Result<(), BackupError> {
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
        let zero_digests: Vec<(u64, Digest)> = [CHUNK_SIZE, index.size % CHUNK_SIZE]
            .into_iter()
            .filter(|l| *l > 0)
            .map(|l| (l, Digest::of(&vec![0u8; l as usize])))
            .collect();
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
                async move {
                    let hex = digest.to_hex();
                    let encoded = client
                        .get_bytes(&format!("backup-stores/{store}/chunks/{hex}"))
                        .await
                        .map_err(|e| remote(&format!("chunk {hex}"), e))?;
                    tokio::task::spawn_blocking(move || {
                        let data = chunk::decode(&encoded, &digest)
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
        let partial = target.with_extension("restore.qcow2");
        convert(&raw, &partial).await?;
        std::fs::rename(&partial, target)
            .map_err(|e| BackupError::Sink(format!("cannot put the restored disk in place: {e}")))
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(target.with_extension("restore.qcow2"));
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
