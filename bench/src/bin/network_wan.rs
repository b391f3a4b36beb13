//! The traffic gap of a live migration over the `wan` profile with DWCP
//! (the second half of bench/network.sh). Runs inside host 1 of a 3-host
//! WAN lab (`novacron-wanlab up --hosts 3 --profile wan`): VM a moves from
//! node-1 to node-2 while b, on node-3, and a stream to each other (UDP,
//! 100 datagrams/s each way) and b sends a TCP byte stream to a. b, whose
//! clock runs through a's pause, measures the longest gap.
//!
//!   network_wan --lab NAME --profile wan --json OUT.json

use std::time::Duration;

use anyhow::{bail, Context, Result};
use novacron_api::{
    CreateMigration, CreateNetwork, CreateVm, Migration, MigrationStrategy, MigrationTransport, NicSpec, Vm, VmSpec,
};
use novacron_bench::lab::{start_lab, Lab};
use novacron_bench::{arg, logs, wait_for};

/// The value of `key=` in the last line of `log` starting with `prefix`.
fn last_figure(log: &str, prefix: &str, key: &str) -> Option<i64> {
    let line = log.lines().rev().find(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// Creates `vm` on `node` (the other nodes cordoned while it is placed:
/// no node selector, so it may move later).
async fn place(lab: &Lab, vm: &str, node: &str) -> Result<String> {
    let others: Vec<String> = (1..=3).map(|i| format!("node-{i}")).filter(|n| n != node).collect();
    for n in &others {
        lab.client.set_schedulable(n, false).await?;
    }
    let made = lab
        .client
        .create_vm(&CreateVm {
            name: vm.into(),
            project: None,
            labels: Default::default(),
            no_default_network: false,
            spec: VmSpec {
                disk_mib: Some(64),
                nics: vec![NicSpec::on("bench")],
                ..VmSpec::new("demo", 1, 256)
            },
        })
        .await?;
    let client = lab.client.clone();
    wait_for(&format!("{vm} on {node}"), Duration::from_secs(60), || async {
        let v: Vm = client.get(vm).await.ok()?;
        (v.status.node.as_deref() == Some(node)).then_some(())
    })
    .await?;
    for n in &others {
        lab.client.set_schedulable(n, true).await?;
    }
    made.spec.nics[0].ip.clone().context("no address")
}

async fn wait_log(lab: &Lab, vm: &str, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let client = lab.client.clone();
    wait_for(&format!("{what} on {vm}"), Duration::from_secs(120), || async {
        let log = logs(&client, vm).await;
        ok(&log).then_some(log)
    })
    .await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| arg(&args, k);
    let (lab_name, profile, json_path) = (arg("--lab")?, arg("--profile")?, arg("--json")?);
    let work = tempfile::Builder::new().prefix("nc-netwan-").tempdir_in("/tmp")?;
    let (lab, _procs) = start_lab(&lab_name, work.path(), 3).await?;
    let _: novacron_api::Network = lab
        .client
        .post_json(
            "networks",
            &CreateNetwork {
                name: "bench".into(),
                project: None,
                labels: Default::default(),
                subnet: "10.41.0.0/24".into(),
                gateway: None,
                dhcp: true,
                nat: false,
                mtu: None,
            },
        )
        .await?;
    let a_ip = place(&lab, "a", "node-1").await?;
    let b_ip = place(&lab, "b", "node-3").await?;
    for vm in ["a", "b"] {
        wait_log(&lab, vm, "a DHCP lease", |l| l.contains("NOVACRON-NET dev=eth0")).await?;
    }
    lab.console("a", "nc-nettest udp-recv 7000 & nc-nettest tcp-recv 7001 &")?;
    lab.console("b", "nc-nettest udp-recv 7002 &")?;
    for vm in ["a", "b"] {
        wait_log(&lab, vm, "the receivers", |l| l.contains("NOVACRON-UDP")).await?;
    }
    lab.console(
        "b",
        &format!("nc-nettest udp-send {a_ip} 7000 100 & nc-nettest tcp-send {a_ip} 7001 64 &"),
    )?;
    lab.console("a", &format!("nc-nettest udp-send {b_ip} 7002 100 &"))?;
    let flowing = |log: &str, udp: i64, tcp: i64| {
        last_figure(log, "NOVACRON-UDP", "last").is_some_and(|n| n >= udp)
            && last_figure(log, "NOVACRON-TCP", "bytes").is_some_and(|n| n >= tcp)
    };
    wait_log(&lab, "a", "the streams", |l| flowing(l, 200, 128 * 1024)).await?;

    let (a_before, b_before) = (logs(&lab.client, "a").await, logs(&lab.client, "b").await);
    let udp_lines = |log: &str| log.lines().filter(|l| l.starts_with("NOVACRON-UDP")).count();
    let b_lines = udp_lines(&b_before);
    let lost_at = |log: &str| last_figure(log, "NOVACRON-UDP", "lost").unwrap_or_default();
    let (a_lost_before, b_lost_before) = (lost_at(&a_before), lost_at(&b_before));
    let m: Migration = lab
        .client
        .create_migration(&CreateMigration {
            vm: "a".into(),
            target_node: Some("node-2".into()),
            strategy: MigrationStrategy::Precopy,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            transport: Some(MigrationTransport::Dwcp),
        })
        .await?;
    let done = novacron_bench::migration_ended(&lab.client, &m.metadata.name, Duration::from_secs(300)).await?;
    if done.status.phase != novacron_api::MigrationPhase::Completed {
        bail!("the migration ended {:?}: {:?}", done.status.phase, done.status.error);
    }
    // Three more seconds of both streams after the move.
    let (udp_then, tcp_then) = (
        last_figure(&logs(&lab.client, "a").await, "NOVACRON-UDP", "last").unwrap_or_default(),
        last_figure(&logs(&lab.client, "a").await, "NOVACRON-TCP", "bytes").unwrap_or_default(),
    );
    let a_log = wait_log(&lab, "a", "the streams after the move", |l| {
        flowing(l, udp_then + 300, tcp_then + 192 * 1024)
    })
    .await?;
    let b_log = logs(&lab.client, "b").await;
    let gap = b_log
        .lines()
        .filter(|l| l.starts_with("NOVACRON-UDP"))
        .skip(b_lines)
        .filter_map(|l| last_figure(l, "NOVACRON-UDP", "gap_ms"))
        .max()
        .unwrap_or_default();
    let tcp = a_log
        .lines()
        .rev()
        .find(|l| l.starts_with("NOVACRON-TCP"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let downtime = done.status.downtime_ms.context("no downtime recorded")?;
    let row = serde_json::json!({
        "profile": profile,
        "strategy": "precopy",
        "transport": done.status.transport.map(|t| format!("{t:?}").to_lowercase()),
        "downtime_ms": downtime,
        "longest_gap_ms": gap,
        "lost_b_to_a": lost_at(&a_log) - a_lost_before,
        "lost_a_to_b": lost_at(&b_log) - b_lost_before,
        "tcp": tcp,
        "tcp_intact": tcp.contains("errors=0 state=open"),
        "gap_within_downtime_plus_1s": gap <= downtime as i64 + 1000,
    });
    println!("{row}");
    std::fs::write(&json_path, serde_json::to_string_pretty(&row)?)?;
    // Added to bench/network's results, which the first half wrote.
    let results = novacron_bench::repo().join("bench/results");
    let mut all: serde_json::Value = std::fs::read(results.join("network.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    all["wan_migration"] = row.clone();
    std::fs::write(results.join("network.json"), serde_json::to_string_pretty(&all)?)?;
    let md = format!(
        "\n## Over the `{profile}` profile (WAN lab, 3 hosts)\n\nVM a moves node-1 → node-2 with DWCP (pre-copy) while b on node-3 streams to it (UDP 100/s each way, TCP 64 KiB/s b → a); b measures the gap.\n\n\
         | downtime ms | longest gap ms | gap ≤ downtime + 1 s | UDP lost b→a | UDP lost a→b | TCP after the move |\n|---:|---:|---|---:|---:|---|\n\
         | {downtime} | {gap} | {} | {} | {} | {} |\n",
        if gap <= downtime as i64 + 1000 { "yes" } else { "no" },
        row["lost_b_to_a"],
        row["lost_a_to_b"],
        tcp,
    );
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(results.join("network.md"))?;
    std::io::Write::write_all(&mut file, md.as_bytes())?;
    print!("{md}");
    Ok(())
}
