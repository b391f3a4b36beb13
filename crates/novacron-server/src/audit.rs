//! Append-only, hash-chained audit log. Each record's hash covers its entry,
//! which includes the previous record's hash; the newest (seq, hash) is also
//! kept outside the database in `audit.head`, so deleting records at the end
//! is detected too.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use novacron_api::{AuditEntry, AuditRecord, AuditVerification, Metadata, Object};
use novacron_store::{SharedStore, StoreError, StoreExt};
use sha2::{Digest, Sha256};

use novacron_tls::PeerInfo;

use crate::auth::AuditContext;
use crate::error::ErrorMessage;
use crate::AppState;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Problems listed by a verification before it stops listing.
const MAX_PROBLEMS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
struct Head {
    seq: u64,
    hash: String,
}

pub struct AuditLog {
    store: SharedStore,
    head_path: PathBuf,
    head: tokio::sync::Mutex<Head>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("Audit store")]
    Store(#[from] StoreError),
    #[error("Cannot encode audit entry")]
    Encode(#[from] serde_json::Error),
    #[error("Cannot write the audit anchor {path}")]
    Anchor {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn entry_hash(entry: &AuditEntry) -> Result<String, serde_json::Error> {
    Ok(hex::encode(Sha256::digest(serde_json::to_vec(entry)?)))
}

fn record_name(seq: u64) -> String {
    format!("{seq:016}")
}

/// Every stored record, in sequence order.
async fn all_records(store: &SharedStore) -> Result<Vec<AuditRecord>, StoreError> {
    store.list_all::<AuditRecord>().await
}

impl AuditLog {
    pub async fn open(store: SharedStore, head_path: PathBuf) -> Result<Self, AuditError> {
        let records = all_records(&store).await?;
        let head = records
            .last()
            .map(|r| Head {
                seq: r.entry.seq,
                hash: r.hash.clone(),
            })
            .unwrap_or(Head {
                seq: 0,
                hash: GENESIS.into(),
            });
        let log = AuditLog {
            store,
            head_path,
            head: tokio::sync::Mutex::new(head.clone()),
        };
        // A crash between a record and its anchor leaves the anchor behind;
        // move it forward only if it still points at a record of this chain.
        if let Some(anchor) = log.read_anchor() {
            let behind = anchor.seq < head.seq
                && records
                    .iter()
                    .any(|r| r.entry.seq == anchor.seq && r.hash == anchor.hash);
            if behind {
                log.write_anchor(&head)?;
            }
        } else if head.seq == 0 {
            log.write_anchor(&head)?;
        }
        Ok(log)
    }

    fn read_anchor(&self) -> Option<Head> {
        let text = std::fs::read_to_string(&self.head_path).ok()?;
        let (seq, hash) = text.trim().split_once(' ')?;
        Some(Head {
            seq: seq.parse().ok()?,
            hash: hash.to_string(),
        })
    }

    fn write_anchor(&self, head: &Head) -> Result<(), AuditError> {
        let err = |source| AuditError::Anchor {
            path: self.head_path.display().to_string(),
            source,
        };
        let tmp = self.head_path.with_extension("head.tmp");
        std::fs::write(&tmp, format!("{} {}\n", head.seq, head.hash)).map_err(err)?;
        std::fs::rename(&tmp, &self.head_path).map_err(err)
    }

    /// Appends an entry; `seq` and `prev_hash` are filled in here. Servers
    /// sharing a store append to one chain: a record's name is its sequence
    /// number, so when another server took the next number first, this one
    /// reads the chain's new end and links after it.
    pub async fn append(&self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        let mut head = self.head.lock().await;
        loop {
            let mut entry = entry.clone();
            entry.seq = head.seq + 1;
            entry.prev_hash = head.hash.clone();
            let hash = entry_hash(&entry)?;
            let mut metadata = Metadata::new(&record_name(entry.seq), Default::default());
            metadata.project = entry.project.clone().unwrap_or_default();
            let created = self
                .store
                .create_obj(&AuditRecord {
                    metadata,
                    entry,
                    hash: hash.clone(),
                })
                .await;
            match created {
                Ok(record) => {
                    *head = Head {
                        seq: record.entry.seq,
                        hash,
                    };
                    self.write_anchor(&head)?;
                    return Ok(record);
                }
                Err(StoreError::AlreadyExists { .. }) => *head = self.chain_end(head.seq).await?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The last record at or after `from` (records are named by sequence).
    async fn chain_end(&self, from: u64) -> Result<Head, StoreError> {
        let mut end = None;
        let mut after = (from > 0).then(|| record_name(from - 1));
        loop {
            let page = self.store.list(AuditRecord::KIND, None, after.as_deref(), 1000).await?;
            if let Some(last) = page.items.last() {
                end = Some(last.clone());
            }
            match page.more_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        let record: AuditRecord = match end {
            Some(rec) => novacron_store::decode_record(rec)?,
            None => {
                return Err(StoreError::Unexpected(
                    "the audit log ended while being appended to".into(),
                ))
            }
        };
        Ok(Head {
            seq: record.entry.seq,
            hash: record.hash,
        })
    }

    /// Checks the whole chain and the anchor.
    pub async fn verify(&self) -> Result<AuditVerification, AuditError> {
        let _appends_wait = self.head.lock().await;
        let records = all_records(&self.store).await?;
        let mut problems = Vec::new();
        let mut prev = Head {
            seq: 0,
            hash: GENESIS.into(),
        };
        for r in &records {
            let e = &r.entry;
            if e.seq != prev.seq + 1 {
                problems.push(format!(
                    "record {} follows {}: records are missing or reordered",
                    e.seq, prev.seq
                ));
            } else if e.prev_hash != prev.hash {
                problems.push(format!("record {} does not link to record {}", e.seq, prev.seq));
            }
            if r.metadata.name != record_name(e.seq) {
                problems.push(format!("record {} is stored as {:?}", e.seq, r.metadata.name));
            }
            if entry_hash(e)? != r.hash {
                problems.push(format!("record {} was changed (hash mismatch)", e.seq));
            }
            prev = Head {
                seq: e.seq,
                hash: r.hash.clone(),
            };
        }
        // The anchor is this server's last append. With one server it is the
        // chain's end; servers sharing a store append after each other, so
        // it must name a record of the chain, as it was written.
        match self.read_anchor() {
            None if !records.is_empty() => problems.push("the audit anchor file is missing".into()),
            Some(anchor) if anchor.seq > 0 && !records.iter().any(|r| r.entry.seq == anchor.seq && r.hash == anchor.hash) => {
                problems.push(format!(
                    "the log ends at record {} but the anchor names record {} as it no longer is: records at the end were deleted or changed",
                    prev.seq, anchor.seq
                ))
            }
            _ => {}
        }
        problems.truncate(MAX_PROBLEMS);
        Ok(AuditVerification {
            ok: problems.is_empty(),
            records: records.len() as u64,
            problems,
        })
    }
}

/// `vms/web-1` from `/v1/vms/web-1/start`.
fn target_of(path: &str) -> Option<String> {
    let mut parts = path.trim_start_matches("/v1/").split('/');
    let kind = parts.next()?;
    let name = parts.next()?;
    Some(format!("{kind}/{name}"))
}

/// Middleware: records every mutating request by a known caller and every
/// refused one (401, 403, 429), after it has been answered.
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let source = req
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .map(|c| c.0.addr.ip().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let context = resp.extensions().get::<Arc<AuditContext>>().cloned();
    let refused = matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    );
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) || path.ends_with("/console");
    if !(refused || (mutating && context.is_some())) {
        return resp;
    }
    let entry = AuditEntry {
        seq: 0,
        time: Utc::now(),
        actor: context
            .as_ref()
            .and_then(|c| c.actor())
            .unwrap_or_else(|| "anonymous".into()),
        action: format!("{method} {path}"),
        target: target_of(&path),
        project: context.as_ref().and_then(|c| c.project()),
        status: status.as_u16(),
        reason: refused
            .then(|| resp.extensions().get::<ErrorMessage>().map(|m| m.0.clone()))
            .flatten(),
        source,
        prev_hash: String::new(),
    };
    if let Err(e) = state.audit.append(entry).await {
        tracing::error!(error = %novacron_api::error::chain(&e), %method, %path, "cannot write audit record");
    }
    resp
}
