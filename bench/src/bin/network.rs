//! VM network benchmark, side by side in one run: TCP throughput and round
//! trip between two hosts (network namespaces on one underlay bridge: the
//! baseline), between two VMs on one host (bridge), and between two VMs on
//! two hosts (VXLAN over the same underlay); then the gap a live migration
//! leaves in a 100 datagrams/s UDP stream, pre-copy and post-copy. The same
//! probe (`nc-nettest`, which checks every byte it receives) runs on the
//! hosts and in the guests; the guests' QEMU CPU use is reported too.
//!
//! Run: `bash bench/network.sh` (root). Writes bench/results/network.{md,json}.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use novacron_api::{CreateMigration, CreateNetwork, CreateVm, Migration, MigrationStrategy, NicSpec, Node, Vm, VmSpec};
use novacron_bench::{import_demo, logs, repo, wait_for, Procs};
use novacron_client::Client;

const UNDERLAY: &str = "ncbench0";
const WINDOW: Duration = Duration::from_secs(8);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The underlay: a bridge in this namespace (10.202.0.1) and hosts
/// `ncbench-h<N>` (10.202.0.1N) on it; removed when dropped.
struct Underlay;

impl Underlay {
    fn new() -> Result<Underlay> {
        Underlay.remove();
        ip(&["link", "add", "name", UNDERLAY, "type", "bridge"])?;
        ip(&["addr", "add", "10.202.0.1/24", "dev", UNDERLAY])?;
        ip(&["link", "set", "dev", UNDERLAY, "up"])?;
        for n in 1..=2u8 {
            let ns = host(n);
            ip(&["netns", "add", &ns])?;
            let outer = format!("ncbenchv{n}");
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "ul0", "netns", &ns,
            ])?;
            ip(&["link", "set", "dev", &outer, "master", UNDERLAY, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", host_ip(n)), "dev", "ul0"])?;
            ip(&["-n", &ns, "link", "set", "dev", "ul0", "up"])?;
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"])?;
        }
        Ok(Underlay)
    }
    fn remove(&self) {
        for n in 1..=2u8 {
            let _ = ip(&["netns", "del", &host(n)]);
        }
        let _ = ip(&["link", "del", UNDERLAY]);
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        self.remove();
    }
}

fn host(n: u8) -> String {
    format!("ncbench-h{n}")
}

fn host_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, 0, 10 + n)
}

fn in_host(n: u8, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &host(n)]).arg(program);
    c
}

/// CPU seconds a process has used (user + system).
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Throughput from the receiver's once-a-second byte counts: the counts
/// of its lines after `from`, first to last, over the seconds between.
fn throughput_mbit(log: &str, from: usize) -> Option<f64> {
    let counts: Vec<f64> = log
        .lines()
        .filter(|l| l.starts_with("NOVACRON-TCP"))
        .skip(from)
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("bytes="))?
                .parse()
                .ok()
        })
        .collect();
    if counts.len() < 3 {
        return None;
    }
    // Skip the first line (the stream was starting).
    let (first, last) = (counts[1], counts[counts.len() - 1]);
    Some((last - first) * 8.0 / 1e6 / (counts.len() - 2) as f64)
}

fn figure(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// The average of a ping's summary line (`min/avg/max` in either iputils' or busybox's words).
fn ping_avg_ms(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("min/avg/max"))?;
    line.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
}

struct Cluster {
    bin: PathBuf,
    url: String,
    token: String,
    client: Client,
}

impl Cluster {
    fn console(&self, vm: &str, line: &str) -> Result<()> {
        novacron_bench::type_on_console(&self.bin, &self.url, &self.token, None, vm, line)
    }

    async fn lines(&self, vm: &str, prefix: &str) -> usize {
        logs(&self.client, vm)
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    async fn wait_line(&self, vm: &str, prefix: &str, at_least: usize) -> Result<String> {
        wait_for(&format!("{prefix} on {vm}"), Duration::from_secs(120), || async {
            let log = logs(&self.client, vm).await;
            (log.lines().filter(|l| l.starts_with(prefix)).count() >= at_least).then_some(log)
        })
        .await
    }
}

struct Row {
    path: &'static str,
    mbit_s: f64,
    rtt_ms: f64,
    cpu: String,
}

/// TCP from guest `from` to guest `to` (address `to_ip`), and their round trip.
async fn guest_pair(c: &Cluster, from: &str, to: &str, to_ip: &str, port: u16) -> Result<(f64, f64, String)> {
    let pid = |vm: Vm| vm.status.qemu_pid.unwrap_or_default();
    let (from_pid, to_pid) = (pid(c.client.get(from).await?), pid(c.client.get(to).await?));
    let seen = c.lines(to, "NOVACRON-TCP").await;
    c.console(to, &format!("nc-nettest tcp-recv {port} & sleep 1"))?;
    c.console(
        from,
        &format!(
            "timeout {} nc-nettest tcp-send {to_ip} {port} 0 &",
            WINDOW.as_secs() + 2
        ),
    )?;
    let (cpu_from, cpu_to, started) = (cpu_s(from_pid), cpu_s(to_pid), Instant::now());
    c.wait_line(to, "NOVACRON-TCP", seen + WINDOW.as_secs() as usize)
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let use_from = (cpu_s(from_pid) - cpu_from) / secs;
    let use_to = (cpu_s(to_pid) - cpu_to) / secs;
    let log = logs(&c.client, to).await;
    let mbit = throughput_mbit(&log, seen).context("no throughput lines")?;
    let marker = format!("PING-DONE-{port}");
    c.console(
        from,
        &format!("ping -c 10 -i 0.2 {to_ip}; echo \"PING\"\"-DONE-{port}\""),
    )?;
    let log = c.wait_line(from, &marker, 1).await?;
    let rtt = ping_avg_ms(&log).context("no ping summary")?;
    Ok((
        mbit,
        rtt,
        format!(
            "sender QEMU {:.0} %, receiver QEMU {:.0} % of a core",
            use_from * 100.0,
            use_to * 100.0
        ),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = repo().join("target/release/novacron");
    let work = tempfile::Builder::new().prefix("nc-netbench-").tempdir_in("/tmp")?;
    let nettest = work.path().join("nc-nettest");
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&nettest)
        .arg(repo().join("guest/nettest.c"))
        .status()?;
    if !built.success() {
        bail!("cannot compile guest/nettest.c for the host");
    }
    let _underlay = Underlay::new()?;
    let mut procs = Procs(Vec::new(), work.path().to_path_buf());
    let url = "http://10.202.0.1:8471".to_string();
    let sdir = work.path().join("server");
    procs.0.push(
        Command::new(&bin)
            .args([
                "server",
                "--data-dir",
                &sdir.display().to_string(),
                "--listen",
                "10.202.0.1:8471",
            ])
            // Control traffic in plain HTTP: the bench measures the data path.
            .arg("--insecure-http")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("server.log"))?)
            .spawn()?,
    );
    let token = novacron_bench::admin_token(&sdir).await?;
    for n in 1..=2u8 {
        let name = format!("node-{n}");
        procs.0.push(
            in_host(n, &bin)
                .args([
                    "agent",
                    "--server",
                    &url,
                    "--token",
                    &token,
                    "--name",
                    &name,
                    "--data-dir",
                ])
                .arg(work.path().join(&name))
                .args([
                    "--listen",
                    &format!("{}:0", host_ip(n)),
                    "--label",
                    &format!("host={name}"),
                ])
                .args([
                    "--vcpus",
                    "4",
                    "--memory",
                    "4GiB",
                    "--accel",
                    "tcg",
                    "--heartbeat",
                    "1s",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(work.path().join(format!("{name}.log")))?)
                .spawn()?,
        );
    }
    let client = Client::new(&url, &token)?;
    for n in ["node-1", "node-2"] {
        wait_for("agent", Duration::from_secs(30), || async {
            client.get::<Node>(n).await.ok().filter(|n| n.status.ready).map(|_| ())
        })
        .await?;
    }
    import_demo(&bin, &url, &token)?;
    let c = Cluster {
        bin: bin.clone(),
        url: url.clone(),
        token: token.clone(),
        client: client.clone(),
    };
    let _: novacron_api::Network = client
        .post_json(
            "networks",
            &CreateNetwork {
                name: "bench".into(),
                project: None,
                labels: Default::default(),
                subnet: "10.40.0.0/24".into(),
                gateway: None,
                dhcp: true,
                nat: false,
                mtu: None,
            },
        )
        .await?;
    let mut ips = std::collections::HashMap::new();
    for (vm, node) in [("a", "node-1"), ("b", "node-1"), ("c", "node-2")] {
        let mut spec = VmSpec {
            disk_mib: Some(64),
            nics: vec![NicSpec::on("bench")],
            ..VmSpec::new("demo", 1, 256)
        };
        // c moves later, so it gets no node selector: node-1 is cordoned
        // while it is placed instead.
        if vm == "c" {
            client.set_schedulable("node-1", false).await?;
        } else {
            spec.placement.node_selector = [("host".to_string(), node.to_string())].into();
        }
        let made = client
            .create_vm(&CreateVm {
                name: vm.into(),
                project: None,
                labels: Default::default(),
                no_default_network: false,
                spec,
            })
            .await?;
        ips.insert(vm, made.spec.nics[0].ip.clone().context("address")?);
        if vm == "c" {
            wait_for("c placed", Duration::from_secs(30), || async {
                let c: Vm = client.get("c").await.ok()?;
                (c.status.node.as_deref() == Some("node-2")).then_some(())
            })
            .await?;
            client.set_schedulable("node-1", true).await?;
        }
    }
    for vm in ["a", "b", "c"] {
        c.wait_line(vm, "NOVACRON-NET", 1).await?;
    }

    let mut rows = Vec::new();
    // Baseline: host to host over the underlay, the same probe.
    {
        let log = work.path().join("host-recv.log");
        let mut recv = in_host(2, &nettest)
            .args(["tcp-recv", "7100"])
            .stdout(std::fs::File::create(&log)?)
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let send = in_host(1, Path::new("timeout"))
            .args([&WINDOW.as_secs().to_string(), &nettest.display().to_string()])
            .args(["tcp-send", &host_ip(2).to_string(), "7100", "0"])
            .stdout(Stdio::null())
            .status()?;
        let _ = send;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = recv.kill();
        let _ = recv.wait();
        let mbit = throughput_mbit(&std::fs::read_to_string(&log)?, 0).context("host throughput")?;
        // busybox's ping: the one the guests run.
        let ping = in_host(1, Path::new("/bin/busybox"))
            .args(["ping", "-c", "10", "-i", "0.2", &host_ip(2).to_string()])
            .output()?;
        let rtt = ping_avg_ms(&String::from_utf8_lossy(&ping.stdout)).context("host ping")?;
        rows.push(Row {
            path: "host ↔ host (underlay, baseline)",
            mbit_s: mbit,
            rtt_ms: rtt,
            cpu: "-".into(),
        });
    }
    let (mbit, rtt, cpu) = guest_pair(&c, "a", "b", &ips["b"], 7101).await?;
    rows.push(Row {
        path: "VM ↔ VM, same host (bridge)",
        mbit_s: mbit,
        rtt_ms: rtt,
        cpu,
    });
    let (mbit, rtt, cpu) = guest_pair(&c, "a", "c", &ips["c"], 7102).await?;
    rows.push(Row {
        path: "VM ↔ VM, two hosts (VXLAN)",
        mbit_s: mbit,
        rtt_ms: rtt,
        cpu,
    });

    // Migration gaps: c moves while a and c stream 100 datagrams/s to each
    // other; a (not moving, its clock running) measures the gap.
    c.console("a", "nc-nettest udp-recv 7200 &")?;
    c.console("c", "nc-nettest udp-recv 7201 &")?;
    c.wait_line("a", "NOVACRON-UDP", 1).await?;
    c.console("c", &format!("nc-nettest udp-send {} 7200 100 &", ips["a"]))?;
    c.console("a", &format!("nc-nettest udp-send {} 7201 100 &", ips["c"]))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut gaps = Vec::new();
    for (to, strategy) in [
        ("node-1", MigrationStrategy::Precopy),
        ("node-2", MigrationStrategy::Postcopy),
    ] {
        let a_before = logs(&client, "a").await;
        let a_lines = a_before.lines().filter(|l| l.starts_with("NOVACRON-UDP")).count();
        let last_of = |log: &str, key: &str| {
            log.lines()
                .rev()
                .find(|l| l.starts_with("NOVACRON-UDP"))
                .and_then(|l| figure(l, key))
                .unwrap_or(0.0)
        };
        let lost_at_a = last_of(&a_before, "lost");
        let c_log = logs(&client, "c").await;
        let lost_at_c = last_of(&c_log, "lost");
        let m: Migration = client
            .create_migration(&CreateMigration {
                vm: "c".into(),
                target_node: Some(to.into()),
                strategy,
                max_downtime_ms: None,
                bandwidth_mib_s: None,
                transport: None,
            })
            .await?;
        let done = novacron_bench::migration_ended(&client, &m.metadata.name, Duration::from_secs(300)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let a_log = logs(&client, "a").await;
        let gap = a_log
            .lines()
            .filter(|l| l.starts_with("NOVACRON-UDP"))
            .skip(a_lines)
            .filter_map(|l| figure(l, "gap_ms"))
            .fold(0.0, f64::max);
        let c_log = logs(&client, "c").await;
        gaps.push(serde_json::json!({
            "strategy": format!("{strategy:?}").to_lowercase(),
            "phase": format!("{:?}", done.status.phase),
            "transport": done.status.transport.map(|t| format!("{t:?}").to_lowercase()),
            "downtime_ms": done.status.downtime_ms,
            "lost_c_to_a": last_of(&a_log, "lost") - lost_at_a,
            "lost_a_to_c": last_of(&c_log, "lost") - lost_at_c,
            "longest_gap_ms": gap,
        }));
    }

    let baseline = rows[0].mbit_s;
    let mut md = String::from(
        "# VM network benchmark\n\n`bash bench/network.sh` — one run, two hosts (network namespaces on one underlay bridge), TCG guests (1 vCPU, 256 MiB), \
         the same probe (`nc-nettest`, which checks every byte it receives) on hosts and guests.\n\n\
         | path | TCP Mbit/s | vs host | round trip ms | guest CPU |\n|---|---:|---:|---:|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.2}x | {:.3} | {} |\n",
            r.path,
            r.mbit_s,
            r.mbit_s / baseline,
            r.rtt_ms,
            r.cpu
        ));
    }
    md.push_str("\n| migration of a VM (while streaming) | transport | downtime ms | longest gap ms | lost to it | lost from it |\n|---|---|---:|---:|---:|---:|\n");
    for g in &gaps {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} |\n",
            g["strategy"].as_str().unwrap_or_default(),
            g["transport"].as_str().unwrap_or("-"),
            g["downtime_ms"],
            g["longest_gap_ms"].as_f64().unwrap_or_default(),
            g["lost_a_to_c"],
            g["lost_c_to_a"],
        ));
    }
    md.push_str("\nThe longest gap is measured by the VM that stays (its clock runs through the other's pause). Targets: cross-host VM throughput ≥ 0.8x the host baseline; gap ≤ downtime + 1 s.\n");
    let results = repo().join("bench/results");
    std::fs::write(results.join("network.md"), &md)?;
    let json = serde_json::json!({
        "paths": rows.iter().map(|r| serde_json::json!({"path": r.path, "mbit_s": r.mbit_s, "rtt_ms": r.rtt_ms, "cpu": r.cpu})).collect::<Vec<_>>(),
        "migrations": gaps,
    });
    std::fs::write(results.join("network.json"), serde_json::to_string_pretty(&json)?)?;
    print!("{md}");
    drop(procs);
    Ok(())
}
