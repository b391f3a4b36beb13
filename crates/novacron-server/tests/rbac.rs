//! Identity and authorization, in process (no sockets, no agents): the full
//! endpoint × role × project matrix, quotas, login, tokens, TOTP, audit
//! tampering and hostile input.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use novacron_api::{Metadata, Migration, MigrationPhase, Vm, VmPhase, VmSpec};
use novacron_server::{AppState, ServerConfig};
use novacron_store::StoreExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Harness {
    app: Router,
    state: AppState,
    admin: String,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Harness {
        Self::with_rate_limit(None).await
    }

    async fn with_rate_limit(rate_limit: Option<(u32, u32)>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = novacron_server::prepare(ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            node_grace: Duration::from_secs(15),
            rate_limit,
            tls: novacron_server::TlsConfig::Off,
        })
        .await
        .unwrap();
        let admin = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Harness {
            app: novacron_server::app(state.clone()),
            state,
            admin,
            dir,
        }
    }

    async fn raw(&self, method: Method, path: &str, token: Option<&str>, body: Body) -> axum::response::Response {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        match token.map(|t| (t, t.strip_prefix(CERT))) {
            Some((_, Some(sha256))) => {
                req = req.extension(axum::extract::ConnectInfo(novacron_tls::PeerInfo {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    cert_sha256: Some(sha256.to_string()),
                }));
            }
            Some((t, None)) => req = req.header("authorization", format!("Bearer {t}")),
            None => {}
        }
        self.app.clone().oneshot(req.body(body).unwrap()).await.unwrap()
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let resp = self.raw(method, path, token, body).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, v) = self.call(method.clone(), path, Some(&self.admin), Some(body)).await;
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    async fn token(&self, name: &str, role: &str, project: Option<&str>) -> String {
        let v = self
            .admin(
                Method::POST,
                "/v1/tokens",
                json!({"name": name, "role": role, "project": project}),
            )
            .await;
        v["secret"].as_str().unwrap().to_string()
    }

    /// Everything but the audit log, for "nothing was written" checks.
    async fn snapshot(&self) -> Vec<(String, Vec<Value>)> {
        let mut out = Vec::new();
        for kind in ["vm", "image", "migration", "node", "project", "user", "role", "token"] {
            let page = self.state.store.list(kind, None, None, 100_000).await.unwrap();
            let mut values: Vec<Value> = page.items.into_iter().map(|r| r.value).collect();
            for v in &mut values {
                // Heartbeat-free in-process server: nothing else changes these.
                v["metadata"]["resource_version"] = Value::Null;
            }
            out.push((kind.to_string(), values));
        }
        out
    }
}

const PRINCIPALS: [&str; 8] = [
    "admin",
    "project-admin",
    "operator",
    "viewer",
    "agent",
    "vm-reader",
    "node-1",
    "node-2",
];

/// A caller "token" of this form stands for a node's client certificate
/// (its SHA-256), presented as the TLS layer would.
const CERT: &str = "cert:";

/// Fixtures: projects alpha (the principals' own) and beta (another), a node,
/// an image, a running VM and a migration in each project.
async fn fixtures(h: &Harness) -> Vec<String> {
    for p in ["alpha", "beta"] {
        h.admin(Method::POST, "/v1/projects", json!({"name": p})).await;
    }
    h.admin(
        Method::POST,
        "/v1/nodes/register",
        json!({"name": "node-1", "address": "http://127.0.0.1:9", "capacity": {"vcpus": 64, "memory_mib": 65536}}),
    )
    .await;
    h.admin(
        Method::POST,
        "/v1/roles",
        json!({"name": "vm-reader", "permissions": ["vms:read"]}),
    )
    .await;
    for p in ["alpha", "beta"] {
        h.admin(
            Method::POST,
            "/v1/images",
            json!({"name": format!("img-{p}"), "project": p, "format": "kernel"}),
        )
        .await;
        for part in ["kernel", "initrd"] {
            let resp = h
                .raw(
                    Method::PUT,
                    &format!("/v1/images/img-{p}/files/{part}"),
                    Some(&h.admin),
                    Body::from(vec![7u8; 1024]),
                )
                .await;
            assert!(resp.status().is_success(), "upload {part}: {}", resp.status());
        }
    }
    reset_objects(h).await;
    let mut tokens = Vec::new();
    for (name, role, project) in [
        ("t-admin", "admin", None),
        ("t-project-admin", "admin", Some("alpha")),
        ("t-operator", "operator", Some("alpha")),
        ("t-viewer", "viewer", Some("alpha")),
        ("t-agent", "agent", None),
        ("t-vm-reader", "vm-reader", Some("alpha")),
    ] {
        tokens.push(h.token(name, role, project).await);
    }
    // Nodes, known by the certificates the CA issued them at join: VMs and
    // migration sources are on node-1, migration targets on node-2.
    for node in ["node-1", "node-2"] {
        let cert_sha256 = format!("{node}-certificate-sha256");
        let credential = novacron_api::NodeCredential {
            metadata: Metadata::new(node, Default::default()),
            cert_sha256: cert_sha256.clone(),
        };
        h.state.store.create_obj(&credential).await.unwrap();
        h.state.auth.set_credential(&credential);
        tokens.push(format!("{CERT}{cert_sha256}"));
    }
    tokens
}

/// (Re)creates the VMs and migrations the matrix acts on.
async fn reset_objects(h: &Harness) {
    let store = &h.state.store;
    for p in ["alpha", "beta"] {
        let name = format!("vm-{p}");
        if store.get_obj::<Vm>(&name).await.unwrap().is_some() {
            store.delete_obj::<Vm>(&name, None).await.unwrap();
        }
        let mut metadata = Metadata::new(&name, Default::default());
        metadata.project = p.into();
        let mut vm = Vm {
            metadata,
            spec: VmSpec::new(&format!("img-{p}"), 1, 128),
            status: Default::default(),
        };
        vm.status.phase = VmPhase::Running;
        vm.status.node = Some("node-1".into());
        store.create_obj(&vm).await.unwrap();

        let name = format!("mig-{p}");
        if store.get_obj::<Migration>(&name).await.unwrap().is_some() {
            store.delete_obj::<Migration>(&name, None).await.unwrap();
        }
        let mut metadata = Metadata::new(&name, Default::default());
        metadata.project = p.into();
        let mut m: Migration = serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {"vm": format!("vm-{p}")},
        }))
        .unwrap();
        m.status.phase = MigrationPhase::Transferring;
        m.status.source_node = "node-1".into();
        m.status.target_node = "node-2".into();
        store.create_obj(&m).await.unwrap();
    }
    for (kind, name) in [("user", "u-target"), ("token", "t-target"), ("role", "r-target")] {
        let _ = h.state.store.delete(kind, name, None).await;
    }
    h.admin(
        Method::POST,
        "/v1/users",
        json!({"name": "u-target", "password": "long-enough-1"}),
    )
    .await;
    h.admin(
        Method::POST,
        "/v1/roles",
        json!({"name": "r-target", "permissions": ["vms:read"]}),
    )
    .await;
    h.admin(
        Method::POST,
        "/v1/tokens",
        json!({"name": "t-target", "role": "viewer"}),
    )
    .await;
}

/// The expected answer for each endpoint: for principals in the order of
/// `PRINCIPALS`, `Y` = allowed, `n` = denied (401/403/404), acting on an
/// object of the principals' own project (alpha) and of another one (beta).
/// Cluster-wide endpoints have the same answer in both columns.
const MATRIX: &[(&str, &str, &str, &str)] = &[
    ("GET", "/v1/vms", "YYYYYYnn", "YYYYYYnn"),
    ("POST", "/v1/vms", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/vms/{name}", "YYYYYYYY", "YnnnYnYY"),
    ("DELETE", "/v1/vms/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/start", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/stop", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/reboot", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/pause", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/resume", "YYYnnnnn", "Ynnnnnnn"),
    ("PUT", "/v1/vms/{name}/status", "YYnnYnYn", "YnnnYnYn"),
    ("POST", "/v1/vms/{name}/finalize", "YYnnYnYn", "YnnnYnYn"),
    ("GET", "/v1/vms/{name}/logs", "YYYYYYYY", "YnnnYnYY"),
    ("GET", "/v1/vms/{name}/console", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/images", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("DELETE", "/v1/images/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("PUT", "/v1/images/{name}/files/{part}", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images/{name}/files/{part}", "YYYYYnYY", "YnnnYnYY"),
    ("GET", "/v1/migrations", "YYYYYnnn", "YYYYYnnn"),
    ("POST", "/v1/migrations", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/migrations/plan", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/migrations/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("POST", "/v1/migrations/{name}/cancel", "YYYnnnnn", "Ynnnnnnn"),
    ("PUT", "/v1/migrations/{name}/status", "YYnnYnYY", "YnnnYnYY"),
    ("POST", "/v1/migrations/{name}/complete", "YYnnYnYY", "YnnnYnYY"),
    ("GET", "/v1/nodes", "YYYYYnYY", "YYYYYnYY"),
    ("GET", "/v1/nodes/{name}", "YYYYYnYY", "YYYYYnYY"),
    ("DELETE", "/v1/nodes/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/nodes/register", "YnnnYnYn", "YnnnYnYn"),
    ("POST", "/v1/nodes/join", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/nodes/{name}/heartbeat", "YnnnYnYn", "YnnnYnYn"),
    ("POST", "/v1/nodes/{name}/cordon", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/nodes/{name}/uncordon", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/whoami", "YYYYYYYY", "YYYYYYYY"),
    ("GET", "/v1/scheduler", "YYYYYnYY", "YYYYYnYY"),
    ("PUT", "/v1/scheduler", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/scheduler/explain", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/scheduler/rebalance", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/vms/{name}/explain", "YYYYYYYY", "YnnnYnYY"),
    ("GET", "/v1/users", "YYnnnnnn", "YYnnnnnn"),
    ("POST", "/v1/users", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/users/{name}", "YYnnnnnn", "YYnnnnnn"),
    ("DELETE", "/v1/users/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/users/{name}/totp", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/tokens", "YYYYYYYY", "YYYYYYYY"),
    ("POST", "/v1/tokens", "YYYYnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/tokens/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/roles", "YYnnnnnn", "YYnnnnnn"),
    ("POST", "/v1/roles", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/roles/{name}", "YYnnnnnn", "YYnnnnnn"),
    ("DELETE", "/v1/roles/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/projects", "YYYYnnnn", "YYYYnnnn"),
    ("POST", "/v1/projects", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/projects/{name}", "YYYYnnnn", "Ynnnnnnn"),
    ("PUT", "/v1/projects/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/projects/{name}", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/audit", "YYnnnnnn", "YYnnnnnn"),
    ("GET", "/v1/audit/verify", "Ynnnnnnn", "Ynnnnnnn"),
];

/// Endpoints that need no token.
const PUBLIC: &[(&str, &str)] = &[("POST", "/v1/login")];

/// The concrete request for an endpoint, acting on project `p`.
async fn request_for(h: &Harness, method: &str, template: &str, p: &str, n: usize) -> (String, Option<Value>) {
    let kind = template
        .trim_start_matches("/v1/")
        .split('/')
        .next()
        .unwrap_or_default();
    let name = match kind {
        "vms" => format!("vm-{p}"),
        "images" => format!("img-{p}"),
        "migrations" => format!("mig-{p}"),
        "nodes" => "node-1".into(),
        "users" => "u-target".into(),
        "tokens" => "t-target".into(),
        "roles" => "r-target".into(),
        "projects" => p.into(),
        _ => String::new(),
    };
    let path = template.replace("{name}", &name).replace("{part}", "kernel");
    let fresh = format!("new-{n}");
    let body = match (method, template) {
        ("POST", "/v1/vms") => Some(
            json!({"name": fresh, "project": p, "spec": {"image": format!("img-{p}"), "vcpus": 1, "memory_mib": 128}}),
        ),
        ("POST", "/v1/images") => Some(json!({"name": fresh, "project": p, "format": "kernel"})),
        ("POST", "/v1/scheduler/explain") => Some(
            json!({"name": fresh, "project": p, "spec": {"image": format!("img-{p}"), "vcpus": 1, "memory_mib": 128}}),
        ),
        ("PUT", "/v1/scheduler") => Some(json!({"profile": "spread", "cpu_overcommit": 2.0})),
        ("POST", "/v1/scheduler/rebalance") => Some(json!({"mode": "balance"})),
        ("POST", "/v1/migrations") | ("POST", "/v1/migrations/plan") => Some(json!({"vm": format!("vm-{p}")})),
        ("POST", "/v1/nodes/join") => Some(json!({"name": "node-9", "hosts": ["127.0.0.1"]})),
        ("POST", "/v1/nodes/register") => Some(
            json!({"name": "node-1", "address": "http://127.0.0.1:9", "capacity": {"vcpus": 64, "memory_mib": 65536}}),
        ),
        ("POST", "/v1/users") => Some(json!({"name": fresh, "password": "long-enough-1"})),
        ("POST", "/v1/tokens") => Some(json!({"name": fresh, "role": "viewer", "project": p})),
        ("POST", "/v1/roles") => Some(json!({"name": fresh, "permissions": ["vms:read"]})),
        ("POST", "/v1/projects") => Some(json!({"name": fresh})),
        ("PUT", "/v1/projects/{name}") => Some(json!({"quota": {"vms": 100}})),
        ("PUT", "/v1/vms/{name}/status") => {
            let vm = h.state.store.get_obj::<Vm>(&name).await.unwrap().unwrap();
            Some(serde_json::to_value(vm).unwrap())
        }
        ("PUT", "/v1/migrations/{name}/status") => {
            let m = h.state.store.get_obj::<Migration>(&name).await.unwrap().unwrap();
            Some(serde_json::to_value(m).unwrap())
        }
        ("POST", "/v1/migrations/{name}/complete") => Some(json!({"target_qemu_pid": 1, "status": {}})),
        ("PUT", "/v1/images/{name}/files/{part}") => None,
        _ => None,
    };
    (path, body)
}

fn spec_endpoints(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// Whether the document declares `status` for the operation.
fn declared(doc: &Value, method: &str, template: &str, status: StatusCode) -> bool {
    doc["paths"][template][method.to_lowercase()]["responses"]
        .get(status.as_str())
        .is_some()
}

#[tokio::test]
async fn every_endpoint_role_and_project_matches_the_matrix() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;

    // The matrix covers exactly the API: a new endpoint without a row fails here.
    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let in_spec = spec_endpoints(&doc);
    // Creates link to the operations on what they made, by its name.
    let link = &doc["paths"]["/v1/vms"]["post"]["responses"]["201"]["links"]["get_vm"];
    assert_eq!(link["operationId"], "get_vm", "{link}");
    assert_eq!(link["parameters"]["path.name"], "$response.body#/metadata/name");
    let in_matrix: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .chain(PUBLIC.iter().map(|(m, p)| (m.to_string(), p.to_string())))
        .collect();
    let missing: Vec<_> = in_spec.difference(&in_matrix).collect();
    let stale: Vec<_> = in_matrix.difference(&in_spec).collect();
    assert!(
        missing.is_empty(),
        "endpoints without an authorization rule in MATRIX: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "MATRIX rows for endpoints that do not exist: {stale:?}"
    );

    let mut wrong = Vec::new();
    let mut n = 0;
    for (method, template, own, other) in MATRIX {
        for (project, expected) in [("alpha", own), ("beta", other)] {
            for (i, who) in PRINCIPALS.iter().enumerate() {
                n += 1;
                let want_allowed = expected.as_bytes()[i] == b'Y';
                let (path, body) = request_for(&h, method, template, project, n).await;
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                let resp = match (*method, *template) {
                    ("PUT", "/v1/images/{name}/files/{part}") => h
                        .raw(m, &path, Some(&tokens[i]), Body::from(vec![1u8; 16]))
                        .await
                        .status(),
                    _ => h.call(m, &path, Some(&tokens[i]), body).await.0,
                };
                let denied = matches!(
                    resp,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                );
                // 502/503: allowed, then the (absent) agent could not be reached.
                assert_ne!(resp, StatusCode::INTERNAL_SERVER_ERROR, "{method} {path} as {who}");
                if !declared(&doc, method, template, resp) {
                    wrong.push(format!(
                        "{method} {template}: answered {resp}, which the document does not declare"
                    ));
                }
                if denied == want_allowed {
                    wrong.push(format!(
                        "{method} {path} as {who} ({project}): got {resp}, expected {}",
                        if want_allowed { "allowed" } else { "denied" }
                    ));
                }
                if !denied && *method != "GET" {
                    reset_objects(&h).await;
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} checks differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Without a token, every protected endpoint is refused.
    for (method, template, _, _) in MATRIX {
        let (path, body) = request_for(&h, method, template, "alpha", 0).await;
        let (status, _) = h
            .call(Method::from_bytes(method.as_bytes()).unwrap(), &path, None, body)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        assert!(
            declared(&doc, method, template, status),
            "{method} {template}: 401 undeclared"
        );
    }
}

#[tokio::test]
async fn lists_show_only_the_callers_project() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = h.call(Method::GET, "/v1/vms", Some(&tokens[0]), None).await;
    assert_eq!(names(&all), ["vm-alpha", "vm-beta"]);
    let (_, own) = h.call(Method::GET, "/v1/vms", Some(&tokens[2]), None).await;
    assert_eq!(names(&own), ["vm-alpha"]);
    let (_, own) = h.call(Method::GET, "/v1/migrations", Some(&tokens[3]), None).await;
    assert_eq!(names(&own), ["mig-alpha"]);
    let (_, projects) = h.call(Method::GET, "/v1/projects", Some(&tokens[3]), None).await;
    assert_eq!(names(&projects), ["alpha"]);
    // A public image is visible everywhere.
    h.admin(
        Method::POST,
        "/v1/images",
        json!({"name": "shared", "format": "kernel", "public": true}),
    )
    .await;
    let (_, images) = h.call(Method::GET, "/v1/images", Some(&tokens[3]), None).await;
    assert_eq!(names(&images), ["img-alpha", "shared"]);
}

#[tokio::test]
async fn quotas_are_enforced_and_named() {
    let h = Harness::new().await;
    fixtures(&h).await;
    h.admin(
        Method::PUT,
        "/v1/projects/alpha",
        json!({"quota": {"vcpus": 3, "memory_mib": 1024, "vms": 3}}),
    )
    .await;
    let operator = h.token("op", "operator", Some("alpha")).await;
    let create = |name: &str, vcpus: u32, mem: u64| json!({"name": name, "spec": {"image": "img-alpha", "vcpus": vcpus, "memory_mib": mem}});
    // vm-alpha (1 vCPU, 128 MiB) exists; 2 more vCPUs fit, a third does not.
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a1", 2, 256)))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["metadata"]["project"], "alpha");
    let before = h.snapshot().await;
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a2", 1, 128)))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded");
    assert_eq!(v["error"]["field"], "quota.vcpus");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit 3, in use 3, requested 1"),
        "{v}"
    );
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a3", 0, 128)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(h.snapshot().await, before, "a refused create wrote something");
    let (_, project) = h.call(Method::GET, "/v1/projects/alpha", Some(&operator), None).await;
    assert_eq!(
        project["usage"],
        json!({"vcpus": 3, "memory_mib": 384, "disk_mib": 2048, "vms": 2})
    );
    // Memory names its own quota.
    h.admin(Method::PUT, "/v1/projects/alpha", json!({"quota": {"memory_mib": 400}}))
        .await;
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a4", 1, 64)))
        .await;
    assert_eq!(
        (status, &v["error"]["field"]),
        (StatusCode::FORBIDDEN, &json!("quota.memory_mib"))
    );
    // Unknown project: 422 naming the field.
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/vms",
            Some(&h.admin),
            Some(json!({"name": "x", "project": "nope", "spec": {"image": "img-alpha", "vcpus": 1, "memory_mib": 64}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

#[tokio::test]
async fn login_tokens_expiry_revocation_and_totp() {
    let h = Harness::new().await;
    fixtures(&h).await;
    h.admin(
        Method::POST,
        "/v1/users",
        json!({"name": "alice", "password": "correct horse", "bindings": [{"role": "operator", "project": "alpha"}]}),
    )
    .await;
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/users",
            Some(&h.admin),
            Some(json!({"name": "bob", "password": "short"})),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("password"))
    );
    // Stored as argon2id, never returned.
    let stored = h
        .state
        .store
        .get_obj::<novacron_api::User>("alice")
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.password_hash.starts_with("$argon2id$"),
        "{}",
        stored.password_hash
    );
    let (_, shown) = h.call(Method::GET, "/v1/users/alice", Some(&h.admin), None).await;
    assert!(shown.get("password_hash").is_none(), "{shown}");

    let login = |password: &str, totp: Option<String>| json!({"user": "alice", "password": password, "totp": totp});
    let (status, v) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let secret = v["secret"].as_str().unwrap().to_string();
    assert_eq!(v["token"]["project"], "alpha");
    assert_eq!(v["token"]["role"], "operator");
    assert!(v["token"]["expires_at"].is_string());
    let (status, me) = h.call(Method::GET, "/v1/whoami", Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["user"].as_str(), me["project"].as_str()),
        (Some("alice"), Some("alpha"))
    );
    // The token is stored as a hash only.
    let name = v["token"]["metadata"]["name"].as_str().unwrap().to_string();
    let stored = h
        .state
        .store
        .get_obj::<novacron_api::Token>(&name)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(stored.secret_sha256, secret);
    assert!(!serde_json::to_string(&stored).unwrap().contains(&secret));

    // A user cannot mint a token above their own rights.
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&secret),
            Some(json!({"name": "escalate", "role": "admin"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&secret),
            Some(json!({"name": "alice-ci", "role": "viewer", "ttl_s": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["token"]["project"], "alpha", "a derived token keeps the project");
    let ci = v["secret"].as_str().unwrap().to_string();
    let (_, mine) = h.call(Method::GET, "/v1/tokens", Some(&secret), None).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 2, "{mine}");
    // Revocation takes effect at once.
    let (status, _) = h.call(Method::DELETE, "/v1/tokens/alice-ci", Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = h.call(Method::GET, "/v1/whoami", Some(&ci), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");

    // Expiry: a token past its time is refused.
    h.state
        .store
        .modify::<novacron_api::Token, _>(&name, |t| {
            t.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
            true
        })
        .await
        .unwrap();
    let expired = h
        .state
        .store
        .get_obj::<novacron_api::Token>(&name)
        .await
        .unwrap()
        .unwrap();
    h.state.auth.insert_token(&expired);
    let (status, v) = h.call(Method::GET, "/v1/whoami", Some(&secret), None).await;
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("Token expired"))
    );

    // TOTP: once enabled, a login needs the current code.
    let (_, fresh) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    let fresh = fresh["secret"].as_str().unwrap().to_string();
    let (status, enrol) = h.call(Method::POST, "/v1/users/alice/totp", Some(&fresh), None).await;
    assert_eq!(status, StatusCode::OK, "{enrol}");
    let totp_secret = enrol["secret"].as_str().unwrap();
    let (status, v) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("This user needs a TOTP code"))
    );
    let code = novacron_server::totp::code(totp_secret, chrono::Utc::now().timestamp()).unwrap();
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/login",
            None,
            Some(login("correct horse", Some(code))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Throttling: after five failures even the right password waits.
    for _ in 0..5 {
        let (status, _) = h
            .call(Method::POST, "/v1/login", None, Some(login("wrong", None)))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let resp = h
        .raw(
            Method::POST,
            "/v1/login",
            None,
            Body::from(login("correct horse", None).to_string()),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "Retry-After {retry}");

    // Deleting the user revokes their tokens.
    h.admin(Method::DELETE, "/v1/users/alice", json!(null)).await;
    let (status, _) = h.call(Method::GET, "/v1/whoami", Some(&fresh), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn custom_roles_grant_exactly_their_permissions() {
    let h = Harness::new().await;
    fixtures(&h).await;
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/roles",
            Some(&h.admin),
            Some(json!({"name": "bad", "permissions": ["vms:fly"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    h.admin(
        Method::POST,
        "/v1/roles",
        json!({"name": "restarter", "permissions": ["vms:read", "vms:update"]}),
    )
    .await;
    let t = h.token("restart-bot", "restarter", Some("alpha")).await;
    // Lifecycle actions wait for migrations; the fixture's one is not needed here.
    h.state.store.delete_obj::<Migration>("mig-alpha", None).await.unwrap();
    let (status, _) = h.call(Method::POST, "/v1/vms/vm-alpha/reboot", Some(&t), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.call(Method::DELETE, "/v1/vms/vm-alpha", Some(&t), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Deleting the role takes its permissions away from its tokens.
    h.admin(Method::DELETE, "/v1/roles/restarter", json!(null)).await;
    let (status, _) = h.call(Method::POST, "/v1/vms/vm-alpha/reboot", Some(&t), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn audit_records_requests_and_detects_tampering() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    h.state.store.delete_obj::<Migration>("mig-alpha", None).await.unwrap();
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-beta/stop", Some(&tokens[2]), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-alpha/stop", Some(&tokens[3]), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call(Method::GET, "/v1/vms", Some("wrong-token"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-alpha/stop", Some(&tokens[2]), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (_, all) = h.call(Method::GET, "/v1/audit?limit=1000", Some(&h.admin), None).await;
    let items = all["items"].as_array().unwrap();
    let last = |action: &str| {
        items
            .iter()
            .rev()
            .find(|r| r["entry"]["action"] == action)
            .cloned()
            .unwrap()
    };
    let ok = last("POST /v1/vms/vm-alpha/stop");
    assert_eq!(ok["entry"]["actor"], "token:t-operator");
    assert_eq!(ok["entry"]["project"], "alpha");
    assert_eq!(ok["entry"]["target"], "vms/vm-alpha");
    assert_eq!(ok["entry"]["status"], 200);
    let unauth = last("GET /v1/vms");
    assert_eq!(
        (unauth["entry"]["actor"].as_str(), unauth["entry"]["status"].as_u64()),
        (Some("anonymous"), Some(401))
    );
    assert_eq!(unauth["entry"]["reason"], "Invalid token");
    let denied = items
        .iter()
        .find(|r| r["entry"]["action"] == "POST /v1/vms/vm-alpha/stop" && r["entry"]["status"] == 403)
        .unwrap();
    assert_eq!(denied["entry"]["actor"], "token:t-viewer");
    assert_eq!(
        denied["entry"]["project"], "alpha",
        "a refusal names the project of the path"
    );
    // Filters.
    let (_, by_user) = h
        .call(Method::GET, "/v1/audit?user=token:t-viewer", Some(&h.admin), None)
        .await;
    assert!(!by_user["items"].as_array().unwrap().is_empty());
    assert!(by_user["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["entry"]["actor"] == "token:t-viewer"));
    let (_, later) = h
        .call(
            Method::GET,
            "/v1/audit?since=2999-01-01T00:00:00Z",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(later["items"].as_array().unwrap().len(), 0);

    let (_, verdict) = h.call(Method::GET, "/v1/audit/verify", Some(&h.admin), None).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    let n = verdict["records"].as_u64().unwrap();
    assert!(n > 10, "{verdict}");

    // Tamper with the stored log directly in the database.
    let db = rusqlite::Connection::open(h.dir.path().join("novacron.db")).unwrap();
    let verify = || async {
        let (_, v) = h.call(Method::GET, "/v1/audit/verify", Some(&h.admin), None).await;
        v
    };
    let get = |seq: u64| -> String {
        db.query_row(
            "SELECT data FROM objects WHERE kind='audit' AND name=?1",
            [format!("{seq:016}")],
            |r| r.get(0),
        )
        .unwrap()
    };
    let put = |seq: u64, d: &str| {
        db.execute(
            "UPDATE objects SET data=?1 WHERE kind='audit' AND name=?2",
            [d, &format!("{seq:016}")],
        )
        .unwrap()
    };
    // 1. Change a record.
    let d3 = get(3);
    let changed = d3.replacen("\"status\":", "\"status\":1", 1);
    assert_ne!(changed, d3);
    put(3, &changed);
    let v = verify().await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problems"].to_string().contains("record 3 was changed"), "{v}");
    put(3, &d3);
    assert_eq!(verify().await["ok"], true);
    // 2. Reorder: swap the contents of records 4 and 5.
    let (d4, d5) = (get(4), get(5));
    put(4, &d5);
    put(5, &d4);
    let v = verify().await;
    assert_eq!(v["ok"], false, "{v}");
    put(4, &d4);
    put(5, &d5);
    assert_eq!(verify().await["ok"], true);
    // 3. Delete a record in the middle.
    db.execute(
        "DELETE FROM objects WHERE kind='audit' AND name=?1",
        [format!("{:016}", 6)],
    )
    .unwrap();
    let v = verify().await;
    assert_eq!(v["ok"], false);
    assert!(v["problems"].to_string().contains("missing"), "{v}");
    // 4. Delete the newest records: the anchor outside the database notices.
    let h2 = Harness::new().await;
    for i in 0..3 {
        h2.admin(Method::POST, "/v1/projects", json!({"name": format!("p{i}")}))
            .await;
    }
    let db2 = rusqlite::Connection::open(h2.dir.path().join("novacron.db")).unwrap();
    let (_, v) = h2.call(Method::GET, "/v1/audit/verify", Some(&h2.admin), None).await;
    assert_eq!(v["ok"], true, "{v}");
    let last: String = db2
        .query_row("SELECT max(name) FROM objects WHERE kind='audit'", [], |r| r.get(0))
        .unwrap();
    db2.execute("DELETE FROM objects WHERE kind='audit' AND name=?1", [&last])
        .unwrap();
    let (_, v) = h2.call(Method::GET, "/v1/audit/verify", Some(&h2.admin), None).await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problems"].to_string().contains("anchor"), "{v}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let h = Harness::with_rate_limit(Some((1, 3))).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = h.raw(Method::GET, "/v1/whoami", Some(&h.admin), Body::empty()).await;
        statuses.push(resp.status());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3], "{statuses:?}");
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}

/// Hostile and malformed JSON against every endpoint that takes a body, as
/// every principal: no panic, no 5xx, nothing written (the audit log aside).
#[tokio::test]
async fn hostile_json_never_causes_5xx_or_writes() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,40}".prop_map(Value::from),
        Just(json!("../../etc/passwd")),
        Just(json!("a".repeat(5000))),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
    ];
    let keys = prop_oneof![
        Just("name".to_string()),
        Just("spec".to_string()),
        Just("vcpus".to_string()),
        Just("memory_mib".to_string()),
        Just("image".to_string()),
        Just("project".to_string()),
        Just("role".to_string()),
        Just("password".to_string()),
        Just("permissions".to_string()),
        Just("quota".to_string()),
        Just("metadata".to_string()),
        Just("status".to_string()),
        "[a-z_]{1,10}",
    ];
    let json_value = leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let raw_garbage = prop_oneof![
        Just("{".to_string()),
        Just("{\"name\":".to_string()),
        Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_string()),
        Just("\u{0}\u{1}".to_string()),
        "\\PC{0,64}",
    ];
    let writes: Vec<(&str, &str)> = MATRIX
        .iter()
        .filter(|(m, _, _, _)| *m == "POST" || *m == "PUT")
        .map(|(m, p, _, _)| (*m, *p))
        .chain(PUBLIC.iter().copied())
        .collect();

    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let mut runner = TestRunner::deterministic();
    let before = h.snapshot().await;
    let mut sent = 0;
    for round in 0..6 {
        for (method, template) in &writes {
            if *template == "/v1/images/{name}/files/{part}" {
                continue; // takes raw bytes, not JSON
            }
            let (path, valid) =
                request_for(&h, method, template, if round % 2 == 0 { "alpha" } else { "beta" }, 0).await;
            let document = json_value.new_tree(&mut runner).unwrap().current().to_string();
            let garbage = raw_garbage.new_tree(&mut runner).unwrap().current();
            // Principals that may write nothing get any document; the admin
            // gets unparseable bodies, on endpoints that require a body.
            let mut attempts = vec![(&tokens[3], document.clone()), (&tokens[5], garbage.clone())];
            if valid.is_some() {
                attempts.push((&h.admin, garbage.clone()));
            }
            for (token, body) in attempts {
                let resp = h
                    .raw(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        &path,
                        Some(token),
                        Body::from(body.clone()),
                    )
                    .await;
                sent += 1;
                assert!(
                    !resp.status().is_server_error() && !resp.status().is_success(),
                    "{method} {path} with {body:?}: {}",
                    resp.status()
                );
                assert!(
                    declared(&doc, method, template, resp.status()),
                    "{method} {template} with {body:?}: {} is not in the document",
                    resp.status()
                );
            }
        }
    }
    assert!(sent > 100);
    assert_eq!(h.snapshot().await, before, "a rejected request wrote something");
}

/// A caller who may not make a request is refused before its body is read:
/// a malformed, mistyped, oversized or wrongly labelled body gets the same
/// 401/403/404 as a valid one, so validation tells it nothing.
#[tokio::test]
async fn refusal_comes_before_the_body_is_read() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let oversized = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let bodies: [(&str, &str); 4] = [
        ("application/json", "{not json"),
        ("application/json", "{\"name\": 5, \"spec\": []}"),
        ("application/json", &oversized),
        ("text/plain", "{}"),
    ];
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (method, template, own, _) in MATRIX {
        if !matches!(*method, "POST" | "PUT") || *template == "/v1/images/{name}/files/{part}" {
            continue;
        }
        for (i, who) in PRINCIPALS.iter().enumerate() {
            // Where the body decides (which share of its rights a caller hands
            // on in a token; which node registers), the caller may make the
            // request and is refused only for what it asks.
            let body_decides =
                *template == "/v1/tokens" || (*template == "/v1/nodes/register" && who.starts_with("node-"));
            if own.as_bytes()[i] == b'Y' || body_decides {
                continue;
            }
            let (path, _) = request_for(&h, method, template, "alpha", 0).await;
            for (content_type, body) in bodies {
                let mut req = Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).unwrap())
                    .uri(&path)
                    .header("content-type", content_type);
                match tokens[i].strip_prefix(CERT) {
                    Some(sha256) => {
                        req = req.extension(axum::extract::ConnectInfo(novacron_tls::PeerInfo {
                            addr: "127.0.0.1:1".parse().unwrap(),
                            cert_sha256: Some(sha256.to_string()),
                        }))
                    }
                    None => req = req.header("authorization", format!("Bearer {}", tokens[i])),
                }
                let status = h
                    .app
                    .clone()
                    .oneshot(req.body(Body::from(body.to_string())).unwrap())
                    .await
                    .unwrap()
                    .status();
                checked += 1;
                if !declared(&doc, method, template, status) {
                    wrong.push(format!(
                        "{method} {template}: answered {status}, which the document does not declare"
                    ));
                }
                if !matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND) {
                    wrong.push(format!(
                        "{method} {path} as {who} with {content_type} {:.20}: {status}",
                        body
                    ));
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} requests");
    assert!(
        wrong.is_empty(),
        "{} of {checked} answered before authorization:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// One token holds at most `MAX_WATCHES_PER_TOKEN` watch streams; the next
/// gets a 429 with Retry-After, and a closed stream frees its place. Other
/// tokens are not affected.
#[tokio::test]
async fn watch_streams_per_token_are_limited() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let limit = novacron_server::limits::MAX_WATCHES_PER_TOKEN as usize;
    let mut open = Vec::new();
    for _ in 0..limit {
        let resp = h
            .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    let refused = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
        .await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let other = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[2]), Body::empty())
        .await;
    assert_eq!(other.status(), StatusCode::OK, "another token has its own places");
    drop(open.pop());
    let again = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
        .await;
    assert_eq!(again.status(), StatusCode::OK, "a closed stream frees its place");
}

/// A token's lifetime is bounded for everyone: an admin's ttl of 26,000
/// years wrote an expiry RFC 3339 cannot carry (found by the API fuzzer).
#[tokio::test]
async fn token_lifetime_is_bounded_for_token_managers_too() {
    let h = Harness::new().await;
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&h.admin),
            Some(json!({"name": "forever", "role": "viewer", "ttl_s": 813_843_191_778u64})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "ttl_s");
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&h.admin),
            Some(json!({"name": "decade", "role": "viewer", "ttl_s": novacron_api::MAX_TOKEN_TTL_S})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
