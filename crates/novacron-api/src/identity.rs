//! Identity objects: users, tokens, roles, projects with quotas, and the audit log.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::types::Metadata;

/// What a permission applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Vms,
    Images,
    Migrations,
    Nodes,
    Projects,
    Users,
    Roles,
    Tokens,
    Audit,
    Networks,
    Volumes,
    /// Backups of VMs (in the VM's project).
    Backups,
    /// Datastores backups are written to (cluster-wide).
    BackupStores,
    /// The Prometheus metrics of the whole cluster (`/metrics`).
    Metrics,
    /// What happened to objects (in their project; nodes' events in none).
    Events,
    /// Receivers events are delivered to (cluster-wide).
    Webhooks,
}

impl Resource {
    pub const ALL: [Resource; 16] = [
        Resource::Vms,
        Resource::Images,
        Resource::Migrations,
        Resource::Nodes,
        Resource::Projects,
        Resource::Users,
        Resource::Roles,
        Resource::Tokens,
        Resource::Audit,
        Resource::Networks,
        Resource::Volumes,
        Resource::Backups,
        Resource::BackupStores,
        Resource::Metrics,
        Resource::Events,
        Resource::Webhooks,
    ];

    /// Objects of these resources belong to a project; the others are cluster-wide.
    pub fn in_project(self) -> bool {
        matches!(
            self,
            Resource::Vms
                | Resource::Images
                | Resource::Migrations
                | Resource::Networks
                | Resource::Volumes
                | Resource::Backups
                | Resource::Events
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Vms => "vms",
            Resource::Images => "images",
            Resource::Migrations => "migrations",
            Resource::Nodes => "nodes",
            Resource::Projects => "projects",
            Resource::Users => "users",
            Resource::Roles => "roles",
            Resource::Tokens => "tokens",
            Resource::Audit => "audit",
            Resource::Networks => "networks",
            Resource::Volumes => "volumes",
            Resource::Backups => "backups",
            Resource::BackupStores => "backupstores",
            Resource::Metrics => "metrics",
            Resource::Events => "events",
            Resource::Webhooks => "webhooks",
        }
    }
}

/// What a caller does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// Get, list, watch, logs.
    Read,
    Create,
    /// Spec changes and lifecycle actions (start, stop, cordon, cancel, ...).
    Update,
    Delete,
    /// Interactive serial console.
    Console,
    /// Commands run in the guest through its guest agent (`vm exec`).
    Exec,
    /// Status reports only agents make.
    Status,
}

impl Verb {
    pub const ALL: [Verb; 7] = [
        Verb::Read,
        Verb::Create,
        Verb::Update,
        Verb::Delete,
        Verb::Console,
        Verb::Exec,
        Verb::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
            Verb::Console => "console",
            Verb::Exec => "exec",
            Verb::Status => "status",
        }
    }
}

/// One allowed (resource, verb) pair, written `resource:verb`; `*` stands for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Permission {
    pub resource: Resource,
    pub verb: Verb,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource.as_str(), self.verb.as_str())
    }
}

impl From<Permission> for String {
    fn from(p: Permission) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Permission {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (r, v) = s
            .split_once(':')
            .ok_or_else(|| format!("permission {s:?} is not resource:verb"))?;
        let resource = Resource::ALL
            .into_iter()
            .find(|x| x.as_str() == r)
            .ok_or_else(|| format!("unknown resource {r:?} in {s:?}"))?;
        let verb = Verb::ALL
            .into_iter()
            .find(|x| x.as_str() == v)
            .ok_or_else(|| format!("unknown verb {v:?} in {s:?}"))?;
        Ok(Permission { resource, verb })
    }
}

/// Expands `resource:verb` patterns where either side may be `*`.
pub fn expand_permissions(patterns: &[String]) -> Result<BTreeSet<Permission>, String> {
    let mut out = BTreeSet::new();
    for pat in patterns {
        let (r, v) = pat
            .split_once(':')
            .ok_or_else(|| format!("permission {pat:?} is not resource:verb"))?;
        let mut matched = false;
        for resource in Resource::ALL {
            for verb in Verb::ALL {
                if (r == "*" || r == resource.as_str()) && (v == "*" || v == verb.as_str()) {
                    out.insert(Permission { resource, verb });
                    matched = true;
                }
            }
        }
        if !matched {
            return Err(pat
                .parse::<Permission>()
                .err()
                .unwrap_or_else(|| format!("{pat:?} matches nothing")));
        }
    }
    Ok(out)
}

/// Who am I: the caller's user, token, role, project and permissions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub actor: String,
    pub user: Option<String>,
    pub token: String,
    pub role: String,
    pub project: Option<String>,
    pub permissions: Vec<String>,
}

/// A named set of permissions. `admin`, `operator`, `viewer` and `agent` are
/// built in; others are created through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Role {
    pub metadata: Metadata,
    /// `resource:verb` pairs, e.g. `vms:read`.
    #[schema(value_type = Vec<String>)]
    pub permissions: BTreeSet<Permission>,
    /// Built-in roles cannot be changed or deleted.
    #[serde(default)]
    pub builtin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateRole {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// `resource:verb` patterns, `*` allowed on either side.
    #[schema(min_items = 1)]
    #[schema(
        pattern = r"^(\*|vms|images|migrations|nodes|projects|users|roles|tokens|audit|networks|volumes|backups|backupstores|metrics|events|webhooks):(\*|read|create|update|delete|console|exec|status)$"
    )]
    pub permissions: Vec<String>,
}

/// A role granted in one project, or in all projects when `project` is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoleBinding {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl fmt::Display for RoleBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.project {
            Some(p) => write!(f, "{}@{p}", self.role),
            None => write!(f, "{}@*", self.role),
        }
    }
}

/// A person who logs in. Secrets are never returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub metadata: Metadata,
    pub bindings: Vec<RoleBinding>,
    /// Argon2id PHC string.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// Base32 TOTP secret when a second factor is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret: Option<String>,
    /// Whether TOTP is required at login (shown instead of the secret).
    #[serde(default)]
    pub totp_enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateUser {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// 8 to 1024 characters.
    #[schema(min_length = 8, max_length = 1024)]
    pub password: String,
    #[serde(default)]
    pub bindings: Vec<RoleBinding>,
}

/// Answer to enabling TOTP: the secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpEnrollment {
    /// Base32 secret for an authenticator app.
    pub secret: String,
    /// `otpauth://` URI with the same secret.
    pub uri: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Login {
    pub user: String,
    pub password: String,
    /// Current TOTP code, for users with a second factor.
    #[serde(default)]
    pub totp: Option<String>,
    /// Project the token is for; defaults to the user's only binding.
    #[serde(default)]
    pub project: Option<String>,
    /// Token lifetime in seconds (default 12 h, at most 30 days).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// An API token. Only a hash of the secret is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub metadata: Metadata,
    /// The user it was issued to; absent for system tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub role: String,
    /// The project it acts in; absent = every project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Hex SHA-256 of the bearer secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_sha256: String,
}

/// Longest token lifetime anyone may give: ten years.
pub const MAX_TOKEN_TTL_S: u64 = 315_360_000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateToken {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub role: String,
    #[serde(default)]
    pub project: Option<String>,
    /// Lifetime in seconds; absent = 30 days, or no expiry for callers
    /// allowed to manage all tokens (1 hour for join tokens). At most 30
    /// days, or ten years for token managers.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub ttl_s: Option<u64>,
    /// A one-time token with which an agent joins the cluster and gets its
    /// client certificate (`role` is ignored).
    #[serde(default)]
    pub join: bool,
}

/// An agent's request for its certificate, made with a join token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinNode {
    /// Node name (DNS label).
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Hosts (IP addresses or DNS names) the agent is reached at; they go in its certificate.
    #[schema(min_items = 1, max_items = 16, pattern = r"^[A-Za-z0-9.:-]{1,253}$")]
    pub hosts: Vec<String>,
}

/// The agent's credentials: PEM certificate and key (shown once) and the cluster CA.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinedNode {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// The certificate a node authenticates with (its SHA-256); revoking it
/// locks the node out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeCredential {
    pub metadata: Metadata,
    pub cert_sha256: String,
    /// When the certificate expires (absent: issued without a lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<DateTime<Utc>>,
    /// What the certificate names (from the join); renewals keep them.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// When the certificate was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<DateTime<Utc>>,
    /// The certificate before the last renewal: still accepted until it
    /// expires, so requests in flight during a renewal succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<IssuedCert>,
}

/// A certificate the cluster CA issued to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssuedCert {
    pub cert_sha256: String,
    pub not_after: Option<DateTime<Utc>>,
}

/// What every party of the cluster trusts (the object `cluster`): agents
/// watch it and apply it to every TLS connection without a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterTrust {
    pub metadata: Metadata,
    /// The CA that issues certificates now (PEM).
    pub issuer_pem: String,
    /// Every trusted CA (PEM): the issuer, plus the previous CA while a
    /// rotation is under way.
    pub ca_pem: String,
    /// Certificates refused before they expire; each leaves the list once
    /// it has expired.
    #[serde(default)]
    pub revoked: Vec<RevokedCert>,
    /// When the current CA rotation began (absent: none under way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_started: Option<DateTime<Utc>>,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokedCert {
    pub cert_sha256: String,
    /// The node it was issued to.
    pub node: String,
    pub not_after: Option<DateTime<Utc>>,
    pub revoked_at: DateTime<Utc>,
}

/// The name of the one [`ClusterTrust`] object.
pub const CLUSTER_TRUST: &str = "cluster";

/// A new token with its secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedToken {
    pub token: Token,
    pub secret: String,
}

/// Limits of a project; an absent field is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub vcpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub memory_mib: Option<u64>,
    /// Root and data disks of all VMs, and all volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub disk_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub vms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub networks: Option<u64>,
    /// Addresses taken by NICs on the project's networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub addresses: Option<u64>,
}

/// The largest quota value (2^40): what the document and validation allow.
pub const MAX_QUOTA: u64 = 1 << 40;

/// What a project's VMs take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub vms: u64,
    #[serde(default)]
    pub networks: u64,
    #[serde(default)]
    pub addresses: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub metadata: Metadata,
    #[serde(default)]
    pub quota: Quota,
    /// Filled in on read.
    #[serde(default)]
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateProject {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    pub quota: Quota,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateProject {
    pub quota: Quota,
}

/// One audited request. `hash` = SHA-256 over the JSON of `entry`, whose
/// `prev_hash` links it to the record before: changing, reordering or
/// deleting a record breaks the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    pub metadata: Metadata,
    pub entry: AuditEntry,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// User name, `token:<name>` for tokens without a user, or `anonymous`.
    pub actor: String,
    /// "POST /v1/vms"
    pub action: String,
    /// The object acted on, when the route names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// Why it was refused, for authentication and authorization failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub prev_hash: String,
}

/// Result of checking the audit chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditVerification {
    pub ok: bool,
    pub records: u64,
    /// What is wrong, with the first bad sequence number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::PartialSchema;

    /// The document's pattern for permissions names every resource and verb
    /// there is, so a permission valid by the document is accepted.
    #[test]
    fn the_permission_pattern_names_every_resource_and_verb() {
        let schema = serde_json::to_value(CreateRole::schema()).unwrap_or_default();
        let pattern = schema["properties"]["permissions"]["items"]["pattern"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (resources, verbs) = pattern.split_once("):(").unwrap_or_default();
        for r in Resource::ALL {
            assert!(
                resources.contains(&format!("|{}", r.as_str())),
                "{pattern} lacks {}",
                r.as_str()
            );
        }
        for v in Verb::ALL {
            assert!(
                verbs.contains(&format!("|{}", v.as_str())),
                "{pattern} lacks {}",
                v.as_str()
            );
        }
        for p in ["vms:read", "*:*", "audit:*"] {
            assert!(expand_permissions(&[p.to_string()]).is_ok(), "{p}");
        }
    }
}
