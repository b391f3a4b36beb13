//! The host's nftables rules for VM networks, in one table of the bridge
//! family. The whole table is rendered from what this host has and
//! replaced in one transaction (`flush` and the new rules in one `nft -f`),
//! so applying it again is safe and traffic never sees a half-made rule set.
//!
//! What stays on each host: DHCP (every host serves only its own VMs, and
//! another host's dnsmasq would refuse them) and everything the gateway
//! says (the gateway has the same address and MAC on every host).

use std::net::Ipv4Addr;

use novacron_api::network::{Mac, Subnet};
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
}

/// Everything a host's rules are made of.
pub(super) struct HostRules<'a> {
    pub networks: &'a [HostNetwork],
    pub nics: &'a [HostNic],
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
\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state established,related accept
{routing}\t\tiifname \"ncbr*\" drop
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
        }];
        let rules = render(&HostRules {
            networks: &networks,
            nics: &nics,
        });
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
