// Test code shared by every backend's tests: failing loudly is the point.
#![allow(clippy::expect_used, clippy::unwrap_used)]

//! Behaviour every [`Store`] backend must have. Backends call [`run_all`] from
//! their tests with a factory for fresh, empty stores.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::{EventType, Store, StoreError};

async fn create_get_update_delete(store: &dyn Store) {
    let a = store.create("vm", "a", "id-a", json!({"x": 1})).await.expect("create");
    assert!(a.rev > 0);
    let got = store.get("vm", "a").await.expect("get").expect("present");
    assert_eq!(got, a);
    assert_eq!(
        store.get_by_id("vm", "id-a").await.expect("by id").map(|r| r.name),
        Some("a".into())
    );
    assert!(store.get("vm", "missing").await.expect("get").is_none());
    // Kinds are separate namespaces.
    assert!(store.get("node", "a").await.expect("get").is_none());

    let dup = store.create("vm", "a", "id-a2", json!({})).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists { .. })), "{dup:?}");

    let b = store.update("vm", "a", a.rev, json!({"x": 2})).await.expect("update");
    assert!(b.rev > a.rev);
    assert_eq!(b.value, json!({"x": 2}));

    // A writer holding the old revision loses, and nothing changes.
    let stale = store.update("vm", "a", a.rev, json!({"x": 3})).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    assert_eq!(
        store.get("vm", "a").await.expect("get").expect("present").value,
        json!({"x": 2})
    );

    let missing = store.update("vm", "nope", 1, json!({})).await;
    assert!(matches!(missing, Err(StoreError::NotFound { .. })), "{missing:?}");

    let stale_delete = store.delete("vm", "a", Some(a.rev)).await;
    assert!(matches!(stale_delete, Err(StoreError::Conflict { .. })));
    store.delete("vm", "a", Some(b.rev)).await.expect("delete");
    assert!(store.get("vm", "a").await.expect("get").is_none());
    assert!(matches!(
        store.delete("vm", "a", None).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn pagination_and_filter(store: &dyn Store) {
    for i in 0..25 {
        let name = format!("vm-{i:02}");
        store
            .create("vm", &name, &format!("id-{i}"), json!({"even": i % 2 == 0}))
            .await
            .expect("create");
    }
    store
        .create("node", "n1", "id-n1", json!({}))
        .await
        .expect("create node");

    let mut names = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.list("vm", None, after.as_deref(), 10).await.expect("list");
        pages += 1;
        assert!(page.items.len() <= 10);
        names.extend(page.items.iter().map(|r| r.name.clone()));
        match page.more_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("vm-{i:02}")).collect();
    assert_eq!(names, expected);

    let even = |r: &crate::Record| r.value["even"] == json!(true);
    let page = store.list("vm", Some(&even), None, 5).await.expect("list");
    assert_eq!(page.items.len(), 5);
    assert!(page.items.iter().all(even));
    let rest = store
        .list("vm", Some(&even), page.more_after.as_deref(), 100)
        .await
        .expect("list");
    assert_eq!(page.items.len() + rest.items.len(), 13);
    assert!(rest.more_after.is_none());
}

async fn watch_from_revision(store: &dyn Store) {
    let start = store.revision().await.expect("revision");
    let a = store
        .create("vm", "w1", "id-w1", json!({"v": 1}))
        .await
        .expect("create");
    store
        .create("node", "ignored", "id-ignored", json!({}))
        .await
        .expect("create");
    let mut watch = store.watch("vm", start).await.expect("watch");
    // Backlog: the create that happened before the watch began.
    let first = next(&mut watch).await;
    assert_eq!((first.event_type, first.record.name.as_str()), (EventType::Added, "w1"));
    // Live changes, in order, only for this kind.
    store.update("vm", "w1", a.rev, json!({"v": 2})).await.expect("update");
    store
        .create("node", "ignored2", "id-ignored2", json!({}))
        .await
        .expect("create");
    store.delete("vm", "w1", None).await.expect("delete");
    let second = next(&mut watch).await;
    assert_eq!(second.event_type, EventType::Modified);
    assert_eq!(second.record.value, json!({"v": 2}));
    assert_eq!(
        second.prev,
        Some(json!({"v": 1})),
        "a modification carries the object before it"
    );
    let third = next(&mut watch).await;
    assert_eq!(third.event_type, EventType::Deleted);
    assert!(third.record.rev > second.record.rev);

    // Replayed from history, a modification still carries what it replaced.
    let mut replay = store.watch("vm", start).await.expect("watch");
    let added = next(&mut replay).await;
    assert_eq!((added.event_type, added.prev), (EventType::Added, None));
    let modified = next(&mut replay).await;
    assert_eq!(modified.prev, Some(json!({"v": 1})));

    // Watching from the latest revision replays nothing.
    let now = store.revision().await.expect("revision");
    let mut quiet = store.watch("vm", now).await.expect("watch");
    let nothing = tokio::time::timeout(Duration::from_millis(200), quiet.next()).await;
    assert!(nothing.is_err(), "unexpected event: {nothing:?}");
}

async fn next(watch: &mut crate::EventStream) -> crate::Event {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("event within 5s")
        .expect("stream open")
        .expect("no error")
}

async fn concurrent_writers_serialise(store: &dyn Store) {
    let rec = store.create("vm", "c", "id-c", json!({"n": 0})).await.expect("create");
    // Two writers read the same revision; exactly one wins.
    let (r1, r2) = tokio::join!(
        store.update("vm", "c", rec.rev, json!({"n": 1})),
        store.update("vm", "c", rec.rev, json!({"n": 2}))
    );
    assert_eq!([r1.is_ok(), r2.is_ok()].iter().filter(|ok| **ok).count(), 1);
}

async fn compacted_history_is_gone(store: &dyn Store) {
    let start = store.revision().await.expect("revision");
    let mut revs = Vec::new();
    for i in 0..3 {
        let rec = store
            .create("vm", &format!("h{i}"), &format!("id-h{i}"), json!({}))
            .await
            .expect("create");
        revs.push(rec.rev);
    }
    store.compact(revs[1]).await.expect("compact");
    // Compacting again to an older point changes nothing and is not an error.
    store.compact(revs[0]).await.expect("compact again");
    for from in [start, revs[0]] {
        match store.watch("vm", from).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!(requested, from);
                assert_eq!(oldest, revs[1], "the oldest revision a watch can start from");
            }
            other => panic!("watch from compacted revision {from}: {:?}", other.map(|_| ())),
        }
    }
    // From the compaction point on, history is still there.
    let mut watch = store.watch("vm", revs[1]).await.expect("watch");
    let ev = next(&mut watch).await;
    assert_eq!((ev.record.name.as_str(), ev.record.rev), ("h2", revs[2]));
    // Objects are untouched by compaction.
    let page = store.list("vm", None, None, 10).await.expect("list");
    assert_eq!(page.items.len(), 3);
}

/// Runs every conformance check, each on a fresh store from `factory`.
pub async fn run_all<F, Fut, S>(factory: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
    S: Store,
{
    create_get_update_delete(&factory().await).await;
    pagination_and_filter(&factory().await).await;
    watch_from_revision(&factory().await).await;
    concurrent_writers_serialise(&factory().await).await;
    compacted_history_is_gone(&factory().await).await;
}
