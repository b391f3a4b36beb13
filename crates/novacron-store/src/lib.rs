//! The store: objects with revisions, compare-and-swap writes, paginated lists
//! and watch-from-revision. Backends implement [`Store`] on raw JSON records;
//! [`StoreExt`] adds the typed layer on top.

pub mod conformance;
mod etcd;
pub mod etcd_process;
mod sqlite;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use novacron_api::Object;
use serde_json::Value;

pub use etcd::{EtcdLock, EtcdStore, EtcdUrl};
/// The etcd client, for leases and elections on an [`EtcdStore`]'s connection.
pub use etcd_client;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An object with this name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    /// The object changed since the caller read it.
    #[error("{kind} {name:?} was modified concurrently (expected revision {expected}, found {actual})")]
    Conflict {
        kind: String,
        name: String,
        expected: u64,
        actual: u64,
    },
    /// The requested watch revision is older than the retained history.
    #[error("Revision {requested} is no longer available (oldest is {oldest}); list again")]
    Compacted { requested: u64, oldest: u64 },
    #[error("Watch fell too far behind; list again")]
    WatchLagged,
    #[error("Stored object is not valid JSON for {kind}")]
    Corrupt {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Database error")]
    Database(#[from] rusqlite::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("Invalid store URL: {0}")]
    InvalidUrl(String),
    /// The backend answered something this store cannot make sense of.
    #[error("Unexpected store reply: {0}")]
    Unexpected(String),
    #[error("Store task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// One stored object.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: String,
    pub name: String,
    pub id: String,
    /// Store revision of the last write to this object.
    pub rev: u64,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "Added",
            EventType::Modified => "Modified",
            EventType::Deleted => "Deleted",
        }
    }
    fn parse(s: &str) -> EventType {
        match s {
            "Added" => EventType::Added,
            "Deleted" => EventType::Deleted,
            _ => EventType::Modified,
        }
    }
}

/// A change; for deletions `record` is the last state of the object.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: EventType,
    pub record: Record,
    /// For modifications, the object before the change: a filtered watch
    /// tells an object that left its selection (a VM that moved to another
    /// node) from one that was never in it.
    pub prev: Option<Value>,
}

pub struct ListPage {
    pub items: Vec<Record>,
    /// Name of the last item when more items follow.
    pub more_after: Option<String>,
    /// Store revision the page was read at.
    pub revision: u64,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;
pub type RecordFilter<'a> = &'a (dyn Fn(&Record) -> bool + Send + Sync);

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    async fn create(&self, kind: &str, name: &str, id: &str, value: Value) -> Result<Record, StoreError>;
    async fn get(&self, kind: &str, name: &str) -> Result<Option<Record>, StoreError>;
    async fn get_by_id(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError>;
    /// Replaces the object if its revision is still `expected_rev`.
    async fn update(&self, kind: &str, name: &str, expected_rev: u64, value: Value) -> Result<Record, StoreError>;
    /// Deletes the object; with `expected_rev`, only if it is still at that revision.
    async fn delete(&self, kind: &str, name: &str, expected_rev: Option<u64>) -> Result<Record, StoreError>;
    /// Objects of `kind` ordered by name, starting after `after`, that pass `filter`.
    async fn list(
        &self,
        kind: &str,
        filter: Option<RecordFilter<'_>>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError>;
    /// Changes to `kind` with a revision greater than `from_rev`, then live changes.
    async fn watch(&self, kind: &str, from_rev: u64) -> Result<EventStream, StoreError>;
    async fn revision(&self) -> Result<u64, StoreError>;
    /// Forgets the changes up to and including revision `up_to` (which must
    /// be below the current revision): a watch from an earlier revision then
    /// fails with [`StoreError::Compacted`]; from `up_to` on it still works.
    async fn compact(&self, up_to: u64) -> Result<(), StoreError>;
}

pub type SharedStore = Arc<dyn Store>;

fn decode<T: Object>(record: Record) -> Result<T, StoreError> {
    let mut obj: T = serde_json::from_value(record.value).map_err(|source| StoreError::Corrupt {
        kind: record.kind.clone(),
        source,
    })?;
    obj.meta_mut().resource_version = record.rev;
    Ok(obj)
}

fn encode<T: Object>(obj: &T) -> Value {
    // Serializing our own types to a Value cannot fail (string keys only).
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

/// Typed access on top of any [`Store`].
#[async_trait::async_trait]
pub trait StoreExt: Store {
    async fn create_obj<T: Object>(&self, obj: &T) -> Result<T, StoreError> {
        let m = obj.meta();
        let rec = self.create(T::KIND, &m.name, &m.id, encode(obj)).await?;
        decode(rec)
    }

    async fn get_obj<T: Object>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.get(T::KIND, name).await?.map(decode).transpose()
    }

    async fn get_obj_by_id<T: Object>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.get_by_id(T::KIND, id).await?.map(decode).transpose()
    }

    /// Compare-and-swap on `obj.meta().resource_version`; stamps `updated_at`.
    async fn update_obj<T: Object>(&self, obj: &T) -> Result<T, StoreError> {
        let mut obj = obj.clone();
        obj.meta_mut().updated_at = chrono::Utc::now();
        let expected = obj.meta().resource_version;
        let rec = self
            .update(T::KIND, &obj.meta().name.clone(), expected, encode(&obj))
            .await?;
        decode(rec)
    }

    async fn delete_obj<T: Object>(&self, name: &str, expected_rev: Option<u64>) -> Result<T, StoreError> {
        decode(self.delete(T::KIND, name, expected_rev).await?)
    }

    /// All objects of a kind (every page).
    async fn list_all<T: Object>(&self) -> Result<Vec<T>, StoreError> {
        Ok(self.list_all_at::<T>().await?.0)
    }

    /// All objects of a kind, and the revision the first page was read at
    /// (where a watch that follows the list starts).
    async fn list_all_at<T: Object>(&self) -> Result<(Vec<T>, u64), StoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut revision = None;
        loop {
            let page = self.list(T::KIND, None, after.as_deref(), 1000).await?;
            revision.get_or_insert(page.revision);
            for rec in page.items {
                out.push(decode(rec)?);
            }
            match page.more_after {
                Some(a) => after = Some(a),
                None => return Ok((out, revision.unwrap_or_default())),
            }
        }
    }

    /// Reads, applies `change`, writes back; retries on conflict. `change` returns
    /// false to leave the object alone.
    async fn modify<T: Object, F>(&self, name: &str, change: F) -> Result<T, StoreError>
    where
        F: Fn(&mut T) -> bool + Send + Sync,
    {
        loop {
            let Some(mut obj) = self.get_obj::<T>(name).await? else {
                return Err(StoreError::NotFound {
                    kind: T::KIND.to_string(),
                    name: name.to_string(),
                });
            };
            if !change(&mut obj) {
                return Ok(obj);
            }
            match self.update_obj(&obj).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other,
            }
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

pub fn decode_record<T: Object>(record: Record) -> Result<T, StoreError> {
    decode(record)
}
