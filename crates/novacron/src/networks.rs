//! `novacron network ...`: virtual networks.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Subcommand;
use novacron_api::security::{Direction, Protocol};
use novacron_api::{CreateNetwork, CreateSecurityGroup, Network, NicSpec, SecurityGroup, SecurityRule, Vm};

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

#[derive(Subcommand)]
pub enum NicCommand {
    /// Add a NIC; a running VM gets it hot-plugged.
    Add {
        /// The VM.
        name: String,
        /// The NIC's network, with its address if given.
        #[arg(long, value_name = "NAME[:IP]", value_parser = parse_nic)]
        network: NicSpec,
        /// Unicast MAC (default: chosen by the server).
        #[arg(long)]
        mac: Option<String>,
        /// Security group (repeatable; default: the project's `default`).
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// Wait until the running VM has the NIC plugged in.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a NIC, named by its MAC or IP address; a running VM gets it
    /// hot-unplugged (the guest must let it go), then its address is freed.
    Remove {
        /// The VM.
        name: String,
        /// The NIC's MAC or IP address.
        nic: String,
        /// Wait until the running VM's guest has let the NIC go.
        #[arg(long)]
        wait: bool,
    },
}

/// How long `vm nic add|remove --wait` waits for the guest.
const NIC_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn vm_nic(g: &Global, c: &novacron_client::Client, cmd: NicCommand) -> Result<()> {
    let (name, wait, vm) = match cmd {
        NicCommand::Add {
            name,
            network,
            mac,
            security_groups,
            wait,
        } => {
            let nic = NicSpec {
                mac,
                security_groups,
                ..network
            };
            let vm: Vm = c.post_json(&format!("vms/{name}/nics"), &nic).await?;
            (name, wait, vm)
        }
        NicCommand::Remove { name, nic, wait } => {
            let vm: Vm = c.delete_json(&format!("vms/{name}/nics/{nic}")).await?;
            (name, wait, vm)
        }
    };
    let vm = if wait && vm.status.qemu_pid.is_some() {
        wait_plugged(c, &name, vm.metadata.generation).await?
    } else {
        vm
    };
    crate::output::vm(g.output, &vm)
}

/// Waits until the running VM has the NICs of its spec (as of
/// `generation`) plugged in, and no others.
async fn wait_plugged(c: &novacron_client::Client, name: &str, generation: u64) -> Result<Vm> {
    let change = crate::wait::VmChange {
        generation,
        timeout: NIC_WAIT,
        pending: "still has other NICs plugged than its spec's",
        failed: novacron_api::network::NIC_CHANGE_FAILED,
    };
    change
        .wait(c, name, |vm| {
            novacron_api::network::plugged_as_specified(&vm.spec.nics, &vm.status.nics)
        })
        .await
}

#[derive(Subcommand)]
pub enum SecurityGroupCommand {
    /// Create a security group. Its members reach each other; everything
    /// else gets in only through an ingress rule.
    Create {
        name: String,
        /// A rule: `in|out PROTO[:PORTS] [from|to CIDR|group:NAME|any]`,
        /// e.g. `in tcp:80 from group:clients`, `in icmp`, `out udp:53 to 10.0.0.0/8`.
        #[arg(long = "allow", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Replace a group's rules (applied at once on every host).
    SetRules {
        name: String,
        #[arg(long = "allow", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
    },
    List(ListArgs),
    Get {
        name: String,
    },
    /// Delete a group no NIC and no other group's rule names.
    Delete {
        name: String,
    },
}

/// `in tcp:80 from group:clients`: direction, protocol with optional
/// ports, optional remote end.
pub fn parse_rule(s: &str) -> Result<SecurityRule, String> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let usage = || format!("{s:?} is not `in|out PROTO[:PORTS] [from|to CIDR|group:NAME|any]`");
    let direction = match words.first().copied() {
        Some("in" | "ingress") => Direction::Ingress,
        Some("out" | "egress") => Direction::Egress,
        _ => return Err(usage()),
    };
    let (proto, ports) = match words.get(1).map(|w| w.split_once(':').unwrap_or((w, ""))) {
        Some((p, ports)) => (p, (!ports.is_empty()).then(|| ports.to_string())),
        None => ("any", None),
    };
    let protocol = match proto {
        "any" => Protocol::Any,
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        _ => return Err(usage()),
    };
    let (mut cidr, mut group) = (None, None);
    match &words[words.len().min(2)..] {
        [] => {}
        [_, "any"] => {}
        [from_to, remote] if matches!(*from_to, "from" | "to") => match remote.strip_prefix("group:") {
            Some(g) => group = Some(g.to_string()),
            None => cidr = Some(remote.to_string()),
        },
        _ => return Err(usage()),
    }
    let rule = SecurityRule {
        direction,
        protocol,
        ports,
        cidr,
        group,
    };
    novacron_api::security::rules(std::slice::from_ref(&rule)).map_err(|e| e.message)?;
    Ok(rule)
}

pub async fn security_group(g: &Global, cmd: SecurityGroupCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        SecurityGroupCommand::Create { name, rules, project } => {
            let req = CreateSecurityGroup {
                name,
                project,
                labels: Default::default(),
                rules,
            };
            let group: SecurityGroup = c.post_json("security-groups", &req).await?;
            security_groups(g.output, &[group])
        }
        SecurityGroupCommand::SetRules { name, rules } => {
            let group: SecurityGroup = c
                .put_json(
                    &format!("security-groups/{name}"),
                    &novacron_api::UpdateSecurityGroup { rules },
                )
                .await?;
            security_groups(g.output, &[group])
        }
        SecurityGroupCommand::List(a) => {
            list::<SecurityGroup>(g, &c, a, security_groups, |x| x.metadata.name.clone()).await
        }
        SecurityGroupCommand::Get { name } => security_groups(g.output, &[c.get::<SecurityGroup>(&name).await?]),
        SecurityGroupCommand::Delete { name } => {
            c.delete::<SecurityGroup>(&name).await?;
            println!("security group {name:?} deleted");
            Ok(())
        }
    }
}

fn describe_rule(r: &SecurityRule) -> String {
    let dir = match r.direction {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    };
    let proto = format!("{:?}", r.protocol).to_lowercase();
    let ports = r.ports.as_deref().map(|p| format!(":{p}")).unwrap_or_default();
    let from_to = if r.direction == Direction::Ingress {
        "from"
    } else {
        "to"
    };
    let remote = match (&r.cidr, &r.group) {
        (Some(c), _) => c.clone(),
        (_, Some(g)) => format!("group:{g}"),
        _ => "any".into(),
    };
    format!("{dir} {proto}{ports} {from_to} {remote}")
}

fn security_groups(format: Format, items: &[SecurityGroup]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["NAME", "PROJECT", "RULES", "MEMBERS", "AGE"]);
    for x in items {
        t.add_row(vec![
            x.metadata.name.clone(),
            x.metadata.project.clone(),
            x.spec.rules.iter().map(describe_rule).collect::<Vec<_>>().join("\n"),
            x.status.members.join(" "),
            age(x.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
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
        ip,
        ..NicSpec::on(network)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_from_the_command_line() {
        let r = parse_rule("in tcp:80 from group:clients").unwrap();
        assert_eq!(
            (r.direction, r.protocol, r.ports.as_deref(), r.group.as_deref()),
            (Direction::Ingress, Protocol::Tcp, Some("80"), Some("clients"))
        );
        assert_eq!(describe_rule(&r), "in tcp:80 from group:clients");
        let r = parse_rule("out udp:53 to 10.0.0.0/8").unwrap();
        assert_eq!(r.cidr.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(parse_rule("in icmp").unwrap().protocol, Protocol::Icmp);
        for bad in [
            "",
            "sideways tcp",
            "in tcp:99999",
            "in icmp:80",
            "in tcp from",
            "in tcp:80 at x",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad}");
        }
    }
}
