//! Verify: every chunk a backup names is read back and checked against its
//! digest: a plain chunk's content, a sealed chunk's file (its content and
//! tag need the key, which only agents hold: a restore checks those).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::chunk::Digest;
use crate::manifest::BackupId;
use crate::store::{Datastore, StoreError};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Distinct chunks read and checked.
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// What is wrong: each bad or missing chunk (with the disk and offset
    /// it is for), or an index that does not match its manifest.
    pub errors: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Verifies backup `id`. Chunks already found good (in `good`, shared
/// across the backups of one run) are not read again.
pub fn verify_backup(store: &Datastore, id: &BackupId, good: &mut HashSet<Digest>) -> Result<VerifyReport, StoreError> {
    let manifest = store.manifest(id)?;
    let mut report = VerifyReport::default();
    for disk in &manifest.disks {
        let index = match store.index(id, &disk.name) {
            Ok(i) => i,
            Err(e) => {
                report.errors.push(format!("disk {}: {}", disk.name, chain(&e)));
                continue;
            }
        };
        for (n, d) in index.digests.iter().enumerate() {
            if good.contains(d) {
                continue;
            }
            match store.check_chunk(d) {
                Ok(bytes) => {
                    report.chunks_checked += 1;
                    report.bytes_checked += bytes;
                    good.insert(*d);
                }
                Err(e) => report.errors.push(format!(
                    "disk {} at offset {}: {}",
                    disk.name,
                    n as u64 * index.chunk_size,
                    chain(&e)
                )),
            }
        }
    }
    Ok(report)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
