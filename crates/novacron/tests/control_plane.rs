//! Several servers on one etcd: all serve the API, one runs the controllers,
//! a new one takes over within seconds when the leader is killed, nothing is
//! placed twice, and the API keeps serving when one etcd member of three dies.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{spawn_server, wait_until, Cluster, Options};
use futures::StreamExt;
use novacron_api::{
    CreateMigration, CreateVm, Health, Migration, MigrationPhase, MigrationStrategy, PowerState, RunStrategy, Vm,
    VmPhase, VmSpec,
};
use novacron_store::etcd_process::{connect_when_ready, EtcdCluster};
use novacron_store::{EventType, Store};

/// A server process of its own on the shared store, killed when dropped.
struct ServerProc {
    child: Child,
    url: String,
}

impl ServerProc {
    /// Servers sharing a store share their image files (in production, an
    /// NFS mount): an agent may fetch an image from any of them.
    async fn start(dir: &Path, name: &str, store: &str) -> ServerProc {
        let data_dir = dir.join(name);
        let args = [
            "server".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--store".into(),
            store.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--images-dir".into(),
            dir.join("images").display().to_string(),
        ];
        let (child, addr) = spawn_server(&args, &data_dir, dir, name).await;
        ServerProc {
            child,
            url: format!("https://{addr}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn https(ca: &Path) -> reqwest::Client {
    let ca = std::fs::read_to_string(ca).expect("CA certificate");
    reqwest::Client::builder()
        .use_preconfigured_tls(novacron_tls::client_config(&ca, None).expect("TLS config"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

async fn readiness(http: &reqwest::Client, url: &str) -> Option<Health> {
    http.get(format!("{url}/readyz")).send().await.ok()?.json().await.ok()
}

fn vm(name: &str, power_state: PowerState) -> CreateVm {
    CreateVm {
        name: name.into(),
        project: None,
        labels: Default::default(),
        no_default_network: false,
        spec: VmSpec {
            power_state,
            run_strategy: RunStrategy::Manual,
            ..VmSpec::new("demo", 1, 64)
        },
    }
}

fn stopped_vm(name: &str) -> CreateVm {
    vm(name, PowerState::Stopped)
}

/// Creates a running VM through `client` and waits until an agent runs it.
async fn run_vm(client: &novacron_client::Client, name: &str) {
    client
        .create_vm(&vm(name, PowerState::Running))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    wait_until(&format!("{name} Running"), Duration::from_secs(90), || async {
        client
            .get::<Vm>(name)
            .await
            .ok()
            .filter(|v| v.status.phase == VmPhase::Running)
    })
    .await;
}

#[tokio::test]
async fn leader_failover_places_each_vm_once_and_etcd_member_loss_is_survived() {
    let dir = tempfile::Builder::new()
        .prefix("nc-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).expect("etcd");
    let store_url = etcd.url("/cp");

    // The first server makes the cluster's CA and admin: it leads.
    let mut first = ServerProc::start(dir.path(), "first", &store_url).await;
    let ca = dir.path().join("first/pki/ca.crt");
    let http = wait_until("the first server to lead", Duration::from_secs(30), || {
        let (ca, url) = (ca.clone(), first.url.clone());
        async move {
            let http = ca.exists().then(|| https(&ca))?;
            readiness(&http, &url).await.filter(|h| h.leader == Some(true))?;
            Some(http)
        }
    })
    .await;
    let token = std::fs::read_to_string(dir.path().join("first/admin.token"))
        .expect("admin token")
        .trim()
        .to_string();

    // Two more servers; the agents use the cluster's and fail over to the
    // others. Each took the CA from the store (the client trusts the first
    // server's CA file for all three).
    let mut third = ServerProc::start(dir.path(), "third", &store_url).await;
    let mut c = Cluster::start(Options {
        agents: 2,
        // Stopped VMs hold their place too: room for all of them.
        agent_vcpus: 16,
        store: Some(store_url.clone()),
        admin_token: Some(token.clone()),
        other_servers: vec![third.url.clone(), first.url.clone()],
        server_args: vec!["--images-dir".into(), dir.path().join("images").display().to_string()],
        ..Default::default()
    })
    .await;
    let mut alive = vec![first.url.clone(), c.url.clone(), third.url.clone()];
    wait_until("all three ready, one leading", Duration::from_secs(30), || async {
        (leaders(&http, &alive).await?.len() == 1).then_some(())
    })
    .await;
    // A client naming every server: it goes on with another when one dies.
    let everyone = c.client_at(&format!("{},{},{}", c.url, third.url, first.url), &token);
    // A token made through one server is taken by another at once, and
    // its revocation too (each server's index follows the store).
    let issued: novacron_api::IssuedToken = c
        .client
        .post_json(
            "tokens",
            &novacron_api::CreateToken {
                name: "viewer-1".into(),
                role: "viewer".into(),
                project: None,
                ttl_s: None,
                join: false,
            },
        )
        .await
        .expect("create token");
    let lists_vms = |url: String, secret: String| {
        let http = http.clone();
        async move {
            http.get(format!("{url}/v1/vms"))
                .bearer_auth(secret)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    wait_until(
        "the token to work on the third server",
        Duration::from_secs(5),
        || async { (lists_vms(third.url.clone(), issued.secret.clone()).await == 200).then_some(()) },
    )
    .await;
    c.client.delete_path("tokens/viewer-1").await.expect("revoke");
    wait_until(
        "the revoked token refused by the third server",
        Duration::from_secs(5),
        || async { (lists_vms(third.url.clone(), issued.secret.clone()).await == 401).then_some(()) },
    )
    .await;
    c.import_demo().await;

    // A quota holds across servers: eight creates at once through two
    // servers into a project allowed four VMs, and four are made.
    c.client
        .put_json::<_, serde_json::Value>("projects/default", &serde_json::json!({"quota": {"vms": 4}}))
        .await
        .expect("set quota");
    let through_third = c.client_at(&third.url, &token);
    let creates = (0..8).map(|i| {
        let client = if i % 2 == 0 {
            c.client.clone()
        } else {
            through_third.clone()
        };
        async move { client.create_vm(&stopped_vm(&format!("capped-{i}"))).await.is_ok() }
    });
    let made = futures::future::join_all(creates)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    let (vms, _) = c.client.list_all::<Vm>(&Default::default()).await.expect("list");
    let in_project = vms.iter().filter(|v| v.metadata.name.starts_with("capped-")).count();
    assert_eq!((made, in_project), (4, 4), "a quota of 4 VMs across two servers");
    c.client
        .put_json::<_, serde_json::Value>("projects/default", &serde_json::json!({"quota": {}}))
        .await
        .expect("lift quota");
    wait_until("both nodes Ready", Duration::from_secs(30), || async {
        let (nodes, _) = c
            .client
            .list_all::<novacron_api::Node>(&Default::default())
            .await
            .ok()?;
        (nodes.iter().filter(|n| n.status.ready).count() == 2).then_some(())
    })
    .await;

    // Where etcd's history starts for the bindings checked at the end.
    let since = connect_when_ready(&store_url.parse().expect("url"), Duration::from_secs(10))
        .await
        .expect("etcd store")
        .revision()
        .await
        .expect("revision");

    // A burst of creates through the followers; the leader, whichever it
    // is, dies in the middle. (Through the leader, a create could meet its
    // dead connection before the client's pool has noticed.)
    let leader = the_leader(&http, &alive).await;
    let followers: Vec<&String> = alive.iter().filter(|u| **u != leader).collect();
    let burst = c.client_at(&format!("{},{}", followers[0], followers[1]), &token);
    let mut acknowledged = Vec::new();
    let mut killed_at = None;
    for i in 0..24 {
        let name = format!("burst-{i:02}");
        burst
            .create_vm(&stopped_vm(&name))
            .await
            .expect("create during the burst");
        acknowledged.push(name);
        if i == 8 {
            kill(&leader, &mut first, &mut c, &mut third);
            alive.retain(|u| *u != leader);
            killed_at = Some(Instant::now());
        }
    }
    let killed_at = killed_at.expect("killed");
    let new_leader = wait_until("a new leader", Duration::from_secs(15), || async {
        leaders(&http, &alive).await?.into_iter().next()
    })
    .await;
    let failover = killed_at.elapsed();
    eprintln!("new leader {new_leader} after {failover:?}");
    assert!(failover <= Duration::from_secs(10), "failover took {failover:?}");

    // Every acknowledged VM is there and bound to a node by a leader.
    wait_until("every acknowledged VM placed", Duration::from_secs(30), || async {
        let (vms, _) = everyone.list_all::<Vm>(&Default::default()).await.ok()?;
        let placed: Vec<&str> = vms
            .iter()
            .filter(|v| v.status.node.is_some())
            .map(|v| v.metadata.name.as_str())
            .collect();
        let missing: Vec<&String> = acknowledged.iter().filter(|n| !placed.contains(&n.as_str())).collect();
        if let Some(first) = missing.first() {
            let reason = vms
                .iter()
                .find(|v| &&v.metadata.name == first)
                .and_then(|v| v.status.reason.clone());
            eprintln!("not placed yet: {missing:?} ({first}: {reason:?})");
        }
        missing.is_empty().then_some(())
    })
    .await;

    // The new leader's controllers act: a VM created now starts on an agent.
    run_vm(&everyone, "after").await;

    // One etcd member of three dies: the API keeps serving.
    etcd.members[0].kill();
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        match everyone.create_vm(&stopped_vm("quorum")).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("create with two etcd members: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the API stopped serving with two etcd members of three: {e}"),
        }
    }
    assert_eq!(
        everyone.get::<Vm>("quorum").await.expect("quorum").metadata.name,
        "quorum"
    );
    assert_eq!(
        everyone.get::<Vm>("burst-00").await.expect("burst-00").metadata.name,
        "burst-00"
    );

    // A live migration runs while the leader, whichever it is, is killed:
    // it ends truthfully (the source agent drives it; its reports reach a
    // live server), with the guest paused no longer than its limit; the
    // agents go on with the servers left.
    let after = everyone.get::<Vm>("after").await.expect("after");
    let source = after.status.node.clone().expect("after is placed");
    let target = if source == "node-1" { "node-2" } else { "node-1" };
    let migration = everyone
        .create_migration(&CreateMigration {
            vm: "after".into(),
            target_node: Some(target.into()),
            strategy: MigrationStrategy::Precopy,
            max_downtime_ms: Some(500),
            bandwidth_mib_s: Some(16),
            transport: None,
        })
        .await
        .expect("start a migration");
    let leader = the_leader(&http, &alive).await;
    kill(&leader, &mut first, &mut c, &mut third);
    alive.retain(|u| *u != leader);
    wait_until("the surviving server to lead", Duration::from_secs(15), || async {
        leaders(&http, &alive).await?.into_iter().next()
    })
    .await;
    let ended = wait_until("the migration to end", Duration::from_secs(120), || async {
        everyone
            .get::<Migration>(&migration.metadata.name)
            .await
            .ok()
            .filter(|m| matches!(m.status.phase, MigrationPhase::Completed | MigrationPhase::Failed))
    })
    .await;
    assert_eq!(
        ended.status.phase,
        MigrationPhase::Completed,
        "{:?}",
        ended.status.error
    );
    let downtime = ended.status.downtime_ms.expect("downtime measured");
    assert!(downtime <= 500, "guest paused {downtime} ms, limit 500 ms");
    let moved = everyone.get::<Vm>("after").await.expect("after");
    assert_eq!(
        (moved.status.node.as_deref(), moved.status.phase),
        (Some(target), VmPhase::Running)
    );

    // A client naming the dead servers first uses the one left; a VM
    // created through it starts on an agent that failed over.
    let dead: Vec<String> = [&first.url, &c.url, &third.url]
        .into_iter()
        .filter(|u| !alive.contains(u))
        .cloned()
        .collect();
    let client = c.client_at(&format!("{},{}", dead.join(","), alive.join(",")), &token);
    run_vm(&client, "last").await;

    // Each VM went from no node to a node exactly once (read off etcd).
    let bound = collect_bindings(&store_url, since).await;
    for name in &acknowledged {
        let nodes = bound.get(name).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(nodes.len(), 1, "{name} was bound {nodes:?}");
    }
}

/// The servers among `urls` that say they lead; `None` when one does not answer.
async fn leaders(http: &reqwest::Client, urls: &[String]) -> Option<Vec<String>> {
    let mut leading = Vec::new();
    for url in urls {
        if readiness(http, url).await?.leader == Some(true) {
            leading.push(url.clone());
        }
    }
    // A campaign cut short by the etcd client's deadline once let two
    // servers lead at once (etcd resigns a cancelled campaign's key).
    assert!(leading.len() <= 1, "two servers lead at once: {leading:?}");
    Some(leading)
}

/// The one server among `urls` that leads.
async fn the_leader(http: &reqwest::Client, urls: &[String]) -> String {
    wait_until("one leader", Duration::from_secs(15), || async {
        let leading = leaders(http, urls).await?;
        (leading.len() == 1).then(|| leading[0].clone())
    })
    .await
}

/// Kills (SIGKILL) the server at `url`.
fn kill(url: &str, first: &mut ServerProc, c: &mut Cluster, third: &mut ServerProc) {
    if url == first.url {
        first.kill();
    } else if url == c.url {
        c.kill_server();
    } else {
        assert_eq!(url, third.url, "not one of the servers");
        third.kill();
    }
}

/// Bindings (node unset → set) per VM since `since`, replayed from etcd's history.
async fn collect_bindings(store_url: &str, since: u64) -> BTreeMap<String, Vec<String>> {
    let store = connect_when_ready(&store_url.parse().expect("url"), Duration::from_secs(10))
        .await
        .expect("etcd store");
    let now = store.revision().await.expect("revision");
    let mut changes = store.watch("vm", since).await.expect("watch");
    let mut bound: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(2), changes.next()).await {
        if ev.record.rev > now {
            break;
        }
        let node = ev.record.value["status"]["node"].as_str().map(str::to_string);
        let before = ev
            .prev
            .as_ref()
            .and_then(|p| p["status"]["node"].as_str().map(str::to_string));
        if let (Some(node), None, false) = (node, before, ev.event_type == EventType::Deleted) {
            bound.entry(ev.record.name.clone()).or_default().push(node);
        }
        if ev.record.rev == now {
            break;
        }
    }
    bound
}
