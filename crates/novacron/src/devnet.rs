//! Hosts for `novacron dev` run as root: each dev agent runs in a network
//! namespace of its own (`ncdev-N`, address 10.200.0.(10+N)), and a bridge
//! here (`ncdev0`, 10.200.0.1) joins them like an underlay joins hosts.
//!
//! Why namespaces: an agent owns its host's VM bridges, VXLAN devices,
//! dnsmasqs and nftables tables; two agents in one namespace would share
//! (and fight over) all of them, and VXLAN between them would never leave
//! the host. In namespaces the dev cluster's overlay is the real one.
//! They outlive `novacron dev`, like the VMs inside them, so the next
//! start re-adopts both. Traffic from them leaves through this host
//! (forwarding and a masquerade for 10.200.0.0/24), so VMs with NAT reach
//! what this host reaches.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};

pub const BRIDGE: &str = "ncdev0";
/// This host's address on the dev underlay.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const UNDERLAY: &str = "10.200.0.0/24";

/// The namespace of dev agent `i`.
pub fn netns(i: u32) -> String {
    format!("ncdev-{i}")
}

/// Dev agent `i`'s underlay address.
pub fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 10 + i as u8)
}

/// Whether this process may make namespaces (root, with `ip netns`).
pub fn available() -> bool {
    effective_uid() == Some(0)
        && std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success())
}

/// From `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("Cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(netns: Option<&str>, dev: &str) -> bool {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["link", "show", "dev", dev]);
    run("ip", &args).is_ok()
}

/// Makes the bridge, the namespaces of `agents` agents and their links, as
/// far as they are missing. Idempotent.
pub fn ensure(agents: u32) -> Result<()> {
    if agents > 200 {
        bail!("at most 200 dev agents get namespaces");
    }
    if !link_exists(None, BRIDGE) {
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    }
    let cidr = format!("{GATEWAY}/24");
    if !run("ip", &["-4", "-br", "addr", "show", "dev", BRIDGE])?.contains(&cidr) {
        run("ip", &["addr", "add", &cidr, "dev", BRIDGE])?;
    }
    run("ip", &["link", "set", BRIDGE, "up"])?;
    let existing = run("ip", &["netns", "list"])?;
    for i in 1..=agents {
        let ns = netns(i);
        if !existing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
        {
            run("ip", &["netns", "add", &ns])?;
        }
        // The host end is named after the namespace; the far end is its eth0.
        if !link_exists(None, &ns) {
            run(
                "ip",
                &["link", "add", &ns, "type", "veth", "peer", "name", "eth0", "netns", &ns],
            )?;
        }
        run("ip", &["link", "set", &ns, "master", BRIDGE, "up"])?;
        let addr = format!("{}/24", host_ip(i));
        if !run("ip", &["-n", &ns, "-4", "-br", "addr", "show", "dev", "eth0"])?.contains(&addr) {
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        }
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &["-n", &ns, "route", "replace", "default", "via", &GATEWAY.to_string()],
        )?;
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("Cannot enable IPv4 forwarding")?;
    let nat = format!(
        "table ip ncdev\ndelete table ip ncdev\ntable ip ncdev {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat;\n\t\tip saddr {UNDERLAY} oifname != \"{BRIDGE}\" masquerade\n\t}}\n}}\n"
    );
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("Cannot run nft")?;
    if let Some(mut stdin) = nft.stdin.take() {
        use std::io::Write;
        stdin.write_all(nat.as_bytes()).context("Cannot write to nft")?;
    }
    let out = nft.wait_with_output().context("nft")?;
    if !out.status.success() {
        bail!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Relays connections to the dev underlay's address (where the agents in
/// their namespaces reach the server) to the server's own address.
pub async fn relay(from: SocketAddr, to: SocketAddr, stop: tokio_util::sync::CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(from)
        .await
        .with_context(|| format!("Cannot listen on {from}"))?;
    loop {
        let (mut inbound, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("accept")?,
            _ = stop.cancelled() => return Ok(()),
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(to).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(e) => tracing::warn!(error = %e, %to, "cannot reach the server for an agent"),
            }
        });
    }
}
