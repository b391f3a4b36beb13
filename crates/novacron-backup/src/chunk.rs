//! Chunks: up to [`CHUNK_SIZE`] bytes of a disk, stored as a small header
//! and the content, compressed with zstd when that makes it smaller. A
//! plain chunk is named by the SHA-256 of its content; a sealed one
//! (encrypted with a backup key, [`crate::crypt`]) by the SHA-256 of its
//! file, so a store checks both without the key.

use sha2::{Digest as _, Sha256};

/// Bytes of a disk per chunk (the last chunk of a disk may be shorter).
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// Bytes every chunk file starts with: magic and format version.
const MAGIC: &[u8; 4] = b"NCK1";
const RAW: u8 = 0;
const ZSTD: u8 = 1;
/// Then: the key's id, the nonce, and the sealed RAW or ZSTD encoding.
const SEALED: u8 = 2;
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
    #[error("the chunk is encrypted with backup key {0}, which this node does not have")]
    NeedsKey(String),
    #[error("the chunk does not open with backup key {0} (damaged, or sealed with another key)")]
    Unsealed(String),
    #[error("cannot encrypt the chunk")]
    Seal,
}

/// How chunks are written: as they are, or sealed with a backup key.
#[derive(Debug, Clone, Default)]
pub enum Codec {
    #[default]
    Plain,
    Sealed(crate::crypt::ChunkKey),
}

impl Codec {
    /// A chunk's name and file.
    pub fn encode(&self, data: &[u8]) -> Result<(Digest, Vec<u8>), ChunkError> {
        match self {
            Codec::Plain => Ok((Digest::of(data), encode(data))),
            Codec::Sealed(key) => {
                let inner = encode(data);
                let (nonce, sealed) = key.seal(data, &inner[MAGIC.len()..]).map_err(|()| ChunkError::Seal)?;
                let mut file =
                    Vec::with_capacity(MAGIC.len() + 1 + crate::crypt::KEY_ID_LEN + nonce.len() + sealed.len());
                file.extend_from_slice(MAGIC);
                file.push(SEALED);
                file.extend_from_slice(&key.id());
                file.extend_from_slice(&nonce);
                file.extend_from_slice(&sealed);
                Ok((Digest::of(&file), file))
            }
        }
    }

    /// The content of a chunk file written plain or sealed with this
    /// codec's key, checked against its name (and, sealed, its tag).
    pub fn decode(&self, file: &[u8], digest: &Digest) -> Result<Vec<u8>, ChunkError> {
        let Some(Sealed { id, nonce, body }) = sealed_parts(file)? else {
            return decode(file, digest);
        };
        if Digest::of(file) != *digest {
            return Err(ChunkError::Mismatch);
        }
        let id_hex = hex::encode(id);
        let key = match self {
            Codec::Sealed(k) if k.id() == id => k,
            _ => return Err(ChunkError::NeedsKey(id_hex)),
        };
        let inner = key
            .open(nonce, body)
            .map_err(|()| ChunkError::Unsealed(id_hex.clone()))?;
        let data = decode_inner(&inner)?;
        if !key.nonce_matches(&data, nonce) {
            return Err(ChunkError::Unsealed(id_hex));
        }
        Ok(data)
    }

    /// How to write or read chunks sealed with the key of id `key_id` (none:
    /// plain) with `key` at hand; none if that is not the key wanted.
    pub fn for_key(key_id: Option<&str>, key: Option<&crate::crypt::ChunkKey>) -> Option<Codec> {
        match (key_id, key) {
            (None, _) => Some(Codec::Plain),
            (Some(want), Some(k)) if k.id_hex() == want => Some(Codec::Sealed(k.clone())),
            (Some(_), _) => None,
        }
    }

    /// The backup key's id, if chunks are sealed.
    pub fn key_id(&self) -> Option<String> {
        match self {
            Codec::Plain => None,
            Codec::Sealed(k) => Some(k.id_hex()),
        }
    }
}

/// The parts of a sealed chunk file.
struct Sealed<'a> {
    id: &'a [u8],
    nonce: &'a [u8],
    body: &'a [u8],
}

/// A sealed chunk file's parts; none if it is plain.
fn sealed_parts(file: &[u8]) -> Result<Option<Sealed<'_>>, ChunkError> {
    let body = file.strip_prefix(MAGIC.as_slice()).ok_or(ChunkError::Header)?;
    match body.split_first() {
        Some((&SEALED, rest)) => {
            let (id, rest) = rest
                .split_at_checked(crate::crypt::KEY_ID_LEN)
                .ok_or(ChunkError::Header)?;
            let (nonce, body) = rest
                .split_at_checked(crate::crypt::NONCE_LEN)
                .ok_or(ChunkError::Header)?;
            Ok(Some(Sealed { id, nonce, body }))
        }
        Some(_) => Ok(None),
        None => Err(ChunkError::Header),
    }
}

/// What a store checks of a chunk file, without any key: a plain chunk's
/// content against its name, a sealed one's file. Returns the bytes the
/// check read (content or file).
pub fn check(file: &[u8], digest: &Digest) -> Result<u64, ChunkError> {
    match sealed_parts(file)? {
        None => decode(file, digest).map(|d| d.len() as u64),
        Some(_) if Digest::of(file) == *digest => Ok(file.len() as u64),
        Some(_) => Err(ChunkError::Mismatch),
    }
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

/// The content of a plain chunk file, checked against the digest it is
/// stored under (a sealed one needs its key: [`Codec::decode`]).
pub fn decode(file: &[u8], digest: &Digest) -> Result<Vec<u8>, ChunkError> {
    let body = file.strip_prefix(MAGIC.as_slice()).ok_or(ChunkError::Header)?;
    if let Some(sealed) = sealed_parts(file)? {
        return Err(ChunkError::NeedsKey(hex::encode(sealed.id)));
    }
    let data = decode_inner(body)?;
    if Digest::of(&data) != *digest {
        return Err(ChunkError::Mismatch);
    }
    Ok(data)
}

/// An encoding byte (RAW or ZSTD) and its payload, decoded.
fn decode_inner(body: &[u8]) -> Result<Vec<u8>, ChunkError> {
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
    fn sealed_chunks_dedup_check_without_the_key_and_open_only_with_it() {
        let key = crate::crypt::ChunkKey::from_bytes(&[7u8; 32]);
        let other = crate::crypt::ChunkKey::from_bytes(&[8u8; 32]);
        let sealed = Codec::Sealed(key.clone());
        let data = b"guest data ".repeat(1000);
        let (digest, file) = sealed.encode(&data).unwrap();
        // The same content under the same key: the same chunk (dedup).
        assert_eq!(sealed.encode(&data).unwrap(), (digest, file.clone()));
        // Not the plain chunk's name, and the content is not in the file.
        assert_ne!(digest, Digest::of(&data));
        assert!(!file.windows(11).any(|w| w == b"guest data "));
        // A store checks it without the key; a restore opens it with it.
        assert_eq!(check(&file, &digest), Ok(file.len() as u64));
        assert_eq!(sealed.decode(&file, &digest), Ok(data.clone()));
        assert!(matches!(decode(&file, &digest), Err(ChunkError::NeedsKey(_))));
        assert!(matches!(
            Codec::Plain.decode(&file, &digest),
            Err(ChunkError::NeedsKey(_))
        ));
        assert!(matches!(
            Codec::Sealed(other).decode(&file, &digest),
            Err(ChunkError::NeedsKey(_))
        ));
        // A flipped bit: the name no longer matches; renamed to match, the tag fails.
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(check(&bad, &digest), Err(ChunkError::Mismatch));
        assert!(matches!(
            sealed.decode(&bad, &Digest::of(&bad)),
            Err(ChunkError::Unsealed(_))
        ));
        // Plain chunks still decode with a sealing codec (older backups).
        let plain = encode(&data);
        assert_eq!(sealed.decode(&plain, &Digest::of(&data)), Ok(data));
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
