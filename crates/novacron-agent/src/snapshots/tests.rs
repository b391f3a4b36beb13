//! Snapshot layers on real qcow2 files (qemu-img, qemu-io).

use std::path::Path;

use super::*;

fn qemu_io(file: &Path, cmd: &str) -> bool {
    std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(file)
        .output()
        .expect("run qemu-io")
        .status
        .success()
}

fn write(file: &Path, pattern: u8, offset_kib: u64) {
    assert!(
        qemu_io(file, &format!("write -P {pattern} {offset_kib}k 64k")),
        "write {pattern} at {offset_kib}k"
    );
}

/// Whether the disk reads `pattern` (0: zeros) at `offset_kib`.
fn reads(file: &Path, pattern: u8, offset_kib: u64) -> bool {
    qemu_io(file, &format!("read -P {pattern} {offset_kib}k 64k"))
}

fn req(name: &str) -> CreateSnapshot {
    CreateSnapshot {
        name: name.into(),
        description: None,
        memory: false,
    }
}

/// A VM directory whose root disk is an overlay on an image elsewhere (by
/// absolute path, like the image cache) holding 7 at 512k, and a data disk.
async fn vm_dir(tmp: &tempfile::TempDir) -> VmDir {
    let image = tmp.path().join("image.qcow2");
    qemu::create_disk(&image, None, Some(16)).await.expect("image");
    write(&image, 7, 512);
    let dir = VmDir::new(tmp.path(), "vm");
    std::fs::create_dir_all(&dir.path).expect("dir");
    qemu::create_disk(&dir.root_disk(), Some((&image, "qcow2")), None)
        .await
        .expect("root");
    qemu::create_disk(&dir.data_disk(), None, Some(8)).await.expect("data");
    dir
}

fn names(dir: &VmDir) -> Vec<(String, Option<String>, bool)> {
    list(dir)
        .expect("list")
        .into_iter()
        .map(|s| (s.name, s.parent, s.current))
        .collect()
}

#[tokio::test]
async fn revert_brings_back_each_point_and_keeps_the_others() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = vm_dir(&tmp).await;
    let (root, data) = (dir.root_disk(), dir.data_disk());
    write(&root, 1, 0);
    write(&data, 1, 0);
    let s1 = take(&dir, &req("s1")).await.expect("take s1");
    assert_eq!(s1.disks, ["root", "data"]);
    write(&root, 2, 0);
    write(&data, 2, 0);
    take(&dir, &req("s2")).await.expect("take s2");
    write(&root, 3, 64);

    revert(&dir, "s1").await.expect("revert s1");
    assert!(reads(&root, 1, 0) && reads(&data, 1, 0), "s1's data");
    assert!(reads(&root, 0, 64), "written after s2: gone");
    assert!(reads(&root, 7, 512), "the image shows through");
    assert_eq!(
        names(&dir),
        [("s1".into(), None, true), ("s2".into(), Some("s1".into()), false)]
    );

    revert(&dir, "s2").await.expect("revert s2");
    assert!(
        reads(&root, 2, 0) && reads(&data, 2, 0),
        "s2's data, after reverting to s1"
    );
    assert!(reads(&root, 0, 64));

    assert!(matches!(take(&dir, &req("s2")).await, Err(SnapshotError::Exists(_))));
    assert!(matches!(revert(&dir, "nope").await, Err(SnapshotError::NotFound(_))));
    assert!(matches!(delete(&dir, "nope").await, Err(SnapshotError::NotFound(_))));
}

#[tokio::test]
async fn delete_merges_a_layer_into_every_child() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = vm_dir(&tmp).await;
    let root = dir.root_disk();
    write(&root, 1, 0);
    take(&dir, &req("a")).await.expect("take a");
    write(&root, 2, 64);
    take(&dir, &req("b")).await.expect("take b");
    // Back to a and on from there: a has two children, b and the disk.
    revert(&dir, "a").await.expect("revert a");
    write(&root, 3, 128);

    delete(&dir, "a").await.expect("delete a");
    assert!(!dir.path.join(layer_name("a", "root")).exists(), "a's layer removed");
    assert_eq!(names(&dir), [("b".into(), None, false)]);
    assert!(
        reads(&root, 1, 0) && reads(&root, 3, 128) && reads(&root, 0, 64),
        "the disk as it was"
    );
    assert!(reads(&root, 7, 512), "still on the image");

    revert(&dir, "b").await.expect("revert b");
    assert!(
        reads(&root, 1, 0) && reads(&root, 2, 64),
        "b as it was, a's data merged in"
    );
    assert!(reads(&root, 7, 512));

    // Deleting the current snapshot merges it into the disk; the last one
    // leaves the disk on the image again.
    write(&root, 4, 192);
    delete(&dir, "b").await.expect("delete b");
    assert!(names(&dir).is_empty());
    assert!(reads(&root, 1, 0) && reads(&root, 2, 64) && reads(&root, 4, 192) && reads(&root, 7, 512));
    let backing = backing_of(&root).await.expect("info").expect("a backing file");
    assert!(backing.file.ends_with("image.qcow2"), "{backing:?}");
    let data_backing = backing_of(&dir.data_disk()).await.expect("info");
    assert_eq!(data_backing, None, "the data disk is standalone again");
}

#[tokio::test]
async fn a_failed_take_leaves_the_disks_as_they_were() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = vm_dir(&tmp).await;
    write(&dir.root_disk(), 1, 0);
    // The data disk's overlay cannot be made: a directory is in its way.
    std::fs::create_dir(dir.path.join("data.qcow2.partial")).expect("block");
    assert!(take(&dir, &req("x")).await.is_err());
    assert!(names(&dir).is_empty());
    assert!(!dir.path.join(layer_name("x", "root")).exists());
    assert!(!dir.path.join(layer_name("x", "data")).exists());
    let backing = backing_of(&dir.root_disk()).await.expect("info").expect("backing");
    assert!(
        backing.file.ends_with("image.qcow2"),
        "root is its old self: {backing:?}"
    );
    assert!(reads(&dir.root_disk(), 1, 0));
}

#[tokio::test]
async fn a_vm_without_disks_has_nothing_to_snapshot() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = VmDir::new(tmp.path(), "vm");
    std::fs::create_dir_all(&dir.path).expect("dir");
    assert!(matches!(take(&dir, &req("x")).await, Err(SnapshotError::NoDisks)));
    assert!(list(&dir).expect("list").is_empty());
}

#[test]
fn layer_names_are_read_back_and_nothing_else() {
    let dir = VmDir::new(Path::new("/v"), "vm");
    assert_eq!(
        layer_file(&dir, "snap-before-upgrade.root"),
        Some(PathBuf::from("/v/vm/snap-before-upgrade.root.qcow2"))
    );
    assert_eq!(
        layer_file(&dir, "snap-with-ram.vmstate"),
        Some(PathBuf::from("/v/vm/snap-with-ram.vmstate"))
    );
    for bad in [
        "snap-x.vol-1",
        "snap-../x.root",
        "snap-X.root",
        "root",
        "snap-.data",
        "snap-x.vmstate.partial",
    ] {
        assert_eq!(layer_file(&dir, bad), None, "{bad}");
    }
}

/// Whether disk `disk` of the running QEMU reads `pattern` at
/// `offset_kib`, read through the node on top of it (as the guest reads),
/// over an NBD export.
async fn device_reads(qmp: &Qmp, dir: &VmDir, disk: &str, pattern: u8, offset_kib: u64) -> bool {
    use novacron_qmp::commands::{BlockExportAdd, BlockExportDel};
    let top = top_nodes(qmp).await.expect("query-block")[disk].clone();
    let id = format!("check-{disk}-{offset_kib}-{pattern}");
    qmp.run(&BlockExportAdd::nbd(&id, &top, false)).await.expect("export");
    let mut nbd = novacron_nbd::NbdClient::connect(&dir.path.join("check.sock"), &top, &[])
        .await
        .expect("nbd");
    let mut buf = vec![0u8; 65536];
    nbd.read(offset_kib * 1024, &mut buf).await.expect("read");
    nbd.disconnect().await.expect("disconnect");
    qmp.run(&BlockExportDel { id, mode: Some("hard") })
        .await
        .expect("export del");
    buf.iter().all(|b| *b == pattern)
}

#[tokio::test]
async fn the_running_vm_reads_the_same_after_a_snapshot() {
    use novacron_qmp::commands::NbdServerStart;
    use novacron_qmp::types::{SocketAddressLegacy, UnixSocketAddress};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = vm_dir(&tmp).await;
    write(&dir.data_disk(), 9, 1024);
    let spec = crate::qemu::paused_spec(&dir, true);
    let pid = qemu::launch("qemu-system-x86_64", &spec, &dir).await.expect("launch");
    let _kill = crate::qemu::KillOnDrop(pid);
    let qmp = Qmp::connect(&dir.qmp_migrate(), std::time::Duration::from_secs(10))
        .await
        .expect("qmp");
    qmp.run(&NbdServerStart::new(SocketAddressLegacy::Unix(UnixSocketAddress {
        path: dir.path.join("check.sock").display().to_string(),
    })))
    .await
    .expect("nbd server");
    let reads_both =
        || async { device_reads(&qmp, &dir, "root", 7, 512).await && device_reads(&qmp, &dir, "data", 9, 1024).await };
    assert!(reads_both().await);
    take_running(&dir, &qmp, &req("s1"), Quiesced(false))
        .await
        .expect("take");
    // The old tops are read-only backings now, which QEMU reopened by
    // their files' names: those must still name the layers' files.
    let after_one = reads_both().await;
    take_running(&dir, &qmp, &req("s2"), Quiesced(false))
        .await
        .expect("take again");
    let after_two = reads_both().await;
    crate::qemu::kill_and_wait(pid, &dir).await;
    assert!(after_one && after_two, "the disks read other data after a snapshot");
}
