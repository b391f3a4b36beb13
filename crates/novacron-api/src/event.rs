//! Events (what happened to which object, as Kubernetes' Event objects) and
//! webhooks (HTTP receivers events are delivered to, signed).
//!
//! An event's `topic` is `KIND.WHAT`, lowercase: `vm.running`,
//! `vm.unschedulable`, `vm.quota_exceeded`, `migration.failed`,
//! `node.not_ready`, `backup.completed`, ... Webhooks subscribe to topics by
//! pattern: a topic, `KIND.*`, or `*`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::types::Metadata;

/// Something that happened to an object. The event's project is its
/// object's (cluster-wide objects such as nodes: none, empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub metadata: Metadata,
    pub involved: ObjectRef,
    /// `KIND.WHAT`, e.g. `vm.running`, `migration.failed`.
    pub topic: String,
    #[serde(rename = "type")]
    pub severity: Severity,
    /// Why, in a word or a short phrase (the VM's status reason, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub message: String,
    /// The node it happened on, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ObjectRef {
    /// `vm`, `migration`, `node`, ...
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Severity {
    #[default]
    Normal,
    /// Something failed or was refused.
    Warning,
}

/// A topic pattern of a webhook: a topic, `KIND.*`, or `*`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => true,
        Some(kind) => topic.split_once('.').is_some_and(|(k, _)| k == kind),
        None => pattern == topic,
    }
}

fn valid_topic_pattern(p: &str) -> bool {
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    p == "*"
        || p.split_once('.')
            .is_some_and(|(kind, what)| word(kind) && (what == "*" || word(what)))
}

/// An HTTP receiver of events. The secret is never returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub metadata: Metadata,
    pub spec: WebhookSpec,
    #[serde(default)]
    pub status: WebhookStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookSpec {
    /// `http://` or `https://` URL deliveries are POSTed to.
    pub url: String,
    /// Topic patterns: `vm.running`, `vm.*`, `*`.
    pub events: Vec<String>,
    /// Key of the HMAC-SHA256 signature of each delivery. Stored, never returned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    /// How long a delivery is retried (with backoff) before it is given up.
    pub retry_for_s: u64,
}

/// The last deliveries, newest last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookStatus {
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
}

/// How many deliveries a webhook's status keeps.
pub const KEPT_DELIVERIES: usize = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// Also sent as the `X-NovaCron-Delivery` header.
    pub id: String,
    /// Name of the event delivered.
    pub event: String,
    pub topic: String,
    pub state: DeliveryState,
    pub attempts: u32,
    /// HTTP status of the last attempt, when the receiver answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Being attempted, or waiting to be retried.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Not delivered within the webhook's retry time.
    Failed,
    /// Not attempted: the webhook had too many deliveries pending.
    Dropped,
}

impl std::fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Dropped => "dropped",
        };
        f.write_str(s)
    }
}

pub const DEFAULT_RETRY_FOR_S: u64 = 3600;
pub const MAX_RETRY_FOR_S: u64 = 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[schema(max_length = 2000)]
    pub url: String,
    /// Topic patterns (`vm.running`, `vm.*`, `*`).
    #[schema(min_items = 1, max_items = 50)]
    pub events: Vec<String>,
    /// 16 to 256 characters.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: String,
    /// Seconds a delivery is retried (default 3600, at most 86400).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    pub retry_for_s: Option<u64>,
}

impl CreateWebhook {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate::name("name", &self.name)?;
        let url = url::Url::parse(&self.url).map_err(|e| FieldError::new("url", format!("{:?}: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(FieldError::new("url", "use an http:// or https:// URL with a host"));
        }
        if self.url.len() > 2000 {
            return Err(FieldError::new("url", "at most 2000 characters"));
        }
        if self.events.is_empty() || self.events.len() > 50 {
            return Err(FieldError::new("events", "name 1 to 50 topic patterns"));
        }
        if let Some(bad) = self.events.iter().find(|p| !valid_topic_pattern(p)) {
            return Err(FieldError::new(
                "events",
                format!("{bad:?} is not a topic pattern: use KIND.WHAT (vm.running), KIND.* or *"),
            ));
        }
        if !(16..=256).contains(&self.secret.len()) {
            return Err(FieldError::new("secret", "use 16 to 256 characters"));
        }
        if let Some(s) = self.retry_for_s {
            if !(1..=MAX_RETRY_FOR_S).contains(&s) {
                return Err(FieldError::new(
                    "retry_for_s",
                    format!("between 1 and {MAX_RETRY_FOR_S}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("*", "vm.running"));
        assert!(topic_matches("vm.*", "vm.running"));
        assert!(!topic_matches("vm.*", "vmx.running"));
        assert!(!topic_matches("vm.*", "migration.failed"));
        assert!(topic_matches("migration.failed", "migration.failed"));
        assert!(!topic_matches("migration.failed", "migration.completed"));
        for ok in ["*", "vm.*", "migration.failed", "vm.quota_exceeded"] {
            assert!(valid_topic_pattern(ok), "{ok}");
        }
        for bad in ["", "vm", "vm.", ".x", "*.running", "VM.x", "vm.run ning", "vm.*.x"] {
            assert!(!valid_topic_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn webhook_input_is_checked() {
        let ok = CreateWebhook {
            name: "alerts".into(),
            url: "http://127.0.0.1:9000/hook".into(),
            events: vec!["vm.*".into(), "migration.failed".into()],
            secret: "0123456789abcdef".into(),
            retry_for_s: None,
        };
        assert!(ok.validate().is_ok());
        let field = |w: CreateWebhook| w.validate().err().map(|e| e.field);
        assert_eq!(
            field(CreateWebhook {
                url: "ftp://x/".into(),
                ..ok.clone()
            })
            .as_deref(),
            Some("url")
        );
        assert_eq!(
            field(CreateWebhook {
                url: "not a url".into(),
                ..ok.clone()
            })
            .as_deref(),
            Some("url")
        );
        assert_eq!(
            field(CreateWebhook {
                events: vec![],
                ..ok.clone()
            })
            .as_deref(),
            Some("events")
        );
        assert_eq!(
            field(CreateWebhook {
                events: vec!["vm".into()],
                ..ok.clone()
            })
            .as_deref(),
            Some("events")
        );
        assert_eq!(
            field(CreateWebhook {
                secret: "short".into(),
                ..ok.clone()
            })
            .as_deref(),
            Some("secret")
        );
        assert_eq!(
            field(CreateWebhook {
                retry_for_s: Some(0),
                ..ok.clone()
            })
            .as_deref(),
            Some("retry_for_s")
        );
    }
}
