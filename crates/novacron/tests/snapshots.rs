//! Snapshots of a busybox guest's disks: the guest counts its boots on the
//! root disk and keeps files on the data disk, so each revert shows in what
//! it prints at the next boot. Snapshots move with the VM in a cold and a
//! live migration and stay usable there; deleting one keeps the others and
//! the disks as they read; one taken of the running VM holds what the disks
//! had at that instant; one with memory resumes the guest where it was.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::guestnet::{cli_fails, guest_run, guest_value, post, wait_console_answers};
use common::{ok, wait_until, Cluster, Options};
use novacron_api::{RunStrategy, Snapshot, VmPhase};

const BOOT: Duration = Duration::from_secs(120);
const GUEST: Duration = Duration::from_secs(60);

async fn snapshots(c: &Cluster, vm: &str) -> Vec<(String, Option<String>, bool)> {
    let all: Vec<Snapshot> = c
        .client
        .get_json(&format!("vms/{vm}/snapshots"))
        .await
        .expect("list snapshots");
    all.into_iter().map(|s| (s.name, s.parent, s.current)).collect()
}

fn snap(name: &str, parent: Option<&str>, current: bool) -> (String, Option<String>, bool) {
    (name.into(), parent.map(str::to_string), current)
}

/// Starts the VM for its `boot`-th time and waits until the guest is ready
/// (it has checked its data disk) and has said its boot count is `count`
/// for the `n`-th time.
async fn boots_with_count(c: &Cluster, vm: &str, boot: usize, count: u32, n: usize) {
    ok(c.cli(&["vm", "start", vm, "--wait"]).output().expect("cli"));
    c.wait_console(vm, "NOVACRON-GUEST-READY", boot, BOOT).await;
    c.wait_console(vm, &format!("NOVACRON-BOOT count={count}"), n, BOOT)
        .await;
}

fn stop(c: &Cluster, vm: &str) {
    ok(c.cli(&["vm", "stop", vm, "--wait"]).output().expect("cli"));
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_revert_each_point_and_move_with_the_vm() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("keeper", 128, RunStrategy::Manual, true).await;
    let vm = c.wait_phase("keeper", VmPhase::Running, BOOT).await;
    c.wait_console("keeper", "NOVACRON-BOOT count=1", 1, BOOT).await;
    c.wait_console("keeper", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let home = vm.status.node.clone().expect("node");
    let away = if home == "node-1" { "node-2" } else { "node-1" };

    // Reverting a running VM is refused.
    let (got, err) = post(&c, "vms/keeper/snapshots/any/revert", serde_json::json!({})).await;
    assert_eq!(got, 409, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap_or("").contains("stop it first"),
        "{err}"
    );
    stop(&c, "keeper");
    assert!(snapshots(&c, "keeper").await.is_empty());

    // first: boot count 1, no file on the data disk.
    let taken = ok(c
        .cli(&[
            "vm",
            "snapshot",
            "create",
            "keeper",
            "first",
            "--description",
            "one boot",
        ])
        .output()
        .expect("cli"));
    assert!(taken.contains("first") && taken.contains("root,data"), "{taken}");
    cli_fails(
        &c,
        &["vm", "snapshot", "create", "keeper", "first"],
        "already has a snapshot",
    );
    cli_fails(&c, &["vm", "snapshot", "create", "keeper", "Bad"], "invalid name");
    cli_fails(
        &c,
        &["vm", "snapshot", "revert", "keeper", "nope"],
        "no snapshot \"nope\"",
    );
    cli_fails(
        &c,
        &["vm", "snapshot", "delete", "keeper", "nope"],
        "no snapshot \"nope\"",
    );
    let (got, err) = post(&c, "vms/keeper/snapshots", serde_json::json!({"name": "x", "extra": 1})).await;
    assert_eq!(got, 422, "{err}");

    // second: boot count 2, a file on the data disk.
    boots_with_count(&c, "keeper", 2, 2, 1).await;
    let wrote = guest_run(&c, "keeper", "w", "echo two > /mnt/data/after && sync", GUEST).await;
    assert_eq!(wrote, "RESULT-w rc=0");
    stop(&c, "keeper");
    ok(c.cli(&["vm", "snapshot", "create", "keeper", "second"])
        .output()
        .expect("cli"));
    assert_eq!(
        snapshots(&c, "keeper").await,
        [snap("first", None, false), snap("second", Some("first"), true)]
    );
    boots_with_count(&c, "keeper", 3, 3, 1).await;
    stop(&c, "keeper");

    // Back to first: the third boot and the file are gone.
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "first"])
        .output()
        .expect("cli"));
    boots_with_count(&c, "keeper", 4, 2, 2).await;
    let file = guest_value(&c, "keeper", "f1", "cat /mnt/data/after 2>/dev/null || echo none").await;
    assert_eq!(file, "none");
    stop(&c, "keeper");
    wait_until("vm get to show the snapshots", GUEST, || async {
        let shown = c.vm("keeper").await.status.snapshots;
        (shown.len() == 2 && shown[0].current).then_some(())
    })
    .await;

    // A cold migration carries the snapshots; second is usable there.
    ok(c.cli(&["vm", "migrate", "keeper", "--to", away, "--wait"])
        .output()
        .expect("cli"));
    assert_eq!(c.vm("keeper").await.status.node.as_deref(), Some(away));
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "second"])
        .output()
        .expect("cli"));
    boots_with_count(&c, "keeper", 5, 3, 2).await;
    let file = guest_value(&c, "keeper", "f2", "cat /mnt/data/after 2>/dev/null || echo none").await;
    assert_eq!(file, "two");
    let wrote = guest_run(&c, "keeper", "w2", "echo three > /mnt/data/live && sync", GUEST).await;
    assert_eq!(wrote, "RESULT-w2 rc=0");

    // A live migration carries them too, and the disks read the same there
    // (what second holds, and what was written on top of it); first is
    // usable back home.
    ok(c.cli(&["vm", "migrate", "keeper", "--to", &home, "--wait"])
        .output()
        .expect("cli"));
    assert_eq!(c.vm("keeper").await.status.node.as_deref(), Some(home.as_str()));
    wait_console_answers(&c, "keeper").await;
    let files = guest_value(
        &c,
        "keeper",
        "f-moved",
        "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/after /mnt/data/live | tr '\\n' ' '",
    )
    .await;
    assert_eq!(files, "two three");
    stop(&c, "keeper");
    let listed = ok(c.cli(&["vm", "snapshot", "list", "keeper"]).output().expect("cli"));
    assert!(listed.contains("first") && listed.contains("second"), "{listed}");
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "first"])
        .output()
        .expect("cli"));
    boots_with_count(&c, "keeper", 6, 2, 3).await;
    stop(&c, "keeper");

    // Deleting the current snapshot merges it into the disks (the boot
    // count goes on from 2) and into second, which still reverts.
    ok(c.cli(&["vm", "snapshot", "delete", "keeper", "first"])
        .output()
        .expect("cli"));
    assert_eq!(snapshots(&c, "keeper").await, [snap("second", None, false)]);
    boots_with_count(&c, "keeper", 7, 3, 3).await;
    stop(&c, "keeper");
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "second"])
        .output()
        .expect("cli"));
    boots_with_count(&c, "keeper", 8, 3, 4).await;
    let file = guest_value(&c, "keeper", "f3", "cat /mnt/data/after 2>/dev/null || echo none").await;
    assert_eq!(file, "two");

    // A snapshot of the running VM, then a write after it; a live migration
    // mirrors from the overlay QEMU writes now; reverting drops the write.
    ok(c.cli(&["vm", "snapshot", "create", "keeper", "running"])
        .output()
        .expect("cli"));
    let wrote = guest_run(&c, "keeper", "w3", "echo late > /mnt/data/late && sync", GUEST).await;
    assert_eq!(wrote, "RESULT-w3 rc=0");
    ok(c.cli(&["vm", "migrate", "keeper", "--to", away, "--wait"])
        .output()
        .expect("cli"));
    wait_console_answers(&c, "keeper").await;
    let files = guest_value(
        &c,
        "keeper",
        "f-late",
        "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/after /mnt/data/late | tr '\\n' ' '",
    )
    .await;
    assert_eq!(files, "two late");
    stop(&c, "keeper");
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "running"])
        .output()
        .expect("cli"));
    boots_with_count(&c, "keeper", 9, 4, 1).await;
    let file = guest_value(&c, "keeper", "f4", "cat /mnt/data/late 2>/dev/null || echo none").await;
    assert_eq!(file, "none");
    let log = c.logs("keeper").await;
    assert!(!log.contains("NOVACRON-DISK MISMATCH"), "{log}");

    // A snapshot with memory: what only RAM holds (the guest's root file
    // system is its initramfs) is back after a cold migration and a revert,
    // which starts the VM where it was instead of booting it.
    let wrote = guest_run(
        &c,
        "keeper",
        "m1",
        "echo before > /tmp/in-ram && echo d1 > /mnt/data/mem && sync",
        GUEST,
    )
    .await;
    assert_eq!(wrote, "RESULT-m1 rc=0");
    let taken = ok(c
        .cli(&["vm", "snapshot", "create", "keeper", "mem", "--memory"])
        .output()
        .expect("cli"));
    assert!(taken.contains("mem") && taken.contains(" MiB"), "{taken}");
    let wrote = guest_run(
        &c,
        "keeper",
        "m2",
        "echo after > /tmp/in-ram && echo d2 > /mnt/data/mem && sync",
        GUEST,
    )
    .await;
    assert_eq!(wrote, "RESULT-m2 rc=0");
    stop(&c, "keeper");
    cli_fails(
        &c,
        &["vm", "snapshot", "create", "keeper", "mem2", "--memory"],
        "memory snapshots save a running guest",
    );
    ok(c.cli(&["vm", "migrate", "keeper", "--to", &home, "--wait"])
        .output()
        .expect("cli"));
    let boots = || async { c.logs("keeper").await.matches("NOVACRON-BOOT").count() };
    let boots_before = boots().await;
    ok(c.cli(&["vm", "snapshot", "revert", "keeper", "mem"])
        .output()
        .expect("cli"));
    c.wait_phase("keeper", VmPhase::Running, BOOT).await;
    wait_console_answers(&c, "keeper").await;
    let state = guest_value(&c, "keeper", "m3", "cat /tmp/in-ram /mnt/data/mem | tr '\\n' ' '").await;
    assert_eq!(state, "before d1");
    assert_eq!(boots().await, boots_before, "the guest booted instead of resuming");
}
