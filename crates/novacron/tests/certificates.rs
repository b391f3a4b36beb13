//! Node certificates that renew, revoke and survive a CA rotation, with
//! real agents: revocation reaches the other agents' TLS endpoints, renewal
//! happens without a restart, and a rotated CA keeps every connection
//! (server, agents, a live migration between agents) working.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{ok, wait_until, Cluster, Options};
use novacron_api::{
    CreateMigration, MigrationPhase, MigrationStrategy, MigrationTransport, Node, RunStrategy, VmPhase,
};
use novacron_tls::Identity;

const BOOT: Duration = Duration::from_secs(120);

fn node_identity(c: &Cluster, node: &str) -> Identity {
    let dir = c.dir.path().join(node).join("tls");
    Identity::load(&dir.join("agent.crt"), &dir.join("agent.key")).unwrap()
}

/// An HTTPS client presenting `identity`, trusting the CAs in `ca_pem`.
fn https_as(ca_pem: &str, identity: Option<&Identity>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(novacron_tls::client_config(ca_pem, identity).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

async fn status(client: &reqwest::Client, url: &str) -> Option<u16> {
    client.get(url).send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_node_is_refused_by_the_server_and_by_the_other_agents() {
    let c = Cluster::start(Options {
        agents: 3,
        ..Default::default()
    })
    .await;
    let ca = read(&c.ca_path());
    let node_1: Node = c.client.get("node-1").await.unwrap();
    let health = format!("{}/agent/v1/healthz", node_1.spec.address);
    // node-2's certificate, on a connection that stays open across the revocation.
    let as_node_2 = https_as(&ca, Some(&node_identity(&c, "node-2")));
    assert_eq!(status(&as_node_2, &health).await, Some(200));
    assert_eq!(status(&as_node_2, &format!("{}/v1/whoami", c.url)).await, Some(200));

    let asked = Instant::now();
    let out = ok(c.cli(&["node", "revoke", "node-2"]).output().unwrap());
    assert!(out.contains("certificate(s) revoked"), "{out}");
    let at_server = asked.elapsed();
    assert_eq!(status(&as_node_2, &format!("{}/v1/whoami", c.url)).await, Some(401));
    // node-1's agent learns it from the cluster's trust.
    wait_until("node-1's agent to refuse node-2", Duration::from_secs(10), || async {
        (status(&as_node_2, &health).await != Some(200)).then_some(())
    })
    .await;
    let at_agent = asked.elapsed();
    eprintln!(
        "revocation: refused by the server {} ms and by another agent {} ms after `node revoke` was run",
        at_server.as_millis(),
        at_agent.as_millis()
    );
    // The open connection gets 403; a new one does not get through the handshake.
    assert_eq!(status(&as_node_2, &health).await, Some(403));
    let fresh = https_as(&ca, Some(&node_identity(&c, "node-2")));
    assert!(
        fresh.get(&health).send().await.is_err(),
        "a revoked certificate passed the handshake"
    );
    // node-3 and the server still get in.
    let as_node_3 = https_as(&ca, Some(&node_identity(&c, "node-3")));
    assert_eq!(status(&as_node_3, &health).await, Some(200));

    let node_2: Node = c.client.get("node-2").await.unwrap();
    assert!(!node_2.status.ready);
    assert!(node_2.status.ready_reason.unwrap_or_default().contains("revoked"));
    let shown = ok(c.cli(&["ca", "show"]).output().unwrap());
    assert!(shown.contains("node node-2"), "{shown}");
    // Revoking what is not there changes nothing and says so.
    let again = c.cli(&["node", "revoke", "node-2"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not found"));
    let node_1: Node = c.client.get("node-1").await.unwrap();
    assert!(node_1.status.ready);

    // Deleting a node revokes its certificates too: its agent cannot bring it back.
    ok(c.cli(&["node", "delete", "node-3"]).output().unwrap());
    wait_until("node-1's agent to refuse node-3", Duration::from_secs(10), || async {
        (status(&as_node_3, &health).await != Some(200)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gone = c.client.get::<Node>("node-3").await.unwrap_err();
    assert_eq!(gone.status(), Some(404), "node-3 came back: {gone}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_renew_their_certificates_without_a_restart() {
    let mut c = Cluster::start(Options {
        agents: 2,
        node_cert_lifetime: Some("30s"),
        ..Default::default()
    })
    .await;
    let ca = read(&c.ca_path());
    let first = node_identity(&c, "node-1");
    let (_, expires) = first.validity().unwrap();
    let first_sha = first.fingerprint().unwrap();
    // Two thirds into 33 s of validity: about 19 s after the join.
    let renewed = wait_until("node-1 to renew its certificate", Duration::from_secs(40), || async {
        let now = node_identity(&c, "node-1");
        (now.fingerprint().unwrap() != first_sha).then_some(now)
    })
    .await;
    let (_, renewed_until) = renewed.validity().unwrap();
    assert!(renewed_until > expires);
    // Past the first certificate's expiry, the same agent process still
    // heartbeats and is reached by its peer: it uses the new one.
    let wait = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(3)).await;
    assert!(
        c.agent("node-1").child.try_wait().unwrap().is_none(),
        "the agent restarted"
    );
    let node_1: Node = c.client.get("node-1").await.unwrap();
    assert!(node_1.status.ready, "{:?}", node_1.status.ready_reason);
    let heartbeat = node_1.status.last_heartbeat.unwrap();
    assert!(
        chrono::Utc::now() - heartbeat < chrono::Duration::seconds(5),
        "last heartbeat {heartbeat}"
    );
    let as_node_2 = https_as(&ca, Some(&node_identity(&c, "node-2")));
    let health = format!("{}/agent/v1/healthz", node_1.spec.address);
    assert_eq!(status(&as_node_2, &health).await, Some(200));
    // The expired certificate is refused.
    let as_expired = https_as(&ca, Some(&first));
    assert!(as_expired.get(&health).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_rotation_keeps_the_server_the_agents_and_migrations_working() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("rotating", 128, RunStrategy::Manual, false).await;
    let vm = c.wait_phase("rotating", VmPhase::Running, BOOT).await;
    let old_ca = read(&c.ca_path());
    let before: Vec<String> = ["node-1", "node-2"]
        .iter()
        .map(|n| node_identity(&c, n).fingerprint().unwrap())
        .collect();

    let out = ok(c.cli(&["ca", "rotate"]).output().unwrap());
    assert!(out.contains("rotation under way"), "{out}");
    let new_ca = read(&c.ca_path());
    assert_ne!(new_ca, old_ca);
    // A client that knows only the old CA still trusts the server: the new
    // certificate carries the new CA signed by the old one.
    assert_eq!(
        status(&https_as(&old_ca, None), &format!("{}/healthz", c.url)).await,
        Some(200)
    );
    // Both agents renew onto the new CA by themselves.
    for (node, old) in ["node-1", "node-2"].iter().zip(&before) {
        wait_until(
            &format!("{node} to renew onto the new CA"),
            Duration::from_secs(20),
            || async { (node_identity(&c, node).fingerprint().unwrap() != *old).then_some(()) },
        )
        .await;
    }
    let out = ok(c.cli(&["ca", "finish-rotation"]).output().unwrap());
    assert!(out.contains("CAs trusted: 1"), "{out}");
    assert!(c.cli(&["ca", "finish-rotation"]).output().unwrap().status.code() != Some(0));

    // Agent to agent on the new certificates: a live migration. (A client
    // made before the rotation knows only the old CA.)
    let api = c.client_with_token(&c.token);
    let source = vm.status.node.clone().unwrap();
    let target = if source == "node-1" { "node-2" } else { "node-1" };
    let m = api
        .create_migration(&CreateMigration {
            vm: "rotating".into(),
            target_node: Some(target.into()),
            strategy: MigrationStrategy::Precopy,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            transport: None,
        })
        .await
        .unwrap();
    let done = wait_until("the migration to end", Duration::from_secs(180), || async {
        let m: novacron_api::Migration = api.get(&m.metadata.name).await.ok()?;
        m.status.phase.is_final().then_some(m)
    })
    .await;
    assert_eq!(done.status.phase, MigrationPhase::Completed, "{:?}", done.status.error);
    assert_eq!(done.status.transport, Some(MigrationTransport::Dwcp));
    let moved: novacron_api::Vm = api.get("rotating").await.unwrap();
    assert_eq!(moved.status.node.as_deref(), Some(target));
    // The old CA alone no longer gets a client in.
    assert!(https_as(&old_ca, None)
        .get(format!("{}/healthz", c.url))
        .send()
        .await
        .is_err());
    assert_eq!(
        status(&https_as(&new_ca, None), &format!("{}/healthz", c.url)).await,
        Some(200)
    );
}
