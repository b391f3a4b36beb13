//! Snapshots of a VM's own disks (root and data), kept in its directory so
//! they move with it. A snapshot is one read-only qcow2 layer per disk,
//! `snap-NAME.DISK.qcow2`; the disk the VM runs on is an overlay on the
//! layer of the snapshot it descends from. Backing files are named
//! relative to the directory (all layers live side by side), so the chain
//! reads the same on any node.
//!
//! Every step leaves each disk whole, whenever the agent dies:
//! - take: the disk is hard-linked as the layer, then an overlay on that
//!   layer replaces the disk's name in one rename;
//! - revert: a fresh overlay on the layer replaces the disk's name;
//! - delete: each child of the layer (a newer snapshot's layer, or the
//!   disk) is rebased onto the layer's own backing with its content kept
//!   (`qemu-img rebase` in safe mode copies what the layer held), and only
//!   then is the record updated and the layer removed. Repeating a delete
//!   that was cut short redoes only what is left.
//!
//! A running VM's disks are snapshotted all at one instant: the overlays
//! are put on top of the disks' nodes in QEMU in one transaction
//! ([`take_running`]). QEMU opens every disk file by a name of its own
//! (`VmDir::open_alias`): when the old top becomes a read-only backing,
//! QEMU reopens its file by name, and the disk's own name then names the
//! new overlay. Reverting and deleting need the VM stopped. The
//! record, `snapshots.json`, is replaced whole. The caller holds the VM's
//! claim, so neither the reconciler nor a migration acts on it meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::Utc;
use novacron_api::snapshot::{CreateSnapshot, Snapshot, SnapshotMemory, MAX_SNAPSHOTS};

use novacron_qmp::commands::{BlockdevAddQcow2, BlockdevDel, QueryBlock, Transaction, TransactionAction};
use novacron_qmp::{Qmp, QmpError};

use crate::qemu::{self, QemuError, VmDir};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("The VM has no snapshot {0:?}")]
    NotFound(String),
    #[error("The VM already has a snapshot {0:?}")]
    Exists(String),
    #[error("The VM has {MAX_SNAPSHOTS} snapshots, the most it may have: delete one first")]
    TooMany,
    #[error("The VM is running: stop it first (snapshots are reverted and deleted on stopped VMs)")]
    Running,
    #[error("The VM is busy (migrating, or another snapshot operation runs): try again when it is done")]
    Busy,
    #[error("The VM has no disks yet (it never started): nothing to snapshot")]
    NoDisks,
    #[error("The VM is not running: memory snapshots save a running guest (start or resume it first, or take the snapshot without memory)")]
    NotRunning,
    #[error("Cannot save the VM's memory: {0}")]
    SaveMemory(String),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error("QEMU refused")]
    Qmp(#[from] QmpError),
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot fetch snapshot layer {layer}")]
    Fetch {
        layer: String,
        #[source]
        source: crate::peers::FetchError,
    },
    #[error("The snapshot record {path} cannot be read")]
    Record {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// A disk snapshots hold: its name ("root", "data") and file.
type OwnDisk = (&'static str, PathBuf);

/// The VM's own disks that snapshots hold, as present.
fn own_disks(dir: &VmDir) -> Vec<OwnDisk> {
    [("root", dir.root_disk()), ("data", dir.data_disk())]
        .into_iter()
        .filter(|(_, p)| p.exists())
        .collect()
}

fn active_disk(dir: &VmDir, disk: &str) -> PathBuf {
    dir.path.join(format!("{disk}.qcow2"))
}

/// The file name of snapshot `name`'s layer of `disk`, relative to the VM's directory.
pub fn layer_name(name: &str, disk: &str) -> String {
    format!("snap-{name}.{disk}.qcow2")
}

fn record_path(dir: &VmDir) -> PathBuf {
    dir.path.join("snapshots.json")
}

/// The VM's snapshots, oldest first (none when it has no record).
pub fn list(dir: &VmDir) -> Result<Vec<Snapshot>, SnapshotError> {
    let path = record_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Record {
            path: path.display().to_string(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(format!("read {}", path.display()))(e)),
    }
}

/// Replaces the record whole (written aside, then renamed over it).
pub fn write(dir: &VmDir, snapshots: &[Snapshot]) -> Result<(), SnapshotError> {
    let path = record_path(dir);
    let tmp = path.with_extension("json.partial");
    let bytes = serde_json::to_vec_pretty(snapshots).map_err(|source| SnapshotError::Record {
        path: path.display().to_string(),
        source,
    })?;
    std::fs::write(&tmp, bytes).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("replace {}", path.display())))
}

/// Every file the record names (each disk's layer, the saved memory), as
/// (name a peer asks for, file): what must travel with the VM besides its
/// disks.
pub fn layer_files(dir: &VmDir, snapshots: &[Snapshot]) -> Vec<(String, PathBuf)> {
    snapshots
        .iter()
        .flat_map(|s| {
            let layers = s.disks.iter().map(move |d| layer_name(&s.name, d));
            layers.chain(s.memory.is_some().then(|| memory::state_name(&s.name)))
        })
        .map(|f| {
            let asked = f.trim_end_matches(".qcow2").to_string();
            (asked, dir.path.join(f))
        })
        .collect()
}

/// Whether a backing file name is one of the VM's snapshot layers (named
/// relative to its directory) rather than an image elsewhere.
fn is_layer(backing: &str) -> bool {
    backing.starts_with("snap-") && backing.ends_with(".qcow2") && !backing.contains('/')
}

/// The snapshot layer each of the VM's disks is an overlay on, by disk.
pub async fn disk_layers(dir: &VmDir) -> Result<BTreeMap<String, String>, SnapshotError> {
    let mut layers = BTreeMap::new();
    for (disk, active) in own_disks(dir) {
        if let Some(b) = backing_of(&active).await? {
            if is_layer(&b.file) {
                layers.insert(disk.to_string(), b.file);
            }
        }
    }
    Ok(layers)
}

/// Fetches the layers of `snapshots` from the agent at `source` (its base
/// URL) into `dir`, where a migration brings the VM.
pub async fn fetch_layers(
    http: &reqwest::Client,
    secret: &str,
    source: &str,
    vm_id: &str,
    dir: &VmDir,
    snapshots: &[Snapshot],
) -> Result<(), SnapshotError> {
    for (layer, path) in layer_files(dir, snapshots) {
        let url = format!("{}/agent/v1/vms/{vm_id}/disks/{layer}", source.trim_end_matches('/'));
        crate::peers::download(http, &url, secret, &path)
            .await
            .map_err(|source| SnapshotError::Fetch { layer, source })?;
    }
    Ok(())
}

/// Makes each disk named in `layers` (disk -> layer file, as
/// [`disk_layers`] gives them) a blank overlay on that layer.
pub async fn overlay_on_layers(dir: &VmDir, layers: &BTreeMap<String, String>) -> Result<(), SnapshotError> {
    for (disk, layer) in layers {
        if !matches!(disk.as_str(), "root" | "data") || !is_layer(layer) || !dir.path.join(layer).exists() {
            return Err(SnapshotError::NotFound(format!("{layer} (under disk {disk})")));
        }
        qemu::create_disk(&active_disk(dir, disk), Some((Path::new(layer), "qcow2")), None).await?;
    }
    Ok(())
}

/// Points each root-disk file here (the disk and its snapshot layers) that
/// names an image by absolute path, the cache of the node it came from, at
/// this node's copy `base` of that image. Files on a layer, and standalone
/// ones (a full clone), stay as they are.
pub async fn repoint_at_image(
    dir: &VmDir,
    snapshots: &[Snapshot],
    base: &Path,
    format: &str,
) -> Result<(), SnapshotError> {
    let mut files = vec![dir.root_disk()];
    files.extend(
        snapshots
            .iter()
            .filter(|s| s.disks.iter().any(|d| d == "root"))
            .map(|s| dir.path.join(layer_name(&s.name, "root"))),
    );
    for file in files.iter().filter(|f| f.exists()) {
        let Some(backing) = backing_of(file).await? else {
            continue;
        };
        if Path::new(&backing.file).is_absolute() {
            qemu::qemu_img_output(&[
                "rebase".as_ref(),
                "-u".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                format.as_ref(),
                "-b".as_ref(),
                base.as_os_str(),
                file.as_os_str(),
            ])
            .await?;
        }
    }
    Ok(())
}

/// A snapshot's file by the name [`layer_files`] gives it, if it is one.
pub fn layer_file(dir: &VmDir, name: &str) -> Option<PathBuf> {
    let (snap, part) = name.strip_prefix("snap-")?.rsplit_once('.')?;
    novacron_api::validate::name("snapshot", snap).ok()?;
    match part {
        "root" | "data" => Some(dir.path.join(layer_name(snap, part))),
        "vmstate" => Some(dir.path.join(memory::state_name(snap))),
        _ => None,
    }
}

fn current(snapshots: &[Snapshot]) -> Option<String> {
    snapshots.iter().find(|s| s.current).map(|s| s.name.clone())
}

fn set_current(snapshots: &mut [Snapshot], name: Option<&str>) {
    for s in snapshots {
        s.current = Some(s.name.as_str()) == name;
    }
}

/// Takes snapshot `req` of a stopped VM's disks.
pub async fn take(dir: &VmDir, req: &CreateSnapshot) -> Result<Snapshot, SnapshotError> {
    let (snapshots, disks) = room_for(dir, req)?;
    let mut taken: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (disk, active) in &disks {
        let layer = dir.path.join(layer_name(&req.name, disk));
        match take_layer(active, &layer, &layer_name(&req.name, disk)).await {
            Ok(()) => {
                // Backups stay incremental across the snapshot; without the
                // carried tracking the next one is full (and says so).
                if let Err(e) = crate::backup::stopped::carry_tracking_in_files(&layer, active).await {
                    tracing::warn!(disk = %active.display(), error = %e, "change tracking not carried to the new overlay");
                }
                taken.push((active.clone(), layer))
            }
            Err(e) => {
                undo_take(&taken);
                return Err(e);
            }
        }
    }
    record(dir, snapshots, req, &disks, None, None).inspect_err(|_| undo_take(&taken))
}

/// The VM's snapshots and own disks, if `req` may be taken.
fn room_for(dir: &VmDir, req: &CreateSnapshot) -> Result<(Vec<Snapshot>, Vec<OwnDisk>), SnapshotError> {
    let snapshots = list(dir)?;
    if snapshots.iter().any(|s| s.name == req.name) {
        return Err(SnapshotError::Exists(req.name.clone()));
    }
    if snapshots.len() >= MAX_SNAPSHOTS {
        return Err(SnapshotError::TooMany);
    }
    let disks = own_disks(dir);
    if disks.is_empty() {
        return Err(SnapshotError::NoDisks);
    }
    Ok((snapshots, disks))
}

/// Adds the snapshot just taken of `disks` to the record, as the current one.
fn record(
    dir: &VmDir,
    mut snapshots: Vec<Snapshot>,
    req: &CreateSnapshot,
    disks: &[OwnDisk],
    running: Option<Quiesced>,
    memory: Option<SnapshotMemory>,
) -> Result<Snapshot, SnapshotError> {
    let snapshot = Snapshot {
        name: req.name.clone(),
        description: req.description.clone(),
        created_at: Utc::now(),
        parent: current(&snapshots),
        disks: disks.iter().map(|(d, _)| d.to_string()).collect(),
        current: true,
        taken_running: running.is_some(),
        quiesced: running.is_some_and(|q| q.0),
        memory,
    };
    set_current(&mut snapshots, None);
    snapshots.push(snapshot.clone());
    write(dir, &snapshots)?;
    Ok(snapshot)
}

/// The disk becomes the layer (a second name for the same file), then an
/// overlay on it takes the disk's name.
async fn take_layer(active: &Path, layer: &Path, layer_name: &str) -> Result<(), SnapshotError> {
    // A leftover of a take cut short before its record was written.
    let _ = std::fs::remove_file(layer);
    std::fs::hard_link(active, layer).map_err(io(format!("link {}", layer.display())))?;
    if let Err(e) = qemu::create_disk(active, Some((Path::new(layer_name), "qcow2")), None).await {
        let _ = std::fs::remove_file(layer);
        return Err(e.into());
    }
    Ok(())
}

/// Whether the guest's filesystems were frozen for a snapshot of the running VM.
#[derive(Debug, Clone, Copy)]
pub struct Quiesced(pub bool);

/// Takes snapshot `req` of a running VM's disks, all at one instant
/// (crash-consistent: what the guest had written to its disks then).
pub async fn take_running(
    dir: &VmDir,
    qmp: &Qmp,
    req: &CreateSnapshot,
    quiesced: Quiesced,
) -> Result<Snapshot, SnapshotError> {
    let (snapshots, disks) = room_for(dir, req)?;
    overlays_in_qemu(dir, qmp, &req.name, &disks).await?;
    // QEMU writes the overlays now: the disks stay as they are even if the
    // record cannot be written (the snapshot is then simply not listed).
    record(dir, snapshots, req, &disks, Some(quiesced), None)
}

/// Each disk is linked as its layer and an overlay on that layer takes the
/// disk's name, while QEMU still writes the old file (which the overlay
/// reads through, so nothing is lost whenever this stops); one transaction
/// then puts every overlay on top of its disk's node in QEMU. A failure
/// leaves QEMU and the files as they were.
async fn overlays_in_qemu(dir: &VmDir, qmp: &Qmp, name: &str, disks: &[OwnDisk]) -> Result<(), SnapshotError> {
    let tops = top_nodes(qmp).await?;
    // Node names must be unique for the QEMU's life and at most 31 characters.
    let stamp = Utc::now().timestamp_millis() % 1_000_000_000;
    let mut taken: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut added: Vec<String> = Vec::new();
    let mut actions = Vec::new();
    let result = async {
        for (disk, active) in disks {
            let Some(top) = tops.get(*disk) else {
                return Err(SnapshotError::Qemu(QemuError::Img(format!(
                    "QEMU has no device for disk {disk}"
                ))));
            };
            let file = layer_name(name, disk);
            let layer = dir.path.join(&file);
            let _ = std::fs::remove_file(&layer);
            std::fs::hard_link(active, &layer).map_err(io(format!("link {}", layer.display())))?;
            taken.push((active.clone(), layer.clone()));
            let size = qemu::virtual_size(&layer).await?;
            overlay_unchecked(active, &file, size).await?;
            let node = format!("{disk}-s{stamp}");
            let opened = dir.open_alias(disk, active)?;
            qmp.run(&BlockdevAddQcow2::overlay(&node, opened.display().to_string()))
                .await?;
            added.push(node.clone());
            actions.push(TransactionAction::BlockdevSnapshot {
                node: top.clone(),
                overlay: node.clone(),
            });
            // Change tracking moves up with the writes: the overlay gets
            // the disk's bitmap as of this instant (backups stay incremental).
            if crate::backup::export::tracking(qmp, top).await? == crate::backup::export::Tracking::Consistent {
                actions.extend(crate::backup::export::carry_tracking(top, &node));
            }
        }
        qmp.run(&Transaction { actions }).await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for node in &added {
            let _ = qmp
                .run(&BlockdevDel {
                    node_name: node.clone(),
                })
                .await;
        }
        undo_take(&taken);
        return Err(e);
    }
    Ok(())
}

/// An overlay of `size` bytes on layer `layer` (a file in the same
/// directory) renamed over `active`, without opening the layer (a running
/// QEMU holds it).
async fn overlay_unchecked(active: &Path, layer: &str, size: u64) -> Result<(), SnapshotError> {
    let tmp = active.with_extension("qcow2.partial");
    qemu::create_overlay_unchecked(&tmp, layer, "qcow2", size).await?;
    std::fs::rename(&tmp, active).map_err(io(format!("replace {}", active.display())))
}

/// The node on top of each of the VM's own disks in QEMU ("root", "data"
/// at start; an overlay's node after a snapshot of the running VM).
pub async fn top_nodes(qmp: &Qmp) -> Result<BTreeMap<String, String>, QmpError> {
    let devices = qmp.run(&QueryBlock).await?;
    Ok(qemu::DISK_NODES
        .iter()
        .filter_map(|disk| {
            let id = format!("{disk}-dev");
            let d = devices.iter().find(|d| {
                d.qdev
                    .as_deref()
                    .is_some_and(|q| q == id || q.contains(&format!("/{id}/")))
            })?;
            Some((disk.to_string(), d.inserted.as_ref()?.node_name.clone()))
        })
        .collect())
}

/// Puts each disk back as it was before the take: the layer is the disk.
fn undo_take(taken: &[(PathBuf, PathBuf)]) {
    for (active, layer) in taken {
        if let Err(e) = std::fs::rename(layer, active) {
            tracing::error!(disk = %active.display(), error = %e, "cannot undo a snapshot's layer");
        }
    }
}

/// Reverts a stopped VM's disks to snapshot `name`: what was written since
/// is discarded; every snapshot stays.
pub async fn revert(dir: &VmDir, name: &str) -> Result<Snapshot, SnapshotError> {
    // The names the last QEMU opened files by would keep replaced ones alive.
    dir.remove_open_aliases();
    let mut snapshots = list(dir)?;
    let Some(snapshot) = snapshots.iter().find(|s| s.name == name).cloned() else {
        return Err(SnapshotError::NotFound(name.to_string()));
    };
    for disk in &snapshot.disks {
        let layer = layer_name(name, disk);
        qemu::create_disk(&active_disk(dir, disk), Some((Path::new(&layer), "qcow2")), None).await?;
    }
    // The next start resumes from the saved memory, or boots the disks.
    match snapshot.memory {
        Some(_) => memory::resume_at_next_start(dir, name)?,
        None => memory::clear_resume(dir),
    }
    set_current(&mut snapshots, Some(name));
    write(dir, &snapshots)?;
    Ok(Snapshot {
        current: true,
        ..snapshot
    })
}

/// Deletes snapshot `name` of a stopped VM; what it held is merged into
/// its children, so every other snapshot and the disks read as before.
pub async fn delete(dir: &VmDir, name: &str) -> Result<(), SnapshotError> {
    dir.remove_open_aliases();
    let mut snapshots = list(dir)?;
    let Some(doomed) = snapshots.iter().find(|s| s.name == name).cloned() else {
        return Err(SnapshotError::NotFound(name.to_string()));
    };
    for disk in &doomed.disks {
        let layer_file = layer_name(name, disk);
        let backing = backing_of(&dir.path.join(&layer_file)).await?;
        // Its dependents as the files say (a rebuilt root disk no longer is one).
        let mut candidates = vec![active_disk(dir, disk)];
        candidates.extend(
            snapshots
                .iter()
                .filter(|s| s.name != name && s.disks.contains(disk))
                .map(|s| dir.path.join(layer_name(&s.name, disk))),
        );
        for file in candidates.iter().filter(|f| f.exists()) {
            if backing_of(file).await?.is_some_and(|b| b.file == layer_file) {
                rebase(file, backing.as_ref()).await?;
            }
        }
    }
    for s in &mut snapshots {
        if s.parent.as_deref() == Some(name) {
            s.parent = doomed.parent.clone();
        }
    }
    snapshots.retain(|s| s.name != name);
    if doomed.current {
        set_current(&mut snapshots, doomed.parent.as_deref());
    }
    write(dir, &snapshots)?;
    if memory::pending_resume(dir).is_some_and(|(pending, _)| pending == name) {
        memory::clear_resume(dir);
    }
    let files = doomed.disks.iter().map(|d| layer_name(name, d));
    for file in files.chain(doomed.memory.is_some().then(|| memory::state_name(name))) {
        let path = dir.path.join(file);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a deleted snapshot's file");
        }
    }
    Ok(())
}

/// A qcow2's backing file as its header names it, with the format.
#[derive(Debug, Clone, PartialEq)]
pub struct Backing {
    pub file: String,
    pub format: String,
}

/// The backing file the header of the qcow2 at `path` names, if any.
pub async fn backing_of(path: &Path) -> Result<Option<Backing>, SnapshotError> {
    let info = qemu::image_info(path).await?;
    let Some(file) = info["backing-filename"].as_str() else {
        return Ok(None);
    };
    let format = info["backing-filename-format"].as_str().unwrap_or("qcow2");
    Ok(Some(Backing {
        file: file.to_string(),
        format: format.to_string(),
    }))
}

/// Points the qcow2 at `path` at `backing` (none: standalone) without
/// changing what it reads: what the old backing chain held and the new one
/// does not is copied into it first.
async fn rebase(path: &Path, backing: Option<&Backing>) -> Result<(), SnapshotError> {
    let mut args: Vec<&std::ffi::OsStr> = ["rebase", "-q", "-f", "qcow2"].map(std::ffi::OsStr::new).to_vec();
    match backing {
        Some(b) => args.extend([
            "-F".as_ref(),
            b.format.as_ref(),
            "-b".as_ref(),
            std::ffi::OsStr::new(&b.file),
        ]),
        None => args.extend::<[&std::ffi::OsStr; 2]>(["-b".as_ref(), "".as_ref()]),
    }
    args.push(path.as_os_str());
    qemu::qemu_img_output(&args).await?;
    Ok(())
}

mod memory;
pub use memory::{clear_resume, pending_resume, resume, take_with_memory, ResumeError};

#[cfg(test)]
mod tests;
