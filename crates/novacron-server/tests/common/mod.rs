//! The in-process harness of the server's tests (no sockets, no agents):
//! principals, fixtures, the endpoint × principal × project matrix and the
//! concrete request for each endpoint.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures
#![allow(dead_code)] // each test binary uses a part

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

pub struct Harness {
    pub app: Router,
    pub state: AppState,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn new() -> Harness {
        Self::with_rate_limit(None).await
    }

    pub async fn with_rate_limit(rate_limit: Option<(u32, u32)>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = novacron_server::prepare(ServerConfig {
            data_dir: dir.path().to_path_buf(),
            store: Default::default(),
            images_dir: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            node_grace: Duration::from_secs(15),
            rate_limit,
            max_connections: 1024,
            backup_store_roots: Vec::new(),
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

    pub async fn raw(&self, method: Method, path: &str, token: Option<&str>, body: Body) -> axum::response::Response {
        self.send(method, path, token, "application/json", body).await
    }

    /// A request as `token` (a bearer secret, or a [`CERT`] certificate).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Body,
    ) -> axum::response::Response {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type);
        match token.map(|t| (t, t.strip_prefix(CERT))) {
            Some((_, Some(sha256))) => {
                req = req.extension(axum::extract::ConnectInfo(novacron_tls::PeerInfo {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    cert_sha256: Some(sha256.to_string()),
                    cert_common_name: None,
                }));
            }
            Some((t, None)) => req = req.header("authorization", format!("Bearer {t}")),
            None => {}
        }
        self.app.clone().oneshot(req.body(body).unwrap()).await.unwrap()
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let resp = self.raw(method, path, token, body).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, v) = self.call(method.clone(), path, Some(&self.admin), Some(body)).await;
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    pub async fn token(&self, name: &str, role: &str, project: Option<&str>) -> String {
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
    pub async fn snapshot(&self) -> Vec<(String, Vec<Value>)> {
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

pub const PRINCIPALS: [&str; 8] = [
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
pub const CERT: &str = "cert:";

/// Fixtures: projects alpha (the principals' own) and beta (another), a node,
/// an image, a running VM and a migration in each project.
pub async fn fixtures(h: &Harness) -> Vec<String> {
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
    for (p, subnet) in [("alpha", "10.61.0.0/24"), ("beta", "10.62.0.0/24")] {
        h.admin(
            Method::POST,
            "/v1/networks",
            json!({"name": format!("net-{p}"), "project": p, "subnet": subnet}),
        )
        .await;
        h.admin(
            Method::POST,
            "/v1/security-groups",
            json!({"name": format!("sg-{p}"), "project": p}),
        )
        .await;
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
            not_after: None,
            hosts: vec!["127.0.0.1".into()],
            issued_at: None,
            previous: None,
        };
        h.state.store.create_obj(&credential).await.unwrap();
        h.state.auth.set_credential(&credential);
        tokens.push(format!("{CERT}{cert_sha256}"));
    }
    tokens
}

/// The MAC of the NIC of the project's VM (`{nic}` in paths).
fn fixture_mac(p: &str) -> &'static str {
    if p == "alpha" {
        "52:54:00:00:00:0a"
    } else {
        "52:54:00:00:00:0b"
    }
}

/// (Re)creates the VMs and migrations the matrix acts on.
pub async fn reset_objects(h: &Harness) {
    let store = &h.state.store;
    for p in ["alpha", "beta"] {
        let name = format!("bp-{p}");
        if store
            .get_obj::<novacron_api::BackupPolicy>(&name)
            .await
            .unwrap()
            .is_some()
        {
            store
                .delete_obj::<novacron_api::BackupPolicy>(&name, None)
                .await
                .unwrap();
        }
        let mut metadata = Metadata::new(&name, Default::default());
        metadata.project = p.into();
        let policy: novacron_api::BackupPolicy = serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {"schedule": "0 2 * * *", "store": BACKUP_STORE},
        }))
        .unwrap();
        store.create_obj(&policy).await.unwrap();
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
        // On its project's network, so that the network cannot be deleted.
        vm.spec.nics = vec![novacron_api::NicSpec {
            security_groups: vec![format!("sg-{p}")],
            mac: Some(fixture_mac(p).into()),
            ..novacron_api::NicSpec::on(&format!("net-{p}"))
        }];
        // With its project's volume attached.
        let vol_name = format!("vol-{p}");
        if store
            .get_obj::<novacron_api::Volume>(&vol_name)
            .await
            .unwrap()
            .is_some()
        {
            store.delete_obj::<novacron_api::Volume>(&vol_name, None).await.unwrap();
        }
        let mut metadata = Metadata::new(&vol_name, Default::default());
        metadata.project = p.into();
        let vol = store
            .create_obj(&novacron_api::Volume {
                metadata,
                spec: novacron_api::VolumeSpec { size_mib: 64 },
                status: Default::default(),
            })
            .await
            .unwrap();
        vm.spec.volumes = vec![novacron_api::VolumeAttachment {
            volume: vol_name,
            id: vol.metadata.id,
            size_mib: 64,
            slot: 0,
            from_node: None,
        }];
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
    for p in ["alpha", "beta"] {
        let name = format!("ev-{p}");
        let _ = store.delete("event", &name, None).await;
        let mut metadata = Metadata::new(&name, Default::default());
        metadata.project = p.into();
        let event: novacron_api::Event = serde_json::from_value(json!({
            "metadata": metadata,
            "involved": {"kind": "vm", "name": format!("vm-{p}")},
            "topic": "vm.running", "type": "Normal", "message": "Running on node node-1",
        }))
        .unwrap();
        store.create_obj(&event).await.unwrap();
    }
    reset_backups(h).await;
    for (kind, name) in [
        ("user", "u-target"),
        ("token", "t-target"),
        ("role", "r-target"),
        ("webhook", "wh-target"),
    ] {
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
    h.admin(
        Method::POST,
        "/v1/webhooks",
        json!({"name": "wh-target", "url": "http://127.0.0.1:9/hook", "events": ["vm.*"], "secret": "0123456789abcdef"}),
    )
    .await;
}

/// The backup store the matrix acts on, and when its fixture backups were taken.
pub const BACKUP_STORE: &str = "offsite";
pub const BACKUP_TIME: &str = "2026-12-01T10:00:00Z";

/// The content of the fixture backups' one chunk.
fn fixture_chunk() -> Vec<u8> {
    vec![5u8; 4096]
}

pub fn fixture_digest() -> String {
    novacron_backup::Digest::of(&fixture_chunk()).to_hex()
}

/// Store `offsite` (registered, in the harness's dir) with a backup of
/// each project's VM.
pub async fn reset_backups(h: &Harness) {
    use novacron_backup::{BackupId, BackupInfo, Datastore, FixedIndex, CHUNK_SIZE};
    let path = h.dir.path().join(BACKUP_STORE);
    let store = Datastore::create(&path).unwrap();
    if h.state
        .store
        .get_obj::<novacron_api::BackupStore>(BACKUP_STORE)
        .await
        .unwrap()
        .is_none()
    {
        let obj = novacron_api::BackupStore {
            metadata: Metadata::new(BACKUP_STORE, Default::default()),
            spec: novacron_api::BackupStoreSpec {
                path: path.display().to_string(),
                url: None,
                encryption_key_id: None,
            },
        };
        h.state.store.create_obj(&obj).await.unwrap();
    }
    let (digest, _) = store.insert_chunk(&fixture_chunk()).unwrap();
    for p in ["alpha", "beta"] {
        let id = BackupId::parse(&format!("vm-{p}"), BACKUP_TIME).unwrap();
        if store.manifest(&id).is_ok() {
            continue;
        }
        let mut w = store.begin(&id).unwrap();
        let index = FixedIndex {
            size: 4096,
            chunk_size: CHUNK_SIZE,
            digests: vec![digest],
        };
        w.add_disk("root", &index, Default::default()).unwrap();
        w.finish(BackupInfo {
            vm_id: format!("id-{p}"),
            project: p.into(),
            config: Some(serde_json::to_value(VmSpec::new(&format!("img-{p}"), 1, 128)).unwrap()),
            key_id: None,
            ..Default::default()
        })
        .unwrap();
    }
}

/// The expected answer for each endpoint: for principals in the order of
/// `PRINCIPALS`, `Y` = allowed, `n` = denied (401/403/404), acting on an
/// object of the principals' own project (alpha) and of another one (beta).
/// Cluster-wide endpoints have the same answer in both columns.
pub const MATRIX: &[(&str, &str, &str, &str)] = &[
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
    ("POST", "/v1/vms/{name}/exec", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/template", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/rebuild", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/nics", "YYYnnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/vms/{name}/nics/{nic}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/volumes", "YYYnnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/vms/{name}/volumes/{volume}", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/vms/{name}/snapshots", "YYYYYYYY", "YnnnYnYY"),
    ("POST", "/v1/vms/{name}/snapshots", "YYYnnnnn", "Ynnnnnnn"),
    (
        "POST",
        "/v1/vms/{name}/snapshots/{snapshot}/revert",
        "YYYnnnnn",
        "Ynnnnnnn",
    ),
    ("DELETE", "/v1/vms/{name}/snapshots/{snapshot}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/vms/{name}/backups", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/backups", "YYYYYnYY", "YYYYYnYY"),
    ("GET", "/v1/backups/{store}/{vm}/{time}", "YYYYYnYY", "YnnnYnYY"),
    ("DELETE", "/v1/backups/{store}/{vm}/{time}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/backups/{store}/{vm}/{time}/verify", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/backups/prune", "YYYnnnnn", "YYYnnnnn"),
    ("POST", "/v1/backup-stores/{store}/gc", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/backup-stores/{store}/sync", "Ynnnnnnn", "Ynnnnnnn"),
    (
        "POST",
        "/v1/backups/{store}/{vm}/{time}/restore",
        "YYYnnnnn",
        "Ynnnnnnn",
    ),
    (
        "GET",
        "/v1/backup-stores/{store}/chunks/{digest}",
        "YnnnYnYY",
        "YnnnYnYY",
    ),
    ("GET", "/v1/backup-stores", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/backup-stores", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/backup-stores/{store}", "YYYYYnYY", "YYYYYnYY"),
    ("DELETE", "/v1/backup-stores/{store}", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/backup-stores/{store}/chunks/known", "YnnnYnYY", "YnnnYnYY"),
    (
        "PUT",
        "/v1/backup-stores/{store}/chunks/{digest}",
        "YnnnYnYY",
        "YnnnYnYY",
    ),
    ("POST", "/v1/backup-stores/{store}/backups", "YnnnYnYn", "YnnnYnYn"),
    (
        "GET",
        "/v1/backup-stores/{store}/backups/{vm}/{time}/disks/{disk}/index",
        "YYYYYnYY",
        "YnnnYnYY",
    ),
    ("GET", "/v1/backup-policies", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/backup-policies", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/backup-policies/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("PUT", "/v1/backup-policies/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/backup-policies/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/backup-policies/{name}/run", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/volumes", "YYYYnnnn", "YYYYnnnn"),
    ("POST", "/v1/volumes", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/volumes/{name}", "YYYYnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/volumes/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/volumes/{name}/resize", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/images", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("DELETE", "/v1/images/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("PUT", "/v1/images/{name}/files/{part}", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/images/{name}/files/{part}", "YYYYYnYY", "YnnnYnYY"),
    ("POST", "/v1/images/{name}/download", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/networks", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/networks", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/networks/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("DELETE", "/v1/networks/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/overlay-peers", "YYYYYnYY", "YYYYYnYY"),
    ("GET", "/v1/security-groups", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/security-groups", "YYYnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/security-groups/{name}", "YYYYYnYY", "YnnnYnYY"),
    ("PUT", "/v1/security-groups/{name}", "YYYnnnnn", "Ynnnnnnn"),
    ("DELETE", "/v1/security-groups/{name}", "YYYnnnnn", "Ynnnnnnn"),
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
    ("POST", "/v1/nodes/{name}/certificate", "nnnnnnYn", "nnnnnnYn"),
    ("POST", "/v1/nodes/{name}/revoke", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/trust", "YYYYYnYY", "YYYYYnYY"),
    ("POST", "/v1/ca/rotate", "Ynnnnnnn", "Ynnnnnnn"),
    ("POST", "/v1/ca/finish-rotation", "Ynnnnnnn", "Ynnnnnnn"),
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
    // Every project's VMs: no token limited to a project.
    ("GET", "/metrics", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/vms/{name}/stats", "YYYYYYYY", "YnnnYnYY"),
    ("GET", "/v1/events", "YYYYnnnn", "YYYYnnnn"),
    ("GET", "/v1/events/{name}", "YYYYnnnn", "Ynnnnnnn"),
    ("GET", "/v1/webhooks", "YYnnnnnn", "YYnnnnnn"),
    ("POST", "/v1/webhooks", "Ynnnnnnn", "Ynnnnnnn"),
    ("GET", "/v1/webhooks/{name}", "YYnnnnnn", "YYnnnnnn"),
    ("DELETE", "/v1/webhooks/{name}", "Ynnnnnnn", "Ynnnnnnn"),
];

/// Endpoints that need no token.
pub const PUBLIC: &[(&str, &str)] = &[("POST", "/v1/login")];

/// The concrete request for an endpoint, acting on project `p`.
pub async fn request_for(h: &Harness, method: &str, template: &str, p: &str, n: usize) -> (String, Option<Value>) {
    let kind = template
        .trim_start_matches("/v1/")
        .split('/')
        .next()
        .unwrap_or_default();
    let name = match kind {
        "vms" => format!("vm-{p}"),
        "images" => format!("img-{p}"),
        "networks" => format!("net-{p}"),
        "security-groups" => format!("sg-{p}"),
        "backup-policies" => format!("bp-{p}"),
        "volumes" => format!("vol-{p}"),
        "migrations" => format!("mig-{p}"),
        "nodes" => "node-1".into(),
        "users" => "u-target".into(),
        "tokens" => "t-target".into(),
        "roles" => "r-target".into(),
        "events" => format!("ev-{p}"),
        "webhooks" => "wh-target".into(),
        "projects" => p.into(),
        _ => String::new(),
    };
    let path = template
        .replace("{name}", &name)
        .replace("{part}", "kernel")
        .replace("{nic}", fixture_mac(p))
        .replace("{volume}", &format!("vol-{p}"))
        .replace("{snapshot}", "s1")
        .replace("{store}", BACKUP_STORE)
        .replace("{vm}", &format!("vm-{p}"))
        .replace("{time}", BACKUP_TIME)
        .replace("{disk}", "root")
        .replace("{digest}", &fixture_digest());
    let fresh = format!("new-{n}");
    let body = match (method, template) {
        ("POST", "/v1/vms") => Some(
            json!({"name": fresh, "project": p, "spec": {"image": format!("img-{p}"), "vcpus": 1, "memory_mib": 128}}),
        ),
        ("POST", "/v1/images") => Some(json!({"name": fresh, "project": p, "format": "kernel"})),
        ("POST", "/v1/images/{name}/download") => {
            Some(json!({"url": "http://127.0.0.1:9/disk.qcow2", "sha256": "0".repeat(64)}))
        }
        ("POST", "/v1/vms/{name}/nics") => Some(json!({"network": format!("net-{p}")})),
        ("POST", "/v1/vms/{name}/exec") => Some(json!({"command": ["true"]})),
        ("POST", "/v1/vms/{name}/volumes") => Some(json!({"volume": format!("vol-{p}")})),
        ("POST", "/v1/vms/{name}/snapshots") => Some(json!({"name": "s1"})),
        ("POST", "/v1/volumes") => Some(json!({"name": fresh, "project": p, "size_mib": 64})),
        ("POST", "/v1/volumes/{name}/resize") => Some(json!({"size_mib": 128})),
        ("POST", "/v1/vms/{name}/template") | ("POST", "/v1/vms/{name}/rebuild") => Some(json!({})),
        ("POST", "/v1/security-groups") => Some(json!({"name": fresh, "project": p})),
        ("PUT", "/v1/security-groups/{name}") => Some(json!({"rules": []})),
        // A subnet of its own for every create that goes through.
        ("POST", "/v1/networks") => {
            Some(json!({"name": fresh, "project": p, "subnet": format!("10.{}.{}.0/24", 64 + (n >> 8), n & 255)}))
        }
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
        ("POST", "/v1/webhooks") => Some(
            json!({"name": fresh, "url": "http://127.0.0.1:9/hook", "events": ["*"], "secret": "0123456789abcdef"}),
        ),
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
        ("POST", "/v1/vms/{name}/backups") => Some(json!({})),
        ("POST", "/v1/backup-policies") => {
            Some(json!({"name": fresh, "project": p, "spec": {"schedule": "0 2 * * *", "store": BACKUP_STORE}}))
        }
        ("PUT", "/v1/backup-policies/{name}") => Some(json!({"schedule": "0 3 * * *", "store": BACKUP_STORE})),
        ("POST", "/v1/backups/{store}/{vm}/{time}/restore") => Some(json!({"name": fresh})),
        ("POST", "/v1/backups/prune") => {
            Some(json!({"vm": format!("vm-{p}"), "store": BACKUP_STORE, "keep": {"keep_last": 1}}))
        }
        ("POST", "/v1/backup-stores") => Some(json!({"name": fresh, "path": h.dir.path().join("stores").join(&fresh)})),
        ("POST", "/v1/backup-stores/{store}/sync") => Some(json!({"from": BACKUP_STORE})),
        ("POST", "/v1/backup-stores/{store}/chunks/known") => Some(json!({"digests": [fixture_digest()]})),
        ("POST", "/v1/backup-stores/{store}/backups") => {
            let vm = h.state.store.get_obj::<Vm>(&format!("vm-{p}")).await.unwrap().unwrap();
            // A second of its own for every commit that goes through.
            let time = chrono::DateTime::parse_from_rfc3339("2026-12-02T00:00:00Z").unwrap()
                + chrono::Duration::seconds(n as i64);
            Some(json!({
                "vm": vm.metadata.name,
                "vm_id": vm.metadata.id,
                "time": time.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "disks": [{"name": "root", "size": 4096, "digests": fixture_digest(),
                    "bytes_read": 4096, "chunks_new": 0, "stored_bytes": 0}],
                "duration_ms": 1,
            }))
        }
        _ => None,
    };
    (path, body)
}

pub fn spec_endpoints(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// Whether the document declares `status` for the operation.
pub fn declared(doc: &Value, method: &str, template: &str, status: StatusCode) -> bool {
    doc["paths"][template][method.to_lowercase()]["responses"]
        .get(status.as_str())
        .is_some()
}
