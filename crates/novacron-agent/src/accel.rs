//! Chooses the accelerator: KVM only when a probe guest actually runs under
//! it, quickly. A present /dev/kvm is not enough: on some hosts (nested
//! virtualisation) KVM accepts a guest and then runs it so slowly that a
//! Linux kernel never gets past early boot. The probe boots a 512-byte guest
//! that switches to long mode and writes to QEMU's debug-exit port; working
//! KVM finishes it in well under a second (TCG in ~0.3 s), the nested KVM on
//! our build machines takes 3-6 s. So the probe has a deadline (default 2 s)
//! and anything slower falls back to TCG.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Boot sector, assembled from (GNU as, linked at 0x7c00):
/// real mode: cli; zero ds/es; clear 0x1000-0x3fff; PML4[0]=0x2003,
/// PDPT[0]=0x3003, PD[0]=0x83 (one 2 MiB identity page); lgdt; CR4.PAE;
/// CR3=0x1000; EFER.LME; CR0.PG|PE; ljmp 0x08:lm.
/// long mode: `mov $1,%al; out %al,$0xf4; 1: hlt; jmp 1b`.
/// GDT: null, 64-bit code (0x00af9a000000ffff), data (0x00cf92000000ffff).
const PROBE_CODE: [u8; 140] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0xbf, 0x00, 0x10, 0x66, 0x31, 0xc0, 0x66, 0xb9, 0x00, 0x18, 0x00, 0x00,
    0xf3, 0xab, 0x66, 0xc7, 0x06, 0x00, 0x10, 0x03, 0x20, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x00, 0x20, 0x03, 0x30, 0x00,
    0x00, 0x66, 0xc7, 0x06, 0x00, 0x30, 0x83, 0x00, 0x00, 0x00, 0x0f, 0x01, 0x16, 0x88, 0x7c, 0x0f, 0x20, 0xe0, 0x66,
    0x83, 0xc8, 0x20, 0x0f, 0x22, 0xe0, 0x66, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x66, 0xb9, 0x80, 0x00,
    0x00, 0xc0, 0x0f, 0x32, 0x66, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x66, 0x0d, 0x01, 0x00,
    0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0x69, 0x7c, 0x08, 0x00, 0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00,
    0x92, 0xcf, 0x00, 0x17, 0x00, 0x70, 0x7c,
];

/// The probe guest's exit status: QEMU exits with (value << 1) | 1 = 3.
const PROBE_SUCCESS_EXIT: i32 = 3;

fn probe_boot_sector() -> Vec<u8> {
    let mut sector = vec![0u8; 512];
    sector[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub works: bool,
    /// Why it does not work (or "ok").
    pub detail: String,
    pub elapsed: Duration,
}

/// Boots the probe sector under `accel` and reports whether it ran to the exit
/// port within `timeout`. The QEMU process is killed on timeout.
pub async fn probe(qemu: &str, accel: &str, work_dir: &Path, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let outcome = |works: bool, detail: String| ProbeOutcome {
        works,
        detail,
        elapsed: start.elapsed(),
    };
    let image = work_dir.join("accel-probe.img");
    if let Err(e) = std::fs::write(&image, probe_boot_sector()) {
        return outcome(false, format!("cannot write probe image: {e}"));
    }
    let child = tokio::process::Command::new(qemu)
        .args([
            "-accel",
            accel,
            "-machine",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", image.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return outcome(false, format!("cannot run {qemu}: {e}")),
    };
    let result = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => outcome(
            false,
            format!("probe guest did not finish within {timeout:?} (hangs or is too slow)"),
        ),
        Ok(Err(e)) => outcome(false, format!("waiting for probe failed: {e}")),
        Ok(Ok(out)) if out.status.code() == Some(PROBE_SUCCESS_EXIT) => outcome(true, "ok".into()),
        Ok(Ok(out)) => outcome(
            false,
            format!(
                "probe exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
    };
    let _ = std::fs::remove_file(&image);
    result
}

/// `kvm` if the probe shows it works, else `tcg`. Logs the choice once.
pub async fn choose(qemu: &str, work_dir: &Path, timeout: Duration) -> String {
    if !Path::new("/dev/kvm").exists() {
        tracing::warn!("/dev/kvm is missing: guests run under TCG (software emulation)");
        return "tcg".into();
    }
    let kvm = probe(qemu, "kvm", work_dir, timeout).await;
    if kvm.works {
        tracing::info!(
            elapsed_ms = kvm.elapsed.as_millis() as u64,
            "KVM works: guests use hardware acceleration"
        );
        "kvm".into()
    } else {
        tracing::warn!(reason = %kvm.detail, "KVM probe failed: guests run under TCG (software emulation)");
        "tcg".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_qemu(dir: &Path, body: &str) -> String {
        let path = dir.join("fake-qemu");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    }

    #[tokio::test]
    async fn hanging_accelerator_times_out_quickly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = fake_qemu(dir.path(), "exec sleep 60");
        let out = probe(&qemu, "kvm", dir.path(), Duration::from_millis(500)).await;
        assert!(!out.works);
        assert!(out.detail.contains("did not finish"), "{}", out.detail);
        assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    }

    #[tokio::test]
    async fn failing_and_succeeding_exits_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broken = fake_qemu(dir.path(), "echo 'Could not access KVM kernel module' >&2; exit 1");
        let out = probe(&broken, "kvm", dir.path(), Duration::from_secs(5)).await;
        assert!(!out.works);
        assert!(out.detail.contains("KVM kernel module"), "{}", out.detail);
        let good = fake_qemu(dir.path(), "exit 3");
        assert!(probe(&good, "kvm", dir.path(), Duration::from_secs(5)).await.works);
        let missing = probe("/nonexistent/qemu", "kvm", dir.path(), Duration::from_secs(5)).await;
        assert!(!missing.works);
    }
}
