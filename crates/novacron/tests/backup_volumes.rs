//! Volumes in VM backups: a VM's attached volumes are backed up with it
//! (full the first time, then what changed), come back with a restore in
//! place, and make a restore into a new VM refuse unless told to leave
//! them out.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::backup::backup;
use common::guestnet::cli_fails;
use common::{ok, Cluster, Options};
use novacron_api::VmPhase;

const BOOT: Duration = Duration::from_secs(120);
const CHUNK: u64 = 4 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// Runs qemu-io on a disk file (the VM stopped); its output.
fn qemu_io(file: &std::path::Path, command: &str) -> String {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command])
        .arg(file)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A VM's backup holds its attached volumes: the first backup of a volume
/// is full, later ones read what changed on it; a restore in place puts
/// the volume back; a restore into a new VM says it would leave the
/// volumes behind unless told to.
#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_backed_up_with_their_vm_and_restored_in_place() {
    use novacron_api::{CreateVm, PowerState, VmSpec, Volume};
    let c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    let create = CreateVm {
        name: "holder".into(),
        project: None,
        labels: Default::default(),
        no_default_network: false,
        spec: VmSpec {
            disk_mib: Some(256),
            power_state: PowerState::Running,
            ..VmSpec::new("demo", 1, 128)
        },
    };
    let vm = c.client.create_vm(&create).await.expect("create");
    c.wait_phase("holder", VmPhase::Running, BOOT).await;
    c.wait_console("holder", "NOVACRON-GUEST-READY", 1, BOOT).await;
    ok(c.cli(&["volume", "create", "v1", "--size", "16MiB"])
        .output()
        .expect("cli"));
    ok(c.cli(&["vm", "volume", "attach", "holder", "v1", "--wait"])
        .output()
        .expect("cli"));
    let id = c.client.get::<Volume>("v1").await.expect("volume").metadata.id;
    let disk = format!("vol-{id}");

    // Running: the volume is in the backup, read in full the first time.
    let first = backup(&c, "holder", None);
    let names: Vec<&str> = first.disks.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&disk.as_str()), "{first:?}");

    // Stopped: a change to the volume is read, and little else.
    ok(c.cli(&["vm", "stop", "holder", "--wait"]).output().expect("cli"));
    let file = c
        .agents
        .iter()
        .map(|a| {
            a.data_dir
                .join("vms")
                .join(&vm.metadata.id)
                .join(format!("{disk}.qcow2"))
        })
        .find(|f| f.exists())
        .expect("the volume's file");
    qemu_io(&file, "write -P 0x5a 1M 1M");
    let second = backup(&c, "holder", None);
    assert!(second.incremental(), "{second:?}");
    let vol = second.disks.iter().find(|d| d.name == disk).expect("the volume");
    assert!(vol.bytes_read >= MIB && vol.bytes_read <= CHUNK, "{second:?}");
    qemu_io(&file, "write -P 0x77 1M 1M");

    // A new VM would leave the volume's data behind: refused unless asked.
    cli_fails(&c, &["backup", "restore", &second.id, "--as", "copy"], "holds volumes");
    ok(
        c.cli(&["backup", "restore", &second.id, "--as", "copy", "--without-volumes"])
            .output()
            .expect("cli"),
    );
    ok(c.cli(&["vm", "delete", "copy", "--wait"]).output().expect("cli"));

    // In place: the volume reads as backed up again.
    ok(c.cli(&["backup", "restore", &second.id, "--in-place"])
        .output()
        .expect("cli"));
    let read = qemu_io(&file, "read -P 0x5a 1M 1M");
    assert!(!read.contains("verification failed"), "{read}");
    // The restored disks have no tracking: the next backup is full.
    let fresh = backup(&c, "holder", None);
    assert!(!fresh.incremental(), "{fresh:?}");

    // A volume of the backup no longer attached: nowhere to put it back.
    ok(c.cli(&["vm", "volume", "detach", "holder", "v1", "--wait"])
        .output()
        .expect("cli"));
    cli_fails(
        &c,
        &["backup", "restore", &second.id, "--in-place"],
        "not attached to VM",
    );

    // Attached again, from the pool: the tracking it brings counted from
    // before it left, so its next backup here is full, saying why (the
    // root disk's is incremental).
    ok(c.cli(&["vm", "volume", "attach", "holder", "v1", "--wait"])
        .output()
        .expect("cli"));
    let again = backup(&c, "holder", None);
    let why = again.full_reason.clone().unwrap_or_default();
    assert!(why.contains(&format!("{disk}: it has no change tracking")), "{again:?}");
    assert!(!why.contains("root:"), "{again:?}");
}
