//! A datastore directory: chunks stored once, backups as directories of
//! indexes and a manifest.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};

use crate::chunk::{self, ChunkError, Digest};
use crate::index::{FixedIndex, IndexError};
use crate::manifest::{valid_disk_name, valid_vm_name, BackupId, DiskEntry, Manifest};

const CHUNKS: &str = ".chunks";
const MANIFEST: &str = "manifest.json";
/// The last verify's outcome, beside the manifest.
const VERIFIED: &str = "verified.json";
/// In a backup being written: when it began (RFC 3339), for the garbage
/// collector, which keeps every chunk written since.
const STARTED: &str = "started";
const PARTIAL: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The store's disk is full: cannot {what}")]
    Full {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a datastore (no {CHUNKS} directory)")]
    NotADatastore(String),
    #[error("Chunk {0} is missing")]
    MissingChunk(Digest),
    #[error("Chunk {digest} is unusable")]
    Chunk {
        digest: Digest,
        #[source]
        source: ChunkError,
    },
    #[error("Index {path} is unusable")]
    Index {
        path: String,
        #[source]
        source: IndexError,
    },
    #[error("The index of disk {disk} in backup {id} does not match its manifest")]
    IndexDigest { id: String, disk: String },
    #[error("No backup {0}")]
    NotFound(String),
    #[error("Backup {0} already exists")]
    Exists(String),
    #[error("Manifest {path} is unusable")]
    Manifest {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Invalid {what} name {name:?}")]
    Name { what: &'static str, name: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| match source.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => StoreError::Full { what, source },
        _ => StoreError::Io { what, source },
    }
}

/// Writes `bytes` to `path` through a file beside it, synced, then renamed;
/// a failed write leaves nothing behind.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(format!("write {}", path.display()))(e)
    })
}

#[derive(Debug, Clone)]
pub struct Datastore {
    root: PathBuf,
}

impl Datastore {
    /// Makes a datastore in `root` (or opens the one there).
    pub fn create(root: &Path) -> Result<Datastore, StoreError> {
        for d in [root.join(CHUNKS), root.join("vm")] {
            fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        }
        Ok(Datastore { root: root.into() })
    }

    pub fn open(root: &Path) -> Result<Datastore, StoreError> {
        if !root.join(CHUNKS).is_dir() {
            return Err(StoreError::NotADatastore(root.display().to_string()));
        }
        Ok(Datastore { root: root.into() })
    }

    pub(crate) fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS)
    }

    pub(crate) fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.chunks_dir().join(&hex[..2]).join(hex)
    }

    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_path(d).exists()
    }

    /// Stores `data` as a chunk unless the store has it. Returns its digest
    /// and the bytes it now takes when it was new (`None`: it was there).
    pub fn insert_chunk(&self, data: &[u8]) -> Result<(Digest, Option<u64>), StoreError> {
        let digest = Digest::of(data);
        if self.touch(&digest)? {
            return Ok((digest, None));
        }
        let file = chunk::encode(data);
        self.put(&digest, &file)?;
        Ok((digest, Some(file.len() as u64)))
    }

    /// Stores a chunk a client encoded, after checking it against `digest`
    /// (a client must not be able to put wrong data under a digest that
    /// other backups share): a plain chunk's content, a sealed one's file.
    pub fn insert_encoded(&self, digest: &Digest, file: &[u8]) -> Result<Option<u64>, StoreError> {
        if self.touch(digest)? {
            return Ok(None);
        }
        chunk::check(file, digest).map_err(|source| StoreError::Chunk {
            digest: *digest,
            source,
        })?;
        self.put(digest, file)?;
        Ok(Some(file.len() as u64))
    }

    /// Marks a chunk as used now, if the store has it: a garbage collection
    /// that runs meanwhile keeps it.
    pub fn touch(&self, d: &Digest) -> Result<bool, StoreError> {
        let path = self.chunk_path(d);
        match fs::File::options().write(true).open(&path) {
            Ok(f) => {
                f.set_modified(SystemTime::now())
                    .map_err(io(format!("touch {}", path.display())))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(format!("open {}", path.display()))(e)),
        }
    }

    fn put(&self, digest: &Digest, file: &[u8]) -> Result<(), StoreError> {
        let path = self.chunk_path(digest);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        // A name aside of its own (process and write): two writers of the
        // same chunk, in two processes or in one, both succeed.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        fs::write(&tmp, file)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| {
                // A chunk that did not fit leaves nothing behind.
                let _ = fs::remove_file(&tmp);
                io(format!("write chunk {digest}"))(e)
            })
    }

    /// A chunk's file as stored (header, then the data, compressed or not),
    /// for a reader that checks it itself.
    pub fn chunk_file(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(d);
        match fs::read(&path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::MissingChunk(*d)),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    /// A plain chunk's content, checked against its digest.
    pub fn read_chunk(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let file = self.chunk_file(d)?;
        chunk::decode(&file, d).map_err(|source| StoreError::Chunk { digest: *d, source })
    }

    /// Reads a chunk back and checks it as [`chunk::check`] does (without
    /// any key); the bytes checked.
    pub fn check_chunk(&self, d: &Digest) -> Result<u64, StoreError> {
        let file = self.chunk_file(d)?;
        chunk::check(&file, d).map_err(|source| StoreError::Chunk { digest: *d, source })
    }

    fn backup_dir(&self, id: &BackupId) -> PathBuf {
        self.root.join(id.rel_dir())
    }

    /// Starts writing backup `id`; nothing shows in the store until
    /// [`BackupWriter::finish`].
    pub fn begin(&self, id: &BackupId) -> Result<BackupWriter, StoreError> {
        if !valid_vm_name(&id.vm) {
            return Err(StoreError::Name {
                what: "VM",
                name: id.vm.clone(),
            });
        }
        if self.backup_dir(id).exists() {
            return Err(StoreError::Exists(id.to_string()));
        }
        let partial = self.root.join(format!("vm/{}/.{}{PARTIAL}", id.vm, id.time_name()));
        // A leftover of the same backup cut short.
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).map_err(io(format!("create {}", partial.display())))?;
        write_atomic(&partial.join(STARTED), Utc::now().to_rfc3339().as_bytes())?;
        Ok(BackupWriter {
            store: self.clone(),
            id: id.clone(),
            partial,
            disks: Vec::new(),
        })
    }

    /// Writes backup `id` of `disks` (name, index, what reading it took),
    /// whose chunks are all stored, in one go.
    pub fn write_backup(
        &self,
        id: &BackupId,
        disks: &[(String, FixedIndex, DiskStats)],
        about: BackupInfo,
    ) -> Result<Manifest, StoreError> {
        let mut w = self.begin(id)?;
        for (name, index, stats) in disks {
            if let Err(e) = w.add_disk(name, index, *stats) {
                w.abort();
                return Err(e);
            }
        }
        w.finish(about)
    }

    /// The finished backups, of one VM or all, oldest first.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for vm in self.vms(vm)? {
            let dir = self.root.join("vm").join(&vm);
            for e in fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
                let e = e.map_err(io(format!("list {}", dir.display())))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = BackupId::parse(&vm, &name) {
                    out.push(self.manifest(&id)?);
                }
            }
        }
        out.sort_by(|a, b| a.id.time.cmp(&b.id.time).then_with(|| a.id.vm.cmp(&b.id.vm)));
        Ok(out)
    }

    fn vms(&self, only: Option<&str>) -> Result<Vec<String>, StoreError> {
        if let Some(vm) = only {
            let exists = valid_vm_name(vm) && self.root.join("vm").join(vm).is_dir();
            return Ok(if exists { vec![vm.to_string()] } else { Vec::new() });
        }
        let dir = self.root.join("vm");
        let mut vms = Vec::new();
        for e in fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
            let name = e.map_err(io(format!("list {}", dir.display())))?.file_name();
            let name = name.to_string_lossy();
            if valid_vm_name(&name) {
                vms.push(name.into_owned());
            }
        }
        Ok(vms)
    }

    pub fn manifest(&self, id: &BackupId) -> Result<Manifest, StoreError> {
        let path = self.backup_dir(id).join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(id.to_string())),
            Err(e) => return Err(io(format!("read {}", path.display()))(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Manifest {
            path: path.display().to_string(),
            source,
        })
    }

    /// Keeps the outcome of a verify of backup `id` (a damaged backup stays
    /// marked until a verify finds it whole).
    pub fn mark_verified(&self, id: &BackupId, mark: &Verified) -> Result<(), StoreError> {
        let dir = self.backup_dir(id);
        if !dir.join(MANIFEST).exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let json = serde_json::to_vec_pretty(mark).map_err(|source| StoreError::Manifest {
            path: dir.join(VERIFIED).display().to_string(),
            source,
        })?;
        write_atomic(&dir.join(VERIFIED), &json)
    }

    /// The outcome of the last verify of backup `id`, if it was verified.
    pub fn verified(&self, id: &BackupId) -> Result<Option<Verified>, StoreError> {
        let path = self.backup_dir(id).join(VERIFIED);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Manifest {
                    path: path.display().to_string(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    /// Disk `disk`'s index in backup `id`, checked against the manifest.
    pub fn index(&self, id: &BackupId, disk: &str) -> Result<FixedIndex, StoreError> {
        let manifest = self.manifest(id)?;
        let entry = manifest
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| StoreError::NotFound(format!("{id} disk {disk}")))?;
        let path = self.backup_dir(id).join(format!("{disk}.fidx"));
        let bytes = fs::read(&path).map_err(io(format!("read {}", path.display())))?;
        if hex::encode(Sha256::digest(&bytes)) != entry.index_sha256 {
            return Err(StoreError::IndexDigest {
                id: id.to_string(),
                disk: disk.into(),
            });
        }
        FixedIndex::from_bytes(&bytes).map_err(|source| StoreError::Index {
            path: path.display().to_string(),
            source,
        })
    }

    /// Removes a backup; its chunks stay until a garbage collection finds
    /// that no other backup uses them.
    pub fn delete(&self, id: &BackupId) -> Result<(), StoreError> {
        let dir = self.backup_dir(id);
        if !dir.join(MANIFEST).exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        // Renamed first, so a delete cut short never leaves a backup
        // without some of its indexes.
        let doomed = self.root.join(format!("vm/{}/.{}.deleted", id.vm, id.time_name()));
        fs::rename(&dir, &doomed).map_err(io(format!("rename {}", dir.display())))?;
        fs::remove_dir_all(&doomed).map_err(io(format!("remove {}", doomed.display())))
    }

    /// Backups being written now (or cut short), with when each began.
    pub(crate) fn in_progress(&self) -> Result<Vec<InProgress>, StoreError> {
        let mut out = Vec::new();
        for vm in self.vms(None)? {
            let dir = self.root.join("vm").join(&vm);
            for e in fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
                let e = e.map_err(io(format!("list {}", dir.display())))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && (name.ends_with(PARTIAL) || name.ends_with(".deleted")) {
                    let started = fs::read_to_string(e.path().join(STARTED))
                        .ok()
                        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
                        .map(|t| t.with_timezone(&Utc));
                    out.push((e.path(), started));
                }
            }
        }
        Ok(out)
    }

    /// Every chunk the finished backups name.
    pub(crate) fn referenced(&self) -> Result<HashSet<Digest>, StoreError> {
        let mut used = HashSet::new();
        for m in self.list(None)? {
            for d in &m.disks {
                used.extend(self.index(&m.id, &d.name)?.digests);
            }
        }
        Ok(used)
    }
}

/// A backup directory not (or no longer) listed: its path, and when it
/// began if it is being written.
pub(crate) type InProgress = (PathBuf, Option<DateTime<Utc>>);

/// A backup being written: disks are added one by one, then the manifest.
pub struct BackupWriter {
    store: Datastore,
    id: BackupId,
    partial: PathBuf,
    disks: Vec<DiskEntry>,
}

/// The outcome of a verify, kept with the backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    pub at: DateTime<Utc>,
    pub ok: bool,
    /// What was wrong (damaged or missing chunks, an index that does not match).
    pub errors: Vec<String>,
}

/// What a backup's manifest says beside its disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupInfo {
    /// The VM's id (names are reused; ids are not).
    pub vm_id: String,
    /// The VM's project: who may see and restore the backup.
    pub project: String,
    /// Why every block was read; none for an incremental backup.
    pub full_reason: Option<String>,
    pub duration_ms: u64,
    /// The VM's settings (see [`Manifest::config`]).
    pub config: Option<serde_json::Value>,
    /// The backup key its chunks are sealed with.
    pub key_id: Option<String>,
}

/// What reading one disk for a backup took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub bytes_read: u64,
    /// Bytes of the previous backup's chunks that changes were laid over.
    pub bytes_from_previous: u64,
    pub chunks_new: u64,
    pub stored_bytes: u64,
}

/// A disk of a backup as the API and the backup-store protocol carry it
/// (digests in hex).
pub fn commit_disk(name: &str, index: &FixedIndex, stats: &DiskStats) -> novacron_api::backup::CommitDisk {
    novacron_api::backup::CommitDisk {
        name: name.into(),
        size: index.size,
        digests: index.digests.iter().map(Digest::to_hex).collect(),
        bytes_read: stats.bytes_read,
        bytes_from_previous: stats.bytes_from_previous,
        chunks_new: stats.chunks_new,
        stored_bytes: stats.stored_bytes,
    }
}

/// A disk's index and stats back from [`commit_disk`]'s form.
pub fn from_commit_disk(
    d: &novacron_api::backup::CommitDisk,
) -> Result<(FixedIndex, DiskStats), crate::index::IndexError> {
    let stats = DiskStats {
        bytes_read: d.bytes_read,
        bytes_from_previous: d.bytes_from_previous,
        chunks_new: d.chunks_new,
        stored_bytes: d.stored_bytes,
    };
    Ok((FixedIndex::from_hex(d.size, &d.digests)?, stats))
}

impl BackupWriter {
    /// Adds disk `name`'s index. Every chunk it names must be in the store
    /// (each is touched, so a garbage collection running now keeps it).
    pub fn add_disk(&mut self, name: &str, index: &FixedIndex, stats: DiskStats) -> Result<(), StoreError> {
        if !valid_disk_name(name) || self.disks.iter().any(|d| d.name == name) {
            return Err(StoreError::Name {
                what: "disk",
                name: name.into(),
            });
        }
        for d in &index.digests {
            if !self.store.touch(d)? {
                return Err(StoreError::MissingChunk(*d));
            }
        }
        let bytes = index.to_bytes();
        write_atomic(&self.partial.join(format!("{name}.fidx")), &bytes)?;
        self.disks.push(DiskEntry {
            name: name.into(),
            size: index.size,
            index_sha256: hex::encode(Sha256::digest(&bytes)),
            bytes_read: stats.bytes_read,
            bytes_from_previous: stats.bytes_from_previous,
            chunks_new: stats.chunks_new,
            stored_bytes: stats.stored_bytes,
        });
        Ok(())
    }

    /// Writes the manifest and puts the backup in place: from now on it
    /// is listed.
    pub fn finish(self, about: BackupInfo) -> Result<Manifest, StoreError> {
        let manifest = Manifest {
            id: self.id.clone(),
            vm_id: about.vm_id,
            project: about.project,
            disks: self.disks.clone(),
            full_reason: about.full_reason,
            duration_ms: about.duration_ms,
            config: about.config,
            key_id: about.key_id,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Manifest {
            path: self.partial.display().to_string(),
            source,
        })?;
        write_atomic(&self.partial.join(MANIFEST), &json)?;
        let _ = fs::remove_file(self.partial.join(STARTED));
        let dir = self.store.backup_dir(&self.id);
        fs::rename(&self.partial, &dir).map_err(io(format!("rename {}", self.partial.display())))?;
        Ok(manifest)
    }

    /// Gives up: nothing of it stays but chunks, which garbage collection
    /// takes back if nothing else uses them.
    pub fn abort(self) {
        if let Err(e) = fs::remove_dir_all(&self.partial) {
            tracing::warn!(backup = %self.id, error = %e, "cannot remove an aborted backup");
        }
    }
}
