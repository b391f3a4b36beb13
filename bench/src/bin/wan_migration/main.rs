//! WAN migration benchmark (issue 6), run inside a WAN lab built by
//! `novacron-wanlab up` (see bench/wan-migration.sh, which runs this once per
//! profile inside host 1's namespace).
//!
//! Server and agent node-1 run in `LAB-h1`, agent node-2 in `LAB-h2`, joined
//! with mTLS like a real cluster. For each workload (idle; web-like:
//! compressible memory rewritten in small changes at a moderate rate;
//! db-like: incompressible memory rewritten at a high rate) a fresh 512 MiB
//! VM is migrated node-1 → node-2 by each method:
//!   qemu-plain  QEMU's stream over one TCP connection, pre-copy, defaults
//!   qemu-best   QEMU multifd (4 channels) + zstd, strategy chosen by NovaCron (never post-copy: QEMU 10.0 cannot with multifd)
//!   dwcp        NovaCron's DWCP transport, strategy auto
//! Agents are restarted before each method so no run inherits another's
//! caches or link measurements; node-2 has the image already (a warm-up VM
//! ran there), as a host that ran it before. Wire bytes are the IP bytes the lab's TUN
//! devices carried in both directions during the migration.
//!
//! Each call is one run (`--run N`) in a fresh lab: the methods go in an
//! order that rotates with N, so that none always runs first or last.
//!
//!   wan_migration run --lab NAME --profile P --rate-mbit R --run N --json OUT [--five-vm]
//!   wan_migration render --json OUT --speed SPEED --out-json RESULTS.json --md OUT.md

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use novacron_api::{CreateMigration, CreateVm, MigrationPhase, MigrationStrategy, MigrationTransport, Vm, VmSpec};
use novacron_bench::lab::Lab;
use novacron_bench::{logs, wait_for, Procs};

mod render;
use serde_json::{json, Value};

const MEMORY_MIB: u64 = 512;
/// Guest memory the workloads use (of 512 MiB).
const WORKLOAD_MIB: u64 = 256;

struct Workload {
    name: &'static str,
    args: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: "idle", args: "" },
    Workload {
        name: "web-like",
        args: "novacron.workload=256 novacron.pattern=web novacron.dirty_rate=8 novacron.verify_rate=16",
    },
    Workload {
        name: "db-like",
        args: "novacron.workload=256 novacron.pattern=random novacron.dirty_rate=24 novacron.verify_rate=16",
    },
];

const METHODS: [&str; 3] = ["qemu-plain", "qemu-best", "dwcp"];
const MIGRATION_LIMIT: Duration = Duration::from_secs(240);

async fn start_lab(name: &str, work: &Path) -> Result<(Lab, Procs)> {
    let (lab, procs) = novacron_bench::lab::start_lab(name, work, 2).await?;
    warm_target(&lab).await?;
    Ok((lab, procs))
}

/// Has node-2 fetch the image once, as a host that has run it before: every
/// migration then finds it there, whichever method goes first in the lab.
async fn warm_target(lab: &Lab) -> Result<()> {
    lab.cli(&["node", "cordon", "node-1"])?;
    let mut spec = VmSpec::new("demo", 1, 64);
    spec.kernel_args = Some("novacron.name=warm".into());
    lab.client
        .create_vm(&CreateVm {
            name: "warm".into(),
            project: None,
            labels: Default::default(),
            no_default_network: false,
            spec,
        })
        .await?;
    let client = lab.client.clone();
    wait_for("warm-up VM on node-2", Duration::from_secs(120), || async {
        client
            .get::<Vm>("warm")
            .await
            .ok()
            .filter(|v| v.status.phase == novacron_api::VmPhase::Running)
            .map(|_| ())
    })
    .await?;
    delete_vm(lab, "warm").await?;
    lab.cli(&["node", "uncordon", "node-1"])?;
    Ok(())
}

/// Boots a VM on node-1 (node-2 is cordoned meanwhile) with the workload running.
async fn boot(lab: &Lab, name: &str, args: &str, seed: u64) -> Result<()> {
    let mut kernel_args = format!("novacron.name={name}");
    if !args.is_empty() {
        kernel_args.push_str(&format!(" {args} novacron.seed={seed}"));
    }
    let mut spec = VmSpec::new("demo", 1, MEMORY_MIB);
    spec.kernel_args = Some(kernel_args);
    lab.client
        .create_vm(&CreateVm {
            name: name.to_string(),
            project: None,
            labels: Default::default(),
            no_default_network: false,
            spec,
        })
        .await?;
    // The first report comes once the workload has filled its memory.
    let marker = if args.is_empty() {
        "NOVACRON-GUEST-READY"
    } else {
        "NOVACRON-WORKLOAD gen="
    };
    wait_for(
        &format!("{name} to run its workload"),
        Duration::from_secs(300),
        || async { logs(&lab.client, name).await.contains(marker).then_some(()) },
    )
    .await
}

/// Migrates `vm` to node-2 with `method`; returns the JSON row.
async fn migrate(lab: &Lab, vm: &str, method: &str) -> Result<Value> {
    let (transport, strategy) = match method {
        "qemu-plain" => (MigrationTransport::Qemu, MigrationStrategy::Precopy),
        "qemu-best" => (MigrationTransport::QemuMultifd, MigrationStrategy::Auto),
        _ => (MigrationTransport::Dwcp, MigrationStrategy::Auto),
    };
    let before = lab.tun_bytes()?;
    let started = Instant::now();
    let m = lab
        .client
        .create_migration(&CreateMigration {
            vm: vm.to_string(),
            target_node: Some("node-2".into()),
            strategy,
            max_downtime_ms: Some(300),
            bandwidth_mib_s: None,
            transport: Some(transport),
        })
        .await?;
    // A pre-copy that cannot converge would run for many minutes: stop it and say so.
    let mut done = match novacron_bench::migration_ended(&lab.client, &m.metadata.name, MIGRATION_LIMIT).await {
        Ok(m) => m,
        Err(_) => {
            lab.client.cancel_migration(&m.metadata.name).await?;
            novacron_bench::migration_ended(&lab.client, &m.metadata.name, Duration::from_secs(120)).await?
        }
    };
    if done.status.phase == MigrationPhase::Cancelled {
        done.status.error = Some(format!(
            "did not finish within {} s; cancelled",
            MIGRATION_LIMIT.as_secs()
        ));
    }
    let wall = started.elapsed().as_secs_f64();
    let wire = lab.tun_bytes()?.saturating_sub(before);
    let st = &done.status;
    let total_s = st.total_time_ms.map(|t| t as f64 / 1000.0);
    let predicted = st.prediction.as_ref().map(|p| p.total_s);
    Ok(json!({
        "method": method,
        "completed": st.phase == MigrationPhase::Completed,
        "error": st.error,
        "strategy": st.strategy,
        "transport": st.transport,
        "total_s": total_s,
        "wall_s": wall,
        "downtime_ms": st.downtime_ms,
        "qemu_downtime_ms": st.qemu_downtime_ms,
        "wire_bytes": wire,
        "qemu_bytes": st.bytes_sent,
        "predicted_total_s": predicted,
        "eta_error": match (predicted, total_s) {
            (Some(p), Some(t)) if t > 0.0 => Some((p - t).abs() / t),
            _ => None,
        },
        "dwcp": st.dwcp,
        "strategy_reason": st.strategy_reason,
        "timeline": st.timeline,
    }))
}

/// The workload's verdict after the move: its last report line.
async fn workload_errors(lab: &Lab, vm: &str) -> Option<u64> {
    let log = logs(&lab.client, vm).await;
    let line = log.lines().rev().find(|l| l.starts_with("NOVACRON-WORKLOAD gen="))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("errors="))
        .and_then(|e| e.parse().ok())
}

async fn delete_vm(lab: &Lab, name: &str) -> Result<()> {
    let _ = lab.cli(&["vm", "delete", name])?;
    let client = lab.client.clone();
    wait_for(&format!("{name} deleted"), Duration::from_secs(120), || async {
        client.get::<Vm>(name).await.err().map(|_| ())
    })
    .await
}

async fn run(args: &[String]) -> Result<()> {
    let arg = |k: &str| novacron_bench::arg(args, k);
    let (lab_name, profile, json_path) = (arg("--lab")?, arg("--profile")?, PathBuf::from(arg("--json")?));
    let rate_bits: f64 = arg("--rate-mbit")?.parse::<f64>()? * 1e6;
    let five = args.iter().any(|a| a == "--five-vm");
    let run_index: usize = arg("--run")?.parse()?;
    let work = tempfile::Builder::new().prefix("nc-wanbench-").tempdir_in("/tmp")?;
    let (mut lab, _procs) = start_lab(&lab_name, work.path()).await?;
    let mut rows = Vec::new();
    let mut n = 0u64;
    let mut record = |mut row: Value, extra: Value| -> Result<()> {
        if let (Some(o), Some(e)) = (row.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        let util = match (row["wire_bytes"].as_f64(), row["total_s"].as_f64()) {
            (Some(w), Some(t)) if t > 0.0 => Some(w * 8.0 / (t * rate_bits)),
            _ => None,
        };
        row["link_utilisation"] = json!(util);
        eprintln!("{row}");
        novacron_bench::append_jsonl(&json_path, std::slice::from_ref(&row))?;
        rows.push(row);
        Ok(())
    };
    // WORKLOADS / METHODS (comma-separated) narrow a run while trying things out.
    let only = |var: &str, name: &str| std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == name));
    let mut methods = METHODS.to_vec();
    methods.rotate_left(run_index.saturating_sub(1) % METHODS.len());
    for w in WORKLOADS.iter().filter(|w| only("WORKLOADS", w.name)) {
        for method in methods.iter().copied().filter(|m| only("METHODS", m)) {
            n += 1;
            // Fresh agents: no cache or link estimate carried between runs.
            lab.start_agent(1, None).await?;
            lab.start_agent(2, None).await?;
            let vm = format!("{}-{}-{n}", w.name, method);
            lab.cli(&["node", "cordon", "node-2"])?;
            boot(&lab, &vm, w.args, 1000 + n).await?;
            lab.cli(&["node", "uncordon", "node-2"])?;
            let row = migrate(&lab, &vm, method).await?;
            let errors = if w.args.is_empty() {
                None
            } else {
                workload_errors(&lab, &vm).await
            };
            record(
                row,
                json!({"profile": profile, "workload": w.name, "run": run_index, "memory_mib": MEMORY_MIB, "workload_mib": WORKLOAD_MIB, "workload_errors": errors}),
            )?;
            delete_vm(&lab, &vm).await?;
        }
    }
    if five {
        let mut pair = ["qemu-best", "dwcp"];
        if run_index.is_multiple_of(2) {
            pair.reverse();
        }
        for method in pair {
            lab.start_agent(1, None).await?;
            lab.start_agent(2, None).await?;
            let names: Vec<String> = (1..=5).map(|i| format!("five-{method}-{i}")).collect();
            lab.cli(&["node", "cordon", "node-2"])?;
            for name in &names {
                boot(&lab, name, "", 0).await?;
            }
            lab.cli(&["node", "uncordon", "node-2"])?;
            for (i, name) in names.iter().enumerate() {
                let row = migrate(&lab, name, method).await?;
                record(
                    row,
                    json!({"profile": profile, "workload": format!("five-vm-{}", i + 1), "run": run_index, "memory_mib": MEMORY_MIB}),
                )?;
            }
            for name in &names {
                delete_vm(&lab, name).await?;
            }
        }
    }
    // Procs (dropped with the work dir) kills the agents and QEMUs too.
    drop(lab);
    // KEEP_LOGS=DIR keeps the server's and agents' logs for a closer look.
    if let Ok(dir) = std::env::var("KEEP_LOGS") {
        std::fs::create_dir_all(&dir)?;
        for f in ["server.log", "node-1.log", "node-2.log"] {
            let _ = std::fs::copy(work.path().join(f), Path::new(&dir).join(f));
        }
    }
    Ok(())
}

fn render(args: &[String]) -> Result<()> {
    let arg = |k: &str| novacron_bench::arg(args, k);
    let rows = novacron_bench::read_jsonl(arg("--json")?)?;
    let speed = match arg("--speed") {
        Ok(p) => novacron_bench::read_jsonl(p)?,
        Err(_) => Vec::new(),
    };
    let command = arg("--command").unwrap_or_else(|_| "bash bench/wan-migration.sh".into());
    let (md, json) = render::render(&rows, &speed, &command);
    std::fs::write(arg("--md")?, md)?;
    std::fs::write(arg("--out-json")?, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") => run(&args).await,
        Some("render") => render(&args),
        _ => bail!("usage: wan_migration run --lab NAME --profile P --rate-mbit R --run N --json OUT [--five-vm] | render --json OUT [--speed SPEED] --out-json RESULTS.json --md OUT.md"),
    }
}
