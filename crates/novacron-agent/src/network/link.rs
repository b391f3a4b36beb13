//! The kernel's links, addresses and forwarding entries, through iproute2
//! (`ip`, `bridge`): every change is one command whose words show in logs
//! and errors, and `-j` output is read as JSON.

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::NetError;

pub(super) async fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| NetError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) async fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args).await
}

#[derive(Debug, Deserialize)]
pub(super) struct Link {
    pub ifname: String,
    #[serde(default)]
    pub master: Option<String>,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub flags: Vec<String>,
}

/// Every link of this network namespace.
pub(super) async fn links() -> Result<Vec<Link>, NetError> {
    let out = ip(&["-j", "link", "show"]).await?;
    serde_json::from_str(&out).map_err(|e| NetError::Parse {
        what: "ip -j link show",
        message: e.to_string(),
    })
}

pub(super) async fn link(name: &str) -> Result<Option<Link>, NetError> {
    Ok(links().await?.into_iter().find(|l| l.ifname == name))
}

pub(super) async fn delete_link(name: &str) -> Result<(), NetError> {
    match ip(&["link", "del", "dev", name]).await {
        Ok(_) => Ok(()),
        // Gone already: what we wanted.
        Err(NetError::Command { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    addr_info: Vec<Addr>,
}

#[derive(Debug, Deserialize)]
struct Addr {
    family: String,
    local: String,
    prefixlen: u8,
}

/// The IPv4 addresses (with prefix) of a link.
pub(super) async fn addresses(dev: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
    let out = ip(&["-j", "addr", "show", "dev", dev]).await?;
    let infos: Vec<AddrInfo> = serde_json::from_str(&out).map_err(|e| NetError::Parse {
        what: "ip -j addr show",
        message: e.to_string(),
    })?;
    Ok(infos
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter(|a| a.family == "inet")
        .filter_map(|a| a.local.parse().ok().map(|ip| (ip, a.prefixlen)))
        .collect())
}

#[derive(Debug, Deserialize)]
struct Fdb {
    mac: String,
    #[serde(default)]
    dst: Option<String>,
}

/// Destinations of the all-zero (flood) entries of a VXLAN device: the
/// peers broadcast and unknown unicast go to (head-end replication).
pub(super) async fn flood_destinations(vxlan: &str) -> Result<Vec<Ipv4Addr>, NetError> {
    let out = run("bridge", &["-j", "fdb", "show", "dev", vxlan]).await?;
    let entries: Vec<Fdb> = serde_json::from_str(&out).map_err(|e| NetError::Parse {
        what: "bridge -j fdb show",
        message: e.to_string(),
    })?;
    Ok(entries
        .into_iter()
        .filter(|e| e.mac == "00:00:00:00:00:00")
        .filter_map(|e| e.dst.and_then(|d| d.parse().ok()))
        .collect())
}

pub(super) async fn add_flood(vxlan: &str, peer: Ipv4Addr) -> Result<(), NetError> {
    let peer = peer.to_string();
    run(
        "bridge",
        &["fdb", "append", "00:00:00:00:00:00", "dev", vxlan, "dst", &peer],
    )
    .await
    .map(drop)
}

pub(super) async fn remove_flood(vxlan: &str, peer: Ipv4Addr) -> Result<(), NetError> {
    let peer = peer.to_string();
    run(
        "bridge",
        &["fdb", "del", "00:00:00:00:00:00", "dev", vxlan, "dst", &peer],
    )
    .await
    .map(drop)
}
