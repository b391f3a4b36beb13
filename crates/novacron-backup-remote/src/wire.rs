//! The bodies of the backup-store protocol (`/store/v1/...`).

use novacron_api::backup::CommitDisk;
use novacron_backup::{Manifest, Verified};
use serde::{Deserialize, Serialize};

use crate::handle::ErrorKind;

/// `POST /store/v1/chunks/known`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnownRequest {
    /// SHA-256 digests, hex.
    pub digests: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnownAnswer {
    pub known: Vec<bool>,
}

/// The answer to `PUT /store/v1/chunks/{digest}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Stored {
    /// Bytes the chunk took; none when it was there already.
    pub stored_bytes: Option<u64>,
}

/// `GET /store/v1/backups/{vm}/{time}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupView {
    pub manifest: Manifest,
    pub verified: Option<Verified>,
}

/// `PUT /store/v1/backups/{vm}/{time}`: a backup whose chunks are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteBackup {
    pub disks: Vec<CommitDisk>,
    pub vm_id: String,
    pub project: String,
    pub full_reason: Option<String>,
    pub duration_ms: u64,
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub key_id: Option<String>,
}

/// Every error answer's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Most digests one `known` request may ask about.
pub const MAX_KNOWN: usize = 4096;
/// Largest chunk upload (a 4 MiB chunk stored uncompressed, with its header).
pub const MAX_CHUNK_BODY: usize = 4 * 1024 * 1024 + 1024;
/// Largest backup write (the disks' digests in hex).
pub const MAX_WRITE_BODY: usize = 80 * 1024 * 1024;
