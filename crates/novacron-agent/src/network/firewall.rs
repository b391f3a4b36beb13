//! The host's nftables rules for VM networks, in one table of the bridge
//! family. The whole table is rendered from what this host has and
//! replaced in one transaction (`flush` and the new rules in one `nft -f`),
//! so applying it again is safe and traffic never sees a half-made rule set.
//!
//! What stays on each host: DHCP (every host serves only its own VMs, and
//! another host's dnsmasq would refuse them) and everything the gateway
//! says (the gateway has the same address and MAC on every host).

use std::net::Ipv4Addr;

use std::collections::BTreeMap;

use novacron_api::network::{Mac, Subnet};
use novacron_api::security::{member_addresses, Direction, Protocol};
use novacron_api::{SecurityGroup, SecurityRule};
use serde::{Deserialize, Serialize};

use super::{bridge_name, link, vxlan_name, NetError};

const TABLE: &str = "novacron";

/// A network with a bridge on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct HostNetwork {
    pub vni: u32,
    pub subnet: String,
    pub nat: bool,
}

/// A VM NIC on this host: its tap may send only as `mac` and `ip`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct HostNic {
    pub tap: String,
    pub vni: u32,
    pub mac: String,
    pub ip: Ipv4Addr,
    /// Its security groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The VM's name (for its DHCP reservation), its network's name, and
    /// whether that network runs DHCP.
    #[serde(default)]
    pub vm_name: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub dhcp: bool,
    /// The NIC's PCI slot in its VM (the tap's name ends with it).
    #[serde(default)]
    pub slot: u8,
}

/// Everything a host's rules are made of.
pub(super) struct HostRules<'a> {
    pub networks: &'a [HostNetwork],
    pub nics: &'a [HostNic],
    /// Every security group, by name.
    pub groups: &'a BTreeMap<String, SecurityGroup>,
}

/// `ip saddr` (or `daddr`) of a rule's remote end; `None`: the rule can
/// match nothing (its group has no members yet).
fn remote(rule: &SecurityRule, groups: &BTreeMap<String, SecurityGroup>, dir: &str) -> Option<String> {
    if let Some(cidr) = &rule.cidr {
        return Some(format!("ip {dir} {cidr} "));
    }
    if let Some(g) = &rule.group {
        let members = groups.get(g).map(member_addresses).unwrap_or_default();
        return set_of(&members).map(|set| format!("ip {dir} {set} "));
    }
    Some(String::new())
}

fn set_of(addrs: &[Ipv4Addr]) -> Option<String> {
    (!addrs.is_empty()).then(|| {
        let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        format!("{{ {} }}", list.join(", "))
    })
}

fn protocol_match(rule: &SecurityRule) -> String {
    let ports = |proto: &str| match rule.port_range() {
        Ok(Some((a, b))) if a == b => format!("{proto} dport {a} "),
        Ok(Some((a, b))) => format!("{proto} dport {a}-{b} "),
        _ => String::new(),
    };
    match rule.protocol {
        Protocol::Any => String::new(),
        Protocol::Tcp => format!("meta l4proto tcp {}", ports("tcp")),
        Protocol::Udp => format!("meta l4proto udp {}", ports("udp")),
        Protocol::Icmp => "meta l4proto icmp ".into(),
    }
}

/// A NIC's security group chains: what may reach it (`sg_in_`) and what it
/// may send (`sg_out_`). Allowed traffic returns to the caller, so a packet
/// between two guests passes the sender's egress and the receiver's ingress.
fn security_chains(nic: &HostNic, groups: &BTreeMap<String, SecurityGroup>) -> String {
    let tap = &nic.tap;
    let mine: Vec<&SecurityGroup> = nic.groups.iter().filter_map(|g| groups.get(g)).collect();
    let mut ingress = String::new();
    let mut members: Vec<Ipv4Addr> = mine.iter().flat_map(|g| member_addresses(g)).collect();
    members.sort();
    members.dedup();
    if let Some(set) = set_of(&members) {
        ingress.push_str(&format!("\t\tip saddr {set} return\n"));
    }
    let mut egress = String::new();
    let mut any_egress = false;
    for rule in mine.iter().flat_map(|g| g.spec.rules.iter()) {
        let (out, dir) = match rule.direction {
            Direction::Ingress => (&mut ingress, "saddr"),
            Direction::Egress => {
                any_egress = true;
                (&mut egress, "daddr")
            }
        };
        if let Some(remote) = remote(rule, groups, dir) {
            out.push_str(&format!("\t\t{remote}{}return\n", protocol_match(rule)));
        }
    }
    // No egress rule: the NIC may send anywhere.
    let egress_end = if any_egress { "drop" } else { "return" };
    format!(
        "\tchain sg_in_{tap} {{
{ingress}\t\tdrop
\t}}
\tchain sg_out_{tap} {{
{egress}\t\t{egress_end}
\t}}
"
    )
}

/// Anti-spoofing for one tap: its MAC, its address (or 0.0.0.0 asking for
/// one by DHCP, or probing for it by ARP), ARP only about itself, no DHCP
/// answers, nothing but IPv4 and ARP (IPv6 is not managed here, so its
/// addresses could not be checked).
fn guard_chain(nic: &HostNic) -> String {
    let (tap, mac, ip) = (&nic.tap, &nic.mac, nic.ip);
    format!(
        "\tchain guard_{tap} {{
\t\tether saddr != {mac} drop
\t\tether type arp arp saddr ether != {mac} drop
\t\tether type arp arp saddr ip 0.0.0.0 return
\t\tether type arp arp saddr ip != {ip} drop
\t\tether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 return
\t\tether type ip ip saddr != {ip} drop
\t\tether type ip udp sport 67 drop
\t\tether type != {{ ip, arp }} drop
\t}}
"
    )
}

/// The rule sets (bridge family: DHCP, gateway and anti-spoofing; inet:
/// routing and NAT) for what this host has.
pub(super) fn render(host: &HostRules<'_>) -> String {
    let mut gateway_rules = String::new();
    for net in host.networks {
        gateway_rules.push_str(&format!(
            "\t\toifname \"{}\" ether saddr {} drop\n",
            vxlan_name(net.vni),
            Mac::gateway(net.vni)
        ));
    }
    let mut guards = String::new();
    let mut jumps = String::new();
    for nic in host.nics {
        guards.push_str(&guard_chain(nic));
        jumps.push_str(&format!("\t\tiifname \"{0}\" jump guard_{0}\n", nic.tap));
    }
    let mut security = String::new();
    let mut security_jumps = String::new();
    for nic in host.nics {
        security.push_str(&security_chains(nic, host.groups));
        security_jumps.push_str(&format!(
            "\t\tip saddr {ip} jump sg_out_{tap}\n\t\tip daddr {ip} jump sg_in_{tap}\n",
            ip = nic.ip,
            tap = nic.tap
        ));
    }
    let mut routing = String::new();
    let mut nat = String::new();
    for net in host.networks {
        let bridge = bridge_name(net.vni);
        // With br_netfilter, frames bridged between two ports of one
        // network pass here too: they stay allowed.
        routing.push_str(&format!("\t\tiifname \"{bridge}\" oifname \"{bridge}\" accept\n"));
        if net.nat {
            routing.push_str(&format!(
                "\t\tiifname \"{bridge}\" oifname != \"ncbr*\" ip saddr {} accept\n",
                net.subnet
            ));
            nat.push_str(&format!(
                "\t\tip saddr {} oifname != \"{bridge}\" masquerade\n",
                net.subnet
            ));
        }
    }
    format!(
        "add table bridge {TABLE}
flush table bridge {TABLE}
table bridge {TABLE} {{
{guards}\tchain input {{
\t\ttype filter hook input priority 0; policy accept;
{jumps}\t\tiifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
{jumps}\t\tiifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t\toifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t}}
\tchain output {{
\t\ttype filter hook output priority 0; policy accept;
\t\toifname \"ncvx*\" udp sport {{ 67, 68 }} drop
{gateway_rules}\t}}
}}
add table inet {TABLE}
flush table inet {TABLE}
table inet {TABLE} {{
{security}\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state established,related accept
{security_jumps}{routing}\t\tiifname \"ncbr*\" drop
\t\toifname \"ncbr*\" drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority 100; policy accept;
{nat}\t}}
}}
"
    )
}

/// Whether any network routes out through this host.
pub(super) fn needs_forwarding(networks: &[HostNetwork]) -> bool {
    networks.iter().any(|n| n.nat && n.subnet.parse::<Subnet>().is_ok())
}

/// Replaces the tables with the rules for `host`.
pub(super) async fn apply(host: &HostRules<'_>) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt;
    if needs_forwarding(host.networks) {
        // Per network namespace; never turned off again (the host may route for others).
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Io {
            path: "/proc/sys/net/ipv4/ip_forward".into(),
            source,
        })?;
    }
    if !host.nics.is_empty() {
        bridged_traffic_through_inet()?;
    }
    let rules = render(host);
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            program: "nft".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).await.map_err(|source| NetError::Io {
            path: "nft stdin".into(),
            source,
        })?;
    }
    let out = child.wait_with_output().await.map_err(|source| NetError::Spawn {
        program: "nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Security groups are stateful, which the bridge family cannot be here
/// (no bridge conntrack): they live in the inet table, which sees bridged
/// IPv4 through br_netfilter. Anti-spoofing makes the addresses they match
/// on trustworthy.
fn bridged_traffic_through_inet() -> Result<(), NetError> {
    const KNOB: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !std::path::Path::new(KNOB).exists() {
        // Loads it where the agent may; the check below says if it worked.
        let _ = std::process::Command::new("modprobe").arg("br_netfilter").status();
    }
    std::fs::write(KNOB, "1").map_err(|source| NetError::Io {
        path: format!("{KNOB} (is the br_netfilter module loaded?)"),
        source,
    })
}

/// Removes the tables (the host has no network left).
pub(super) async fn remove() -> Result<(), NetError> {
    for family in ["bridge", "inet"] {
        match link::run("nft", &["delete", "table", family, TABLE]).await {
            Ok(_) => {}
            Err(NetError::Command { stderr, .. }) if stderr.contains("No such file") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_for_networks_and_nics() {
        let networks = [
            HostNetwork {
                vni: 4096,
                subnet: "10.31.0.0/24".into(),
                nat: true,
            },
            HostNetwork {
                vni: 4097,
                subnet: "10.32.0.0/24".into(),
                nat: false,
            },
        ];
        let nics = [HostNic {
            tap: "nc0123456789a0".into(),
            vni: 4096,
            mac: "52:54:0a:1f:00:02".into(),
            ip: Ipv4Addr::new(10, 31, 0, 2),
            groups: vec!["web".into()],
            vm_name: "web-1".into(),
            network: "red".into(),
            dhcp: true,
            slot: 0,
        }];
        let group = |name: &str, members: &[&str], rules: Vec<SecurityRule>| SecurityGroup {
            metadata: novacron_api::Metadata::new(name, Default::default()),
            spec: novacron_api::security::SecurityGroupSpec { rules },
            status: novacron_api::security::SecurityGroupStatus {
                members: members.iter().map(|m| m.to_string()).collect(),
            },
        };
        let http_from_clients = SecurityRule {
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            ports: Some("80".into()),
            cidr: None,
            group: Some("clients".into()),
        };
        let groups: BTreeMap<String, SecurityGroup> = [
            ("web".to_string(), group("web", &["10.31.0.2"], vec![http_from_clients])),
            (
                "clients".to_string(),
                group("clients", &["10.31.0.3", "10.31.0.4"], vec![]),
            ),
        ]
        .into();
        let rules = render(&HostRules {
            networks: &networks,
            nics: &nics,
            groups: &groups,
        });
        assert!(rules.contains("ip saddr { 10.31.0.2 } return"), "{rules}");
        assert!(
            rules.contains("ip saddr { 10.31.0.3, 10.31.0.4 } meta l4proto tcp tcp dport 80 return"),
            "{rules}"
        );
        assert!(rules.contains("ip daddr 10.31.0.2 jump sg_in_nc0123456789a0"));
        assert!(rules.contains("oifname \"ncvx4096\" ether saddr 52:55:00:00:10:00 drop"));
        assert!(rules.contains("oifname \"ncvx4097\" ether saddr 52:55:00:00:10:01 drop"));
        assert!(rules.contains("iifname \"nc0123456789a0\" jump guard_nc0123456789a0"));
        assert!(rules.contains("ether type ip ip saddr != 10.31.0.2 drop"));
        assert!(rules.contains("ip saddr 10.31.0.0/24 oifname != \"ncbr4096\" masquerade"));
        assert!(
            !rules.contains("10.32.0.0/24 oifname"),
            "a network without NAT is masqueraded"
        );
        assert!(rules.starts_with("add table bridge novacron\nflush table bridge novacron\n"));
        assert!(needs_forwarding(&networks));
    }
}
