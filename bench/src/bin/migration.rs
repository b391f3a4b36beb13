//! Migration benchmark, in one run on loopback between two agents: 256 MiB
//! and 1 GiB TCG guests, idle and busy (guest workload dirtying ~20 MiB/s),
//! each migrated with QEMU's default parameters (max-bandwidth 128 MiB/s,
//! downtime limit 300 ms, pre-copy) and with NovaCron's settings (no
//! bandwidth cap, strategy auto). Disks (overlay + 64 MiB data disk) move too.
//!
//! Run: `bash bench/migration.sh`. Writes bench/results/migration.md.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};
use novacron_api::{CreateMigration, CreateVm, MigrationStrategy, Node, Vm, VmPhase, VmSpec};
use novacron_bench::{import_demo, logs, repo, wait_for, Procs};
use novacron_client::Client;

struct Row {
    memory: &'static str,
    load: &'static str,
    method: &'static str,
    strategy: String,
    total_s: f64,
    downtime_ms: u64,
    memory_bytes: u64,
    disk_bytes: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = repo().join("target/release/novacron");
    let work = tempfile::Builder::new().prefix("nc-migbench-").tempdir_in("/tmp")?;
    let _procs = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("http://127.0.0.1:{port}");
        let mut procs = Procs(Vec::new(), work.path().to_path_buf());
        let sdir = work.path().join("server");
        procs.0.push(
            Command::new(&bin)
                .args([
                    "server",
                    "--data-dir",
                    &sdir.display().to_string(),
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    // Loopback bench: control traffic in plain HTTP, agents on the admin token.
                    "--insecure-http",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(work.path().join("server.log"))?)
                .spawn()?,
        );
        let token = novacron_bench::admin_token(&sdir).await?;
        for n in ["node-1", "node-2"] {
            procs.0.push(
                Command::new(&bin)
                    .args(["agent", "--server", &url, "--token", &token, "--name", n, "--data-dir"])
                    .arg(work.path().join(n))
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
                    .stderr(std::fs::File::create(work.path().join(format!("{n}.log")))?)
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
        let mut rows = Vec::new();
        let mut n = 0;
        for (memory, mib) in [("256 MiB", 256u64), ("1 GiB", 1024)] {
            let loads = [
                ("idle", None),
                ("busy ~20 MiB/s", Some("novacron.workload=64 novacron.dirty_rate=20")),
            ];
            // QEMU's defaults are a 128 MiB/s cap, a 300 ms downtime limit and plain
            // pre-copy. Each method gets a freshly booted VM.
            let methods = [
                ("QEMU defaults", Some(128), MigrationStrategy::Precopy),
                ("NovaCron", None, MigrationStrategy::Auto),
            ];
            for ((load, args), (method, cap, strategy)) in loads.iter().flat_map(|l| methods.map(|m| (*l, m))) {
                n += 1;
                let name = format!("bench-{n}");
                client
                    .create_vm(&CreateVm {
                        name: name.clone(),
                        project: None,
                        labels: Default::default(),
                        no_default_network: false,
                        spec: VmSpec {
                            disk_mib: Some(256),
                            data_disk_mib: Some(64),
                            kernel_args: args.map(str::to_string),
                            ..VmSpec::new("demo", 1, mib)
                        },
                    })
                    .await?;
                let marker = if args.is_some() {
                    "NOVACRON-WORKLOAD gen="
                } else {
                    "NOVACRON-GUEST-READY"
                };
                wait_for("guest", Duration::from_secs(180), || async {
                    logs(&client, &name).await.contains(marker).then_some(())
                })
                .await?;
                {
                    let vm = client.get::<Vm>(&name).await?;
                    let to = if vm.status.node.as_deref() == Some("node-1") {
                        "node-2"
                    } else {
                        "node-1"
                    };
                    let m = client
                        .create_migration(&CreateMigration {
                            vm: name.clone(),
                            target_node: Some(to.into()),
                            strategy,
                            max_downtime_ms: Some(300),
                            bandwidth_mib_s: cap,
                            transport: None,
                        })
                        .await?;
                    let done =
                        novacron_bench::migration_ended(&client, &m.metadata.name, Duration::from_secs(600)).await?;
                    if done.status.phase != novacron_api::MigrationPhase::Completed {
                        bail!("{name} {method}: {:?}", done.status.error);
                    }
                    let row = Row {
                        memory,
                        load,
                        method,
                        strategy: done.status.strategy.map(|s| format!("{s:?}")).unwrap_or_default(),
                        total_s: done.status.total_time_ms.unwrap_or(0) as f64 / 1000.0,
                        downtime_ms: done.status.downtime_ms.unwrap_or(0),
                        memory_bytes: done
                            .status
                            .bytes_sent
                            .unwrap_or(0)
                            .saturating_sub(done.status.progress.disk_total_bytes),
                        disk_bytes: done.status.progress.disk_total_bytes,
                    };
                    eprintln!(
                        "{memory} {load} {method}: {:.2}s downtime {}ms memory {} MiB disk {} MiB",
                        row.total_s,
                        row.downtime_ms,
                        row.memory_bytes >> 20,
                        row.disk_bytes >> 20
                    );
                    rows.push(row);
                    wait_for("VM running on target", Duration::from_secs(60), || async {
                        client
                            .get::<Vm>(&name)
                            .await
                            .ok()
                            .filter(|v| v.status.phase == VmPhase::Running)
                            .map(|_| ())
                    })
                    .await?;
                }
                client.delete_vm(&name, false).await?;
                wait_for("delete", Duration::from_secs(60), || async {
                    client.get::<Vm>(&name).await.is_err().then_some(())
                })
                .await?;
            }
        }
        let mut table = format!(
            "# Migration benchmark\n\nCommand: `bash bench/migration.sh` (release build, TCG guests, loopback between two \
             agents with separate data dirs, 2-core machine). Generated {}.\n\n\
             Each VM has a qcow2 overlay root disk and a 64 MiB data disk; both are mirrored to the target (NBD) \
             before memory moves. \"QEMU defaults\" = QEMU's own migration parameters (max-bandwidth 128 MiB/s, \
             downtime limit 300 ms, pre-copy); \"NovaCron\" = no bandwidth cap, strategy chosen from the measured \
             dirty rate, downtime limit 300 ms. Every row is a freshly booted VM. \"memory MiB\" is QEMU's \
             transferred RAM stream; \"disk MiB\" is the mirror jobs' work (allocated ranges of the overlays, zero \
             ranges included, which cross NBD as write-zeroes).\n\n\
             | guest | load | method | strategy | total s | downtime ms | memory MiB | disk MiB |\n\
             |---|---|---|---|---|---|---|---|\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        for r in &rows {
            table.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {} | {} | {} |\n",
                r.memory,
                r.load,
                r.method,
                r.strategy,
                r.total_s,
                r.downtime_ms,
                r.memory_bytes >> 20,
                r.disk_bytes >> 20
            ));
        }
        let out = repo().join("bench/results/migration.md");
        std::fs::write(&out, &table)?;
        println!("{table}");
        procs
    };
    Ok(())
}
