use super::*;
use proptest::prelude::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn cluster(nodes: &[(&str, u64, u64)], settings: Settings) -> Cluster {
    Cluster::new(
        nodes.iter().map(|(n, c, m)| NodeInfo::new(n, *c, *m)).collect(),
        settings,
    )
}

#[test]
fn binpack_fills_spread_spreads() {
    let binpack = Settings {
        profile: Profile::Binpack,
        ..Default::default()
    };
    let mut c = cluster(&[("a", 8, 8192), ("b", 8, 8192)], binpack);
    c.commit("x", 0, Request::new(2, 2048));
    assert_eq!(c.place(&Request::new(1, 1024)).unwrap().node, "a");
    c.settings.profile = Profile::Spread;
    assert_eq!(c.place(&Request::new(1, 1024)).unwrap().node, "b");
}

#[test]
fn rejections_are_counted_and_explained() {
    let mut nodes = vec![
        NodeInfo::new("a", 4, 256),
        NodeInfo::new("b", 0, 8192),
        NodeInfo::new("d", 8, 8192),
        NodeInfo::new("e", 8, 8192),
        NodeInfo::new("f", 8, 8192),
    ];
    nodes[2].ready = false;
    nodes[3].schedulable = false;
    nodes[4].labels = labels(&[("disk", "hdd")]);
    nodes[0].labels = labels(&[("disk", "ssd")]);
    nodes[1].labels = labels(&[("disk", "ssd")]);
    let c = Cluster::new(nodes, Settings::default());
    let mut req = Request::new(1, 512);
    req.node_selector = labels(&[("disk", "ssd")]);
    let err = c.place(&req).expect_err("no fit");
    assert_eq!(
        err.to_string(),
        "0/5 nodes available: 1 not ready, 1 cordoned, 1 node selector mismatch, 1 insufficient memory, 1 insufficient vCPU"
    );
    let empty = Cluster::new(vec![], Settings::default());
    assert_eq!(
        empty.place(&Request::new(1, 1)).expect_err("none").to_string(),
        "no nodes registered"
    );
}

#[test]
fn overcommit_ratios_are_the_limit() {
    let settings = Settings {
        cpu_overcommit: 2.0,
        ..Default::default()
    };
    let mut c = cluster(&[("a", 4, 4096)], settings);
    c.commit("x", 0, Request::new(7, 1024));
    assert!(c.place(&Request::new(1, 1024)).is_ok());
    assert_eq!(
        c.place(&Request::new(2, 1024)).unwrap_err().rejections,
        BTreeMap::from([(Rejection::InsufficientCpu, 1)])
    );
}

#[test]
fn anti_affinity_both_ways_and_affinity_by_zone() {
    let mut nodes: Vec<NodeInfo> = ["a", "b", "c"].iter().map(|n| NodeInfo::new(n, 8, 8192)).collect();
    nodes[0].labels = labels(&[(ZONE_LABEL, "z1")]);
    nodes[1].labels = labels(&[(ZONE_LABEL, "z1")]);
    nodes[2].labels = labels(&[(ZONE_LABEL, "z2")]);
    let mut c = Cluster::new(nodes, Settings::default());
    let web = |anti_required: bool| Request {
        labels: labels(&[("app", "web")]),
        affinity: vec![AffinityTerm {
            selector: labels(&[("app", "web")]),
            scope: Scope::Node,
            anti: true,
            required: anti_required,
        }],
        ..Request::new(1, 1024)
    };
    let first = c.place(&web(true)).unwrap();
    c.commit("web-1", first.index, web(true));
    let second = c.place(&web(true)).unwrap();
    assert_ne!(second.node, first.node);
    c.commit("web-2", second.index, web(true));
    let third = c.place(&web(true)).unwrap();
    c.commit("web-3", third.index, web(true));
    let err = c.place(&web(true)).unwrap_err();
    assert_eq!(err.rejections, BTreeMap::from([(Rejection::AntiAffinity, 3)]));
    // A VM without terms of its own still may not land next to a VM that excludes it.
    let plain = Request {
        labels: labels(&[("app", "web")]),
        ..Request::new(1, 1024)
    };
    assert_eq!(
        c.place(&plain).unwrap_err().rejections,
        BTreeMap::from([(Rejection::AntiAffinity, 3)])
    );
    // Preferred anti-affinity only scores: an API VM that would rather not sit
    // next to web VMs still gets a node, with that objective at 0.
    let api = Request {
        labels: labels(&[("app", "api")]),
        affinity: vec![AffinityTerm {
            selector: labels(&[("app", "web")]),
            scope: Scope::Node,
            anti: true,
            required: false,
        }],
        ..Request::new(1, 1024)
    };
    assert_eq!(c.place(&api).unwrap().score.affinity, 0.0);
    // Required zone affinity: near the database, in z2.
    c.commit(
        "db",
        2,
        Request {
            labels: labels(&[("app", "db")]),
            ..Request::new(1, 1024)
        },
    );
    let near_db = Request {
        affinity: vec![AffinityTerm {
            selector: labels(&[("app", "db")]),
            scope: Scope::Zone,
            anti: false,
            required: true,
        }],
        ..Request::new(1, 1024)
    };
    assert_eq!(c.place(&near_db).unwrap().node, "c");
}

#[test]
fn weights_mean_what_they_say() {
    let mut nodes = vec![NodeInfo::new("cheap", 8, 8192), NodeInfo::new("dear", 8, 8192)];
    nodes[0].cost_per_hour = 1.0;
    nodes[1].cost_per_hour = 3.0;
    nodes[0].labels = labels(&[(ZONE_LABEL, "far")]);
    nodes[1].labels = labels(&[(ZONE_LABEL, "near")]);
    let mut req = Request::new(1, 1024);
    req.preferred_zone = Some("near".into());
    let only = |cost: f64, latency: f64| Settings {
        weights: Weights {
            packing: 0.0,
            cost,
            headroom: 0.0,
            latency,
            affinity: 0.0,
        },
        ..Default::default()
    };
    let c = Cluster::new(nodes.clone(), only(1.0, 0.0));
    let d = c.place(&req).unwrap();
    assert_eq!(d.node, "cheap");
    assert_eq!((d.score.cost, d.score.total), (1.0, 1.0));
    assert_eq!(d.runners_up[0].score.cost, 0.0);
    let c = Cluster::new(nodes.clone(), only(0.0, 1.0));
    assert_eq!(c.place(&req).unwrap().node, "dear");
    // Equal weights, one objective each way: a tie, broken by name.
    let c = Cluster::new(nodes, only(1.0, 1.0));
    let d = c.place(&req).unwrap();
    assert_eq!(d.score.total, 0.5);
    assert_eq!(d.runners_up[0].score.total, 0.5);
    assert_eq!(d.node, "cheap");
}

#[test]
fn consolidate_frees_whole_nodes() {
    let mut c = cluster(&[("a", 8, 8192), ("b", 8, 8192), ("c", 8, 8192)], Settings::default());
    c.commit("x", 0, Request::new(1, 1024));
    c.commit("y", 1, Request::new(1, 1024));
    c.commit("z", 2, Request::new(1, 4096));
    let plan = c.rebalance(RebalanceMode::Consolidate, 10);
    assert_eq!(plan.nodes_used_before, 3);
    assert_eq!(plan.nodes_used_after, 1, "{plan:?}");
    assert_eq!(plan.moves.len(), 2);
    assert_eq!(plan.moved_mib, 2048);
    // The snapshot itself is unchanged.
    assert_eq!(c.nodes_used(), 3);
}

#[test]
fn balance_lowers_imbalance_within_the_move_budget() {
    let mut c = cluster(&[("a", 16, 16384), ("b", 16, 16384)], Settings::default());
    for i in 0..8 {
        c.commit(&format!("vm{i}"), 0, Request::new(1, 1024));
    }
    let plan = c.rebalance(RebalanceMode::Balance, 10);
    assert_eq!(plan.moves.len(), 4, "{plan:?}");
    assert!(plan.imbalance_after < 1e-9, "{plan:?}");
    let plan = c.rebalance(RebalanceMode::Balance, 2);
    assert_eq!(plan.moves.len(), 2);
    assert!(plan.imbalance_after < plan.imbalance_before);
}

fn arb_cluster() -> impl Strategy<Value = (Cluster, Vec<Request>)> {
    let nodes = prop::collection::vec((1u64..16, 1u64..32, 0u8..3, any::<bool>()), 1..12);
    let vms = prop::collection::vec((1u64..6, 1u64..12, 0u8..4, any::<bool>(), any::<bool>()), 0..60);
    let ratios = (
        prop_oneof![Just(1.0), Just(2.0), Just(4.0)],
        prop_oneof![Just(1.0), Just(1.5)],
    );
    (nodes, vms, ratios, any::<bool>()).prop_map(|(nodes, vms, (cpu, mem), spread)| {
        let nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, (c, m, z, cordoned))| {
                let mut n = NodeInfo::new(&format!("n{i:02}"), *c, *m * 1024);
                n.labels = labels(&[(ZONE_LABEL, &format!("z{z}"))]);
                n.schedulable = !*cordoned || i == 0;
                n.cost_per_hour = (*c as f64) * 0.1;
                n
            })
            .collect();
        let settings = Settings {
            cpu_overcommit: cpu,
            memory_overcommit: mem,
            profile: if spread { Profile::Spread } else { Profile::Binpack },
            ..Default::default()
        };
        let reqs = vms
            .iter()
            .map(|(c, m, app, anti, zone)| Request {
                labels: labels(&[("app", &format!("a{app}"))]),
                affinity: if *anti {
                    vec![AffinityTerm {
                        selector: labels(&[("app", &format!("a{app}"))]),
                        scope: if *zone { Scope::Zone } else { Scope::Node },
                        anti: true,
                        required: true,
                    }]
                } else {
                    vec![]
                },
                ..Request::new(*c, *m * 512)
            })
            .collect();
        (Cluster::new(nodes, settings), reqs)
    })
}

/// Every pair of VMs where one requires to stay away from the other is apart.
fn anti_affinity_holds(c: &Cluster) -> bool {
    c.vms.iter().all(|a| {
        a.request.affinity.iter().filter(|t| t.required && t.anti).all(|t| {
            c.vms.iter().filter(|b| b.name != a.name).all(|b| {
                let matches = t.selector.iter().all(|(k, v)| b.request.labels.get(k) == Some(v));
                let close = match t.scope {
                    Scope::Node => a.node == b.node,
                    Scope::Zone => c.zone_name(a.node).is_some() && c.zone_name(a.node) == c.zone_name(b.node),
                };
                !(matches && close)
            })
        })
    })
}

fn within_ratios(c: &Cluster) -> bool {
    (0..c.nodes.len()).all(|i| {
        let a = c.allocated(i);
        let l = c.allocatable(i);
        a.vcpus <= l.vcpus && a.memory_mib <= l.memory_mib
    })
}

fn place_all(c: &mut Cluster, reqs: &[Request]) {
    for (i, r) in reqs.iter().enumerate() {
        if let Ok(d) = c.place(r) {
            c.commit(&format!("vm{i}"), d.index, r.clone());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn placement_never_overcommits_or_breaks_anti_affinity((mut c, reqs) in arb_cluster()) {
        place_all(&mut c, &reqs);
        prop_assert!(within_ratios(&c));
        prop_assert!(anti_affinity_holds(&c));
        // Unplaceable requests are explained by every node.
        for r in &reqs {
            if let Err(e) = c.place(r) {
                prop_assert_eq!(e.rejections.values().sum::<usize>(), c.nodes.len());
            }
        }
    }

    #[test]
    fn rebalancing_never_worsens_imbalance_or_breaks_constraints((mut c, reqs) in arb_cluster(), moves in 0usize..20) {
        place_all(&mut c, &reqs);
        for mode in [RebalanceMode::Balance, RebalanceMode::Consolidate] {
            let plan = c.rebalance(mode, moves);
            prop_assert!(plan.moves.len() <= moves);
            if mode == RebalanceMode::Balance {
                prop_assert!(plan.imbalance_after <= plan.imbalance_before + 1e-9, "{:?}", plan);
            } else {
                prop_assert!(plan.nodes_used_after <= plan.nodes_used_before);
            }
            // Apply the plan on a copy and check the constraints there.
            let mut applied = c.clone();
            for m in &plan.moves {
                let v = applied.vms.iter().position(|vm| vm.name == m.vm).unwrap();
                let to = applied.node_index(&m.to).unwrap();
                applied.move_vm(v, to);
            }
            prop_assert!(within_ratios(&applied));
            prop_assert!(anti_affinity_holds(&applied));
        }
    }

    #[test]
    fn same_input_same_answer((c, reqs) in arb_cluster()) {
        let mut reversed = c.clone();
        reversed.nodes.reverse();
        let reversed = Cluster::new(reversed.nodes, reversed.settings);
        for r in reqs.iter().take(5) {
            let a = c.place(r).map(|d| d.node);
            let b = reversed.place(r).map(|d| d.node);
            prop_assert_eq!(a.is_ok(), b.is_ok());
            // The same node wins whatever the input order (scores tie-break by name).
            if let (Ok(a), Ok(b)) = (a, b) {
                prop_assert_eq!(a, b);
            }
        }
    }
}

#[test]
fn nodes_whose_qemu_cannot_run_the_vm_are_rejected_with_the_reason() {
    let runtime = |accel: &str, machines: &[&str], cpus: &[&str]| Runtime {
        accel: accel.into(),
        machine_types: machines.iter().map(|m| m.to_string()).collect(),
        cpu_models: cpus.iter().map(|c| c.to_string()).collect(),
    };
    let mut nodes = vec![
        NodeInfo::new("old-qemu", 8, 8192),
        NodeInfo::new("kvm", 8, 8192),
        NodeInfo::new("no-nehalem", 8, 8192),
        NodeInfo::new("fits", 8, 8192),
        NodeInfo::new("unknown", 8, 8192),
    ];
    nodes[0].runtime = Some(runtime("tcg", &["pc", "pc-i440fx-9.2"], &["qemu64", "Nehalem"]));
    nodes[1].runtime = Some(runtime("kvm", &["pc", "pc-i440fx-10.0"], &["qemu64", "Nehalem"]));
    nodes[2].runtime = Some(runtime("tcg", &["pc", "pc-i440fx-10.0"], &["qemu64"]));
    nodes[3].runtime = Some(runtime(
        "tcg",
        &["pc", "pc-i440fx-10.0", "pc-i440fx-9.2"],
        &["qemu64", "Nehalem"],
    ));
    nodes[4].ready = false;
    let c = Cluster::new(nodes, Settings::default());
    let req = Request {
        machine: Some("pc-i440fx-10.0".into()),
        cpu_model: Some("Nehalem".into()),
        accel: Some("tcg".into()),
        ..Request::new(1, 512)
    };
    assert_eq!(c.check(0, &req), Err(Rejection::MachineType));
    assert_eq!(c.check(1, &req), Err(Rejection::Accelerator));
    assert_eq!(c.check(2, &req), Err(Rejection::CpuModel));
    assert_eq!(c.check(3, &req), Ok(()));
    assert_eq!(c.place(&req).map(|d| d.node), Ok("fits".to_string()));
    let err = c.place_excluding(&req, Some(3)).unwrap_err().to_string();
    assert!(err.contains("1 QEMU lacks the VM's machine type"), "{err}");
    assert!(err.contains("1 QEMU cannot run the VM's CPU model here"), "{err}");
    assert!(err.contains("1 different accelerator than the running VM"), "{err}");
    // A node that did not say what its QEMU runs is not filtered on it.
    let mut legacy = NodeInfo::new("legacy", 8, 8192);
    legacy.runtime = None;
    let c = Cluster::new(vec![legacy], Settings::default());
    assert_eq!(c.check(0, &req), Ok(()));
}

/// Nodes of few shapes (so empty ones form classes of several), some not
/// ready, cordoned, labelled or with a runtime; VMs with labels and
/// anti-affinity; requests of every kind.
fn arb_alike_cluster() -> impl Strategy<Value = (Cluster, Vec<Request>, Vec<usize>)> {
    let nodes = prop::collection::vec((0u8..3, 0u8..3, 0u8..8, 0u8..3), 1..24);
    let vms = prop::collection::vec((1u64..6, 1u64..12, 0u8..4, 0u8..3, 0u8..3, 0u8..4), 0..50);
    let settings = (
        prop_oneof![Just(1.0), Just(2.0)],
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(3u32))],
    );
    let removals = prop::collection::vec(0usize..50, 0..10);
    (nodes, vms, settings, removals).prop_map(|(nodes, vms, (cpu, spread, max_vms), removals)| {
        let nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, (shape, zone, state, extra))| {
                let (c, m) = [(8, 16), (16, 32), (4, 64)][*shape as usize];
                let mut n = NodeInfo::new(&format!("n{:02}", (i * 7) % 24), c, m * 1024);
                n.name = format!("{}-{i}", n.name);
                n.labels = labels(&[(ZONE_LABEL, &format!("z{zone}"))]);
                // 0: not ready, 1: cordoned, 2: both.
                n.ready = *state != 0 && *state != 2;
                n.schedulable = *state != 1 && *state != 2;
                match extra {
                    1 => {
                        n.labels.insert("disk".into(), "ssd".into());
                    }
                    2 => {
                        n.runtime = Some(Runtime {
                            accel: "kvm".into(),
                            machine_types: ["pc-q35-10.0".to_string()].into(),
                            cpu_models: ["host".to_string()].into(),
                        })
                    }
                    _ => {}
                }
                n
            })
            .collect();
        let settings = Settings {
            cpu_overcommit: cpu,
            profile: if spread { Profile::Spread } else { Profile::Binpack },
            max_vms_per_node: max_vms,
            ..Default::default()
        };
        let reqs = vms
            .iter()
            .map(|(c, m, app, anti, zone, constraint)| {
                let mut r = Request {
                    labels: labels(&[("app", &format!("a{app}"))]),
                    preferred_zone: (*zone > 0).then(|| format!("z{zone}")),
                    ..Request::new(*c, *m * 512)
                };
                if *anti > 0 {
                    r.affinity.push(AffinityTerm {
                        selector: labels(&[("app", &format!("a{app}"))]),
                        scope: if *anti == 1 { Scope::Node } else { Scope::Zone },
                        anti: true,
                        required: *zone != 2,
                    });
                }
                match constraint {
                    1 => r.node_selector = labels(&[("disk", "ssd")]),
                    2 => r.accel = Some("kvm".into()),
                    3 => r.machine = Some("pc-q35-10.0".into()),
                    _ => {}
                }
                r
            })
            .collect();
        (Cluster::new(nodes, settings), reqs, removals)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The classes of empty nodes and the capacity-first pass change nothing:
    /// every decision, score, runner-up and count is the full scan's.
    #[test]
    fn placement_equals_the_full_scan((mut c, reqs, removals) in arb_alike_cluster()) {
        for (i, r) in reqs.iter().enumerate() {
            for exclude in [None, Some(i % c.nodes.len())] {
                prop_assert_eq!(c.place_excluding(r, exclude), c.place_by_full_scan(r, exclude));
            }
            if i % 5 == 0 {
                // A VM that was there already, wherever the filters say now
                // (on a node that went NotReady or was cordoned since).
                let node = (i * 3) % c.nodes.len();
                c.commit(&format!("vm{i}"), node, r.clone());
            } else if let Ok(d) = c.place(r) {
                c.commit(&format!("vm{i}"), d.index, r.clone());
            }
            // Taking VMs off again empties nodes (they rejoin their class).
            if removals.contains(&i) && !c.vms.is_empty() {
                c.uncommit(i % c.vms.len());
            }
        }
        for r in &reqs {
            prop_assert_eq!(c.place(r), c.place_by_full_scan(r, None));
        }
    }
}
