//! Where a backup goes: a datastore, here (a directory the agent opens)
//! or the server's (over mTLS, next).

use std::future::Future;

use novacron_backup::{BackupId, Datastore, DiskStats, FixedIndex, Manifest};

use super::{BackupError, ChunkSink};

/// The disks of a backup: name, index, what reading it took.
pub type DiskIndexes = Vec<(String, FixedIndex, DiskStats)>;

/// A VM's newest backup in a store, with its disks' indexes by name.
pub type Latest = Option<(BackupId, Vec<(String, FixedIndex)>)>;

pub trait BackupTarget: ChunkSink + Sync {
    /// The store's name, as the chain record keeps it.
    fn name(&self) -> &str;

    /// The VM's newest backup there, with its disks' indexes by name.
    fn latest(&self, vm: &str) -> impl Future<Output = Result<Latest, BackupError>> + Send;

    /// Writes backup `id` of `disks` (whose chunks are stored): the last
    /// step, after which it is listed.
    fn commit(
        &self,
        id: &BackupId,
        vm_id: &str,
        disks: DiskIndexes,
        full_reason: Option<String>,
        duration_ms: u64,
    ) -> impl Future<Output = Result<Manifest, BackupError>> + Send;
}

/// A datastore in a local directory.
#[derive(Debug, Clone)]
pub struct LocalTarget {
    pub name: String,
    pub store: Datastore,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, novacron_backup::StoreError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
        .map_err(|e| BackupError::Sink(novacron_api::error::chain(&e).to_string()))
}

impl ChunkSink for LocalTarget {
    async fn put(&self, digest: novacron_backup::Digest, encoded: Vec<u8>) -> Result<Option<u64>, BackupError> {
        let store = self.store.clone();
        blocking(move || store.insert_encoded(&digest, &encoded)).await
    }
}

impl BackupTarget for LocalTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn latest(&self, vm: &str) -> Result<Latest, BackupError> {
        let store = self.store.clone();
        let vm = vm.to_string();
        blocking(move || {
            let Some(last) = store.list(Some(&vm))?.pop() else {
                return Ok(None);
            };
            let mut disks = Vec::new();
            for d in &last.disks {
                disks.push((d.name.clone(), store.index(&last.id, &d.name)?));
            }
            Ok(Some((last.id, disks)))
        })
        .await
    }

    async fn commit(
        &self,
        id: &BackupId,
        vm_id: &str,
        disks: DiskIndexes,
        full_reason: Option<String>,
        duration_ms: u64,
    ) -> Result<Manifest, BackupError> {
        let store = self.store.clone();
        let (id, vm_id) = (id.clone(), vm_id.to_string());
        blocking(move || {
            let mut w = store.begin(&id)?;
            for (name, index, stats) in &disks {
                if let Err(e) = w.add_disk(name, index, *stats) {
                    w.abort();
                    return Err(e);
                }
            }
            w.finish(&vm_id, full_reason, duration_ms)
        })
        .await
    }
}
