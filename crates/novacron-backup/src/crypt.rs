//! Client-side encryption of chunks, with a key the store never sees
//! (agents hold it; the store and the server know only its id).
//!
//! Deterministic authenticated encryption, as SIV does it: a chunk's nonce
//! is an HMAC of its content under a key derived from the backup key, and
//! it is sealed with AES-256-GCM under another derived key. The same content
//! under the same key seals to the same file, so encrypted chunks still
//! deduplicate; what that tells the store is only which chunks are equal
//! (as PBS's keyed digests tell it too). An encrypted chunk is named by the
//! SHA-256 of its file: the store checks what it stores and verify re-hashes
//! it without the key; a restore, holding the key, also checks each chunk's
//! authentication tag, which binds the content to the key.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

/// Bytes of a key's id (its first bytes, hex in files and the API).
pub const KEY_ID_LEN: usize = 8;
pub const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("Cannot read backup key {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Backup key {0} is not 64 hex digits (make one with `novacron backup-key create FILE`)")]
    Format(String),
    #[error("Cannot write backup key {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot get random bytes for a key: {0}")]
    Random(String),
}

/// A backup encryption key, with the keys derived from it (cheap to clone).
#[derive(Clone)]
pub struct ChunkKey(std::sync::Arc<Derived>);

struct Derived {
    id: [u8; KEY_ID_LEN],
    seal: Aes256Gcm,
    nonce: Hmac<Sha256>,
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkKey").field("id", &self.id_hex()).finish()
    }
}

fn derive(key: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"novacron backup key\0");
    h.update(purpose);
    h.update(key);
    h.finalize().into()
}

impl ChunkKey {
    pub fn from_bytes(key: &[u8; 32]) -> ChunkKey {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&derive(key, b"id")[..KEY_ID_LEN]);
        let seal = Aes256Gcm::new(&derive(key, b"seal").into());
        // A key shorter than SHA-256's block is zero-padded by HMAC itself.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&derive(key, b"nonce"));
        let nonce = <Hmac<Sha256> as KeyInit>::new(&block.into());
        ChunkKey(std::sync::Arc::new(Derived { id, seal, nonce }))
    }

    /// A key file: 64 hex digits (and a newline).
    pub fn load(path: &Path) -> Result<ChunkKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(text.trim()).ok_or_else(|| KeyError::Format(path.display().to_string()))
    }

    pub fn parse(hex_key: &str) -> Option<ChunkKey> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key).ok()?;
        Some(Self::from_bytes(&key))
    }

    /// Writes a new random key to `path` (mode 0600, never over a file).
    pub fn create(path: &Path) -> Result<ChunkKey, KeyError> {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| KeyError::Random(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
            f.sync_all()
        };
        write().map_err(|source| KeyError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::from_bytes(&key))
    }

    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.0.id
    }

    /// The id as stores and backups name the key.
    pub fn id_hex(&self) -> String {
        hex::encode(self.0.id)
    }

    fn nonce_for(&self, plain: &[u8]) -> [u8; NONCE_LEN] {
        let mut mac = self.0.nonce.clone();
        mac.update(plain);
        let tag = mac.finalize().into_bytes();
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&tag[..NONCE_LEN]);
        n
    }

    /// The nonce and the sealed `inner` (the encoded, maybe compressed,
    /// content), bound to `plain` through the nonce and to the key's id.
    pub(crate) fn seal(&self, plain: &[u8], inner: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>), ()> {
        let nonce = self.nonce_for(plain);
        let sealed = self
            .0
            .seal
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: inner,
                    aad: &self.0.id,
                },
            )
            .map_err(drop)?;
        Ok((nonce, sealed))
    }

    pub(crate) fn open(&self, nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, ()> {
        if nonce.len() != NONCE_LEN {
            return Err(());
        }
        self.0
            .seal
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &self.0.id,
                },
            )
            .map_err(drop)
    }

    /// Whether `plain` is what was sealed with `nonce` (SIV's check).
    pub(crate) fn nonce_matches(&self, plain: &[u8], nonce: &[u8]) -> bool {
        self.nonce_for(plain).as_slice() == nonce
    }
}
