//! The dashboard at `/ui` in a real headless Chromium (Debian's package,
//! driven by playwright-core from `tests/ui/`, both installed by
//! scripts/setup.sh): log in, create a VM from the form and see it reach
//! Running without a reload, type in its console and see the output, start
//! a migration and watch it reach Completed, take a snapshot from the VM's
//! page, a viewer sees no actions and a
//! forced request is refused (tests/ui/dashboard.mjs). Screenshots of the
//! pages go to target/test-artifacts/dashboard/ when a step fails.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{ok, Cluster, Options};

fn tests_ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_drives_a_vm_through_its_life_in_chromium() {
    let ui = tests_ui_dir();
    assert!(
        ui.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/setup.sh (npm ci in {})",
        ui.display()
    );
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    let _: serde_json::Value = c
        .client
        .post_json(
            "users",
            &serde_json::json!({"name": "ada", "password": "dashboard-pass-1", "bindings": [{"role": "admin"}]}),
        )
        .await
        .expect("user");
    let viewer = ok(c
        .cli(&["token", "create", "watcher", "--role", "viewer"])
        .output()
        .expect("cli"));
    // A stopped VM holds room on one node: the browser's VM is placed on
    // the other, and the migration moves it here.
    ok(c.cli(&[
        "vm",
        "create",
        "ballast",
        "--image",
        "demo",
        "--memory",
        "512MiB",
        "--no-start",
    ])
    .output()
    .expect("cli"));
    let ballast = c
        .wait_phase("ballast", novacron_api::VmPhase::Stopped, Duration::from_secs(30))
        .await;
    let busy = ballast.status.node.expect("placed");
    let busy_node = busy.clone();
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("..")
        .join("test-artifacts")
        .join("dashboard");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = tokio::task::spawn_blocking({
        let url = c.url.clone();
        let viewer = viewer.trim().to_string();
        let artifacts = artifacts.clone();
        move || {
            Command::new("node")
                .arg(ui.join("dashboard.mjs"))
                .current_dir(&ui)
                .env("NC_URL", url)
                .env("NC_USER", "ada")
                .env("NC_PASSWORD", "dashboard-pass-1")
                .env("NC_VIEWER_TOKEN", viewer)
                .env("NC_TARGET_NODE", busy)
                .env("NC_ARTIFACTS", &artifacts)
                .output()
                .expect("node (scripts/setup.sh installs it)")
        }
    })
    .await
    .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{log}");
    assert!(
        out.status.success(),
        "dashboard checks failed (screenshots in {}):\n{log}",
        artifacts.display()
    );
    assert!(log.contains("all dashboard checks passed"), "{log}");
    // The VM the browser made moved where the browser sent it.
    let vm = c.vm("ui-vm").await;
    assert_eq!(vm.status.phase, novacron_api::VmPhase::Running);
    assert_eq!(vm.status.node.as_deref(), Some(busy_node.as_str()));
}
