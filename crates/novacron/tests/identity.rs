//! Identity end to end with real processes and a real VM: a project with a
//! quota, a user logging in through the CLI, an operator booting a VM in their
//! project, refusals, tokens and the audit log.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{guest_dir, ok, Cluster, Options};
use novacron_api::VmPhase;
use serde_json::Value;

fn run(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cli");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().expect("cli")
}

fn failed(out: Output) -> String {
    assert!(
        !out.status.success(),
        "command succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CLI command as the user whose token `login` saved (no token in the environment).
fn as_user(c: &Cluster, args: &[&str]) -> Command {
    let mut cmd = c.cli(args);
    cmd.env_remove("NOVACRON_TOKEN").env_remove("NOVACRON_SERVER");
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_logs_in_and_works_inside_their_project_and_quota() {
    let c = Cluster::start(Options::default()).await;
    let g = guest_dir();
    ok(c.cli(&[
        "image",
        "import",
        "demo",
        "--public",
        "--kernel",
        &g.join("vmlinuz").display().to_string(),
        "--initrd",
        &g.join("initrd.img").display().to_string(),
    ])
    .output()
    .unwrap());
    ok(c.cli(&[
        "project", "create", "team-a", "--vcpus", "2", "--memory", "1GiB", "--vms", "2",
    ])
    .output()
    .unwrap());
    ok(run(
        c.cli(&["user", "create", "alice", "--role", "operator@team-a"]),
        "s3cret-pass\n",
    ));

    // Wrong password: refused, nothing saved.
    let mut login = as_user(&c, &["login", "--user", "alice", "--password-stdin"]);
    login.env("NOVACRON_SERVER", &c.url);
    let err = failed(run(login, "wrong\n"));
    assert!(err.contains("Invalid user name or password"), "{err}");
    let mut login = as_user(&c, &["login", "--user", "alice", "--password-stdin"]);
    login.env("NOVACRON_SERVER", &c.url);
    let out = ok(run(login, "s3cret-pass\n"));
    assert!(out.contains("operator in team-a"), "{out}");

    let me: Value = serde_json::from_str(&ok(as_user(&c, &["whoami", "-o", "json"]).output().unwrap())).unwrap();
    assert_eq!(
        (me["user"].as_str(), me["project"].as_str()),
        (Some("alice"), Some("team-a"))
    );

    // A real VM in the operator's project.
    ok(as_user(
        &c,
        &["vm", "create", "a1", "--image", "demo", "--memory", "128MiB", "--wait"],
    )
    .output()
    .unwrap());
    let vm = c.wait_phase("a1", VmPhase::Running, Duration::from_secs(60)).await;
    assert_eq!(vm.metadata.project, "team-a");
    c.wait_console("a1", "NOVACRON-GUEST-READY", 1, Duration::from_secs(90))
        .await;

    // Over quota: a clear refusal naming the quota; nothing created.
    let err = failed(
        as_user(
            &c,
            &[
                "vm", "create", "a2", "--image", "demo", "--vcpus", "2", "--memory", "128MiB",
            ],
        )
        .output()
        .unwrap(),
    );
    assert!(err.contains("quota vcpus of project \"team-a\" exceeded"), "{err}");
    assert!(c.client.get::<novacron_api::Vm>("a2").await.unwrap_err().is_not_found());
    // Outside the role: refused.
    let err = failed(as_user(&c, &["node", "cordon", "node-1"]).output().unwrap());
    assert!(err.contains("does not allow nodes:update"), "{err}");
    let out = ok(as_user(&c, &["project", "list"]).output().unwrap());
    assert!(out.contains("team-a") && out.contains("1/2"), "{out}");
    assert!(!out.contains("default"), "{out}");

    // Tokens: a viewer token for CI, revoked again.
    let secret = ok(c
        .cli(&[
            "token",
            "create",
            "ci",
            "--role",
            "viewer",
            "--project",
            "team-a",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap());
    let mut who = as_user(&c, &["whoami"]);
    who.env("NOVACRON_TOKEN", secret.trim());
    assert!(ok(who.output().unwrap()).contains("viewer"));
    ok(c.cli(&["token", "revoke", "ci"]).output().unwrap());
    let mut who = as_user(&c, &["whoami"]);
    who.env("NOVACRON_TOKEN", secret.trim());
    assert!(failed(who.output().unwrap()).contains("Invalid token"));

    // The audit log saw all of it, with who, what, where from and the result.
    let out = ok(c
        .cli(&["audit", "list", "--user", "alice", "--since", "1h"])
        .output()
        .unwrap());
    assert!(out.contains("POST /v1/vms") && out.contains("201"), "{out}");
    assert!(out.contains("POST /v1/login") && out.contains("401"), "{out}");
    assert!(
        out.contains("POST /v1/nodes/node-1/cordon") && out.contains("403"),
        "{out}"
    );
    assert!(out.contains("127.0.0.1"), "{out}");
    let out = ok(c.cli(&["audit", "verify"]).output().unwrap());
    assert!(out.contains("audit log intact"), "{out}");
    ok(c.cli(&["vm", "delete", "a1", "--wait"]).output().unwrap());
}
