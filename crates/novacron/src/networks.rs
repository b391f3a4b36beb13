//! `novacron network ...`: virtual networks.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Subcommand;
use novacron_api::{CreateNetwork, Network, NicSpec};

use crate::commands::{client, list, ListArgs};
use crate::output::{age, print_data, table, Format};
use crate::{parse_label, Global};

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network: one L2 segment across every host its VMs run on.
    Create {
        name: String,
        /// IPv4 subnet, /16 to /29, e.g. 10.20.0.0/24.
        #[arg(long)]
        subnet: String,
        /// The hosts' address on the network (default: the first address).
        #[arg(long)]
        gateway: Option<String>,
        /// Hand out the VMs' addresses by DHCP.
        #[arg(long)]
        dhcp: bool,
        /// Let VMs reach outside addresses through their host (masquerade).
        #[arg(long)]
        nat: bool,
        /// Guest MTU (default 1450: a 1500-byte underlay less VXLAN's 50).
        #[arg(long)]
        mtu: Option<u32>,
        /// Project (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List networks.
    List(ListArgs),
    /// Show a network.
    Get { name: String },
    /// Delete a network no VM uses.
    Delete { name: String },
}

/// `NAME` or `NAME:IP`, as `vm create --network` takes it.
pub fn parse_nic(s: &str) -> Result<NicSpec, String> {
    let (network, ip) = match s.split_once(':') {
        Some((n, ip)) => (n, Some(ip.to_string())),
        None => (s, None),
    };
    if network.is_empty() || ip.as_deref() == Some("") {
        return Err(format!("{s:?} is not NAME or NAME:IP"));
    }
    Ok(NicSpec {
        network: network.to_string(),
        ip,
        mac: None,
    })
}

pub async fn network(g: &Global, cmd: NetworkCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        NetworkCommand::Create {
            name,
            subnet,
            gateway,
            dhcp,
            nat,
            mtu,
            project,
            labels,
        } => {
            let req = CreateNetwork {
                name,
                project,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                subnet,
                gateway,
                dhcp,
                nat,
                mtu,
            };
            novacron_api::network::network_spec(&req).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let net: Network = c.post_json("networks", &req).await?;
            networks(g.output, &[net])
        }
        NetworkCommand::List(a) => {
            list::<Network>(g, &c, a, networks, |n| {
                format!("{}  {}", n.metadata.name, n.spec.subnet)
            })
            .await
        }
        NetworkCommand::Get { name } => networks(g.output, &[c.get::<Network>(&name).await?]),
        NetworkCommand::Delete { name } => {
            c.delete::<Network>(&name).await?;
            println!("network {name:?} deleted");
            Ok(())
        }
    }
}

fn networks(format: Format, items: &[Network]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&[
        "NAME",
        "PROJECT",
        "SUBNET",
        "GATEWAY",
        "VNI",
        "MTU",
        "DHCP",
        "NAT",
        "ADDRESSES",
        "AGE",
    ]);
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    for n in items {
        t.add_row(vec![
            n.metadata.name.clone(),
            n.metadata.project.clone(),
            n.spec.subnet.clone(),
            n.spec.gateway.clone(),
            n.status.vni.to_string(),
            n.spec.mtu.to_string(),
            yes_no(n.spec.dhcp),
            yes_no(n.spec.nat),
            n.status.addresses_used.to_string(),
            age(n.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}
