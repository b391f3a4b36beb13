//! NICs plugged into and out of a running QEMU to match the VM's spec.
//! Each NIC has a fixed slot: its PCI address and QEMU ids follow from it,
//! so what is plugged can be read back from QEMU after an agent restart.
//! Unplugging is a request to the guest (ACPI); the device, then its tap,
//! goes once the guest has released it, which a later pass notices.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use novacron_api::network::{nic_slot, plugged_as_specified, MAX_NICS};
use novacron_api::{NicStatus, Vm};
use novacron_qmp::commands::{DeviceAddVirtioNet, DeviceDel, NetdevAddTap, NetdevDel};
use novacron_qmp::{Qmp, QmpError};

use crate::network::{device_id, NetError};
use crate::node::NodeContext;

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("QEMU refused")]
    Qmp(#[from] QmpError),
    #[error("Cannot plumb the NIC")]
    Net(#[from] NetError),
}

/// How often an unplug request the guest has not acted on is repeated.
const UNPLUG_REPEAT: Duration = Duration::from_secs(5);
/// How long QEMU may take to answer a hot-plug: seconds while a TCG guest
/// boots (a timeout would tell a refusal from a success by neither).
pub const PLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// What the reconciler keeps between passes for one VM.
#[derive(Default)]
pub struct Plugged {
    /// NICs plugged as of the last pass; `None`: not read from QEMU yet.
    pub nics: Option<Vec<NicStatus>>,
    /// Unplug requests sent, by slot.
    unplug_sent: HashMap<u8, Instant>,
    /// The generation whose NICs could not be plugged (not retried until
    /// the spec changes), with why.
    pub failed: Option<(u64, String)>,
}

impl Plugged {
    /// Nothing to do: the NICs plugged are those of the spec.
    pub fn settled(&self, vm: &Vm) -> bool {
        self.unplug_sent.is_empty()
            && self
                .nics
                .as_ref()
                .is_some_and(|plugged| plugged_as_specified(&vm.spec.nics, plugged))
    }
}

/// One pass toward the spec's NICs: plugs what is missing, asks the guest
/// to release what is no longer wanted, and clears away devices it has
/// released. Returns the NICs plugged now.
pub async fn sync_nics(
    node: &NodeContext,
    vm: &Vm,
    qmp: &Qmp,
    state: &mut Plugged,
) -> Result<Vec<NicStatus>, HotplugError> {
    let id = &vm.metadata.id;
    let name = &vm.metadata.name;
    let devices: HashSet<String> = qmp.device_ids().await?.into_iter().collect();
    let local = node.net.nics_of(id);
    for slot in 0..MAX_NICS as u8 {
        let want = (0..vm.spec.nics.len()).find(|i| nic_slot(&vm.spec.nics, *i) == slot);
        let want_mac = want.and_then(|i| vm.spec.nics[i].mac.as_deref());
        let here = local.iter().find(|l| l.status.slot == slot);
        let plugged = devices.contains(&device_id(slot));
        match (want, plugged) {
            (Some(_), true) if here.is_some_and(|h| Some(h.status.mac.as_str()) == want_mac) => {
                state.unplug_sent.remove(&slot);
            }
            // Plugged, but its record here is lost: record it again.
            (Some(i), true) if here.is_none() => {
                node.net.attach_nic(&node.client, vm, i).await?;
            }
            (_, true) => {
                let due = state
                    .unplug_sent
                    .get(&slot)
                    .is_none_or(|t| t.elapsed() >= UNPLUG_REPEAT);
                if due {
                    match qmp.run(&DeviceDel { id: device_id(slot) }).await {
                        Ok(_) => tracing::info!(vm = %name, slot, "asked the guest to release a NIC"),
                        // A repeated request may be refused while the first is pending.
                        Err(e) => tracing::debug!(vm = %name, slot, error = %e, "device_del"),
                    }
                    state.unplug_sent.insert(slot, Instant::now());
                }
            }
            (want, false) => {
                state.unplug_sent.remove(&slot);
                if let Some(h) = here.filter(|h| Some(h.status.mac.as_str()) != want_mac) {
                    // The guest let the device go: its backend and tap follow.
                    let _ = qmp
                        .run(&NetdevDel {
                            id: format!("net{slot}"),
                        })
                        .await;
                    node.net.detach_nic(id, &h.tap).await;
                    tracing::info!(vm = %name, slot, mac = %h.status.mac, "NIC unplugged");
                }
                if let Some(i) = want {
                    plug(node, vm, qmp, i).await?;
                }
            }
        }
    }
    let devices: HashSet<String> = qmp.device_ids().await?.into_iter().collect();
    let mut now: Vec<NicStatus> = node
        .net
        .nics_of(id)
        .into_iter()
        .filter(|l| devices.contains(&device_id(l.status.slot)))
        .map(|l| l.status)
        .collect();
    now.sort_by_key(|n| n.slot);
    Ok(now)
}

/// Plumbs `vm.spec.nics[i]` here and hot-adds it to QEMU.
async fn plug(node: &NodeContext, vm: &Vm, qmp: &Qmp, i: usize) -> Result<(), HotplugError> {
    let nic = node.net.attach_nic(&node.client, vm, i).await?;
    // A backend left by an earlier attempt whose device_add failed.
    let _ = qmp.run(&NetdevDel { id: nic.netdev_id() }).await;
    let device = DeviceAddVirtioNet {
        driver: "virtio-net-pci",
        id: nic.device_id(),
        netdev: nic.netdev_id(),
        mac: nic.mac.clone(),
        host_mtu: nic.mtu,
        addr: nic.pci_addr(),
    };
    let added = match qmp.run(&NetdevAddTap::new(nic.netdev_id(), &nic.tap)).await {
        Ok(_) => qmp.run_within(&device, PLUG_TIMEOUT).await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = added {
        // Nothing half-made stays: no backend, no tap.
        let _ = qmp.run(&NetdevDel { id: nic.netdev_id() }).await;
        node.net.detach_nic(&vm.metadata.id, &nic.tap).await;
        return Err(e.into());
    }
    tracing::info!(vm = %vm.metadata.name, slot = nic.slot, mac = %nic.mac, tap = %nic.tap, "NIC hot-plugged");
    Ok(())
}
