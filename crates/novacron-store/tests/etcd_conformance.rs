//! The conformance suite on a real etcd (Debian's `etcd`, started here).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use novacron_store::etcd_process::{connect_when_ready, EtcdCluster};
use novacron_store::{conformance, EtcdUrl, Store};

#[tokio::test]
async fn etcd_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = EtcdCluster::start(dir.path(), 1).expect("start etcd");
    let n = AtomicUsize::new(0);
    // Each check gets a store of its own under a fresh root on the one etcd.
    conformance::run_all(|| {
        let url: EtcdUrl = cluster
            .url(&format!("/conformance{}", n.fetch_add(1, Ordering::SeqCst)))
            .parse()
            .expect("url");
        async move {
            connect_when_ready(&url, Duration::from_secs(20))
                .await
                .expect("connect")
        }
    })
    .await;
}

#[tokio::test]
async fn etcd_survives_one_member_of_three() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = EtcdCluster::start(dir.path(), 3).expect("start etcd");
    let url: EtcdUrl = cluster.url("/quorum").parse().expect("url");
    let store = connect_when_ready(&url, Duration::from_secs(20))
        .await
        .expect("connect");
    let a = store
        .create("vm", "a", "id-a", serde_json::json!({"n": 1}))
        .await
        .expect("create");
    cluster.members[0].kill();
    // The client's other endpoints keep answering; give requests that were
    // on the dead member's connection a few tries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    let updated = loop {
        match store.update("vm", "a", a.rev, serde_json::json!({"n": 2})).await {
            Ok(rec) => break rec,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("update with two members of three: {e}"),
        }
    };
    // Reads never fail once the dead member has been noticed.
    for i in 0..100 {
        store
            .get("vm", "a")
            .await
            .unwrap_or_else(|e| panic!("read {i} with two members of three: {e}"));
    }
    let got = store.get("vm", "a").await.expect("get").expect("present");
    assert_eq!((got.rev, got.value), (updated.rev, serde_json::json!({"n": 2})));
}
