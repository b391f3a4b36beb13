//! Chunks: up to [`CHUNK_SIZE`] bytes of a disk, named by the SHA-256 of
//! their content and stored as a small header and the content, compressed
//! with zstd when that makes it smaller.

use sha2::{Digest as _, Sha256};

/// Bytes of a disk per chunk (the last chunk of a disk may be shorter).
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// Bytes every chunk file starts with: magic and format version.
const MAGIC: &[u8; 4] = b"NCK1";
const RAW: u8 = 0;
const ZSTD: u8 = 1;
/// Fast enough to keep up with a disk read, and most of zstd's gain.
const ZSTD_LEVEL: i32 = 3;

/// The SHA-256 of a chunk's content: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A digest from its 64 hex digits (a chunk's file name).
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut d = [0u8; 32];
        hex::decode_to_slice(s, &mut d).ok()?;
        // Lowercase only: one name per chunk.
        (s.len() == 64 && !s.bytes().any(|b| b.is_ascii_uppercase())).then_some(Digest(d))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("not a chunk (bad header)")]
    Header,
    #[error("unknown chunk encoding {0}")]
    Encoding(u8),
    #[error("cannot decompress: {0}")]
    Decompress(String),
    #[error("content does not match its digest (the chunk is corrupt)")]
    Mismatch,
    #[error("chunk of {0} bytes, more than {CHUNK_SIZE}")]
    TooBig(usize),
}

/// A chunk's file content for `data`: compressed when that is smaller.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + data.len() / 2);
    out.extend_from_slice(MAGIC);
    match zstd::bulk::compress(data, ZSTD_LEVEL) {
        Ok(z) if z.len() < data.len() => {
            out.push(ZSTD);
            out.extend_from_slice(&z);
        }
        // Incompressible (or zstd failed, which storing it raw survives).
        _ => {
            out.push(RAW);
            out.extend_from_slice(data);
        }
    }
    out
}

/// The content of a chunk file, checked against the digest it is stored under.
pub fn decode(file: &[u8], digest: &Digest) -> Result<Vec<u8>, ChunkError> {
    let body = file.strip_prefix(MAGIC.as_slice()).ok_or(ChunkError::Header)?;
    let (&encoding, payload) = body.split_first().ok_or(ChunkError::Header)?;
    let data = match encoding {
        RAW => payload.to_vec(),
        ZSTD => {
            zstd::bulk::decompress(payload, CHUNK_SIZE as usize).map_err(|e| ChunkError::Decompress(e.to_string()))?
        }
        other => return Err(ChunkError::Encoding(other)),
    };
    if data.len() as u64 > CHUNK_SIZE {
        return Err(ChunkError::TooBig(data.len()));
    }
    if Digest::of(&data) != *digest {
        return Err(ChunkError::Mismatch);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_compressed_or_not() {
        let zeros = vec![0u8; CHUNK_SIZE as usize];
        let file = encode(&zeros);
        assert!(file.len() < 4096, "zeros compress: {}", file.len());
        assert_eq!(decode(&file, &Digest::of(&zeros)), Ok(zeros));

        // Incompressible bytes are stored as they are.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let file = encode(&noise);
        assert_eq!(file[4], RAW);
        assert_eq!(decode(&file, &Digest::of(&noise)), Ok(noise));
    }

    #[test]
    fn corruption_and_wrong_names_are_caught() {
        let data = b"hello chunk".repeat(100);
        let digest = Digest::of(&data);
        let mut file = encode(&data);
        let last = file.len() - 1;
        file[last] ^= 1;
        assert!(decode(&file, &digest).is_err());
        assert_eq!(decode(&encode(b"other"), &digest), Err(ChunkError::Mismatch));
        assert_eq!(decode(b"JUNK", &digest), Err(ChunkError::Header));
        assert_eq!(decode(b"NCK1\x07", &digest), Err(ChunkError::Encoding(7)));
    }

    #[test]
    fn digests_read_back_from_their_names_only() {
        let d = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), None);
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&format!("{}.tmp", d.to_hex())), None);
    }
}
