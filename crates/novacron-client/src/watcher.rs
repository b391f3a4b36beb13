//! The watcher every loop learns its work from (kube-runtime's `watcher` is
//! the model): list, then watch from the list's revision; resume a broken
//! watch from the last revision seen; list again when the server no longer
//! has that revision (410); reconnect with exponential backoff and jitter.
//! The stream never ends: errors are logged and retried, so a loop built on
//! it survives server restarts and outages.

use std::time::Duration;

use backon::BackoffBuilder;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use novacron_api::error::chain;
use novacron_api::{Object, WatchEventType, WatchLine};

use crate::{Client, ClientError, Resource, Selector};

/// What a watcher tells its loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    /// A full list: everything that matches now. Sent first, and again after
    /// every re-list (objects missing from it are gone).
    Restarted(Vec<T>),
    /// An object was added or changed (or started to match).
    Applied(T),
    /// An object was deleted (or stopped matching); its last state.
    Deleted(T),
}

/// Every matching object, and the revision the list was read at.
pub type Listed<'a, T, E> = BoxFuture<'a, Result<(Vec<T>, u64), E>>;
/// A watch stream, once opened.
pub type Watched<'a, T, E> = BoxFuture<'a, Result<BoxStream<'static, Result<WatchLine<T>, E>>, E>>;

/// Where a watcher lists and watches: the API over HTTP ([`ApiSource`]), or
/// the server's own store.
pub trait Source: Send + Sync + 'static {
    type Object: Object + Send + 'static;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Every matching object, and the revision the list was read at.
    fn list(&self) -> Listed<'_, Self::Object, Self::Error>;
    /// Changes after `revision`.
    fn watch(&self, revision: u64) -> Watched<'_, Self::Object, Self::Error>;
    /// Whether `revision` is older than the history the source keeps.
    fn is_gone(error: &Self::Error) -> bool;
    /// Names the watch in logs.
    fn describe(&self) -> String;
}

/// Objects of `T` matching a selector, through the API.
pub struct ApiSource<T> {
    client: Client,
    selector: Selector,
    _kind: std::marker::PhantomData<fn() -> T>,
}

impl<T> ApiSource<T> {
    pub fn new(client: Client, selector: Selector) -> Self {
        ApiSource {
            client,
            selector,
            _kind: std::marker::PhantomData,
        }
    }
}

impl<T: Resource + Send + 'static> Source for ApiSource<T> {
    type Object = T;
    type Error = ClientError;

    fn list(&self) -> Listed<'_, T, ClientError> {
        Box::pin(self.client.list_all::<T>(&self.selector))
    }

    fn watch(
        &self,
        revision: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<WatchLine<T>, ClientError>>, ClientError>> {
        Box::pin(async move { self.client.watch_lines::<T>(revision, &self.selector).await })
    }

    fn is_gone(error: &ClientError) -> bool {
        error.status() == Some(410)
    }

    fn describe(&self) -> String {
        let mut what = T::PATH.to_string();
        for s in [&self.selector.label, &self.selector.field].into_iter().flatten() {
            what.push(' ');
            what.push_str(s);
        }
        what
    }
}

/// Watches objects of `T` matching `selector` through the API.
pub fn watch<T: Resource + Send + 'static>(client: Client, selector: Selector) -> impl Stream<Item = Event<T>> + Send {
    watcher(ApiSource::new(client, selector))
}

/// The state of the object named `name` each time it changes (`None` while
/// it does not exist), for waits on one object's progress.
pub fn watch_object<T: Resource + Send + 'static>(client: Client, name: &str) -> impl Stream<Item = Option<T>> + Send {
    let wanted = name.to_string();
    watch::<T>(client, Selector::fields(format!("metadata.name={name}"))).map(move |ev| match ev {
        Event::Restarted(list) => list.into_iter().find(|o| o.meta().name == wanted),
        Event::Applied(o) => Some(o),
        Event::Deleted(_) => None,
    })
}

/// How long to wait after the n-th failure in a row: 100 ms doubling to 5 s,
/// each with up to as much again of random jitter, so agents that lost the
/// server together do not all come back in the same instant.
fn backoff() -> impl Iterator<Item = Duration> + Send {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

enum State<S: Source> {
    /// Must list (first time, or the revision is gone).
    Empty,
    /// Listed or watched up to `revision`; must (re)open the watch.
    Resume { revision: u64 },
    Watching {
        revision: u64,
        stream: BoxStream<'static, Result<WatchLine<S::Object>, S::Error>>,
    },
}

struct Watcher<S: Source> {
    source: S,
    state: State<S>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl<S: Source> Watcher<S> {
    async fn pause(&mut self) {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(5));
        tokio::time::sleep(delay).await;
    }

    /// Runs until there is something to tell the loop.
    async fn next_event(&mut self) -> Event<S::Object> {
        loop {
            match std::mem::replace(&mut self.state, State::Empty) {
                State::Empty => match self.source.list().await {
                    Ok((items, revision)) => {
                        self.state = State::Resume { revision };
                        return Event::Restarted(items);
                    }
                    Err(e) => {
                        tracing::warn!(watch = %self.source.describe(), error = %chain(&e), "cannot list; retrying");
                        self.pause().await;
                    }
                },
                State::Resume { revision } => match self.source.watch(revision).await {
                    Ok(stream) => self.state = State::Watching { revision, stream },
                    Err(e) if S::is_gone(&e) => {
                        tracing::debug!(watch = %self.source.describe(), revision, "revision gone; listing again");
                    }
                    Err(e) => {
                        tracing::warn!(watch = %self.source.describe(), error = %chain(&e), "cannot watch; retrying");
                        self.state = State::Resume { revision };
                        self.pause().await;
                    }
                },
                State::Watching { revision, mut stream } => match stream.next().await {
                    Some(Ok(WatchLine::Bookmark(b))) => {
                        self.delays = Box::new(backoff());
                        let revision = revision.max(b.resource_version);
                        self.state = State::Watching { revision, stream };
                    }
                    Some(Ok(WatchLine::Event(ev))) => {
                        self.delays = Box::new(backoff());
                        let revision = revision.max(ev.object.meta().resource_version);
                        self.state = State::Watching { revision, stream };
                        return match ev.event_type {
                            WatchEventType::Deleted => Event::Deleted(ev.object),
                            WatchEventType::Added | WatchEventType::Modified => Event::Applied(ev.object),
                        };
                    }
                    Some(Err(e)) if S::is_gone(&e) => {}
                    Some(Err(e)) => {
                        tracing::debug!(watch = %self.source.describe(), error = %chain(&e), "watch broke; resuming");
                        self.state = State::Resume { revision };
                        self.pause().await;
                    }
                    None => {
                        // The server ended the stream (restart, lag): resume.
                        self.state = State::Resume { revision };
                        self.pause().await;
                    }
                },
            }
        }
    }
}

/// The watcher on any [`Source`].
pub fn watcher<S: Source>(source: S) -> impl Stream<Item = Event<S::Object>> + Send {
    let watcher = Watcher {
        source,
        state: State::Empty,
        delays: Box::new(backoff()),
    };
    futures::stream::unfold(watcher, |mut w| async move {
        let ev = w.next_event().await;
        Some((ev, w))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use novacron_api::Migration;
    use parking_lot::Mutex;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum FakeError {
        #[error("gone")]
        Gone,
        #[error("down")]
        Down,
    }

    type Script = VecDeque<Result<Vec<Result<WatchLine<Migration>, FakeError>>, FakeError>>;
    type Lists = VecDeque<Result<(Vec<Migration>, u64), FakeError>>;

    /// A source that plays back scripted lists and watches, and records calls.
    #[derive(Clone, Default)]
    struct Fake {
        lists: Arc<Mutex<Lists>>,
        watches: Arc<Mutex<Script>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Source for Fake {
        type Object = Migration;
        type Error = FakeError;
        fn list(&self) -> Listed<'_, Migration, FakeError> {
            self.calls.lock().push("list".into());
            let next = self.lists.lock().pop_front();
            Box::pin(async move { next.unwrap_or(Err(FakeError::Down)) })
        }
        fn watch(&self, revision: u64) -> Watched<'_, Migration, FakeError> {
            self.calls.lock().push(format!("watch {revision}"));
            let next = self.watches.lock().pop_front();
            Box::pin(async move {
                match next {
                    Some(Ok(events)) => Ok(futures::stream::iter(events).boxed()),
                    Some(Err(e)) => Err(e),
                    None => Ok(futures::stream::pending().boxed()),
                }
            })
        }
        fn is_gone(e: &FakeError) -> bool {
            matches!(e, FakeError::Gone)
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn migration(name: &str, rev: u64) -> Migration {
        let at = "2026-01-01T00:00:00Z";
        let value = serde_json::json!({
            "metadata": {"id": name, "name": name, "project": "default", "labels": {},
                "created_at": at, "updated_at": at, "resource_version": rev, "generation": 1},
            "spec": {"vm": "vm-1"}
        });
        match serde_json::from_value(value) {
            Ok(m) => m,
            Err(e) => panic!("test migration: {e}"),
        }
    }

    fn ev(t: WatchEventType, name: &str, rev: u64) -> Result<WatchLine<Migration>, FakeError> {
        Ok(WatchLine::Event(novacron_api::WatchEvent {
            event_type: t,
            object: migration(name, rev),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn lists_then_watches_resumes_from_the_last_revision_or_bookmark_and_relists_when_it_is_gone() {
        let fake = Fake::default();
        {
            let mut lists = fake.lists.lock();
            lists.push_back(Err(FakeError::Down));
            lists.push_back(Ok((vec![migration("a", 3)], 5)));
            lists.push_back(Ok((vec![migration("b", 9)], 10)));
            let mut watches = fake.watches.lock();
            // Two events, a bookmark, then the connection breaks.
            watches.push_back(Ok(vec![
                ev(WatchEventType::Added, "b", 6),
                ev(WatchEventType::Deleted, "a", 7),
                Ok(WatchLine::Bookmark(novacron_api::WatchBookmark {
                    kind: novacron_api::BookmarkType::Bookmark,
                    resource_version: 8,
                })),
                Err(FakeError::Down),
            ]));
            // Resuming from the bookmark's 8 finds it compacted: list again.
            watches.push_back(Err(FakeError::Gone));
        }
        let mut w = Box::pin(watcher(fake.clone()));
        assert_eq!(w.next().await, Some(Event::Restarted(vec![migration("a", 3)])));
        assert_eq!(w.next().await, Some(Event::Applied(migration("b", 6))));
        assert_eq!(w.next().await, Some(Event::Deleted(migration("a", 7))));
        assert_eq!(w.next().await, Some(Event::Restarted(vec![migration("b", 9)])));
        let calls = fake.calls.lock().clone();
        assert_eq!(calls, ["list", "list", "watch 5", "watch 8", "list"]);
    }

    #[test]
    fn backoff_grows_to_five_seconds_with_jitter() {
        let delays: Vec<Duration> = backoff().take(12).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays[11] >= Duration::from_secs(5));
    }
}
