//! A backup of a stopped VM: each disk file is exported read-only by
//! `qemu-nbd` (with its tracking bitmap when that was saved cleanly) and
//! read as a running VM's export is. Nothing writes the disks meanwhile
//! (the VM's claim keeps it from starting), so tracking is reset only once
//! the backup is stored: a backup that fails leaves it as it was.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use novacron_api::Backup;
use novacron_nbd::NbdClient;

use super::export::{Tracking, CBT};
use super::running::{begin, counts_from, why_full, Begun};
use super::target::{BackupTarget, DiskIndexes};
use super::{read_disk, BackupError, Reading, ALLOCATION};
use crate::qemu;

/// How long qemu-nbd may take to listen.
const LISTEN: Duration = Duration::from_secs(20);

/// The state of [`CBT`] in the qcow2 at `path` (not open in a QEMU).
pub async fn tracking_in_file(path: &Path) -> Result<Tracking, BackupError> {
    let info = qemu::image_info(path)
        .await
        .map_err(|e| BackupError::Export(e.to_string()))?;
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(b) = bitmaps.iter().find(|b| b["name"] == CBT) else {
        return Ok(Tracking::Missing);
    };
    let flags = b["flags"].as_array().cloned().unwrap_or_default();
    // `in-use`: the QEMU that had it open never saved it.
    Ok(if flags.iter().any(|f| f == "in-use") {
        Tracking::Inconsistent
    } else {
        Tracking::Consistent
    })
}

/// Starts [`CBT`] over in the qcow2 at `path`: from now on it marks what
/// changes after the backup just stored.
pub async fn reset_tracking_in_file(path: &Path, tracking: Tracking) -> Result<(), BackupError> {
    match tracking {
        Tracking::Consistent => cbt_in_file(path, "--clear").await,
        Tracking::Inconsistent => {
            cbt_in_file(path, "--remove").await?;
            cbt_in_file(path, "--add").await
        }
        Tracking::Missing => cbt_in_file(path, "--add").await,
    }
}

/// Removes [`CBT`] from the qcow2 at `path`, if it has it: the next backup
/// of the disk is full.
pub async fn drop_tracking_in_file(path: &Path) -> Result<(), BackupError> {
    match tracking_in_file(path).await? {
        Tracking::Missing => Ok(()),
        _ => cbt_in_file(path, "--remove").await,
    }
}

/// `qemu-img bitmap OP` of [`CBT`] in the qcow2 at `path`.
async fn cbt_in_file(path: &Path, op: &str) -> Result<(), BackupError> {
    let args: [&std::ffi::OsStr; 4] = ["bitmap".as_ref(), op.as_ref(), path.as_os_str(), CBT.as_ref()];
    qemu::qemu_img_output(&args)
        .await
        .map(drop)
        .map_err(|e| BackupError::Export(format!("qemu-img bitmap {op} {}: {e}", path.display())))
}

/// Gives the overlay `to` (just made on `from`, a stopped VM's disk turned
/// snapshot layer) `from`'s tracking: the writes that go to `to` are
/// tracked there, and backups stay incremental across the snapshot. When
/// `from` has no tracking to carry, `to` gets none (the next backup is full
/// and says why).
pub async fn carry_tracking_in_files(from: &Path, to: &Path) -> Result<(), BackupError> {
    if tracking_in_file(from).await? != Tracking::Consistent {
        return Ok(());
    }
    let add: [&std::ffi::OsStr; 4] = ["bitmap".as_ref(), "--add".as_ref(), to.as_os_str(), CBT.as_ref()];
    let merge: [&std::ffi::OsStr; 10] = [
        "bitmap".as_ref(),
        "--merge".as_ref(),
        CBT.as_ref(),
        "-b".as_ref(),
        from.as_os_str(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        to.as_os_str(),
    ];
    for args in [&add[..], &[merge.as_slice(), &[CBT.as_ref()]].concat()] {
        qemu::qemu_img_output(args)
            .await
            .map_err(|e| BackupError::Export(format!("carrying change tracking to {}: {e}", to.display())))?;
    }
    Ok(())
}

/// A read-only export of one disk file by qemu-nbd, stopped on drop.
struct FileExport {
    socket: PathBuf,
    child: tokio::process::Child,
}

impl FileExport {
    async fn start(dir: &Path, disk: &str, file: &Path, with_bitmap: bool) -> Result<FileExport, BackupError> {
        // One disk at a time; not named by the disk, whose name (a
        // volume's) would make the path too long for a Unix socket.
        let socket = dir.join("backup-file.sock");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tokio::process::Command::new("qemu-nbd");
        cmd.args(["--read-only", "--format=qcow2", "--export-name=disk"])
            .arg(format!("--socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if with_bitmap {
            cmd.args(["--bitmap", CBT]);
        }
        let mut child = cmd
            .arg(file)
            .spawn()
            .map_err(|e| BackupError::Export(format!("cannot run qemu-nbd: {e}")))?;
        let deadline = Instant::now() + LISTEN;
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(BackupError::Export(format!(
                    "qemu-nbd for disk {disk} exited ({status}): {}",
                    err.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(BackupError::Export(format!("qemu-nbd for disk {disk} did not listen")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(FileExport { socket, child })
    }
}

impl Drop for FileExport {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Backs up the stopped VM `vm` (id `vm_id`, directory `dir`) whose disk
/// files are `disks` (name, path) to `target`; `progress` hears (disk,
/// bytes done, size).
pub async fn back_up_stopped<T: BackupTarget>(
    dir: &Path,
    vm: &str,
    vm_id: &str,
    disks: &[(String, PathBuf)],
    target: &T,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Backup, BackupError> {
    let Begun {
        started,
        id,
        latest,
        chain_broken,
        ..
    } = begin(dir, vm, target).await?;
    let context = format!("qemu:dirty-bitmap:{CBT}");
    let mut read: DiskIndexes = Vec::new();
    let mut reasons = Vec::new();
    let mut tracked = Vec::new();
    for (disk, file) in disks {
        let tracking = tracking_in_file(file).await?;
        tracked.push((file, tracking));
        let size = qemu::virtual_size(file)
            .await
            .map_err(|e| BackupError::Export(e.to_string()))?;
        let previous = latest.as_ref().and_then(|l| l.disk(disk));
        let consistent = tracking == Tracking::Consistent;
        let why = why_full(tracking, consistent, previous, size, chain_broken.as_deref());
        let export = FileExport::start(dir, disk, file, consistent).await?;
        let mut contexts = vec![ALLOCATION];
        if consistent {
            contexts.push(&context);
        }
        let mut nbd = NbdClient::connect(&export.socket, "disk", &contexts).await?;
        let reading = match (&why, previous) {
            (None, Some(previous)) => Reading::Changed {
                context: &context,
                previous,
            },
            _ => Reading::Full,
        };
        let (index, stats) = read_disk(&mut nbd, reading, target, |done, size| progress(disk, done, size)).await?;
        nbd.disconnect().await?;
        drop(export);
        if let Some(why) = why {
            reasons.push(format!("{disk}: {why}"));
        }
        read.push((disk.clone(), index, stats));
    }
    let full_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    let backup = target
        .commit(&id, vm_id, read, full_reason, started.elapsed().as_millis() as u64)
        .await?;
    // Tracking counts from this backup on. Cut short here, the record still
    // names an older base, so the next backup is full.
    for (file, tracking) in tracked {
        reset_tracking_in_file(file, tracking).await?;
    }
    counts_from(dir, target.name(), &id)?;
    Ok(backup)
}
