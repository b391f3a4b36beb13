//! Agents receive only what concerns them: a node's watch carries its own VMs
//! and nothing about VMs on other nodes, and a node's certificate cannot ask
//! for more. (No QEMU: the nodes here are joined identities, not agents.)
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::{wait_until, Cluster, Options};
use futures::StreamExt;
use novacron_api::{
    CreateToken, CreateVm, IssuedToken, JoinNode, JoinedNode, RegisterNode, Resources, Vm, VmSpec, WatchEventType,
    WatchLine,
};
use novacron_client::{Client, Selector};

/// A client speaking for node `name` with a certificate from a join token;
/// the node is registered with label `host=NAME`.
async fn join_node(c: &Cluster, name: &str) -> Client {
    let ca = std::fs::read_to_string(c.ca_path()).unwrap();
    let issued: IssuedToken = c
        .client
        .post_json(
            "tokens",
            &CreateToken {
                name: format!("join-{name}"),
                role: "join".into(),
                project: None,
                ttl_s: None,
                join: true,
            },
        )
        .await
        .unwrap();
    let joiner = Client::with_tls(
        &c.url,
        &issued.secret,
        Some(novacron_tls::client_config(&ca, None).unwrap()),
    )
    .unwrap();
    let joined: JoinedNode = joiner
        .post_json(
            "nodes/join",
            &JoinNode {
                name: name.into(),
                hosts: vec!["127.0.0.1".into()],
            },
        )
        .await
        .unwrap();
    let identity = novacron_tls::Identity {
        cert_pem: joined.cert_pem,
        key_pem: joined.key_pem,
    };
    let node = Client::with_tls(
        &c.url,
        "",
        Some(novacron_tls::client_config(&ca, Some(&identity)).unwrap()),
    )
    .unwrap();
    node.register_node(&RegisterNode {
        name: name.into(),
        address: "https://127.0.0.1:9".into(),
        capacity: Resources {
            vcpus: 16,
            memory_mib: 16384,
            disk_gib: 0,
        },
        labels: [("host".to_string(), name.to_string())].into(),
        accel: "tcg".into(),
        agent_version: "test".into(),
        qemu: Default::default(),
        dwcp_port: None,
        underlay_ip: None,
    })
    .await
    .unwrap();
    node
}

async fn vm_on(c: &Cluster, name: &str, node: &str) -> Vm {
    let mut spec = VmSpec::new("demo", 1, 64);
    spec.placement.node_selector = [("host".to_string(), node.to_string())].into();
    c.client
        .create_vm(&CreateVm {
            name: name.into(),
            project: None,
            labels: Default::default(),
            no_default_network: false,
            spec,
        })
        .await
        .unwrap();
    wait_until(&format!("{name} placed on {node}"), Duration::from_secs(20), || async {
        let vm: Vm = c.client.get(name).await.ok()?;
        (vm.status.node.as_deref() == Some(node)).then_some(vm)
    })
    .await
}

/// Writes a new status reason on the VM, as its node's agent would.
async fn touch(node: &Client, vm: &str, reason: String) {
    let mut v: Vm = node.get(vm).await.unwrap();
    v.status.reason = Some(reason);
    node.put_vm_status(vm, &v).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_watch_carries_only_its_own_vms() {
    let c = Cluster::start(Options {
        agents: 0,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    let node1 = join_node(&c, "node-1").await;
    let node2 = join_node(&c, "node-2").await;
    vm_on(&c, "vm-on-1", "node-1").await;
    vm_on(&c, "vm-on-2", "node-2").await;

    // node-2's view: exactly its own VM.
    let own = Selector::fields("status.node=node-2");
    let (mine, revision) = node2.list_all::<Vm>(&own).await.unwrap();
    assert_eq!(
        mine.iter().map(|v| v.metadata.name.as_str()).collect::<Vec<_>>(),
        ["vm-on-2"]
    );
    let mut watch = node2.watch::<Vm>(revision, &own).await.unwrap();

    // 100 changes to the VM on node-1, then one to node-2's own VM: the first
    // event node-2 receives is its own change (events arrive in order).
    for i in 0..100 {
        touch(&node1, "vm-on-1", format!("change {i}")).await;
    }
    touch(&node2, "vm-on-2", "own change".into()).await;
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("node-2's own change arrives")
        .expect("watch open")
        .expect("event");
    assert_eq!(first.object.metadata.name, "vm-on-2");
    assert_eq!(first.object.status.reason.as_deref(), Some("own change"));
    let more = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(more.is_err(), "unexpected event after node-2's own change: {more:?}");

    // Its deletion reaches it too.
    c.client.delete_vm("vm-on-2", true).await.unwrap();
    let deleted = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = watch.next().await {
            let ev = ev.expect("event");
            if ev.event_type == WatchEventType::Deleted {
                return ev.object.metadata.name;
            }
        }
        panic!("watch ended before the deletion");
    })
    .await
    .expect("deletion arrives");
    assert_eq!(deleted, "vm-on-2");

    // With bookmarks allowed, node-2 learns how far the stream has got while
    // only node-1's VM changes (so it can resume from there), and still
    // receives nothing of that VM.
    let (_, from) = node2.list_all::<Vm>(&own).await.unwrap();
    let mut lines = node2.watch_lines::<Vm>(from, &own).await.unwrap();
    let bookmark = tokio::time::timeout(Duration::from_secs(15), async {
        for i in 0.. {
            touch(&node1, "vm-on-1", format!("passing by {i}")).await;
            match tokio::time::timeout(Duration::from_millis(200), lines.next()).await {
                Ok(Some(Ok(WatchLine::Bookmark(b)))) => return b.resource_version,
                Ok(Some(Ok(WatchLine::Event(ev)))) => panic!("node-2 received {}", ev.object.metadata.name),
                Ok(other) => panic!("the watch ended: {other:?}"),
                Err(_) => {}
            }
        }
        unreachable!()
    })
    .await
    .expect("a bookmark within 15 s");
    assert!(bookmark > from, "bookmark {bookmark} is not past {from}");

    // A node's certificate asks only for its own node.
    for selector in [Selector::everything(), Selector::fields("status.node=node-1")] {
        let err = node2.list_all::<Vm>(&selector).await.unwrap_err();
        assert_eq!(err.status(), Some(403), "{selector:?}: {err}");
        let err = node2.watch::<Vm>(0, &selector).await.err().expect("watch refused");
        assert_eq!(err.status(), Some(403), "{selector:?}: {err}");
    }
    let err = node2
        .list_all::<novacron_api::Migration>(&Selector::fields("status.source_node=node-1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    for own in ["status.source_node=node-2", "status.target_node=node-2"] {
        node2
            .list_all::<novacron_api::Migration>(&Selector::fields(own))
            .await
            .unwrap();
    }
    // Unknown fields are a clear error.
    let err = c
        .client
        .list_all::<Vm>(&Selector::fields("spec.vcpus=1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(422), "{err}");
    assert!(err.to_string().contains("cannot be selected"), "{err}");
}
