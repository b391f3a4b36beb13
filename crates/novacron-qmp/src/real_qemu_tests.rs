//! Tests against the installed `qemu-system-x86_64` (TCG, no guest): the
//! typed commands run for real, and the types are held to the schema QEMU
//! reports (`query-qmp-schema`). Skipped when QEMU is not installed.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::commands::*;
use crate::types::*;
use crate::{Qmp, QmpError};

mod schema;

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU process, killed when the test ends however it ends.
struct QemuProcess {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_installed() -> bool {
    match std::process::Command::new(QEMU).arg("--version").output() {
        Ok(out) => out.status.success(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: {QEMU} is not installed");
            false
        }
        Err(e) => panic!("cannot run {QEMU}: {e}"),
    }
}

/// Starts QEMU with QMP on a socket in a fresh directory, plus `args`.
fn start_qemu(args: &[&str]) -> QemuProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let child = std::process::Command::new(QEMU)
        .args(["-nodefaults", "-display", "none", "-accel", "tcg", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    QemuProcess {
        child,
        _dir: dir,
        socket,
    }
}

async fn connect(q: &mut QemuProcess) -> Qmp {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = q.child.try_wait().expect("wait") {
            panic!("QEMU exited early: {status}");
        }
        match Qmp::connect(&q.socket, Duration::from_secs(10)).await {
            Ok(qmp) => return qmp,
            Err(e) if Instant::now() > deadline => panic!("QMP never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls `probe` until it yields a value.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn typed_commands_against_a_real_qemu() {
    if !qemu_installed() {
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let mirror_target = scratch.path().join("mirror.raw");
    std::fs::File::create(&mirror_target)
        .and_then(|f| f.set_len(16 << 20))
        .expect("target file");
    let mut q = start_qemu(&[
        "-M",
        "q35",
        "-m",
        "64",
        "-S",
        "-blockdev",
        "driver=null-co,node-name=src,size=16777216,read-zeroes=on",
        "-blockdev",
        "driver=null-co,node-name=exp,size=16777216,read-zeroes=on",
    ]);
    let qmp = connect(&mut q).await;
    let qmp = &qmp;

    let st = qmp.query_status().await.expect("query-status");
    assert_eq!((st.running, st.status), (false, RunState::Prelaunch));
    qmp.cont().await.expect("cont");
    assert_eq!(qmp.query_status().await.expect("status").status, RunState::Running);
    qmp.stop().await.expect("stop");
    assert_eq!(qmp.query_status().await.expect("status").status, RunState::Paused);

    // Before any migration QEMU 10.0 answers `{}`: no status at all.
    let info = qmp.run(&QueryMigrate).await.expect("query-migrate");
    assert_eq!(info.status, None);
    assert!(info.ram.is_none());

    let caps = vec![
        MigrationCapabilityStatus::new(MigrationCapability::AutoConverge, true),
        MigrationCapabilityStatus::new(MigrationCapability::PostcopyRam, false),
        MigrationCapabilityStatus::new(MigrationCapability::LateBlockActivate, true),
        MigrationCapabilityStatus::new(MigrationCapability::Multifd, false),
    ];
    qmp.run(&MigrateSetCapabilities {
        capabilities: caps.clone(),
    })
    .await
    .expect("migrate-set-capabilities");
    let now = qmp
        .run(&QueryMigrateCapabilities)
        .await
        .expect("query-migrate-capabilities");
    for want in &caps {
        assert!(now.contains(want), "{want:?} not in {now:?}");
    }
    qmp.run(&MigrateSetParameters {
        downtime_limit: Some(300),
        max_bandwidth: Some(u64::MAX / 2),
        ..Default::default()
    })
    .await
    .expect("migrate-set-parameters");
    // Post-copy without its capability: QEMU refuses, and says so.
    match qmp.run(&MigrateStartPostcopy).await {
        Err(QmpError::Command { command, .. }) => assert_eq!(command, "migrate-start-postcopy"),
        other => panic!("migrate-start-postcopy: {other:?}"),
    }

    // NBD server on a socket we bound and passed, and an export.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    match qmp
        .run(&NbdServerStart::new(SocketAddressLegacy::Fd(QapiString {
            str: "nbd".into(),
        })))
        .await
    {
        Err(QmpError::Command { command, .. }) => assert_eq!(command, "nbd-server-start"),
        other => panic!("nbd-server-start on an fd never passed: {other:?}"),
    }
    qmp.pass_fd("nbd", std::os::fd::AsFd::as_fd(&listener))
        .await
        .expect("getfd");
    drop(listener);
    qmp.run(&NbdServerStart::new(SocketAddressLegacy::Fd(QapiString {
        str: "nbd".into(),
    })))
    .await
    .expect("nbd-server-start");
    qmp.run(&BlockExportAdd::nbd("exp", "exp", true))
        .await
        .expect("block-export-add");
    let mut hello = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the NBD server"),
        &mut hello,
    )
    .expect("NBD greeting");
    assert_eq!(&hello, b"NBDMAGIC");

    // A mirror job, seen by query-block-jobs until ready, then cancelled.
    let mut mirror = DriveMirror::new("src", mirror_target.display().to_string(), MirrorSyncMode::Full);
    mirror.job_id = Some("mirror-src".into());
    mirror.mode = Some(NewImageMode::Existing);
    mirror.format = Some("raw".into());
    qmp.run(&mirror).await.expect("drive-mirror");
    let job = wait_for("the mirror to be ready", move || async move {
        let jobs = qmp.run(&QueryBlockJobs).await.expect("query-block-jobs");
        jobs.into_iter().find(|j| j.device == "mirror-src" && j.ready)
    })
    .await;
    assert_eq!(job.job.job_type(), JobType::Mirror);
    assert_eq!((job.len, job.offset), (16 << 20, 16 << 20));
    qmp.run(&BlockJobCancel {
        device: "mirror-src".into(),
        force: None,
    })
    .await
    .expect("block-job-cancel");
    wait_for("the mirror to end", move || async move {
        let jobs = qmp.run(&QueryBlockJobs).await.expect("query-block-jobs");
        jobs.is_empty().then_some(())
    })
    .await;
    match qmp
        .run(&BlockJobCancel {
            device: "nope".into(),
            force: Some(true),
        })
        .await
    {
        Err(QmpError::Command { command, class, .. }) => {
            assert_eq!(
                (command.as_str(), class.as_str()),
                ("block-job-cancel", "DeviceNotActive")
            )
        }
        other => panic!("block-job-cancel of nothing: {other:?}"),
    }
    qmp.run(&NbdServerStop).await.expect("nbd-server-stop");

    // Dirty rate of the (paused) guest.
    qmp.run(&CalcDirtyRate {
        calc_time: 200,
        calc_time_unit: Some(TimeUnit::Millisecond),
        sample_pages: Some(4096),
        mode: None,
    })
    .await
    .expect("calc-dirty-rate");
    let rate = wait_for("the dirty rate", move || async move {
        let r = qmp.run(&QueryDirtyRate::default()).await.expect("query-dirty-rate");
        (r.status == DirtyRateStatus::Measured).then_some(r)
    })
    .await;
    assert_eq!(rate.dirty_rate, Some(0));
    assert_eq!(rate.mode, DirtyRateMeasureMode::PageSampling);

    // A migration into a pipe, followed to its end.
    qmp.run(&Migrate {
        uri: "exec:cat > /dev/null".into(),
    })
    .await
    .expect("migrate");
    let first = qmp.run(&QueryMigrate).await.expect("query-migrate");
    assert!(first.status.is_some(), "no status right after migrate: {first:?}");
    let done = wait_for("the migration to complete", move || async move {
        let info = qmp.run(&QueryMigrate).await.expect("query-migrate");
        assert_ne!(info.status, Some(MigrationStatus::Failed), "{info:?}");
        (info.status == Some(MigrationStatus::Completed)).then_some(info)
    })
    .await;
    let ram = done.ram.expect("ram statistics");
    assert_eq!(ram.remaining, 0);
    assert!(ram.total >= 64 << 20);
    assert!(done.downtime.is_some());
    assert_eq!(qmp.query_status().await.expect("status").status, RunState::Postmigrate);
    qmp.run(&MigrateCancel).await.expect("migrate_cancel after the end");
    qmp.system_reset().await.expect("system_reset");
    qmp.system_powerdown().await.expect("system_powerdown");
    qmp.quit().await.expect("quit");
    let exited = wait_for("QEMU to exit", || {
        let status = q.child.try_wait().expect("wait");
        async move { status }
    })
    .await;
    assert!(exited.success());
}

#[tokio::test]
async fn an_incoming_migration_on_port_0_reports_the_port_it_got() {
    if !qemu_installed() {
        return;
    }
    let mut q = start_qemu(&["-M", "q35", "-m", "64", "-incoming", "defer"]);
    let qmp = connect(&mut q).await;
    let before = qmp.run(&QueryMigrate).await.expect("query-migrate");
    assert_eq!(before.incoming_port(), Ok(None));
    qmp.run(&MigrateIncoming::new("tcp:127.0.0.1:0"))
        .await
        .expect("migrate-incoming");
    let info = qmp.run(&QueryMigrate).await.expect("query-migrate");
    let port = info.incoming_port().expect("a numeric port").expect("an inet address");
    assert_ne!(port, 0);
    // QEMU listens there: a connection is accepted.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the incoming port");
}
