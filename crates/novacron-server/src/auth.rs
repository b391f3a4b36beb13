//! Bearer-token authentication and the one place authorization is decided.
//! Tokens are stored as SHA-256 hashes; the admin token's secret exists only
//! in the file written at first start (mode 0600).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::RwLock;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use novacron_api::{Metadata, Role, Token};
use novacron_store::{SharedStore, StoreExt};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_name: String,
    pub role: Role,
}

/// What the caller wants to do; checked by [`authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    /// Calls only agents make (register, heartbeat, status, finalize).
    Agent,
}

/// The single authorization decision point. Only the admin role exists so far;
/// more roles add rows here.
pub fn authorize(principal: &Principal, _action: Action) -> Result<(), ApiError> {
    match principal.role {
        Role::Admin => Ok(()),
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn random_secret() -> Result<String, std::io::Error> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(buf))
}

/// Writes a secret file readable only by its owner.
pub fn write_secret_file(path: &Path, secret: &str) -> Result<(), std::io::Error> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// In-memory index of token hashes, loaded from the store.
#[derive(Default)]
pub struct TokenIndex {
    by_hash: RwLock<HashMap<String, Principal>>,
}

impl TokenIndex {
    pub async fn load(store: &SharedStore) -> Result<Self, novacron_store::StoreError> {
        let index = TokenIndex::default();
        for t in store.list_all::<Token>().await? {
            index.insert(&t);
        }
        Ok(index)
    }

    pub fn insert(&self, t: &Token) {
        let p = Principal {
            token_name: t.metadata.name.clone(),
            role: t.role,
        };
        self.by_hash
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.secret_sha256.clone(), p);
    }

    fn lookup(&self, secret: &str) -> Option<Principal> {
        self.by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash_secret(secret))
            .cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("Cannot write token file")]
    Io(#[from] std::io::Error),
    #[error("Cannot store token")]
    Store(#[from] novacron_store::StoreError),
}

/// Creates the admin token at first start and writes its secret to `path`.
pub async fn bootstrap_admin(store: &SharedStore, path: &Path) -> Result<(), BootstrapError> {
    if store.get_obj::<Token>("admin").await?.is_some() {
        if !path.exists() {
            tracing::warn!(path = %path.display(), "admin token exists in the store but its file is missing");
        }
        return Ok(());
    }
    let secret = random_secret()?;
    let token = Token {
        metadata: Metadata::new("admin", Default::default()),
        role: Role::Admin,
        secret_sha256: hash_secret(&secret),
    };
    // Write the file first: a crash between the two leaves a file and no token,
    // which the next start repairs by failing loudly on create_new.
    let _ = std::fs::remove_file(path);
    write_secret_file(path, &secret)?;
    store.create_obj(&token).await?;
    tracing::info!(path = %path.display(), "created admin token");
    Ok(())
}

/// Middleware: every request must carry a valid bearer token.
pub async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(secret) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return Err(ApiError::unauthorized("Missing bearer token"));
    };
    let Some(principal) = state.tokens.lookup(secret.trim()) else {
        tracing::warn!("request with an invalid token");
        return Err(ApiError::unauthorized("Invalid token"));
    };
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}
