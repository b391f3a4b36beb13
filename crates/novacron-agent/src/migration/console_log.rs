//! The serial log that travels with a VM: the source reads what the target
//! does not have yet.

/// Most of the serial log that travels with a VM.
const MAX_LOG_CARRIED: u64 = 1024 * 1024;

/// The last `MAX_LOG_CARRIED` bytes of a file from `offset` on, and its length.
pub(super) fn read_log_from(path: &std::path::Path, offset: u64) -> (Vec<u8>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), offset);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(MAX_LOG_CARRIED)).min(len);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(len - start).read_to_end(&mut buf);
    }
    (buf, len)
}
