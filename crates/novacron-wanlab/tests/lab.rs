//! The WAN lab end to end: namespaces, TUN devices, the forwarder, and the
//! measured RTT and TCP throughput of the `wan` profile; removed on SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

use std::io::BufRead;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_novacron-wanlab");

fn namespaces() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned()
}

/// Stops the lab (and removes its namespaces) even when the test fails.
struct Lab {
    child: std::process::Child,
    name: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(BIN).args(["down", "--name", &self.name]).status();
    }
}

#[test]
fn wan_profile_has_its_rtt_and_rate_and_is_removed_on_stop() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let name = format!("wlt{}", std::process::id());
    let mut lab = Lab {
        child: Command::new(BIN)
            .args(["up", "--name", &name, "--hosts", "2", "--profile", "wan"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
        name: name.clone(),
    };
    let mut line = String::new();
    std::io::BufReader::new(lab.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("2 hosts up"), "{line}");
    let out = Command::new(BIN)
        .args(["check", "--name", &name, "--seconds", "3"])
        .output()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(lab.child.wait().unwrap().success());
    assert!(!namespaces().contains(&name), "namespaces left behind");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rtt = v["rtt_ms"].as_f64().unwrap();
    let mbit = v["tcp_mbit_s"].as_f64().unwrap();
    // 50 ms RTT, 100 Mbit/s with 0.1% loss (bounds leave room for a busy CI machine).
    assert!((49.0..75.0).contains(&rtt), "RTT {rtt} ms");
    assert!((30.0..=100.0).contains(&mbit), "TCP {mbit} Mbit/s");
}
