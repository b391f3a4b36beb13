//! Which backup a VM's change tracking counts from, kept in the VM's
//! directory (`backup-chain.json`). An incremental backup is right only if
//! the tracking bitmaps were cleared at the instant of the backup it
//! builds on; this record says which backup that was, in which store, and
//! whether a backup that cleared them was cut short (then the next one
//! must be full).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The store and backup at whose instant tracking was cleared last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    /// A backup that cleared tracking and has not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub store: String,
    /// The backup's id as the store names it (`VM/TIME`).
    pub backup: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("Cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The backup chain record {path} is unreadable")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn path(dir: &Path) -> PathBuf {
    dir.join("backup-chain.json")
}

/// The VM's record; none yet is an empty one.
pub fn load(dir: &Path) -> Result<Chain, ChainError> {
    let p = path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ChainError::Json {
            path: p.display().to_string(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Chain::default()),
        Err(source) => Err(ChainError::Io {
            what: "read",
            path: p.display().to_string(),
            source,
        }),
    }
}

/// Replaces the record whole (written aside, then renamed).
/// The VM's record as a migration carries it (none when there is nothing
/// to carry).
pub fn export(dir: &Path) -> Result<Option<serde_json::Value>, ChainError> {
    let chain = load(dir)?;
    if chain == Chain::default() {
        return Ok(None);
    }
    serde_json::to_value(&chain)
        .map(Some)
        .map_err(|source| ChainError::Json {
            path: path(dir).display().to_string(),
            source,
        })
}

/// Keeps the record a migration brought.
pub fn import(dir: &Path, carried: &serde_json::Value) -> Result<(), ChainError> {
    let chain: Chain = serde_json::from_value(carried.clone()).map_err(|source| ChainError::Json {
        path: path(dir).display().to_string(),
        source,
    })?;
    save(dir, &chain)
}

pub fn save(dir: &Path, chain: &Chain) -> Result<(), ChainError> {
    let p = path(dir);
    let tmp = p.with_extension("json.partial");
    let io = |what, source| ChainError::Io {
        what,
        path: p.display().to_string(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(chain).map_err(|source| ChainError::Json {
        path: p.display().to_string(),
        source,
    })?;
    std::fs::write(&tmp, bytes).map_err(|e| io("write", e))?;
    std::fs::rename(&tmp, &p).map_err(|e| io("replace", e))
}

impl Chain {
    /// Why a backup to `store`, whose newest backup of the VM is `latest`,
    /// cannot build on it (none: it can, disk by disk).
    pub fn why_not_incremental(&self, store: &str, latest: Option<&str>) -> Option<String> {
        if let Some(p) = &self.pending {
            return Some(format!("backup {p} was cut short after it reset change tracking"));
        }
        let Some(latest) = latest else {
            return Some(format!("the first backup of this VM in store {store:?}"));
        };
        match &self.base {
            None => Some("change tracking has no backup to count from".into()),
            Some(b) if b.store != store || b.backup != latest => Some(format!(
                "change tracking counts from backup {} in store {:?}, not from {latest} (the newest in {store:?})",
                b.backup, b.store
            )),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unbroken_chain_allows_an_incremental() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut c = load(dir.path()).unwrap_or_default();
        assert!(c
            .why_not_incremental("local", None)
            .is_some_and(|w| w.contains("first backup")));
        assert!(c.why_not_incremental("local", Some("vm/t1")).is_some());
        c.base = Some(Base {
            store: "local".into(),
            backup: "vm/t1".into(),
        });
        assert_eq!(c.why_not_incremental("local", Some("vm/t1")), None);
        assert!(c.why_not_incremental("offsite", Some("vm/t1")).is_some());
        assert!(c.why_not_incremental("local", Some("vm/t0")).is_some());
        c.pending = Some("vm/t2".into());
        assert!(c
            .why_not_incremental("local", Some("vm/t1"))
            .is_some_and(|w| w.contains("cut short")));
        save(dir.path(), &c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()).ok(), Some(c));
    }
}
