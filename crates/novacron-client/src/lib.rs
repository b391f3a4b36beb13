//! Typed HTTP client for the `/v1` API, shared by the CLI, the agent and tests,
//! and the [`watcher`] every loop learns its work from.

pub mod watcher;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::io::StreamReader;

use novacron_api::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{} ({status})", detail.message)]
    Api { status: u16, detail: ErrorDetail },
    #[error("Request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Invalid response from the server")]
    Decode(#[source] serde_json::Error),
    #[error("Watch stream failed")]
    Watch(#[source] std::io::Error),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

/// Objects served under `/v1/<PATH>`.
pub trait Resource: Object {
    const PATH: &'static str;
}
impl Resource for Vm {
    const PATH: &'static str = "vms";
}
impl Resource for Node {
    const PATH: &'static str = "nodes";
}
impl Resource for Image {
    const PATH: &'static str = "images";
}
impl Resource for Migration {
    const PATH: &'static str = "migrations";
}
impl Resource for ClusterTrust {
    const PATH: &'static str = "trust";
}
impl Resource for novacron_api::Network {
    const PATH: &'static str = "networks";
}
impl Resource for novacron_api::SecurityGroup {
    const PATH: &'static str = "security-groups";
}
impl Resource for novacron_api::OverlayPeers {
    const PATH: &'static str = "overlay-peers";
}
impl Resource for novacron_api::Volume {
    const PATH: &'static str = "volumes";
}
impl Resource for novacron_api::BackupPolicy {
    const PATH: &'static str = "backup-policies";
}
impl Resource for novacron_api::Event {
    const PATH: &'static str = "events";
}
impl Resource for novacron_api::Webhook {
    const PATH: &'static str = "webhooks";
}

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ClientError>> + Send>>;
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<WatchEvent<T>, ClientError>> + Send>>;
pub type WatchLines<T> = Pin<Box<dyn Stream<Item = Result<WatchLine<T>, ClientError>> + Send>>;

#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<u32>,
    pub continue_token: Option<String>,
}

/// Which objects a list or watch is about; the server filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// `k=v,k2!=v2,...` on labels.
    pub label: Option<String>,
    /// `status.node=NAME,...` on the kind's selectable fields.
    pub field: Option<String>,
}

impl Selector {
    pub fn everything() -> Self {
        Selector::default()
    }
    pub fn labels(s: impl Into<String>) -> Self {
        Selector {
            label: Some(s.into()),
            field: None,
        }
    }
    pub fn fields(s: impl Into<String>) -> Self {
        Selector {
            label: None,
            field: Some(s.into()),
        }
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = &self.label {
            q.push(("label_selector", s.clone()));
        }
        if let Some(s) = &self.field {
            q.push(("field_selector", s.clone()));
        }
        q
    }
}

#[derive(Clone)]
pub struct Client {
    /// The servers' URLs: any of them serves the whole API.
    bases: Arc<Vec<String>>,
    /// The one in use; the next is tried when it cannot be reached.
    current: Arc<AtomicUsize>,
    token: String,
    http: reqwest::Client,
    /// Client without a total timeout, for streams.
    streaming: reqwest::Client,
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientError> {
        Self::with_tls::<()>(base_url, token, None)
    }

    /// A client whose HTTPS uses `tls` (a `rustls::ClientConfig`: the
    /// cluster CA, and the agent's certificate when it has one). An empty
    /// `token` sends no Authorization header. `base_url` may name several
    /// servers, comma-separated: a request that cannot reach one goes to
    /// the next.
    pub fn with_tls<C: std::any::Any + Clone + Send>(
        base_url: &str,
        token: &str,
        tls: Option<C>,
    ) -> Result<Self, ClientError> {
        let bases: Vec<String> = base_url
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        let base = bases.first().cloned().unwrap_or_default();
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(novacron_api::POOL_IDLE_TIMEOUT);
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            if let Some(cfg) = &tls {
                b = b.use_preconfigured_tls(cfg.clone());
            }
            b.build().map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })
        };
        Ok(Client {
            http: build(Some(Duration::from_secs(60)))?,
            streaming: build(None)?,
            bases: Arc::new(if bases.is_empty() { vec![base] } else { bases }),
            current: Default::default(),
            token: token.to_string(),
        })
    }

    /// The server in use now.
    pub fn base_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.base_url(), path.trim_start_matches('/'))
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
        let req = if self.token.is_empty() {
            req
        } else {
            req.bearer_auth(&self.token)
        };
        self.check(req, url).await
    }

    /// Sends the request to the server in use, or, while a server cannot be
    /// reached (the request never left), to the next.
    async fn send_to_some_server(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let http_err = |source| ClientError::Http {
            url: url.to_string(),
            source,
        };
        let (http, request) = req.build_split();
        let request = request.map_err(http_err)?;
        let mut tried = 0;
        let mut next = request.try_clone();
        let mut result = http.execute(request).await;
        loop {
            let unreachable = matches!(&result, Err(e) if e.is_connect());
            tried += 1;
            let (Some(mut retry), true) = (next.take(), unreachable && tried < self.bases.len()) else {
                return result.map_err(http_err);
            };
            // Move on from the server this request went to (its base and a
            // '/': a base may be a prefix of another's, `h:80` of `h:8080`).
            let url = retry.url().as_str();
            let Some(from) = self
                .bases
                .iter()
                .position(|b| url.strip_prefix(b.as_str()).is_some_and(|rest| rest.starts_with('/')))
            else {
                return result.map_err(http_err);
            };
            let to = (from + 1) % self.bases.len();
            let _ = self
                .current
                .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
            let moved = format!("{}{}", self.bases[to], &url[self.bases[from].len()..]);
            match reqwest::Url::parse(&moved) {
                Ok(u) => *retry.url_mut() = u,
                Err(_) => return result.map_err(http_err),
            }
            next = retry.try_clone();
            result = http.execute(retry).await;
        }
    }

    /// Sends as the request says (its own credentials); a refusal is an error.
    async fn check(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
        let resp = self.send_to_some_server(req, url).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let detail = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_else(|_| ErrorDetail {
                code: "http".into(),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
                field: None,
            });
        Err(ClientError::Api { status, detail })
    }

    async fn json<R: DeserializeOwned>(&self, req: reqwest::RequestBuilder, url: &str) -> Result<R, ClientError> {
        let resp = self.send(req, url).await?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    pub async fn get_json<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let url = self.url(path);
        self.json(self.http.get(&url), &url).await
    }

    pub async fn post_json<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let url = self.url(path);
        self.json(self.http.post(&url).json(body), &url).await
    }

    pub async fn put_json<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let url = self.url(path);
        self.json(self.http.put(&url).json(body), &url).await
    }

    // ------------------------------------------------------------ generic resources

    /// PUTs `body` as application/octet-stream; the JSON answer.
    pub async fn put_bytes<R: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<R, ClientError> {
        let url = self.url(path);
        let req = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.json(req, &url).await
    }

    /// GETs a binary answer.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let url = self.url(path);
        let resp = self.send(self.http.get(&url), &url).await?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        Ok(bytes.to_vec())
    }

    /// POSTs JSON and reads the answer as newline-delimited JSON values
    /// (answers that stream progress, then an outcome).
    pub async fn post_ndjson<B: Serialize + ?Sized, T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<impl Stream<Item = Result<T, ClientError>> + Send, ClientError> {
        let url = self.url(path);
        let resp = self.send(self.streaming.post(&url).json(body), &url).await?;
        Ok(ndjson_body(resp))
    }

    /// Who `token` is (not this client's own token): for a service that
    /// takes the cluster's tokens and asks the server what they may do.
    pub async fn whoami_of(&self, token: &str) -> Result<novacron_api::WhoAmI, ClientError> {
        let url = self.url("whoami");
        let resp = self.check(self.http.get(&url).bearer_auth(token), &url).await?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http { url, source })?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    pub async fn get<T: Resource>(&self, name: &str) -> Result<T, ClientError> {
        self.get_json(&format!("{}/{name}", T::PATH)).await
    }

    pub async fn list<T: Resource>(&self, opts: &ListOptions) -> Result<List<T>, ClientError> {
        let url = self.url(T::PATH);
        let mut query = Selector {
            label: opts.label_selector.clone(),
            field: opts.field_selector.clone(),
        }
        .query();
        if let Some(l) = opts.limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = &opts.continue_token {
            query.push(("continue", c.clone()));
        }
        self.json(self.http.get(&url).query(&query), &url).await
    }

    /// Lists every page; returns the items and the revision of the first page.
    pub async fn list_all<T: Resource>(&self, selector: &Selector) -> Result<(Vec<T>, u64), ClientError> {
        let mut opts = ListOptions {
            label_selector: selector.label.clone(),
            field_selector: selector.field.clone(),
            limit: Some(500),
            continue_token: None,
        };
        let mut items = Vec::new();
        let mut revision = None;
        loop {
            let page = self.list::<T>(&opts).await?;
            revision.get_or_insert(page.resource_version);
            items.extend(page.items);
            match page.continue_token {
                Some(c) => opts.continue_token = Some(c),
                None => return Ok((items, revision.unwrap_or_default())),
            }
        }
    }

    pub async fn get_query<R: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<R, ClientError> {
        let url = self.url(path);
        self.json(self.http.get(&url).query(query), &url).await
    }

    /// DELETE on any API path (e.g. `users/alice`).
    pub async fn delete_path(&self, path: &str) -> Result<(), ClientError> {
        let url = self.url(path);
        self.send(self.http.delete(&url), &url).await.map(|_| ())
    }

    async fn open_watch<T: Resource>(
        &self,
        resource_version: u64,
        selector: &Selector,
        bookmarks: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(T::PATH);
        let mut query = selector.query();
        query.push(("watch", "true".to_string()));
        if bookmarks {
            query.push(("allow_bookmarks", "true".to_string()));
        }
        query.push(("resource_version", resource_version.to_string()));
        self.send(self.streaming.get(&url).query(&query), &url).await
    }

    /// DELETE on any API path, for an endpoint that answers with a body.
    pub async fn delete_json<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let url = self.url(path);
        self.json(self.http.delete(&url), &url).await
    }

    pub async fn delete<T: Resource>(&self, name: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("{}/{name}", T::PATH));
        self.send(self.http.delete(&url), &url).await.map(|_| ())
    }

    /// Watches changes after `resource_version`, with bookmarks (lines
    /// that only say how far the stream has got); the stream ends if the
    /// server ends it.
    pub async fn watch_lines<T: Resource>(
        &self,
        resource_version: u64,
        selector: &Selector,
    ) -> Result<WatchLines<T>, ClientError> {
        let resp = self.open_watch::<T>(resource_version, selector, true).await?;
        Ok(Box::pin(ndjson_body::<WatchLine<T>>(resp)))
    }

    /// Watches changes after `resource_version`; the stream ends if the server ends it.
    pub async fn watch<T: Resource>(
        &self,
        resource_version: u64,
        selector: &Selector,
    ) -> Result<WatchStream<T>, ClientError> {
        let resp = self.open_watch::<T>(resource_version, selector, false).await?;
        Ok(Box::pin(ndjson_body::<WatchEvent<T>>(resp)))
    }

    // ------------------------------------------------------------ VMs

    pub async fn create_vm(&self, req: &CreateVm) -> Result<Vm, ClientError> {
        self.post_json("vms", req).await
    }

    /// Deletes a VM; `force` removes the record even if its node cannot clean up.
    pub async fn delete_vm(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let url = self.url(&format!("vms/{name}"));
        self.send(self.http.delete(&url).query(&[("force", force)]), &url)
            .await
            .map(|_| ())
    }

    /// Runs a lifecycle action: start, stop, reboot, pause, resume.
    pub async fn vm_action(&self, name: &str, action: &str, stop: Option<&StopVm>) -> Result<Vm, ClientError> {
        let body = stop.cloned().unwrap_or_default();
        self.post_json(&format!("vms/{name}/{action}"), &body).await
    }

    pub async fn put_vm_status(&self, name: &str, vm: &Vm) -> Result<Vm, ClientError> {
        self.put_json(&format!("vms/{name}/status"), vm).await
    }

    /// Called by the agent once a deleted VM's process and disks are gone.
    pub async fn finalize_vm(&self, name: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("vms/{name}/finalize"));
        self.send(self.http.post(&url), &url).await.map(|_| ())
    }

    /// The VM's serial console log; with `follow` the stream stays open.
    pub async fn vm_logs(&self, name: &str, follow: bool) -> Result<ByteStream, ClientError> {
        let url = self.url(&format!("vms/{name}/logs"));
        let resp = self
            .send(self.streaming.get(&url).query(&[("follow", follow)]), &url)
            .await?;
        Ok(byte_stream(resp, url))
    }

    // ------------------------------------------------------------ migrations

    pub async fn create_migration(&self, req: &CreateMigration) -> Result<Migration, ClientError> {
        self.post_json("migrations", req).await
    }

    /// Dry run: what moving the VM would take, measured by its node. Nothing moves.
    pub async fn plan_migration(&self, req: &CreateMigration) -> Result<MigrationPlan, ClientError> {
        self.post_json("migrations/plan", req).await
    }

    pub async fn cancel_migration(&self, name: &str) -> Result<Migration, ClientError> {
        self.post_json(&format!("migrations/{name}/cancel"), &serde_json::json!({}))
            .await
    }

    pub async fn put_migration_status(&self, m: &Migration) -> Result<Migration, ClientError> {
        self.put_json(&format!("migrations/{}/status", m.metadata.name), m)
            .await
    }

    pub async fn complete_migration(&self, name: &str, req: &CompleteMigration) -> Result<Migration, ClientError> {
        self.post_json(&format!("migrations/{name}/complete"), req).await
    }

    // ------------------------------------------------------------ nodes

    pub async fn register_node(&self, req: &RegisterNode) -> Result<RegisterNodeResponse, ClientError> {
        self.post_json("nodes/register", req).await
    }

    pub async fn heartbeat(&self, name: &str) -> Result<Node, ClientError> {
        self.post_json(&format!("nodes/{name}/heartbeat"), &serde_json::json!({}))
            .await
    }

    pub async fn set_schedulable(&self, name: &str, schedulable: bool) -> Result<Node, ClientError> {
        let action = if schedulable { "uncordon" } else { "cordon" };
        self.post_json(&format!("nodes/{name}/{action}"), &serde_json::json!({}))
            .await
    }

    // ------------------------------------------------------------ images

    pub async fn create_image(&self, req: &CreateImage) -> Result<Image, ClientError> {
        self.post_json("images", req).await
    }

    /// Uploads one file of an image; the body is streamed.
    pub async fn upload_image_part(
        &self,
        name: &str,
        part: ImagePart,
        body: reqwest::Body,
    ) -> Result<Image, ClientError> {
        let url = self.url(&format!("images/{name}/files/{}", part.as_str()));
        self.json(self.streaming.put(&url).body(body), &url).await
    }

    pub async fn download_image_part(&self, name: &str, part: ImagePart) -> Result<ByteStream, ClientError> {
        let url = self.url(&format!("images/{name}/files/{}", part.as_str()));
        let resp = self.send(self.streaming.get(&url), &url).await?;
        Ok(byte_stream(resp, url))
    }
}

fn byte_stream(resp: reqwest::Response, url: String) -> ByteStream {
    Box::pin(resp.bytes_stream().map(move |r| {
        r.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })
    }))
}

/// The longest line a watch stream may carry: one object, with room to spare.
const MAX_WATCH_LINE: usize = 16 * 1024 * 1024;

/// A response's body as newline-delimited JSON values (see [`ndjson`]).
pub fn ndjson_body<T: DeserializeOwned + Send + 'static>(
    resp: reqwest::Response,
) -> impl Stream<Item = Result<T, ClientError>> + Send {
    let body = resp.bytes_stream().map(|r| r.map_err(std::io::Error::other));
    ndjson::<T>(body, MAX_WATCH_LINE)
}

/// Splits a response body into newline-delimited JSON values. Blank lines are
/// skipped; a line that is not the JSON expected is an error and the stream
/// goes on; a failed body or a line over `max_line` bytes ends it with an error.
fn ndjson<T: DeserializeOwned + Send + 'static>(
    body: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    max_line: usize,
) -> impl Stream<Item = Result<T, ClientError>> + Send {
    use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
    let lines = FramedRead::new(StreamReader::new(body), LinesCodec::new_with_max_length(max_line));
    // FramedRead yields nothing more after an error, so an error ends the stream.
    lines.filter_map(|line| async move {
        match line {
            Ok(l) if l.trim().is_empty() => None,
            Ok(l) => Some(serde_json::from_str::<T>(&l).map_err(ClientError::Decode)),
            Err(LinesCodecError::Io(e)) => Some(Err(ClientError::Watch(e))),
            Err(e @ LinesCodecError::MaxLineLengthExceeded) => Some(Err(ClientError::Watch(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e,
            )))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static str]) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p.as_bytes())))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn ndjson_splits_lines_across_chunks_and_skips_blank_ones() {
        let body = chunks(&["{\"a\":1}\n\n  \r\n{\"a\"", ":2}\r\n", "not json\n{\"a\":3}"]);
        let got: Vec<_> = ndjson::<serde_json::Value>(body, 1024).collect().await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap()["a"], 1);
        assert_eq!(got[1].as_ref().unwrap()["a"], 2);
        assert!(
            matches!(got[2], Err(ClientError::Decode(_))),
            "a bad line is an error, not the end"
        );
        assert_eq!(got[3].as_ref().unwrap()["a"], 3, "the last line needs no newline");
    }

    #[tokio::test]
    async fn ndjson_ends_on_an_overlong_line_or_a_failed_body() {
        let body = chunks(&["{\"a\":1}\n", "{\"a\":\"0123456789\"}\n", "{\"a\":2}\n"]);
        let got: Vec<_> = ndjson::<serde_json::Value>(body, 12).collect().await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[1], Err(ClientError::Watch(e)) if e.kind() == std::io::ErrorKind::InvalidData));

        let body = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"{\"a\":1}\n")),
            Err(std::io::Error::other("connection reset")),
            Ok(Bytes::from_static(b"{\"a\":2}\n")),
        ]);
        let got: Vec<_> = ndjson::<serde_json::Value>(body, 1024).collect().await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(got[1], Err(ClientError::Watch(_))));
    }
}
