//! Restore: a disk of a backup written back, chunk by chunk, each checked
//! against its digest; chunks of zeros are skipped (the file stays sparse).

use std::io::{Seek, SeekFrom, Write};

use crate::manifest::BackupId;
use crate::store::{Datastore, StoreError};

/// Writes disk `disk` of backup `id` into `out` (a raw image, sized to the
/// disk); returns the bytes written (zeros are holes).
pub fn restore_disk(
    store: &Datastore,
    id: &BackupId,
    disk: &str,
    out: &mut std::fs::File,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, StoreError> {
    let index = store.index(id, disk)?;
    let io = |what: &str| {
        let what = format!("{what} the restored disk");
        move |source| StoreError::Io { what, source }
    };
    out.set_len(index.size).map_err(io("size"))?;
    let mut written = 0;
    for (n, d) in index.digests.iter().enumerate() {
        let data = store.read_chunk(d)?;
        if data.len() as u64 != index.chunk_len(n) {
            return Err(StoreError::Io {
                what: format!("restore chunk {n} of disk {disk}"),
                source: std::io::Error::other(format!(
                    "{} bytes where the index says {}",
                    data.len(),
                    index.chunk_len(n)
                )),
            });
        }
        if data.iter().any(|b| *b != 0) {
            out.seek(SeekFrom::Start(n as u64 * index.chunk_size))
                .map_err(io("seek in"))?;
            out.write_all(&data).map_err(io("write"))?;
            written += data.len() as u64;
        }
        progress(((n as u64 + 1) * index.chunk_size).min(index.size), index.size);
    }
    out.sync_all().map_err(io("sync"))?;
    Ok(written)
}
