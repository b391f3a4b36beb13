//! VM snapshots: named points in time of a VM's own disks (root and data),
//! and with `memory` of its RAM and device state too. Each snapshot is a
//! read-only qcow2 layer per disk in the VM's directory (and a saved
//! migration stream for the memory); the disks the VM runs on are overlays
//! on the layer of the snapshot they descend from (`current`). Snapshots
//! form a tree: reverting to an older one keeps the newer ones. Volumes are
//! objects of their own and are not part of a VM's snapshots.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// Snapshots one VM may have (each adds a layer to its disks' chains).
pub const MAX_SNAPSHOTS: usize = 32;

/// Longest description a snapshot keeps.
pub const MAX_DESCRIPTION: usize = 256;

/// `POST /v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// 1-63 lowercase letters, digits or '-'; unique within the VM.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Also save the running VM's RAM and device state: reverting to the
    /// snapshot resumes the guest where it was (the VM pauses meanwhile).
    #[serde(default)]
    pub memory: bool,
}

impl CreateSnapshot {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate::name("name", &self.name)?;
        if let Some(d) = &self.description {
            if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "description",
                    format!("at most {MAX_DESCRIPTION} characters, no control characters"),
                ));
            }
        }
        Ok(())
    }
}

/// One snapshot of a VM, as `vm get` and `vm snapshot list` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The snapshot this one was taken on top of; none for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The VM's disks it holds ("root", "data").
    pub disks: Vec<String>,
    /// Taken while the VM ran: its disks at one instant, as a crash would
    /// leave them, unless `quiesced`.
    #[serde(default)]
    pub taken_running: bool,
    /// The guest agent flushed and froze the guest's filesystems for it
    /// (application-consistent).
    #[serde(default)]
    pub quiesced: bool,
    /// The VM's RAM and device state, saved with the disks at the same
    /// instant: reverting starts the VM where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<SnapshotMemory>,
    /// Whether the VM's present disks descend directly from this snapshot
    /// (it was the last one taken or reverted to).
    #[serde(default)]
    pub current: bool,
}

/// A snapshot's saved RAM and device state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotMemory {
    /// Bytes of the saved state (RAM pages that are not zero, and devices).
    pub size_bytes: u64,
    /// Milliseconds the guest was paused to save it.
    pub paused_ms: u64,
}
