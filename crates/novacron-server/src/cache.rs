//! What the controllers know: objects of one kind, kept current by the
//! shared watcher (`novacron_client::watcher`) on the server's own store,
//! instead of listing the whole store on a timer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use novacron_api::{Object, WatchEvent, WatchEventType, WatchLine};
use novacron_client::watcher::{self, Listed, Source, Watched};
use novacron_store::{decode_record, EventType, SharedStore, StoreError, StoreExt};
use parking_lot::RwLock;
use tokio::sync::Notify;

/// Every object of `T` in the store, through list + watch.
pub struct StoreSource<T> {
    store: SharedStore,
    _kind: std::marker::PhantomData<fn() -> T>,
}

impl<T> StoreSource<T> {
    pub fn new(store: SharedStore) -> Self {
        StoreSource {
            store,
            _kind: std::marker::PhantomData,
        }
    }
}

impl<T: Object + Send + 'static> Source for StoreSource<T> {
    type Object = T;
    type Error = StoreError;

    fn list(&self) -> Listed<'_, T, StoreError> {
        self.store.list_all_at::<T>()
    }

    fn watch(&self, revision: u64) -> Watched<'_, T, StoreError> {
        Box::pin(async move {
            let events = self.store.watch(T::KIND, revision).await?;
            let events = events.map(|ev| {
                let ev = ev?;
                let event_type = match ev.event_type {
                    EventType::Added => WatchEventType::Added,
                    EventType::Modified => WatchEventType::Modified,
                    EventType::Deleted => WatchEventType::Deleted,
                };
                Ok(WatchLine::Event(WatchEvent {
                    event_type,
                    object: decode_record::<T>(ev.record)?,
                }))
            });
            Ok(events.boxed())
        })
    }

    fn is_gone(error: &StoreError) -> bool {
        matches!(error, StoreError::Compacted { .. } | StoreError::WatchLagged)
    }

    fn describe(&self) -> String {
        format!("store {}", T::KIND)
    }
}

/// Stores `o` unless the cache holds a newer version (an event can arrive
/// after this server wrote a newer one through).
fn keep_newer<T: Object>(objects: &mut BTreeMap<String, T>, o: T) {
    let name = o.meta().name.clone();
    if objects
        .get(&name)
        .is_none_or(|cur| cur.meta().resource_version <= o.meta().resource_version)
    {
        objects.insert(name, o);
    }
}

/// Objects of one kind by name, as the watcher last reported them; `changed`
/// fires after every update.
pub struct Cache<T> {
    objects: RwLock<BTreeMap<String, T>>,
    /// Whether the first list arrived.
    synced: AtomicBool,
    pub changed: Arc<Notify>,
}

impl<T: Object + Clone + Send + Sync + 'static> Cache<T> {
    /// A cache kept by a task watching the store; the task ends when the
    /// returned cache is dropped by everyone else.
    pub fn start(store: SharedStore, changed: Arc<Notify>) -> Arc<Cache<T>> {
        let cache = Arc::new(Cache {
            objects: RwLock::new(BTreeMap::new()),
            synced: AtomicBool::new(false),
            changed,
        });
        let weak = Arc::downgrade(&cache);
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(StoreSource::<T>::new(store)));
            while let Some(ev) = events.next().await {
                let Some(cache) = weak.upgrade() else {
                    return;
                };
                cache.apply(ev);
            }
        });
        cache
    }

    fn apply(&self, ev: watcher::Event<T>) {
        {
            let mut objects = self.objects.write();
            match ev {
                watcher::Event::Restarted(all) => {
                    *objects = all.into_iter().map(|o| (o.meta().name.clone(), o)).collect();
                    self.synced.store(true, Ordering::Release);
                }
                watcher::Event::Applied(o) => keep_newer(&mut objects, o),
                watcher::Event::Deleted(o) => {
                    objects.remove(&o.meta().name);
                }
            }
        }
        self.changed.notify_one();
    }

    /// Records an object this server just wrote, before its event arrives, so
    /// the next pass does not work from the version before the write.
    pub fn write_through(&self, o: T) {
        keep_newer(&mut self.objects.write(), o);
    }

    /// Clones of the objects that pass `keep`.
    pub fn select(&self, keep: impl Fn(&T) -> bool) -> Vec<T> {
        self.objects.read().values().filter(|o| keep(o)).cloned().collect()
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.objects.read().values().cloned().collect()
    }

    /// Runs `f` on the objects in place, without cloning them (readers wait
    /// for the watcher's next update meanwhile: keep `f` short).
    pub fn with<R>(&self, f: impl FnOnce(&BTreeMap<String, T>) -> R) -> R {
        f(&self.objects.read())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use novacron_api::{Metadata, Node, NodeSpec, NodeStatus};
    use novacron_store::{SqliteStore, StoreExt};

    use super::*;

    fn node(name: &str) -> Node {
        Node {
            metadata: Metadata::new(name, Default::default()),
            spec: NodeSpec {
                address: "http://127.0.0.1:9".into(),
                schedulable: true,
            },
            status: NodeStatus::default(),
        }
    }

    async fn until(cache: &Cache<Node>, what: &str, check: impl Fn(&[Node]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check(&cache.snapshot()) {
            assert!(tokio::time::Instant::now() < deadline, "cache never showed {what}");
            let _ = tokio::time::timeout(Duration::from_millis(100), cache.changed.notified()).await;
        }
    }

    #[tokio::test]
    async fn the_cache_follows_the_store() {
        let store: SharedStore = Arc::new(SqliteStore::in_memory().unwrap_or_else(|e| panic!("store: {e}")));
        store
            .create_obj(&node("a"))
            .await
            .unwrap_or_else(|e| panic!("create: {e}"));
        let cache = Cache::<Node>::start(store.clone(), Arc::new(Notify::new()));
        until(&cache, "the first list", |n| n.len() == 1).await;
        assert!(cache.synced());
        let b = store
            .create_obj(&node("b"))
            .await
            .unwrap_or_else(|e| panic!("create: {e}"));
        until(&cache, "b", |n| n.iter().any(|x| x.metadata.name == "b")).await;
        let mut cordoned = b.clone();
        cordoned.spec.schedulable = false;
        store
            .update_obj(&cordoned)
            .await
            .unwrap_or_else(|e| panic!("update: {e}"));
        until(&cache, "b cordoned", |n| {
            n.iter().any(|x| x.metadata.name == "b" && !x.spec.schedulable)
        })
        .await;
        store
            .delete_obj::<Node>("a", None)
            .await
            .unwrap_or_else(|e| panic!("delete: {e}"));
        until(&cache, "a gone", |n| n.len() == 1).await;
    }
}
