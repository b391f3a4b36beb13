//! API behaviour against a real server process: auth, bad input, pagination,
//! watch, node liveness, and placement waiting for capacity.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use novacron_client::Selector;
use std::time::Duration;

use common::{wait_until, Cluster, Options};
use futures::StreamExt;
use novacron_api::{Node, PowerState, RunStrategy, Vm, VmPhase, WatchEventType};
use novacron_client::ListOptions;
use serde_json::{json, Value};

async fn raw(
    c: &Cluster,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let mut req = c.http().request(method, format!("{}{path}", c.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

fn vm_body(name: &str, vcpus: u32, memory: u64, image: &str) -> String {
    json!({"name": name, "spec": {"vcpus": vcpus, "memory_mib": memory, "image": image, "power_state": "Stopped"}})
        .to_string()
}

async fn vm_count(c: &Cluster) -> usize {
    c.client
        .list_all::<Vm>(&Selector::everything())
        .await
        .expect("list")
        .0
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_bad_input_and_openapi() {
    let c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    let token = Some(c.token.as_str());
    use reqwest::Method;

    // Health needs no token; everything else does.
    assert_eq!(raw(&c, Method::GET, "/healthz", None, None).await.0, 200);
    assert_eq!(raw(&c, Method::GET, "/readyz", None, None).await.0, 200);
    let (s, b) = raw(&c, Method::GET, "/v1/vms", None, None).await;
    assert_eq!(s, 401);
    assert_eq!(b["error"]["code"], "unauthorized");
    assert_eq!(raw(&c, Method::GET, "/v1/vms", Some("wrong"), None).await.0, 401);
    assert_eq!(raw(&c, Method::GET, "/v1/openapi.json", None, None).await.0, 401);

    // The OpenAPI document is generated from the handlers.
    let (s, doc) = raw(&c, Method::GET, "/v1/openapi.json", token, None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    for path in [
        "/v1/vms",
        "/v1/vms/{name}",
        "/v1/vms/{name}/stop",
        "/v1/nodes",
        "/v1/images/{name}/files/{part}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }

    let before = vm_count(&c).await;
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, ""),
        (json!({"name": "x"}).to_string(), 422, ""),
        (vm_body("Bad_Name", 1, 128, "demo"), 422, "name"),
        (vm_body("-lead", 1, 128, "demo"), 422, "name"),
        (vm_body("ok", 0, 128, "demo"), 422, "spec.vcpus"),
        (vm_body("ok", 65, 128, "demo"), 422, "spec.vcpus"),
        (vm_body("ok", 1, 1, "demo"), 422, "spec.memory_mib"),
        // Valid range but larger than any node (2 GiB).
        (vm_body("ok", 1, 64 * 1024, "demo"), 422, "spec.memory_mib"),
        (vm_body("ok", 16, 128, "demo"), 422, "spec.vcpus"),
        (vm_body("ok", 1, 128, "no-such-image"), 422, "spec.image"),
    ];
    for (body, status, field) in cases {
        let (s, b) = raw(&c, Method::POST, "/v1/vms", token, Some(body.clone())).await;
        assert_eq!(s, status, "{body} -> {b}");
        assert!(b["error"]["message"].is_string(), "{b}");
        if !field.is_empty() {
            assert_eq!(b["error"]["field"], field, "{body} -> {b}");
        }
    }
    // Oversized body: refused once it is read, so the connection stays open
    // (closed with bytes unread, it could be reset under the client's write).
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let resp = c
        .http()
        .post(format!("{}/v1/vms", c.url))
        .bearer_auth(&c.token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(resp.headers().get("connection"), None, "{:?}", resp.headers());
    let b: Value = resp.json().await.expect("error body");
    assert_eq!(b["error"]["code"], "too_large");
    assert_eq!(vm_count(&c).await, before, "a rejected request wrote something");

    // Duplicate names conflict.
    assert_eq!(
        raw(&c, Method::POST, "/v1/vms", token, Some(vm_body("dup", 1, 128, "demo")))
            .await
            .0,
        201
    );
    let (s, b) = raw(&c, Method::POST, "/v1/vms", token, Some(vm_body("dup", 1, 128, "demo"))).await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(vm_count(&c).await, before + 1);

    // Unknown things are 404 with the error body.
    let (s, b) = raw(&c, Method::GET, "/v1/vms/nope", token, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")));
    assert_eq!(raw(&c, Method::GET, "/v1/nothing-here", token, None).await.0, 404);

    // Stale status writes lose (compare-and-swap).
    let vm = c.vm("dup").await;
    let mut stale = vm.clone();
    stale.metadata.resource_version -= 1;
    let (s, _) = raw(
        &c,
        Method::PUT,
        "/v1/vms/dup/status",
        token,
        Some(serde_json::to_string(&stale).expect("json")),
    )
    .await;
    assert_eq!(s, 409);

    // The CLI prints the API's message and exits non-zero.
    let out = c.cli(&["vm", "get", "nope"]).output().expect("cli");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c
        .cli(&["vm", "create", "Bad", "--image", "demo"])
        .output()
        .expect("cli");
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_selectors_and_watch() {
    let c = Cluster::start(Options {
        agents: 1,
        agent_memory: "64GiB",
        agent_vcpus: 64,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    let start_rev = c
        .client
        .list::<Vm>(&ListOptions::default())
        .await
        .expect("list")
        .resource_version;
    let mut watch = c
        .client
        .watch::<Vm>(start_rev, &Selector::labels("tier=web"))
        .await
        .expect("watch");
    for i in 0..7 {
        let tier = if i % 2 == 0 { "web" } else { "db" };
        let body = json!({"name": format!("p-{i}"), "labels": {"tier": tier},
            "spec": {"vcpus": 1, "memory_mib": 64, "image": "demo", "power_state": "Stopped"}});
        let vm: Vm = c.client.post_json("vms", &body).await.expect("create");
        assert_eq!(vm.spec.power_state, PowerState::Stopped);
    }
    // Three pages of 3, 3, 1.
    let mut names = Vec::new();
    let mut opts = ListOptions {
        limit: Some(3),
        ..Default::default()
    };
    let mut pages = 0;
    loop {
        let page = c.client.list::<Vm>(&opts).await.expect("page");
        pages += 1;
        names.extend(page.items.into_iter().map(|v| v.metadata.name));
        match page.continue_token {
            Some(t) => opts.continue_token = Some(t),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("p-{i}")).collect::<Vec<_>>());
    let (web, _) = c
        .client
        .list_all::<Vm>(&Selector::labels("tier=web"))
        .await
        .expect("selector");
    assert_eq!(web.len(), 4);
    let (not_web, _) = c
        .client
        .list_all::<Vm>(&Selector::labels("tier!=web"))
        .await
        .expect("selector");
    assert_eq!(not_web.len(), 3);
    assert_eq!(
        c.client
            .list::<Vm>(&ListOptions {
                limit: Some(0),
                ..Default::default()
            })
            .await
            .map_err(|e| e.status())
            .err(),
        Some(Some(422))
    );

    // The watch (from before the creates) sees the web VMs being added, in order.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("event")
            .expect("open")
            .expect("ok");
        if ev.event_type == WatchEventType::Added {
            seen.push(ev.object.metadata.name);
        }
    }
    assert_eq!(seen, vec!["p-0", "p-2", "p-4", "p-6"]);

    // `vm list --watch` prints changes as they happen.
    let mut child = c
        .cli(&["vm", "list", "--watch", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cli");
    let stdout = child.stdout.take().expect("stdout");
    let (listed_tx, listed) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines().map_while(Result::ok);
        // The list comes first; the watch then starts from its revision, so
        // a change made once anything is printed is still reported.
        let first = lines.next();
        let _ = listed_tx.send(());
        std::iter::once(first?)
            .chain(lines)
            .find(|l| l.contains("\"Deleted\"") && l.contains("p-1"))
    });
    let printed = tokio::task::spawn_blocking(move || listed.recv_timeout(Duration::from_secs(10)).is_ok());
    assert!(printed.await.expect("join"), "the CLI printed no list");
    c.client.delete_vm("p-1", false).await.expect("delete");
    let line = tokio::task::spawn_blocking(move || reader.join().ok().flatten())
        .await
        .expect("join");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.is_some(), "watch did not report the deletion");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_goes_not_ready_and_comes_back() {
    let mut c = Cluster::start(Options {
        heartbeat: "1s",
        node_grace: "3s",
        ..Default::default()
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(c.agent("node-1").child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop agent");
    let client = c.client.clone();
    let node = wait_until("node NotReady", Duration::from_secs(10), || {
        let client = client.clone();
        async move { client.get::<Node>("node-1").await.ok().filter(|n| !n.status.ready) }
    })
    .await;
    assert!(node.status.ready_reason.unwrap_or_default().contains("heartbeat"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue agent");
    wait_until("node Ready again", Duration::from_secs(10), || {
        let client = client.clone();
        async move { client.get::<Node>("node-1").await.ok().filter(|n| n.status.ready) }
    })
    .await;
    let out = c.cli(&["node", "list"]).output().expect("cli");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Ready"));
    c.kill_agent("node-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_stays_pending_until_capacity_appears() {
    let mut c = Cluster::start(Options {
        agents: 1,
        agent_memory: "1GiB",
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    for name in ["big-1", "big-2"] {
        let body =
            json!({"name": name, "spec": {"vcpus": 1, "memory_mib": 700, "image": "demo", "power_state": "Stopped"}});
        let _: Vm = c.client.post_json("vms", &body).await.expect("create");
    }
    let first = c.wait_phase("big-1", VmPhase::Stopped, Duration::from_secs(20)).await;
    assert_eq!(first.status.node.as_deref(), Some("node-1"));
    let client = c.client.clone();
    let pending = wait_until("big-2 to explain why it is pending", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            client
                .get::<Vm>("big-2")
                .await
                .ok()
                .filter(|v| v.status.reason.as_deref().unwrap_or("").contains("insufficient memory"))
        }
    })
    .await;
    assert_eq!(pending.status.phase, VmPhase::Pending);
    assert!(pending.status.node.is_none());
    // Capacity appears: a second node joins, and the VM is placed there.
    c.add_agent("node-2", 4, "1GiB", "1s").await;
    let placed = c.wait_phase("big-2", VmPhase::Stopped, Duration::from_secs(20)).await;
    assert_eq!(placed.status.node.as_deref(), Some("node-2"));
    assert_eq!(placed.spec.run_strategy, RunStrategy::Manual);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_import_records_format_checksum_and_size() {
    use novacron_api::{Image, ImageFormat, ImagePhase};
    use sha2::Digest;
    let c = Cluster::start(Options::default()).await;
    let dir = c.dir.path().join("imgs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let qemu_img = |args: &[&str]| {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(&dir)
            .status()
            .expect("qemu-img");
        assert!(st.success());
    };
    qemu_img(&["create", "-q", "-f", "qcow2", "disk.qcow2", "64M"]);
    qemu_img(&["create", "-q", "-f", "raw", "disk.raw", "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "disk.qcow2",
        "overlay.qcow2",
    ]);

    for (name, file, format, virtual_mib) in [
        ("q", "disk.qcow2", ImageFormat::Qcow2, 64),
        ("r", "disk.raw", ImageFormat::Raw, 8),
    ] {
        let path = dir.join(file);
        let out = c
            .cli(&["image", "import", name, &path.display().to_string()])
            .output()
            .expect("cli");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let img = c.client.get::<Image>(name).await.expect("image");
        assert_eq!((img.spec.format, img.status.phase), (format, ImagePhase::Ready));
        assert_eq!(img.status.virtual_size_bytes, virtual_mib * 1024 * 1024);
        let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&path).expect("read")));
        assert_eq!(img.status.files[0].sha256, sha);
    }
    // A qcow2 with a backing file could point anywhere on the server: refused,
    // and the half-made image record is removed.
    let out = c
        .cli(&[
            "image",
            "import",
            "bad",
            &dir.join("overlay.qcow2").display().to_string(),
        ])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backing file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.client.get::<Image>("bad").await.is_err());
    // Missing file, and a part the format does not have.
    assert!(!c
        .cli(&["image", "import", "gone", "/nonexistent.qcow2"])
        .output()
        .expect("cli")
        .status
        .success());
    let (s, b) = raw(
        &c,
        reqwest::Method::PUT,
        "/v1/images/q/files/kernel",
        Some(&c.token),
        Some("x".into()),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let out = c.cli(&["image", "list", "-o", "yaml"]).output().expect("cli");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name: q") && text.contains("name: r"), "{text}");
}
