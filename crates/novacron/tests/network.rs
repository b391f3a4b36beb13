//! VM networking: networks and their addresses through the API, and real
//! guests on hosts (network namespaces) that get their addresses by DHCP
//! and talk over the VXLAN overlay.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::guestnet::{delete, guest_run, network, nic, post, refused, three_hosts, type_on_console, vm_on, BOOT};
use common::{ok, wait_until, Cluster, Options};
use novacron_api::{
    CreateMigration, CreateNetwork, CreateVm, Migration, MigrationPhase, MigrationStrategy, MigrationTransport,
    Network, SecurityGroup, Vm,
};
use serde_json::json;

fn vm_json(vm: CreateVm) -> serde_json::Value {
    serde_json::to_value(vm).expect("json")
}

#[tokio::test]
async fn networks_and_addresses_through_the_api() {
    let c = Cluster::start(Options {
        agents: 0,
        ..Default::default()
    })
    .await;
    c.import_demo().await;

    // The CLI creates a network; the server fills in gateway, MTU and VNI.
    let out = ok(c
        .cli(&[
            "network",
            "create",
            "red",
            "--subnet",
            "10.31.0.0/24",
            "--dhcp",
            "-o",
            "json",
        ])
        .output()
        .expect("cli"));
    let red: Vec<Network> = serde_json::from_str(&out).expect("network json");
    assert_eq!(red[0].spec.gateway, "10.31.0.1");
    assert_eq!(red[0].spec.mtu, 1450);
    assert!(red[0].status.vni >= 4096);

    // Bad input: a clear error naming the field, and nothing created.
    for (body, field) in [
        (json!({"name": "x", "subnet": "10.31.0.128/25"}), "subnet"), // overlaps red
        (json!({"name": "x", "subnet": "10.40.0.1/24"}), "subnet"),   // host bits
        (json!({"name": "x", "subnet": "10.40.0.0/30"}), "subnet"),   // too small
        (
            json!({"name": "x", "subnet": "10.40.0.0/24", "gateway": "10.41.0.1"}),
            "gateway",
        ),
        (json!({"name": "x", "subnet": "10.40.0.0/24", "mtu": 9000}), "mtu"),
        (json!({"name": "X", "subnet": "10.40.0.0/24"}), "name"),
    ] {
        refused(&c, "networks", body, 422, field).await;
    }
    let (status, _) = post(&c, "networks", json!({"name": "red", "subnet": "10.50.0.0/24"})).await;
    assert_eq!(status, 409, "a second network named red");
    let (nets, _) = c
        .client
        .list_all::<Network>(&novacron_client::Selector::everything())
        .await
        .expect("list");
    assert_eq!(nets.len(), 1, "a refused create left a network behind");
    let blue: Network = c
        .client
        .post_json("networks", &network("blue", "10.32.0.0/24"))
        .await
        .expect("blue");
    assert_ne!(blue.status.vni, red[0].status.vni);

    // A static address is checked: inside, not the gateway, not taken.
    let a = c
        .client
        .create_vm(&vm_on("a", vec![nic("red", Some("10.31.0.10"))], None))
        .await
        .expect("static address");
    assert_eq!(a.spec.nics[0].ip.as_deref(), Some("10.31.0.10"));
    assert_eq!(a.spec.nics[0].mac.as_deref(), Some("52:54:0a:1f:00:0a"));
    for (ip, status, field) in [
        ("10.31.0.10", 409, "spec.nics[0].ip"),
        ("10.31.0.1", 422, "spec.nics[0].ip"),
        ("10.32.0.5", 422, "spec.nics[0].ip"),
        ("10.31.0.255", 422, "spec.nics[0].ip"),
    ] {
        refused(
            &c,
            "vms",
            vm_json(vm_on("b", vec![nic("red", Some(ip))], None)),
            status,
            field,
        )
        .await;
    }
    refused(
        &c,
        "vms",
        vm_json(vm_on("b", vec![nic("green", None)], None)),
        422,
        "spec.nics[0].network",
    )
    .await;
    // A create that fails on its second NIC gives back the first one's address.
    let two = vm_json(vm_on(
        "b",
        vec![nic("blue", Some("10.32.0.7")), nic("red", Some("10.31.0.10"))],
        None,
    ));
    refused(&c, "vms", two, 409, "spec.nics[1].ip").await;
    let reused = c
        .client
        .create_vm(&vm_on("b", vec![nic("blue", Some("10.32.0.7"))], None))
        .await
        .expect("the address of a failed create is free again");
    assert_eq!(reused.spec.nics[0].ip.as_deref(), Some("10.32.0.7"));

    // Security groups: a NIC in an unknown group, a rule naming one, and
    // deleting a group in use are refused; a NIC without one is in `default`.
    let mut in_nowhere = nic("blue", None);
    in_nowhere.security_groups = vec!["nowhere".into()];
    let nowhere = "spec.nics[0].security_groups";
    refused(&c, "vms", vm_json(vm_on("d", vec![in_nowhere], None)), 422, nowhere).await;
    let rule = |r: serde_json::Value| json!({"name": "web", "rules": [r]});
    let from_nowhere = json!({"direction": "ingress", "protocol": "tcp", "ports": "80", "group": "nowhere"});
    refused(&c, "security-groups", rule(from_nowhere), 422, "rules[0].group").await;
    let icmp_port = json!({"direction": "ingress", "protocol": "icmp", "ports": "80"});
    refused(&c, "security-groups", rule(icmp_port), 422, "rules[0].ports").await;
    assert_eq!(a.spec.nics[0].security_groups, vec!["default".to_string()]);
    let default = c.client.get::<SecurityGroup>("default").await.expect("default group");
    assert_eq!(
        default.status.members,
        vec!["10.31.0.10".to_string(), "10.32.0.7".to_string()]
    );
    assert_eq!(delete(&c, "security-groups/default").await.0, 409);

    // A network in use cannot go.
    let (status, err) = delete(&c, "networks/red").await;
    assert_eq!(status, 409, "{err}");
    assert!(err.to_string().contains("1 VM(s): a"), "{err}");

    // 50 creates at once get 50 different addresses; deletes free them.
    let creates = (0..50).map(|i| {
        let client = c.client.clone();
        async move {
            client
                .create_vm(&vm_on(&format!("many-{i}"), vec![nic("red", None)], None))
                .await
        }
    });
    let made: Vec<Vm> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("50 creates");
    let ips: HashSet<String> = made.iter().filter_map(|v| v.spec.nics[0].ip.clone()).collect();
    let macs: HashSet<String> = made.iter().filter_map(|v| v.spec.nics[0].mac.clone()).collect();
    assert_eq!((ips.len(), macs.len()), (50, 50), "addresses: {ips:?}");
    assert!(!ips.contains("10.31.0.10") && !ips.contains("10.31.0.1"));
    let used = c.client.get::<Network>("red").await.expect("red").status.addresses_used;
    assert_eq!(used, 51);
    let (listed, _) = c
        .client
        .list_all::<Network>(&novacron_client::Selector::everything())
        .await
        .expect("list");
    let red_listed = listed.iter().find(|n| n.metadata.name == "red").expect("red listed");
    assert_eq!(
        red_listed.status.addresses_used, 51,
        "the list shows the addresses in use too"
    );
    for v in &made {
        c.client.delete_vm(&v.metadata.name, false).await.expect("delete");
    }
    c.client.delete_vm("a", false).await.expect("delete a");
    let used = c.client.get::<Network>("red").await.expect("red").status.addresses_used;
    assert_eq!(used, 0, "deleted VMs kept their addresses");
    ok(c.cli(&["network", "delete", "red"]).output().expect("cli"));

    // A project's default network (as `novacron dev` makes): VMs created
    // without NICs join it, unless they ask for none.
    let home = CreateNetwork {
        labels: [("novacron.io/default".to_string(), "true".to_string())].into(),
        ..network("home", "10.33.0.0/24")
    };
    let _: Network = c.client.post_json("networks", &home).await.expect("home");
    let joined = c.client.create_vm(&vm_on("e", vec![], None)).await.expect("e");
    assert_eq!(joined.spec.nics.len(), 1);
    assert_eq!(joined.spec.nics[0].network, "home");
    assert!(joined.spec.nics[0].ip.is_some());
    let out = ok(c
        .cli(&[
            "vm",
            "create",
            "f",
            "--image",
            "demo",
            "--no-network",
            "--no-start",
            "-o",
            "json",
        ])
        .output()
        .expect("cli"));
    assert!(!out.contains("\"nics\""), "--no-network got a NIC: {out}");

    // At most 8 NICs, at create and when adding one.
    let nine = vm_json(vm_on("g", (0..9).map(|_| nic("home", None)).collect(), None));
    refused(&c, "vms", nine, 422, "spec.nics").await;
    c.client
        .create_vm(&vm_on("g", (0..8).map(|_| nic("home", None)).collect(), None))
        .await
        .expect("8 NICs");
    refused(&c, "vms/g/nics", json!({"network": "home"}), 422, "spec.nics").await;
    assert_eq!(c.vm("g").await.spec.nics.len(), 8);
}

#[tokio::test]
async fn guests_on_two_hosts_share_a_network_and_a_third_is_kept_out() {
    let mut c = three_hosts().await;
    let red = CreateNetwork {
        nat: true,
        ..network("red", "10.31.0.0/24")
    };
    for net in [red, network("blue", "10.32.0.0/24")] {
        let _: Network = c.client.post_json("networks", &net).await.expect("network");
    }
    // b serves the web group: TCP 80 from the clients group (a), nothing
    // else; c stays in its project's default group.
    let _: SecurityGroup = c
        .client
        .post_json("security-groups", &json!({"name": "clients"}))
        .await
        .expect("group");
    let http_from_clients = json!({"direction": "ingress", "protocol": "tcp", "ports": "80", "group": "clients"});
    let _: SecurityGroup = c
        .client
        .post_json("security-groups", &json!({"name": "web", "rules": [http_from_clients]}))
        .await
        .expect("group");
    let vms = [
        ("a", "red", "node-1", "clients"),
        ("b", "red", "node-2", "web"),
        ("c", "blue", "node-3", "default"),
    ];
    let mut ips = Vec::new();
    for (name, net, node, group) in vms {
        let mut nic = nic(net, None);
        nic.security_groups = vec![group.to_string()];
        let vm = c
            .client
            .create_vm(&vm_on(name, vec![nic], Some(node)))
            .await
            .expect("create");
        ips.push(vm.spec.nics[0].ip.clone().expect("address"));
    }
    let web = c.client.get::<SecurityGroup>("web").await.expect("web");
    assert_eq!(web.status.members, vec![ips[1].clone()], "the server keeps the members");
    // Each guest gets the address the server chose, by DHCP, with the
    // overlay's MTU.
    for ((name, _, _, _), ip) in vms.iter().zip(&ips) {
        let log = c.wait_console(name, "NOVACRON-NET dev=eth0", 1, BOOT).await;
        let line = log.lines().find(|l| l.starts_with("NOVACRON-NET")).unwrap_or_default();
        assert!(line.contains(&format!("ip={ip}/24")), "{name}: {line}");
        assert!(line.contains("mtu=1450"), "{name}: {line}");
        assert_eq!(
            c.vm(name).await.status.node.as_deref(),
            Some(vms.iter().find(|v| v.0 == *name).map(|v| v.2).unwrap_or_default())
        );
    }
    let b_ip = &ips[1];

    // TCP across hosts: b serves 1 MiB of random bytes, a fetches them intact.
    let served = guest_run(
        &c,
        "b",
        "serve",
        "mkdir -p /www && head -c 1048576 /dev/urandom > /www/blob && httpd -p 80 -h /www && sha256sum /www/blob | cut -c1-64",
        Duration::from_secs(30),
    )
    .await;
    assert!(served.ends_with("rc=0"), "{served}");
    let b_log = c.logs("b").await;
    let b_sum = b_log
        .lines()
        .rev()
        .find(|l| l.len() == 64 && l.bytes().all(|x| x.is_ascii_hexdigit()))
        .expect("b's checksum")
        .to_string();
    let fetched = guest_run(
        &c,
        "a",
        "fetch",
        &format!("wget -q -O /tmp/blob http://{b_ip}/blob && echo SUM-$(sha256sum /tmp/blob | cut -c1-64)"),
        Duration::from_secs(60),
    )
    .await;
    assert!(fetched.ends_with("rc=0"), "{fetched}");
    let a_log = c.logs("a").await;
    assert!(
        a_log.contains(&format!("SUM-{b_sum}")),
        "a got other bytes than b served"
    );

    // The web group lets a in on TCP 80 only: a's ping is refused, until
    // ICMP from the clients is allowed too (applied on the running hosts).
    let refused = guest_run(
        &c,
        "a",
        "icmp-0",
        &format!("ping -c 2 -W 1 {b_ip}"),
        Duration::from_secs(30),
    )
    .await;
    assert!(!refused.ends_with("rc=0"), "web let a ping b: {refused}");
    let icmp_from_clients = json!({"direction": "ingress", "protocol": "icmp", "group": "clients"});
    let _: SecurityGroup = c
        .client
        .put_json(
            "security-groups/web",
            &json!({"rules": [http_from_clients, icmp_from_clients]}),
        )
        .await
        .expect("update web");
    let allowed = guest_run(
        &c,
        "a",
        "icmp-1",
        &format!("r=1; for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 {b_ip} && {{ r=0; break; }}; done; (exit $r)"),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        allowed.ends_with("rc=0"),
        "the new rule did not let a ping b: {allowed}"
    );

    // Anti-spoofing: pings from an address a does not own never reach b
    // (b's count of echo requests stays), a's own pings do.
    let echos = |log: &str| -> i64 {
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix("ECHOS-"))
            .and_then(|n| n.trim().parse().ok())
            .expect("b's echo count")
    };
    let count_echos = "echo ECHOS-$(awk '/^Icmp:/ {n++} n == 2 {print $10; exit}' /proc/net/snmp)";
    guest_run(&c, "b", "echos-0", count_echos, Duration::from_secs(30)).await;
    let echos_before = echos(&c.logs("b").await);
    let spoofed = guest_run(
        &c,
        "a",
        "spoof",
        &format!("ip addr add 10.31.0.99/24 dev eth0 && ping -c 3 -W 1 -I 10.31.0.99 {b_ip}; r=$?; ip addr del 10.31.0.99/24 dev eth0; (exit $r)"),
        Duration::from_secs(30),
    )
    .await;
    assert!(!spoofed.ends_with("rc=0"), "a spoofed ping was answered: {spoofed}");
    guest_run(&c, "b", "echos-1", count_echos, Duration::from_secs(30)).await;
    assert_eq!(echos(&c.logs("b").await), echos_before, "b received a spoofed ping");
    let honest = guest_run(
        &c,
        "a",
        "ping",
        &format!("ping -c 2 -W 2 {b_ip}"),
        Duration::from_secs(30),
    )
    .await;
    assert!(honest.ends_with("rc=0"), "{honest}");
    guest_run(&c, "b", "echos-2", count_echos, Duration::from_secs(30)).await;
    assert!(echos(&c.logs("b").await) >= echos_before + 2);

    // NAT: a reaches a server outside the overlay (as its host's address);
    // the outside cannot open a connection to b.
    // Hosts 1-3 run agents; host 9 is outside every network.
    let outside_ns = c.underlay.as_mut().expect("underlay").add_host(9);
    let underlay = c.underlay.as_ref().expect("underlay");
    let (outside_ip, node_1, node_2) = (underlay.host_ip(9), underlay.host_ip(1), underlay.host_ip(2));
    let outside_dir = c.dir.path().join("outside");
    std::fs::create_dir_all(&outside_dir).expect("dir");
    std::fs::write(outside_dir.join("hello.txt"), "outside-hello\n").expect("file");
    let server_log = outside_dir.join("server.log");
    // Its command line names the cluster's dir: the cluster's drop kills it if a check fails.
    let mut server = common::netlab::Underlay::exec(&outside_ns, "python3")
        .args([
            "-m",
            "http.server",
            "8080",
            "--bind",
            &outside_ip.to_string(),
            "--directory",
        ])
        .arg(&outside_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&server_log).expect("log"))
        .spawn()
        .expect("outside server");
    let fetched = guest_run(
        &c,
        "a",
        "nat",
        &format!("r=1; for i in 1 2 3 4 5; do timeout 5 wget -q -O - http://{outside_ip}:8080/hello.txt && {{ r=0; break; }}; sleep 1; done; (exit $r)"),
        Duration::from_secs(60),
    )
    .await;
    assert!(fetched.ends_with("rc=0"), "{fetched}");
    assert!(c.logs("a").await.contains("outside-hello"));
    let seen_from = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert!(
        seen_from.contains(&node_1.to_string()),
        "the outside saw a as: {seen_from}"
    );
    let route = std::process::Command::new("ip")
        .args([
            "-n",
            &outside_ns,
            "route",
            "add",
            "10.31.0.0/24",
            "via",
            &node_2.to_string(),
        ])
        .status()
        .expect("ip route");
    assert!(route.success());
    let inbound = common::netlab::Underlay::exec(&outside_ns, "curl")
        .args([
            "-s",
            "--max-time",
            "3",
            &format!("http://{b_ip}/blob"),
            "-o",
            "/dev/null",
        ])
        .status()
        .expect("curl");
    assert!(!inbound.success(), "the outside opened a connection to b");
    let _ = server.kill();
    let _ = server.wait();

    // c, on another network (another host, another VNI), cannot reach b.
    let refused = guest_run(
        &c,
        "c",
        "reach",
        // (busybox wget crashes with -T: `timeout` bounds it instead)
        &format!("timeout 5 wget -q -O /dev/null http://{b_ip}/blob"),
        Duration::from_secs(30),
    )
    .await;
    assert!(!refused.ends_with("rc=0"), "c reached b across networks: {refused}");

    // The overlay on each host: one bridge and VXLAN device per network
    // used there, with the other hosts as flood destinations.
    let underlay = c.underlay.as_ref().expect("underlay");
    let fdb = ok(common::netlab::Underlay::exec(&underlay.netns(1), "bridge")
        .args([
            "fdb",
            "show",
            "dev",
            &format!("ncvx{}", c.client.get::<Network>("red").await.expect("red").status.vni),
        ])
        .output()
        .expect("bridge"));
    for peer in [2, 3] {
        assert!(fdb.contains(&format!("dst {}", underlay.host_ip(peer))), "{fdb}");
    }
    let links = ok(common::netlab::Underlay::exec(&underlay.netns(3), "ip")
        .args(["-br", "link"])
        .output()
        .expect("ip"));
    let red_vni = c.client.get::<Network>("red").await.expect("red").status.vni;
    assert!(
        !links.contains(&format!("ncbr{red_vni}")),
        "node-3 has red's bridge without a red VM: {links}"
    );

    // Deleting a VM removes its tap, reservation and, with the last VM,
    // the network from the host.
    c.client.delete_vm("c", false).await.expect("delete");
    wait_until("c's network to leave node-3", Duration::from_secs(30), || async {
        let links = ok(common::netlab::Underlay::exec(&underlay.netns(3), "ip")
            .args(["-br", "link"])
            .output()
            .expect("ip"));
        (!links.contains("ncbr")).then_some(())
    })
    .await;
}

/// The last `NOVACRON-UDP` / `NOVACRON-TCP` figures on a console: (value of
/// `key` in the last line starting with `prefix`).
fn last_figure(log: &str, prefix: &str, key: &str) -> Option<i64> {
    let line = log.lines().rev().find(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

async fn move_vm(
    c: &Cluster,
    vm: &str,
    to: &str,
    strategy: MigrationStrategy,
    transport: MigrationTransport,
) -> Migration {
    let m = c
        .client
        .create_migration(&CreateMigration {
            vm: vm.into(),
            target_node: Some(to.into()),
            strategy,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            transport: Some(transport),
        })
        .await
        .expect("create migration");
    let done = c.wait_migration_final(&m.metadata.name, Duration::from_secs(180)).await;
    assert_eq!(done.status.phase, MigrationPhase::Completed, "{:?}", done.status);
    done
}

#[tokio::test]
async fn a_live_migration_keeps_the_address_the_connection_and_the_stream() {
    let mut c = three_hosts().await;
    let _: Network = c
        .client
        .post_json("networks", &network("red", "10.31.0.0/24"))
        .await
        .expect("network");
    c.client
        .create_vm(&vm_on("b", vec![nic("red", None)], Some("node-3")))
        .await
        .expect("b");
    // a starts on node-1 without a node selector (it has to move): the
    // other nodes are cordoned while it is placed.
    for node in ["node-2", "node-3"] {
        c.client.set_schedulable(node, false).await.expect("cordon");
    }
    let a = c
        .client
        .create_vm(&vm_on("a", vec![nic("red", None)], None))
        .await
        .expect("a");
    wait_until("a on node-1", Duration::from_secs(30), || async {
        (c.vm("a").await.status.node.as_deref() == Some("node-1")).then_some(())
    })
    .await;
    for node in ["node-2", "node-3"] {
        c.client.set_schedulable(node, true).await.expect("uncordon");
    }
    let a_ip = a.spec.nics[0].ip.clone().expect("a's address");
    for vm in ["a", "b"] {
        c.wait_console(vm, "NOVACRON-NET dev=eth0", 1, BOOT).await;
    }
    // b (on a third host) streams to a: 100 UDP datagrams/s and a TCP
    // byte stream at 64 KiB/s, both checked by a. a streams 100 datagrams/s
    // back: b, whose clock does not stop with a's pause, measures the gaps.
    let b_ip = c.vm("b").await.spec.nics[0].ip.clone().expect("b's address");
    type_on_console(&c, "a", "nc-nettest udp-recv 7000 & nc-nettest tcp-recv 7001 &");
    type_on_console(&c, "b", "nc-nettest udp-recv 7002 &");
    c.wait_console("a", "NOVACRON-UDP", 1, Duration::from_secs(30)).await;
    c.wait_console("b", "NOVACRON-UDP", 1, Duration::from_secs(30)).await;
    type_on_console(
        &c,
        "b",
        &format!("nc-nettest udp-send {a_ip} 7000 100 & nc-nettest tcp-send {a_ip} 7001 64 &"),
    );
    type_on_console(&c, "a", &format!("nc-nettest udp-send {b_ip} 7002 100 &"));
    // The longest gap b saw in a's stream after its line `from` (lines
    // counted from the start of b's console).
    let gap_at_b = |log: &str, from: usize| -> i64 {
        log.lines()
            .filter(|l| l.starts_with("NOVACRON-UDP"))
            .skip(from)
            .filter_map(|l| last_figure(l, "NOVACRON-UDP", "gap_ms"))
            .max()
            .unwrap_or_default()
    };
    let udp_lines = |log: &str| log.lines().filter(|l| l.starts_with("NOVACRON-UDP")).count();
    let flowing = |log: &str, udp_at_least: i64, tcp_at_least: i64| {
        last_figure(log, "NOVACRON-UDP", "last").is_some_and(|n| n >= udp_at_least)
            && last_figure(log, "NOVACRON-TCP", "bytes").is_some_and(|n| n >= tcp_at_least)
    };
    wait_until("the streams to flow", Duration::from_secs(60), || async {
        flowing(&c.logs("a").await, 200, 128 * 1024).then_some(())
    })
    .await;

    // Restarting both hosts' agents re-adopts taps, bridges, VXLAN peers,
    // dnsmasq and rules: the streams do not notice.
    let log = c.logs("a").await;
    let (lost_before, udp_then) = (
        last_figure(&log, "NOVACRON-UDP", "lost").unwrap_or_default(),
        last_figure(&log, "NOVACRON-UDP", "last").unwrap_or_default(),
    );
    let b_lines = udp_lines(&c.logs("b").await);
    for node in ["node-1", "node-3"] {
        c.restart_agent(node);
    }
    let log = wait_until(
        "the streams to go on across agent restarts",
        Duration::from_secs(60),
        || async {
            let log = c.logs("a").await;
            flowing(&log, udp_then + 500, 0).then_some(log)
        },
    )
    .await;
    let lost = last_figure(&log, "NOVACRON-UDP", "lost").unwrap_or_default() - lost_before;
    let gap = gap_at_b(&c.logs("b").await, b_lines);
    eprintln!("network across agent restarts: {lost} UDP datagrams lost (b to a), longest gap {gap} ms (a to b)");
    assert_eq!(lost, 0, "agent restarts dropped guest traffic");

    for (to, strategy, transport) in [
        ("node-2", MigrationStrategy::Precopy, MigrationTransport::Dwcp),
        ("node-1", MigrationStrategy::Postcopy, MigrationTransport::Qemu),
    ] {
        let before = c.logs("a").await;
        let lost_before = last_figure(&before, "NOVACRON-UDP", "lost").unwrap_or_default();
        let b_before = c.logs("b").await;
        let (b_lines, b_lost_before) = (
            udp_lines(&b_before),
            last_figure(&b_before, "NOVACRON-UDP", "lost").unwrap_or_default(),
        );
        let m = move_vm(&c, "a", to, strategy, transport).await;
        assert_eq!(c.vm("a").await.status.node.as_deref(), Some(to));
        // Three more seconds of both streams after the move.
        let log = c.logs("a").await;
        let (udp_then, tcp_then) = (
            last_figure(&log, "NOVACRON-UDP", "last").unwrap_or_default(),
            last_figure(&log, "NOVACRON-TCP", "bytes").unwrap_or_default(),
        );
        let log = wait_until(
            "the streams to go on after the move",
            Duration::from_secs(60),
            || async {
                let log = c.logs("a").await;
                flowing(&log, udp_then + 300, tcp_then + 192 * 1024).then_some(log)
            },
        )
        .await;
        let tcp_line = log
            .lines()
            .rev()
            .find(|l| l.starts_with("NOVACRON-TCP"))
            .unwrap_or_default();
        assert!(
            tcp_line.contains("errors=0 state=open"),
            "TCP after the move: {tcp_line}"
        );
        let lost = last_figure(&log, "NOVACRON-UDP", "lost").unwrap_or_default() - lost_before;
        let b_log = c.logs("b").await;
        let gap = gap_at_b(&b_log, b_lines);
        let b_lost = last_figure(&b_log, "NOVACRON-UDP", "lost").unwrap_or_default() - b_lost_before;
        let downtime = m.status.downtime_ms.expect("downtime") as i64;
        eprintln!(
            "network across a migration ({strategy:?} over {transport:?}, to {to}): UDP lost {lost} (b to a) and {b_lost} (a to b), longest gap {gap} ms (a to b, seen by b), downtime {downtime} ms, TCP {tcp_line}"
        );
        assert!(
            gap <= downtime + 1000,
            "longest gap {gap} ms exceeds the downtime {downtime} ms + 1 s"
        );
        // Same address and MAC on the new host.
        let moved = c.vm("a").await;
        assert_eq!(moved.spec.nics, a.spec.nics);
    }
    // The source left nothing behind: node-2 has no tap of a after it left.
    let underlay = c.underlay.as_ref().expect("underlay");
    let links = ok(common::netlab::Underlay::exec(&underlay.netns(2), "ip")
        .args(["-br", "link"])
        .output()
        .expect("ip"));
    assert!(!links.contains("ncbr"), "node-2 kept the network after a left: {links}");
}
