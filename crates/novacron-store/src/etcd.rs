//! etcd backend (v3 API). Each object is one key, `{root}/o/{kind}/{name}`,
//! whose value is `{"id", "value"}`; its etcd mod revision is the object's
//! revision, so compare-and-swap is an etcd transaction on it and watch is an
//! etcd watch from a revision. `{root}/i/{kind}/{id}` maps ids to names and is
//! written in the same transaction. History is compacted by [`EtcdStore`]
//! itself, keeping the last [`HISTORY`] revisions as the SQLite backend does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType as EtcdEventType, GetOptions, KeyValue, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Event, EventStream, EventType, ListPage, Record, RecordFilter, Store, StoreError};

/// How many revisions of history are kept for watch-from-revision.
pub const HISTORY: u64 = 20_000;
/// Objects read per range request while listing.
const CHUNK: i64 = 512;
/// Per-request deadline: a request to a partitioned member fails rather than hangs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond this many remembered ids the cache starts over (it only saves reads).
const ID_CACHE_LIMIT: usize = 200_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    value: Value,
}

/// (kind, name) → (revision, id).
type IdCache = Arc<Mutex<HashMap<(String, String), (u64, String)>>>;

/// One client per member. tonic's balancing across endpoints keeps sending
/// a share of requests to a dead member (a quarter of them, measured with
/// one of three down), so requests go to one member at a time and move on
/// to the next when it cannot be reached.
#[derive(Clone)]
struct Members {
    clients: Arc<Vec<Client>>,
    /// The same members without a request deadline, for calls that wait as
    /// long as they must (an election campaign): a campaign cut short by the
    /// client's deadline is resigned by etcd, which can race with a campaign
    /// made again on the same lease and leave two servers thinking they won.
    patient: Arc<Vec<Client>>,
    current: Arc<AtomicUsize>,
}

impl Members {
    fn current(&self) -> (usize, &Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, &self.clients[i])
    }

    /// Moves on from member `i` (unless another caller already did).
    fn skip(&self, i: usize) {
        let next = (i + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs `op` on the current member, then on the others while the member
    /// cannot be reached. A request that may have reached etcd before its
    /// connection broke is tried again only if `idempotent`.
    async fn call<T, F, Fut>(&self, idempotent: bool, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.clients.len() {
            let (i, client) = self.current();
            match op(client.clone()).await {
                Err(e) if is_unreachable(&e) || (idempotent && is_transport(&e)) => {
                    tracing::debug!(error = %e, member = i, "etcd member unreachable; trying the next");
                    self.skip(i);
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no etcd member".into())))
    }
}

/// The request never left: the member refused or did not answer the connection.
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && (s.message().contains("connect") || s.message().contains("refused"))
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// The connection failed, perhaps after the request was sent.
fn is_transport(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.message().contains("transport error")
                || s.code() == tonic::Code::Unavailable
                || s.message().contains("Timeout expired")
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

pub struct EtcdStore {
    members: Members,
    root: String,
    /// (kind, name) → (revision, id) as last seen: an update at that revision
    /// can write the id back without reading the object first.
    ids: IdCache,
}

/// Where an etcd store lives: `etcd://HOST:PORT[,HOST:PORT...][/ROOT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// Client endpoints, `http://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// Key prefix of every object (default `/novacron`): several clusters, or
    /// tests, can share one etcd.
    pub root: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| StoreError::InvalidUrl(format!("{url:?} does not start with etcd://")))?;
        let (members, root) = match rest.split_once('/') {
            Some((members, root)) if !root.trim_matches('/').is_empty() => {
                (members, format!("/{}", root.trim_matches('/')))
            }
            Some((members, _)) => (members, "/novacron".to_string()),
            None => (rest, "/novacron".to_string()),
        };
        let endpoints: Vec<String> = members
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| format!("http://{e}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::InvalidUrl(format!("{url:?} names no etcd member")));
        }
        for e in &endpoints {
            let authority = e.trim_start_matches("http://");
            let port_ok = authority
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(StoreError::InvalidUrl(format!(
                    "etcd member {authority:?} is not HOST:PORT"
                )));
            }
        }
        Ok(EtcdUrl { endpoints, root })
    }
}

/// A held cluster-wide lock (see [`EtcdStore::lock`]).
pub struct EtcdLock {
    client: Client,
    key: Vec<u8>,
    lease: i64,
}

impl EtcdLock {
    /// Releases the lock (and its lease). If etcd cannot be told, the lease
    /// frees it when it expires.
    pub async fn release(self) {
        let client = self.client;
        if let Err(e) = client.lock_client().unlock(self.key).await {
            tracing::debug!(error = %e, "cannot unlock; the lease will free the lock");
        }
        let _ = client.lease_client().revoke(self.lease).await;
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Prefixes here end in '/', never 0xff, so incrementing the last byte is enough.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn rev_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<u64, StoreError> {
    header
        .map(|h| rev_of(h.revision()))
        .ok_or_else(|| StoreError::Unexpected("etcd reply without a header".into()))
}

/// etcd keeps the revisions from its compaction revision on; ours is the last
/// revision a watch may start after.
fn oldest_after_compaction(compact_revision: i64) -> u64 {
    rev_of(compact_revision).saturating_sub(1)
}

fn is_future_revision(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("future revision"))
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

impl EtcdStore {
    /// Connects to the members of `url`; fails when none answers.
    pub async fn connect(url: &EtcdUrl) -> Result<Self, StoreError> {
        let patient_options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let options = patient_options.clone().with_timeout(REQUEST_TIMEOUT);
        let (mut clients, mut patient) = (Vec::new(), Vec::new());
        for endpoint in &url.endpoints {
            // Connections are made lazily: a member down now is used once it is back.
            clients.push(Client::connect([endpoint], Some(options.clone())).await?);
            patient.push(Client::connect([endpoint], Some(patient_options.clone())).await?);
        }
        let store = EtcdStore {
            members: Members {
                clients: Arc::new(clients),
                patient: Arc::new(patient),
                current: Default::default(),
            },
            root: url.root.clone(),
            ids: Default::default(),
        };
        // Fails now, not at the first request, when no member answers.
        store.revision().await?;
        Ok(store)
    }

    /// The client of the member in use, for leases and elections.
    pub fn client(&self) -> Client {
        self.members.current().1.clone()
    }

    /// The client of the member in use without a request deadline, for calls
    /// that wait for others (a campaign); a dead member still fails them,
    /// through the connection's keep-alive.
    pub fn patient_client(&self) -> Client {
        let (i, _) = self.members.current();
        self.members.patient[i].clone()
    }

    /// Moves on to the next member (after a failed lease or election call,
    /// whose streams this store cannot retry itself).
    pub fn use_next_member(&self) {
        self.members.skip(self.members.current().0);
    }

    /// Takes the cluster-wide lock `name`, waiting while another holder has
    /// it. The lock lives under a lease of `ttl`: a holder that dies frees it
    /// then. Release it with [`EtcdLock::release`].
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<EtcdLock, StoreError> {
        let client = self.client();
        let lease = client
            .lease_client()
            .grant(ttl.as_secs().max(1) as i64, None)
            .await?
            .id();
        let key = format!("{}/locks/{name}", self.root);
        let locked = client
            .lock_client()
            .lock(key, Some(etcd_client::LockOptions::new().with_lease(lease)))
            .await;
        match locked {
            Ok(resp) => Ok(EtcdLock {
                client,
                key: resp.key().to_vec(),
                lease,
            }),
            Err(e) => {
                let _ = client.lease_client().revoke(lease).await;
                self.use_next_member();
                Err(e.into())
            }
        }
    }

    /// The key prefix everything of this store lives under.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn object_prefix(&self, kind: &str) -> String {
        format!("{}/o/{kind}/", self.root)
    }

    fn object_key(&self, kind: &str, name: &str) -> String {
        format!("{}/o/{kind}/{name}", self.root)
    }

    fn id_key(&self, kind: &str, id: &str) -> String {
        format!("{}/i/{kind}/{id}", self.root)
    }

    fn remember(&self, kind: &str, name: &str, rev: u64, id: &str) {
        let mut ids = self.ids.lock();
        if ids.len() >= ID_CACHE_LIMIT {
            ids.clear();
        }
        ids.insert((kind.to_string(), name.to_string()), (rev, id.to_string()));
    }

    fn forget(&self, kind: &str, name: &str) {
        self.ids.lock().remove(&(kind.to_string(), name.to_string()));
    }

    fn cached_id(&self, kind: &str, name: &str, rev: u64) -> Option<String> {
        self.ids
            .lock()
            .get(&(kind.to_string(), name.to_string()))
            .filter(|(r, _)| *r == rev)
            .map(|(_, id)| id.clone())
    }

    fn decode(&self, kind: &str, name: &str, rev: u64, bytes: &[u8]) -> Result<Record, StoreError> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
            kind: kind.to_string(),
            source,
        })?;
        Ok(Record {
            kind: kind.to_string(),
            name: name.to_string(),
            id: stored.id,
            rev,
            value: stored.value,
        })
    }

    fn decode_kv(&self, kind: &str, kv: &KeyValue) -> Result<Record, StoreError> {
        let prefix = self.object_prefix(kind);
        let name = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(prefix.as_str()))
            .ok_or_else(|| StoreError::Unexpected(format!("etcd key outside {prefix}")))?;
        let record = self.decode(kind, name, rev_of(kv.mod_revision()), kv.value())?;
        self.remember(kind, name, record.rev, &record.id);
        Ok(record)
    }

    fn encode(id: &str, value: &Value) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&Stored {
            id: id.to_string(),
            value: value.clone(),
        })
        .map_err(|e| StoreError::Unexpected(format!("cannot encode an object: {e}")))
    }

    /// Compacts history older than the last [`HISTORY`] revisions; returns the
    /// revision compacted to, if any. Harmless to run from several servers.
    pub async fn compact_history(&self) -> Result<Option<u64>, StoreError> {
        let now = self.revision().await?;
        if now <= HISTORY {
            return Ok(None);
        }
        let up_to = now - HISTORY;
        self.compact(up_to).await?;
        Ok(Some(up_to))
    }

    /// Runs [`Self::compact_history`] every minute until the store is dropped.
    pub fn spawn_compactor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                match store.compact_history().await {
                    Ok(Some(rev)) => tracing::debug!(revision = rev, "compacted etcd history"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot compact etcd history"),
                }
            }
        });
    }

    /// A write transaction, sent to the next member only if the current one
    /// could not be reached (its outcome is otherwise unknown).
    async fn write(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let resp = self
            .members
            .call(false, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(resp)
    }

    /// One key, read from whichever member answers.
    async fn read_key(&self, key: String) -> Result<etcd_client::GetResponse, StoreError> {
        let resp = self
            .members
            .call(true, |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        Ok(resp)
    }

    /// The oldest revision a watch can start from, learned from etcd's
    /// compaction notice for a watch that starts too early.
    async fn compacted_since(&self, kind: &str, from_rev: u64) -> Result<u64, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_rev as i64 + 1);
        let prefix = self.object_prefix(kind);
        let mut stream = self
            .members
            .call(true, |c| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { c.watch_client().watch(prefix, Some(options)).await }
            })
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(resp)) = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or(Ok(None))
        {
            if resp.compact_revision() > 0 {
                return Ok(oldest_after_compaction(resp.compact_revision()));
            }
        }
        Err(StoreError::Unexpected(format!(
            "etcd said revision {from_rev} is compacted but sent no compaction notice"
        )))
    }
}

/// Turns one etcd watch event into ours.
fn convert_event(store: &EtcdStore, kind: &str, ev: &etcd_client::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Unexpected("etcd watch event without a key".into()))?;
    let prev = ev.prev_kv().map(|p| store.decode_kv(kind, p)).transpose()?;
    match ev.event_type() {
        EtcdEventType::Put => {
            let record = store.decode_kv(kind, kv)?;
            let event_type = if kv.version() == 1 {
                EventType::Added
            } else {
                EventType::Modified
            };
            Ok(Event {
                event_type,
                prev: prev.filter(|_| event_type == EventType::Modified).map(|p| p.value),
                record,
            })
        }
        EtcdEventType::Delete => {
            // A deletion carries no value: the object is what it replaced.
            let last = prev.ok_or_else(|| {
                StoreError::Unexpected("etcd deletion without the previous object (history compacted?)".into())
            })?;
            let name = last.name.clone();
            store.forget(kind, &name);
            Ok(Event {
                event_type: EventType::Deleted,
                record: Record {
                    rev: rev_of(kv.mod_revision()),
                    ..last
                },
                prev: None,
            })
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn create(&self, kind: &str, name: &str, id: &str, value: Value) -> Result<Record, StoreError> {
        let key = self.object_key(kind, name);
        let id_key = self.id_key(kind, id);
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key, Self::encode(id, &value)?, None),
                TxnOp::put(id_key, name, None),
            ]);
        let resp = self.write(txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                kind: kind.to_string(),
                name: name.to_string(),
            });
        }
        let rev = header_revision(resp.header())?;
        self.remember(kind, name, rev, id);
        Ok(Record {
            kind: kind.to_string(),
            name: name.to_string(),
            id: id.to_string(),
            rev,
            value,
        })
    }

    async fn get(&self, kind: &str, name: &str) -> Result<Option<Record>, StoreError> {
        let key = self.object_key(kind, name);
        let resp = self.read_key(key).await?;
        resp.kvs().first().map(|kv| self.decode_kv(kind, kv)).transpose()
    }

    async fn get_by_id(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let key = self.id_key(kind, id);
        let resp = self.read_key(key).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let name = kv
            .value_str()
            .map_err(|_| StoreError::Unexpected(format!("id index of {kind} {id} is not UTF-8")))?
            .to_string();
        // Deleted (or replaced by a namesake) between the two reads: not found.
        Ok(self.get(kind, &name).await?.filter(|r| r.id == id))
    }

    async fn update(&self, kind: &str, name: &str, expected_rev: u64, value: Value) -> Result<Record, StoreError> {
        // The stored value carries the id; the transaction below decides
        // whether the object is still at `expected_rev`.
        let id = match self.cached_id(kind, name, expected_rev) {
            Some(id) => id,
            None => match self.get(kind, name).await? {
                Some(current) => current.id,
                None => {
                    return Err(StoreError::NotFound {
                        kind: kind.to_string(),
                        name: name.to_string(),
                    })
                }
            },
        };
        let key = self.object_key(kind, name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected_rev as i64,
            )])
            .and_then([TxnOp::put(key.clone(), Self::encode(&id, &value)?, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.write(txn).await?;
        if !resp.succeeded() {
            let current = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev_of(kv.mod_revision())),
                _ => None,
            });
            return Err(match current {
                None => StoreError::NotFound {
                    kind: kind.to_string(),
                    name: name.to_string(),
                },
                Some(actual) => StoreError::Conflict {
                    kind: kind.to_string(),
                    name: name.to_string(),
                    expected: expected_rev,
                    actual,
                },
            });
        }
        let rev = header_revision(resp.header())?;
        self.remember(kind, name, rev, &id);
        Ok(Record {
            kind: kind.to_string(),
            name: name.to_string(),
            id,
            rev,
            value,
        })
    }

    async fn delete(&self, kind: &str, name: &str, expected_rev: Option<u64>) -> Result<Record, StoreError> {
        loop {
            let Some(current) = self.get(kind, name).await? else {
                return Err(StoreError::NotFound {
                    kind: kind.to_string(),
                    name: name.to_string(),
                });
            };
            if let Some(expected) = expected_rev.filter(|e| *e != current.rev) {
                return Err(StoreError::Conflict {
                    kind: kind.to_string(),
                    name: name.to_string(),
                    expected,
                    actual: current.rev,
                });
            }
            let key = self.object_key(kind, name);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, current.rev as i64)])
                .and_then([
                    TxnOp::delete(key, None::<DeleteOptions>),
                    TxnOp::delete(self.id_key(kind, &current.id), None::<DeleteOptions>),
                ]);
            let resp = self.write(txn).await?;
            if !resp.succeeded() {
                // Changed or deleted since the read: decide again on what is there now.
                continue;
            }
            self.forget(kind, name);
            return Ok(Record {
                rev: header_revision(resp.header())?,
                ..current
            });
        }
    }

    async fn list(
        &self,
        kind: &str,
        filter: Option<RecordFilter<'_>>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let limit = limit.max(1);
        let prefix = self.object_prefix(kind);
        let end = prefix_end(&prefix);
        let mut items: Vec<Record> = Vec::new();
        // Every chunk is read at the first chunk's revision: one consistent page.
        let mut revision: Option<u64> = None;
        let mut from = match after {
            // The first key after `after`: `after` followed by a zero byte.
            Some(a) => {
                let mut k = format!("{prefix}{a}").into_bytes();
                k.push(0);
                k
            }
            None => prefix.clone().into_bytes(),
        };
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(CHUNK);
            if let Some(rev) = revision {
                options = options.with_revision(rev as i64);
            }
            let resp = self
                .members
                .call(true, |c| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { c.kv_client().get(from, Some(options)).await }
                })
                .await?;
            let rev = *revision.get_or_insert(header_revision(resp.header())?);
            for kv in resp.kvs() {
                let record = self.decode_kv(kind, kv)?;
                if filter.is_some_and(|f| !f(&record)) {
                    continue;
                }
                if items.len() == limit {
                    let more_after = items.last().map(|r| r.name.clone());
                    return Ok(ListPage {
                        items,
                        more_after,
                        revision: rev,
                    });
                }
                items.push(record);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    return Ok(ListPage {
                        items,
                        more_after: None,
                        revision: rev,
                    })
                }
            }
        }
    }

    async fn watch(&self, kind: &str, from_rev: u64) -> Result<EventStream, StoreError> {
        // A watch from a compacted revision must fail now, as on SQLite: a
        // read at the first revision it replays tells.
        let probe = GetOptions::new().with_count_only().with_revision(from_rev as i64 + 1);
        let prefix = self.object_prefix(kind);
        let probed = self
            .members
            .call(true, |c| {
                let (prefix, probe) = (prefix.clone(), probe.clone());
                async move { c.kv_client().get(prefix, Some(probe)).await }
            })
            .await;
        match probed {
            Ok(_) => {}
            Err(e) if is_compacted(&e) => {
                return Err(StoreError::Compacted {
                    requested: from_rev,
                    oldest: self.compacted_since(kind, from_rev).await?,
                })
            }
            // Nothing written since `from_rev`: fine, unless `from_rev` is
            // beyond this store's history (another store's revision): then
            // there is nothing to replay from and the caller must list.
            Err(e) if is_future_revision(&e) => {
                let now = self.revision().await?;
                if from_rev > now {
                    return Err(StoreError::Compacted {
                        requested: from_rev,
                        oldest: now,
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(from_rev as i64 + 1);
        let watch = self
            .members
            .call(true, |c| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { c.watch_client().watch(prefix, Some(options)).await }
            })
            .await?;
        let (sender, responses) = watch.split();
        let store = EtcdStore {
            members: self.members.clone(),
            root: self.root.clone(),
            ids: self.ids.clone(),
        };
        let kind = kind.to_string();
        // The sender must live as long as the stream: dropping it ends the watch.
        let pending: std::collections::VecDeque<Result<Event, StoreError>> = std::collections::VecDeque::new();
        let state = (responses, sender, store, kind, pending, false);
        let stream = futures::stream::unfold(state, move |mut st| async move {
            let (responses, _sender, store, kind, pending, failed) = &mut st;
            loop {
                if *failed {
                    return None;
                }
                if let Some(item) = pending.pop_front() {
                    if item.is_err() {
                        *failed = true;
                    }
                    return Some((item, st));
                }
                match responses.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            pending.push_back(Err(StoreError::Compacted {
                                requested: from_rev,
                                oldest: oldest_after_compaction(resp.compact_revision()),
                            }));
                            continue;
                        }
                        for ev in resp.events() {
                            pending.push_back(convert_event(store, kind, ev));
                        }
                        if resp.canceled() && pending.is_empty() {
                            pending.push_back(Err(StoreError::Unexpected(format!(
                                "etcd cancelled the watch: {}",
                                resp.cancel_reason()
                            ))));
                        }
                    }
                    Ok(None) => return None,
                    Err(e) => pending.push_back(Err(e.into())),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn compact(&self, up_to: u64) -> Result<(), StoreError> {
        // etcd keeps its compaction revision itself: compact to the one after.
        let compacted = self
            .members
            .call(
                true,
                |c| async move { c.kv_client().compact(up_to as i64 + 1, None).await },
            )
            .await;
        match compacted {
            Ok(_) => Ok(()),
            // Already compacted this far (by another server, say).
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let key = format!("{}/", self.root);
        let resp = self
            .members
            .call(true, |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        header_revision(resp.header())
    }
}

#[cfg(test)]
mod tests {
    use super::EtcdUrl;

    #[test]
    fn urls() {
        let u: EtcdUrl = "etcd://a:2379,b:2380".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.endpoints, ["http://a:2379", "http://b:2380"]);
        assert_eq!(u.root, "/novacron");
        let u: EtcdUrl = "etcd://127.0.0.1:1/prod/nc/".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.endpoints.len(), u.root.as_str()), (1, "/prod/nc"));
        for bad in ["http://a:1", "etcd://", "etcd://a", "etcd://a:x", "etcd://:1"] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }
}
