use serde_json::{json, Value};

use super::*;
use crate::commands::*;
use crate::{parse_reply, Command, QmpError};

/// Replies as QEMU 10.0.2 sent them (captured from `qemu-system-x86_64`).
fn reply<C: Command>(text: &str) -> Result<C::Reply, QmpError> {
    let v: Value = serde_json::from_str(text).expect("json");
    parse_reply::<C::Reply>(C::NAME, v)
}

#[test]
fn query_migrate_before_during_and_after() {
    let before = reply::<QueryMigrate>("{}").expect("empty");
    assert_eq!(before.status, None);
    assert!(before.ram.is_none());

    let setup = reply::<QueryMigrate>(
        r#"{"status": "setup", "socket-address": [{"port": "10811", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]}"#,
    )
    .expect("setup");
    assert_eq!(setup.status, Some(MigrationStatus::Setup));

    let active = reply::<QueryMigrate>(
        r#"{"expected-downtime": 300, "status": "active", "setup-time": 3, "total-time": 506, "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 1, "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 65518, "page-size": 4096, "remaining": 37822464, "postcopy-bytes": 0, "mbps": 0, "transferred": 32957, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0, "duplicate": 7280, "dirty-pages-rate": 0, "normal-bytes": 0, "normal": 0}}"#,
    )
    .expect("active");
    assert_eq!(active.status, Some(MigrationStatus::Active));
    assert_eq!(active.expected_downtime, Some(300));
    let ram = active.ram.expect("ram");
    assert_eq!(
        (ram.remaining, ram.page_size, ram.dirty_sync_count),
        (37822464, 4096, 1)
    );
    assert_eq!(ram.mbps, 0.0);

    let done = reply::<QueryMigrate>(
        r#"{"status": "completed", "setup-time": 3, "downtime": 4, "total-time": 2012, "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 3641, "downtime-bytes": 361666, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 1.7451110004977601, "transferred": 438241, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0, "duplicate": 16462, "dirty-pages-rate": 0, "normal-bytes": 212992, "normal": 52}}"#,
    )
    .expect("completed");
    assert_eq!(done.status, Some(MigrationStatus::Completed));
    assert_eq!(done.downtime, Some(4));
    assert!((done.ram.expect("ram").mbps - 1.745).abs() < 1e-3);

    let failed = reply::<QueryMigrate>(
        r#"{"status": "failed", "error-desc": "Failed to connect to '127.0.0.1:1': Connection refused"}"#,
    )
    .expect("failed");
    assert_eq!(failed.status, Some(MigrationStatus::Failed));
    assert!(failed.error_desc.is_some_and(|d| d.contains("Connection refused")));
}

#[test]
fn a_malformed_query_migrate_is_an_error_naming_the_command_and_quoting_qemu() {
    for bad in [
        // A status this QEMU does not have.
        r#"{"status": "warp-speed"}"#,
        // A mandatory RAM member missing.
        r#"{"status": "active", "ram": {"transferred": 1}}"#,
        // A member of the wrong type.
        r#"{"status": "completed", "downtime": "soon"}"#,
        // Not an object at all.
        r#"[]"#,
    ] {
        match reply::<QueryMigrate>(bad) {
            Err(e @ QmpError::UnexpectedReply { .. }) => {
                let QmpError::UnexpectedReply { command, reply, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(command, "query-migrate");
                assert_eq!(
                    serde_json::from_str::<Value>(reply).ok(),
                    serde_json::from_str(bad).ok()
                );
                let shown = e.to_string();
                assert!(shown.contains("query-migrate") && shown.contains(&reply[..]), "{shown}");
                assert!(std::error::Error::source(&e).is_some());
            }
            other => panic!("{bad} parsed as {other:?}"),
        }
    }
}

#[test]
fn query_status_run_states() {
    for (text, running, status) in [
        (
            r#"{"status": "prelaunch", "running": false}"#,
            false,
            RunState::Prelaunch,
        ),
        (
            r#"{"status": "inmigrate", "running": false}"#,
            false,
            RunState::Inmigrate,
        ),
        (
            r#"{"status": "postmigrate", "running": false}"#,
            false,
            RunState::Postmigrate,
        ),
        (r#"{"status": "running", "running": true}"#, true, RunState::Running),
    ] {
        let st = reply::<QueryStatus>(text).expect(text);
        assert_eq!((st.running, st.status), (running, status));
    }
    assert!(reply::<QueryStatus>(r#"{"status": "running"}"#).is_err());
    assert!(reply::<QueryStatus>(r#"{"status": "sleepwalking", "running": false}"#).is_err());
}

#[test]
fn query_block_jobs_mirror() {
    let jobs = reply::<QueryBlockJobs>(
        r#"[{"auto-finalize": true, "io-status": "ok", "device": "mirror-root", "auto-dismiss": true, "busy": false, "len": 16777216, "offset": 16777216, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror", "actively-synced": false}]"#,
    )
    .expect("jobs");
    let [job] = jobs.as_slice() else { panic!("{jobs:?}") };
    assert_eq!(job.job, BlockJobKind::Mirror { actively_synced: false });
    assert_eq!(job.job.job_type(), JobType::Mirror);
    assert_eq!(
        (job.device.as_str(), job.len, job.offset),
        ("mirror-root", 16777216, 16777216)
    );
    assert!(job.ready);
    assert_eq!(job.status, JobStatus::Ready);
    assert_eq!(job.io_status, BlockDeviceIoStatus::Ok);
    assert!(reply::<QueryBlockJobs>("[]").expect("none").is_empty());

    // A mirror without its branch's mandatory member, a job without `len`.
    let no_sync = r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "len": 1, "offset": 1, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror"}]"#;
    assert!(matches!(
        reply::<QueryBlockJobs>(no_sync),
        Err(QmpError::UnexpectedReply { .. })
    ));
    let no_len = r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "offset": 1, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "stream"}]"#;
    assert!(reply::<QueryBlockJobs>(no_len).is_err());
}

#[test]
fn every_job_type_selects_its_branch() {
    for t in JobType::ALL {
        let job = json!({"type": t.as_str(), "actively-synced": true});
        let kind: BlockJobKind = serde_json::from_value(job).expect("kind");
        assert_eq!(kind.job_type(), *t);
    }
}

#[test]
fn query_dirty_rate() {
    let unstarted = reply::<QueryDirtyRate>(
        r#"{"status": "unstarted", "sample-pages": 4096, "mode": "page-sampling", "calc-time-unit": "second", "start-time": 1796230955, "calc-time": 1}"#,
    )
    .expect("unstarted");
    assert_eq!(
        (unstarted.status, unstarted.dirty_rate),
        (DirtyRateStatus::Unstarted, None)
    );
    let measured = reply::<QueryDirtyRate>(
        r#"{"status": "measured", "sample-pages": 4096, "dirty-rate": 12, "mode": "page-sampling", "calc-time-unit": "second", "start-time": 1796230955, "calc-time": 1}"#,
    )
    .expect("measured");
    assert_eq!(
        (measured.status, measured.dirty_rate),
        (DirtyRateStatus::Measured, Some(12))
    );
    assert!(reply::<QueryDirtyRate>(r#"{"status": "measured", "dirty-rate": 12}"#).is_err());
}

#[test]
fn commands_without_a_return_value_take_an_empty_object() {
    assert!(reply::<Stop>("{}").is_ok());
    assert!(reply::<MigrateSetCapabilities>("{}").is_ok());
    assert!(matches!(reply::<Cont>("null"), Err(QmpError::UnexpectedReply { .. })));
}

fn args<C: Command>(c: &C) -> Value {
    serde_json::to_value(c).expect("serialize")
}

#[test]
fn arguments_are_what_qemu_expects() {
    assert_eq!(args(&Stop), Value::Null);
    let mut mirror = DriveMirror::new("root", "nbd://10.0.0.2:10809/root", MirrorSyncMode::Top);
    mirror.job_id = Some("mirror-root".into());
    mirror.mode = Some(NewImageMode::Existing);
    mirror.format = Some("raw".into());
    assert_eq!(
        args(&mirror),
        json!({"job-id": "mirror-root", "device": "root", "target": "nbd://10.0.0.2:10809/root",
               "format": "raw", "sync": "top", "mode": "existing"})
    );
    assert_eq!(
        args(&NbdServerStart::new(SocketAddressLegacy::Inet(InetSocketAddress::new(
            "10.0.0.2", 10809
        )))),
        json!({"addr": {"type": "inet", "data": {"host": "10.0.0.2", "port": "10809"}}})
    );
    assert_eq!(
        args(&BlockExportAdd::nbd("root", "root", true)),
        json!({"type": "nbd", "id": "root", "node-name": "root", "writable": true})
    );
    assert_eq!(
        args(&MigrateSetCapabilities {
            capabilities: vec![
                MigrationCapabilityStatus::new(MigrationCapability::LateBlockActivate, true),
                MigrationCapabilityStatus::new(MigrationCapability::PostcopyRam, false),
            ]
        }),
        json!({"capabilities": [{"capability": "late-block-activate", "state": true},
                                {"capability": "postcopy-ram", "state": false}]})
    );
    assert_eq!(
        args(&MigrateSetParameters {
            downtime_limit: Some(300),
            max_bandwidth: Some(u64::MAX / 2),
            multifd_channels: Some(4),
            multifd_compression: Some(MultiFdCompression::Zstd),
            multifd_zstd_level: Some(3),
            ..Default::default()
        }),
        json!({"downtime-limit": 300, "max-bandwidth": u64::MAX / 2, "multifd-channels": 4,
               "multifd-compression": "zstd", "multifd-zstd-level": 3})
    );
    assert_eq!(
        args(&CalcDirtyRate {
            calc_time: 1,
            calc_time_unit: None,
            sample_pages: Some(4096),
            mode: None
        }),
        json!({"calc-time": 1, "sample-pages": 4096})
    );
    assert_eq!(
        args(&BlockJobCancel {
            device: "mirror-root".into(),
            force: Some(true)
        }),
        json!({"device": "mirror-root", "force": true})
    );
    assert_eq!(args(&MigrateIncoming::new("tcp:0:1")), json!({"uri": "tcp:0:1"}));
    assert_eq!(args(&QueryDirtyRate::default()), json!({}));
}

#[test]
fn enum_names_round_trip() {
    for s in MigrationStatus::ALL {
        let v = serde_json::to_value(s).expect("ser");
        assert_eq!(v, json!(s.as_str()));
        assert_eq!(serde_json::from_value::<MigrationStatus>(v).expect("de"), *s);
    }
    assert_eq!(MigrationStatus::PostcopyActive.to_string(), "postcopy-active");
    assert_eq!(RunState::GuestPanicked.to_string(), "guest-panicked");
}
