//! NovaCron API: object types, validation and the error body. No I/O: the
//! HTTP client is `novacron-client`.

pub mod agent;
pub mod backup;
pub mod backup_policy;
pub mod cloudinit;
pub mod error;
pub mod event;
pub mod identity;
pub mod migration;
pub mod network;
pub mod scheduling;
pub mod security;
pub mod selector;
pub mod snapshot;
pub mod types;
pub mod units;
pub mod validate;
pub mod volume;

pub use backup::{
    Backup, BackupDisk, BackupEvent, BackupStore, BackupStoreSpec, BackupVerification, CreateBackup, CreateBackupStore,
};
pub use backup_policy::{BackupPolicy, BackupPolicySpec, BackupPolicyStatus, CreateBackupPolicy};
pub use cloudinit::CloudInitSpec;
pub use error::{ErrorBody, ErrorDetail, FieldError};
pub use event::{
    CreateWebhook, Delivery, DeliveryState, Event, ObjectRef, Severity, Webhook, WebhookSpec, WebhookStatus,
};
pub use identity::*;
pub use migration::*;
pub use network::{CreateNetwork, Network, NetworkSpec, NetworkStatus, NicSpec, NicStatus, OverlayPeers, Reservation};
pub use scheduling::*;
pub use security::{CreateSecurityGroup, SecurityGroup, SecurityRule, UpdateSecurityGroup};
pub use snapshot::{CreateSnapshot, Snapshot, SnapshotMemory};
pub use types::*;
pub use volume::{
    AttachVolume, AttachedVolume, CreateVolume, ResizeVolume, Volume, VolumeAttachment, VolumePhase, VolumeSpec,
    VolumeStatus,
};

/// Header an agent uses to authenticate the server's calls.
pub const AGENT_SECRET_HEADER: &str = "x-novacron-agent-secret";

/// How long the server and agents wait for a request head, or for the next
/// request on an idle keep-alive connection, before they close it.
pub const SERVER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long NovaCron's HTTP clients keep an idle pooled connection: less
/// than [`SERVER_IDLE_TIMEOUT`], so a request never goes out on a
/// connection the other side is closing (a POST is not retried).
pub const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
const _: () = assert!(POOL_IDLE_TIMEOUT.as_secs() < SERVER_IDLE_TIMEOUT.as_secs());
