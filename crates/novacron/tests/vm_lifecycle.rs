//! A real TCG guest through its whole life: create (overlay root disk and a
//! data disk), boot marker on the console, placement, console and logs over
//! the CLI, pause/resume, reboot, ACPI stop, start, force stop, delete.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::{wait_until, Cluster, Options};
use novacron_api::{Node, RunStrategy, VmPhase};

const BOOT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn full_lifecycle_on_a_real_guest() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    // Make node-2 the node with the most free memory.
    let out = c
        .cli(&[
            "vm",
            "create",
            "filler",
            "--image",
            "demo",
            "--memory",
            "512MiB",
            "--no-start",
        ])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let filler = c.wait_phase("filler", VmPhase::Stopped, Duration::from_secs(20)).await;
    let busy = filler.status.node.clone().expect("placed");

    let out = c
        .cli(&[
            "vm",
            "create",
            "web",
            "--image",
            "demo",
            "--memory",
            "256MiB",
            "--data-disk",
            "64MiB",
            "--label",
            "app=web",
            "--wait",
            "-o",
            "json",
        ])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vm: novacron_api::Vm = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(vm.status.phase, VmPhase::Running);
    let node = vm.status.node.clone().expect("node");
    assert_ne!(node, busy, "placement should prefer the node with more free memory");
    let pid = vm.status.qemu_pid.expect("pid");
    assert_eq!(vm.status.accel.as_deref(), Some("tcg"));

    // The guest boots, formats its disks and prints its marker.
    let log = c.wait_console("web", "NOVACRON-GUEST-READY name=web", 1, BOOT).await;
    assert!(log.contains("NOVACRON-BOOT count=1"), "{log}");
    assert!(log.contains("NOVACRON-DISK ok"), "{log}");

    // Overlay disks exist in the node's data dir, on top of the cached image.
    let vm_dir = c.dir.path().join(&node).join("vms").join(&vm.metadata.id);
    assert!(vm_dir.join("root.qcow2").exists() && vm_dir.join("data.qcow2").exists());

    // Node accounting includes the VM.
    let n = c.client.get::<Node>(&node).await.expect("node");
    assert_eq!(n.status.allocated.memory_mib, 256);

    // Console: a command typed on the serial console runs in the guest.
    let mut console = c
        .cli(&["vm", "console", "web"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("console");
    console
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"\necho console-$((40+2))\n")
        .expect("type");
    drop(console.stdin.take());
    let out = tokio::task::spawn_blocking(move || console.wait_with_output())
        .await
        .expect("join")
        .expect("console output");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("console-42"),
        "console said: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Logs through the CLI, including --tail.
    let out = c.cli(&["vm", "logs", "web", "--tail", "200"]).output().expect("logs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOVACRON-GUEST-READY"));

    // Pause and resume keep the same process.
    let out = c.cli(&["vm", "pause", "web", "--wait"]).output().expect("pause");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.vm("web").await.status.phase, VmPhase::Paused);
    let out = c.cli(&["vm", "resume", "web", "--wait"]).output().expect("resume");
    assert!(out.status.success());
    assert_eq!(c.vm("web").await.status.qemu_pid, Some(pid));

    // `vm logs --follow` stays open and streams what the guest prints next.
    let mut follow = c
        .cli(&["vm", "logs", "web", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("follow");
    let follow_out = follow.stdout.take().expect("stdout");
    let followed = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(follow_out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("NOVACRON-BOOT count=2"))
    });

    // Reboot: same QEMU, the guest boots a second time (its boot counter lives on the root disk).
    let out = c.cli(&["vm", "reboot", "web"]).output().expect("reboot");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = c.wait_console("web", "NOVACRON-GUEST-READY", 2, BOOT).await;
    assert!(log.contains("NOVACRON-BOOT count=2"), "{log}");
    assert_eq!(c.vm("web").await.status.qemu_pid, Some(pid));
    // The follower saw the second boot arrive (it reads until it does).
    wait_until("the follower to see the reboot", Duration::from_secs(10), || async {
        followed.is_finished().then_some(())
    })
    .await;
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        followed.join().unwrap_or(false),
        "logs --follow did not stream the reboot"
    );

    // Graceful stop through the ACPI power button: well before the 30 s timeout, no force.
    let started = std::time::Instant::now();
    let out = c.cli(&["vm", "stop", "web", "--wait"]).output().expect("stop");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped = c.vm("web").await;
    assert_eq!(stopped.status.phase, VmPhase::Stopped);
    assert!(
        stopped.status.reason.is_none(),
        "graceful stop was forced: {:?}",
        stopped.status.reason
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(c.qemu_pids().is_empty(), "QEMU still running after stop");

    // Start again: the disks persist (third boot).
    let out = c.cli(&["vm", "start", "web", "--wait"]).output().expect("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = c.wait_console("web", "NOVACRON-BOOT count=3", 1, BOOT).await;
    assert!(log.contains("NOVACRON-DISK ok"));

    // Force stop kills at once.
    let out = c
        .cli(&["vm", "stop", "web", "--force", "--wait"])
        .output()
        .expect("force stop");
    assert!(out.status.success());
    assert_eq!(c.vm("web").await.status.reason.as_deref(), Some("Forced off"));
    assert!(c.qemu_pids().is_empty());

    // What happened to it, as events, oldest first: every phase it went through.
    let out = c
        .cli(&["events", "--for", "vm/web", "--last", "0", "-o", "json"])
        .output()
        .expect("events");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<novacron_api::Event> = serde_json::from_slice(&out.stdout).expect("json");
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    let first = |t: &str| {
        topics
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t}: {topics:?}"))
    };
    assert!(first("vm.created") < first("vm.scheduled") && first("vm.scheduled") < first("vm.running"));
    assert!(first("vm.running") < first("vm.paused") && first("vm.paused") < first("vm.stopped"));
    let forced = events.iter().rev().find(|e| e.topic == "vm.stopped").expect("stopped");
    assert_eq!(forced.reason, "Forced off");
    assert_eq!(forced.node.as_deref(), Some(node.as_str()));
    assert!(events.iter().all(|e| e.involved.name == "web"), "{topics:?}");
    let out = c.cli(&["events", "--for", "vm/web"]).output().expect("events");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("vm/web") && table.contains("vm.paused"), "{table}");

    // A rebuild gives the stopped VM a fresh root disk (its boot count starts
    // again at 1); the data disk keeps its marker. A running VM is refused.
    let disk_marker = |log: &str, last: bool| {
        let mut ids = log.lines().filter_map(|l| l.split("NOVACRON-DISK ok id=").nth(1));
        let id = if last { ids.next_back() } else { ids.next() };
        id.map(|s| s.trim().to_string()).expect("disk marker")
    };
    let log = c.logs("web").await;
    let before = disk_marker(&log, false);
    // (The forced-off boot may have been killed before its disk check.)
    let checks_before = log.lines().filter(|l| l.contains("NOVACRON-DISK ok")).count();
    let out = c.cli(&["vm", "rebuild", "web"]).output().expect("rebuild");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.cli(&["vm", "start", "web", "--wait"]).output().expect("start");
    let log = c.wait_console("web", "NOVACRON-BOOT count=1", 2, BOOT).await;
    let after = c.wait_console("web", "NOVACRON-DISK ok", checks_before + 1, BOOT).await;
    assert_eq!(
        disk_marker(&after, true),
        before,
        "the data disk changed in the rebuild"
    );
    assert_eq!(
        log.matches("NOVACRON-MKFS dev=/dev/vda").count(),
        2,
        "the root disk was not made anew"
    );
    let refused = c.cli(&["vm", "rebuild", "web"]).output().expect("rebuild");
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{refused:?}"
    );

    // Start, then delete while running: process, disks and state dir all go.
    c.cli(&["vm", "start", "web", "--wait"]).output().expect("start");
    assert_eq!(c.qemu_pids().len(), 1);
    let out = c.cli(&["vm", "delete", "web", "--wait"]).output().expect("delete");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c
        .client
        .get::<novacron_api::Vm>("web")
        .await
        .map_err(|e| e.is_not_found())
        .err()
        .unwrap_or(false));
    assert!(c.qemu_pids().is_empty(), "QEMU left after delete");
    assert!(!vm_dir.exists(), "VM directory left after delete");

    // A stopped VM that was never started deletes cleanly too.
    c.cli(&["vm", "delete", "filler", "--wait"]).output().expect("delete");
    wait_until("filler gone", Duration::from_secs(10), || async {
        c.client
            .get::<novacron_api::Vm>("filler")
            .await
            .err()
            .filter(|e| e.is_not_found())
            .map(|_| ())
    })
    .await;

    // A forced delete removes the record at once; the agent still stops the
    // QEMU and removes the VM's files.
    c.create_vm("forced", 128, RunStrategy::Manual, false).await;
    let forced = c.wait_phase("forced", VmPhase::Running, BOOT).await;
    let forced_dir = c
        .dir
        .path()
        .join(forced.status.node.clone().expect("node"))
        .join("vms")
        .join(&forced.metadata.id);
    let out = c
        .cli(&["vm", "delete", "forced", "--force", "--wait"])
        .output()
        .expect("delete");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(
        "the forced-deleted VM's QEMU and files to go",
        Duration::from_secs(20),
        || async { (c.qemu_pids().is_empty() && !forced_dir.exists()).then_some(()) },
    )
    .await;
}
