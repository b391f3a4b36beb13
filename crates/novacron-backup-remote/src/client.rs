//! The client of a `backup-store` process (see [`crate::serve`]).

use std::time::Duration;

use bytes::Bytes;
use novacron_backup::gc::GcReport;
use novacron_backup::verify::VerifyReport;
use novacron_backup::{BackupId, BackupInfo, Digest, DiskStats, FixedIndex, Manifest, Verified};
use serde::de::DeserializeOwned;

use crate::handle::{ErrorKind, HandleError};
use crate::wire::{BackupView, KnownAnswer, KnownRequest, Stored, WireError, WriteBackup, MAX_KNOWN};

/// A backup store at `url`, reached with `http` (which presents the
/// server's certificate and trusts the cluster CA).
#[derive(Debug, Clone)]
pub struct RemoteStore {
    http: reqwest::Client,
    base: String,
}

impl RemoteStore {
    pub fn new(http: reqwest::Client, url: &str) -> RemoteStore {
        RemoteStore {
            http,
            base: url.trim_end_matches('/').to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn at(&self, path: &str) -> String {
        format!("{}/store/v1/{path}", self.base)
    }

    fn backup(&self, id: &BackupId) -> String {
        self.at(&format!("backups/{}/{}", id.vm, id.time_name()))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, HandleError> {
        let unreachable = |source| HandleError::Unreachable {
            url: self.base.clone(),
            source,
        };
        let answer = req.send().await.map_err(unreachable)?;
        if answer.status().is_success() {
            return Ok(answer);
        }
        let status = answer.status();
        let body = answer.bytes().await.map_err(unreachable)?;
        let (kind, message) = match serde_json::from_slice::<WireError>(&body) {
            Ok(e) => (e.kind, e.message),
            Err(_) => (
                ErrorKind::Unavailable,
                format!(
                    "answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            ),
        };
        Err(HandleError::Answered {
            url: self.base.clone(),
            kind,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, HandleError> {
        let answer = self.send(req).await?;
        let bytes = answer.bytes().await.map_err(|source| HandleError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| HandleError::Answered {
            url: self.base.clone(),
            kind: ErrorKind::Unavailable,
            message: format!("sent an answer that is not what was asked for: {e}"),
        })
    }

    async fn bytes(&self, req: reqwest::RequestBuilder) -> Result<Bytes, HandleError> {
        self.send(req)
            .await?
            .bytes()
            .await
            .map_err(|source| HandleError::Unreachable {
                url: self.base.clone(),
                source,
            })
    }

    pub(crate) async fn list(&self, vm: Option<&str>) -> Result<Vec<BackupView>, HandleError> {
        let mut req = self.http.get(self.at("backups"));
        if let Some(vm) = vm {
            req = req.query(&[("vm", vm)]);
        }
        self.json(req).await
    }

    pub(crate) async fn view(&self, id: &BackupId) -> Result<(Manifest, Option<Verified>), HandleError> {
        let v: BackupView = self.json(self.http.get(self.backup(id))).await?;
        Ok((v.manifest, v.verified))
    }

    pub(crate) async fn delete(&self, id: &BackupId) -> Result<(), HandleError> {
        self.send(self.http.delete(self.backup(id))).await.map(drop)
    }

    pub(crate) async fn verify(&self, id: &BackupId) -> Result<VerifyReport, HandleError> {
        // A verify reads the whole backup where it is: no timeout.
        self.json(self.http.post(format!("{}/verify", self.backup(id)))).await
    }

    pub(crate) async fn collect_garbage(&self, grace: Duration) -> Result<GcReport, HandleError> {
        let req = self.http.post(self.at("gc")).query(&[("grace_s", grace.as_secs())]);
        self.json(req).await
    }

    /// Whether the store answers (and lets this client in).
    pub async fn check(&self) -> Result<(), HandleError> {
        let body = KnownRequest { digests: Vec::new() };
        let _: KnownAnswer = self.json(self.http.post(self.at("chunks/known")).json(&body)).await?;
        Ok(())
    }

    pub(crate) async fn known(&self, digests: &[Digest]) -> Result<Vec<bool>, HandleError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(MAX_KNOWN) {
            let body = KnownRequest {
                digests: batch.iter().map(Digest::to_hex).collect(),
            };
            let answer: KnownAnswer = self.json(self.http.post(self.at("chunks/known")).json(&body)).await?;
            if answer.known.len() != batch.len() {
                return Err(HandleError::Answered {
                    url: self.base.clone(),
                    kind: ErrorKind::Unavailable,
                    message: format!("answered {} of {} chunks asked about", answer.known.len(), batch.len()),
                });
            }
            out.extend(answer.known);
        }
        Ok(out)
    }

    pub(crate) async fn insert_encoded(&self, digest: &Digest, file: Bytes) -> Result<Option<u64>, HandleError> {
        let req = self
            .http
            .put(self.at(&format!("chunks/{}", digest.to_hex())))
            .body(file);
        let stored: Stored = self.json(req).await?;
        Ok(stored.stored_bytes)
    }

    pub(crate) async fn chunk_file(&self, digest: &Digest) -> Result<Bytes, HandleError> {
        self.bytes(self.http.get(self.at(&format!("chunks/{}", digest.to_hex()))))
            .await
    }

    pub(crate) async fn write_backup(
        &self,
        id: &BackupId,
        disks: &[(String, FixedIndex, DiskStats)],
        info: BackupInfo,
    ) -> Result<Manifest, HandleError> {
        let body = WriteBackup {
            disks: disks
                .iter()
                .map(|(name, index, stats)| novacron_backup::commit_disk(name, index, stats))
                .collect(),
            vm_id: info.vm_id,
            project: info.project,
            full_reason: info.full_reason,
            duration_ms: info.duration_ms,
            config: info.config,
            key_id: info.key_id,
        };
        self.json(self.http.put(self.backup(id)).json(&body)).await
    }

    pub(crate) async fn index(&self, id: &BackupId, disk: &str) -> Result<FixedIndex, HandleError> {
        let bytes = self
            .bytes(self.http.get(format!("{}/disks/{disk}/index", self.backup(id))))
            .await?;
        FixedIndex::from_bytes(&bytes).map_err(|e| HandleError::Answered {
            url: self.base.clone(),
            kind: ErrorKind::Unavailable,
            message: format!("sent an unusable index of disk {disk} of {id}: {e}"),
        })
    }
}
