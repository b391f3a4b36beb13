//! Control plane at scale, on SQLite and on etcd side by side: 1,000 hollow
//! nodes (`novacron hollow`: the agent's own code with a simulated
//! hypervisor; no guest runs) and 10,000 VMs against release servers.
//! Measures the time to create 10,000 VMs and see them all Running, API
//! latency (get, list pages, create) while every agent holds its watch,
//! create → agent latency, server memory and CPU, and (etcd, three servers)
//! leader failover, median of 5. Writes bench/results/scale.md and .json.
//!
//!     bash bench/scale.sh [--nodes N] [--vms N]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use novacron_api::{CreateVm, Health, List, Node, Vm, VmPhase, VmSpec};
use novacron_bench::{admin_token, repo, wait_for, Procs};
use novacron_client::{Client, ListOptions, Selector};
use novacron_store::etcd_process::EtcdCluster;
use serde_json::json;

/// Creates in flight at once while the 10,000 go in.
const INGEST_CONCURRENCY: usize = 16;
const GETS: usize = 1000;
const PAGE: u32 = 100;
const EXTRA_CREATES: usize = 500;
const FAILOVERS: usize = 5;

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// p-th quantile (0..=1) of sorted `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    json!({"n": v.len(), "p50": quantile(&v, 0.5), "p99": quantile(&v, 0.99), "max": quantile(&v, 1.0)})
}

/// Resident memory (MiB) and CPU time used so far (s) of process `pid`.
fn usage(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok((rss_kib / 1024.0, ticks / hz))
}

struct Server {
    child: Child,
    args: Vec<String>,
    url: String,
    data_dir: PathBuf,
}

impl Server {
    /// Starts a release server on `store` (None: SQLite) on `port` (0: any,
    /// then reported in the data dir).
    async fn start(bin: &Path, work: &Path, name: &str, store: Option<&str>, port: u16) -> Result<Server> {
        let data_dir = work.join(name);
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            // A thousand agents on one address hold ~4,000 connections.
            "--max-connections".into(),
            "20000".into(),
            // One admin token drives the whole load.
            "--rate-limit".into(),
            "0".into(),
        ];
        if let Some(s) = store {
            args.extend(["--store".into(), s.into()]);
        }
        let mut s = Server {
            child: spawn(bin, &args, &work.join(format!("{name}.log")))?,
            args,
            url: String::new(),
            data_dir,
        };
        s.url = s.wait_listening().await?;
        Ok(s)
    }

    async fn wait_listening(&self) -> Result<String> {
        let addr_file = self.data_dir.join("listen.addr");
        let addr = wait_for("server address", Duration::from_secs(60), || async {
            std::fs::read_to_string(&addr_file).ok().map(|a| a.trim().to_string())
        })
        .await?;
        Ok(format!("https://{addr}"))
    }

    fn port(&self) -> Result<u16> {
        self.url.rsplit(':').next().context("port")?.parse().context("port")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the port it had.
    async fn restart(&mut self, bin: &Path, work: &Path, name: &str) -> Result<()> {
        let port = self.port()?;
        let _ = std::fs::remove_file(self.data_dir.join("listen.addr"));
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                if a.starts_with("127.0.0.1:") {
                    format!("127.0.0.1:{port}")
                } else {
                    a.clone()
                }
            })
            .collect();
        self.child = spawn(bin, &args, &work.join(format!("{name}.log")))?;
        self.url = self.wait_listening().await?;
        Ok(())
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Ok(Command::new(bin)
        .args(args)
        .env("NOVACRON_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

fn https(ca: &Path) -> Result<reqwest::Client> {
    let ca = std::fs::read_to_string(ca)?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(novacron_tls::client_config(&ca, None)?)
        .timeout(Duration::from_secs(2))
        .build()?)
}

/// Whether the server at `url` leads; None while it is not ready.
async fn ready(http: &reqwest::Client, url: &str) -> Option<bool> {
    let resp = http.get(format!("{url}/readyz")).send().await.ok()?;
    resp.json::<Health>().await.ok()?.leader
}

async fn leads(http: &reqwest::Client, url: &str) -> bool {
    ready(http, url).await == Some(true)
}

fn create_request(name: &str) -> CreateVm {
    CreateVm {
        name: name.into(),
        project: None,
        labels: Default::default(),
        no_default_network: true,
        spec: VmSpec::new("tiny", 1, 512),
    }
}

/// When each VM was first seen by its hollow node (unix ms).
fn seen(log: &Path) -> HashMap<String, u128> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["vm"].as_str()?.to_string(), v["seen_unix_ms"].as_u64()? as u128)))
        .collect()
}

async fn count_running(client: &Client) -> Option<usize> {
    let (vms, _) = client.list_all::<Vm>(&Selector::everything()).await.ok()?;
    Some(vms.iter().filter(|v| v.status.phase == VmPhase::Running).count())
}

/// One backend's run: servers, hollow nodes, the load, the measurements.
async fn run_backend(backend: &str, nodes: usize, vms: usize) -> Result<serde_json::Value> {
    let bin = repo().join("target/release/novacron");
    let work = tempfile::Builder::new().prefix("nc-scale-").tempdir_in("/tmp")?;
    let work_path = work.path().to_path_buf();
    let mut procs = Procs(Vec::new(), work_path.clone());
    let mut etcd = None;
    let store = if backend == "etcd" {
        let cluster = EtcdCluster::start(&work_path.join("etcd"), 1)?;
        let url = cluster.url("/scale");
        etcd = Some(cluster);
        Some(url)
    } else {
        None
    };
    let etcd_pid = || -> Option<u32> { etcd.as_ref().and_then(|e| e.members.first()).and_then(|m| m.pid()) };

    eprintln!("[{backend}] servers");
    let mut servers = vec![Server::start(&bin, &work_path, "server-1", store.as_deref(), 0).await?];
    let token = admin_token(&servers[0].data_dir).await?;
    let ca = servers[0].data_dir.join("pki/ca.crt");
    let http = wait_for("the CA", Duration::from_secs(30), || async { https(&ca).ok() }).await?;
    wait_for("server-1 leading", Duration::from_secs(30), || async {
        leads(&http, &servers[0].url).await.then_some(())
    })
    .await?;
    if let Some(s) = &store {
        for i in 2..=3 {
            servers.push(Server::start(&bin, &work_path, &format!("server-{i}"), Some(s), 0).await?);
        }
    }
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let all_urls = urls.join(",");
    let tls = novacron_tls::client_config(&std::fs::read_to_string(&ca)?, None)?;
    // Requests go to server-1 (which leads at the start); a client naming
    // every server is kept for the failover.
    let client = Client::with_tls(&urls[0], &token, Some(tls.clone()))?;
    let everyone = Client::with_tls(&all_urls, &token, Some(tls))?;

    let disk = work_path.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20])?;
    let cli = |args: &[&str]| -> Result<()> {
        let out = Command::new(&bin)
            .args(args)
            .env("NOVACRON_SERVER", &urls[0])
            .env("NOVACRON_TOKEN", &token)
            .env("NOVACRON_CA_CERT", &ca)
            .output()?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    cli(&["image", "import", "tiny", &disk.display().to_string()])?;

    eprintln!("[{backend}] {nodes} hollow nodes");
    let seen_log = work_path.join("seen.jsonl");
    let joined_from = Instant::now();
    procs.0.push(spawn(
        &bin,
        &[
            "hollow".into(),
            "--server".into(),
            all_urls.clone(),
            "--token".into(),
            token.clone(),
            "--ca-cert".into(),
            ca.display().to_string(),
            "--nodes".into(),
            nodes.to_string(),
            "--data-dir".into(),
            work_path.join("hollow").display().to_string(),
            "--seen-log".into(),
            seen_log.display().to_string(),
        ],
        &work_path.join("hollow.log"),
    )?);
    wait_for("hollow nodes Ready", Duration::from_secs(600), || async {
        let (list, _) = client.list_all::<Node>(&Selector::everything()).await.ok()?;
        (list.iter().filter(|n| n.status.ready).count() == nodes).then_some(())
    })
    .await?;
    let nodes_ready_s = joined_from.elapsed().as_secs_f64();
    let server_pid = servers[0].child.id();
    let (_, cpu_before) = usage(server_pid)?;
    let etcd_cpu_before = etcd_pid().map(usage).transpose()?.map(|u| u.1);

    eprintln!("[{backend}] creating {vms} VMs");
    let ingest_from = Instant::now();
    let created: Vec<(String, u128, f64)> = futures::stream::iter(0..vms)
        .map(|i| {
            let client = client.clone();
            async move {
                let name = format!("vm-{i:05}");
                let (sent, t) = (unix_ms(), Instant::now());
                client
                    .create_vm(&create_request(&name))
                    .await
                    .with_context(|| format!("create {name}"))?;
                anyhow::Ok((name, sent, t.elapsed().as_secs_f64() * 1000.0))
            }
        })
        .buffer_unordered(INGEST_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let creates_done_s = ingest_from.elapsed().as_secs_f64();
    wait_for("every VM Running", Duration::from_secs(1800), || async {
        (count_running(&client).await? == vms).then_some(())
    })
    .await?;
    let all_running_s = ingest_from.elapsed().as_secs_f64();
    let (_, cpu_after) = usage(server_pid)?;
    let etcd_cpu_after = etcd_pid().map(usage).transpose()?.map(|u| u.1);

    eprintln!("[{backend}] API latency at {vms} VMs, {nodes} watching agents");
    let mut gets = Vec::new();
    for i in 0..GETS {
        let name = format!("vm-{:05}", (i * 7919) % vms);
        let t = Instant::now();
        client.get::<Vm>(&name).await?;
        gets.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut pages = Vec::new();
    let mut opts = ListOptions {
        limit: Some(PAGE),
        ..Default::default()
    };
    loop {
        let t = Instant::now();
        let page: List<Vm> = client.list(&opts).await?;
        pages.push(t.elapsed().as_secs_f64() * 1000.0);
        match page.continue_token {
            Some(c) => opts.continue_token = Some(c),
            None => break,
        }
    }
    let mut creates = Vec::new();
    let mut later = Vec::new();
    for i in 0..EXTRA_CREATES {
        let name = format!("more-{i:04}");
        let (sent, t) = (unix_ms(), Instant::now());
        client.create_vm(&create_request(&name)).await?;
        creates.push(t.elapsed().as_secs_f64() * 1000.0);
        later.push((name, sent));
    }
    let (rss_mib, _) = usage(server_pid)?;
    let etcd_rss = etcd_pid().map(usage).transpose()?.map(|u| u.0);

    let wanted: Vec<String> = created
        .iter()
        .map(|c| c.0.clone())
        .chain(later.iter().map(|l| l.0.clone()))
        .collect();
    let arrivals = wait_for("every VM at its node", Duration::from_secs(120), || async {
        let s = seen(&seen_log);
        wanted.iter().all(|w| s.contains_key(w)).then_some(s)
    })
    .await?;
    let to_agent = |list: &mut dyn Iterator<Item = (&String, &u128)>| -> Vec<f64> {
        list.map(|(name, sent)| arrivals[name].saturating_sub(*sent) as f64)
            .collect()
    };
    let ingest_to_agent = to_agent(&mut created.iter().map(|c| (&c.0, &c.1)));
    let steady_to_agent = to_agent(&mut later.iter().map(|l| (&l.0, &l.1)));

    let mut failovers = Vec::new();
    if store.is_some() {
        for round in 0..FAILOVERS {
            // Every server up, exactly one leading.
            let leader = wait_for("one leader", Duration::from_secs(60), || async {
                let mut leading = Vec::new();
                for (i, s) in servers.iter().enumerate() {
                    if ready(&http, &s.url).await? {
                        leading.push(i);
                    }
                }
                (leading.len() == 1).then(|| leading[0])
            })
            .await?;
            eprintln!("[{backend}] failover {}: killing server-{}", round + 1, leader + 1);
            let killed_at = Instant::now();
            servers[leader].kill();
            // A VM created right after: placed only once a new leader's
            // controllers run.
            let name = format!("failover-{round}");
            wait_for(
                "a surviving server to take a create",
                Duration::from_secs(30),
                || async { everyone.create_vm(&create_request(&name)).await.ok() },
            )
            .await?;
            wait_for("the VM placed by a new leader", Duration::from_secs(60), || async {
                everyone.get::<Vm>(&name).await.ok()?.status.node.map(|_| ())
            })
            .await?;
            failovers.push(killed_at.elapsed().as_secs_f64());
            servers[leader]
                .restart(&bin, &work_path, &format!("server-{}", leader + 1))
                .await?;
        }
    }

    let (etcd_cpu_s, etcd_rss_mib) = match (etcd_cpu_before, etcd_cpu_after) {
        (Some(b), Some(a)) => (Some(a - b), etcd_rss),
        _ => (None, None),
    };
    let mut failover_sorted = failovers.clone();
    failover_sorted.sort_by(f64::total_cmp);
    drop(servers);
    drop(procs);
    drop(etcd);
    Ok(json!({
        "backend": backend,
        "servers": if backend == "etcd" { 3 } else { 1 },
        "nodes": nodes,
        "vms": vms,
        "nodes_ready_s": nodes_ready_s,
        "creates_done_s": creates_done_s,
        "all_running_s": all_running_s,
        "ingest_create_ms": summary(created.iter().map(|c| c.2).collect()),
        "ingest_create_to_agent_ms": summary(ingest_to_agent),
        "get_ms": summary(gets),
        "list_page_ms": summary(pages),
        "create_ms": summary(creates),
        "create_to_agent_ms": summary(steady_to_agent),
        "server_rss_mib": rss_mib,
        "server_cpu_s_ingest": cpu_after - cpu_before,
        "etcd_rss_mib": etcd_rss_mib,
        "etcd_cpu_s_ingest": etcd_cpu_s,
        "failover_s": failovers,
        "failover_median_s": (!failover_sorted.is_empty()).then(|| quantile(&failover_sorted, 0.5)),
    }))
}

/// One cell of the results table, from one backend's run.
type Cell = Box<dyn Fn(&serde_json::Value) -> String>;

fn ms(v: &serde_json::Value, what: &str) -> String {
    format!(
        "{:.1} / {:.1}",
        v[what]["p50"].as_f64().unwrap_or(f64::NAN),
        v[what]["p99"].as_f64().unwrap_or(f64::NAN)
    )
}

fn num(v: &serde_json::Value, what: &str, digits: usize) -> String {
    v[what]
        .as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |key: &str, default: usize| -> Result<usize> {
        match novacron_bench::arg(&args, key) {
            Ok(v) => v.parse().with_context(|| format!("{key} {v}")),
            Err(_) => Ok(default),
        }
    };
    let (nodes, vms) = (get("--nodes", 1000)?, get("--vms", 10_000)?);
    let mut runs = Vec::new();
    for backend in ["sqlite", "etcd"] {
        runs.push(run_backend(backend, nodes, vms).await?);
    }
    let results = repo().join("bench/results");
    std::fs::write(results.join("scale.json"), serde_json::to_string_pretty(&runs)? + "\n")?;

    let mut md = String::from("# Control plane at scale\n\n");
    md.push_str(&format!(
        "`bash bench/scale.sh` on this 2-core machine, release build: {nodes} hollow nodes (`novacron hollow`, one process: \
         the agent's join, registration, heartbeats, watch and control loop with a simulated hypervisor; no guest runs) \
         and {vms} VMs (1 vCPU, 512 MiB), created {INGEST_CONCURRENCY} at a time through the API. SQLite: one server. \
         etcd: one etcd member, three servers (requests go to server-1; the agents name all three). Then, with every VM \
         Running and every agent holding its watch: {GETS} gets of random VMs, the whole list in pages of {PAGE}, and \
         {EXTRA_CREATES} more creates, one at a time. Create → agent: from just before the create request to the hollow \
         node's first sight of the VM (same clock), placement included. Failover: kill -9 the leader, create a VM through \
         the others, until it is placed; the killed server restarts between rounds.\n\n"
    ));
    md.push_str("| | ");
    md.push_str(
        &runs
            .iter()
            .map(|r| r["backend"].as_str().unwrap_or("?").to_string())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" | target |\n|---|");
    md.push_str(&"---|".repeat(runs.len() + 1));
    md.push('\n');
    let rows: Vec<(&str, Cell, &str)> = vec![
        (
            "nodes Ready after start (s)",
            Box::new(|r| num(r, "nodes_ready_s", 1)),
            "",
        ),
        ("all VMs created (s)", Box::new(|r| num(r, "creates_done_s", 1)), ""),
        ("… all Running (s)", Box::new(|r| num(r, "all_running_s", 1)), ""),
        (
            "create during ingest p50 / p99 (ms)",
            Box::new(|r| ms(r, "ingest_create_ms")),
            "",
        ),
        (
            "create → agent during ingest p50 / p99 (ms)",
            Box::new(|r| ms(r, "ingest_create_to_agent_ms")),
            "",
        ),
        ("get p50 / p99 (ms)", Box::new(|r| ms(r, "get_ms")), "p99 ≤ 50"),
        (
            "list page of 100 p50 / p99 (ms)",
            Box::new(|r| ms(r, "list_page_ms")),
            "",
        ),
        ("create p50 / p99 (ms)", Box::new(|r| ms(r, "create_ms")), "p99 ≤ 50"),
        (
            "create → agent p50 / p99 (ms)",
            Box::new(|r| ms(r, "create_to_agent_ms")),
            "p99 ≤ 1000",
        ),
        ("server RSS (MiB)", Box::new(|r| num(r, "server_rss_mib", 0)), ""),
        (
            "server CPU during ingest (s)",
            Box::new(|r| num(r, "server_cpu_s_ingest", 1)),
            "",
        ),
        ("etcd RSS (MiB)", Box::new(|r| num(r, "etcd_rss_mib", 0)), ""),
        (
            "etcd CPU during ingest (s)",
            Box::new(|r| num(r, "etcd_cpu_s_ingest", 1)),
            "",
        ),
        (
            "leader failover, median of 5 (s)",
            Box::new(|r| num(r, "failover_median_s", 1)),
            "≤ 10",
        ),
    ];
    for (label, cell, target) in &rows {
        md.push_str(&format!(
            "| {label} | {} | {target} |\n",
            runs.iter().map(cell).collect::<Vec<_>>().join(" | ")
        ));
    }
    for r in &runs {
        if let Some(f) = r["failover_s"].as_array().filter(|f| !f.is_empty()) {
            let each: Vec<String> = f.iter().filter_map(|x| x.as_f64()).map(|x| format!("{x:.1}")).collect();
            md.push_str(&format!(
                "\nFailover rounds on {} (s): {}.\n",
                r["backend"],
                each.join(", ")
            ));
        }
    }
    let scheduler = std::fs::read_to_string(results.join("scheduler.md")).unwrap_or_default();
    md.push_str("\n## Scheduler (from `bash bench/scheduler.sh`, run by `bench/scale.sh` first)\n\n");
    md.push_str(
        &scheduler
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    md.push_str(
        "\n\nAnchors: kube-scheduler ~100 pods/s at 5,000 nodes; Nomad's C1M 3,750 containers/s on 5 servers.\n",
    );
    std::fs::write(results.join("scale.md"), md)?;
    eprintln!("wrote bench/results/scale.md and scale.json");
    Ok(())
}
