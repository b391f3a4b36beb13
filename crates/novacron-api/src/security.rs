//! Security groups: which traffic reaches a VM's NICs and which may leave
//! them. A NIC in a group accepts what the group's ingress rules allow and
//! anything from the group's own members; with no egress rule it may send
//! anywhere, with some only what they allow. Replies to allowed traffic
//! always pass (the firewall is stateful).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::network::Subnet;
use crate::types::Metadata;

/// The group a NIC joins when it names none (one per project, made on first use).
pub const DEFAULT_GROUP: &str = "default";
pub const MAX_RULES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// One allow rule. The remote end is `cidr`, or the members of `group`,
/// or (neither) anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecurityRule {
    pub direction: Direction,
    #[serde(default)]
    pub protocol: Protocol,
    /// `80` or `8000-8100` (TCP and UDP only); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,5}(-[0-9]{1,5})?$")]
    pub ports: Option<String>,
    /// Remote addresses, `10.0.0.0/8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")]
    pub cidr: Option<String>,
    /// Remote: the NICs in this group (of the same project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub group: Option<String>,
}

impl SecurityRule {
    /// The port range, checked: `(first, last)`.
    pub fn port_range(&self) -> Result<Option<(u16, u16)>, String> {
        let Some(p) = &self.ports else {
            return Ok(None);
        };
        let parse = |s: &str| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
        };
        let (a, b) = match p.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(p)?, parse(p)?),
        };
        if a > b {
            return Err(format!("port range {p:?} ends before it starts"));
        }
        Ok(Some((a, b)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroupSpec {
    #[serde(default)]
    #[schema(max_items = 100)]
    pub rules: Vec<SecurityRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroupStatus {
    /// Addresses of the NICs in the group, kept by the server.
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroup {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: SecurityGroupSpec,
    #[serde(default)]
    pub status: SecurityGroupStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateSecurityGroup {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(max_items = 100)]
    pub rules: Vec<SecurityRule>,
}

/// Replaces a group's rules (applied on every host at once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateSecurityGroup {
    #[schema(max_items = 100)]
    pub rules: Vec<SecurityRule>,
}

/// Checks rules as far as it can without the store (groups named in them
/// are checked by the server).
pub fn rules(rules: &[SecurityRule]) -> Result<(), FieldError> {
    if rules.len() > MAX_RULES {
        return Err(FieldError::new("rules", format!("at most {MAX_RULES} rules")));
    }
    for (i, r) in rules.iter().enumerate() {
        let field = |f: &str| format!("rules[{i}].{f}");
        let range = r.port_range().map_err(|e| FieldError::new(field("ports"), e))?;
        if range.is_some() && !matches!(r.protocol, Protocol::Tcp | Protocol::Udp) {
            return Err(FieldError::new(field("ports"), "ports need protocol tcp or udp"));
        }
        if r.cidr.is_some() && r.group.is_some() {
            return Err(FieldError::new(field("group"), "name a cidr or a group, not both"));
        }
        if let Some(c) = &r.cidr {
            c.parse::<Subnet>().map_err(|e| FieldError::new(field("cidr"), e))?;
        }
        if let Some(g) = &r.group {
            crate::validate::name(&field("group"), g)?;
        }
    }
    Ok(())
}

/// The members' addresses, parsed (the server wrote them).
pub fn member_addresses(group: &SecurityGroup) -> Vec<Ipv4Addr> {
    group.status.members.iter().filter_map(|m| m.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(protocol: Protocol, ports: Option<&str>, cidr: Option<&str>, group: Option<&str>) -> SecurityRule {
        SecurityRule {
            direction: Direction::Ingress,
            protocol,
            ports: ports.map(str::to_string),
            cidr: cidr.map(str::to_string),
            group: group.map(str::to_string),
        }
    }

    #[test]
    fn rules_are_checked() {
        assert!(rules(&[rule(Protocol::Tcp, Some("80"), None, Some("web"))]).is_ok());
        assert!(rules(&[rule(Protocol::Udp, Some("5000-5100"), Some("10.0.0.0/8"), None)]).is_ok());
        let field = |r| rules(&[r]).unwrap_err().field;
        assert_eq!(field(rule(Protocol::Icmp, Some("80"), None, None)), "rules[0].ports");
        assert_eq!(field(rule(Protocol::Tcp, Some("90-80"), None, None)), "rules[0].ports");
        assert_eq!(field(rule(Protocol::Tcp, Some("0"), None, None)), "rules[0].ports");
        assert_eq!(
            field(rule(Protocol::Tcp, None, Some("10.0.0.1/8"), None)),
            "rules[0].cidr"
        );
        assert_eq!(
            field(rule(Protocol::Tcp, None, Some("10.0.0.0/8"), Some("x"))),
            "rules[0].group"
        );
    }
}
