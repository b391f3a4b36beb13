//! Volumes on this node. An attached volume's disk lives in its VM's
//! directory (so it moves with the VM like the root disk); a detached one
//! rests in the node's pool, `DATA/volumes/ID.qcow2`, until a VM attaches it
//! again: a VM here takes it from the pool, one elsewhere fetches it from
//! this agent and has the pool copy deleted.
//!
//! While QEMU runs, each volume is a qcow2 block node `volN` under a
//! virtio-blk device `volN-dev` at a fixed PCI slot (N = the attachment's
//! slot), read back from QEMU on every pass so an agent restart loses
//! nothing. Detaching asks the guest to release the device; its node and
//! file follow once it has.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_api::error::chain;
use novacron_api::volume::{self, AttachedVolume, VolumeAttachment, MAX_VOLUMES};
use novacron_api::{Node, Vm};
use novacron_qmp::commands::{
    BlockResize, BlockdevAddQcow2, BlockdevDel, DeviceAddVirtioBlk, DeviceDel, QueryNamedBlockNodes,
};
use novacron_qmp::{Qmp, QmpError};

use crate::node::NodeContext;
use crate::qemu::{self, QemuError, VmDir};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("QEMU refused")]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error("Cannot read node {0:?}")]
    Node(String, #[source] novacron_client::ClientError),
    #[error("Cannot fetch volume {volume:?} from node {node:?}")]
    Fetch {
        volume: String,
        node: String,
        #[source]
        source: crate::peers::FetchError,
    },
    #[error("The data of volume {0:?} should be in this node's pool, but is not")]
    Missing(String),
    #[error("Cannot drop the backup change tracking of volume {0:?}")]
    Tracking(String, #[source] crate::backup::BackupError),
    #[error("Cannot move volume {volume:?}")]
    Io {
        volume: String,
        #[source]
        source: std::io::Error,
    },
}

/// How often an unplug request the guest has not acted on is repeated.
const UNPLUG_REPEAT: Duration = Duration::from_secs(5);

/// What the reconciler keeps between passes for one running VM.
#[derive(Default)]
pub struct VolumePlugs {
    /// Unplug requests sent, by slot.
    unplug_sent: HashMap<u8, Instant>,
}

/// The pool file of volume `id`.
pub fn pool_file(node: &NodeContext, id: &str) -> PathBuf {
    node.volumes_root.join(format!("{id}.qcow2"))
}

fn moved(volume: &str) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        volume: volume.to_string(),
        source,
    }
}

/// Puts the disk of `a` in the VM's directory, at least at its size: from
/// this node's pool, from the node that has it, or blank for a new volume.
pub async fn obtain(node: &NodeContext, dir: &VmDir, a: &VolumeAttachment) -> Result<(), VolumeError> {
    let path = dir.volume(&a.id);
    if !path.exists() {
        std::fs::create_dir_all(&dir.path).map_err(moved(&a.volume))?;
        let pooled = pool_file(node, &a.id);
        match a.from_node.as_deref() {
            None => qemu::create_disk(&path, None, Some(a.size_mib)).await?,
            Some(here) if here == node.name => {
                if !pooled.exists() {
                    return Err(VolumeError::Missing(a.volume.clone()));
                }
                std::fs::rename(&pooled, &path).map_err(moved(&a.volume))?;
            }
            Some(there) => {
                // A copy left here earlier is stale: the data is on `there`.
                let _ = std::fs::remove_file(&pooled);
                fetch(node, there, a, &path).await?;
            }
        }
        // The change tracking it brings counted from its last VM's
        // backups, not this one's: this VM's first backup of it is full.
        if a.from_node.is_some() {
            crate::backup::stopped::drop_tracking_in_file(&path)
                .await
                .map_err(|e| VolumeError::Tracking(a.volume.clone(), e))?;
        }
        tracing::info!(volume = %a.volume, from = ?a.from_node, "volume disk in place");
    }
    if qemu::virtual_size(&path).await? < a.size_mib * MIB {
        qemu::grow_disk(&path, a.size_mib).await?;
    }
    Ok(())
}

/// Copies volume `a` from the pool of node `there` to `path`, then has
/// that copy deleted: a volume's data is on one node only.
async fn fetch(node: &NodeContext, there: &str, a: &VolumeAttachment, path: &Path) -> Result<(), VolumeError> {
    let peer: Node = node
        .client
        .get(there)
        .await
        .map_err(|e| VolumeError::Node(there.to_string(), e))?;
    let url = format!("{}/agent/v1/volumes/{}", peer.spec.address.trim_end_matches('/'), a.id);
    let secret = node.agent_secret();
    let bytes = crate::peers::download(&node.peers, &url, &secret, path)
        .await
        .map_err(|source| VolumeError::Fetch {
            volume: a.volume.clone(),
            node: there.to_string(),
            source,
        })?;
    tracing::info!(volume = %a.volume, from = %there, bytes, "volume fetched");
    let deleted = node
        .peers
        .delete(&url)
        .header(novacron_api::AGENT_SECRET_HEADER, &secret)
        .send()
        .await;
    match deleted {
        Ok(r) if r.status().is_success() => {}
        // A stale copy costs space, not correctness: the server points at this node now.
        Ok(r) => {
            tracing::warn!(volume = %a.volume, node = %there, status = %r.status(), "cannot delete the fetched volume's old copy")
        }
        Err(e) => {
            tracing::warn!(volume = %a.volume, node = %there, error = %e, "cannot delete the fetched volume's old copy")
        }
    }
    Ok(())
}

/// Moves the disk of volume `id` from the VM's directory to the pool.
pub fn release(node: &NodeContext, dir: &VmDir, id: &str) -> Result<(), VolumeError> {
    let path = dir.volume(id);
    if path.exists() {
        std::fs::create_dir_all(&node.volumes_root).map_err(moved(id))?;
        std::fs::rename(&path, pool_file(node, id)).map_err(moved(id))?;
        tracing::info!(volume_id = %id, "volume moved to the pool");
    }
    Ok(())
}

/// Moves every volume disk of a VM directory about to be removed to the pool.
pub fn rescue_all(node: &NodeContext, dir: &VmDir) {
    for id in dir.volume_ids() {
        if let Err(e) = release(node, dir, &id) {
            tracing::error!(volume_id = %id, error = %chain(&e), "cannot keep a removed VM's volume");
        }
    }
}

/// The name to report for volume `id`: the spec's, else the last report's.
fn name_of(vm: &Vm, id: &str) -> String {
    vm.spec
        .volumes
        .iter()
        .map(|a| (&a.id, &a.volume))
        .chain(vm.status.volumes.iter().map(|h| (&h.id, &h.volume)))
        .find(|(i, _)| *i == id)
        .map_or_else(|| id.to_string(), |(_, n)| n.clone())
}

/// The volumes whose disks are in the VM's directory, at the spec's sizes
/// (what is known without asking qemu-img): after a change that failed.
pub fn held_in(vm: &Vm, dir: &VmDir) -> Vec<AttachedVolume> {
    dir.volume_ids()
        .into_iter()
        .filter_map(|id| {
            let (slot, size_mib) = match vm.spec.volumes.iter().find(|a| a.id == id) {
                Some(a) => (a.slot, a.size_mib),
                None => vm
                    .status
                    .volumes
                    .iter()
                    .find(|h| h.id == id)
                    .map(|h| (h.slot, h.size_mib))?,
            };
            Some(AttachedVolume {
                volume: name_of(vm, &id),
                slot,
                size_mib,
                plugged: false,
                id,
            })
        })
        .collect()
}

/// A stopped VM: the spec's volume disks in its directory (at their sizes),
/// the others back in the pool. Returns what the directory holds.
pub async fn sync_stopped(node: &NodeContext, vm: &Vm, dir: &VmDir) -> Result<Vec<AttachedVolume>, VolumeError> {
    let wanted: HashSet<&str> = vm.spec.volumes.iter().map(|a| a.id.as_str()).collect();
    for id in dir.volume_ids() {
        if !wanted.contains(id.as_str()) {
            release(node, dir, &id)?;
        }
    }
    let mut held = Vec::new();
    for a in &vm.spec.volumes {
        obtain(node, dir, a).await?;
        held.push(AttachedVolume {
            volume: a.volume.clone(),
            id: a.id.clone(),
            slot: a.slot,
            size_mib: qemu::virtual_size(&dir.volume(&a.id)).await? / MIB,
            plugged: false,
        });
    }
    Ok(held)
}

/// Volume block nodes in QEMU: slot -> (volume id, size in bytes).
async fn plugged_nodes(qmp: &Qmp) -> Result<HashMap<u8, (String, u64)>, QmpError> {
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true }).await?;
    Ok((0..MAX_VOLUMES as u8)
        .filter_map(|slot| {
            let n = nodes
                .iter()
                .find(|n| n.node_name.as_deref() == Some(volume::node_name(slot).as_str()))?;
            let file = Path::new(&n.file).file_name()?.to_str()?;
            let id = file.strip_prefix("vol-")?.strip_suffix(".qcow2")?;
            Some((slot, (id.to_string(), n.image.virtual_size)))
        })
        .collect())
}

/// One pass toward the spec's volumes on a running VM: plugs what is
/// missing, grows what is smaller than asked, asks the guest to release
/// what is no longer wanted and clears away what it has released. Returns
/// the volumes QEMU has now.
pub async fn sync_running(
    node: &NodeContext,
    vm: &Vm,
    dir: &VmDir,
    qmp: &Qmp,
    plugs: &mut VolumePlugs,
) -> Result<Vec<AttachedVolume>, VolumeError> {
    let name = &vm.metadata.name;
    let devices: HashSet<String> = qmp.device_ids().await?.into_iter().collect();
    let nodes = plugged_nodes(qmp).await?;
    for slot in 0..MAX_VOLUMES as u8 {
        let want = vm.spec.volumes.iter().find(|a| a.slot == slot);
        let plugged = devices.contains(&volume::device_id(slot));
        match (want, nodes.get(&slot)) {
            (Some(a), Some((id, size))) if *id == a.id => {
                plugs.unplug_sent.remove(&slot);
                if !plugged {
                    // A node left by a device_add that failed.
                    add_device(qmp, a).await?;
                }
                if *size < a.size_mib * MIB {
                    qmp.run(&BlockResize {
                        node_name: volume::node_name(slot),
                        size: a.size_mib * MIB,
                    })
                    .await?;
                    tracing::info!(vm = %name, volume = %a.volume, size_mib = a.size_mib, "volume grown online");
                }
            }
            (_, Some((id, _))) if plugged => {
                let due = plugs
                    .unplug_sent
                    .get(&slot)
                    .is_none_or(|t| t.elapsed() >= UNPLUG_REPEAT);
                if due {
                    match qmp
                        .run(&DeviceDel {
                            id: volume::device_id(slot),
                        })
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(vm = %name, slot, volume_id = %id, "asked the guest to release a volume")
                        }
                        Err(e) => tracing::debug!(vm = %name, slot, error = %e, "device_del"),
                    }
                    plugs.unplug_sent.insert(slot, Instant::now());
                }
            }
            (want, Some((id, _))) => {
                // The guest let the device go: its node, then its file follow.
                let deleted = qmp
                    .run(&BlockdevDel {
                        node_name: volume::node_name(slot),
                    })
                    .await;
                match deleted {
                    Ok(_) => {}
                    // The device leaves the tree before QEMU frees it (RCU),
                    // and with it its hold on the node: the next pass.
                    Err(QmpError::Command { desc, .. }) if desc.contains("is in use") => {
                        tracing::debug!(vm = %name, slot, "volume node still held by its departing device");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                plugs.unplug_sent.remove(&slot);
                release(node, dir, id)?;
                tracing::info!(vm = %name, slot, volume_id = %id, "volume unplugged");
                if let Some(a) = want {
                    plug(node, dir, qmp, a).await?;
                }
            }
            (Some(a), None) => plug(node, dir, qmp, a).await?,
            (None, None) => {}
        }
    }
    let devices: HashSet<String> = qmp.device_ids().await?.into_iter().collect();
    let mut now: Vec<AttachedVolume> = plugged_nodes(qmp)
        .await?
        .into_iter()
        .map(|(slot, (id, size))| AttachedVolume {
            volume: name_of(vm, &id),
            id,
            slot,
            size_mib: size / MIB,
            plugged: devices.contains(&volume::device_id(slot)),
        })
        .collect();
    now.sort_by_key(|v| v.slot);
    // A disk brought here for a plug that failed, and detached since.
    for id in dir.volume_ids() {
        if !vm.spec.volumes.iter().any(|a| a.id == id) && !now.iter().any(|v| v.id == id) {
            release(node, dir, &id)?;
        }
    }
    Ok(now)
}

/// Brings volume `a` here and hot-adds it: its block node, then the device.
async fn plug(node: &NodeContext, dir: &VmDir, qmp: &Qmp, a: &VolumeAttachment) -> Result<(), VolumeError> {
    obtain(node, dir, a).await?;
    let path = dir.volume(&a.id);
    qmp.run(&BlockdevAddQcow2::new(
        volume::node_name(a.slot),
        path.display().to_string(),
    ))
    .await?;
    if let Err(e) = add_device(qmp, a).await {
        // Nothing half-made stays: no node without its device.
        let _ = qmp
            .run(&BlockdevDel {
                node_name: volume::node_name(a.slot),
            })
            .await;
        return Err(e.into());
    }
    tracing::info!(vm_volume = %a.volume, slot = a.slot, "volume hot-plugged");
    Ok(())
}

async fn add_device(qmp: &Qmp, a: &VolumeAttachment) -> Result<(), QmpError> {
    qmp.run_within(
        &DeviceAddVirtioBlk {
            driver: "virtio-blk-pci",
            id: volume::device_id(a.slot),
            drive: volume::node_name(a.slot),
            serial: volume::serial(&a.id),
            addr: volume::pci_addr(a.slot),
        },
        crate::hotplug::PLUG_TIMEOUT,
    )
    .await
    .map(drop)
}
