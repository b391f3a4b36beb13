//! SQLite backend: one file in WAL mode. Writes are serialised by one
//! connection behind a mutex, which also orders revisions and event delivery:
//! an event is broadcast while the lock is held, so a watcher that subscribes
//! under the lock and then reads the backlog sees every revision exactly once.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use crate::{Event, EventStream, EventType, ListPage, Record, RecordFilter, Store, StoreError};

/// How many events are kept for watch-from-revision.
const EVENT_HISTORY: u64 = 20_000;

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// parking_lot: no poisoning. A panic while holding it leaves SQLite
    /// consistent (transactions roll back), so the next caller goes on.
    conn: Mutex<Connection>,
    events: broadcast::Sender<Arc<Event>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL,
    rev INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (kind, name)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS objects_by_id ON objects (kind, id);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER PRIMARY KEY, kind TEXT NOT NULL, type TEXT NOT NULL,
    name TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, prev TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0);
";

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_prev_column(&conn)?;
        Ok(Self::from_conn(conn))
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self::from_conn(conn))
    }

    fn from_conn(conn: Connection) -> Self {
        let (events, _) = broadcast::channel(4096);
        SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                events,
            }),
        }
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &broadcast::Sender<Arc<Event>>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock();
            f(&mut conn, &inner.events)
        })
        .await?
    }

    /// Writes many new objects in one transaction (bulk loads for benchmarks).
    pub async fn create_many(&self, kind: &str, objects: Vec<(String, String, Value)>) -> Result<(), StoreError> {
        let kind = kind.to_string();
        self.with(move |conn, _| {
            let tx = conn.transaction()?;
            let mut rev = meta(&tx, "revision")?;
            for (name, id, value) in objects {
                rev += 1;
                tx.execute(
                    "INSERT INTO objects (kind, name, id, rev, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![kind, name, id, rev as i64, value.to_string()],
                )?;
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", params![rev as i64])?;
            // History before this point is not replayable: watchers must list.
            forget_history(&tx, rev)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn meta(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    let v: i64 = conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?;
    Ok(v as u64)
}

/// Drops the events up to and including `up_to`; watches from before it
/// fail with [`StoreError::Compacted`].
fn forget_history(tx: &rusqlite::Transaction<'_>, up_to: u64) -> Result<(), StoreError> {
    tx.execute("DELETE FROM events WHERE rev <= ?1", params![up_to as i64])?;
    tx.execute(
        "UPDATE meta SET value = max(value, ?1) WHERE key = 'compacted'",
        params![up_to as i64],
    )?;
    Ok(())
}

/// Data dirs from before events kept the previous object gain the column;
/// their old events read as having no previous state.
fn add_prev_column(conn: &Connection) -> Result<(), StoreError> {
    let has_prev = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'prev'")?
        .exists([])?;
    if !has_prev {
        conn.execute_batch("ALTER TABLE events ADD COLUMN prev TEXT")?;
    }
    Ok(())
}

fn parse(kind: &str, data: &str) -> Result<Value, StoreError> {
    serde_json::from_str(data).map_err(|source| StoreError::Corrupt {
        kind: kind.to_string(),
        source,
    })
}

fn read_record(conn: &Connection, kind: &str, column: &str, key: &str) -> Result<Option<Record>, StoreError> {
    let sql = format!("SELECT name, id, rev, data FROM objects WHERE kind = ?1 AND {column} = ?2");
    let row = conn
        .query_row(&sql, params![kind, key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    row.map(|(name, id, rev, data)| {
        Ok(Record {
            kind: kind.to_string(),
            name,
            id,
            rev: rev as u64,
            value: parse(kind, &data)?,
        })
    })
    .transpose()
}

/// Records a change: bumps the revision, appends the event, prunes history,
/// commits, then broadcasts (still under the connection lock).
fn commit_change(
    conn: &mut Connection,
    events: &broadcast::Sender<Arc<Event>>,
    event_type: EventType,
    kind: &str,
    name: &str,
    prev: Option<Value>,
    write: impl FnOnce(&rusqlite::Transaction<'_>, u64) -> Result<Record, StoreError>,
) -> Result<Record, StoreError> {
    let tx = conn.transaction()?;
    let rev = meta(&tx, "revision")? + 1;
    let record = write(&tx, rev)?;
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", params![rev as i64])?;
    tx.execute(
        "INSERT INTO events (rev, kind, type, name, id, data, prev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            rev as i64,
            kind,
            event_type.as_str(),
            name,
            record.id,
            record.value.to_string(),
            prev.as_ref().map(Value::to_string)
        ],
    )?;
    if rev % 1000 == 0 && rev > EVENT_HISTORY {
        forget_history(&tx, rev - EVENT_HISTORY)?;
    }
    tx.commit()?;
    // No receivers is fine: nobody is watching.
    let _ = events.send(Arc::new(Event {
        event_type,
        record: record.clone(),
        prev,
    }));
    Ok(record)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create(&self, kind: &str, name: &str, id: &str, value: Value) -> Result<Record, StoreError> {
        let (kind, name, id) = (kind.to_string(), name.to_string(), id.to_string());
        self.with(move |conn, events| {
            if read_record(conn, &kind, "name", &name)?.is_some() {
                return Err(StoreError::AlreadyExists { kind, name });
            }
            commit_change(conn, events, EventType::Added, &kind, &name, None, |tx, rev| {
                tx.execute(
                    "INSERT INTO objects (kind, name, id, rev, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![kind, name, id, rev as i64, value.to_string()],
                )?;
                Ok(Record {
                    kind: kind.clone(),
                    name: name.clone(),
                    id: id.clone(),
                    rev,
                    value,
                })
            })
        })
        .await
    }

    async fn get(&self, kind: &str, name: &str) -> Result<Option<Record>, StoreError> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |conn, _| read_record(conn, &kind, "name", &name)).await
    }

    async fn get_by_id(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let (kind, id) = (kind.to_string(), id.to_string());
        self.with(move |conn, _| read_record(conn, &kind, "id", &id)).await
    }

    async fn update(&self, kind: &str, name: &str, expected_rev: u64, value: Value) -> Result<Record, StoreError> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |conn, events| {
            let Some(current) = read_record(conn, &kind, "name", &name)? else {
                return Err(StoreError::NotFound { kind, name });
            };
            if current.rev != expected_rev {
                return Err(StoreError::Conflict {
                    kind,
                    name,
                    expected: expected_rev,
                    actual: current.rev,
                });
            }
            let prev = Some(current.value.clone());
            commit_change(conn, events, EventType::Modified, &kind, &name, prev, |tx, rev| {
                tx.execute(
                    "UPDATE objects SET rev = ?1, data = ?2 WHERE kind = ?3 AND name = ?4",
                    params![rev as i64, value.to_string(), kind, name],
                )?;
                Ok(Record { rev, value, ..current })
            })
        })
        .await
    }

    async fn delete(&self, kind: &str, name: &str, expected_rev: Option<u64>) -> Result<Record, StoreError> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |conn, events| {
            let Some(current) = read_record(conn, &kind, "name", &name)? else {
                return Err(StoreError::NotFound { kind, name });
            };
            if let Some(expected) = expected_rev.filter(|e| *e != current.rev) {
                return Err(StoreError::Conflict {
                    kind,
                    name,
                    expected,
                    actual: current.rev,
                });
            }
            commit_change(conn, events, EventType::Deleted, &kind, &name, None, |tx, rev| {
                tx.execute("DELETE FROM objects WHERE kind = ?1 AND name = ?2", params![kind, name])?;
                Ok(Record { rev, ..current })
            })
        })
        .await
    }

    async fn list(
        &self,
        kind: &str,
        filter: Option<RecordFilter<'_>>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        // Filters are borrowed, so rows are read here in chunks rather than on the
        // blocking pool; each chunk is one short query under the lock.
        const CHUNK: usize = 512;
        let limit = limit.max(1);
        let mut items = Vec::new();
        let mut cursor = after.map(str::to_string);
        let mut revision = None;
        loop {
            let (rows, rev) = {
                let conn = self.inner.conn.lock();
                let rev = meta(&conn, "revision")?;
                let mut stmt = conn.prepare_cached(
                    "SELECT name, id, rev, data FROM objects WHERE kind = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
                )?;
                let rows = stmt
                    .query_map(params![kind, cursor.as_deref().unwrap_or(""), CHUNK as i64], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                (rows, rev)
            };
            revision.get_or_insert(rev);
            let exhausted = rows.len() < CHUNK;
            for (name, id, rev, data) in rows {
                cursor = Some(name.clone());
                let record = Record {
                    kind: kind.to_string(),
                    name,
                    id,
                    rev: rev as u64,
                    value: parse(kind, &data)?,
                };
                if filter.is_some_and(|f| !f(&record)) {
                    continue;
                }
                if items.len() == limit {
                    // One more match exists: the page ends at the previous item.
                    let more_after = items.last().map(|r: &Record| r.name.clone());
                    return Ok(ListPage {
                        items,
                        more_after,
                        revision: revision.unwrap_or_default(),
                    });
                }
                items.push(record);
            }
            if exhausted {
                return Ok(ListPage {
                    items,
                    more_after: None,
                    revision: revision.unwrap_or_default(),
                });
            }
        }
    }

    async fn watch(&self, kind: &str, from_rev: u64) -> Result<EventStream, StoreError> {
        let kind_owned = kind.to_string();
        let (backlog, receiver) = self
            .with(move |conn, events| {
                let oldest = meta(conn, "compacted")?;
                if from_rev < oldest {
                    return Err(StoreError::Compacted {
                        requested: from_rev,
                        oldest,
                    });
                }
                let receiver = events.subscribe();
                let mut stmt = conn.prepare_cached(
                    "SELECT rev, type, name, id, data, prev FROM events WHERE kind = ?1 AND rev > ?2 ORDER BY rev",
                )?;
                let rows = stmt
                    .query_map(params![kind_owned, from_rev as i64], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, Option<String>>(5)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let backlog = rows
                    .into_iter()
                    .map(|(rev, ty, name, id, data, prev)| {
                        Ok(Event {
                            prev: prev.map(|p| parse(&kind_owned, &p)).transpose()?,
                            event_type: EventType::parse(&ty),
                            record: Record {
                                kind: kind_owned.clone(),
                                name,
                                id,
                                rev: rev as u64,
                                value: parse(&kind_owned, &data)?,
                            },
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok((backlog, receiver))
            })
            .await?;
        let last_backlog = backlog.last().map_or(from_rev, |e| e.record.rev);
        let kind = kind.to_string();
        let live = BroadcastStream::new(receiver).filter_map(move |item| {
            let kind = kind.clone();
            async move {
                match item {
                    Ok(ev) if ev.record.kind == kind && ev.record.rev > last_backlog => Some(Ok((*ev).clone())),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(_)) => Some(Err(StoreError::WatchLagged)),
                }
            }
        });
        // Stop after the first error: a lagged watcher must re-list.
        let live = live.scan(false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            if matches!(out, Some(Err(_))) {
                *failed = true;
            }
            futures::future::ready(out)
        });
        Ok(Box::pin(futures::stream::iter(backlog.into_iter().map(Ok)).chain(live)))
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.with(|conn, _| meta(conn, "revision")).await
    }

    async fn compact(&self, up_to: u64) -> Result<(), StoreError> {
        self.with(move |conn, _| {
            let tx = conn.transaction()?;
            forget_history(&tx, up_to)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
