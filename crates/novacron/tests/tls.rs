//! Mutual TLS between the server and agents: join tokens work once, agents
//! are known by their certificates, and anything without a certificate from
//! the cluster CA is refused. (Every other end-to-end test also runs its
//! agents over mTLS: the harness default.)
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use common::{Cluster, Options};
use novacron_api::{CreateToken, IssuedToken, JoinNode, JoinedNode, Node};
use novacron_client::Client;
use serde_json::Value;

async fn token(c: &Cluster, name: &str, role: &str, join: bool) -> String {
    let issued: IssuedToken = c
        .client
        .post_json(
            "tokens",
            &CreateToken {
                name: name.into(),
                role: role.into(),
                project: None,
                ttl_s: None,
                join,
            },
        )
        .await
        .expect("token");
    issued.secret
}

fn ca(c: &Cluster) -> String {
    std::fs::read_to_string(c.ca_path()).unwrap()
}

/// A raw HTTPS client trusting the cluster CA and presenting `identity`.
fn https(c: &Cluster, identity: Option<&novacron_tls::Identity>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(novacron_tls::client_config(&ca(c), identity).unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_join_once_and_only_cluster_certificates_get_in() {
    let c = Cluster::start(Options::default()).await;
    assert!(c.url.starts_with("https://"));
    let node: Node = c.client.get("node-1").await.unwrap();
    assert!(node.spec.address.starts_with("https://"), "{}", node.spec.address);
    assert!(c.dir.path().join("node-1/tls/agent.crt").exists());
    let key_mode = std::fs::metadata(c.dir.path().join("node-1/tls/agent.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);

    // A join token works once.
    let join = token(&c, "join-x", "join", true).await;
    let joiner = Client::with_tls(&c.url, &join, Some(novacron_tls::client_config(&ca(&c), None).unwrap())).unwrap();
    let req = JoinNode {
        name: "node-x".into(),
        hosts: vec!["127.0.0.1".into()],
    };
    let joined: JoinedNode = joiner.post_json("nodes/join", &req).await.expect("first join");
    assert_eq!(joined.ca_pem.trim(), ca(&c).trim());
    let again = joiner.post_json::<_, JoinedNode>("nodes/join", &req).await.unwrap_err();
    assert_eq!(again.status(), Some(401), "{again}");
    // A join token can do nothing else.
    let join2 = token(&c, "join-y", "join", true).await;
    let (status, _) = get(&https(&c, None), &c, "/v1/vms", Some(&join2)).await;
    assert_eq!(status, 403);

    // The issued certificate is an agent identity: no token needed, agent rights only.
    let identity = novacron_tls::Identity {
        cert_pem: joined.cert_pem,
        key_pem: joined.key_pem,
    };
    let as_agent = https(&c, Some(&identity));
    let (status, body) = get(&as_agent, &c, "/v1/whoami", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["actor"].as_str(), body["role"].as_str()),
        (Some("node:node-x"), Some("agent"))
    );
    // It speaks for its own node only.
    let resp = as_agent
        .post(format!("{}/v1/nodes/node-1/heartbeat", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = as_agent
        .post(format!("{}/v1/projects", c.url))
        .json(&serde_json::json!({"name": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // An agent token is refused over TLS: agents use certificates.
    let agent_token = token(&c, "agent-token", "agent", false).await;
    let (status, body) = get(&https(&c, None), &c, "/v1/nodes", Some(&agent_token)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("certificate"), "{body}");
    // No token, no certificate: refused.
    let (status, _) = get(&https(&c, None), &c, "/v1/nodes", None).await;
    assert_eq!(status, 401);

    // A certificate from another CA does not get through the handshake.
    let other = tempfile::tempdir().unwrap();
    let foreign = novacron_tls::ClusterCa::load_or_create(other.path())
        .unwrap()
        .issue("node:node-1", &["127.0.0.1".into()], None)
        .unwrap();
    let err = https(&c, Some(&foreign))
        .get(format!("{}/v1/whoami", c.url))
        .send()
        .await
        .expect_err("foreign certificate accepted");
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // The agent's own endpoint requires a cluster certificate too: a client
    // without one gets in for /metrics only.
    let agent_url = format!("{}/agent/v1/vms/none/logs", node.spec.address);
    let resp = https(&c, None).get(&agent_url).send().await.expect("agent");
    assert_eq!(resp.status(), 401, "agent answered a client without a certificate");
    let metrics_url = format!("{}/metrics", node.spec.address);
    let scrape = |token: Option<String>| {
        let req = https(&c, None).get(&metrics_url);
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        async move { req.send().await.expect("agent metrics").status().as_u16() }
    };
    assert_eq!(scrape(None).await, 401);
    assert_eq!(scrape(Some("not-a-token".into())).await, 401);
    let viewer = token(&c, "scrape-viewer", "viewer", false).await;
    assert_eq!(scrape(Some(viewer)).await, 403, "a token without metrics:read");
    let monitoring = token(&c, "scrape-monitoring", "monitoring", false).await;
    assert_eq!(scrape(Some(monitoring)).await, 200);
    let resp = https(&c, Some(&foreign)).get(&agent_url).send().await;
    assert!(resp.is_err(), "agent answered a foreign certificate");
    // With a cluster certificate the handshake passes (the agent then wants the server's secret).
    let resp = as_agent
        .get(&agent_url)
        .send()
        .await
        .expect("cluster certificate refused");
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

/// A server certificate from elsewhere (`--tls-cert/--tls-key`): clients and
/// joining agents trust its CA; agents still get certificates from the cluster CA.
#[tokio::test(flavor = "multi_thread")]
async fn server_with_a_given_certificate_still_runs_agents_on_mtls() {
    let certs = tempfile::tempdir().unwrap();
    let outside_ca = novacron_tls::ClusterCa::load_or_create(certs.path()).unwrap();
    outside_ca
        .issue("api.example", &["127.0.0.1".into()], None)
        .unwrap()
        .save(&certs.path().join("server.crt"), &certs.path().join("server.key"))
        .unwrap();
    let c = Cluster::start(Options {
        agents: 2,
        server_cert: Some(certs.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    let cluster_ca = std::fs::read_to_string(c.dir.path().join("server/pki/ca.crt")).unwrap();
    assert_ne!(cluster_ca, outside_ca.cert_pem);
    // The CLI trusts the given certificate's CA.
    let out = c.cli(&["node", "list"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node-1") && text.contains("node-2"), "{text}");
    // Both agents joined and run on cluster certificates.
    for n in ["node-1", "node-2"] {
        let node: Node = c.client.get(n).await.unwrap();
        assert!(node.status.ready && node.spec.address.starts_with("https://"));
    }
    // A client trusting only the cluster CA does not accept the given certificate.
    let only_cluster = reqwest::Client::builder()
        .use_preconfigured_tls(novacron_tls::client_config(&cluster_ca, None).unwrap())
        .build()
        .unwrap();
    assert!(only_cluster.get(format!("{}/healthz", c.url)).send().await.is_err());
}

async fn get(http: &reqwest::Client, c: &Cluster, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http.get(format!("{}{path}", c.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}
