//! The backup datastore, after Proxmox Backup Server's: a disk is cut into
//! fixed-size chunks (4 MiB), each stored once under the SHA-256 of its
//! content, compressed; a backup of a disk is an index, the list of its
//! chunks' digests; a backup of a VM is a manifest naming its disks'
//! indexes. Chunks shared between disks, VMs and backups are stored once.
//!
//! Layout of a datastore directory:
//!
//! ```text
//! .chunks/ab/abcd…(64 hex)        one chunk (crate::chunk's format)
//! vm/NAME/2026-12-04T19:00:00Z/   one backup of VM NAME
//!     root.fidx, data.fidx        the disks' indexes (crate::index)
//!     manifest.json               written last: a backup exists once it does
//! ```
//!
//! Every file is written aside and renamed into place, so a backup cut
//! short leaves chunks (which garbage collection takes back) and never a
//! manifest naming what is not there. This crate is synchronous: callers
//! in async code run it on blocking threads.

pub mod chunk;
pub mod crypt;
pub mod gc;
pub mod index;
pub mod manifest;
pub mod restore;
pub mod retention;
pub mod store;
pub mod verify;

pub use chunk::{Codec, Digest, CHUNK_SIZE};
pub use crypt::ChunkKey;
pub use index::FixedIndex;
pub use manifest::{BackupId, DiskEntry, Manifest};
pub use store::{commit_disk, from_commit_disk, BackupInfo, BackupWriter, Datastore, DiskStats, StoreError, Verified};

#[cfg(test)]
mod tests;
