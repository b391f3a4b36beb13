//! Backups: datastores (`BackupStore`), the backups of VMs in them, and
//! the calls an agent makes to write one (chunks, then a commit).
//!
//! A backup is named by its store, its VM's name and the second it was
//! taken: `STORE:NAME/2026-12-04T19:00:00Z` (after Proxmox Backup Server's
//! `vm/ID/TIME` snapshot paths).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::types::Metadata;

/// The store every cluster has: a directory under the server's data dir.
pub const DEFAULT_STORE: &str = "local";

/// Largest commit body: the disks' indexes, 64 hex digits per 4 MiB chunk
/// (a 4 TiB disk's index is 64 MiB of hex).
pub const MAX_COMMIT_BODY: usize = 80 * 1024 * 1024;

/// Largest chunk upload: a 4 MiB chunk stored uncompressed with its header.
pub const MAX_CHUNK_BODY: usize = 4 * 1024 * 1024 + 1024;

/// A datastore: a directory of chunks and backups the server serves, or a
/// `novacron backup-store serve` process elsewhere that it reaches over mTLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupStore {
    pub metadata: Metadata,
    pub spec: BackupStoreSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupStoreSpec {
    /// Absolute path of the datastore directory on the server's machine
    /// (empty for a remote store).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// URL of a backup-store process (`https://HOST:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Backups here are sealed (client-side encryption) with the backup
    /// key of this id, which agents hold and the store never sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
}

/// `POST /v1/backup-stores`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackupStore {
    pub name: String,
    /// Absolute path on the server's machine; made if missing. An existing
    /// datastore there is taken over with its backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Or: the URL of a `novacron backup-store serve` process
    /// (`https://HOST:PORT`; its certificate from the cluster CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 2048)]
    pub url: Option<String>,
    /// Seal every backup here with the backup key of this id (16 hex
    /// digits, `novacron backup-key create` prints it): agents encrypt
    /// with it, and only they hold the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9a-f]{16}$")]
    pub encryption_key_id: Option<String>,
}

impl CreateBackupStore {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate::name("name", &self.name)?;
        match (&self.path, &self.url) {
            (Some(path), None) => {
                let p = std::path::Path::new(path);
                if !p.is_absolute()
                    || path.len() > 4096
                    || path.chars().any(char::is_control)
                    || p.components().any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(FieldError::new("path", "an absolute path without '..'"));
                }
            }
            (None, Some(url)) => {
                let rest = url.strip_prefix("https://").unwrap_or_default();
                let host = rest.trim_end_matches('/');
                if host.is_empty()
                    || url.len() > 2048
                    || host.contains(['/', '?', '#', '@'])
                    || url.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return Err(FieldError::new("url", "https://HOST:PORT (a backup-store process)"));
                }
            }
            _ => return Err(FieldError::new("path", "either a path or a url")),
        }
        if let Some(id) = &self.encryption_key_id {
            if !valid_key_id(id) {
                return Err(FieldError::new(
                    "encryption_key_id",
                    "16 lowercase hex digits (`novacron backup-key create` prints it)",
                ));
            }
        }
        Ok(())
    }
}

/// `POST /v1/vms/{name}/backups`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackup {
    /// The store to write to (default: `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

impl CreateBackup {
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(s) = &self.store {
            crate::validate::name("store", s)?;
        }
        Ok(())
    }

    pub fn store(&self) -> &str {
        self.store.as_deref().unwrap_or(DEFAULT_STORE)
    }
}

/// One backup of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    /// `STORE:NAME/TIME`.
    pub id: String,
    pub store: String,
    /// The VM's name when it was taken.
    pub vm: String,
    /// The VM's id (names are reused; ids are not).
    pub vm_id: String,
    /// The VM's project.
    pub project: String,
    pub time: DateTime<Utc>,
    pub disks: Vec<BackupDisk>,
    /// Why every block was read (first backup, no valid change tracking,
    /// ...); none for an incremental backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    pub duration_ms: u64,
    /// The last `backup verify`'s outcome; none if never verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<BackupVerified>,
    /// The backup key its chunks are sealed with (client-side encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// When a backup was last verified, and whether it was whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupVerified {
    pub at: DateTime<Utc>,
    pub ok: bool,
    /// Damaged or missing chunks (and unusable indexes) found.
    pub errors: u64,
}

impl Backup {
    pub fn incremental(&self) -> bool {
        self.full_reason.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupDisk {
    /// root, data, or a volume's id.
    pub name: String,
    pub size: u64,
    /// Bytes read from the disk for this backup.
    pub bytes_read: u64,
    /// Bytes of the previous backup's chunks fetched from the store to lay
    /// this backup's changes over (chunks changed in at most half).
    #[serde(default)]
    pub bytes_from_previous: u64,
    /// Chunks this backup added to the store.
    pub chunks_new: u64,
    /// Bytes those new chunks take in the store (compressed).
    pub stored_bytes: u64,
}

/// What `backup verify` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupVerification {
    pub id: String,
    /// Distinct chunks read back and checked against their digests.
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Each chunk missing or whose content does not match its digest (with
    /// the disk and offset it is for), or an index that does not match.
    pub errors: Vec<String>,
    pub ok: bool,
}

/// The backup a VM's disks are restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreSource {
    pub store: String,
    /// The backed-up VM's name.
    pub vm: String,
    /// RFC 3339, seconds, Z.
    pub time: String,
    /// The VM starts at once, reading the blocks not yet restored from the
    /// backup as the guest asks for them while the rest streams in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

/// How far a live restore (of the backup `spec.restore_from`) has come
/// (`VmStatus.live_restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LiveRestoreStatus {
    /// Bytes of the disks in the VM's own files so far, of `size`.
    pub done: u64,
    pub size: u64,
    /// Why the restore stopped (a damaged or missing chunk, named); the VM
    /// runs on, and reads of what is still missing fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl std::fmt::Display for RestoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.store, self.vm, self.time)
    }
}

/// `POST /v1/backups/{store}/{vm}/{time}/restore`: a new VM from a backup,
/// with the backed-up VM's settings and disks, and addresses and MACs of
/// its own; or, `in_place`, the backup's disks over a stopped VM's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBackup {
    /// The new VM's name (or, `in_place`, the stopped VM's).
    pub name: String,
    /// Start it once restored (default: leave it stopped).
    #[serde(default)]
    pub start: bool,
    /// Replace the disks of the stopped VM `name` (of the backup's project;
    /// without snapshots) with the backup's; its settings stay.
    #[serde(default)]
    pub in_place: bool,
    /// Start the new VM at once: its disks read the blocks not restored
    /// yet from the backup on demand while the rest streams in
    /// (`status.live_restore`). Implies `start`; not with `in_place`.
    #[serde(default)]
    pub live: bool,
    /// A new VM from a backup that holds volumes: restore its own disks
    /// only (volumes come back only in place, attached; without this such a
    /// restore is refused rather than leave their data behind unsaid).
    #[serde(default)]
    pub without_volumes: bool,
}

/// One line of the newline-delimited JSON a backup run streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupEvent {
    /// Bytes of disk `disk` gone through so far, of `size`.
    Progress { disk: String, done: u64, size: u64 },
    /// The backup is stored.
    Done(Backup),
    /// The backup failed; nothing of it is listed.
    Failed { message: String },
}

/// A disk of a backup being committed: its index and what reading it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitDisk {
    pub name: String,
    pub size: u64,
    /// The chunks' SHA-256 digests, 64 hex digits each, in disk order.
    pub digests: String,
    pub bytes_read: u64,
    #[serde(default)]
    pub bytes_from_previous: u64,
    pub chunks_new: u64,
    pub stored_bytes: u64,
}

/// `POST /v1/backup-stores/{store}/backups`: an agent's last step of a
/// backup, after every chunk is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitBackup {
    pub vm: String,
    pub vm_id: String,
    pub time: DateTime<Utc>,
    pub disks: Vec<CommitDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    pub duration_ms: u64,
    /// The backup key its chunks are sealed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// `POST /v1/backup-stores/{store}/chunks/known`: which of these chunks
/// the store has (each one it has is kept from garbage collection as if
/// written now).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkQuery {
    /// SHA-256 digests, 64 hex digits each (at most 4096).
    pub digests: Vec<String>,
}

/// Digests a [`ChunkQuery`] may ask about at once.
pub const MAX_CHUNK_QUERY: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChunkKnown {
    /// For each digest asked about, whether the store has its chunk.
    pub known: Vec<bool>,
}

/// What the server answers a chunk upload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChunkStored {
    /// Bytes the chunk takes in the store; 0 when it was there already.
    pub stored_bytes: u64,
    pub new: bool,
}

/// Retention: how many of the newest backups, and of the newest
/// hours/days/weeks/months/years (the newest backup of each), to keep.
/// Proxmox Backup Server's semantics: each rule in that order keeps the
/// newest backup of each of its N newest periods not already kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub keep_yearly: Option<u32>,
}

impl KeepRules {
    pub fn validate(&self) -> Result<(), FieldError> {
        let rules = [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
            ("keep_yearly", self.keep_yearly),
        ];
        for (field, n) in rules {
            if n.is_some_and(|n| !(1..=100_000).contains(&n)) {
                return Err(FieldError::new(field, "1 to 100000"));
            }
        }
        if rules.iter().all(|(_, n)| n.is_none()) {
            return Err(FieldError::new(
                "keep",
                "at least one keep rule (a prune without one would keep everything)",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/backups/prune`: removes a VM's backups in a store that the
/// rules do not keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneBackups {
    /// The VM (by the name its backups carry).
    pub vm: String,
    /// The store (default: `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    pub keep: KeepRules,
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneResult {
    /// Backup ids kept, newest first.
    pub kept: Vec<String>,
    /// Backup ids removed (or, in a dry run, that would be).
    pub removed: Vec<String>,
}

/// What a garbage collection of a store did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GcResult {
    /// Chunks finished backups name.
    pub chunks_in_use: u64,
    /// Chunks no backup names yet, kept as a backup being written may need them.
    pub chunks_recent: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Backups begun long ago and never finished, removed.
    pub abandoned_removed: u64,
    pub duration_ms: u64,
}

/// `POST /v1/backup-stores/{store}/sync`: copies into the store the
/// backups another store has and it lacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncBackups {
    /// The store to copy from.
    pub from: String,
    /// Only this VM's backups (by the name they carry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Chunk transfers at once (default 32): a long round trip needs many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 256)]
    pub in_flight: Option<u32>,
}

impl SyncBackups {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate::name("from", &self.from)?;
        if let Some(vm) = &self.vm {
            crate::validate::name("vm", vm)?;
        }
        if self.in_flight.is_some_and(|n| !(1..=256).contains(&n)) {
            return Err(FieldError::new("in_flight", "1 to 256"));
        }
        Ok(())
    }
}

/// How far a sync has got.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SyncProgress {
    pub chunks_done: u64,
    /// Chunks the destination lacks.
    pub chunks_total: u64,
    /// Bytes of those copied (as stored: compressed).
    pub bytes_done: u64,
}

/// What a sync copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SyncResult {
    /// Backups copied (ids as at the source: `NAME/TIME`).
    pub backups_copied: Vec<String>,
    /// Backups the destination had already.
    pub backups_present: u64,
    pub chunks_copied: u64,
    /// Chunks the copied backups name that the destination had.
    pub chunks_present: u64,
    pub bytes_copied: u64,
    pub duration_ms: u64,
}

/// One line of the newline-delimited JSON a sync streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncEvent {
    Progress(SyncProgress),
    Done(SyncResult),
    Failed { message: String },
}

/// A backup key's id: 16 lowercase hex digits.
pub fn valid_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits `STORE:NAME/TIME` into its parts.
pub fn parse_backup_id(id: &str) -> Option<(&str, &str, &str)> {
    let (store, rest) = id.split_once(':')?;
    let (vm, time) = rest.split_once('/')?;
    (!store.is_empty() && !vm.is_empty() && !time.is_empty()).then_some((store, vm, time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_ids_split_into_store_vm_and_time() {
        assert_eq!(
            parse_backup_id("local:web-1/2026-12-04T19:00:00Z"),
            Some(("local", "web-1", "2026-12-04T19:00:00Z"))
        );
        assert_eq!(parse_backup_id("web-1/2026-12-04T19:00:00Z"), None);
        assert_eq!(parse_backup_id("local:web-1"), None);
        assert_eq!(parse_backup_id("local:/x"), None);
    }

    #[test]
    fn store_paths_must_be_absolute_and_plain() {
        let store = |path: &str| CreateBackupStore {
            name: "offsite".into(),
            path: Some(path.into()),
            url: None,
            encryption_key_id: None,
        };
        assert!(store("/srv/backups").validate().is_ok());
        assert!(store("backups").validate().is_err());
        assert!(store("/srv/../etc").validate().is_err());
        let remote = |url: &str| CreateBackupStore {
            name: "offsite".into(),
            path: None,
            url: Some(url.into()),
            encryption_key_id: None,
        };
        assert!(remote("https://10.0.0.2:7443").validate().is_ok());
        assert!(remote("https://backup.example:7443/").validate().is_ok());
        for bad in ["http://10.0.0.2:7443", "https://", "https://a/b", "https://u@h:1"] {
            assert!(remote(bad).validate().is_err(), "{bad}");
        }
        let both = CreateBackupStore {
            url: Some("https://h:1".into()),
            ..store("/srv/backups")
        };
        assert!(both.validate().is_err());
        let sealed = |id: &str| CreateBackupStore {
            encryption_key_id: Some(id.into()),
            ..store("/srv/backups")
        };
        assert!(sealed("0123456789abcdef").validate().is_ok());
        assert!(sealed("0123456789ABCDEF").validate().is_err());
        assert!(sealed("0123").validate().is_err());
    }
}
