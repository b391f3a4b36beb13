//! One store watch per kind, shared by every API watch of that kind on this
//! server (as kube-apiserver's watch cache): a thousand agents watching
//! their VMs cost the store one watch, not a thousand. On etcd each watch
//! is a stream etcd feeds with every change of the kind; on SQLite each is
//! a receiver of every change of every kind.
//!
//! A kind's feed starts [`REPLAY`] revisions before the store's revision
//! when first asked for, and keeps the last [`RECENT`] events, so a watch
//! from a revision the feed has covered starts from memory; an older
//! revision goes to the store itself (which answers 410 for compacted
//! history). A subscriber that falls more
//! than [`FANOUT`] events behind ends with `WatchLagged` (410: list again),
//! as a store watch would.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use novacron_store::{Event, SharedStore, StoreError};
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

/// Events of a kind kept for watches that start a little in the past.
const RECENT: usize = 10_000;
/// A feed starts this many revisions back (when the store still has them),
/// so the watches a failed server's clients make again from their last
/// revision or bookmark share it instead of each replaying from the store.
const REPLAY: u64 = 5_000;
/// How far a subscriber may fall behind before it must list again.
const FANOUT: usize = 16384;

pub type SharedEvents = futures::stream::BoxStream<'static, Result<Arc<Event>, StoreError>>;

pub struct WatchHub {
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    /// Events a subscriber may fall behind ([`FANOUT`]).
    fanout: usize,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub {
            feeds: Default::default(),
            fanout: FANOUT,
        }
    }
}

struct Feed {
    state: Mutex<FeedState>,
}

struct FeedState {
    /// Every event after this revision is in `recent` or still to come.
    complete_after: u64,
    recent: VecDeque<Arc<Event>>,
    /// None once the store watch behind the feed ended: that closes every
    /// subscriber (their clients watch again), and new watches need a new feed.
    sender: Option<broadcast::Sender<Arc<Event>>>,
}

impl Feed {
    fn running(&self) -> bool {
        self.state.lock().sender.is_some()
    }
}

impl WatchHub {
    /// Changes of `kind` after revision `from`.
    pub async fn watch(
        self: &Arc<Self>,
        store: &SharedStore,
        kind: &str,
        from: u64,
    ) -> Result<SharedEvents, StoreError> {
        let feed = self.feed(store, kind).await?;
        let subscribed = {
            let state = feed.state.lock();
            let sender = state.sender.as_ref().filter(|_| from >= state.complete_after);
            sender.map(|sender| {
                let backlog: Vec<Result<Arc<Event>, StoreError>> = state
                    .recent
                    .iter()
                    .filter(|e| e.record.rev > from)
                    .cloned()
                    .map(Ok)
                    .collect();
                // Subscribed under the lock the feed sends under: no event
                // is both in the backlog and received, or in neither.
                (backlog, sender.subscribe())
            })
        };
        match subscribed {
            Some((backlog, receiver)) => {
                // A feed still replaying its start sends events this watch
                // already has.
                let live = BroadcastStream::new(receiver)
                    .map(|r| r.map_err(|BroadcastStreamRecvError::Lagged(_)| StoreError::WatchLagged))
                    .filter(move |r| futures::future::ready(r.as_ref().map_or(true, |e| e.record.rev > from)));
                // The stream ends when the feed does; the client watches again.
                Ok(futures::stream::iter(backlog).chain(live).boxed())
            }
            None => Ok(store.watch(kind, from).await?.map(|r| r.map(Arc::new)).boxed()),
        }
    }

    /// The running feed of `kind`, started if there is none.
    async fn feed(self: &Arc<Self>, store: &SharedStore, kind: &str) -> Result<Arc<Feed>, StoreError> {
        if let Some(feed) = self.feeds.lock().get(kind).filter(|f| f.running()) {
            return Ok(feed.clone());
        }
        let now = store.revision().await?;
        let (from, events) = match store.watch(kind, now.saturating_sub(REPLAY)).await {
            Ok(events) => (now.saturating_sub(REPLAY), events),
            Err(StoreError::Compacted { .. }) => (now, store.watch(kind, now).await?),
            Err(e) => return Err(e),
        };
        let mut feeds = self.feeds.lock();
        // Another watch may have started one meanwhile.
        if let Some(feed) = feeds.get(kind).filter(|f| f.running()) {
            return Ok(feed.clone());
        }
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                complete_after: from,
                recent: VecDeque::new(),
                sender: Some(broadcast::channel(self.fanout).0),
            }),
        });
        feeds.insert(kind.to_string(), feed.clone());
        tokio::spawn(run_feed(feed.clone(), events, kind.to_string()));
        Ok(feed)
    }
}

/// Moves the store's events of one kind to the feed's subscribers.
async fn run_feed(feed: Arc<Feed>, mut events: novacron_store::EventStream, kind: String) {
    while let Some(next) = events.next().await {
        let event = match next {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::warn!(kind = %kind, error = %e, "shared store watch ended; watches start again");
                break;
            }
        };
        let mut state = feed.state.lock();
        if state.recent.len() == RECENT {
            if let Some(oldest) = state.recent.pop_front() {
                state.complete_after = oldest.record.rev;
            }
        }
        state.recent.push_back(event.clone());
        if let Some(sender) = &state.sender {
            // No subscriber is not an error: the feed keeps its recent events.
            let _ = sender.send(event);
        }
    }
    feed.state.lock().sender = None;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

    use std::time::Duration;

    use novacron_store::SqliteStore;
    use serde_json::json;

    use super::*;

    async fn next_names(events: &mut SharedEvents, n: usize) -> Vec<String> {
        let mut names = Vec::new();
        while names.len() < n {
            let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("an event in time")
                .expect("the stream goes on")
                .expect("no error");
            names.push(ev.record.name.clone());
        }
        names
    }

    #[tokio::test]
    async fn watches_share_one_feed_and_start_from_where_they_ask() {
        let store: SharedStore = Arc::new(SqliteStore::in_memory().unwrap());
        let hub = Arc::new(WatchHub::default());
        let create = |name: &'static str| {
            let store = store.clone();
            async move { store.create("vm", name, name, json!({})).await.unwrap().rev }
        };
        let before_feed = create("a").await;
        let mut first = hub.watch(&store, "vm", store.revision().await.unwrap()).await.unwrap();
        let b = create("b").await;
        create("c").await;
        assert_eq!(next_names(&mut first, 2).await, ["b", "c"]);

        // From a revision the feed covers: its recent events, then live ones,
        // each once, from the same feed.
        let mut second = hub.watch(&store, "vm", b).await.unwrap();
        create("d").await;
        assert_eq!(next_names(&mut second, 2).await, ["c", "d"]);
        assert_eq!(next_names(&mut first, 1).await, ["d"]);
        assert_eq!(hub.feeds.lock().len(), 1);

        // From before "a": the feed started that far back.
        let mut third = hub.watch(&store, "vm", before_feed - 1).await.unwrap();
        assert_eq!(next_names(&mut third, 4).await, ["a", "b", "c", "d"]);
        assert_eq!(hub.feeds.lock().len(), 1);
    }

    #[tokio::test]
    async fn a_watch_from_before_the_feed_goes_to_the_store() {
        let store: SharedStore = Arc::new(SqliteStore::in_memory().unwrap());
        let old = store.create("vm", "old", "old", json!({})).await.unwrap().rev;
        for i in 0..REPLAY + 10 {
            let name = format!("node-{i}");
            store.create("node", &name, &name, json!({})).await.unwrap();
        }
        let hub = Arc::new(WatchHub::default());
        let mut recent = hub.watch(&store, "vm", store.revision().await.unwrap()).await.unwrap();
        let mut from_old = hub.watch(&store, "vm", old - 1).await.unwrap();
        store.create("vm", "new", "new", json!({})).await.unwrap();
        assert_eq!(next_names(&mut from_old, 2).await, ["old", "new"]);
        assert_eq!(next_names(&mut recent, 1).await, ["new"]);
    }

    #[tokio::test]
    async fn a_subscriber_too_far_behind_must_list_again() {
        let store: SharedStore = Arc::new(SqliteStore::in_memory().unwrap());
        let hub = Arc::new(WatchHub {
            feeds: Default::default(),
            fanout: 8,
        });
        let mut slow = hub.watch(&store, "vm", store.revision().await.unwrap()).await.unwrap();
        for i in 0..20 {
            store
                .create("vm", &format!("vm-{i}"), &format!("id-{i}"), json!({}))
                .await
                .unwrap();
        }
        let lagged = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(ev) = slow.next().await {
                if let Err(e) = ev {
                    return e;
                }
            }
            panic!("the stream ended without an error");
        })
        .await
        .expect("lag noticed in time");
        assert!(matches!(lagged, StoreError::WatchLagged), "{lagged:?}");
    }
}
