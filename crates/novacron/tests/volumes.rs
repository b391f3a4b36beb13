//! Volumes on real TCG guests across two agents: hot-plugged into a
//! running VM, written, carried along by a live migration, detached,
//! fetched by the other node for another VM, grown online, kept when their
//! VM is deleted; bad requests change nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::guestnet::{cli_fails, delete, guest_run, guest_value, post, vm_on, wait_console_answers};
use common::{ok, wait_until, Cluster, Options};
use novacron_api::{Vm, VmPhase, Volume, VolumePhase};

const BOOT: Duration = Duration::from_secs(120);
const GUEST: Duration = Duration::from_secs(60);

/// The block device (`vdc`) of the volume with `id` inside the busybox
/// guest, found by its serial number; polled until the guest has it.
async fn guest_device(c: &Cluster, vm: &str, id: &str, tag: &str) -> String {
    let serial = novacron_api::volume::serial(id);
    let out = guest_value(
        c,
        vm,
        tag,
        &format!(
            "for i in $(seq 50); do for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ] && echo ${{d##*/}} && break 2; done; usleep 200000; done"
        ),
    )
    .await;
    assert!(
        out.starts_with("vd"),
        "the guest has no disk with serial {serial}: {out:?}"
    );
    out
}

async fn volume(c: &Cluster, name: &str) -> Volume {
    c.client.get::<Volume>(name).await.expect("volume")
}

/// The SHA-256 of the volume's first 4 MiB, as the guest reads it.
async fn checksum(c: &Cluster, vm: &str, dev: &str, tag: &str) -> String {
    guest_value(
        c,
        vm,
        tag,
        &format!("dd if=/dev/{dev} bs=1M count=4 2>/dev/null | sha256sum | cut -c1-64"),
    )
    .await
}

#[tokio::test]
async fn volumes_attach_move_with_their_vm_and_to_other_vms() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    // Both on node-1 (node-2 cordoned meanwhile): a moves to node-2 with
    // the volume, b then fetches it from there.
    ok(c.cli(&["node", "cordon", "node-2"]).output().expect("cli"));
    for name in ["a", "b"] {
        let mut req = vm_on(name, Vec::new(), None);
        // The guest's init formats a blank second disk (vdb) at boot: a data
        // disk takes that place, so a volume present at boot is left alone.
        req.spec.data_disk_mib = Some(16);
        c.client.create_vm(&req).await.expect("create");
    }
    c.wait_phase("a", VmPhase::Running, BOOT).await;
    c.wait_phase("b", VmPhase::Running, BOOT).await;
    ok(c.cli(&["node", "uncordon", "node-2"]).output().expect("cli"));
    c.wait_console("a", "NOVACRON-GUEST-READY", 1, BOOT).await;
    c.wait_console("b", "NOVACRON-GUEST-READY", 1, BOOT).await;

    // Bad input changes nothing.
    for (body, status, field) in [
        (serde_json::json!({"name": "v0", "size_mib": 0}), 422, "size_mib"),
        (serde_json::json!({"name": "Bad_Name", "size_mib": 64}), 422, "name"),
    ] {
        let (got, err) = post(&c, "volumes", body.clone()).await;
        assert_eq!(
            (got, err["error"]["field"].as_str()),
            (status, Some(field)),
            "{body}: {err}"
        );
    }
    ok(c.cli(&["project", "create", "small", "--disk", "100MiB"])
        .output()
        .expect("cli"));
    let (got, err) = post(
        &c,
        "volumes",
        serde_json::json!({"name": "big", "project": "small", "size_mib": 128}),
    )
    .await;
    assert_eq!(
        (got, err["error"]["code"].as_str()),
        (403, Some("quota_exceeded")),
        "{err}"
    );

    ok(c.cli(&["volume", "create", "v1", "--size", "64MiB"])
        .output()
        .expect("cli"));
    cli_fails(&c, &["volume", "create", "v1", "--size", "64MiB"], "already exists");
    let v1 = volume(&c, "v1").await;
    assert_eq!(
        (v1.status.phase, v1.status.node.as_deref()),
        (VolumePhase::Available, None)
    );

    // Hot-plugged into the running VM; the guest writes to it.
    let shown = ok(c
        .cli(&["vm", "volume", "attach", "a", "v1", "--wait"])
        .output()
        .expect("cli"));
    assert!(shown.contains("v1 64MiB attached"), "{shown}");
    let dev_a = guest_device(&c, "a", &v1.metadata.id, "dev-a").await;
    let written = guest_run(
        &c,
        "a",
        "write",
        &format!("dd if=/dev/urandom of=/dev/{dev_a} bs=1M count=4 2>/dev/null && sync"),
        GUEST,
    )
    .await;
    assert_eq!(written, "RESULT-write rc=0");
    let sum = checksum(&c, "a", &dev_a, "sum-a").await;
    assert_eq!(sum.len(), 64, "{sum}");

    // One VM at a time; attached volumes are not deleted; the root disk is not a volume.
    cli_fails(
        &c,
        &["vm", "volume", "attach", "b", "v1"],
        "already attached to VM \"a\"",
    );
    cli_fails(&c, &["volume", "delete", "v1"], "detach it first");
    cli_fails(&c, &["volume", "resize", "v1", "--size", "32MiB"], "only grow");
    let (got, err) = delete(&c, "vms/a/volumes/root").await;
    assert_eq!((got, err["error"]["field"].as_str()), (422, Some("volume")), "{err}");
    let v1_now = volume(&c, "v1").await;
    assert_eq!(
        (v1_now.status.phase, v1_now.status.vm.as_deref(), v1_now.spec.size_mib),
        (VolumePhase::Attached, Some("a"), 64)
    );

    // Live migration carries the volume along, intact.
    let target = "node-2";
    ok(c.cli(&["vm", "migrate", "a", "--to", target, "--wait"])
        .output()
        .expect("cli"));
    let moved = c.vm("a").await;
    assert_eq!(moved.status.node.as_deref(), Some(target));
    wait_console_answers(&c, "a").await;
    assert_eq!(
        checksum(&c, "a", &dev_a, "sum-a-moved").await,
        sum,
        "the volume changed in the move"
    );
    assert_eq!(volume(&c, "v1").await.status.node.as_deref(), Some(target));

    // Detached: the guest lets it go, its data rests on that node.
    ok(c.cli(&["vm", "volume", "detach", "a", "v1", "--wait"])
        .output()
        .expect("cli"));
    let gone = guest_value(&c, "a", "gone", &format!("ls /sys/block | grep -c {dev_a}")).await;
    assert_eq!(gone, "0", "the guest still has the volume");
    let v1_now = volume(&c, "v1").await;
    assert_eq!(
        (
            v1_now.status.phase,
            v1_now.status.vm.as_deref(),
            v1_now.status.node.as_deref()
        ),
        (VolumePhase::Available, None, Some(target))
    );

    // A volume whose data is lost cannot be attached: the attach fails with
    // the reason and plugs nothing, and a detach clears it away.
    ok(c.cli(&["volume", "create", "v2", "--size", "32MiB"])
        .output()
        .expect("cli"));
    ok(c.cli(&["vm", "volume", "attach", "a", "v2", "--wait"])
        .output()
        .expect("cli"));
    ok(c.cli(&["vm", "volume", "detach", "a", "v2", "--wait"])
        .output()
        .expect("cli"));
    let v2 = volume(&c, "v2").await;
    let lost = c
        .dir
        .path()
        .join(target)
        .join("volumes")
        .join(format!("{}.qcow2", v2.metadata.id));
    std::fs::remove_file(&lost).expect("v2's data in node-2's pool");
    cli_fails(
        &c,
        &["vm", "volume", "attach", "a", "v2", "--wait"],
        "Volume change failed",
    );
    let a_now = c.vm("a").await;
    assert!(a_now.status.volumes.is_empty(), "{:?}", a_now.status.volumes);
    ok(c.cli(&["vm", "volume", "detach", "a", "v2", "--wait"])
        .output()
        .expect("cli"));
    assert_eq!(c.vm("a").await.status.reason, None);
    ok(c.cli(&["volume", "delete", "v2"]).output().expect("cli"));

    // Attached to a VM on the other node: fetched from there, data intact.
    let b_node = c.vm("b").await.status.node.expect("node");
    assert_eq!(b_node, "node-1");
    ok(c.cli(&["vm", "volume", "attach", "b", "v1", "--wait"])
        .output()
        .expect("cli"));
    let dev_b = guest_device(&c, "b", &v1.metadata.id, "dev-b").await;
    assert_eq!(
        checksum(&c, "b", &dev_b, "sum-b").await,
        sum,
        "the volume changed on its way"
    );
    let pool = |node: &str| {
        c.dir
            .path()
            .join(node)
            .join("volumes")
            .join(format!("{}.qcow2", v1.metadata.id))
    };
    wait_until("the old copy to be deleted", GUEST, || async {
        (!pool(target).exists()).then_some(())
    })
    .await;

    // Grown online: the guest sees the new size.
    ok(c.cli(&["volume", "resize", "v1", "--size", "96MiB"])
        .output()
        .expect("cli"));
    let sectors = guest_value(
        &c,
        "b",
        "size",
        &format!("for i in $(seq 50); do [ $(cat /sys/block/{dev_b}/size) = 196608 ] && break; usleep 200000; done; cat /sys/block/{dev_b}/size"),
    )
    .await;
    assert_eq!(sectors, "196608", "96 MiB in 512-byte sectors");

    // A cold migration copies the volume along with the stopped VM.
    ok(c.cli(&["vm", "stop", "b", "--wait"]).output().expect("cli"));
    ok(c.cli(&["vm", "migrate", "b", "--to", target, "--wait"])
        .output()
        .expect("cli"));
    ok(c.cli(&["vm", "start", "b", "--wait"]).output().expect("cli"));
    c.wait_console("b", "NOVACRON-GUEST-READY", 2, BOOT).await;
    let b_node = c.vm("b").await.status.node.expect("node");
    assert_eq!(b_node, target);
    let dev_b = guest_device(&c, "b", &v1.metadata.id, "dev-b-cold").await;
    assert_eq!(
        checksum(&c, "b", &dev_b, "sum-b-cold").await,
        sum,
        "the volume changed in the cold move"
    );
    assert_eq!(volume(&c, "v1").await.status.node.as_deref(), Some(target));

    // A deleted VM lets its volumes go to its node's pool.
    ok(c.cli(&["vm", "delete", "b"]).output().expect("cli"));
    wait_until("b to be deleted", GUEST, || async {
        c.client
            .get::<Vm>("b")
            .await
            .err()
            .filter(|e| e.is_not_found())
            .map(drop)
    })
    .await;
    let v1_now = volume(&c, "v1").await;
    assert_eq!(
        (v1_now.status.phase, v1_now.status.node.as_deref(), v1_now.spec.size_mib),
        (VolumePhase::Available, Some(b_node.as_str()), 96)
    );
    assert!(pool(&b_node).exists(), "the volume's data went with its VM");
    // Volumes count in the disk usage: a's root and data disks (64 + 16 MiB) and v1.
    let project: serde_json::Value = c
        .http()
        .get(format!("{}/v1/projects/default", c.url))
        .bearer_auth(&c.token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(project["usage"]["disk_mib"], 64 + 16 + 96, "{project}");
    ok(c.cli(&["volume", "delete", "v1"]).output().expect("cli"));
    assert!(!pool(&b_node).exists(), "the deleted volume's data stayed");
}

/// The block nodes of a running VM's QEMU, read over its second QMP
/// monitor (the agent holds the first).
fn block_nodes(c: &Cluster, vm: &Vm) -> String {
    let node = vm.status.node.clone().expect("node");
    let sock = c
        .dir
        .path()
        .join(node)
        .join("vms")
        .join(&vm.metadata.id)
        .join("qmp-migrate.sock");
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def call(cmd, args=None):
    f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
json.loads(f.readline())
call("qmp_capabilities")
print(" ".join(n["node-name"] for n in call("query-named-block-nodes", {"flat": True})["return"]))
"#;
    ok(std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&sock)
        .output()
        .expect("python3"))
}

#[tokio::test]
async fn a_failed_hot_plug_leaves_no_block_node() {
    let c = Cluster::start(Options {
        agents: 1,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    // q35's PCIe root bus takes no hot-plugged devices: device_add fails
    // after blockdev-add has made the volume's node.
    let mut req = vm_on("q", Vec::new(), None);
    req.spec.machine = Some("q35".into());
    c.client.create_vm(&req).await.expect("create");
    let vm = c.wait_phase("q", VmPhase::Running, BOOT).await;
    ok(c.cli(&["volume", "create", "v3", "--size", "32MiB"])
        .output()
        .expect("cli"));
    cli_fails(
        &c,
        &["vm", "volume", "attach", "q", "v3", "--wait"],
        "does not support hotplugging",
    );
    let nodes = block_nodes(&c, &vm);
    assert!(
        !nodes.split(' ').any(|n| n.starts_with("vol")),
        "a block node leaked: {nodes}"
    );
    let devices = c.vm("q").await.status.volumes;
    assert!(devices.iter().all(|v| !v.plugged), "{devices:?}");
    // Detaching clears the failure; the volume is free again.
    ok(c.cli(&["vm", "volume", "detach", "q", "v3", "--wait"])
        .output()
        .expect("cli"));
    assert_eq!(c.vm("q").await.status.reason, None);
    assert_eq!(volume(&c, "v3").await.status.phase, VolumePhase::Available);
}
