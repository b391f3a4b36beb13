//! Against QEMU's own NBD server (`qemu-nbd`), on a qcow2 with a
//! persistent dirty bitmap that `qemu-io` writes through.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1024 * 1024;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-nbd serving `disk` read-only with bitmap `cbt`, killed on drop.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, disk: &Path) -> Server {
    let sock = dir.join("nbd.sock");
    let child = Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "--shared=4",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-B",
            "cbt",
        ])
        .arg(format!("--socket={}", sock.display()))
        .arg(disk)
        .spawn()
        .expect("qemu-nbd");
    // The socket file appears at bind(), a moment before listen(): wait
    // until a connection is taken (CI once connected in between).
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child, sock)
}

fn disk_with_writes(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable"])
        .arg(&disk)
        .arg("cbt"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 5M 4k"])
        .arg(&disk));
    disk
}

#[tokio::test]
async fn reads_and_dirty_extents_come_from_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with_writes(dir.path());
    let server = serve(dir.path(), &disk);
    let mut c = NbdClient::connect(&server.1, "disk", &["base:allocation", "qemu:dirty-bitmap:cbt"])
        .await
        .expect("connect");
    assert_eq!(c.size(), 16 * MIB);

    let mut dirty = Vec::new();
    let mut at = 0;
    while at < c.size() {
        let extents = c.block_status("qemu:dirty-bitmap:cbt", at, MAX_REQUEST).await.unwrap();
        at = extents.last().map(|e| e.offset + e.length).unwrap();
        dirty.extend(extents.into_iter().filter(|e| e.flags & STATE_DIRTY != 0));
    }
    // The bitmap's granularity is 64 KiB.
    let spans: Vec<(u64, u64)> = dirty.iter().map(|e| (e.offset, e.length)).collect();
    assert_eq!(spans, [(MIB, 64 * 1024), (5 * MIB, 64 * 1024)]);

    let allocated = c.block_status("base:allocation", 0, MAX_REQUEST).await.unwrap();
    assert_eq!(allocated[0].flags & STATE_HOLE, STATE_HOLE, "{allocated:?}");

    let mut buf = vec![0u8; 128 * 1024];
    c.read(MIB - 64 * 1024, &mut buf).await.unwrap();
    assert!(buf[..64 * 1024].iter().all(|b| *b == 0));
    assert!(buf[64 * 1024..].iter().all(|b| *b == 0xab));
    let mut big = vec![1u8; 4 * MIB as usize];
    c.read(4 * MIB, &mut big).await.unwrap();
    assert!(big[MIB as usize..MIB as usize + 4096].iter().all(|b| *b == 0xcd));
    assert!(big[..MIB as usize].iter().all(|b| *b == 0));

    assert!(matches!(
        c.read(16 * MIB - 1, &mut buf).await,
        Err(NbdError::Range { .. })
    ));
    c.disconnect().await.unwrap();

    let missing = NbdClient::connect(&server.1, "disk", &["qemu:dirty-bitmap:other"]).await;
    assert!(matches!(missing, Err(NbdError::NoContext(_))), "{:?}", missing.err());
    let wrong = NbdClient::connect(&server.1, "nope", &[]).await;
    assert!(
        matches!(wrong, Err(NbdError::OptionRefused { .. })),
        "{:?}",
        wrong.err()
    );
}
