//! Status tells the truth and nothing is lost across restarts: a killed QEMU
//! is reported Failed (or restarted under run strategy Always), a restarted
//! agent re-adopts its running VMs, a restarted server keeps every object.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::{Duration, Instant};

use common::{wait_until, Cluster, Options};
use novacron_api::{Image, Node, RunStrategy, Vm, VmPhase};

const BOOT: Duration = Duration::from_secs(120);
/// The agent's default heartbeat period: failures must show within it.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_qemu_is_failed_or_restarted() {
    let c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    c.create_vm("manual", 128, RunStrategy::Manual, false).await;
    c.create_vm("always", 128, RunStrategy::Always, false).await;
    let manual = c.wait_phase("manual", VmPhase::Running, BOOT).await;
    let always = c.wait_phase("always", VmPhase::Running, BOOT).await;

    // Manual: Failed with a reason, within one heartbeat period, and it stays down.
    let killed_at = Instant::now();
    kill9(manual.status.qemu_pid.expect("pid"));
    let failed = c.wait_phase("manual", VmPhase::Failed, HEARTBEAT_PERIOD).await;
    let detected = killed_at.elapsed();
    assert!(
        failed
            .status
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("exited unexpectedly"),
        "{:?}",
        failed.status.reason
    );
    assert!(failed.status.qemu_pid.is_none());
    eprintln!("kill -9 detected after {detected:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.vm("manual").await.status.phase,
        VmPhase::Failed,
        "a Manual VM must not restart by itself"
    );

    // Always: restarted with a new process, which boots the guest again.
    c.wait_console("always", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let old_pid = always.status.qemu_pid.expect("pid");
    kill9(old_pid);
    let client = c.client.clone();
    let restarted = wait_until("always to be restarted", HEARTBEAT_PERIOD * 3, || {
        let client = client.clone();
        async move {
            client
                .get::<Vm>("always")
                .await
                .ok()
                .filter(|v| v.status.phase == VmPhase::Running && v.status.qemu_pid.is_some_and(|p| p != old_pid))
        }
    })
    .await;
    assert_eq!(restarted.status.restarts, 1);
    c.wait_console("always", "NOVACRON-GUEST-READY", 2, BOOT).await;

    // The user starts the failed VM again.
    let out = c.cli(&["vm", "start", "manual", "--wait"]).output().expect("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.qemu_pids().len(), 2);
    // Started by hand, it no longer says why it last stopped (the one that
    // restarted by itself still does).
    assert_eq!(c.vm("manual").await.status.reason, None);
    assert!(c
        .vm("always")
        .await
        .status
        .reason
        .is_some_and(|r| r.contains("exited unexpectedly")));
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restart_readopts_running_vms() {
    let mut c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    c.create_vm("keep", 128, RunStrategy::Manual, true).await;
    let vm = c.wait_phase("keep", VmPhase::Running, BOOT).await;
    let pid = vm.status.qemu_pid.expect("pid");
    c.wait_console("keep", "NOVACRON-GUEST-READY", 1, BOOT).await;

    c.kill_agent("node-1");
    // The VM keeps running without its agent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.qemu_pids(), vec![pid]);
    c.restart_agent("node-1");
    let log_path = c.dir.path().join("node-1.log");
    wait_until("agent to adopt the VM", Duration::from_secs(30), || async {
        std::fs::read_to_string(&log_path)
            .ok()
            .filter(|l| l.contains("adopted running QEMU"))
            .map(|_| ())
    })
    .await;
    // Same process, no duplicate, and the agent still controls it.
    assert_eq!(c.qemu_pids(), vec![pid]);
    let vm = c.vm("keep").await;
    assert_eq!((vm.status.phase, vm.status.qemu_pid), (VmPhase::Running, Some(pid)));
    let out = c.cli(&["vm", "pause", "keep", "--wait"]).output().expect("pause");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(&["vm", "resume", "keep", "--wait"]).output().expect("resume");
    assert!(out.status.success());
    assert_eq!(c.qemu_pids(), vec![pid]);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_restart_loses_nothing() {
    let mut c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    c.create_vm("durable", 128, RunStrategy::Manual, false).await;
    let before = c.wait_phase("durable", VmPhase::Running, BOOT).await;
    let image_before = c.client.get::<Image>("demo").await.expect("image");
    let node_before = c.client.get::<Node>("node-1").await.expect("node");

    c.kill_server();
    c.start_server().await;

    let after = c.vm("durable").await;
    assert_eq!(after.metadata.id, before.metadata.id);
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.status.qemu_pid, before.status.qemu_pid);
    assert!(after.metadata.resource_version >= before.metadata.resource_version);
    assert_eq!(
        c.client.get::<Image>("demo").await.expect("image").status,
        image_before.status
    );
    assert_eq!(
        c.client.get::<Node>("node-1").await.expect("node").metadata.id,
        node_before.metadata.id
    );
    // The same admin token still works (the client above used it), and the agent
    // reconnects its watch: a stop issued now takes effect.
    let out = c
        .cli(&["vm", "stop", "durable", "--force", "--wait", "--wait-timeout", "60"])
        .output()
        .expect("stop");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c.qemu_pids().is_empty());
}
