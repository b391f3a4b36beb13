use novacron_store::{conformance, SqliteStore, Store};

#[tokio::test]
async fn sqlite_in_memory_conforms() {
    conformance::run_all(|| async { SqliteStore::in_memory().expect("open") }).await;
}

#[tokio::test]
async fn sqlite_file_conforms_and_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join(format!("s{i}.db"));
        async move { SqliteStore::open(&path).expect("open") }
    })
    .await;

    let path = dir.path().join("persist.db");
    let rev = {
        let store = SqliteStore::open(&path).expect("open");
        store
            .create("vm", "keep", "id-keep", serde_json::json!({"a": 1}))
            .await
            .expect("create")
            .rev
    };
    let reopened = SqliteStore::open(&path).expect("reopen");
    let rec = reopened.get("vm", "keep").await.expect("get").expect("kept");
    assert_eq!(rec.rev, rev);
    assert_eq!(reopened.revision().await.expect("revision"), rev);
}
