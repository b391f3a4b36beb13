//! Where a backup goes: a datastore the server serves (over mTLS, with
//! the node's certificate), or one in a local directory (tests, tools).

use std::future::Future;

use novacron_api::backup::{ChunkKnown, ChunkQuery, ChunkStored, CommitBackup};
use novacron_api::Backup;
use novacron_backup::{BackupId, BackupInfo, Codec, Datastore, Digest, DiskStats, FixedIndex};
use novacron_client::Client;

use super::{remote, BackupError, ChunkSink};

/// The disks of a backup: name, index, what reading it took.
pub type DiskIndexes = Vec<(String, FixedIndex, DiskStats)>;

/// A VM's newest backup in a store.
pub struct LatestBackup {
    pub id: BackupId,
    /// The backup key its chunks are sealed with.
    pub key_id: Option<String>,
    /// Its disks' indexes by name.
    pub disks: Vec<(String, FixedIndex)>,
}

impl LatestBackup {
    pub fn disk(&self, name: &str) -> Option<&FixedIndex> {
        self.disks.iter().find(|(n, _)| n == name).map(|(_, i)| i)
    }
}

pub type Latest = Option<LatestBackup>;

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
    ) -> impl Future<Output = Result<Backup, BackupError>> + Send;
}

/// A datastore in a local directory.
#[derive(Debug, Clone)]
pub struct LocalTarget {
    pub name: String,
    pub store: Datastore,
    pub codec: Codec,
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
    fn codec(&self) -> &Codec {
        &self.codec
    }

    async fn put(&self, digest: novacron_backup::Digest, encoded: Vec<u8>) -> Result<Option<u64>, BackupError> {
        let store = self.store.clone();
        blocking(move || store.insert_encoded(&digest, &encoded)).await
    }

    async fn get(&self, digest: Digest) -> Result<Vec<u8>, BackupError> {
        let store = self.store.clone();
        blocking(move || store.chunk_file(&digest)).await
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
            Ok(Some(LatestBackup {
                id: last.id,
                key_id: last.key_id,
                disks,
            }))
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
    ) -> Result<Backup, BackupError> {
        let store = self.store.clone();
        let id = id.clone();
        let info = BackupInfo {
            vm_id: vm_id.into(),
            project: String::new(),
            full_reason,
            duration_ms,
            config: None,
            key_id: self.codec.key_id(),
        };
        let manifest = blocking(move || store.write_backup(&id, &disks, info)).await?;
        Ok(manifest.to_api(&self.name))
    }
}

/// A store the server serves, written through its API with this node's
/// credentials.
#[derive(Clone)]
pub struct RemoteTarget {
    pub name: String,
    pub client: Client,
    pub codec: Codec,
}

impl ChunkSink for RemoteTarget {
    fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Asks first whether the store has the chunk (a chunk another disk or
    /// VM stored is not sent again), then sends it.
    async fn put(&self, digest: Digest, encoded: Vec<u8>) -> Result<Option<u64>, BackupError> {
        let hex = digest.to_hex();
        let query = ChunkQuery {
            digests: vec![hex.clone()],
        };
        let known: ChunkKnown = self
            .client
            .post_json(&format!("backup-stores/{}/chunks/known", self.name), &query)
            .await
            .map_err(|e| remote(&format!("asking store {} about chunk {hex}", self.name), e))?;
        match known.known.as_slice() {
            [true] => return Ok(None),
            [false] => {}
            other => {
                return Err(BackupError::Sink(format!(
                    "the store answered {} flags for one chunk",
                    other.len()
                )))
            }
        }
        let stored: ChunkStored = self
            .client
            .put_bytes(&format!("backup-stores/{}/chunks/{hex}", self.name), encoded)
            .await
            .map_err(|e| remote(&format!("storing chunk {hex} in {}", self.name), e))?;
        Ok(stored.new.then_some(stored.stored_bytes))
    }

    async fn get(&self, digest: Digest) -> Result<Vec<u8>, BackupError> {
        let hex = digest.to_hex();
        let bytes = self
            .client
            .get_bytes(&format!("backup-stores/{}/chunks/{hex}", self.name))
            .await
            .map_err(|e| remote(&format!("fetching chunk {hex} from {}", self.name), e))?;
        Ok(bytes.to_vec())
    }
}

impl BackupTarget for RemoteTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn latest(&self, vm: &str) -> Result<Latest, BackupError> {
        let backups: Vec<Backup> = self
            .client
            .get_query(
                "backups",
                &[("store".into(), self.name.clone()), ("vm".into(), vm.into())],
            )
            .await
            .map_err(|e| remote(&format!("listing the backups of {vm} in {}", self.name), e))?;
        let Some(last) = backups.into_iter().max_by_key(|b| b.time) else {
            return Ok(None);
        };
        let id = BackupId {
            vm: last.vm.clone(),
            time: last.time,
        };
        let mut disks = Vec::new();
        for d in &last.disks {
            let path = format!(
                "backup-stores/{}/backups/{}/{}/disks/{}/index",
                self.name,
                id.vm,
                id.time_name(),
                d.name
            );
            let bytes = self
                .client
                .get_bytes(&path)
                .await
                .map_err(|e| remote(&format!("the index of {id} disk {}", d.name), e))?;
            let index = FixedIndex::from_bytes(&bytes)
                .map_err(|e| BackupError::Sink(format!("the index of {id} disk {}: {e}", d.name)))?;
            disks.push((d.name.clone(), index));
        }
        Ok(Some(LatestBackup {
            id,
            key_id: last.key_id,
            disks,
        }))
    }

    async fn commit(
        &self,
        id: &BackupId,
        vm_id: &str,
        disks: DiskIndexes,
        full_reason: Option<String>,
        duration_ms: u64,
    ) -> Result<Backup, BackupError> {
        let req = CommitBackup {
            vm: id.vm.clone(),
            vm_id: vm_id.into(),
            time: id.time,
            disks: disks
                .iter()
                .map(|(name, index, stats)| novacron_backup::commit_disk(name, index, stats))
                .collect(),
            full_reason,
            duration_ms,
            key_id: self.codec.key_id(),
        };
        self.client
            .post_json(&format!("backup-stores/{}/backups", self.name), &req)
            .await
            .map_err(|e| remote(&format!("committing {id} to {}", self.name), e))
    }
}
