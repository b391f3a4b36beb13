//! `/metrics`, in process: the OpenMetrics text names every family the
//! Grafana dashboard in `docs/grafana/novacron.json` queries, a request is
//! counted under its route's pattern, and a token limited to a project
//! cannot scrape (the metrics name every project's VMs).
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use http_body_util::BodyExt;

async fn scrape(h: &Harness, token: &str) -> (StatusCode, String) {
    let resp = h.raw(Method::GET, "/metrics", Some(token), Body::empty()).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The metric names a PromQL text mentions.
fn names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("novacron_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

/// Answers `GET /agent/v1/vm-stats` as an agent would, with `stats`: the
/// server's side of the per-VM counters, without QEMU (the Prometheus test
/// in crates/novacron reads them from real agents).
async fn agent_answering(stats: Vec<novacron_api::agent::VmStats>) -> String {
    let app = axum::Router::new().route(
        "/agent/v1/vm-stats",
        axum::routing::get(move || {
            let stats = stats.clone();
            async move { axum::Json(stats) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn the_dashboard_queries_only_metrics_the_server_serves() {
    use novacron_api::agent::{VmDiskStats, VmNicStats, VmStats};
    use novacron_store::StoreExt;
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let node_1 = tokens.iter().find(|t| t.contains("node-1")).unwrap().clone();
    h.call(Method::GET, "/v1/vms/vm-alpha", Some(&h.admin), None).await;
    // Something in every family (empty ones are not written): a migration
    // that ended, and node-1's agent reporting vm-alpha's counters.
    let vm: novacron_api::Vm = h.state.store.get_obj("vm-alpha").await.unwrap().unwrap();
    let url = agent_answering(vec![VmStats {
        vm_id: vm.metadata.id.clone(),
        cpu_seconds: 12.5,
        resident_bytes: 64 << 20,
        disks: vec![VmDiskStats {
            drive: "root".into(),
            read_bytes: 4096,
            write_bytes: 512,
            read_ops: 2,
            write_ops: 1,
        }],
        nics: vec![VmNicStats {
            interface: "nic0".into(),
            receive_bytes: 100,
            transmit_bytes: 200,
        }],
    }])
    .await;
    h.state
        .store
        .modify::<novacron_api::Node, _>("node-1", |n| {
            n.spec.address = url.clone();
            n.status.ready = true;
            true
        })
        .await
        .unwrap();
    // mig-alpha ends as its source agent reports it.
    let mut status = novacron_api::migration::MigrationStatus {
        total_time_ms: Some(1500),
        downtime_ms: Some(40),
        transport: Some(novacron_api::migration::MigrationTransport::Dwcp),
        ..Default::default()
    };
    status.source_node = "node-1".into();
    status.target_node = "node-2".into();
    let body = serde_json::json!({"target_qemu_pid": 4242, "status": status});
    let (code, v) = h
        .call(
            Method::POST,
            "/v1/migrations/mig-alpha/complete",
            Some(&node_1),
            Some(body),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let (status, text) = scrape(&h, &h.admin).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
    // A request, under its route's pattern rather than its path.
    assert!(
        text.lines()
            .any(|l| l.starts_with("novacron_api_request_duration_seconds_count{")
                && l.contains("route=\"/v1/vms/{name}\"")
                && l.contains("status=\"200\"")),
        "{text}"
    );
    // Every family the dashboard queries is served (declared even while
    // empty), under the name the query uses.
    let served: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/grafana/novacron.json")).unwrap();
    let queried = names(&dashboard);
    assert!(queried.len() > 10, "{queried:?}");
    for name in &queried {
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| served.contains(*f)))
            .unwrap_or(name);
        assert!(
            served.contains(family),
            "the dashboard queries {name}, which is not served: {served:?}"
        );
    }

    // The agent's counters, under the VM's name and project.
    assert!(
        text.lines()
            .any(|l| l.starts_with("novacron_vm_cpu_usage_seconds_total{")
                && l.contains("vm=\"vm-alpha\"")
                && l.contains("project=\"alpha\"")
                && l.ends_with(" 12.5")),
        "{text}"
    );
    assert!(text.contains("novacron_vm_network_transmit_bytes_total{vm=\"vm-alpha\",project=\"alpha\",node=\"node-1\",interface=\"nic0\"} 200"), "{text}");

    // The migration, counted as it ended.
    assert!(
        text.contains("novacron_migrations_ended_total{phase=\"Completed\",transport=\"dwcp\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("novacron_migrations_downtime_seconds_count{transport=\"dwcp\"} 1"),
        "{text}"
    );

    // A token limited to a project, even an admin's, is refused.
    let limited = h.token("limited", "admin", Some("alpha")).await;
    let (status, _) = scrape(&h, &limited).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let monitoring = h.token("prom", "monitoring", None).await;
    assert_eq!(scrape(&h, &monitoring).await.0, StatusCode::OK);
}
