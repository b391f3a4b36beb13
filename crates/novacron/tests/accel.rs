//! The KVM probe with real QEMU: the probe guest is valid (it completes under
//! TCG), and choosing an accelerator never takes much longer than the probe
//! deadline, whatever /dev/kvm does on this host.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

use std::time::{Duration, Instant};

use novacron_agent::accel;

#[tokio::test]
async fn probe_guest_runs_to_completion_under_tcg() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = accel::probe("qemu-system-x86_64", "tcg", dir.path(), Duration::from_secs(20)).await;
    assert!(out.works, "probe guest did not complete under TCG: {}", out.detail);
}

#[tokio::test]
async fn choosing_an_accelerator_is_bounded_by_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deadline = Duration::from_secs(2);
    let started = Instant::now();
    let chosen = accel::choose("qemu-system-x86_64", dir.path(), deadline).await;
    let took = started.elapsed();
    assert!(chosen == "kvm" || chosen == "tcg");
    assert!(took < deadline + Duration::from_secs(2), "choosing took {took:?}");
    eprintln!("chose {chosen} in {took:?}");
}
