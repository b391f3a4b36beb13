//! A disk's index in a backup: its size, the chunk size, and the digest of
//! each chunk in order. Binary, so a 2 TiB disk's index is 16 MiB.

use crate::chunk::{Digest, CHUNK_SIZE};

const MAGIC: &[u8; 8] = b"NCFIDX01";
const HEADER: usize = 8 + 8 + 8 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// The disk's size in bytes.
    pub size: u64,
    pub chunk_size: u64,
    /// One per chunk of the disk: `size.div_ceil(chunk_size)` of them.
    pub digests: Vec<Digest>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("not an index (bad header)")]
    Header,
    #[error("the index names {found} chunks where a disk of {size} bytes has {expected}")]
    Count { size: u64, expected: u64, found: u64 },
    #[error("chunk size {0} is not a power of two between 64 KiB and 64 MiB")]
    ChunkSize(u64),
    #[error("a disk of {size} bytes has {expected} chunks: 64 hex digits each")]
    HexLength { size: u64, expected: u64 },
    #[error("digest {0} is not 64 hex digits")]
    HexDigest(usize),
}

impl FixedIndex {
    /// The number of chunks a disk of `size` bytes has.
    pub fn chunks_for(size: u64, chunk_size: u64) -> u64 {
        size.div_ceil(chunk_size)
    }

    /// The bytes of chunk `i` of the disk (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// The index of a disk of `size` bytes in 4 MiB chunks from its
    /// digests written out in hex, one after another (as the API carries it).
    pub fn from_hex(size: u64, hex: &str) -> Result<FixedIndex, IndexError> {
        let expected = Self::chunks_for(size, CHUNK_SIZE);
        if hex.len() as u64 != expected * 64 {
            return Err(IndexError::HexLength { size, expected });
        }
        let digests = (0..expected as usize)
            .map(|i| {
                hex.get(i * 64..(i + 1) * 64)
                    .and_then(Digest::from_hex)
                    .ok_or(IndexError::HexDigest(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FixedIndex {
            size,
            chunk_size: CHUNK_SIZE,
            digests,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.digests.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for d in &self.digests {
            out.extend_from_slice(&d.0);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<FixedIndex, IndexError> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or(IndexError::Header)?;
        let word = |i: usize| -> Result<u64, IndexError> {
            let b = body.get(i * 8..i * 8 + 8).ok_or(IndexError::Header)?;
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            Ok(u64::from_le_bytes(w))
        };
        let (size, chunk_size, count) = (word(0)?, word(1)?, word(2)?);
        if !chunk_size.is_power_of_two() || !(64 * 1024..=64 * 1024 * 1024).contains(&chunk_size) {
            return Err(IndexError::ChunkSize(chunk_size));
        }
        let expected = Self::chunks_for(size, chunk_size);
        let digests = &body[24..];
        if count != expected || digests.len() as u64 != count * 32 {
            return Err(IndexError::Count {
                size,
                expected,
                found: digests.len() as u64 / 32,
            });
        }
        let digests = digests
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                Digest(d)
            })
            .collect();
        Ok(FixedIndex {
            size,
            chunk_size,
            digests,
        })
    }

    /// An index of a disk of `size` bytes every chunk of which is zero.
    pub fn zeroed(size: u64) -> FixedIndex {
        let n = Self::chunks_for(size, CHUNK_SIZE);
        let full = Digest::of(&vec![0u8; CHUNK_SIZE as usize]);
        let mut digests = vec![full; n as usize];
        let tail = size % CHUNK_SIZE;
        if tail != 0 {
            if let Some(last) = digests.last_mut() {
                *last = Digest::of(&vec![0u8; tail as usize]);
            }
        }
        FixedIndex {
            size,
            chunk_size: CHUNK_SIZE,
            digests,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_round_trip_and_refuse_what_does_not_add_up() {
        let idx = FixedIndex::zeroed(10 * 1024 * 1024);
        assert_eq!(idx.digests.len(), 3);
        assert_eq!(idx.chunk_len(2), 2 * 1024 * 1024);
        assert_ne!(idx.digests[1], idx.digests[2]);
        let bytes = idx.to_bytes();
        assert_eq!(FixedIndex::from_bytes(&bytes), Ok(idx.clone()));
        assert!(matches!(
            FixedIndex::from_bytes(&bytes[..bytes.len() - 32]),
            Err(IndexError::Count { .. })
        ));
        assert_eq!(FixedIndex::from_bytes(b"NCFIDX01"), Err(IndexError::Header));
        let mut odd = idx.clone();
        odd.chunk_size = 3000;
        assert_eq!(
            FixedIndex::from_bytes(&odd.to_bytes()),
            Err(IndexError::ChunkSize(3000))
        );
        assert_eq!(FixedIndex::zeroed(0).digests.len(), 0);
    }
}
