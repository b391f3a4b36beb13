//! Backups of a busybox guest through the server's store (mTLS, the
//! agent's certificate): the first is full, the next reads only what the
//! guest wrote, and they stay incremental while the VM is stopped (read
//! from its disk files) and after it starts again (the tracking bitmap
//! lives in the qcow2); a killed QEMU makes the next one full, saying why.
//! A restore into a new VM boots with the data written before the backup.
//! Verify and restore find a damaged chunk; a store whose disk is full,
//! stores, RBAC and bad input answer clearly.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use common::backup::backup;
use common::guestnet::{cli_fails, guest_run, guest_value, post, wait_console_answers};
use common::{ok, Cluster, Options};
use novacron_api::{Backup, BackupVerification, RunStrategy, VmPhase};

const BOOT: Duration = Duration::from_secs(120);
const GUEST: Duration = Duration::from_secs(60);
const CHUNK: u64 = 4 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

fn read(b: &Backup) -> u64 {
    b.disks.iter().map(|d| d.bytes_read).sum()
}

/// A 256 KiB tmpfs at a path: a disk that fills at once. Unmounted when
/// dropped, whatever the test did.
struct TinyMount(std::path::PathBuf);

impl TinyMount {
    fn new(path: &std::path::Path) -> TinyMount {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(path)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        TinyMount(path.into())
    }
}

impl Drop for TinyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

async fn start_and_wait(c: &Cluster, vm: &str, boot: usize) {
    ok(c.cli(&["vm", "start", vm, "--wait"]).output().expect("cli"));
    c.wait_console(vm, "NOVACRON-GUEST-READY", boot, BOOT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_are_incremental_across_restarts_and_full_after_a_crash() {
    let c = Cluster::start(Options {
        agents: 2,
        ..Default::default()
    })
    .await;
    c.import_demo().await;
    c.create_vm("keeper", 128, RunStrategy::Manual, true).await;
    c.wait_phase("keeper", VmPhase::Running, BOOT).await;
    c.wait_console("keeper", "NOVACRON-GUEST-READY", 1, BOOT).await;

    // Bad input first: it changes nothing.
    cli_fails(&c, &["backup", "create", "keeper", "--store", "nowhere"], "not found");
    cli_fails(&c, &["backup", "create", "ghost"], "not found");
    cli_fails(&c, &["backup", "get", "keeper"], "not a backup id");
    let (got, err) = post(&c, "vms/keeper/backups", serde_json::json!({"store": "Bad Name"})).await;
    assert_eq!(got, 422, "{err}");
    let listed = ok(c.cli(&["-o", "json", "backup", "list"]).output().expect("cli"));
    assert_eq!(serde_json::from_str::<Vec<Backup>>(&listed).unwrap(), vec![]);

    let first = backup(&c, "keeper", None);
    assert!(!first.incremental(), "{first:?}");
    assert!(
        first.full_reason.as_deref().unwrap_or("").contains("first backup"),
        "{first:?}"
    );
    assert_eq!(first.store, "local");
    assert_eq!(first.project, "default");
    let disks: Vec<&str> = first.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(disks, ["root", "data"]);

    // The guest writes 1 MiB: the next backup reads what it changed (and
    // the filesystem's metadata), not the disks: at least that 1 MiB, at
    // most the chunks it touched.
    let wrote = guest_run(
        &c,
        "keeper",
        "w1",
        "dd if=/dev/urandom of=/mnt/data/blob bs=1M count=1 && sync",
        GUEST,
    )
    .await;
    assert!(wrote.ends_with("rc=0"), "{wrote}");
    let second = backup(&c, "keeper", None);
    assert!(second.incremental(), "{second:?}");
    assert!(read(&second) >= MIB && read(&second) <= 4 * CHUNK, "{second:?}");
    let total: u64 = second.disks.iter().map(|d| d.size).sum();
    assert!(read(&second) * 10 < total, "{second:?}");

    // A clean stop saves the tracking in the qcow2: a backup of the stopped
    // VM (from its disk files), and one after it starts again, are still
    // incremental.
    ok(c.cli(&["vm", "stop", "keeper", "--wait"]).output().expect("cli"));
    let stopped = backup(&c, "keeper", None);
    assert!(stopped.incremental(), "{stopped:?}");
    assert!(read(&stopped) <= 4 * CHUNK, "{stopped:?}");
    start_and_wait(&c, "keeper", 2).await;
    let after_restart = backup(&c, "keeper", None);
    assert!(after_restart.incremental(), "{after_restart:?}");
    assert!(read(&after_restart) <= 4 * CHUNK, "{after_restart:?}");

    // A live migration carries the tracking bitmaps (QEMU's dirty-bitmaps
    // capability) and the chain record: the guest writes on the new host,
    // and the next backup there reads only that. (Not yet when the target
    // is ready for post-copy and pre-copy is chosen: see docs/backups.md.)
    let home = c.vm("keeper").await.status.node.expect("node");
    let away = if home == "node-1" { "node-2" } else { "node-1" };
    ok(c.cli(&[
        "vm",
        "migrate",
        "keeper",
        "--to",
        away,
        "--wait",
        "--strategy",
        "precopy",
    ])
    .output()
    .expect("cli"));
    assert_eq!(c.vm("keeper").await.status.node.as_deref(), Some(away));
    wait_console_answers(&c, "keeper").await;
    let wrote = guest_run(
        &c,
        "keeper",
        "w2",
        "dd if=/dev/urandom of=/mnt/data/moved bs=1M count=1 && sync",
        GUEST,
    )
    .await;
    assert!(wrote.ends_with("rc=0"), "{wrote}");
    let migrated = backup(&c, "keeper", None);
    assert!(migrated.incremental(), "{migrated:?}");
    assert!(read(&migrated) >= MIB && read(&migrated) <= 4 * CHUNK, "{migrated:?}");

    // Another store: its first backup is full, and says why.
    let offsite = c.dir.path().join("offsite");
    ok(c.cli(&["backup-store", "add", "offsite", offsite.to_str().unwrap()])
        .output()
        .expect("cli"));
    cli_fails(
        &c,
        &["backup-store", "add", "again", offsite.to_str().unwrap()],
        "already uses",
    );
    let there = backup(&c, "keeper", Some("offsite"));
    assert!(
        there
            .full_reason
            .as_deref()
            .unwrap_or("")
            .contains("first backup of this VM in store \"offsite\""),
        "{there:?}"
    );

    // A store whose disk is full: the backup fails saying so, none is
    // listed, no partial chunk file is left, and the chain is unharmed (the
    // next backup to "offsite" is still incremental).
    let tiny = TinyMount::new(&c.dir.path().join("tiny"));
    ok(c.cli(&["backup-store", "add", "tiny", tiny.0.to_str().unwrap()])
        .output()
        .expect("cli"));
    cli_fails(&c, &["backup", "create", "keeper", "--store", "tiny"], "disk is full");
    let listed = ok(c
        .cli(&["-o", "json", "backup", "list", "--store", "tiny"])
        .output()
        .expect("cli"));
    assert!(serde_json::from_str::<Vec<Backup>>(&listed).unwrap().is_empty());
    let left: Vec<_> = walk(&tiny.0)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    ok(c.cli(&["backup-store", "remove", "tiny"]).output().expect("cli"));
    drop(tiny);
    let still = backup(&c, "keeper", Some("offsite"));
    assert!(still.incremental(), "{still:?}");

    // QEMU killed: what it tracked was never saved; the next backup is full.
    let pids = c.qemu_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    c.wait_phase("keeper", VmPhase::Failed, BOOT).await;
    start_and_wait(&c, "keeper", 3).await;
    let after_kill = backup(&c, "keeper", Some("offsite"));
    assert!(!after_kill.incremental(), "{after_kill:?}");

    // Restore the second backup into a new VM: it boots with the file the
    // guest wrote before that backup, byte for byte, and an address and MAC
    // of its own.
    ok(c.cli(&["backup", "restore", &second.id, "--as", "copy", "--start"])
        .output()
        .expect("cli"));
    c.wait_phase("copy", VmPhase::Running, BOOT).await;
    c.wait_console("copy", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let sum = "md5sum /mnt/data/blob | cut -d' ' -f1";
    let original = guest_value(&c, "keeper", "sum-keeper", sum).await;
    let restored = guest_value(&c, "copy", "sum-copy", sum).await;
    assert_eq!(original.len(), 32, "{original}");
    assert_eq!(original, restored);
    let copy = c.vm("copy").await;
    assert_eq!(
        copy.spec.restore_from.as_ref().map(|r| r.to_string()),
        Some(second.id.clone())
    );
    cli_fails(&c, &["backup", "restore", &second.id, "--as", "copy"], "already exists");

    // A live restore: the VM starts at once on the backup, reading what is
    // not in its own files yet on demand while the rest streams in; the
    // backup cannot be deleted meanwhile, nor the VM migrated.
    ok(c.cli(&["backup", "restore", &second.id, "--as", "live", "--live"])
        .output()
        .expect("cli"));
    cli_fails(&c, &["backup", "delete", &second.id], "restored live");
    cli_fails(
        &c,
        &["backup", "restore", &second.id, "--as", "x", "--live", "--in-place"],
        "cannot be used with",
    );
    c.wait_phase("live", VmPhase::Running, BOOT).await;
    c.wait_console("live", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let live_sum = guest_value(&c, "live", "sum-live", sum).await;
    assert_eq!(original, live_sum);
    let deadline = std::time::Instant::now() + BOOT;
    let live = loop {
        let vm = c.vm("live").await;
        match &vm.status.live_restore {
            None => break vm,
            Some(l) => assert!(l.error.is_none() && l.done <= l.size, "{l:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "the live restore did not end");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Done: the disks are the VM's own (no backing), the restore's files gone.
    let vm_dir = c
        .agents
        .iter()
        .map(|a| a.data_dir.join("vms").join(&live.metadata.id))
        .find(|d| d.exists())
        .expect("the VM's directory");
    for disk in ["root.qcow2", "data.qcow2"] {
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(vm_dir.join(disk))
            .output()
            .expect("qemu-img");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info json");
        assert!(info.get("backing-filename").is_none(), "{disk}: {info}");
    }
    let left: Vec<_> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("live-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(guest_value(&c, "live", "sum-live-2", sum).await, original);

    // Verify reads every chunk back; a damaged chunk is named.
    let v: BackupVerification = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup", "verify", &second.id])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    // Damage the largest chunk of the second backup's data disk (the one
    // holding the guest's random megabyte).
    let index = c
        .client
        .get_bytes(&format!(
            "backup-stores/local/backups/keeper/{}/disks/data/index",
            second.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))
        .await
        .unwrap();
    let chunks = c.dir.path().join("server/backups/.chunks");
    let count = second.disks[1].size.div_ceil(CHUNK) as usize;
    let (victim, digest) = index[index.len() - 32 * count..]
        .chunks(32)
        .map(hex::encode)
        .map(|d| (chunks.join(&d[..2]).join(&d), d))
        .max_by_key(|(p, _)| std::fs::metadata(p).unwrap().len())
        .expect("a chunk");
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let out = c.cli(&["backup", "verify", &second.id]).output().expect("cli");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && said.contains("DAMAGED") && said.contains(&digest),
        "{said}"
    );
    // The backup stays marked damaged; `backup list` shows it.
    let path = format!(
        "backups/local/keeper/{}",
        second.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let marked: Backup = c.client.get_json(&path).await.unwrap();
    let mark = marked.verified.expect("verified");
    assert!(!mark.ok && mark.errors >= 1, "{mark:?}");
    let listed = ok(c.cli(&["backup", "list", "--vm", "keeper"]).output().expect("cli"));
    assert!(listed.contains("DAMAGED"), "{listed}");
    // A restore of the damaged backup fails loudly, naming the chunk.
    ok(c.cli(&["backup", "restore", &second.id, "--as", "broken", "--start"])
        .output()
        .expect("cli"));
    let broken = c.wait_phase("broken", VmPhase::Failed, BOOT).await;
    let why = broken.status.reason.unwrap_or_default();
    assert!(why.contains(&digest) && why.contains("damaged"), "{why}");
    // Live, the VM starts (that chunk is of the data disk) and its restore
    // stops at the chunk, naming it.
    ok(
        c.cli(&["backup", "restore", &second.id, "--as", "broken-live", "--live"])
            .output()
            .expect("cli"),
    );
    let deadline = std::time::Instant::now() + BOOT;
    let stopped_at = loop {
        let vm = c.vm("broken-live").await;
        if let Some(e) = vm.status.live_restore.and_then(|l| l.error) {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "the live restore did not stop");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        stopped_at.contains(&digest) && stopped_at.contains("damaged"),
        "{stopped_at}"
    );
    // Its backup stays while it reads from it: a prune keeps it too.
    cli_fails(&c, &["backup", "delete", &second.id], "restored live");
    let dry: novacron_api::backup::PruneResult = serde_json::from_str(&ok(c
        .cli(&[
            "-o",
            "json",
            "backup",
            "prune",
            "keeper",
            "--keep-last",
            "1",
            "--dry-run",
        ])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(dry.kept.contains(&second.id), "{dry:?}");
    ok(c.cli(&["vm", "delete", "broken-live", "--wait"]).output().expect("cli"));

    // RBAC: a viewer lists backups but takes and deletes none.
    let viewer = ok(c
        .cli(&["token", "create", "watcher", "--role", "viewer"])
        .output()
        .expect("cli"));
    let viewer = c.client_with_token(viewer.trim());
    let seen: Vec<Backup> = viewer.get_json("backups").await.unwrap();
    assert_eq!(seen.len(), 8);
    let refused = viewer
        .post_json::<_, serde_json::Value>("vms/keeper/backups", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");

    // Delete: gone from the list; the others stay.
    ok(c.cli(&["backup", "delete", &first.id]).output().expect("cli"));
    cli_fails(&c, &["backup", "get", &first.id], "not found");
    let left: Vec<Backup> = c.client.get_json("backups").await.unwrap();
    assert_eq!(left.len(), 7);

    // Prune keeps what the rules say (here the newest in `local`); garbage
    // collection then takes back the chunks only the pruned ones used, and
    // the backups left stay whole.
    let pruned: novacron_api::backup::PruneResult = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup", "prune", "keeper", "--keep-last", "1"])
        .output()
        .expect("cli")))
    .unwrap();
    assert_eq!(pruned.kept, vec![migrated.id.clone()]);
    assert_eq!(
        pruned.removed,
        vec![after_restart.id.clone(), stopped.id.clone(), second.id.clone()]
    );
    cli_fails(&c, &["backup", "prune", "keeper"], "at least one keep rule");
    let gc: novacron_api::backup::GcResult = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup-store", "gc", "local", "--grace-s", "0"])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(gc.chunks_removed > 0 && gc.chunks_in_use > 0, "{gc:?}");
    for b in [&there, &still, &after_kill] {
        ok(c.cli(&["backup", "verify", &b.id]).output().expect("cli"));
    }
    let left: Vec<Backup> = c.client.get_json("backups").await.unwrap();
    assert_eq!(left.len(), 4);
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn policy_backups(c: &Cluster, vm: &str) -> Vec<Backup> {
    let out = ok(c
        .cli(&["-o", "json", "backup", "list", "--vm", vm])
        .output()
        .expect("cli"));
    serde_json::from_str(&out).expect("backup json")
}

/// A policy backs up the VMs its selector picks on its schedule and prunes
/// them to its keep rules after each run; one that cannot be backed up is
/// named in the run's outcome; a run by hand works while suspended.
#[tokio::test(flavor = "multi_thread")]
async fn policies_back_up_selected_vms_on_schedule_and_keep_what_they_say() {
    use novacron_api::{BackupPolicy, CreateVm, PowerState, VmSpec};
    let c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    let labelled = |name: &str, power_state: PowerState, labels: &[(&str, &str)]| CreateVm {
        name: name.into(),
        project: None,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        no_default_network: false,
        spec: VmSpec {
            disk_mib: Some(256),
            power_state,
            ..VmSpec::new("demo", 1, 128)
        },
    };
    let nightly = [("backup", "nightly")];
    c.client
        .create_vm(&labelled("nightly-a", PowerState::Running, &nightly))
        .await
        .expect("create");
    // Selected, but never started: it has no disks yet.
    c.client
        .create_vm(&labelled("nightly-b", PowerState::Stopped, &nightly))
        .await
        .expect("create");
    c.client
        .create_vm(&labelled("other", PowerState::Stopped, &[("backup", "never")]))
        .await
        .expect("create");
    c.wait_phase("nightly-a", VmPhase::Running, BOOT).await;
    c.wait_console("nightly-a", "NOVACRON-GUEST-READY", 1, BOOT).await;

    // Bad input changes nothing.
    let create = |extra: &[&str]| {
        let mut args = vec!["backup-policy", "create", "nightly", "--selector", "backup=nightly"];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let fails = |args: Vec<String>, says: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_fails(&c, &args, says)
    };
    fails(create(&["--schedule", "61 * * * *"]), "spec.schedule");
    fails(
        create(&["--schedule", "0 2 * * *", "--store", "nowhere"]),
        "unknown backup store",
    );
    fails(
        create(&["--schedule", "0 2 * * *", "--keep-last", "0"]),
        "spec.keep.keep_last",
    );
    let listed = ok(c.cli(&["-o", "json", "backup-policy", "list"]).output().expect("cli"));
    assert_eq!(serde_json::from_str::<Vec<BackupPolicy>>(&listed).unwrap(), vec![]);

    // Every five seconds, keeping the last two of each VM.
    let args = create(&["--schedule", "*/5 * * * * *", "--keep-last", "2"]);
    ok(c.cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("cli"));
    let policy = c.client.get::<BackupPolicy>("nightly").await.expect("policy");
    assert!(policy.status.next_run.is_some() || policy.status.running.is_some() || policy.status.last_run.is_some());

    // Three runs at least: the third one's prune removed the first backup.
    let client = c.client.clone();
    let run = common::wait_until("a run that pruned", Duration::from_secs(120), || {
        let client = client.clone();
        async move {
            let p = client.get::<BackupPolicy>("nightly").await.ok()?;
            p.status.last_run.filter(|r| !r.pruned.is_empty())
        }
    })
    .await;
    assert!(!run.by_hand && run.finished.is_some() && !run.ok, "{run:?}");
    let vms: Vec<&str> = run.vms.iter().map(|v| v.vm.as_str()).collect();
    assert_eq!(vms, ["nightly-a", "nightly-b"], "{run:?}");
    assert!(run.vms[0].error.is_none() && run.vms[0].backup.is_some(), "{run:?}");
    assert!(run.vms[0].full_reason.is_none(), "later runs are incremental: {run:?}");
    assert!(
        run.vms[1].error.as_deref().unwrap_or("").contains("never run"),
        "{run:?}"
    );
    assert!(
        run.pruned.iter().all(|id| id.starts_with("local:nightly-a/")),
        "{run:?}"
    );

    // Suspended: no more scheduled runs; what is kept is exactly two.
    let suspend = ["backup-policy", "update", "nightly", "--selector", "backup=nightly"];
    let mut args = suspend.to_vec();
    args.extend(["--schedule", "*/5 * * * * *", "--keep-last", "2", "--suspended"]);
    ok(c.cli(&args).output().expect("cli"));
    let client = c.client.clone();
    common::wait_until("the run to end", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let p = client.get::<BackupPolicy>("nightly").await.ok()?;
            (p.status.running.is_none() && p.status.next_run.is_none()).then_some(())
        }
    })
    .await;
    let kept = policy_backups(&c, "nightly-a");
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(policy_backups(&c, "other").is_empty());
    let settled = c.client.get::<BackupPolicy>("nightly").await.expect("policy");
    std::thread::sleep(Duration::from_secs(6));
    let later = c.client.get::<BackupPolicy>("nightly").await.expect("policy");
    assert_eq!(settled.status.last_run, later.status.last_run, "a suspended policy ran");

    // By hand, while suspended: a failing VM makes `--wait` fail, naming it.
    let out = c
        .cli(&["backup-policy", "run", "nightly", "--wait"])
        .output()
        .expect("cli");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && said.contains("nightly-b") && said.contains("never run"),
        "{said}"
    );
    ok(c.cli(&["vm", "delete", "nightly-b"]).output().expect("cli"));
    let out = ok(c
        .cli(&["-o", "json", "backup-policy", "run", "nightly", "--wait"])
        .output()
        .expect("cli"));
    let run: novacron_api::backup_policy::PolicyRun = serde_json::from_str(&out).expect("run json");
    assert!(run.ok && run.by_hand && run.vms.len() == 1, "{run:?}");
    let kept = policy_backups(&c, "nightly-a");
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(Some(&kept[1].id), run.vms[0].backup.as_ref());

    ok(c.cli(&["backup-policy", "delete", "nightly"]).output().expect("cli"));
    cli_fails(&c, &["backup-policy", "get", "nightly"], "not found");
    // Its backups stay.
    assert_eq!(policy_backups(&c, "nightly-a").len(), 2);
}

/// A `backup-store serve` process, stopped when dropped.
struct StoreProcess(std::process::Child);

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A store on a process of its own (joined with a join token, serving the
/// server only, over mTLS): backups go to it through the server and come
/// back from it; `backup-store sync` copies only what it lacks; a client
/// that is not the server is refused; a store that is down says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_process_of_its_own_takes_backups_and_syncs() {
    let c = Cluster::start(Options::default()).await;
    c.import_demo().await;
    c.create_vm("vaulted", 128, RunStrategy::Manual, true).await;
    let dir = c.dir.path().join("vault");
    let token = c.join_token("vault").await;
    let ca = c.ca_path().display().to_string();
    let args = [
        "backup-store",
        "serve",
        "--dir",
        &dir.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--name",
        "vault",
        "--host",
        "127.0.0.1",
        "--join-token",
        &token,
        "--server",
        &c.url,
        "--ca-cert",
        &ca,
    ]
    .map(str::to_string);
    let mut store = StoreProcess(
        std::process::Command::new(common::BIN)
            .args(&args)
            .env("NOVACRON_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(common::log_file(c.dir.path(), "vault"))
            .spawn()
            .expect("spawn backup-store"),
    );
    let addr_file = dir.join(".store-tls/listen.addr");
    let addr: String = common::wait_until("the store to listen", Duration::from_secs(30), || {
        let f = addr_file.clone();
        async move { std::fs::read_to_string(f).ok().map(|s| s.trim().to_string()) }
    })
    .await;
    let url = format!("https://{addr}");

    cli_fails(
        &c,
        &["backup-store", "add", "nowhere", "--url", "https://127.0.0.1:1"],
        "does not answer",
    );
    cli_fails(
        &c,
        &["backup-store", "add", "plain", "--url", "http://127.0.0.1:1"],
        "https://HOST:PORT",
    );
    ok(c.cli(&["backup-store", "add", "vault", "--url", &url])
        .output()
        .expect("cli"));
    let listed = ok(c.cli(&["backup-store", "list"]).output().expect("cli"));
    assert!(listed.contains(&url), "{listed}");

    // Another client of the cluster CA (an agent's certificate) is refused.
    let agent_tls = c.dir.path().join("node-1/tls");
    let identity = novacron_tls::Identity::load(&agent_tls.join("agent.crt"), &agent_tls.join("agent.key")).unwrap();
    let cluster_ca = std::fs::read_to_string(agent_tls.join("ca.crt")).unwrap();
    let http = novacron_tls::http_client(reqwest::Client::builder(), Some(&cluster_ca), Some(&identity)).unwrap();
    let refused = http
        .get(format!("{url}/store/v1/backups"))
        .send()
        .await
        .expect("the store answers");
    assert_eq!(refused.status(), 403);

    c.wait_phase("vaulted", VmPhase::Running, BOOT).await;
    c.wait_console("vaulted", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let first = backup(&c, "vaulted", Some("vault"));
    assert!(!first.incremental() && first.store == "vault", "{first:?}");
    let wrote = guest_run(
        &c,
        "vaulted",
        "v1",
        "dd if=/dev/urandom of=/mnt/data/blob bs=1M count=1 && sync",
        GUEST,
    )
    .await;
    assert!(wrote.ends_with("rc=0"), "{wrote}");
    // Incremental against the remote store's index of the first.
    let second = backup(&c, "vaulted", Some("vault"));
    assert!(second.incremental() && read(&second) <= 4 * CHUNK, "{second:?}");
    assert!(
        std::fs::read_dir(dir.join("vm/vaulted")).unwrap().count() == 2,
        "the backups live in the store's directory"
    );

    // Two backups in `local`; a sync copies them and only the chunks the
    // vault lacks (most are there from its own backups), and a second
    // sync copies nothing.
    let local_full = backup(&c, "vaulted", None);
    let local_inc = backup(&c, "vaulted", None);
    assert!(local_inc.incremental(), "{local_inc:?}");
    let synced: novacron_api::backup::SyncResult = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup-store", "sync", "local", "vault"])
        .output()
        .expect("cli")))
    .unwrap();
    let names = |b: &Backup| format!("{}/{}", b.vm, b.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    assert_eq!(
        synced.backups_copied,
        vec![names(&local_full), names(&local_inc)],
        "{synced:?}"
    );
    assert!(synced.chunks_present > 0, "{synced:?}");
    let again: novacron_api::backup::SyncResult = serde_json::from_str(&ok(c
        .cli(&[
            "-o",
            "json",
            "backup-store",
            "sync",
            "local",
            "vault",
            "--in-flight",
            "4",
        ])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(again.backups_copied.is_empty() && again.chunks_copied == 0, "{again:?}");
    assert_eq!(again.backups_present, 4);
    cli_fails(
        &c,
        &["backup-store", "sync", "vault", "vault"],
        "other than the destination",
    );

    // A store that keeps backups sealed with the agents' key: the server
    // knows only its id; chunks are encrypted before they leave the agent
    // (none is named as its plain content is), dedup and incrementals
    // still work, verify checks them without the key.
    let key = c.backup_key_path().display().to_string();
    let sealed_dir = c.dir.path().join("sealed");
    cli_fails(
        &c,
        &[
            "backup-store",
            "add",
            "sealed",
            &sealed_dir.display().to_string(),
            "--encryption-key",
            "/nonexistent",
        ],
        "Cannot read backup key",
    );
    ok(c.cli(&[
        "backup-store",
        "add",
        "sealed",
        &sealed_dir.display().to_string(),
        "--encryption-key",
        &key,
    ])
    .output()
    .expect("cli"));
    let key_id = ok(c.cli(&["backup-key", "id", &key]).output().expect("cli"))
        .trim()
        .to_string();
    let sealed = backup(&c, "vaulted", Some("sealed"));
    assert_eq!(sealed.key_id.as_deref(), Some(key_id.as_str()), "{sealed:?}");
    let sealed_again = backup(&c, "vaulted", Some("sealed"));
    assert!(
        sealed_again.incremental() && sealed_again.key_id == sealed.key_id,
        "{sealed_again:?}"
    );
    let index = |store: &str, b: &Backup, disk: &str| {
        let path = format!(
            "backup-stores/{store}/backups/vaulted/{}/disks/{disk}/index",
            b.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let client = c.client.clone();
        async move { client.get_bytes(&path).await.unwrap() }
    };
    let plain = index("local", &local_inc, "data").await;
    let secret = index("sealed", &sealed, "data").await;
    let digests = |i: &[u8]| {
        i[32..]
            .chunks(32)
            .map(<[u8]>::to_vec)
            .collect::<std::collections::HashSet<_>>()
    };
    assert!(digests(&plain).is_disjoint(&digests(&secret)));
    for f in walk(&sealed_dir.join(".chunks")) {
        let head = std::fs::read(&f).unwrap();
        assert_eq!(&head[..5], b"NCK1\x02", "{} is not sealed", f.display());
    }
    let v: BackupVerification = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup", "verify", &sealed.id])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    ok(
        c.cli(&["backup", "restore", &sealed.id, "--as", "from-sealed", "--start"])
            .output()
            .expect("cli"),
    );
    c.wait_phase("from-sealed", VmPhase::Running, BOOT).await;
    c.wait_console("from-sealed", "NOVACRON-GUEST-READY", 1, BOOT).await;

    // The copy verifies where it is, and a VM restored from it boots with
    // the guest's file.
    let copied = format!("vault:{}", names(&local_inc));
    let v: BackupVerification = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup", "verify", &copied])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    ok(c.cli(&["backup", "restore", &copied, "--as", "from-vault", "--start"])
        .output()
        .expect("cli"));
    c.wait_phase("from-vault", VmPhase::Running, BOOT).await;
    c.wait_console("from-vault", "NOVACRON-GUEST-READY", 1, BOOT).await;
    let sum = "md5sum /mnt/data/blob | cut -d' ' -f1";
    let original = guest_value(&c, "vaulted", "sum-vaulted", sum).await;
    let restored = guest_value(&c, "from-vault", "sum-from-vault", sum).await;
    assert_eq!(original.len(), 32, "{original}");
    assert_eq!(original, restored);
    let unsealed = guest_value(&c, "from-sealed", "sum-from-sealed", sum).await;
    assert_eq!(original, unsealed);

    // In place: refused while running or with snapshots; on the stopped VM
    // the first backup's disks (before the guest wrote its file) replace
    // its own, and the next backup is full, saying why.
    let first_id = first.id.clone();
    cli_fails(&c, &["backup", "restore", &first_id, "--in-place"], "stop it first");
    ok(c.cli(&["vm", "stop", "vaulted", "--wait"]).output().expect("cli"));
    ok(c.cli(&["vm", "snapshot", "create", "vaulted", "s1"])
        .output()
        .expect("cli"));
    cli_fails(
        &c,
        &["backup", "restore", &first_id, "--in-place"],
        "has snapshots (s1)",
    );
    ok(c.cli(&["vm", "snapshot", "delete", "vaulted", "s1"])
        .output()
        .expect("cli"));
    let said = ok(c
        .cli(&["backup", "restore", &first_id, "--in-place"])
        .output()
        .expect("cli"));
    assert!(said.contains("has the disks of backup"), "{said}");
    start_and_wait(&c, "vaulted", 2).await;
    let gone = guest_run(&c, "vaulted", "gone", "test ! -e /mnt/data/blob", GUEST).await;
    assert!(gone.ends_with("rc=0"), "{gone}");
    let after = backup(&c, "vaulted", None);
    assert!(
        after
            .full_reason
            .as_deref()
            .unwrap_or("")
            .contains("no backup to count from"),
        "{after:?}"
    );

    // Prune and GC act in the store process.
    let pruned: novacron_api::backup::PruneResult = serde_json::from_str(&ok(c
        .cli(&[
            "-o",
            "json",
            "backup",
            "prune",
            "vaulted",
            "--store",
            "vault",
            "--keep-last",
            "1",
        ])
        .output()
        .expect("cli")))
    .unwrap();
    assert_eq!(pruned.removed.len(), 3, "{pruned:?}");
    assert_eq!(pruned.removed.last(), Some(&first_id));
    let gc: novacron_api::backup::GcResult = serde_json::from_str(&ok(c
        .cli(&["-o", "json", "backup-store", "gc", "vault", "--grace-s", "0"])
        .output()
        .expect("cli")))
    .unwrap();
    assert!(gc.chunks_in_use > 0, "{gc:?}");

    // A store that is down: a clear error, nothing else changes.
    let _ = store.0.kill();
    let _ = store.0.wait();
    cli_fails(&c, &["backup", "list", "--store", "vault"], "Cannot reach backup store");
    cli_fails(
        &c,
        &["backup", "create", "vaulted", "--store", "vault"],
        "Cannot reach backup store",
    );
    let listed = ok(c
        .cli(&["-o", "json", "backup", "list", "--store", "local"])
        .output()
        .expect("cli"));
    assert_eq!(serde_json::from_str::<Vec<Backup>>(&listed).unwrap().len(), 3);
}
