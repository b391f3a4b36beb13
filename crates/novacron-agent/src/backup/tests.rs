//! A disk's full and incremental backups read from qemu-nbd, into a
//! datastore in a temp dir, and restored.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chrono::Utc;
use novacron_backup::{restore::restore_disk, BackupId, Datastore};

use super::*;

const MIB: u64 = 1024 * 1024;

/// What a dirty bitmap marks per write: QEMU's default granularity for a
/// qcow2 bitmap is the image's cluster (64 KiB here).
const GRANULE: u64 = 64 * 1024;

fn local(store: &Datastore) -> target::LocalTarget {
    target::LocalTarget {
        name: "local".into(),
        store: store.clone(),
        codec: Default::default(),
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-nbd serving `disk` read-only with bitmap `cbt`, at `sock`.
fn serve(disk: &Path, sock: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["--read-only", "--persistent", "-f", "qcow2", "-x", "disk", "-B", "cbt"])
        .arg(format!("--socket={}", sock.display()))
        .arg(disk)
        .spawn()
        .expect("qemu-nbd");
    // The socket file appears at bind(), a moment before listen(): wait
    // until a connection is taken.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

/// A blank qcow2 of `size` (qemu-img's notation).
fn blank_qcow2(path: &Path, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size));
}

/// The one disk of the tests' VMs: root, on node `top`.
fn root_on(top: &str, size: u64) -> [export::DiskNode; 1] {
    [export::DiskNode {
        disk: "root".into(),
        top: top.into(),
        size,
    }]
}

fn qemu_io(disk: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(disk));
}

async fn back_up(
    store: &Datastore,
    disk: &Path,
    sock: &Path,
    previous: Option<&FixedIndex>,
    time: &str,
) -> (BackupId, FixedIndex, DiskStats) {
    let server = serve(disk, sock);
    let contexts = ["base:allocation", "qemu:dirty-bitmap:cbt"];
    let mut nbd = NbdClient::connect(sock, "disk", &contexts).await.unwrap();
    let reading = match previous {
        Some(previous) => Reading::Changed {
            context: contexts[1],
            previous,
        },
        None => Reading::Full,
    };
    let mut seen = 0;
    let (index, stats) = read_disk(&mut nbd, reading, &local(store), |done, _| seen = done)
        .await
        .unwrap();
    assert_eq!(seen, nbd.size());
    let id = BackupId {
        vm: "web-1".into(),
        time: chrono::DateTime::parse_from_rfc3339(time).unwrap().with_timezone(&Utc),
    };
    let mut w = store.begin(&id).unwrap();
    w.add_disk("root", &index, stats).unwrap();
    w.finish(novacron_backup::BackupInfo::default()).unwrap();
    nbd.disconnect().await.unwrap();
    drop(server);
    // The point in time is taken: the bitmap starts again.
    run(Command::new("qemu-img")
        .args(["bitmap", "--clear"])
        .arg(disk)
        .arg("cbt"));
    (id, index, stats)
}

/// The restored raw image reads the same as the qcow2.
fn same_content(store: &Datastore, id: &BackupId, disk: &Path, dir: &Path) {
    let raw: PathBuf = dir.join(format!("restored-{}.raw", id.time.timestamp()));
    let mut f = std::fs::File::create(&raw).unwrap();
    restore_disk(store, id, "root", &mut f, |_, _| {}).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(disk));
}

#[tokio::test]
async fn incremental_backups_read_only_what_the_bitmap_marks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create(&dir.path().join("store")).unwrap();
    let disk = dir.path().join("root.qcow2");
    let sock = dir.path().join("nbd.sock");
    // 6 chunks, the last one short; data in chunks 0 and 2.
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(format!("{}", 5 * CHUNK_SIZE + MIB)));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable"])
        .arg(&disk)
        .arg("cbt"));
    qemu_io(&disk, &["write -P 0xab 0 64k", "write -P 0xcd 9M 1M"]);

    let (first, index, stats) = back_up(&store, &disk, &sock, None, "2026-12-04T10:00:00Z").await;
    // Zero chunks are not read: one full-size and one short zero chunk stored.
    assert_eq!(stats.bytes_read, 2 * CHUNK_SIZE, "{stats:?}");
    assert_eq!(stats.chunks_new, 4, "{stats:?}");
    same_content(&store, &first, &disk, dir.path());

    // A write into chunk 3 only: the next backup reads what the bitmap
    // marks of it and lays that over the previous backup's chunk 3.
    qemu_io(&disk, &["write -P 0xef 13M 4k"]);
    let (second, index2, stats) = back_up(&store, &disk, &sock, Some(&index), "2026-12-04T11:00:00Z").await;
    assert_eq!(stats.bytes_read, GRANULE, "{stats:?}");
    assert_eq!(stats.bytes_from_previous, CHUNK_SIZE, "{stats:?}");
    assert_eq!(stats.chunks_new, 1, "{stats:?}");
    assert_eq!(
        index2
            .digests
            .iter()
            .zip(&index.digests)
            .filter(|(a, b)| a != b)
            .count(),
        1
    );
    same_content(&store, &second, &disk, dir.path());
    // The first backup still restores what the disk held then.
    let raw = dir.path().join("first.raw");
    let mut f = std::fs::File::create(&raw).unwrap();
    restore_disk(&store, &first, "root", &mut f, |_, _| {}).unwrap();
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes[13 * MIB as usize], 0);
    assert_eq!(bytes[0], 0xab);

    // The previous backup's chunk 0 damaged: a write into chunk 0 cannot be
    // laid over it, so the chunk is read whole, and the backup is right.
    let hex = index2.digests[0].to_hex();
    let bad = dir.path().join("store/.chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    qemu_io(&disk, &["write -P 0x77 1M 4k"]);
    let (third, _, stats) = back_up(&store, &disk, &sock, Some(&index2), "2026-12-04T12:00:00Z").await;
    assert_eq!(stats.bytes_read, GRANULE + CHUNK_SIZE, "{stats:?}");
    assert_eq!(stats.bytes_from_previous, 0, "{stats:?}");
    same_content(&store, &third, &disk, dir.path());

    // A disk that grew needs a full backup.
    run(Command::new("qemu-img").args(["resize", "-q"]).arg(&disk).arg("+4M"));
    let _server = serve(&disk, &sock);
    let mut nbd = NbdClient::connect(&sock, "disk", &["base:allocation", "qemu:dirty-bitmap:cbt"])
        .await
        .unwrap();
    let grown = read_disk(
        &mut nbd,
        Reading::Changed {
            context: "qemu:dirty-bitmap:cbt",
            previous: &index2,
        },
        &local(&store),
        |_, _| {},
    )
    .await;
    assert!(
        matches!(grown, Err(BackupError::SizeChanged { .. })),
        "{:?}",
        grown.err()
    );
}

/// A QEMU without a guest holding one qcow2 disk as node `root` under a
/// drive `guest` (HMP's `qemu-io` on the drive stands in for the guest's
/// writes, which go through the drive as a device's do), killed on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn qemu_with_disk(dir: &Path, disk: &Path) -> (Qemu, novacron_qmp::Qmp) {
    let qmp_sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_sock);
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-machine",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .arg("-drive")
        .arg(format!(
            "if=none,id=guest,format=qcow2,node-name=root,file={}",
            disk.display()
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu");
    let q = Qemu(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match novacron_qmp::Qmp::connect(&qmp_sock, Duration::from_secs(10)).await {
            Ok(qmp) => return (q, qmp),
            Err(e) => assert!(Instant::now() < deadline, "QMP never answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn guest_write(qmp: &novacron_qmp::Qmp, pattern: u8, offset: &str, len: &str) {
    let out = qmp
        .run(&novacron_qmp::commands::HumanMonitorCommand {
            command_line: format!("qemu-io guest \"write -P {pattern} {offset} {len}\""),
        })
        .await
        .expect("hmp");
    assert!(!out.contains("rror"), "{out}");
}

async fn dirty_bytes(qmp: &novacron_qmp::Qmp) -> u64 {
    let nodes = qmp
        .run(&novacron_qmp::commands::QueryNamedBlockNodes { flat: true })
        .await
        .unwrap();
    nodes
        .iter()
        .filter(|n| n.node_name.as_deref() == Some("root"))
        .flat_map(|n| &n.dirty_bitmaps)
        .find(|b| b.name.as_deref() == Some(export::CBT))
        .map(|b| b.count)
        .expect("the tracking bitmap")
}

#[tokio::test]
async fn a_running_disk_is_exported_as_it_was_at_the_backup_instant() {
    use export::Tracking;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.qcow2");
    blank_qcow2(&disk, "16M");
    let (_qemu, qmp) = qemu_with_disk(dir.path(), &disk).await;
    assert_eq!(export::tracking(&qmp, "root").await.unwrap(), Tracking::Missing);
    let disks = root_on("root", 16 * MIB);
    // The first backup is full, and tracking starts at its instant.
    guest_write(&qmp, 0x10, "3M", "64k").await;
    let pit = export::start(&qmp, dir.path(), &disks).await.unwrap();
    assert_eq!(pit.disks[0].tracking, Tracking::Missing);
    assert_eq!(pit.disks[0].changed_context, None);
    pit.finish(&qmp, true).await.unwrap();
    assert_eq!(export::tracking(&qmp, "root").await.unwrap(), Tracking::Consistent);
    assert_eq!(dirty_bytes(&qmp).await, 0);
    guest_write(&qmp, 0x11, "0", "64k").await;
    guest_write(&qmp, 0x22, "5M", "64k").await;

    let pit = export::start(&qmp, dir.path(), &disks).await.unwrap();
    // The guest writes on; the export keeps the instant's content, and the
    // tracking bitmap now records only what comes after it.
    guest_write(&qmp, 0x33, "0", "64k").await;
    assert_eq!(dirty_bytes(&qmp).await, 64 * 1024);
    let changed = pit.disks[0]
        .changed_context
        .clone()
        .expect("an incremental is possible");
    let mut nbd = NbdClient::connect(&pit.socket, "root", &[ALLOCATION, &changed])
        .await
        .unwrap();
    let dirty: Vec<(u64, u64)> = nbd
        .block_status(&changed, 0, 16 * MIB as u32)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, [(0, 64 * 1024), (5 * MIB, 64 * 1024)]);
    let mut buf = vec![0u8; 4096];
    nbd.read(0, &mut buf).await.unwrap();
    assert!(
        buf.iter().all(|b| *b == 0x11),
        "the export shows a write after its instant"
    );
    nbd.disconnect().await.unwrap();
    pit.finish(&qmp, true).await.unwrap();
    assert!(!dir.path().join("fleece-root.qcow2").exists());
    assert_eq!(dirty_bytes(&qmp).await, 64 * 1024);

    // A backup that fails gives its changes back to the tracking bitmap.
    let pit = export::start(&qmp, dir.path(), &disks).await.unwrap();
    guest_write(&qmp, 0x44, "9M", "64k").await;
    pit.finish(&qmp, false).await.unwrap();
    assert_eq!(dirty_bytes(&qmp).await, 2 * 64 * 1024);
}

#[tokio::test]
async fn tracking_left_by_a_qemu_that_was_killed_is_not_trusted() {
    use export::Tracking;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.qcow2");
    blank_qcow2(&disk, "16M");
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable"])
        .arg(&disk)
        .arg(export::CBT));
    let (qemu, qmp) = qemu_with_disk(dir.path(), &disk).await;
    assert_eq!(export::tracking(&qmp, "root").await.unwrap(), Tracking::Consistent);
    guest_write(&qmp, 0x11, "0", "64k").await;
    drop(qmp);
    drop(qemu); // SIGKILL: the bitmap is never saved

    let (_qemu, qmp) = qemu_with_disk(dir.path(), &disk).await;
    assert_eq!(export::tracking(&qmp, "root").await.unwrap(), Tracking::Inconsistent);
    let disks = root_on("root", 16 * MIB);
    let pit = export::start(&qmp, dir.path(), &disks).await.unwrap();
    assert_eq!(pit.disks[0].tracking, Tracking::Inconsistent);
    assert_eq!(pit.disks[0].changed_context, None, "a full backup");
    pit.finish(&qmp, true).await.unwrap();
    assert_eq!(export::tracking(&qmp, "root").await.unwrap(), Tracking::Consistent);
}

#[tokio::test]
async fn running_vm_backups_are_incremental_while_the_chain_holds() {
    use super::running::back_up_running;
    use super::target::LocalTarget;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.qcow2");
    blank_qcow2(&disk, "24M");
    let target = LocalTarget {
        name: "local".into(),
        store: Datastore::create(&dir.path().join("store")).unwrap(),
        codec: Default::default(),
    };
    let disks = root_on("root", 24 * MIB);
    let (qemu, qmp) = qemu_with_disk(dir.path(), &disk).await;
    guest_write(&qmp, 0x11, "0", "1M").await;
    guest_write(&qmp, 0x22, "10M", "1M").await;
    let first = back_up_running(&qmp, dir.path(), "web-1", "id-1", &disks, &target, |_, _, _| {})
        .await
        .unwrap();
    assert!(
        first.full_reason.as_deref().unwrap_or("").contains("first backup"),
        "{first:?}"
    );
    assert_eq!(first.disks[0].bytes_read, 2 * CHUNK_SIZE);

    // One write since: the next backup reads its chunk only. (Backups are
    // named by the second they start in.)
    guest_write(&qmp, 0x33, "17M", "4k").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = back_up_running(&qmp, dir.path(), "web-1", "id-1", &disks, &target, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(second.full_reason, None, "{second:?}");
    assert_eq!(second.disks[0].bytes_read, GRANULE);
    assert_eq!(second.disks[0].bytes_from_previous, CHUNK_SIZE);
    let raw = dir.path().join("second.raw");
    let mut f = std::fs::File::create(&raw).unwrap();
    let second_id = BackupId {
        vm: second.vm.clone(),
        time: second.time,
    };
    restore_disk(&target.store, &second_id, "root", &mut f, |_, _| {}).unwrap();
    // What the guest wrote, and zeros elsewhere (the live qcow2 cannot be
    // compared while QEMU holds its metadata).
    let bytes = std::fs::read(&raw).unwrap();
    let m = MIB as usize;
    let mut expected = vec![0u8; 24 * m];
    expected[..m].fill(0x11);
    expected[10 * m..11 * m].fill(0x22);
    expected[17 * m..17 * m + 4096].fill(0x33);
    assert!(bytes == expected, "the restored disk differs from what the guest wrote");

    // Another store: its first backup of the VM is full.
    let other = LocalTarget {
        name: "offsite".into(),
        store: Datastore::create(&dir.path().join("offsite")).unwrap(),
        codec: Default::default(),
    };
    let elsewhere = back_up_running(&qmp, dir.path(), "web-1", "id-1", &disks, &other, |_, _, _| {})
        .await
        .unwrap();
    assert!(elsewhere.full_reason.is_some());

    // QEMU killed: the tracking it made was never saved (one it had loaded
    // would be inconsistent: see the test above), so the next backup is full.
    drop(qmp);
    drop(qemu);
    let (_qemu, qmp) = qemu_with_disk(dir.path(), &disk).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after_kill = back_up_running(&qmp, dir.path(), "web-1", "id-1", &disks, &other, |_, _, _| {})
        .await
        .unwrap();
    assert!(
        after_kill
            .full_reason
            .as_deref()
            .unwrap_or("")
            .contains("ended before saving it"),
        "{after_kill:?}"
    );
}

#[tokio::test]
async fn tracking_moves_to_the_overlay_of_a_snapshot_of_the_running_vm() {
    use super::running::back_up_running;
    use super::target::LocalTarget;
    let tmp = tempfile::tempdir().unwrap();
    let dir = crate::qemu::VmDir::new(tmp.path(), "vm-1");
    std::fs::create_dir_all(&dir.path).unwrap();
    blank_qcow2(&dir.root_disk(), "16M");
    let spec = crate::qemu::paused_spec(&dir, false);
    let pid = crate::qemu::launch("qemu-system-x86_64", &spec, &dir)
        .await
        .expect("launch");
    let _kill = crate::qemu::KillOnDrop(pid);
    let qmp = novacron_qmp::Qmp::connect(&dir.qmp_migrate(), Duration::from_secs(10))
        .await
        .expect("qmp");
    let write = |pattern: u8, offset: &'static str| {
        let qmp = &qmp;
        async move {
            let out = qmp
                .run(&novacron_qmp::commands::HumanMonitorCommand {
                    command_line: format!(
                        "qemu-io -d /machine/peripheral/root-dev/virtio-backend \"write -P {pattern} {offset} 4k\""
                    ),
                })
                .await
                .expect("hmp");
            assert!(!out.contains("rror"), "{out}");
        }
    };
    let target = LocalTarget {
        name: "local".into(),
        store: Datastore::create(&tmp.path().join("store")).unwrap(),
        codec: Default::default(),
    };
    let disks = |top: String| root_on(&top, 16 * MIB);
    let first = back_up_running(
        &qmp,
        &dir.path,
        "web-1",
        "vm-1",
        &disks("root".into()),
        &target,
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert!(first.full_reason.is_some());

    // A write before the snapshot (tracked on the old top), one after (on
    // the overlay): the next backup is incremental and reads both chunks.
    write(0x11, "1M").await;
    let req = novacron_api::CreateSnapshot {
        name: "s1".into(),
        description: None,
        memory: false,
    };
    crate::snapshots::take_running(&dir, &qmp, &req, crate::snapshots::Quiesced(false))
        .await
        .unwrap();
    write(0x22, "9M").await;
    let top = crate::snapshots::top_nodes(&qmp).await.unwrap()["root"].clone();
    assert_ne!(top, "root");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = back_up_running(&qmp, &dir.path, "web-1", "vm-1", &disks(top), &target, |_, _, _| {})
        .await
        .unwrap();
    crate::qemu::kill_and_wait(pid, &dir).await;
    assert_eq!(second.full_reason, None, "{second:?}");
    assert_eq!(second.disks[0].bytes_read, 2 * GRANULE, "{second:?}");
}

#[tokio::test]
async fn stopped_vm_backups_read_what_changed_and_tracking_survives_a_snapshot() {
    use super::stopped::{back_up_stopped, carry_tracking_in_files, tracking_in_file};
    use super::target::LocalTarget;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.qcow2");
    blank_qcow2(&disk, "24M");
    qemu_io(&disk, &["write -P 0x11 0 1M", "write -P 0x22 10M 1M"]);
    let target = LocalTarget {
        name: "local".into(),
        store: Datastore::create(&dir.path().join("store")).unwrap(),
        codec: Default::default(),
    };
    let disks = [("root".to_string(), disk.clone())];
    let first = back_up_stopped(dir.path(), "web-1", "id-1", &disks, &target, |_, _, _| {})
        .await
        .unwrap();
    assert!(first.full_reason.is_some(), "{first:?}");
    assert_eq!(first.disks[0].bytes_read, 2 * CHUNK_SIZE);
    // Tracking starts with the backup stored.
    assert_eq!(tracking_in_file(&disk).await.unwrap(), export::Tracking::Consistent);

    qemu_io(&disk, &["write -P 0x33 17M 4k"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = back_up_stopped(dir.path(), "web-1", "id-1", &disks, &target, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(second.full_reason, None, "{second:?}");
    assert_eq!(second.disks[0].bytes_read, GRANULE);

    // A snapshot of the stopped VM: the disk becomes a layer under a new
    // overlay, which gets its tracking; a write before the snapshot and one
    // after are both in the next backup, which is incremental.
    qemu_io(&disk, &["write -P 0x44 2M 4k"]);
    let layer = dir.path().join("root.snap-s1.qcow2");
    std::fs::hard_link(&disk, &layer).unwrap();
    // Made aside and renamed over the disk, as snapshots do (the disk's
    // name must not be written through: it is the layer's file too).
    let overlay = dir.path().join("root.partial.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "root.snap-s1.qcow2"])
        .arg(&overlay));
    std::fs::rename(&overlay, &disk).unwrap();
    carry_tracking_in_files(&layer, &disk).await.unwrap();
    qemu_io(&disk, &["write -P 0x55 21M 4k"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = back_up_stopped(dir.path(), "web-1", "id-1", &disks, &target, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(third.full_reason, None, "{third:?}");
    assert_eq!(third.disks[0].bytes_read, 2 * GRANULE, "{third:?}");
    let raw = dir.path().join("third.raw");
    let mut f = std::fs::File::create(&raw).unwrap();
    let third_id = BackupId {
        vm: third.vm.clone(),
        time: third.time,
    };
    restore_disk(&target.store, &third_id, "root", &mut f, |_, _| {}).unwrap();
    let converted = dir.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&converted));
    assert!(
        std::fs::read(&raw).unwrap() == std::fs::read(&converted).unwrap(),
        "the restored disk differs from the disk"
    );
}
