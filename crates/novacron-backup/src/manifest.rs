//! A backup of a VM: which disks, their indexes' digests, and how it was
//! made (full or incremental, and why full).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// One backup: the VM's name and the instant it was taken (to the second).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackupId {
    pub vm: String,
    pub time: DateTime<Utc>,
}

impl BackupId {
    /// Its directory under the datastore: `vm/NAME/TIME`.
    pub fn rel_dir(&self) -> String {
        format!("vm/{}/{}", self.vm, self.time_name())
    }

    /// The time as it names the directory (RFC 3339, seconds, `Z`).
    pub fn time_name(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    /// The id a directory name stands for, if it is one.
    pub fn parse(vm: &str, time: &str) -> Option<BackupId> {
        let t = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
        let id = BackupId {
            vm: vm.to_string(),
            time: t,
        };
        (valid_vm_name(vm) && id.time_name() == time).then_some(id)
    }
}

impl std::fmt::Display for BackupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vm, self.time_name())
    }
}

/// A VM name as the API allows it (so it is a safe directory name).
pub fn valid_vm_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A disk name in a backup: root, data, or a volume's id.
pub fn valid_disk_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: BackupId,
    /// The VM's id (names are reused; ids are not).
    pub vm_id: String,
    /// The VM's project (empty in backups written outside a cluster).
    #[serde(default)]
    pub project: String,
    pub disks: Vec<DiskEntry>,
    /// Why every block was read (first backup, no valid bitmap, ...); none
    /// for an incremental backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Milliseconds from start to manifest.
    pub duration_ms: u64,
    /// The VM's settings when it was backed up (its spec, as JSON): a
    /// restore makes a VM like it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// The backup key its chunks are sealed with (its id); none: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// root, data, or a volume's id.
    pub name: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// SHA-256 of its index file (hex), checked when it is read.
    pub index_sha256: String,
    /// Bytes read from the disk for this backup (all of it when full).
    pub bytes_read: u64,
    /// Bytes of the previous backup's chunks that changes were laid over.
    #[serde(default)]
    pub bytes_from_previous: u64,
    /// Chunks this backup added to the store (the rest were there).
    pub chunks_new: u64,
    /// Bytes those new chunks take in the store (compressed).
    pub stored_bytes: u64,
}

impl Manifest {
    /// The backup as the API shows it, in store `store`.
    pub fn to_api(&self, store: &str) -> novacron_api::Backup {
        novacron_api::Backup {
            id: format!("{store}:{}", self.id),
            store: store.into(),
            vm: self.id.vm.clone(),
            vm_id: self.vm_id.clone(),
            project: self.project.clone(),
            time: self.id.time,
            disks: self
                .disks
                .iter()
                .map(|d| novacron_api::BackupDisk {
                    name: d.name.clone(),
                    size: d.size,
                    bytes_read: d.bytes_read,
                    bytes_from_previous: d.bytes_from_previous,
                    chunks_new: d.chunks_new,
                    stored_bytes: d.stored_bytes,
                })
                .collect(),
            full_reason: self.full_reason.clone(),
            duration_ms: self.duration_ms,
            verified: None,
            key_id: self.key_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_directories_and_read_back() {
        let id = BackupId {
            vm: "web-1".into(),
            time: DateTime::parse_from_rfc3339("2026-12-04T19:00:05Z")
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
        };
        assert_eq!(id.rel_dir(), "vm/web-1/2026-12-04T19:00:05Z");
        assert_eq!(BackupId::parse("web-1", "2026-12-04T19:00:05Z"), Some(id));
        assert_eq!(BackupId::parse("web-1", "2026-12-04T19:00:05+00:00"), None);
        assert_eq!(BackupId::parse("../x", "2026-12-04T19:00:05Z"), None);
        assert!(valid_disk_name("root") && valid_disk_name("0f8e2a4c-1b2d"));
        assert!(!valid_disk_name("../root") && !valid_disk_name(""));
    }
}
