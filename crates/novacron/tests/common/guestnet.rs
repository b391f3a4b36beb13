//! Helpers for tests with VM networks: requests, and commands typed on a
//! guest's serial console.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use novacron_api::{CreateNetwork, CreateVm, NicSpec, VmSpec};

use super::{wait_until, Cluster, Options};

pub const BOOT: Duration = Duration::from_secs(120);

pub fn network(name: &str, subnet: &str) -> CreateNetwork {
    CreateNetwork {
        name: name.into(),
        project: None,
        labels: Default::default(),
        subnet: subnet.into(),
        gateway: None,
        dhcp: true,
        nat: false,
        mtu: None,
    }
}

pub fn nic(network: &str, ip: Option<&str>) -> NicSpec {
    NicSpec {
        ip: ip.map(str::to_string),
        ..NicSpec::on(network)
    }
}

pub fn vm_on(name: &str, nics: Vec<NicSpec>, node: Option<&str>) -> CreateVm {
    let mut spec = VmSpec {
        disk_mib: Some(64),
        nics,
        ..VmSpec::new("demo", 1, 128)
    };
    if let Some(node) = node {
        spec.placement.node_selector = [("host".to_string(), node.to_string())].into();
    }
    CreateVm {
        name: name.into(),
        project: None,
        labels: Default::default(),
        no_default_network: false,
        spec,
    }
}

/// POSTs raw JSON; returns the status and the body.
pub async fn post(c: &Cluster, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = c
        .http()
        .post(format!("{}/v1/{path}", c.url))
        .bearer_auth(&c.token)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// DELETE on an API path; the status and the body.
pub async fn delete(c: &Cluster, path: &str) -> (u16, serde_json::Value) {
    let resp = c
        .http()
        .delete(format!("{}/v1/{path}", c.url))
        .bearer_auth(&c.token)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `body` and checks that it is refused with `status`, naming `field`.
pub async fn refused(c: &Cluster, path: &str, body: serde_json::Value, status: u16, field: &str) {
    let (got, err) = post(c, path, body.clone()).await;
    assert_eq!(
        (got, err["error"]["field"].as_str()),
        (status, Some(field)),
        "{body}: {err}"
    );
}

/// Types a command on a VM's serial console.
pub fn type_on_console(c: &Cluster, vm: &str, line: &str) {
    let mut console = c
        .cli(&["vm", "console", vm])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("console");
    console
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(format!("\n{line}\n").as_bytes())
        .expect("type");
    drop(console.stdin.take());
    let _ = console.wait();
}

/// Runs `cmd` in the guest and returns the line it ends with,
/// `RESULT-<tag> rc=<exit status>`. (The marker is typed split in two, so
/// the console's echo of the command line does not count as the result.)
pub async fn guest_run(c: &Cluster, vm: &str, tag: &str, cmd: &str, timeout: Duration) -> String {
    type_on_console(c, vm, &format!("{cmd}; echo \"RESULT\"\"-{tag} rc=$?\""));
    let marker = format!("RESULT-{tag} ");
    wait_until(&format!("{marker:?} on {vm}'s console"), timeout, || async {
        let log = c.logs(vm).await;
        log.lines()
            .rev()
            .find(|l| l.starts_with(&marker))
            .map(|l| l.trim().to_string())
    })
    .await
}

/// Waits until the guest's shell answers on the console (typing there
/// right after a live migration has been seen to get lost).
pub async fn wait_console_answers(c: &Cluster, vm: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        type_on_console(c, vm, &format!("echo \"ANSWER\"\"-{attempt}\""));
        let marker = format!("ANSWER-{attempt}");
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if c.logs(vm).await.lines().any(|l| l.trim() == marker) {
                if attempt > 0 {
                    eprintln!("{vm}'s console answered on attempt {}", attempt + 1);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(std::time::Instant::now() < deadline, "{vm}'s console does not answer");
    }
}

/// Three hosts, each a network namespace with its agent, and the demo image.
pub async fn three_hosts() -> Cluster {
    let c = Cluster::start(Options {
        agents: 3,
        netns: true,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c
}

/// Runs `cmd` in the busybox guest and returns what it printed (one line).
pub async fn guest_value(c: &Cluster, vm: &str, tag: &str, cmd: &str) -> String {
    type_on_console(c, vm, &format!("echo \"VAL\"\"-{tag} $({cmd})\""));
    let marker = format!("VAL-{tag} ");
    wait_until(
        &format!("{marker:?} on {vm}'s console"),
        Duration::from_secs(60),
        || async {
            let log = c.logs(vm).await;
            log.lines()
                .rev()
                .find_map(|l| l.strip_prefix(&marker))
                .map(|v| v.trim().to_string())
        },
    )
    .await
}

/// Runs a CLI command that must fail saying `says`.
pub fn cli_fails(c: &Cluster, args: &[&str], says: &str) {
    let out = c.cli(args).output().expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
}
