//! One handle over the datastores the server uses: a directory of its own,
//! or a `backup-store` process reached over HTTPS.

use std::time::Duration;

use bytes::Bytes;
use novacron_backup::gc::GcReport;
use novacron_backup::verify::VerifyReport;
use novacron_backup::{BackupId, BackupInfo, Datastore, Digest, DiskStats, FixedIndex, Manifest, StoreError, Verified};
use serde::{Deserialize, Serialize};

use crate::client::RemoteStore;
use crate::wire::BackupView;

/// What kind of failure an error is, for the status an API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    /// The backup exists, or a chunk it names is missing.
    Conflict,
    /// A malformed name, chunk or index.
    Invalid,
    /// The caller may not use the store.
    Forbidden,
    /// The store cannot do it now (unreachable, full, unreadable).
    Unavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Backup store {url}: {message}")]
    Answered {
        url: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("Cannot reach backup store {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("A backup store task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl HandleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HandleError::Store(e) => match e {
                StoreError::NotFound(_) => ErrorKind::NotFound,
                StoreError::Exists(_) | StoreError::MissingChunk(_) => ErrorKind::Conflict,
                StoreError::Name { .. } | StoreError::Chunk { .. } => ErrorKind::Invalid,
                StoreError::Io { .. }
                | StoreError::Full { .. }
                | StoreError::NotADatastore(_)
                | StoreError::Index { .. }
                | StoreError::IndexDigest { .. }
                | StoreError::Manifest { .. } => ErrorKind::Unavailable,
            },
            HandleError::Answered { kind, .. } => *kind,
            HandleError::Unreachable { .. } | HandleError::Task(_) => ErrorKind::Unavailable,
        }
    }
}

/// A datastore, wherever it is.
#[derive(Debug, Clone)]
pub enum StoreHandle {
    Local(Datastore),
    Remote(RemoteStore),
}

impl StoreHandle {
    async fn local<T: Send + 'static>(
        ds: &Datastore,
        f: impl FnOnce(&Datastore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, HandleError> {
        let ds = ds.clone();
        tokio::task::spawn_blocking(move || f(&ds))
            .await
            .map_err(HandleError::Task)?
            .map_err(HandleError::Store)
    }

    /// Finished backups, of one VM or all, oldest first, each with its
    /// last verify's outcome.
    pub async fn list(&self, vm: Option<&str>) -> Result<Vec<BackupView>, HandleError> {
        let vm = vm.map(str::to_string);
        match self {
            StoreHandle::Local(ds) => {
                Self::local(ds, move |ds| {
                    ds.list(vm.as_deref())?
                        .into_iter()
                        .map(|manifest| {
                            let verified = ds.verified(&manifest.id)?;
                            Ok(BackupView { manifest, verified })
                        })
                        .collect()
                })
                .await
            }
            StoreHandle::Remote(r) => r.list(vm.as_deref()).await,
        }
    }

    /// A backup's manifest and its last verify's outcome.
    pub async fn view(&self, id: &BackupId) -> Result<(Manifest, Option<Verified>), HandleError> {
        let id = id.clone();
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| Ok((ds.manifest(&id)?, ds.verified(&id)?))).await,
            StoreHandle::Remote(r) => r.view(&id).await,
        }
    }

    pub async fn delete(&self, id: &BackupId) -> Result<(), HandleError> {
        let id = id.clone();
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| ds.delete(&id)).await,
            StoreHandle::Remote(r) => r.delete(&id).await,
        }
    }

    /// Reads every chunk of a backup back (where the store is) and checks
    /// it against its digest; the outcome is kept with the backup (a
    /// damaged one stays marked until a verify finds it whole).
    pub async fn verify(&self, id: &BackupId) -> Result<VerifyReport, HandleError> {
        let id = id.clone();
        match self {
            StoreHandle::Local(ds) => {
                Self::local(ds, move |ds| {
                    let report = novacron_backup::verify::verify_backup(ds, &id, &mut Default::default())?;
                    let mark = Verified {
                        at: chrono::Utc::now(),
                        ok: report.ok(),
                        errors: report.errors.clone(),
                    };
                    ds.mark_verified(&id, &mark)?;
                    Ok(report)
                })
                .await
            }
            StoreHandle::Remote(r) => r.verify(&id).await,
        }
    }

    pub async fn collect_garbage(&self, grace: Duration) -> Result<GcReport, HandleError> {
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| novacron_backup::gc::collect_garbage(ds, grace)).await,
            StoreHandle::Remote(r) => r.collect_garbage(grace).await,
        }
    }

    /// Which of these chunks the store has; each it has is kept from
    /// garbage collection as if written now.
    pub async fn known(&self, digests: Vec<Digest>) -> Result<Vec<bool>, HandleError> {
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| digests.iter().map(|d| ds.touch(d)).collect()).await,
            StoreHandle::Remote(r) => r.known(&digests).await,
        }
    }

    /// Stores a chunk's encoded file, checked against `digest` first.
    /// Returns the bytes it took, or none if it was there.
    pub async fn insert_encoded(&self, digest: Digest, file: Bytes) -> Result<Option<u64>, HandleError> {
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| ds.insert_encoded(&digest, &file)).await,
            StoreHandle::Remote(r) => r.insert_encoded(&digest, file).await,
        }
    }

    /// A chunk's file as stored (the reader decodes and checks it).
    pub async fn chunk_file(&self, digest: Digest) -> Result<Bytes, HandleError> {
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| ds.chunk_file(&digest).map(Bytes::from)).await,
            StoreHandle::Remote(r) => r.chunk_file(&digest).await,
        }
    }

    /// Writes a backup whose chunks are all stored.
    pub async fn write_backup(
        &self,
        id: &BackupId,
        disks: Vec<(String, FixedIndex, DiskStats)>,
        info: BackupInfo,
    ) -> Result<Manifest, HandleError> {
        let id = id.clone();
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| ds.write_backup(&id, &disks, info)).await,
            StoreHandle::Remote(r) => r.write_backup(&id, &disks, info).await,
        }
    }

    /// A disk's index in a backup.
    pub async fn index(&self, id: &BackupId, disk: &str) -> Result<FixedIndex, HandleError> {
        let (id, disk) = (id.clone(), disk.to_string());
        match self {
            StoreHandle::Local(ds) => Self::local(ds, move |ds| ds.index(&id, &disk)).await,
            StoreHandle::Remote(r) => r.index(&id, &disk).await,
        }
    }
}
