//! The scheduler wired into a real server with real agents: placement
//! constraints from the CLI, explanations, cluster settings, priorities and
//! a rebalancing plan. VMs are created stopped: placement reserves room
//! without booting guests.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use novacron_client::Selector;
use std::time::Duration;

use common::{ok, wait_until, Cluster, Options};
use novacron_api::{PlacementExplanation, RebalancePlan, RebalanceRequest, Vm, VmPhase};

/// `vm create NAME --image demo --memory MEMORY --no-start EXTRA...`.
fn create_stopped(c: &Cluster, name: &str, memory: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--image",
        "demo",
        "--memory",
        memory,
        "--no-start",
    ];
    args.extend_from_slice(extra);
    c.cli(&args).output().unwrap()
}

async fn placed(c: &Cluster, name: &str) -> Vm {
    wait_until(&format!("{name} placed"), Duration::from_secs(20), || async {
        c.client.get::<Vm>(name).await.ok().filter(|v| v.status.node.is_some())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn constraints_explanations_settings_and_rebalance() {
    let c = Cluster::start(Options {
        agents: 2,
        agent_memory: "2GiB",
        agent_vcpus: 4,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    let create = |name: &str, extra: &[&str]| ok(create_stopped(&c, name, "256MiB", extra));

    // Required anti-affinity: two replicas on two nodes, the third waits and says why.
    create("web-1", &["--label", "app=web", "--anti-affinity", "app=web"]);
    let a = placed(&c, "web-1").await;
    create("web-2", &["--label", "app=web", "--anti-affinity", "app=web"]);
    let b = placed(&c, "web-2").await;
    assert_ne!(a.status.node, b.status.node);
    create("web-3", &["--label", "app=web", "--anti-affinity", "app=web"]);
    let pending = wait_until("web-3 to say why it waits", Duration::from_secs(20), || async {
        let v = c.client.get::<Vm>("web-3").await.ok()?;
        v.status
            .reason
            .clone()
            .filter(|r| r.contains("anti-affinity"))
            .map(|r| (v, r))
    })
    .await;
    assert_eq!(pending.0.status.phase, VmPhase::Pending);
    assert_eq!(
        pending.1,
        "Unschedulable: 0/2 nodes available: 2 required anti-affinity violated"
    );
    let out = ok(c.cli(&["vm", "explain", "web-3"]).output().unwrap());
    assert!(
        out.contains("none fits") && out.contains("2 nodes: required anti-affinity violated"),
        "{out}"
    );

    // Node selector and --explain: the winner with its score breakdown and the rejected node.
    let out = ok(c
        .cli(&[
            "vm",
            "create",
            "sel",
            "--image",
            "demo",
            "--memory",
            "128MiB",
            "--no-start",
            "--node-selector",
            "novacron.io/node=node-2",
            "--explain",
        ])
        .output()
        .unwrap());
    // The harness labels nothing, so the selector matches no node: the VM waits.
    assert!(
        out.contains("none fits") && out.contains("node selector mismatch"),
        "{out}"
    );
    let explained: PlacementExplanation = c.client.get_json("vms/web-1/explain").await.unwrap();
    assert!(explained.node.is_some(), "{explained:?}");
    assert_eq!(
        explained.feasible + explained.rejected.iter().map(|r| r.nodes).sum::<usize>(),
        2
    );
    assert!(explained.candidates[0].total > 0.0, "{explained:?}");

    // Settings through the API: spread instead of binpack, and priorities.
    ok(c.cli(&[
        "cluster",
        "set-scheduler",
        "--profile",
        "spread",
        "--cpu-overcommit",
        "2",
    ])
    .output()
    .unwrap());
    let out = ok(c.cli(&["cluster", "scheduler"]).output().unwrap());
    assert!(out.contains("Spread") && out.contains("cpu overcommit:     2"), "{out}");
    for i in 0..4 {
        create(&format!("s{i}"), &[]);
        placed(&c, &format!("s{i}")).await;
    }
    let (vms, _) = c.client.list_all::<Vm>(&Selector::everything()).await.unwrap();
    let on = |n: &str| vms.iter().filter(|v| v.status.node.as_deref() == Some(n)).count();
    assert_eq!(on("node-1"), on("node-2"), "spread keeps nodes even");

    // Rebalance: pile VMs onto node-1 by cordoning node-2, then plan.
    ok(c.cli(&["cluster", "set-scheduler", "--profile", "binpack"])
        .output()
        .unwrap());
    ok(c.cli(&["node", "cordon", "node-2"]).output().unwrap());
    for i in 0..3 {
        create(&format!("p{i}"), &[]);
        placed(&c, &format!("p{i}")).await;
    }
    ok(c.cli(&["node", "uncordon", "node-2"]).output().unwrap());
    let plan: RebalancePlan = c
        .client
        .post_json(
            "scheduler/rebalance",
            &RebalanceRequest {
                mode: novacron_api::RebalanceMode::Balance,
                max_moves: Some(5),
            },
        )
        .await
        .unwrap();
    assert!(!plan.moves.is_empty(), "{plan:?}");
    assert!(plan.imbalance_after < plan.imbalance_before, "{plan:?}");
    assert!(
        plan.moves.iter().all(|m| m.from == "node-1" && m.to == "node-2"),
        "{plan:?}"
    );
    assert!(
        plan.moves.iter().all(|m| !m.vm.starts_with("web")),
        "anti-affinity kept: {plan:?}"
    );
    let out = ok(c.cli(&["cluster", "rebalance", "--dry-run"]).output().unwrap());
    assert!(
        out.contains("imbalance") && out.contains("node-1") && out.contains("node-2"),
        "{out}"
    );
    // Carried out: cold moves of the stopped VMs through Migration objects.
    let out = ok(c.cli(&["cluster", "rebalance", "--max-moves", "1"]).output().unwrap());
    assert!(out.contains("moved to node-2"), "{out}");
}

/// A VM records a versioned machine type (pinned on its first node) and the
/// cluster's baseline CPU model; nodes whose QEMU lacks them are rejected
/// with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn vms_get_a_versioned_machine_and_a_cpu_model_nodes_must_offer() {
    let c = Cluster::start(Options {
        agents: 1,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    let create = |name: &str, extra: &[&str]| create_stopped(&c, name, "128MiB", extra);
    ok(create("plain", &[]));
    let vm = placed(&c, "plain").await;
    let machine = vm.spec.machine.clone().unwrap_or_default();
    assert!(machine.starts_with("pc-i440fx-"), "machine {machine:?}");
    assert_eq!(vm.spec.cpu_model.as_deref(), Some("qemu64"));
    let node: novacron_api::Node = c.client.get("node-1").await.unwrap();
    assert!(
        node.status.qemu.machine_types.contains(&machine),
        "{:?}",
        node.status.qemu
    );

    // Models and types no node offers keep the VM pending, and say why.
    for (name, flag, value, why) in [
        (
            "odd-cpu",
            "--cpu-model",
            "NoSuchCpu",
            "QEMU cannot run the VM's CPU model here",
        ),
        // QEMU knows the model, but TCG (the agents here) cannot emulate
        // its AVX-512: the guest would not get the CPU it asked for.
        (
            "avx512-cpu",
            "--cpu-model",
            "Skylake-Server",
            "QEMU cannot run the VM's CPU model here",
        ),
        (
            "old-machine",
            "--machine",
            "pc-i440fx-1.4",
            "QEMU lacks the VM's machine type",
        ),
    ] {
        ok(create(name, &[flag, value]));
        wait_until(
            &format!("{name} to say why it waits"),
            Duration::from_secs(20),
            || async {
                let v = c.client.get::<Vm>(name).await.ok()?;
                v.status.reason.filter(|r| r.contains(why)).map(|_| ())
            },
        )
        .await;
        let explain = ok(c.cli(&["vm", "explain", name]).output().unwrap());
        assert!(explain.contains(why), "{explain}");
    }
    // "host" cannot migrate: refused at create.
    let out = create("host-cpu", &["--cpu-model", "host"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot migrate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
