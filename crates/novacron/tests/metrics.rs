//! The server's `/metrics` scraped by a real Prometheus (Debian's package,
//! started here in a temp dir and stopped afterwards): a VM metric and a
//! migration metric read back through Prometheus's query API, after a cold
//! migration of a busybox VM between two agents, and the VM's own counters
//! (CPU, memory, disk) from its new node's agent once it runs there. Scraping needs a token
//! with `metrics:read` (the `monitoring` role); a viewer's is refused.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, Cluster, Options};
use novacron_api::{RunStrategy, VmPhase};

const BOOT: Duration = Duration::from_secs(120);

/// Prometheus, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free now (Prometheus cannot report one it picked itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts Prometheus scraping the cluster's server and `agents` (their
/// addresses) every second with `token`.
fn prometheus(c: &Cluster, token: &str, agents: &[String]) -> Prometheus {
    let dir = c.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let target = c.url.trim_start_matches("https://").trim_end_matches('/');
    let agents: Vec<String> = agents
        .iter()
        .map(|a| format!("\"{}\"", a.trim_start_matches("https://").trim_end_matches('/')))
        .collect();
    let job = |name: &str, server_name: &str, targets: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    metrics_path: /metrics\n    authorization:\n      credentials_file: {}\n    tls_config:\n      ca_file: {}\n{server_name}    static_configs:\n      - targets: [{targets}]\n",
            dir.join("token").display(),
            c.ca_path().display()
        )
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}{}",
        job("novacron", "      server_name: localhost\n", &format!("\"{target}\"")),
        // Agents' certificates name the address they serve on.
        job("novacron-agents", "", &agents.join(", ")),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(common::log_file(&dir, "prometheus"))
        .spawn()
        .expect("prometheus (scripts/setup.sh installs it)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// The series a PromQL query returns now, each as (labels, value).
async fn query(p: &Prometheus, promql: &str) -> Vec<(serde_json::Value, f64)> {
    let Ok(resp) = reqwest::Client::new()
        .get(format!("{}/api/v1/query", p.url))
        .query(&[("query", promql)])
        .send()
        .await
    else {
        return Vec::new();
    };
    let Ok(body) = resp.json::<serde_json::Value>().await else {
        return Vec::new();
    };
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| {
            let value = s["value"][1].as_str()?.parse().ok()?;
            Some((s["metric"].clone(), value))
        })
        .collect()
}

/// Polls `promql` until `good` holds for its answer.
async fn wait_for(p: &Prometheus, promql: &str, good: impl Fn(&[(serde_json::Value, f64)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = query(p, promql).await;
        if good(&got) {
            return;
        }
        assert!(Instant::now() < deadline, "{promql}: {got:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_vm_and_migration_metrics() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("watched", 64, RunStrategy::Manual, false).await;
    let vm = c.wait_phase("watched", VmPhase::Running, BOOT).await;
    let source = vm.status.node.clone().expect("node");
    let target = if source == "node-1" { "node-2" } else { "node-1" };
    ok(c.cli(&["vm", "stop", "watched", "--wait"]).output().expect("cli"));
    ok(c.cli(&["vm", "migrate", "watched", "--to", target, "--wait"])
        .output()
        .expect("cli"));

    // Only a token with metrics:read scrapes (and not one of a project).
    let viewer = ok(c
        .cli(&["token", "create", "looker", "--role", "viewer"])
        .output()
        .expect("cli"));
    let scrape = |token: String| {
        let req = c.http().get(format!("{}/metrics", c.url.trim_end_matches('/')));
        async move { req.bearer_auth(token).send().await.expect("scrape").status().as_u16() }
    };
    assert_eq!(scrape(viewer.trim().to_string()).await, 403);
    let token = ok(c
        .cli(&["token", "create", "prom", "--role", "monitoring"])
        .output()
        .expect("cli"));

    assert_eq!(scrape(token.trim().to_string()).await, 200);
    let (nodes, _) = c
        .client
        .list_all::<novacron_api::Node>(&novacron_client::Selector::everything())
        .await
        .expect("nodes");
    let agents: Vec<String> = nodes.iter().map(|n| n.spec.address.clone()).collect();
    let p = prometheus(&c, token.trim(), &agents);
    wait_for(&p, "up{job=\"novacron\"}", |s| s.iter().any(|(_, v)| *v == 1.0)).await;
    // A VM metric: where the VM is now and its phase.
    wait_for(&p, "novacron_vm_phase{vm=\"watched\"}", |s| {
        s.iter()
            .any(|(l, v)| *v == 1.0 && l["node"] == target && l["phase"] == "Stopped" && l["project"] == "default")
    })
    .await;
    // Migration metrics: the one that moved it, by outcome, and its duration.
    wait_for(&p, "novacron_migrations{phase=\"Completed\"}", |s| {
        s.iter().map(|(_, v)| v).sum::<f64>() >= 1.0
    })
    .await;
    wait_for(&p, "novacron_migration_duration_seconds{vm=\"watched\"}", |s| {
        s.iter().any(|(l, v)| *v > 0.0 && l["phase"] == "Completed")
    })
    .await;
    // Counted as it ended: by outcome, and its duration in the histogram.
    wait_for(&p, "novacron_migrations_ended_total{phase=\"Completed\"}", |s| {
        s.iter().map(|(_, v)| v).sum::<f64>() >= 1.0
    })
    .await;
    wait_for(&p, "novacron_migrations_duration_seconds_count", |s| {
        s.iter().map(|(_, v)| v).sum::<f64>() >= 1.0
    })
    .await;
    // The API's own request durations, by route.
    wait_for(
        &p,
        "novacron_api_request_duration_seconds_count{route=\"/v1/vms/{name}\",method=\"GET\"}",
        |s| s.iter().any(|(_, v)| *v >= 1.0),
    )
    .await;
    // Started again on its new node: its QEMU's counters, from that agent.
    ok(c.cli(&["vm", "start", "watched"]).output().expect("cli"));
    c.wait_phase("watched", VmPhase::Running, BOOT).await;
    wait_for(&p, "novacron_vm_cpu_usage_seconds_total{vm=\"watched\"}", |s| {
        s.iter().any(|(l, v)| *v > 0.0 && l["node"] == target)
    })
    .await;
    wait_for(&p, "novacron_vm_memory_resident_bytes{vm=\"watched\"}", |s| {
        s.iter().any(|(_, v)| *v > 1e6)
    })
    .await;
    wait_for(
        &p,
        "novacron_vm_storage_read_traffic_bytes_total{vm=\"watched\",drive=\"root\"}",
        |s| s.iter().any(|(_, v)| *v > 0.0),
    )
    .await;
    // The same counters from the agent itself, scraped with the same token.
    wait_for(
        &p,
        "novacron_vm_cpu_usage_seconds_total{job=\"novacron-agents\",vm=\"watched\",project=\"default\"}",
        |s| s.iter().any(|(l, v)| *v > 0.0 && l["node"] == target),
    )
    .await;
    wait_for(&p, "up{job=\"novacron-agents\"}", |s| {
        s.len() == 2 && s.iter().all(|(_, v)| *v == 1.0)
    })
    .await;
    wait_for(&p, "novacron_agent_vms_running", |s| {
        s.iter().any(|(l, v)| *v == 1.0 && l["node"] == target)
    })
    .await;
    wait_for(&p, "novacron_node_stats_up", |s| {
        s.len() == 2 && s.iter().all(|(_, v)| *v == 1.0)
    })
    .await;
    // The scheduler placed the VM.
    wait_for(&p, "novacron_scheduler_decision_duration_seconds_count", |s| {
        s.iter().any(|(_, v)| *v >= 1.0)
    })
    .await;
}
