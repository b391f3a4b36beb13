//! NICs added to and removed from a running VM (hot-plug), and addresses
//! that stay with a VM through a cold move and a node drain.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::guestnet::{delete, guest_run, network, nic, refused, vm_on, wait_console_answers, BOOT};
use common::{ok, wait_until, Cluster, Options};
use novacron_api::{Network, Vm, VmPhase};
use serde_json::json;

/// The `NOVACRON-NET` lines of the guest's current boot (after its last
/// `NOVACRON-INIT`).
fn leases_of_this_boot(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let boot = lines.iter().rposition(|l| l.starts_with("NOVACRON-INIT")).unwrap_or(0);
    lines[boot..]
        .iter()
        .filter(|l| l.starts_with("NOVACRON-NET"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Waits until the guest's current boot has leased every one of `ips`.
async fn wait_leases(c: &Cluster, vm: &str, ips: &[&str]) -> Vec<String> {
    wait_until(&format!("{vm} to lease {ips:?}"), BOOT, || async {
        let leases = leases_of_this_boot(&c.logs(vm).await);
        ips.iter()
            .all(|ip| leases.iter().any(|l| l.contains(&format!(" ip={ip}/"))))
            .then_some(leases)
    })
    .await
}

fn links(c: &Cluster, host: u8) -> String {
    let underlay = c.underlay.as_ref().expect("underlay");
    ok(common::netlab::Underlay::exec(&underlay.netns(host), "ip")
        .args(["-br", "link"])
        .output()
        .expect("ip"))
}

#[tokio::test]
async fn nics_come_and_go_on_a_running_vm_and_addresses_stay_through_moves() {
    let c = Cluster::start(Options {
        agents: 2,
        netns: true,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    for net in [network("red", "10.31.0.0/24"), network("blue", "10.32.0.0/24")] {
        let _: Network = c.client.post_json("networks", &net).await.expect("network");
    }
    let blue_vni = c.client.get::<Network>("blue").await.expect("blue").status.vni;
    // Both move later, so no node selectors: the other node is cordoned
    // while each is placed.
    let mut placed = Vec::new();
    for (vm, net, node, other) in [("a", "red", "node-1", "node-2"), ("b", "blue", "node-2", "node-1")] {
        c.client.set_schedulable(other, false).await.expect("cordon");
        placed.push(
            c.client
                .create_vm(&vm_on(vm, vec![nic(net, None)], None))
                .await
                .expect("create"),
        );
        wait_until(&format!("{vm} on {node}"), Duration::from_secs(30), || async {
            (c.vm(vm).await.status.node.as_deref() == Some(node)).then_some(())
        })
        .await;
        c.client.set_schedulable(other, true).await.expect("uncordon");
    }
    let (a, b) = (&placed[0], &placed[1]);
    let a_red = a.spec.nics[0].ip.clone().expect("a's address");
    let b_blue = b.spec.nics[0].ip.clone().expect("b's address");
    wait_leases(&c, "a", &[&a_red]).await;
    wait_leases(&c, "b", &[&b_blue]).await;
    // The guest's DHCP exchange shows in its NIC's counters (as /metrics
    // and the dashboard's charts read them): sent and received, the guest's way round.
    let stats: novacron_api::agent::VmStats = c.client.get_json("vms/a/stats").await.expect("stats");
    let nic0 = stats
        .nics
        .iter()
        .find(|n| n.interface == "nic0")
        .expect("nic0 counters");
    assert!(nic0.transmit_bytes > 0 && nic0.receive_bytes > 0, "{stats:?}");

    // Bad input changes nothing: an unknown network, a taken address, a
    // NIC the VM does not have.
    for (body, status, field) in [
        (json!({"network": "green"}), 422, "spec.nics[1].network"),
        (json!({"network": "blue", "ip": b_blue}), 409, "spec.nics[1].ip"),
        (json!({"network": "blue", "slot": 0}), 422, "spec.nics[1].slot"),
    ] {
        refused(&c, "vms/a/nics", body, status, field).await;
    }
    let (status, err) = delete(&c, "vms/a/nics/10.31.0.250").await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(c.vm("a").await.spec.nics.len(), 1, "a refused change changed the VM");

    // Hot-add a NIC on blue: the guest gets its address by DHCP and
    // reaches b over it.
    let out = ok(c
        .cli(&["vm", "nic", "add", "a", "--network", "blue", "--wait", "-o", "json"])
        .output()
        .expect("cli"));
    let with_blue: Vm = serde_json::from_str(&out).expect("vm json");
    let a_blue = with_blue.spec.nics[1].ip.clone().expect("a's blue address");
    assert_eq!(with_blue.spec.nics[1].slot, Some(1));
    assert_eq!(with_blue.status.nics.len(), 2, "{:?}", with_blue.status);
    wait_leases(&c, "a", &[&a_red, &a_blue]).await;
    let ping = guest_run(
        &c,
        "a",
        "ping-blue",
        &format!("ping -c 2 -W 2 {b_blue}"),
        Duration::from_secs(30),
    )
    .await;
    assert!(ping.ends_with("rc=0"), "a cannot reach b over the added NIC: {ping}");

    // Hot-remove it: the guest lets the device go, node-1 loses blue (a
    // was its only VM there), and the address is free again.
    ok(c.cli(&["vm", "nic", "remove", "a", &a_blue, "--wait"])
        .output()
        .expect("cli"));
    let after = c.vm("a").await;
    assert_eq!(after.status.nics.len(), 1, "{:?}", after.status);
    let gone = guest_run(
        &c,
        "a",
        "eth1-gone",
        "test ! -e /sys/class/net/eth1",
        Duration::from_secs(30),
    )
    .await;
    assert!(gone.ends_with("rc=0"), "the guest still has eth1: {gone}");
    wait_until("blue to leave node-1", Duration::from_secs(30), || async {
        (!links(&c, 1).contains(&format!("ncbr{blue_vni}"))).then_some(())
    })
    .await;
    // The same address, asked for by name, on a NIC added again.
    let again: Vm = c
        .client
        .post_json("vms/a/nics", &json!({"network": "blue", "ip": a_blue}))
        .await
        .expect("the removed NIC's address is free again");
    assert_eq!(again.spec.nics[1].ip.as_deref(), Some(a_blue.as_str()));
    wait_leases(&c, "a", &[&a_red, &a_blue]).await;

    // A cold move: stopped, moved to node-2, started; both NICs lease the
    // same addresses there, and node-1 keeps nothing of a.
    ok(c.cli(&["vm", "stop", "a", "--force", "--wait"]).output().expect("cli"));
    ok(c.cli(&["vm", "migrate", "a", "--to", "node-2", "--wait"])
        .output()
        .expect("cli"));
    ok(c.cli(&["vm", "start", "a", "--wait"]).output().expect("cli"));
    assert_eq!(c.vm("a").await.status.node.as_deref(), Some("node-2"));
    let leases = wait_leases(&c, "a", &[&a_red, &a_blue]).await;
    eprintln!("after the cold move: {leases:?}");
    wait_until("node-1 to drop a's networks", Duration::from_secs(30), || async {
        (!links(&c, 1).contains("ncbr")).then_some(())
    })
    .await;

    // A drain moves a and b back to node-1 live: addresses and reachability stay.
    let before = c.vm("a").await.spec.nics;
    ok(c.cli(&["node", "drain", "node-2"]).output().expect("cli"));
    for vm in ["a", "b"] {
        let moved = c.wait_phase(vm, VmPhase::Running, Duration::from_secs(60)).await;
        assert_eq!(moved.status.node.as_deref(), Some("node-1"), "{vm}");
    }
    assert_eq!(c.vm("a").await.spec.nics, before);
    wait_console_answers(&c, "a").await;
    let ping = guest_run(
        &c,
        "a",
        "ping-drained",
        &format!("ping -c 2 -W 2 {b_blue}"),
        Duration::from_secs(30),
    )
    .await;
    assert!(ping.ends_with("rc=0"), "a cannot reach b after the drain: {ping}");
}
