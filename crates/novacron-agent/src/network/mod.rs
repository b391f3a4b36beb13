//! VM networking on this host. A network is one L2 segment across hosts:
//! here, a Linux bridge (`ncbr<VNI>`) holding the gateway address, a VXLAN
//! device (`ncvx<VNI>`, UDP 4789) whose all-zero forwarding entries send
//! broadcasts to every peer host (head-end replication; unicast is learnt
//! from what arrives), and a tap per VM NIC. Everything lives in the
//! kernel and in daemonized dnsmasqs, so guests keep their network through
//! an agent restart; every step checks what exists first, so re-running it
//! re-adopts instead of rebuilding.
//!
//! The gateway address and MAC are the same on every host: a guest's
//! traffic leaves through whichever host it runs on, and its ARP entry for
//! the gateway stays right when it moves.

mod dhcp;
mod firewall;
mod link;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use novacron_api::error::chain;
use novacron_api::network::{nic_slot, Mac, Subnet};
use novacron_api::{Network, NicStatus, Vm};
use novacron_client::{Client, ClientError};
use sha2::{Digest, Sha256};

use self::dhcp::{Dhcp, DhcpConfig};
use self::firewall::{HostNetwork, HostNic, HostRules};

/// VXLAN's IANA port.
pub const VXLAN_PORT: u16 = 4789;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("Unexpected output from `{what}`: {message}")]
    Parse { what: &'static str, message: String },
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read network {name:?}")]
    Network {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("This node has no underlay address for VXLAN (agent --underlay-ip)")]
    NoUnderlay,
    #[error("{0}")]
    Invalid(String),
}

/// A VM NIC as QEMU gets it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttachedNic {
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    /// PCI slot (see [`AttachedNic::pci_addr`]) and QEMU ids `net<slot>`, `nic<slot>`.
    #[serde(default)]
    pub slot: u8,
}

impl AttachedNic {
    pub fn netdev_id(&self) -> String {
        format!("net{}", self.slot)
    }
    pub fn device_id(&self) -> String {
        device_id(self.slot)
    }
    /// Slots 0x10-0x17 of the PCI bus: clear of what QEMU places by itself.
    pub fn pci_addr(&self) -> String {
        format!("{:#x}", 0x10 + u32::from(self.slot))
    }
}

/// QEMU's id of the NIC in `slot`.
pub fn device_id(slot: u8) -> String {
    format!("nic{slot}")
}

/// A NIC of a VM plumbed on this host: its tap, and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalNic {
    pub tap: String,
    pub status: NicStatus,
}

pub fn bridge_name(vni: u32) -> String {
    format!("ncbr{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("ncvx{vni}")
}

/// Taps of one VM on one node start with this (12 characters; interface
/// names hold 15). The node is in it so that a VM's taps on the source
/// and the target of a migration never share a name.
pub(crate) fn tap_prefix(vm_id: &str, node: &str) -> String {
    let digest = Sha256::digest(format!("{vm_id}/{node}").as_bytes());
    format!("nc{}", &hex::encode(digest)[..10])
}

pub struct Overlay {
    node: String,
    underlay: Option<Ipv4Addr>,
    /// `<data dir>/networks`: one directory per network (its dnsmasq).
    dir: PathBuf,
    peers: parking_lot::Mutex<BTreeMap<String, Ipv4Addr>>,
    /// Every security group, by name (from the server's watch).
    groups: parking_lot::Mutex<BTreeMap<String, novacron_api::SecurityGroup>>,
    /// One change to the kernel's networking at a time.
    changing: tokio::sync::Mutex<()>,
}

impl Overlay {
    pub fn new(node: &str, underlay: Option<Ipv4Addr>, dir: PathBuf) -> Overlay {
        Overlay {
            node: node.to_string(),
            underlay,
            dir,
            peers: Default::default(),
            groups: Default::default(),
            changing: Default::default(),
        }
    }

    fn dhcp(&self, vni: u32) -> Dhcp {
        Dhcp::new(self.network_dir(vni))
    }

    /// A network's files on this host (its dnsmasq, what it is).
    fn network_dir(&self, vni: u32) -> PathBuf {
        self.dir.join(vni.to_string())
    }

    /// What each NIC here may send as, one file per tap (the rules are
    /// rebuilt from these after an agent restart).
    fn nics_dir(&self) -> PathBuf {
        self.dir.join("nics")
    }

    fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), NetError> {
        let body = serde_json::to_vec_pretty(value).map_err(|e| NetError::Invalid(e.to_string()))?;
        write_whole(path, &body)
    }

    /// Plumbs every NIC of `vm` on this host (networks, taps, DHCP
    /// reservations) and says what QEMU needs; NICs removed from the spec
    /// while the VM did not run go. Idempotent.
    pub async fn attach(&self, client: &Client, vm: &Vm) -> Result<Vec<AttachedNic>, NetError> {
        if vm.spec.nics.is_empty() && self.records_of(&vm.metadata.id).is_empty() {
            return Ok(Vec::new());
        }
        let _one_at_a_time = self.changing.lock().await;
        self.prune_locked(vm).await;
        let mut attached = Vec::new();
        for i in 0..vm.spec.nics.len() {
            attached.push(self.plumb(client, vm, i).await?);
        }
        self.sync_rules().await?;
        Ok(attached)
    }

    /// Plumbs `vm.spec.nics[i]` alone (a NIC hot-added to a running VM).
    pub async fn attach_nic(&self, client: &Client, vm: &Vm, i: usize) -> Result<AttachedNic, NetError> {
        let _one_at_a_time = self.changing.lock().await;
        let nic = self.plumb(client, vm, i).await?;
        self.sync_rules().await?;
        Ok(nic)
    }

    /// The network, tap, record and DHCP reservation of one NIC.
    async fn plumb(&self, client: &Client, vm: &Vm, i: usize) -> Result<AttachedNic, NetError> {
        let Some(nic) = vm.spec.nics.get(i) else {
            return Err(NetError::Invalid(format!("VM {} has no NIC {i}", vm.metadata.name)));
        };
        let net: Network = client.get(&nic.network).await.map_err(|source| NetError::Network {
            name: nic.network.clone(),
            source,
        })?;
        let (Some(ip), Some(mac)) = (nic.ip.as_deref(), nic.mac.as_deref()) else {
            return Err(NetError::Invalid(format!(
                "NIC {i} of VM {} has no address from the server",
                vm.metadata.name
            )));
        };
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| NetError::Invalid(format!("NIC {i}: {ip:?} is not an IPv4 address")))?;
        let mac: Mac = mac.parse().map_err(|e| NetError::Invalid(format!("NIC {i}: {e}")))?;
        let slot = nic_slot(&vm.spec.nics, i);
        self.ensure_network(&net).await?;
        let tap = format!("{}{slot}", tap_prefix(&vm.metadata.id, &self.node));
        let record = HostNic {
            tap: tap.clone(),
            vni: net.status.vni,
            mac: mac.to_string(),
            ip,
            groups: nic.security_groups.clone(),
            vm_name: vm.metadata.name.clone(),
            network: net.metadata.name.clone(),
            dhcp: net.spec.dhcp,
            slot,
        };
        // Its guard is in place (sync_rules) before QEMU opens the tap.
        Self::write_json(&self.nics_dir().join(&tap), &record)?;
        ensure_tap(&tap, &bridge_name(net.status.vni), net.spec.mtu).await?;
        self.write_dhcp_hosts(&vm.metadata.id, net.status.vni)?;
        Ok(AttachedNic {
            tap,
            mac: mac.to_string(),
            mtu: net.spec.mtu,
            slot,
        })
    }

    /// The NICs of a VM on this host, from their records.
    fn records_of(&self, vm_id: &str) -> Vec<HostNic> {
        let prefix = tap_prefix(vm_id, &self.node);
        std::fs::read_dir(self.nics_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| serde_json::from_slice::<HostNic>(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// The NICs of a VM plumbed on this host.
    pub fn nics_of(&self, vm_id: &str) -> Vec<LocalNic> {
        self.records_of(vm_id)
            .into_iter()
            .map(|r| LocalNic {
                tap: r.tap,
                status: NicStatus {
                    network: r.network,
                    ip: r.ip.to_string(),
                    mac: r.mac,
                    slot: r.slot,
                },
            })
            .collect()
    }

    /// Makes a VM's DHCP reservations on network `vni` those of its NICs there.
    fn write_dhcp_hosts(&self, vm_id: &str, vni: u32) -> Result<(), NetError> {
        let entries: Vec<(String, Ipv4Addr, String)> = self
            .records_of(vm_id)
            .into_iter()
            .filter(|r| r.vni == vni && r.dhcp)
            .map(|r| (r.mac, r.ip, r.vm_name))
            .collect();
        let dhcp = self.dhcp(vni);
        if entries.is_empty() {
            dhcp.remove_host(vm_id);
            Ok(())
        } else {
            dhcp.set_host(vm_id, &entries)
        }
    }

    /// Removes one NIC of a VM here (after QEMU let go of its tap).
    pub async fn detach_nic(&self, vm_id: &str, tap: &str) {
        let _one_at_a_time = self.changing.lock().await;
        self.unplumb(vm_id, tap).await;
        if let Err(e) = self.sync_rules().await {
            tracing::warn!(vm_id, error = %chain(&e), "cannot update the network rules");
        }
    }

    /// The tap, record and DHCP reservation of one NIC, and its network
    /// when no VM here uses it any more.
    async fn unplumb(&self, vm_id: &str, tap: &str) {
        let record = self.records_of(vm_id).into_iter().find(|r| r.tap == tap);
        match link::link(tap).await {
            Ok(Some(_)) => {
                if let Err(e) = link::delete_link(tap).await {
                    tracing::warn!(vm_id, tap, error = %chain(&e), "cannot remove tap");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(vm_id, tap, error = %chain(&e), "cannot look up tap"),
        }
        let _ = std::fs::remove_file(self.nics_dir().join(tap));
        if let Some(r) = record {
            if let Err(e) = self.write_dhcp_hosts(vm_id, r.vni) {
                tracing::warn!(vm_id, tap, error = %chain(&e), "cannot update DHCP reservations");
            }
            self.teardown_if_unused(r.vni, &self.dhcp(r.vni)).await;
        }
        tracing::info!(vm_id, tap, "NIC removed from this host");
    }

    /// Removes the NICs of a VM that are no longer in its spec (changed
    /// while it did not run).
    pub async fn prune(&self, vm: &Vm) {
        let _one_at_a_time = self.changing.lock().await;
        if self.prune_locked(vm).await {
            if let Err(e) = self.sync_rules().await {
                tracing::warn!(vm = %vm.metadata.name, error = %chain(&e), "cannot update the network rules");
            }
        }
    }

    async fn prune_locked(&self, vm: &Vm) -> bool {
        let nics = &vm.spec.nics;
        let wanted = |r: &HostNic| {
            (0..nics.len()).any(|i| nic_slot(nics, i) == r.slot && nics[i].mac.as_deref() == Some(r.mac.as_str()))
        };
        let mut pruned = false;
        for r in self.records_of(&vm.metadata.id) {
            if !wanted(&r) {
                self.unplumb(&vm.metadata.id, &r.tap).await;
                pruned = true;
            }
        }
        pruned
    }

    /// Removes a VM's taps and DHCP reservations here, and the networks no
    /// VM here uses any more. Failures are logged: leftovers are removed
    /// by the next detach or network teardown.
    pub async fn detach(&self, vm_id: &str) {
        let _one_at_a_time = self.changing.lock().await;
        let prefix = tap_prefix(vm_id, &self.node);
        let links = match link::links().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(vm_id, error = %chain(&e), "cannot list links to remove a VM's taps");
                return;
            }
        };
        for l in links.iter().filter(|l| l.ifname.starts_with(&prefix)) {
            if let Err(e) = link::delete_link(&l.ifname).await {
                tracing::warn!(vm_id, tap = %l.ifname, error = %chain(&e), "cannot remove tap");
            }
        }
        for entry in std::fs::read_dir(self.nics_dir()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for vni in self.networks_here(&links) {
            let dhcp = self.dhcp(vni);
            dhcp.remove_host(vm_id);
            self.teardown_if_unused(vni, &dhcp).await;
        }
        if let Err(e) = self.sync_rules().await {
            tracing::warn!(vm_id, error = %chain(&e), "cannot update the network rules");
        }
    }

    /// Makes the nftables rules those of the networks and NICs here.
    async fn sync_rules(&self) -> Result<(), NetError> {
        let links = link::links().await?;
        let networks: Vec<HostNetwork> = self
            .networks_here(&links)
            .into_iter()
            .map(|vni| {
                let path = self.network_dir(vni).join("network.json");
                std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    // Without its file the network is not routed (no NAT).
                    .unwrap_or_else(|| {
                        tracing::warn!(vni, path = %path.display(), "no record of the network here; it gets no NAT");
                        HostNetwork {
                            vni,
                            subnet: String::new(),
                            nat: false,
                        }
                    })
            })
            .collect();
        if networks.is_empty() {
            return firewall::remove().await;
        }
        let taps: std::collections::HashSet<&str> = links.iter().map(|l| l.ifname.as_str()).collect();
        let nics: Vec<HostNic> = std::fs::read_dir(self.nics_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice::<HostNic>(&std::fs::read(e.path()).ok()?).ok())
            .filter(|n| taps.contains(n.tap.as_str()))
            .collect();
        let groups = self.groups.lock().clone();
        firewall::apply(&HostRules {
            networks: &networks,
            nics: &nics,
            groups: &groups,
        })
        .await
    }

    /// VNIs of the networks with a bridge here.
    fn networks_here(&self, links: &[link::Link]) -> Vec<u32> {
        let mut vnis: Vec<u32> = links
            .iter()
            .filter_map(|l| l.ifname.strip_prefix("ncbr")?.parse().ok())
            .collect();
        vnis.sort();
        vnis
    }

    /// Removes a network from this host once no tap is on its bridge.
    async fn teardown_if_unused(&self, vni: u32, dhcp: &Dhcp) {
        let bridge = bridge_name(vni);
        let Ok(links) = link::links().await else {
            return;
        };
        let vxlan = vxlan_name(vni);
        let in_use = links
            .iter()
            .any(|l| l.master.as_deref() == Some(bridge.as_str()) && l.ifname != vxlan);
        if in_use || !dhcp.hosts().is_empty() {
            return;
        }
        dhcp.stop();
        for dev in [vxlan, bridge] {
            if let Err(e) = link::delete_link(&dev).await {
                tracing::warn!(dev, error = %chain(&e), "cannot remove a network's device");
            }
        }
        tracing::info!(vni, "network left this host");
    }

    /// The bridge (with the gateway address), the VXLAN device and its
    /// peers, and dnsmasq, for one network.
    async fn ensure_network(&self, net: &Network) -> Result<(), NetError> {
        let underlay = self.underlay.ok_or(NetError::NoUnderlay)?;
        let vni = net.status.vni;
        let subnet: Subnet = net.subnet().map_err(|e| NetError::Invalid(e.to_string()))?;
        let gateway = net.gateway().map_err(|e| NetError::Invalid(e.to_string()))?;
        let (bridge, vxlan) = (bridge_name(vni), vxlan_name(vni));
        let mtu = net.spec.mtu.to_string();
        let record = HostNetwork {
            vni,
            subnet: subnet.to_string(),
            nat: net.spec.nat,
        };
        Self::write_json(&self.network_dir(vni).join("network.json"), &record)?;
        if link::link(&bridge).await?.is_none() {
            link::ip(&["link", "add", "name", &bridge, "type", "bridge"]).await?;
            let mac = Mac::gateway(vni).to_string();
            link::ip(&["link", "set", "dev", &bridge, "address", &mac, "mtu", &mtu]).await?;
            tracing::info!(network = %net.metadata.name, vni, bridge, "created bridge");
        }
        let cidr = format!("{gateway}/{}", subnet.prefix());
        if !link::addresses(&bridge).await?.contains(&(gateway, subnet.prefix())) {
            link::ip(&["addr", "add", &cidr, "dev", &bridge]).await?;
        }
        link::ip(&["link", "set", "dev", &bridge, "up"]).await?;
        if link::link(&vxlan).await?.is_none() {
            let (vni_s, local, port) = (vni.to_string(), underlay.to_string(), VXLAN_PORT.to_string());
            link::ip(&[
                "link", "add", &vxlan, "type", "vxlan", "id", &vni_s, "local", &local, "dstport", &port,
            ])
            .await?;
            tracing::info!(network = %net.metadata.name, vni, vxlan, "created VXLAN device");
        }
        link::ip(&["link", "set", "dev", &vxlan, "mtu", &mtu, "master", &bridge, "up"]).await?;
        self.sync_flood(&vxlan).await?;
        if net.spec.dhcp {
            self.dhcp(vni)
                .ensure(&DhcpConfig {
                    bridge: &bridge,
                    network: subnet.network(),
                    netmask: subnet.netmask(),
                    gateway,
                    mtu: net.spec.mtu,
                })
                .await?;
        }
        Ok(())
    }

    /// Makes a VXLAN device's flood entries the peer list (without this host).
    async fn sync_flood(&self, vxlan: &str) -> Result<(), NetError> {
        let want: Vec<Ipv4Addr> = {
            let peers = self.peers.lock();
            let mut v: Vec<Ipv4Addr> = peers
                .values()
                .copied()
                .filter(|ip| Some(*ip) != self.underlay)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let have = link::flood_destinations(vxlan).await?;
        for peer in want.iter().filter(|p| !have.contains(p)) {
            link::add_flood(vxlan, *peer).await?;
        }
        for gone in have.iter().filter(|p| !want.contains(p)) {
            link::remove_flood(vxlan, *gone).await?;
        }
        Ok(())
    }

    /// Takes the security groups as they are now and applies them here.
    pub async fn set_groups(&self, groups: BTreeMap<String, novacron_api::SecurityGroup>) {
        *self.groups.lock() = groups;
        let _one_at_a_time = self.changing.lock().await;
        if let Err(e) = self.sync_rules().await {
            tracing::warn!(error = %chain(&e), "cannot apply security groups");
        }
    }

    /// Takes a new peer list (node name to underlay address) and applies it
    /// to every network here.
    pub async fn set_peers(&self, peers: &BTreeMap<String, String>) {
        let parsed: BTreeMap<String, Ipv4Addr> = peers
            .iter()
            .filter(|(node, _)| **node != self.node)
            .filter_map(|(node, ip)| match ip.parse() {
                Ok(ip) => Some((node.clone(), ip)),
                Err(_) => {
                    tracing::warn!(node, ip, "peer underlay address is not IPv4; ignored");
                    None
                }
            })
            .collect();
        *self.peers.lock() = parsed;
        let _one_at_a_time = self.changing.lock().await;
        let links = match link::links().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot list links to update VXLAN peers");
                return;
            }
        };
        for l in links.iter().filter(|l| l.ifname.starts_with("ncvx")) {
            if let Err(e) = self.sync_flood(&l.ifname).await {
                tracing::warn!(vxlan = %l.ifname, error = %chain(&e), "cannot update VXLAN peers");
            }
        }
    }
}

/// Writes a file whole, then renames it into place: a reader (dnsmasq, a
/// restarted agent) never sees half of it.
fn write_whole(path: &std::path::Path, body: &[u8]) -> Result<(), NetError> {
    let io = |source| NetError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A persistent tap (it outlives QEMU, so a restarted VM finds it) on the bridge.
async fn ensure_tap(tap: &str, bridge: &str, mtu: u32) -> Result<(), NetError> {
    let existing = link::link(tap).await?;
    if existing.is_none() {
        link::ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    }
    let ok = existing
        .is_some_and(|l| l.master.as_deref() == Some(bridge) && l.mtu == mtu && l.flags.iter().any(|f| f == "UP"));
    if !ok {
        let mtu = mtu.to_string();
        link::ip(&["link", "set", "dev", tap, "mtu", &mtu, "master", bridge, "up"]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        let tap = format!("{}{}", tap_prefix("6f1c0d55-8f43-4c1e-9a7e-000000000000", "node-1"), 7);
        assert!(tap.len() <= 15, "{tap}");
        assert_ne!(tap_prefix("a", "node-1"), tap_prefix("a", "node-2"));
        assert!(bridge_name(16_777_215).len() <= 15);
        assert!(vxlan_name(16_777_215).len() <= 15);
    }
}
