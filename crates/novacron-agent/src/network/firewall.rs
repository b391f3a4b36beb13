//! The host's nftables rules for VM networks, in one table of the bridge
//! family. The whole table is rendered from what this host has and
//! replaced in one transaction (`flush` and the new rules in one `nft -f`),
//! so applying it again is safe and traffic never sees a half-made rule set.
//!
//! What stays on each host: DHCP (every host serves only its own VMs, and
//! another host's dnsmasq would refuse them) and everything the gateway
//! says (the gateway has the same address and MAC on every host).

use novacron_api::network::Mac;

use super::{link, vxlan_name, NetError};

const TABLE: &str = "novacron";

/// The rule set for the networks (by VNI) that have a bridge here.
pub(super) fn render(vnis: &[u32]) -> String {
    let mut gateway_rules = String::new();
    for vni in vnis {
        gateway_rules.push_str(&format!(
            "\t\toifname \"{}\" ether saddr {} drop\n",
            vxlan_name(*vni),
            Mac::gateway(*vni)
        ));
    }
    format!(
        "add table bridge {TABLE}
flush table bridge {TABLE}
table bridge {TABLE} {{
\tchain input {{
\t\ttype filter hook input priority 0; policy accept;
\t\tiifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
\t\tiifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t\toifname \"ncvx*\" udp dport {{ 67, 68 }} drop
\t}}
\tchain output {{
\t\ttype filter hook output priority 0; policy accept;
\t\toifname \"ncvx*\" udp sport {{ 67, 68 }} drop
{gateway_rules}\t}}
}}
"
    )
}

/// Replaces the table with the rules for `vnis`.
pub(super) async fn apply(vnis: &[u32]) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt;
    let rules = render(vnis);
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

/// Removes the table (the host has no network left).
pub(super) async fn remove() -> Result<(), NetError> {
    match link::run("nft", &["delete", "table", "bridge", TABLE]).await {
        Ok(_) => Ok(()),
        Err(NetError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_gateway_rule_per_network() {
        let rules = super::render(&[4096, 4097]);
        assert!(rules.contains("oifname \"ncvx4096\" ether saddr 52:55:00:00:10:00 drop"));
        assert!(rules.contains("oifname \"ncvx4097\" ether saddr 52:55:00:00:10:01 drop"));
        assert!(rules.starts_with("add table bridge novacron\nflush table bridge novacron\n"));
    }
}
