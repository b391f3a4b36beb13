//! OpenTelemetry traces: with `--otlp-endpoint` on the server and the
//! agents, a live migration is one trace across the three processes — the
//! server's root (and its record of the completion), the source agent's run
//! with each step of its timeline as a span, the target agent's preparation
//! and finish — sent with OTLP/HTTP (JSON) to a receiver this test runs.
//! Without the flag, no trace context is made (the migration test checks).
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ok, wait_until, Cluster, Options};
use novacron_api::{Migration, RunStrategy, VmPhase};
use serde_json::Value;
use std::sync::Mutex;

const BOOT: Duration = Duration::from_secs(120);

/// One exported span: its service and node, trace, ids and name.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    node: Option<String>,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    start_ns: u64,
    end_ns: u64,
}

fn attr(attrs: &Value, key: &str) -> Option<String> {
    attrs.as_array()?.iter().find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
        .map(str::to_string)
}

fn spans_of(body: &Value) -> Vec<Exported> {
    let mut out = Vec::new();
    for rs in body["resourceSpans"].as_array().into_iter().flatten() {
        let attrs = &rs["resource"]["attributes"];
        let service = attr(attrs, "service.name").unwrap_or_default();
        let node = attr(attrs, "novacron.node");
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let num = |k: &str| match &s[k] {
                    Value::String(v) => v.parse().unwrap_or(0),
                    v => v.as_u64().unwrap_or(0),
                };
                out.push(Exported {
                    service: service.clone(),
                    node: node.clone(),
                    trace_id: s["traceId"].as_str().unwrap_or_default().to_lowercase(),
                    span_id: s["spanId"].as_str().unwrap_or_default().to_lowercase(),
                    parent_id: s["parentSpanId"].as_str().unwrap_or_default().to_lowercase(),
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    start_ns: num("startTimeUnixNano"),
                    end_ns: num("endTimeUnixNano"),
                });
            }
        }
    }
    out
}

/// An OTLP/HTTP receiver on a port of its own: every span it was sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Exported>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(
                |axum::extract::State(got): axum::extract::State<Arc<Mutex<Vec<Exported>>>>,
                 body: axum::body::Bytes| async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    got.lock().unwrap().extend(spans_of(&v));
                    axum::Json(serde_json::json!({}))
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1/traces"), got)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_is_one_trace_across_the_server_and_both_agents() {
    let (endpoint, got) = receiver().await;
    let c = Cluster::start(Options {
        agents: 2,
        otlp_endpoint: Some(endpoint),
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("traced", 128, RunStrategy::Manual, false).await;
    let vm = c.wait_phase("traced", VmPhase::Running, BOOT).await;
    let source = vm.status.node.clone().expect("node");
    let target = if source == "node-1" { "node-2" } else { "node-1" };
    ok(c.cli(&["vm", "migrate", "traced", "--to", target, "--wait"])
        .output()
        .expect("cli"));
    let (migrations, _) = c
        .client
        .list_all::<Migration>(&novacron_client::Selector::everything())
        .await
        .expect("migrations");
    let parent = migrations[0]
        .spec
        .trace_parent
        .clone()
        .expect("the migration has a trace");
    let trace_id = parent.split('-').nth(1).unwrap().to_string();

    let want = [
        "migration",
        "migration.complete",
        "migration.source",
        "migration.target.prepare",
        "migration.target.finish",
    ];
    let spans = wait_until("the migration's spans to be exported", Duration::from_secs(60), || {
        let spans: Vec<Exported> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        let all = want.iter().all(|w| names.contains(w));
        async move { all.then_some(spans) }
    })
    .await;
    let one = |name: &str| spans.iter().find(|s| s.name == name).unwrap().clone();
    let root = one("migration");
    assert_eq!(root.service, "novacron-server");
    assert!(
        root.parent_id.is_empty() || root.parent_id.chars().all(|c| c == '0'),
        "{root:?}"
    );
    assert_eq!(one("migration.complete").service, "novacron-server");
    let run = one("migration.source");
    assert_eq!(
        (run.service.as_str(), run.node.as_deref()),
        ("novacron-agent", Some(source.as_str()))
    );
    for name in ["migration.target.prepare", "migration.target.finish"] {
        let s = one(name);
        assert_eq!(
            (s.service.as_str(), s.node.as_deref()),
            ("novacron-agent", Some(target)),
            "{s:?}"
        );
        assert_eq!(s.parent_id, root.span_id, "{name} is not under the root");
    }
    assert_eq!(run.parent_id, root.span_id);
    // The source's steps are spans within its run, in its time.
    let steps: Vec<&Exported> = spans.iter().filter(|s| s.parent_id == run.span_id).collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    for step in ["prepare_target", "memory_passes", "switchover"] {
        assert!(names.contains(&step), "no {step} step span: {names:?}");
    }
    for s in &steps {
        assert!(
            s.start_ns >= run.start_ns && s.end_ns <= run.end_ns + 5_000_000 && s.start_ns <= s.end_ns,
            "{s:?} outside {run:?}"
        );
    }
}
