//! Foundation benchmark, ours vs baseline in one run:
//! 1. create → Running (console marker seen) for one TCG guest, median of 5:
//!    NovaCron (API create through a real server and agent) vs the same QEMU
//!    command started by hand.
//! 2. API latency with 10,000 VMs stored: `GET /v1/vms` (paged, 100 per page)
//!    and `GET /v1/vms/{id}`, vs `GET /healthz` as the HTTP floor.
//!
//! Run: `bash bench/foundation.sh` (builds release binaries first).
//! Writes bench/results/foundation.md.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use novacron_api::{CreateVm, Metadata, PowerState, Vm, VmPhase, VmSpec, VmStatus};
use novacron_bench::{import_demo, logs, repo, Procs};
use novacron_client::Client;
use novacron_store::SqliteStore;

const MARKER: &str = "NOVACRON-GUEST-READY";
const RUNS: usize = 5;
const STORED_VMS: usize = 10_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

async fn wait_http(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::get(url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} not ready")
}

fn port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    Ok(Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// Baseline: the QEMU command line an operator would write, timed to the marker.
async fn boot_plain_qemu(work: &Path, guest: &Path, i: usize) -> Result<f64> {
    let dir = work.join(format!("plain-{i}"));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("root.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("256M")
        .status()?;
    if !st.success() {
        bail!("qemu-img failed");
    }
    let serial = dir.join("serial.log");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-cpu",
            "max",
            "-m",
            "256M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 novacron.name=plain"])
        .arg("-drive")
        .arg(format!("if=none,id=root,file={},format=qcow2", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=root"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = loop {
        if std::fs::read_to_string(&serial).unwrap_or_default().contains(MARKER) {
            break Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(180) {
            break Err(anyhow::anyhow!("plain QEMU did not boot"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn boot_novacron(client: &Client, i: usize) -> Result<f64> {
    let name = format!("bench-{i}");
    let started = Instant::now();
    client
        .create_vm(&CreateVm {
            name: name.clone(),
            project: None,
            labels: Default::default(),
            no_default_network: false,
            spec: VmSpec {
                disk_mib: Some(256),
                ..VmSpec::new("demo", 1, 256)
            },
        })
        .await?;
    let elapsed = loop {
        if logs(client, &name).await.contains(MARKER) {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("{name} did not boot");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    client.delete_vm(&name, false).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get::<Vm>(&name).await.is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(elapsed)
}

/// Sequential requests over one keep-alive connection; latencies in ms, sorted.
async fn latencies(http: &reqwest::Client, token: &str, urls: &[String]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let t = Instant::now();
        let resp = http.get(url).bearer_auth(token).send().await?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        let _ = resp.bytes().await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

async fn seed_vms(db: &Path) -> Result<Vec<String>> {
    {
        let store = SqliteStore::open(db)?;
        let mut rows = Vec::with_capacity(STORED_VMS);
        let mut ids = Vec::with_capacity(STORED_VMS);
        for i in 0..STORED_VMS {
            let vm = Vm {
                metadata: Metadata::new(
                    &format!("vm-{i:05}"),
                    [("app".to_string(), format!("app-{}", i % 10))].into(),
                ),
                spec: VmSpec {
                    power_state: PowerState::Stopped,
                    ..VmSpec::new("demo", 1, 256)
                },
                status: VmStatus {
                    phase: VmPhase::Pending,
                    reason: Some("seeded for benchmark".into()),
                    ..Default::default()
                },
            };
            ids.push(vm.metadata.id.clone());
            rows.push((
                vm.metadata.name.clone(),
                vm.metadata.id.clone(),
                serde_json::to_value(&vm)?,
            ));
        }
        store.create_many("vm", rows).await?;
        Ok(ids)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = repo().join("target/release/novacron");
    let guest = repo().join("target/guest");
    if !bin.exists() || !guest.join("vmlinuz").exists() {
        bail!("build first: cargo build --release -p novacron && scripts/build-guest-image.sh");
    }
    let work = tempfile::Builder::new().prefix("nc-bench-").tempdir_in("/tmp")?;
    let mut procs = Procs(Vec::new(), work.path().to_path_buf());

    // ---- 1. boot time
    let p = port()?;
    let url = format!("http://127.0.0.1:{p}");
    let server_dir = work.path().join("server");
    let server_args = vec![
        "server".into(),
        "--data-dir".into(),
        server_dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{p}"),
        // Loopback bench, as before TLS: plain HTTP, agents on the admin token.
        "--insecure-http".into(),
    ];
    procs
        .0
        .push(spawn(&bin, &server_args, &work.path().join("server.log"))?);
    wait_http(&format!("{url}/readyz")).await?;
    let token = std::fs::read_to_string(server_dir.join("admin.token"))?
        .trim()
        .to_string();
    let agent_args: Vec<String> = [
        "agent",
        "--server",
        &url,
        "--token",
        &token,
        "--name",
        "node-1",
        "--data-dir",
        &work.path().join("agent").display().to_string(),
        "--vcpus",
        "4",
        "--memory",
        "4GiB",
        "--accel",
        "tcg",
        "--heartbeat",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    procs.0.push(spawn(&bin, &agent_args, &work.path().join("agent.log"))?);
    let client = Client::new(&url, &token)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get::<novacron_api::Node>("node-1")
        .await
        .map(|n| !n.status.ready)
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("agent did not register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    import_demo(&bin, &url, &token)?;
    // Warm-up (image download into the agent cache is a one-time cost).
    boot_novacron(&client, 0).await.context("warm-up boot")?;
    let mut ours = Vec::new();
    let mut plain = Vec::new();
    for i in 1..=RUNS {
        // Alternate so both see the same machine conditions.
        plain.push(boot_plain_qemu(work.path(), &guest, i).await?);
        ours.push(boot_novacron(&client, i).await?);
        eprintln!("run {i}: plain {:.2}s, novacron {:.2}s", plain[i - 1], ours[i - 1]);
    }
    drop(procs);

    // ---- 2. API latency with 10,000 VMs
    let mut procs = Procs(Vec::new(), work.path().to_path_buf());
    let api_dir = work.path().join("api-server");
    std::fs::create_dir_all(&api_dir)?;
    let seed_start = Instant::now();
    let ids = seed_vms(&api_dir.join("novacron.db")).await?;
    eprintln!("seeded {STORED_VMS} VMs in {:.1}s", seed_start.elapsed().as_secs_f64());
    let p = port()?;
    let url = format!("http://127.0.0.1:{p}");
    let args = vec![
        "server".into(),
        "--data-dir".into(),
        api_dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{p}"),
        // Loopback bench, as before TLS: plain HTTP, agents on the admin token.
        "--insecure-http".into(),
        // The latency run is one client going flat out; the per-token limit would cap it.
        "--rate-limit".into(),
        "0".into(),
    ];
    procs.0.push(spawn(&bin, &args, &work.path().join("api-server.log"))?);
    wait_http(&format!("{url}/readyz")).await?;
    let token = std::fs::read_to_string(api_dir.join("admin.token"))?.trim().to_string();
    let http = reqwest::Client::new();

    // Paged list: walk all 100 pages twice, following continue tokens.
    let mut page_urls = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let u = match &cont {
            Some(c) => format!("{url}/v1/vms?limit=100&continue={c}"),
            None => format!("{url}/v1/vms?limit=100"),
        };
        let body: serde_json::Value = http.get(&u).bearer_auth(&token).send().await?.json().await?;
        page_urls.push(u);
        match body["continue"].as_str() {
            Some(c) => cont = Some(c.to_string()),
            None => break,
        }
    }
    let pages = page_urls.len();
    let list_urls: Vec<String> = page_urls.iter().chain(page_urls.iter()).cloned().collect();
    let get_urls: Vec<String> = (0..1000)
        .map(|i| format!("{url}/v1/vms/{}", ids[(i * 7919) % ids.len()]))
        .collect();
    let health_urls: Vec<String> = (0..1000).map(|_| format!("{url}/healthz")).collect();
    let health = latencies(&http, &token, &health_urls).await?;
    let list = latencies(&http, &token, &list_urls).await?;
    let get = latencies(&http, &token, &get_urls).await?;
    drop(procs);

    let row = |name: &str, v: &[f64]| {
        format!(
            "| {name} | {} | {:.2} | {:.2} |",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99)
        )
    };
    let table = format!(
        "# Foundation benchmark\n\n\
         Command: `bash bench/foundation.sh` (release build; TCG guests; 2-core machine). Generated {}.\n\n\
         ## create → Running (console marker `{MARKER}` seen), 256 MiB TCG guest, median of {RUNS}\n\n\
         | method | median s | runs (s) |\n|---|---|---|\n\
         | plain `qemu-system-x86_64` started by hand (baseline) | {:.2} | {} |\n\
         | NovaCron: `POST /v1/vms` → scheduler → agent → QEMU | {:.2} | {} |\n\n\
         NovaCron's overhead over the bare boot: {:+.2} s (median).\n\n\
         ## API latency with {STORED_VMS} VMs stored (sequential, one keep-alive connection)\n\n\
         | request | n | p50 ms | p99 ms |\n|---|---|---|---|\n{}\n{}\n{}\n\n\
         `GET /v1/vms` walks all {pages} pages of 100 twice, following `continue` tokens.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        median(plain.clone()),
        plain.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", "),
        median(ours.clone()),
        ours.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", "),
        median(ours.clone()) - median(plain.clone()),
        row("`GET /healthz` (HTTP floor, baseline)", &health),
        row("`GET /v1/vms?limit=100` (paged)", &list),
        row("`GET /v1/vms/{id}`", &get),
    );
    let out = repo().join("bench/results/foundation.md");
    std::fs::write(&out, &table)?;
    println!("{table}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
