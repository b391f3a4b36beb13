//! Live migration on real TCG guests between two agents with separate data
//! dirs (no shared storage): memory and disks move, the guest's memory
//! workload and disk marker stay intact, failures and cancels leave the VM
//! running on the source with nothing left on the target.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use novacron_client::Selector;
use std::time::Duration;

use common::{wait_until, Cluster, Options};
use futures::StreamExt;
use novacron_api::{
    CreateMigration, Migration, MigrationPhase, MigrationStepKind, MigrationStrategy, MigrationTransport, RunStrategy,
    Vm, VmPhase,
};

const BOOT: Duration = Duration::from_secs(120);
const WORKLOAD: &str = "novacron.workload=64 novacron.dirty_rate=20 novacron.report_s=1";

/// The highest workload generation reported so far, and whether any report had errors.
fn workload_state(log: &str) -> (u64, bool) {
    let mut gen = 0;
    let mut errors = false;
    for line in log.lines().filter(|l| l.contains("NOVACRON-WORKLOAD gen=")) {
        for field in line.split_whitespace() {
            if let Some(g) = field.strip_prefix("gen=") {
                gen = gen.max(g.parse().unwrap_or(0));
            }
            if let Some(e) = field.strip_prefix("errors=") {
                errors |= e != "0";
            }
        }
    }
    (gen, errors || log.contains("NOVACRON-WORKLOAD-ERROR"))
}

/// The other node of a two-node cluster.
fn other_node(node: &str) -> &'static str {
    if node == "node-1" {
        "node-2"
    } else {
        "node-1"
    }
}

/// A two-node cluster with one VM running the memory workload (and a data
/// disk), once the workload reports.
async fn busy_vm(name: &str) -> (Cluster, Vm) {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm_with_args(name, 256, RunStrategy::Manual, true, Some(WORKLOAD))
        .await;
    let vm = c.wait_phase(name, VmPhase::Running, BOOT).await;
    c.wait_console(name, "NOVACRON-WORKLOAD gen=", 1, BOOT).await;
    (c, vm)
}

/// The id the guest printed for its data-disk marker file.
fn disk_marker(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split("NOVACRON-DISK ok id=").nth(1))
        .map(|s| s.trim().to_string())
        .expect("disk marker")
}

/// A watch on migrations, from now.
async fn migration_watch(c: &Cluster) -> novacron_client::WatchStream<Migration> {
    let rev = c
        .client
        .list::<Migration>(&Default::default())
        .await
        .expect("list")
        .resource_version;
    c.client
        .watch::<Migration>(rev, &Selector::everything())
        .await
        .expect("watch")
}

/// Pre-copy through the CLI with its progress bar; the command must succeed.
async fn cli_precopy(c: &Cluster, vm: &str, to: &str) {
    let args = [
        "vm",
        "migrate",
        vm,
        "--to",
        to,
        "--strategy",
        "precopy",
        "--max-downtime",
        "500ms",
        "--wait",
    ];
    let out = c.cli(&args).output().expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn migrate(c: &Cluster, vm: &str, to: &str, strategy: MigrationStrategy, bandwidth: Option<u64>) -> Migration {
    c.client
        .create_migration(&CreateMigration {
            vm: vm.into(),
            target_node: Some(to.into()),
            strategy,
            max_downtime_ms: None,
            bandwidth_mib_s: bandwidth,
            transport: None,
        })
        .await
        .expect("create migration")
}

async fn wait_transferring(c: &Cluster, name: &str) -> Migration {
    let client = c.client.clone();
    wait_until(
        &format!("migration {name} to transfer memory"),
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let name = name.to_string();
            async move {
                client
                    .get::<Migration>(&name)
                    .await
                    .ok()
                    .filter(|m| m.status.phase == MigrationPhase::Transferring && m.status.progress.total_bytes > 0)
            }
        },
    )
    .await
}

/// A guest rewriting and checking 64 MiB moves with pre-copy and back with
/// post-copy without a single mismatch. Needs QEMU >= 10 (scripts/setup.sh):
/// Debian 12's QEMU 7.2 loses guest stores under TCG migration when the CPU
/// is contended (reproduced without NovaCron by
/// `scripts/plain-qemu-migration-check.py`).
#[tokio::test(flavor = "multi_thread")]
async fn busy_guest_memory_survives_migration() {
    let (c, busy) = busy_vm("busy").await;
    let source = busy.status.node.clone().expect("node");
    let other = other_node(&source);
    let log = c.wait_console("busy", "NOVACRON-WORKLOAD gen=", 2, BOOT).await;
    let disk_id = disk_marker(&log);

    // Progress shows up on the watch stream.
    let mut watch = migration_watch(&c).await;

    // Busy guest, pre-copy, through the CLI with a progress bar.
    cli_precopy(&c, "busy", other).await;
    let vm = c.vm("busy").await;
    assert_eq!(vm.status.node.as_deref(), Some(other));
    assert_eq!(vm.status.phase, VmPhase::Running);
    assert!(
        c.qemu_pids_on(other).contains(&vm.status.qemu_pid.expect("pid")),
        "VM's QEMU not on the target"
    );
    // The source goes away right after the server records the VM on the target.
    let source_dir = c.dir.path().join(&source).join("vms").join(&vm.metadata.id);
    wait_until(
        "source QEMU and files to be removed",
        Duration::from_secs(15),
        || async { (c.qemu_pids_on(&source).is_empty() && !source_dir.exists()).then_some(()) },
    )
    .await;
    let (migrations, _) = c
        .client
        .list_all::<Migration>(&Selector::everything())
        .await
        .expect("list");
    let m = &migrations[0];
    assert_eq!(m.status.phase, MigrationPhase::Completed);
    assert_eq!(m.status.strategy, Some(MigrationStrategy::Precopy));
    assert!(m.status.downtime_ms.is_some() && m.status.total_time_ms.is_some());
    assert!(m.status.bytes_sent.unwrap_or(0) > 64 << 20, "{:?}", m.status);
    assert!(m.status.progress.disk_total_bytes > 0, "disks were not mirrored");
    let mut progress_events = 0;
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
        let p = &ev.object.status.progress;
        if ev.object.status.phase == MigrationPhase::Transferring
            && (p.transferred_bytes > 0 || p.disk_transferred_bytes > 0)
        {
            progress_events += 1;
        }
    }
    assert!(progress_events > 0, "no progress on the watch stream");
    // Its start and end are events of the migration, with where and how long.
    let (events, _) = c
        .client
        .list_all::<novacron_api::Event>(&Selector::fields(format!(
            "involved.kind=migration,involved.name={}",
            m.metadata.name
        )))
        .await
        .expect("events");
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(topics, ["migration.started", "migration.completed"]);
    // Without --otlp-endpoint no trace is made.
    assert_eq!(m.spec.trace_parent, None);
    let done = &events[1].message;
    assert!(
        done.starts_with(&format!("Moved VM busy from {source} to {other}")) && done.contains("downtime"),
        "{done}"
    );

    // The guest keeps running on the target: new workload reports, no mismatch.
    let (gen_before, _) = workload_state(&c.logs("busy").await);
    let log = wait_until("workload to progress on the target", BOOT, || async {
        let log = c.logs("busy").await;
        (workload_state(&log).0 > gen_before).then_some(log)
    })
    .await;
    assert!(!workload_state(&log).1, "memory corruption after migration:\n{log}");

    // And back with post-copy.
    let m = migrate(&c, "busy", &source, MigrationStrategy::Postcopy, None).await;
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(180)).await;
    assert_eq!(m.status.phase, MigrationPhase::Completed, "{:?}", m.status.error);
    assert_eq!(c.vm("busy").await.status.node.as_deref(), Some(source.as_str()));
    let other_dir = c.dir.path().join(other).join("vms").join(&vm.metadata.id);
    wait_until("post-copy source to be removed", Duration::from_secs(15), || async {
        (!other_dir.exists()).then_some(())
    })
    .await;
    let (gen_before, _) = workload_state(&c.logs("busy").await);
    let log = wait_until("workload to progress after post-copy", BOOT, || async {
        let log = c.logs("busy").await;
        (workload_state(&log).0 > gen_before).then_some(log)
    })
    .await;
    assert!(!workload_state(&log).1, "memory corruption after post-copy:\n{log}");

    // The disks came along: after a reboot the guest finds its root disk's
    // boot counter and the data disk's marker file.
    c.cli(&["vm", "reboot", "busy"]).output().expect("reboot");
    c.wait_console("busy", "NOVACRON-BOOT count=2", 1, BOOT).await;
    let log = wait_until("disk marker after reboot", BOOT, || async {
        let log = c.logs("busy").await;
        (log.matches("NOVACRON-DISK ok").count() >= 2).then_some(log)
    })
    .await;
    assert!(log.contains(&format!("NOVACRON-DISK ok id={disk_id}")), "{log}");
    assert!(!log.contains("MISMATCH"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_and_cancelled_migrations_leave_the_vm_on_the_source() {
    let (mut c, vm) = busy_vm("stay").await;
    let source = vm.status.node.clone().expect("node");
    let target = other_node(&source).to_string();
    let pid = vm.status.qemu_pid.expect("pid");
    let target_vm_dir = c.dir.path().join(&target).join("vms").join(&vm.metadata.id);
    // A slow link (8 MiB/s) keeps the transfer going long enough to interfere.
    let slow = Some(8);

    let assert_on_source = |c: &Cluster, what: &str| {
        assert!(c.qemu_pids_on(&target).is_empty(), "{what}: QEMU left on the target");
        assert_eq!(c.qemu_pids_on(&source), vec![pid], "{what}: source QEMU changed");
    };

    // 1. Cancel during transfer.
    let m = migrate(&c, "stay", &target, MigrationStrategy::Precopy, slow).await;
    wait_transferring(&c, &m.metadata.name).await;
    let out = c.cli(&["migration", "cancel", &m.metadata.name]).output().expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(60)).await;
    assert_eq!(m.status.phase, MigrationPhase::Cancelled);
    c.wait_phase("stay", VmPhase::Running, Duration::from_secs(10)).await;
    assert_on_source(&c, "cancel");
    assert!(!target_vm_dir.exists(), "cancel left files on the target");

    // 2. The target QEMU dies during transfer.
    let m = migrate(&c, "stay", &target, MigrationStrategy::Precopy, slow).await;
    wait_transferring(&c, &m.metadata.name).await;
    for p in c.qemu_pids_on(&target) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    }
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(60)).await;
    assert_eq!(m.status.phase, MigrationPhase::Failed);
    assert!(m.status.error.is_some());
    let vm = c.wait_phase("stay", VmPhase::Running, Duration::from_secs(10)).await;
    assert_eq!(vm.status.node.as_deref(), Some(source.as_str()));
    assert_on_source(&c, "target QEMU killed");
    assert!(!target_vm_dir.exists(), "failed migration left files on the target");

    // 3. The target agent dies during transfer.
    let m = migrate(&c, "stay", &target, MigrationStrategy::Precopy, slow).await;
    wait_transferring(&c, &m.metadata.name).await;
    c.kill_agent(&target);
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(60)).await;
    assert_eq!(m.status.phase, MigrationPhase::Failed);
    let error = m.status.error.as_deref().unwrap_or("");
    assert!(error.contains("unreachable"), "{error}");
    assert_eq!(error.matches("Target agent").count(), 1, "{error}");
    c.wait_phase("stay", VmPhase::Running, Duration::from_secs(10)).await;
    // The target QEMU exits by itself once its incoming stream is cancelled.
    wait_until("target QEMU to exit", Duration::from_secs(20), || async {
        c.qemu_pids_on(&target).is_empty().then_some(())
    })
    .await;
    assert_on_source(&c, "target agent killed");
    // Its files go when the agent comes back.
    c.restart_agent(&target);
    wait_until(
        "target agent to remove the leftovers",
        Duration::from_secs(30),
        || async { (!target_vm_dir.exists()).then_some(()) },
    )
    .await;

    // The guest never noticed.
    let log = c.logs("stay").await;
    assert!(!workload_state(&log).1, "memory corruption:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_migrations_are_rejected_before_anything_starts() {
    let mut c = Cluster::start(Options {
        agents: 2,
        node_grace: "3s",
        ..Default::default()
    })
    .await;
    c.add_agent("tiny", 4, "128MiB", "1s").await;
    c.import_demo().await;
    c.create_vm("vm", 256, RunStrategy::Manual, false).await;
    let vm = c.wait_phase("vm", VmPhase::Running, BOOT).await;
    let source = vm.status.node.clone().expect("node");
    let other = other_node(&source);
    let api = c.client.clone();
    let try_migrate = |to: &str| {
        let client = api.clone();
        let to = to.to_string();
        async move {
            client
                .create_migration(&CreateMigration {
                    vm: "vm".into(),
                    target_node: Some(to),
                    strategy: MigrationStrategy::Precopy,
                    max_downtime_ms: None,
                    bandwidth_mib_s: None,
                    transport: None,
                })
                .await
                .map_err(|e| e.status())
        }
    };
    assert_eq!(try_migrate(&source).await.err(), Some(Some(422)), "same node");
    assert_eq!(try_migrate("nope").await.err(), Some(Some(422)), "unknown node");
    assert_eq!(try_migrate("tiny").await.err(), Some(Some(422)), "too small");
    c.cli(&["node", "cordon", other]).output().expect("cordon");
    assert_eq!(try_migrate(other).await.err(), Some(Some(422)), "cordoned");
    c.cli(&["node", "uncordon", other]).output().expect("uncordon");
    let agent_pid = nix::unistd::Pid::from_raw(c.agent(other).child.id() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
    let client = c.client.clone();
    wait_until("node NotReady", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            client
                .get::<novacron_api::Node>(other)
                .await
                .ok()
                .filter(|n| !n.status.ready)
        }
    })
    .await;
    assert_eq!(try_migrate(other).await.err(), Some(Some(422)), "NotReady");
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT).expect("cont");
    // A Failed VM (its QEMU died) can move neither live nor cold.
    let pid = c.vm("vm").await.status.qemu_pid.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    c.wait_phase("vm", VmPhase::Failed, Duration::from_secs(10)).await;
    assert_eq!(try_migrate(other).await.err(), Some(Some(409)), "failed VM");
    // Nothing was created, and the VM never left its node.
    assert!(c
        .client
        .list_all::<Migration>(&Selector::everything())
        .await
        .expect("list")
        .0
        .is_empty());
    assert_eq!(c.client.get::<Vm>("vm").await.expect("vm").status.node, Some(source));
}

#[tokio::test(flavor = "multi_thread")]
async fn live_migration_moves_disks_and_state() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("mover", 256, RunStrategy::Always, true).await;
    let vm = c.wait_phase("mover", VmPhase::Running, BOOT).await;
    let log = c.wait_console("mover", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let disk_id = disk_marker(&log);
    let source = vm.status.node.clone().expect("node");
    let other = other_node(&source);
    let mut watch = migration_watch(&c).await;

    // Pre-copy through the CLI, with a progress bar.
    cli_precopy(&c, "mover", other).await;
    let moved = c.vm("mover").await;
    assert_eq!(
        (moved.status.node.as_deref(), moved.status.phase),
        (Some(other), VmPhase::Running)
    );
    assert!(c.qemu_pids_on(other).contains(&moved.status.qemu_pid.expect("pid")));
    // Same virtual hardware on the target: the machine type and CPU model the VM recorded.
    let machine = vm.spec.machine.clone().expect("machine");
    assert!(machine.starts_with("pc-i440fx-"), "{machine}");
    assert_eq!(
        (&moved.spec.machine, &moved.spec.cpu_model),
        (&vm.spec.machine, &vm.spec.cpu_model)
    );
    let pid = moved.status.qemu_pid.expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&format!("-machine {machine} -cpu qemu64")),
        "{cmdline}"
    );
    let source_dir = c.dir.path().join(&source).join("vms").join(&vm.metadata.id);
    wait_until(
        "source QEMU and files to be removed",
        Duration::from_secs(15),
        || async { (c.qemu_pids_on(&source).is_empty() && !source_dir.exists()).then_some(()) },
    )
    .await;
    let (migrations, _) = c
        .client
        .list_all::<Migration>(&Selector::everything())
        .await
        .expect("list");
    let m = &migrations[0];
    assert_eq!(m.status.phase, MigrationPhase::Completed);
    // DWCP carried it (the default between agents with certificates), with a prediction.
    assert_eq!(m.status.transport, Some(MigrationTransport::Dwcp), "{:?}", m.status);
    let first = m.status.dwcp.clone().expect("DWCP figures");
    // The guest's pause runs from the source's stop to the target's resume, which QEMU's own figure leaves out.
    let (paused, qemu_paused) = (m.status.downtime_ms, m.status.qemu_downtime_ms);
    assert!(
        paused.zip(qemu_paused).is_some_and(|(p, q)| p >= q && p < 10_000),
        "{paused:?} {qemu_paused:?}"
    );
    assert!(
        first.pages > 0 && first.wire_bytes > 0 && first.wire_bytes < first.raw_bytes,
        "{first:?}"
    );
    assert!(m
        .status
        .prediction
        .as_ref()
        .is_some_and(|p| p.total_s > 0.0 && p.link_bytes_s > 0.0));
    assert!(
        m.status.downtime_ms.is_some() && m.status.total_time_ms.is_some(),
        "{:?}",
        m.status
    );
    assert!(
        m.status.bytes_sent.unwrap_or(0) > 0 && m.status.progress.disk_total_bytes > 0,
        "{:?}",
        m.status
    );
    // The timeline: every step of a DWCP live migration, ended, in order of
    // start, within the migration's time, the target's preparation beside the
    // measurement rather than after it.
    let timeline = &m.status.timeline;
    let step = |k: MigrationStepKind| {
        timeline
            .iter()
            .find(|s| s.step == k)
            .unwrap_or_else(|| panic!("no {k} in {timeline:?}"))
    };
    for k in [
        MigrationStepKind::SessionOpen,
        MigrationStepKind::MemorySample,
        MigrationStepKind::DirtyRate,
        MigrationStepKind::LinkProbe,
        MigrationStepKind::PrepareTarget,
        MigrationStepKind::ImageFetch,
        MigrationStepKind::QemuStart,
        MigrationStepKind::DiskMirror,
        MigrationStepKind::MemoryPasses,
        MigrationStepKind::Switchover,
        MigrationStepKind::TargetFinish,
        MigrationStepKind::SessionClose,
    ] {
        let s = step(k);
        let end = s.start_ms + s.duration_ms.unwrap_or_else(|| panic!("{k} never ended: {timeline:?}"));
        assert!(
            end <= m.status.total_time_ms.unwrap_or(0) + 50,
            "{k} ends after the migration: {timeline:?}"
        );
    }
    assert!(
        timeline.windows(2).all(|w| w[0].start_ms <= w[1].start_ms),
        "{timeline:?}"
    );
    // The target is prepared while the link is probed (the two start
    // together, in either order), not after it.
    let end = |s: &novacron_api::MigrationStep| s.start_ms + s.duration_ms.unwrap_or(0);
    let (prepare, probe) = (
        step(MigrationStepKind::PrepareTarget),
        step(MigrationStepKind::LinkProbe),
    );
    assert!(
        prepare.start_ms < end(probe) && probe.start_ms < end(prepare),
        "the target preparation and the link probe do not overlap: {timeline:?}"
    );
    assert!(
        step(MigrationStepKind::DiskMirror).start_ms < step(MigrationStepKind::MemoryPasses).start_ms,
        "{timeline:?}"
    );
    let mut progress_events = 0;
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
        let p = &ev.object.status.progress;
        if ev.object.status.phase == MigrationPhase::Transferring
            && (p.transferred_bytes > 0 || p.disk_transferred_bytes > 0)
        {
            progress_events += 1;
        }
    }
    assert!(progress_events > 0, "no progress on the watch stream");
    // The console history came along.
    assert!(c.logs("mover").await.contains("NOVACRON-GUEST-READY"));

    // Back with post-copy; a run strategy Always VM is not restarted on the source.
    let m = migrate(&c, "mover", &source, MigrationStrategy::Postcopy, None).await;
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(180)).await;
    assert_eq!(m.status.phase, MigrationPhase::Completed, "{:?}", m.status.error);
    assert_eq!(c.vm("mover").await.status.node.as_deref(), Some(source.as_str()));
    let other_dir = c.dir.path().join(other).join("vms").join(&vm.metadata.id);
    wait_until("post-copy source to be removed", Duration::from_secs(15), || async {
        (!other_dir.exists() && c.qemu_pids_on(other).is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(c.qemu_pids_on(other).is_empty(), "VM restarted on the node it left");
    assert_eq!(c.vm("mover").await.status.restarts, 0);

    // The disks moved twice: after a reboot the guest finds its boot counter
    // (root disk) and its marker file (data disk).
    c.cli(&["vm", "reboot", "mover"]).output().expect("reboot");
    let log = c.wait_console("mover", "NOVACRON-BOOT count=2", 1, BOOT).await;
    let log = if log.matches("NOVACRON-DISK ok").count() >= 2 {
        log
    } else {
        c.wait_console("mover", "NOVACRON-DISK ok", 2, BOOT).await
    };
    assert!(log.contains(&format!("NOVACRON-DISK ok id={disk_id}")), "{log}");
    assert!(!log.contains("MISMATCH"), "{log}");

    // A dry run measures and predicts; nothing moves.
    let out = c
        .cli(&["vm", "migrate", "mover", "--to", other, "--dry-run", "-o", "json"])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: novacron_api::MigrationPlan = serde_json::from_slice(&out.stdout).expect("plan JSON");
    assert_eq!(plan.transport, MigrationTransport::Dwcp);
    assert!(
        plan.prediction.total_s > 0.0 && plan.prediction.wire_bytes > 0,
        "{plan:?}"
    );
    assert!(plan.prediction.reason.contains("predicted"), "{plan:?}");
    assert_eq!(c.vm("mover").await.status.node.as_deref(), Some(source.as_str()));

    // Strategy auto records its choice and why. The same VM moving the same way
    // again finds pages the target's cache kept from the first move.
    let m = migrate(&c, "mover", other, MigrationStrategy::Auto, None).await;
    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(120)).await;
    assert_eq!(m.status.phase, MigrationPhase::Completed, "{:?}", m.status.error);
    assert!(m
        .status
        .strategy_reason
        .clone()
        .unwrap_or_default()
        .starts_with("auto:"));
    let again = m.status.dwcp.expect("DWCP figures");
    assert!(again.pages_known > 0, "no pages reused from the first move: {again:?}");

    // QEMU's own stream stays available as the baseline.
    let out = c
        .cli(&[
            "vm",
            "migrate",
            "mover",
            "--to",
            &source,
            "--transport",
            "qemu",
            "--wait",
        ])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (list, _) = c
        .client
        .list_all::<Migration>(&Selector::everything())
        .await
        .expect("list");
    let last = list.iter().max_by_key(|m| m.status.finished_at).expect("migrations");
    assert_eq!(last.status.transport, Some(MigrationTransport::Qemu));
    assert!(last.status.dwcp.is_none());
    assert_eq!(c.vm("mover").await.status.node.as_deref(), Some(source.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_moves_every_vm_and_reports_what_cannot_move() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    // Put a running and a stopped VM on node-1.
    c.cli(&["node", "cordon", "node-2"]).output().expect("cordon");
    c.create_vm("runner", 128, RunStrategy::Manual, false).await;
    let out = c
        .cli(&[
            "vm",
            "create",
            "sleeper",
            "--image",
            "demo",
            "--memory",
            "128MiB",
            "--data-disk",
            "16MiB",
            "--no-start",
        ])
        .output()
        .expect("cli");
    assert!(out.status.success());
    c.wait_phase("runner", VmPhase::Running, BOOT).await;
    c.wait_phase("sleeper", VmPhase::Stopped, BOOT).await;
    c.cli(&["node", "uncordon", "node-2"]).output().expect("uncordon");

    let out = c
        .cli(&["node", "drain", "node-1", "--parallel", "2"])
        .output()
        .expect("drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("runner: moved to node-2"), "{stdout}");
    assert!(stdout.contains("sleeper: moved to node-2"), "{stdout}");
    assert_eq!(c.vm("runner").await.status.node.as_deref(), Some("node-2"));
    let sleeper = c.vm("sleeper").await;
    assert_eq!(
        (sleeper.status.node.as_deref(), sleeper.status.phase),
        (Some("node-2"), VmPhase::Stopped)
    );
    let node = c.client.get::<novacron_api::Node>("node-1").await.expect("node");
    assert!(!node.spec.schedulable, "drained node must stay cordoned");
    let cold_source = c.dir.path().join("node-1").join("vms").join(&sleeper.metadata.id);
    wait_until("cold source files to be removed", Duration::from_secs(15), || async {
        (!cold_source.exists()).then_some(())
    })
    .await;

    // A VM that fits nowhere else is reported, the command fails, and the VM stays.
    c.cli(&["node", "uncordon", "node-1"]).output().expect("uncordon");
    c.cli(&["node", "cordon", "node-2"]).output().expect("cordon");
    c.create_vm("huge", 1900, RunStrategy::Manual, false).await;
    c.wait_phase("huge", VmPhase::Running, BOOT).await;
    c.cli(&["node", "uncordon", "node-2"]).output().expect("uncordon");
    let out = c.cli(&["node", "drain", "node-1"]).output().expect("drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("huge: not moved"), "{stdout}");
    assert_eq!(c.vm("huge").await.status.node.as_deref(), Some("node-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_migration_moves_a_stopped_vm_that_then_starts_there() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("frozen", 128, RunStrategy::Manual, true).await;
    let vm = c.wait_phase("frozen", VmPhase::Running, BOOT).await;
    let log = c.wait_console("frozen", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let disk_id = disk_marker(&log);
    let out = c.cli(&["vm", "stop", "frozen", "--wait"]).output().expect("stop");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let source = vm.status.node.clone().expect("node");
    let target = other_node(&source);

    let out = c
        .cli(&["vm", "migrate", "frozen", "--to", target, "--wait"])
        .output()
        .expect("migrate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (migrations, _) = c
        .client
        .list_all::<Migration>(&Selector::everything())
        .await
        .expect("list");
    assert_eq!(migrations[0].status.strategy, Some(MigrationStrategy::Cold));
    let moved = c.vm("frozen").await;
    assert_eq!(
        (moved.status.node.as_deref(), moved.status.phase),
        (Some(target), VmPhase::Stopped)
    );
    assert!(c.qemu_pids().is_empty(), "a cold migration must not start the VM");
    let source_dir = c.dir.path().join(&source).join("vms").join(&vm.metadata.id);
    wait_until("source files to be removed", Duration::from_secs(15), || async {
        (!source_dir.exists()).then_some(())
    })
    .await;

    // It starts on the target with its disks: boot counter 2, same data-disk marker.
    let out = c.cli(&["vm", "start", "frozen", "--wait"]).output().expect("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.qemu_pids_on(target).len(), 1);
    c.wait_console("frozen", "NOVACRON-BOOT count=2", 1, BOOT).await;
    let log = c.wait_console("frozen", "NOVACRON-DISK ok", 2, BOOT).await;
    assert!(log.contains(&format!("NOVACRON-DISK ok id={disk_id}")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_restart_during_migration_ends_truthfully() {
    let (mut c, vm) = busy_vm("steady").await;
    let source = vm.status.node.clone().expect("node");
    let target = other_node(&source).to_string();
    // 32 MiB/s against a 20 MiB/s dirty rate: converges, in several seconds.
    let m = migrate(&c, "steady", &target, MigrationStrategy::Precopy, Some(32)).await;
    wait_transferring(&c, &m.metadata.name).await;

    c.kill_server();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.start_server().await;

    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(180)).await;
    let vm = c.wait_phase("steady", VmPhase::Running, Duration::from_secs(30)).await;
    let node = vm.status.node.clone().expect("node");
    let expected = if m.status.phase == MigrationPhase::Completed {
        &target
    } else {
        &source
    };
    assert_eq!(&node, expected, "migration {} but VM on {node}", m.status.phase);
    // Exactly one QEMU, on the node the VM is bound to.
    let elsewhere = if node == source { &target } else { &source };
    wait_until("the other node to have no QEMU", Duration::from_secs(20), || async {
        c.qemu_pids_on(elsewhere).is_empty().then_some(())
    })
    .await;
    assert_eq!(c.qemu_pids_on(&node), vec![vm.status.qemu_pid.expect("pid")]);
}

/// The switchover is decided agent to agent: a server that dies once the
/// disks are in sync and stays down 20 s does not pause the guest longer.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_outage_does_not_lengthen_the_guest_pause() {
    let (mut c, vm) = busy_vm("unbothered").await;
    let source = vm.status.node.clone().expect("node");
    let target = other_node(&source).to_string();
    let m = migrate(&c, "unbothered", &target, MigrationStrategy::Precopy, Some(32)).await;
    wait_transferring(&c, &m.metadata.name).await;

    c.kill_server();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let back = chrono::Utc::now();
    c.start_server().await;

    let m = c.wait_migration_final(&m.metadata.name, Duration::from_secs(180)).await;
    assert_eq!(m.status.phase, MigrationPhase::Completed, "{:?}", m.status.error);
    let finished = m.status.finished_at.expect("finished_at");
    assert!(
        finished < back,
        "the migration ended at {finished}, after the server came back at {back}"
    );
    let paused = m.status.downtime_ms.expect("downtime");
    let qemu = m.status.qemu_downtime_ms.expect("QEMU's downtime");
    eprintln!(
        "guest pause during a 20 s server outage: {paused} ms; QEMU's own downtime {qemu} ms (limit {} ms)",
        m.spec.max_downtime_ms
    );
    // Before, the guest stayed paused for what was left of the outage. The
    // pause is QEMU's downtime plus the target's start, one round trip
    // between the agents on loopback: the outage must add nothing to it.
    // (Under TCG on a loaded 2-core host QEMU's own downtime can pass the
    // limit without any outage, so the bound is QEMU's figure, not the limit.)
    assert!(
        paused <= qemu.max(m.spec.max_downtime_ms) + 500,
        "guest paused {paused} ms during a 20 s server outage, QEMU's own downtime {qemu} ms"
    );
    let vm = c
        .wait_phase("unbothered", VmPhase::Running, Duration::from_secs(30))
        .await;
    assert_eq!(vm.status.node.as_deref(), Some(target.as_str()));
    wait_until("the source QEMU to exit", Duration::from_secs(30), || async {
        c.qemu_pids_on(&source).is_empty().then_some(())
    })
    .await;
}
