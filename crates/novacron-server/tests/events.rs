//! Events and webhooks, in process: events read off VM, node and migration
//! changes and API refusals, listed, selected and watched per project; and
//! deliveries to a real local HTTP receiver that checks their signatures,
//! fails on purpose, hangs, or is dead.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use novacron_api::{Node, Vm, VmPhase};
use novacron_store::StoreExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "a-long-enough-webhook-secret";

/// Starts the loops that turn store changes into events (the harness runs no controllers).
fn follow_changes(h: &Harness) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    novacron_server::events::spawn(h.state.events.clone(), h.state.store.clone(), &mut set);
    set
}

/// Polls the event list (as `token`, with `query`) until `done` holds.
async fn events_until(h: &Harness, token: &str, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = h
            .call(Method::GET, &format!("/v1/events?{query}"), Some(token), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let items = v["items"].as_array().unwrap().clone();
        if done(&items) {
            return items;
        }
        assert!(Instant::now() < deadline, "events never arrived; last list: {items:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn topics(items: &[Value]) -> Vec<String> {
    items.iter().map(|e| e["topic"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn changes_and_refusals_become_events_seen_per_project() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let _loops = follow_changes(&h);
    // Give the loops their starting revision before anything changes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let viewer_alpha = &tokens[3];
    let viewer_beta = h.token("viewer-beta", "viewer", Some("beta")).await;

    // A watch opened now sees what follows.
    let watch = h
        .raw(
            Method::GET,
            "/v1/events?watch=true&field_selector=involved.name=vm-alpha",
            Some(viewer_alpha),
            Body::empty(),
        )
        .await;
    assert_eq!(watch.status(), StatusCode::OK);

    // The agent reports the VM failed, then the scheduler-side path: phases with reasons.
    h.state
        .store
        .modify::<Vm, _>("vm-alpha", |v| {
            v.status.phase = VmPhase::Failed;
            v.status.reason = Some("QEMU exited with status 1".into());
            true
        })
        .await
        .unwrap();
    let selector = "field_selector=involved.kind=vm,involved.name=vm-alpha";
    let items = events_until(&h, &h.admin, selector, |i| topics(i).contains(&"vm.failed".to_string())).await;
    let failed = items.iter().find(|e| e["topic"] == "vm.failed").unwrap();
    assert_eq!(failed["type"], "Warning");
    assert_eq!(failed["reason"], "QEMU exited with status 1");
    assert_eq!(failed["node"], "node-1");
    assert_eq!(failed["metadata"]["project"], "alpha");
    assert!(items.iter().all(|e| e["involved"]["name"] == "vm-alpha"), "{items:#?}");

    // The watch delivered it as it happened.
    let mut body = watch.into_body();
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            buf.extend_from_slice(&frame.into_data().unwrap());
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                return serde_json::from_slice::<Value>(&buf[..end]).unwrap();
            }
        }
    })
    .await
    .expect("the watch sent nothing");
    assert_eq!(line["type"], "Added");
    assert_eq!(line["object"]["topic"], "vm.failed");

    // A node that stops heartbeating: a cluster event, not in any project.
    h.state
        .store
        .modify::<Node, _>("node-1", |n| {
            n.status.ready = false;
            n.status.ready_reason = Some("no heartbeat for 15s".into());
            true
        })
        .await
        .unwrap();
    let items = events_until(&h, &h.admin, "field_selector=topic=node.not_ready", |i| !i.is_empty()).await;
    assert_eq!(items[0]["message"], "Node is NotReady: no heartbeat for 15s");

    // A create refused over quota is an event of the project.
    h.admin(Method::PUT, "/v1/projects/alpha", json!({"quota": {"vms": 1}}))
        .await;
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/vms",
            Some(&tokens[2]),
            Some(json!({"name": "one-too-many", "spec": {"image": "img-alpha", "vcpus": 1, "memory_mib": 128}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let items = events_until(&h, viewer_alpha, "field_selector=topic=project.quota_exceeded", |i| {
        !i.is_empty()
    })
    .await;
    assert_eq!(items[0]["involved"], json!({"kind": "project", "name": "alpha"}));
    assert!(
        items[0]["message"].as_str().unwrap().contains("quota vms"),
        "{}",
        items[0]
    );

    // Each project sees its own events only; node events only whoever sees every project.
    let (_, alpha) = h
        .call(Method::GET, "/v1/events?limit=1000", Some(viewer_alpha), None)
        .await;
    let alpha = alpha["items"].as_array().unwrap().clone();
    assert!(alpha.iter().all(|e| e["metadata"]["project"] == "alpha"), "{alpha:#?}");
    assert!(topics(&alpha).contains(&"vm.failed".to_string()));
    let (_, beta) = h
        .call(Method::GET, "/v1/events?limit=1000", Some(&viewer_beta), None)
        .await;
    let beta = beta["items"].as_array().unwrap().clone();
    assert!(beta.iter().all(|e| e["metadata"]["project"] == "beta"), "{beta:#?}");
    let (_, name) = (
        0,
        alpha.iter().find(|e| e["topic"] == "vm.failed").unwrap()["metadata"]["name"].clone(),
    );
    let (status, _) = h
        .call(
            Method::GET,
            &format!("/v1/events/{}", name.as_str().unwrap()),
            Some(&viewer_beta),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another project's event");

    // Lists come oldest first (names sort by time), and pruning keeps the newest.
    let (_, all) = h.call(Method::GET, "/v1/events?limit=1000", Some(&h.admin), None).await;
    let names: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let pruned = novacron_server::events::prune(&h.state.store, 2, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(pruned, names.len() - 2);
    let (_, left) = h.call(Method::GET, "/v1/events", Some(&h.admin), None).await;
    let left: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(left, names[names.len() - 2..]);
}

/// What the receiver was sent, and how it answers each path.
#[derive(Default)]
struct Received {
    /// (path, topic header, body) of every request with a valid signature.
    valid: Vec<(String, String, Value)>,
    /// Requests whose signature did not check out.
    forged: usize,
    /// Requests to `/flaky` so far (the first is answered 500).
    flaky_calls: usize,
}

fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let (Some(ts), Some(sig)) = (headers.get("x-novacron-timestamp"), headers.get("x-novacron-signature")) else {
        return false;
    };
    let ts = ts.to_str().unwrap();
    // Fresh: within five minutes of now.
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    age.abs() < 300 && sig.to_str().unwrap() == want
}

async fn receiver() -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = axum::Router::new()
        .route(
            "/{path}",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Arc<Mutex<Received>>>,
                 axum::extract::Path(path): axum::extract::Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    if path == "slow" {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let mut r = r.lock();
                    if !signature_ok(&headers, &body) {
                        r.forged += 1;
                        return StatusCode::UNAUTHORIZED;
                    }
                    let topic = headers["x-novacron-event"].to_str().unwrap().to_string();
                    r.valid
                        .push((path.clone(), topic, serde_json::from_slice(&body).unwrap()));
                    match path.as_str() {
                        "flaky" => {
                            r.flaky_calls += 1;
                            if r.flaky_calls == 1 {
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::NO_CONTENT
                            }
                        }
                        "dead" => StatusCode::INTERNAL_SERVER_ERROR,
                        _ => StatusCode::OK,
                    }
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

async fn deliveries_until(h: &Harness, hook: &str, done: impl Fn(&[Value]) -> bool, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let (status, v) = h
            .call(Method::GET, &format!("/v1/webhooks/{hook}"), Some(&h.admin), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v["spec"].get("secret").is_none(), "the secret is never shown: {v}");
        let d = v["status"]["deliveries"].as_array().unwrap().clone();
        if done(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "webhook {hook}: deliveries never got there: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_given_up_without_slowing_the_api() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let _loops = follow_changes(&h);
    let (url, received) = receiver().await;
    let create = |name: &str, path: &str, events: Value, retry_for_s: u64| json!({"name": name, "url": format!("{url}/{path}"), "events": events, "secret": SECRET, "retry_for_s": retry_for_s});
    h.admin(
        Method::POST,
        "/v1/webhooks",
        create("flaky", "flaky", json!(["vm.*"]), 60),
    )
    .await;
    h.admin(
        Method::POST,
        "/v1/webhooks",
        create("dead", "dead", json!(["vm.failed"]), 3),
    )
    .await;
    h.admin(Method::POST, "/v1/webhooks", create("slow", "slow", json!(["*"]), 600))
        .await;
    h.admin(
        Method::POST,
        "/v1/webhooks",
        create("migrations", "other", json!(["migration.failed"]), 60),
    )
    .await;
    // Bad input changes nothing.
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&h.admin),
            Some(create("bad", "x", json!(["vm"]), 60)),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "events");
    let (status, _) = h.call(Method::GET, "/v1/webhooks/bad", Some(&h.admin), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(200)).await;

    h.state
        .store
        .modify::<Vm, _>("vm-alpha", |v| {
            v.status.phase = VmPhase::Failed;
            v.status.reason = Some("QEMU exited with status 1".into());
            true
        })
        .await
        .unwrap();

    // The flaky receiver answered 500 once, then took it.
    let d = deliveries_until(
        &h,
        "flaky",
        |d| d.iter().any(|x| x["state"] == "delivered"),
        Duration::from_secs(15),
    )
    .await;
    let ok = d.iter().find(|x| x["state"] == "delivered").unwrap();
    assert_eq!(ok["topic"], "vm.failed");
    assert_eq!(ok["attempts"], 2, "{ok}");
    assert_eq!(ok["last_status"], 204);

    // The dead one is given up after its 3 s, having been retried.
    let started = Instant::now();
    let d = deliveries_until(
        &h,
        "dead",
        |d| d.iter().any(|x| x["state"] == "failed"),
        Duration::from_secs(15),
    )
    .await;
    let gave_up = d.iter().find(|x| x["state"] == "failed").unwrap();
    let attempts = gave_up["attempts"].as_u64().unwrap();
    assert!((2..=4).contains(&attempts), "{gave_up}");
    assert_eq!(gave_up["last_status"], 500);
    assert!(started.elapsed() < Duration::from_secs(8), "given up late");

    {
        let r = received.lock();
        assert_eq!(r.forged, 0, "a delivery's signature did not check out");
        let to = |p: &str| r.valid.iter().filter(|(path, _, _)| path == p).collect::<Vec<_>>();
        assert_eq!(to("dead").len() as u64, attempts, "each attempt is a request");
        assert!(to("other").is_empty(), "a webhook got an event it did not subscribe to");
        let (_, topic, body) = to("flaky")[0];
        assert_eq!(topic, "vm.failed");
        assert_eq!(body["webhook"], "flaky");
        assert_eq!(body["event"]["involved"]["name"], "vm-alpha");
        assert_eq!(body["event"]["reason"], "QEMU exited with status 1");
        // Both attempts carry the same delivery id.
        let flaky = to("flaky");
        assert_eq!(flaky[0].2["delivery"], flaky[1].2["delivery"]);
    }

    // The slow receiver holds its deliveries, never the API: requests that
    // make events answer at once.
    let d = deliveries_until(&h, "slow", |d| !d.is_empty(), Duration::from_secs(5)).await;
    assert_eq!(d[0]["state"], "pending");
    for i in 0..5 {
        let t = Instant::now();
        let (status, v) = h
            .call(
                Method::POST,
                "/v1/vms",
                Some(&tokens[2]),
                Some(json!({"name": format!("quick-{i}"), "spec": {"image": "img-alpha", "vcpus": 1, "memory_mib": 128}})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert!(t.elapsed() < Duration::from_secs(1), "a create took {:?}", t.elapsed());
    }
    let d = deliveries_until(&h, "slow", |d| d.len() >= 6, Duration::from_secs(10)).await;
    assert!(d.iter().all(|x| x["state"] == "pending"), "{d:#?}");

    // A deleted webhook gets nothing more; its deliveries stop.
    let (status, _) = h.call(Method::DELETE, "/v1/webhooks/slow", Some(&h.admin), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn deliveries_a_stopped_server_left_pending_are_recorded_failed() {
    let h = Harness::new().await;
    h.admin(
        Method::POST,
        "/v1/webhooks",
        json!({"name": "left", "url": "http://127.0.0.1:9/hook", "events": ["*"], "secret": SECRET}),
    )
    .await;
    let pending = |id: &str, state: &str| {
        json!({"id": id, "event": "e", "topic": "vm.running", "state": state, "attempts": 1,
               "created_at": chrono::Utc::now()})
    };
    h.state
        .store
        .modify::<novacron_api::Webhook, _>("left", |w| {
            w.status.deliveries = vec![
                serde_json::from_value(pending("a", "delivered")).unwrap(),
                serde_json::from_value(pending("b", "pending")).unwrap(),
            ];
            true
        })
        .await
        .unwrap();
    novacron_server::webhooks::fail_interrupted(&h.state.store).await;
    let (_, w) = h.call(Method::GET, "/v1/webhooks/left", Some(&h.admin), None).await;
    let d = w["status"]["deliveries"].as_array().unwrap();
    assert_eq!(d[0]["state"], "delivered");
    assert_eq!(d[1]["state"], "failed");
    assert_eq!(d[1]["last_error"], "the server stopped before it was delivered");
}
