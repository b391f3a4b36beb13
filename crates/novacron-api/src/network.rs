//! Virtual networks: one L2 segment across hosts (a bridge and a VXLAN
//! device per host), the addresses the server hands out on it, and the
//! underlay addresses hosts reach each other on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::types::Metadata;

/// VXLAN header, UDP, outer IPv4 and Ethernet: what the overlay adds to
/// each frame, taken off the underlay's 1500 bytes for the guest's MTU.
pub const VXLAN_OVERHEAD: u32 = 50;
pub const DEFAULT_GUEST_MTU: u32 = 1500 - VXLAN_OVERHEAD;
pub const MIN_MTU: u32 = 576;
/// A 9000-byte jumbo underlay less the VXLAN overhead.
pub const MAX_MTU: u32 = 9000 - VXLAN_OVERHEAD;
/// VNIs the server hands out (24-bit; low numbers are left to other users of VXLAN).
pub const VNI_RANGE: std::ops::RangeInclusive<u32> = 4096..=16_777_215;
/// NICs one VM may have.
pub const MAX_NICS: usize = 8;
/// The smallest and largest subnets: /16 keeps the allocation scan short,
/// /29 leaves five addresses after network, gateway and broadcast.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 29;

/// An IPv4 subnet, `10.20.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }
    /// An address a NIC or the gateway may have: inside, neither the
    /// network nor the broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
    /// Host addresses in order, from the first after the network address.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a subnet in CIDR form (e.g. 10.20.0.0/24)"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-32)"))?;
        let subnet = Subnet { network: addr, prefix };
        if u32::from(addr) & subnet.mask() != u32::from(addr) {
            let network = Ipv4Addr::from(u32::from(addr) & subnet.mask());
            return Err(format!("{s} has host bits set; the subnet is {network}/{prefix}"));
        }
        Ok(subnet)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkSpec {
    /// IPv4 subnet in CIDR form, /16 to /29; may not overlap another network's.
    pub subnet: String,
    /// The hosts' address on the network, which routes and serves DHCP and
    /// DNS to guests; default: the subnet's first address.
    pub gateway: String,
    /// Hand out the addresses by DHCP (only to the network's NICs).
    #[serde(default)]
    pub dhcp: bool,
    /// Guests reach outside addresses through their host (masquerade).
    #[serde(default)]
    pub nat: bool,
    /// Guest MTU: the underlay's less the VXLAN overhead (default 1450).
    pub mtu: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkStatus {
    /// VXLAN network identifier, allocated by the server.
    pub vni: u32,
    /// Addresses taken by NICs (filled in on read).
    #[serde(default)]
    pub addresses_used: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub metadata: Metadata,
    pub spec: NetworkSpec,
    #[serde(default)]
    pub status: NetworkStatus,
}

impl Network {
    /// The subnet; a stored network's was checked when it was created.
    pub fn subnet(&self) -> Result<Subnet, FieldError> {
        self.spec.subnet.parse().map_err(|e| FieldError::new("spec.subnet", e))
    }
    pub fn gateway(&self) -> Result<Ipv4Addr, FieldError> {
        self.spec
            .gateway
            .parse()
            .map_err(|_| FieldError::new("spec.gateway", "not an IPv4 address"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateNetwork {
    /// DNS label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Owning project; defaults to the caller's token project, else `default`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// IPv4 subnet in CIDR form, /16 to /29.
    #[schema(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")]
    pub subnet: String,
    #[serde(default)]
    #[schema(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default)]
    pub nat: bool,
    #[serde(default)]
    #[schema(minimum = 576, maximum = 8950)]
    pub mtu: Option<u32>,
}

/// One network interface of a VM. `ip` and `mac` are chosen by the server
/// when not given, and kept for the VM's life (also across migrations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NicSpec {
    /// Name of a network of the VM's project.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")]
    pub ip: Option<String>,
    /// Unicast MAC, `52:54:00:12:34:56`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
    pub mac: Option<String>,
    /// Security groups of the VM's project; none named: `default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 8)]
    pub security_groups: Vec<String>,
    /// The NIC's place on the VM's PCI bus (0-7), the lowest free one unless
    /// given. It stays while the NIC exists, so the guest keeps its
    /// interface names when other NICs come and go, and the target of a
    /// migration builds the same hardware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 7)]
    pub slot: Option<u8>,
}

impl NicSpec {
    /// A NIC on `network` with everything else chosen by the server.
    pub fn on(network: &str) -> NicSpec {
        NicSpec {
            network: network.to_string(),
            ip: None,
            mac: None,
            security_groups: Vec::new(),
            slot: None,
        }
    }
}

/// A NIC plugged into the VM's running QEMU, as its node reports it. A NIC
/// removed from the spec stays here until the guest has let it go; its
/// address is released only then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicStatus {
    pub network: String,
    pub ip: String,
    pub mac: String,
    pub slot: u8,
}

/// How a VM's status reason starts when its node cannot plug or unplug
/// the NICs of its spec.
pub const NIC_CHANGE_FAILED: &str = "Cannot change the NICs of the running VM";

/// The slot of `nics[i]` (set by the server; NICs from before slots: the index).
pub fn nic_slot(nics: &[NicSpec], i: usize) -> u8 {
    nics.get(i).and_then(|n| n.slot).unwrap_or(i as u8)
}

/// Whether `plugged` (a VM's `status.nics`) are exactly the NICs of its
/// spec, slot for slot: a hot-plug or unplug is not under way.
pub fn plugged_as_specified(nics: &[NicSpec], plugged: &[NicStatus]) -> bool {
    let mut want: Vec<(u8, &str)> = (0..nics.len())
        .map(|i| (nic_slot(nics, i), nics[i].mac.as_deref().unwrap_or("")))
        .collect();
    let mut have: Vec<(u8, &str)> = plugged.iter().map(|n| (n.slot, n.mac.as_str())).collect();
    want.sort();
    have.sort();
    want == have
}

/// Gives every NIC without a slot the lowest free one; refuses slots out
/// of range or taken twice.
pub fn assign_slots(nics: &mut [NicSpec]) -> Result<(), FieldError> {
    let mut taken = [false; MAX_NICS];
    for (i, nic) in nics.iter().enumerate() {
        if let Some(s) = nic.slot {
            let field = format!("spec.nics[{i}].slot");
            let Some(t) = taken.get_mut(usize::from(s)) else {
                return Err(FieldError::new(field, format!("slots are 0 to {}", MAX_NICS - 1)));
            };
            if *t {
                return Err(FieldError::new(field, format!("slot {s} is taken by another NIC")));
            }
            *t = true;
        }
    }
    for nic in nics.iter_mut().filter(|n| n.slot.is_none()) {
        let free = taken
            .iter()
            .position(|t| !t)
            .ok_or_else(|| FieldError::new("spec.nics", format!("a VM may have at most {MAX_NICS} NICs")))?;
        taken[free] = true;
        nic.slot = Some(free as u8);
    }
    Ok(())
}

/// A parsed MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC the server gives a NIC with address `ip`: QEMU's `52:54`
    /// prefix (locally administered, unicast) and the address, so that
    /// MACs are as unique as addresses across networks that do not overlap.
    pub fn for_ip(ip: Ipv4Addr) -> Mac {
        let o = ip.octets();
        Mac([0x52, 0x54, o[0], o[1], o[2], o[3]])
    }
    /// The gateway's MAC on every host of a network: the same everywhere,
    /// so a guest's ARP entry stays right after it moves.
    pub fn gateway(vni: u32) -> Mac {
        let v = vni.to_be_bytes();
        Mac([0x52, 0x55, 0x00, v[1], v[2], v[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut b = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address (six hex pairs separated by ':')"));
        }
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address (six hex pairs separated by ':')"));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if b[0] & 1 == 1 {
            return Err(format!("{s} is a multicast address; a NIC needs a unicast MAC"));
        }
        if b == [0; 6] {
            return Err("00:00:00:00:00:00 is not a NIC's MAC".into());
        }
        Ok(Mac(b))
    }
}

/// Checks a network create request and fills in its defaults.
pub fn network_spec(req: &CreateNetwork) -> Result<NetworkSpec, FieldError> {
    crate::validate::name("name", &req.name)?;
    crate::validate::labels("labels", &req.labels)?;
    let subnet: Subnet = req.subnet.parse().map_err(|e| FieldError::new("subnet", e))?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&subnet.prefix()) {
        return Err(FieldError::new(
            "subnet",
            format!("the prefix length must be between /{MIN_PREFIX} and /{MAX_PREFIX}"),
        ));
    }
    let gateway = match &req.gateway {
        None => subnet
            .hosts()
            .next()
            .ok_or_else(|| FieldError::new("subnet", "the subnet has no host addresses"))?,
        Some(g) => {
            let ip: Ipv4Addr = g
                .parse()
                .map_err(|_| FieldError::new("gateway", format!("{g:?} is not an IPv4 address")))?;
            if !subnet.is_host(ip) {
                return Err(FieldError::new(
                    "gateway",
                    format!("{ip} is not a host address of {subnet}"),
                ));
            }
            ip
        }
    };
    let mtu = req.mtu.unwrap_or(DEFAULT_GUEST_MTU);
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(FieldError::new(
            "mtu",
            format!("the MTU must be between {MIN_MTU} and {MAX_MTU} (a 9000-byte underlay less {VXLAN_OVERHEAD} bytes of VXLAN)"),
        ));
    }
    Ok(NetworkSpec {
        subnet: subnet.to_string(),
        gateway: gateway.to_string(),
        dhcp: req.dhcp,
        nat: req.nat,
        mtu,
    })
}

/// Checks the NICs of a VM spec as far as it can without the store.
pub fn nics(nics: &[NicSpec]) -> Result<(), FieldError> {
    if nics.len() > MAX_NICS {
        return Err(FieldError::new(
            "spec.nics",
            format!("a VM may have at most {MAX_NICS} NICs"),
        ));
    }
    for (i, nic) in nics.iter().enumerate() {
        crate::validate::name(&format!("spec.nics[{i}].network"), &nic.network)?;
        if let Some(ip) = &nic.ip {
            ip.parse::<Ipv4Addr>()
                .map_err(|_| FieldError::new(format!("spec.nics[{i}].ip"), format!("{ip:?} is not an IPv4 address")))?;
        }
        if let Some(mac) = &nic.mac {
            mac.parse::<Mac>()
                .map_err(|e| FieldError::new(format!("spec.nics[{i}].mac"), e))?;
        }
        if nic.security_groups.len() > 8 {
            return Err(FieldError::new(
                format!("spec.nics[{i}].security_groups"),
                "a NIC may be in at most 8 security groups",
            ));
        }
        for g in &nic.security_groups {
            crate::validate::name(&format!("spec.nics[{i}].security_groups"), g)?;
        }
    }
    assign_slots(&mut nics.to_vec())
}

/// Where a host's overlay traffic goes: every node's underlay address, kept
/// by the server as nodes come and go (one object, `cluster`), so agents
/// learn of peers without watching every node's heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverlayPeers {
    pub metadata: Metadata,
    /// Node name to underlay IPv4 address.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
}

/// A value that must be unique (a VNI, a network's address, a MAC),
/// claimed by creating an object named after it: the store's
/// create-if-absent is the compare-and-swap that keeps two concurrent
/// claimants from both getting it. Internal; not served by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reservation {
    pub metadata: Metadata,
    /// Id of the network the value belongs to.
    pub network: String,
    /// Id of the object holding it (a VM, or the network for its VNI).
    pub owner: String,
}

impl Reservation {
    pub fn vni_key(vni: u32) -> String {
        format!("vni-{vni}")
    }
    pub fn ip_key(network_id: &str, ip: Ipv4Addr) -> String {
        format!("ip-{network_id}-{ip}")
    }
    pub fn mac_key(mac: Mac) -> String {
        format!("mac-{mac}")
    }
}

/// Name of the one [`OverlayPeers`] object.
pub const OVERLAY_PEERS: &str = "cluster";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_lowest_free_and_never_shared() {
        let with = |slots: &[Option<u8>]| -> Vec<NicSpec> {
            slots
                .iter()
                .map(|s| NicSpec {
                    slot: *s,
                    ..NicSpec::on("net")
                })
                .collect()
        };
        let mut nics = with(&[Some(0), None, Some(2), None]);
        assign_slots(&mut nics).unwrap();
        let got: Vec<Option<u8>> = nics.iter().map(|n| n.slot).collect();
        assert_eq!(got, [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!(
            assign_slots(&mut with(&[Some(1), Some(1)])).unwrap_err().field,
            "spec.nics[1].slot"
        );
        assert!(assign_slots(&mut with(&[Some(8)])).is_err());
        assert!(assign_slots(&mut with(&[None; 9])).is_err());
    }

    #[test]
    fn subnets() {
        let s: Subnet = "10.20.0.0/24".parse().unwrap();
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 20, 0, 255));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(s.is_host(Ipv4Addr::new(10, 20, 0, 1)));
        assert!(!s.is_host(Ipv4Addr::new(10, 20, 0, 0)));
        assert!(!s.is_host(Ipv4Addr::new(10, 20, 0, 255)));
        assert!(!s.contains(Ipv4Addr::new(10, 20, 1, 1)));
        assert_eq!(s.hosts().count(), 254);
        let wide: Subnet = "10.20.0.0/16".parse().unwrap();
        assert!(wide.overlaps(&s) && s.overlaps(&wide));
        assert!(!s.overlaps(&"10.21.0.0/24".parse().unwrap()));
        for bad in ["10.20.0.1/24", "10.20.0.0", "10.20.0.0/33", "300.1.1.0/24", "x/24"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn macs() {
        let m = Mac::for_ip(Ipv4Addr::new(10, 20, 0, 5));
        assert_eq!(m.to_string(), "52:54:0a:14:00:05");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert!("01:00:5e:00:00:01".parse::<Mac>().is_err());
        assert!("00:00:00:00:00:00".parse::<Mac>().is_err());
        assert!("52:54:00:12:34".parse::<Mac>().is_err());
    }

    fn req(subnet: &str, gateway: Option<&str>, mtu: Option<u32>) -> CreateNetwork {
        CreateNetwork {
            name: "net".into(),
            project: None,
            labels: Default::default(),
            subnet: subnet.into(),
            gateway: gateway.map(str::to_string),
            dhcp: true,
            nat: false,
            mtu,
        }
    }

    #[test]
    fn network_defaults_and_refusals() {
        let spec = network_spec(&req("10.20.0.0/24", None, None)).unwrap();
        assert_eq!(spec.gateway, "10.20.0.1");
        assert_eq!(spec.mtu, 1450);
        let field = |r| network_spec(&r).unwrap_err().field;
        assert_eq!(field(req("10.20.0.0/30", None, None)), "subnet");
        assert_eq!(field(req("10.20.0.0/8", None, None)), "subnet");
        assert_eq!(field(req("10.20.0.0/24", Some("10.20.1.1"), None)), "gateway");
        assert_eq!(field(req("10.20.0.0/24", Some("10.20.0.255"), None)), "gateway");
        assert_eq!(field(req("10.20.0.0/24", None, Some(9000))), "mtu");
    }
}
