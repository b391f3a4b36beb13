//! The server against QEMU's own NBD client (`qemu-img`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::server::{serve, Export};

/// Each byte is a function of its offset; reads at `broken` fail.
struct Pattern {
    size: u64,
    broken: Option<u64>,
}

fn byte_at(offset: u64) -> u8 {
    (offset / 4096 * 7 + offset % 251) as u8
}

impl Export for Pattern {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        if self
            .broken
            .is_some_and(|b| (offset..offset + u64::from(length)).contains(&b))
        {
            return Err(io::Error::other("broken"));
        }
        // Yield, so answers can come back out of order.
        tokio::task::yield_now().await;
        Ok((offset..offset + u64::from(length)).map(byte_at).collect())
    }
}

async fn qemu_img_convert(sock: &Path, export: &str, out: &Path) -> std::process::Output {
    tokio::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", "-m", "8", "-W"])
        .arg(format!("nbd+unix:///{export}?socket={}", sock.display()))
        .arg(out)
        .output()
        .await
        .unwrap()
}

fn start(dir: &Path, export: Pattern) -> (std::path::PathBuf, tokio::task::JoinHandle<io::Result<()>>) {
    let sock = dir.join("nbd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let task = tokio::spawn(serve(listener, "disk".into(), Arc::new(export)));
    (sock, task)
}

#[tokio::test]
async fn qemu_reads_an_export_through_it() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of qemu-img's requests (disks are whole sectors:
    // QEMU's client reads a partial last sector's reply padded to 512).
    let size = 5 * 1024 * 1024 + 12 * 512;
    let (sock, task) = start(dir.path(), Pattern { size, broken: None });
    let out = dir.path().join("out.raw");
    let done = qemu_img_convert(&sock, "disk", &out).await;
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, size);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == byte_at(i as u64)),
        "bytes differ"
    );

    // An unknown export name is refused.
    let done = qemu_img_convert(&sock, "other", &dir.path().join("other.raw")).await;
    assert!(!done.status.success());
    task.abort();
}

#[tokio::test]
async fn a_failed_read_reaches_qemu_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, task) = start(
        dir.path(),
        Pattern {
            size: 4 * 1024 * 1024,
            broken: Some(3 * 1024 * 1024),
        },
    );
    let done = qemu_img_convert(&sock, "disk", &dir.path().join("out.raw")).await;
    assert!(!done.status.success());
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    task.abort();
}
