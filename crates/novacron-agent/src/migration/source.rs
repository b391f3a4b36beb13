//! Source side of a live migration: disks mirrored to the target, memory
//! sent by QEMU (over DWCP or its own stream), the switchover that lets the
//! target run, and the roll-back of whatever failed before that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use novacron_api::agent::{Finished, PlanAsk, PrepareRequest, Prepared, VmRef};
use novacron_api::{
    Migration, MigrationPhase, MigrationStatus, MigrationStepKind as StepKind, MigrationStrategy, MigrationTransport,
    Node, Vm, VmPhase,
};
use novacron_dwcp::{plan, Role, Sender};
use novacron_qmp::commands::{
    BlockJobCancel, DriveMirror, Migrate, MigrateCancel, MigrateSetCapabilities, MigrateSetParameters,
    MigrateStartPostcopy, QueryBlockJobs, QueryMigrate,
};
use novacron_qmp::types::{
    BlockJobInfo, MigrationCapability as Cap, MigrationCapabilityStatus, MigrationStatus as QemuMigration,
    MirrorSyncMode, MultiFdCompression, NewImageMode,
};
use novacron_qmp::Qmp;
use serde_json::Value;
use tokio_util::task::AbortOnDropHandle;

use super::console_log::read_log_from;
use super::planning::PlanRun;
use super::progress::{dwcp_figures, progress_from};
use super::timeline::Timeline;
use super::{MigrationError, Migrations, MULTIFD_CHANNELS, POLL_EVERY, QMP_TIMEOUT, REPORT_EVERY};
use crate::qemu;
use novacron_api::error::chain;

/// Pre-copy passes after which a plain pre-copy migration is declared non-converging.
const MAX_PRECOPY_PASSES: u64 = 40;
/// zstd level of the `qemu-multifd` transport (tuned on the WAN lab: level 3
/// beats 1 on long links).
const MULTIFD_ZSTD_LEVEL: u8 = 3;

/// What the source has set up, so a rollback undoes exactly that.
#[derive(Default)]
pub(super) struct SourceCtx {
    pub(super) target: Option<Node>,
    pub(super) target_prepared: bool,
    mirrors: Vec<String>,
    /// The mirrors write through DWCP's disk channels: the target waits for them.
    dwcp_disks: bool,
    /// The source QEMU's events, to read when it stopped the guest.
    events: Option<tokio::sync::broadcast::Receiver<novacron_qmp::QmpEvent>>,
    /// When the guest paused on the source and resumed on the target (Unix ms).
    stopped_at: Option<f64>,
    resumed_at: Option<f64>,
    postcopy_started: bool,
    pub(super) target_pid: Option<u32>,
    pub(super) target_running: bool,
    pub(super) timeline: Timeline,
}

impl SourceCtx {
    pub(super) fn new(timeline: Timeline) -> SourceCtx {
        SourceCtx {
            timeline,
            ..Default::default()
        }
    }

    /// What an earlier run of this agent may have set up: anything up to a
    /// prepared target.
    pub(super) fn left_by_earlier_run() -> SourceCtx {
        SourceCtx {
            target_prepared: true,
            ..Default::default()
        }
    }
}

/// When the source QEMU last stopped the guest (Unix ms), from its events.
fn stop_time(events: &mut tokio::sync::broadcast::Receiver<novacron_qmp::QmpEvent>) -> Option<f64> {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut stopped = None;
    loop {
        match events.try_recv() {
            Ok(ev) if ev.event == "STOP" => stopped = ev.unix_ms().or(stopped),
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(_) => return stopped,
        }
    }
}

impl Migrations {
    pub(super) async fn transfer(
        &self,
        m: &Migration,
        vm: &Vm,
        ctx: &mut SourceCtx,
        started: Instant,
    ) -> Result<MigrationStatus, MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        let timeline = ctx.timeline.clone();
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        let target: Node = self.node.client.get(&m.status.target_node).await?;
        ctx.target = Some(target.clone());
        self.set_vm_phase(
            &vm.metadata.name,
            VmPhase::Migrating,
            Some(format!("Migrating to {}", target.metadata.name)),
        )
        .await;

        self.write_status(name, |s| {
            s.phase = MigrationPhase::PreparingTarget;
            s.started_at = Some(Utc::now());
        })
        .await;
        // The target prepares while this side measures (transport, link,
        // memory sample, dirty rate) and picks the strategy: nothing in the
        // preparation depends on the plan. The target accepts post-copy
        // whenever the plan may choose it (a capability the source never uses
        // changes nothing on the target), and expects the DWCP session asked for.
        let may_postcopy = match m.spec.strategy {
            MigrationStrategy::Postcopy => true,
            MigrationStrategy::Auto => m.spec.transport != MigrationTransport::QemuMultifd,
            _ => false,
        };
        ctx.target_prepared = true;
        let (console_log, log_offset) = read_log_from(&dir.console_log(), 0);
        let request = PrepareRequest {
            vm: vm.clone(),
            trace_parent: m.spec.trace_parent.clone(),
            postcopy: may_postcopy,
            multifd: m.spec.transport == MigrationTransport::QemuMultifd,
            dwcp_session: (m.spec.transport == MigrationTransport::Dwcp).then(|| m.metadata.id.clone()),
            console_log,
            source_node: self.node.name.clone(),
            snapshots: crate::snapshots::list(&dir)?,
            disk_layers: crate::snapshots::disk_layers(&dir).await?,
            backup_chain: crate::backup::chain::export(&dir.path)
                .map_err(|e| MigrationError::Invalid(e.to_string()))?,
        };
        let ask = PlanAsk {
            strategy: m.spec.strategy,
            transport: m.spec.transport,
            bandwidth_mib_s: m.spec.bandwidth_mib_s,
            max_downtime_ms: m.spec.max_downtime_ms,
        };
        let prepare = async {
            let calling = Instant::now();
            let preparing = timeline.begin(StepKind::PrepareTarget);
            let prepared: Prepared = self.target_call(&target, "prepare", &m.metadata.id, &request).await?;
            timeline.end(preparing, None);
            timeline.add_remote(calling, &prepared.steps);
            Ok::<_, MigrationError>(prepared)
        };
        let (planned, prepared) = tokio::join!(
            self.plan(
                &qmp,
                vm,
                &target,
                ask,
                PlanRun {
                    session: &m.metadata.id,
                    send_ahead: true,
                    timeline: &timeline,
                }
            ),
            prepare
        );
        let (planned, prepared) = (planned?, prepared?);
        let (strategy, transport, session) = (planned.strategy, planned.transport, planned.session.clone());
        let why = planned.prediction.reason.clone();
        tracing::info!(migration = %name, ?strategy, %transport, predicted_s = planned.prediction.total_s, reason = %why, "strategy chosen");
        self.write_status(name, |s| {
            s.strategy = Some(strategy);
            s.strategy_reason = Some(why.clone());
            s.transport = Some(transport);
            s.transport_reason = planned.transport_reason.clone();
            s.prediction = Some(planned.prediction.clone());
            s.progress.dirty_rate_bytes_s = planned.prediction.dirty_rate_bytes_s as u64;
            s.progress.eta_s = Some(planned.prediction.total_s);
        })
        .await;
        let postcopy = strategy == MigrationStrategy::Postcopy;
        let multifd = transport == MigrationTransport::QemuMultifd;
        tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, "target prepared");
        self.check_cancel(name)?;
        // While the disks are mirrored (small requests, each waiting for its
        // reply) the link has room: DWCP fills it with the guest pages the
        // probe did not carry, so QEMU's pass finds them in the target's cache.
        // Stops (the guard drops) when QEMU starts.
        let prefill = match (&session, planned.pages) {
            (Some(s), Some(pages)) => {
                Some(crate::dwcp::start_prefill(s.clone(), pages, &vm.metadata.name).drop_guard())
            }
            _ => None,
        };
        // With DWCP, QEMU talks to local ends of the session instead of the target.
        let local = match &session {
            Some(s) => {
                let (nbd, mig) = (dir.dwcp_nbd_socket(), dir.dwcp_migration_socket());
                s.listen(Role::Nbd, &nbd).map_err(|source| MigrationError::Session {
                    what: format!("listen on {}", nbd.display()),
                    source,
                })?;
                s.listen(Role::Migration, &mig)
                    .map_err(|source| MigrationError::Session {
                        what: format!("listen on {}", mig.display()),
                        source,
                    })?;
                ctx.dwcp_disks = true;
                Some((nbd, mig))
            }
            None => None,
        };
        let nbd_target = |disk: &str| match &local {
            Some((nbd, _)) => format!("nbd+unix:///{disk}?socket={}", nbd.display()),
            None => format!("nbd://{}:{}/{disk}", prepared.nbd_host, prepared.nbd_port),
        };
        let migrate_uri = match &local {
            Some((_, mig)) => format!("unix:{}", mig.display()),
            None => prepared.migrate_uri.clone(),
        };

        // Disks first: mirror each to the target's NBD export until in sync.
        self.write_status(name, |s| s.phase = MigrationPhase::Transferring)
            .await;
        let mirroring = timeline.begin(StepKind::DiskMirror);
        // A snapshot of the running VM put an overlay's node on top of its disk.
        let tops = crate::snapshots::top_nodes(&qmp).await?;
        for disk in &prepared.disks {
            let job = format!("mirror-{disk}");
            let device = tops.get(disk).unwrap_or(disk);
            let mut mirror = DriveMirror::new(device.as_str(), nbd_target(disk), MirrorSyncMode::Top);
            mirror.job_id = Some(job.clone());
            mirror.mode = Some(NewImageMode::Existing);
            mirror.format = Some("raw".into());
            qmp.run(&mirror).await?;
            ctx.mirrors.push(job);
        }
        let watch = self.watch_target(&target);
        let mut disk_total;
        let mut last_check = Instant::now();
        loop {
            let jobs = qmp.run(&QueryBlockJobs).await?;
            let mine: Vec<&BlockJobInfo> = jobs.iter().filter(|j| ctx.mirrors.contains(&j.device)).collect();
            if mine.len() < ctx.mirrors.len() {
                return Err(MigrationError::QemuFailed("disk mirror stopped".into()));
            }
            let (done, total): (u64, u64) = mine.iter().fold((0, 0), |(d, t), j| (d + j.offset, t + j.len));
            disk_total = total;
            let ready = mine.iter().all(|j| j.ready);
            if ready || last_check.elapsed() >= REPORT_EVERY {
                self.write_status(name, |s| {
                    s.progress.disk_transferred_bytes = done;
                    s.progress.disk_total_bytes = total;
                })
                .await;
            }
            if ready {
                tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, "disks in sync");
                timeline.end(mirroring, Some(format!("{} MiB", done >> 20)));
                break;
            }
            self.check_cancel(name)?;
            watch.check()?;
            if last_check.elapsed() >= REPORT_EVERY {
                last_check = Instant::now();
                self.check_session(&session, &target).await?;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }

        // Memory.
        // Every capability explicitly: a QEMU that arrived here by migration keeps
        // the capabilities its incoming side had (e.g. postcopy-ram), and a
        // mismatch with the target breaks the stream.
        let capabilities = vec![
            MigrationCapabilityStatus::new(Cap::AutoConverge, strategy == MigrationStrategy::AutoConverge),
            MigrationCapabilityStatus::new(Cap::PostcopyRam, postcopy),
            MigrationCapabilityStatus::new(Cap::LateBlockActivate, false),
            MigrationCapabilityStatus::new(Cap::Multifd, multifd),
            // The disks' change tracking goes along (backups stay
            // incremental) when post-copy is on or off on both sides alike: a
            // target ready for post-copy fails a pre-copy stream that carries
            // bitmaps. Else the next backup is full and says why.
            MigrationCapabilityStatus::new(Cap::DirtyBitmaps, postcopy == may_postcopy),
        ];
        qmp.run(&MigrateSetCapabilities { capabilities }).await?;
        // DWCP applies the bandwidth cap itself (on wire bytes); QEMU runs uncapped into it.
        let max_bandwidth = match (&session, m.spec.bandwidth_mib_s) {
            (None, Some(b)) => b * 1024 * 1024,
            _ => u64::MAX / 2,
        };
        let mut params = MigrateSetParameters {
            downtime_limit: Some(m.spec.max_downtime_ms),
            max_bandwidth: Some(max_bandwidth),
            block_bitmap_mapping: Some(crate::backup::export::migration_mapping(&tops)),
            ..Default::default()
        };
        if multifd {
            params.multifd_channels = Some(MULTIFD_CHANNELS);
            params.multifd_compression = Some(MultiFdCompression::Zstd);
            params.multifd_zstd_level = Some(MULTIFD_ZSTD_LEVEL);
        }
        qmp.run(&params).await?;
        drop(prefill);
        // From its first check on: QEMU's own view of the bandwidth, bytes into
        // a local socket, would have it stop before its first pass has crossed.
        if let Some(s) = &session {
            tell_qemu_the_link(&qmp, s, m).await;
        }
        ctx.events = Some(qmp.events());
        if let Some(s) = &session {
            s.set_downtime_limit(Duration::from_millis(m.spec.max_downtime_ms));
        }
        let _release = session.as_ref().map(|s| release_at_stop(&qmp, s.clone()));
        let mut passes = Some(timeline.begin(StepKind::MemoryPasses));
        let mut after_switch = None;
        qmp.run(&Migrate { uri: migrate_uri }).await?;
        let mut postcopy_started = false;
        let mut last_report = Instant::now();
        let info = loop {
            tokio::time::sleep(POLL_EVERY).await;
            let info = qmp.run(&QueryMigrate).await?;
            let ram = info.ram.as_ref();
            let status = match info.status {
                // QEMU has a migration from the moment `migrate` returns; without
                // one, waiting would never end.
                None | Some(QemuMigration::None) => {
                    return Err(MigrationError::QemuFailed("absent after accepting migrate".into()))
                }
                Some(s) => s,
            };
            match status {
                QemuMigration::Completed => {
                    tracing::info!(migration = %name, elapsed_ms = started.elapsed().as_millis() as u64, downtime_ms = info.downtime, "memory moved");
                    let count = ram.map_or(0, |r| r.dirty_sync_count);
                    if let Some(p) = passes.take() {
                        timeline.end(p, Some(format!("{count} passes")));
                    }
                    if let Some(p) = after_switch.take() {
                        timeline.end(p, None);
                    }
                    break info;
                }
                QemuMigration::Failed | QemuMigration::Cancelled => {
                    // A dead target agent explains a broken stream best.
                    self.check_target_alive(&target).await?;
                    let dwcp = session
                        .as_ref()
                        .and_then(|s| s.error())
                        .map(|e| format!(" (DWCP: {e})"))
                        .unwrap_or_default();
                    return Err(MigrationError::QemuFailed(format!(
                        "{status}: {}{dwcp}",
                        info.error_desc.as_deref().unwrap_or("")
                    )));
                }
                _ => {}
            }
            if !postcopy_started {
                self.check_cancel(name)?;
                watch.check()?;
            }
            let mut progress = progress_from(ram, disk_total);
            let figures = session.as_ref().map(|s| {
                let st = s.stats();
                // What the transport moves in QEMU's bytes, dedup and compression included.
                progress.throughput_bytes_s = st.raw_bytes_s as u64;
                progress.eta_s = plan::eta_remaining(
                    progress.remaining_bytes as f64,
                    st.raw_bytes_s,
                    progress.dirty_rate_bytes_s as f64,
                    postcopy_started,
                );
                dwcp_figures(&st)
            });
            // Plain pre-copy never converges when the guest dirties memory faster than
            // we send it: give up with the numbers instead of looping forever.
            if strategy == MigrationStrategy::Precopy && ram.is_some_and(|r| r.dirty_sync_count > MAX_PRECOPY_PASSES) {
                return Err(MigrationError::NoConvergence {
                    passes: MAX_PRECOPY_PASSES,
                    dirty_mib_s: progress.dirty_rate_bytes_s >> 20,
                    sent_mib_s: progress.throughput_bytes_s >> 20,
                });
            }
            // Post-copy: after the first full pass (or when pre-copy stops converging).
            if postcopy
                && !postcopy_started
                && ram.is_some_and(|r| r.dirty_sync_count >= 2)
                && status == QemuMigration::Active
            {
                qmp.run(&MigrateStartPostcopy).await?;
                if let Some(p) = passes.take() {
                    let count = ram.map_or(0, |r| r.dirty_sync_count);
                    timeline.end(p, Some(format!("{count} passes")));
                }
                after_switch = Some(timeline.begin(StepKind::Postcopy));
                postcopy_started = true;
                ctx.postcopy_started = true;
                tracing::info!(migration = %name, "switched to post-copy");
            }
            // Post-copy: once the source has stopped and switched, the guest runs on
            // the target while the rest of its memory follows on demand.
            if postcopy_started && status == QemuMigration::PostcopyActive && !ctx.target_running {
                watch.hand_over_connection().await;
                self.switch_to_target(&qmp, ctx, &target, m, vm, log_offset).await?;
            }
            // QEMU is polled often so that its end is seen at once; the calls
            // that cross the network run less often.
            if last_report.elapsed() < REPORT_EVERY {
                continue;
            }
            last_report = Instant::now();
            if !postcopy_started {
                self.check_session(&session, &target).await?;
            }
            if let (Some(s), false) = (&session, postcopy_started) {
                tell_qemu_the_link(&qmp, s, m).await;
            }
            self.write_status(name, |s| {
                s.progress = progress.clone();
                if figures.is_some() {
                    s.dwcp = figures.clone();
                }
            })
            .await;
        };
        watch.hand_over_connection().await;
        drop(watch);

        if !ctx.target_running {
            self.switch_to_target(&qmp, ctx, &target, m, vm, log_offset).await?;
        }
        // The VM runs on the target; close the session once all is delivered.
        let mut figures = None;
        if let Some(s) = &session {
            match timeline
                .time(StepKind::SessionClose, s.finish(Duration::from_secs(60)))
                .await
            {
                // A migration's delivery rate shows what it needed, not what the
                // link can do: only probes set the remembered link rate.
                Ok(st) => figures = Some(dwcp_figures(&st)),
                Err(e) => tracing::warn!(migration = %name, error = %e, "DWCP session did not end cleanly"),
            }
        }

        let ram = info.ram.as_ref();
        let mut status = self.latest(name).map(|m| m.status).unwrap_or_default();
        status.progress = progress_from(ram, disk_total);
        status.progress.percent = 100.0;
        status.progress.remaining_bytes = 0;
        status.progress.eta_s = Some(0.0);
        status.total_time_ms = Some(started.elapsed().as_millis() as u64);
        status.qemu_downtime_ms = info.downtime;
        status.downtime_ms = match (ctx.stopped_at, ctx.resumed_at) {
            (Some(stop), Some(resume)) if resume >= stop => {
                Some(((resume - stop).round() as u64).max(info.downtime.unwrap_or(0)))
            }
            _ => info.downtime,
        };
        status.bytes_sent = Some(ram.map_or(0, |r| r.transferred) + disk_total);
        status.wire_bytes = Some(
            figures
                .as_ref()
                .map_or(ram.map_or(0, |r| r.transferred) + disk_total, |f| f.wire_bytes),
        );
        if figures.is_some() {
            status.dwcp = figures;
        }
        status.finished_at = Some(Utc::now());
        status.error = None;
        status.timeline = timeline.steps();
        if let Some(t) = info.total_time {
            tracing::debug!(migration = %name, qemu_total_ms = t, "QEMU migration time");
        }
        Ok(status)
    }

    /// The source has stopped for good: drain the disk mirrors (cancelling a
    /// ready mirror completes it consistently), then let the target run.
    async fn switch_to_target(
        &self,
        qmp: &Qmp,
        ctx: &mut SourceCtx,
        target: &Node,
        m: &Migration,
        vm: &Vm,
        log_offset: u64,
    ) -> Result<(), MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        let switching = Instant::now();
        self.write_status(name, |s| s.phase = MigrationPhase::Switchover).await;
        for job in &ctx.mirrors {
            qmp.run(&BlockJobCancel {
                device: job.clone(),
                force: None,
            })
            .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs = qmp.run(&QueryBlockJobs).await?;
            let left = jobs.iter().filter(|j| ctx.mirrors.contains(&j.device)).count();
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(MigrationError::QemuFailed("disk mirrors did not finish".into()));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let mirrored = std::mem::take(&mut ctx.mirrors).len();
        tracing::debug!(migration = %name, ms = switching.elapsed().as_millis() as u64, "disk mirrors complete");
        let (console_log, _) = read_log_from(&dir.console_log(), log_offset);
        let finish = VmRef {
            vm_id: vm.metadata.id.clone(),
            trace_parent: m.spec.trace_parent.clone(),
            console_log,
            dwcp_disks: if ctx.dwcp_disks { mirrored } else { 0 },
        };
        let finishing = ctx.timeline.begin(StepKind::TargetFinish);
        let finished: Finished = self.target_call(target, "finish", &m.metadata.id, &finish).await?;
        ctx.timeline.end(finishing, None);
        ctx.target_pid = Some(finished.pid);
        ctx.target_running = true;
        ctx.resumed_at = finished.resumed_at;
        if let Some(events) = &mut ctx.events {
            ctx.stopped_at = stop_time(events);
        }
        if let (Some(stop), Some(resume)) = (ctx.stopped_at, ctx.resumed_at) {
            ctx.timeline.add_wall(StepKind::Switchover, stop, resume);
        }
        tracing::info!(migration = %name, switch_ms = switching.elapsed().as_millis() as u64, "VM runs on the target");
        Ok(())
    }

    /// Undo a failed migration: the VM keeps (or resumes) running on the source
    /// and nothing is left on the target.
    pub(super) async fn roll_back(&self, m: &Migration, vm: &Vm, ctx: &SourceCtx) {
        let dir = self.dir(&vm.metadata.id);
        if ctx.target_running {
            // Past the point of no return: the target runs; only finish the bookkeeping.
            return;
        }
        if let Ok(qmp) = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await {
            let _ = qmp.run(&MigrateCancel).await;
            for job in &ctx.mirrors {
                let _ = qmp
                    .run(&BlockJobCancel {
                        device: job.clone(),
                        force: Some(true),
                    })
                    .await;
            }
            // Wait for the migration to leave the active states before resuming.
            for _ in 0..50 {
                match qmp.run(&QueryMigrate).await {
                    Ok(info)
                        if matches!(
                            info.status,
                            Some(
                                QemuMigration::Active
                                    | QemuMigration::Setup
                                    | QemuMigration::Device
                                    | QemuMigration::Cancelling
                                    | QemuMigration::PreSwitchover
                                    | QemuMigration::PostcopyActive
                            )
                        ) => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(vm = %vm.metadata.name, error = %chain(&e), "cannot tell whether the migration stopped; resuming the source");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if ctx.postcopy_started {
                tracing::error!(vm = %vm.metadata.name, "post-copy failed after the switch: guest state is split; source left paused");
            } else if let Ok(st) = qmp.query_status().await {
                if !st.running && vm.spec.power_state == novacron_api::PowerState::Running {
                    let _ = qmp.cont().await;
                }
            }
        }
        if ctx.target_prepared {
            let target = match &ctx.target {
                Some(t) => Some(t.clone()),
                None => self.node.client.get::<Node>(&m.status.target_node).await.ok(),
            };
            if let Some(t) = target {
                let abort = VmRef {
                    vm_id: vm.metadata.id.clone(),
                    trace_parent: None,
                    console_log: Vec::new(),
                    dwcp_disks: 0,
                };
                if let Err(e) = self.target_call::<Value>(&t, "abort", &m.metadata.id, &abort).await {
                    tracing::warn!(migration = %m.metadata.name, error = %chain(&e), "target cleanup failed; the target agent removes leftovers when it restarts");
                }
            }
        }
    }

    pub(super) async fn cleanup_source(&self, vm: &Vm) {
        let dir = self.dir(&vm.metadata.id);
        if let Some(pid) = dir.running_pid() {
            if let Ok(qmp) = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await {
                let _ = qmp.quit().await;
            }
            if !qemu::wait_gone(pid, &dir, Duration::from_secs(5)).await {
                qemu::kill_and_wait(pid, &dir).await;
            }
        }
        self.node.net.detach(&vm.metadata.id).await;
        if let Err(e) = std::fs::remove_dir_all(&dir.path) {
            tracing::warn!(vm = %vm.metadata.name, error = %e, "cannot remove the source's VM files");
        }
    }
}

/// The session holds QEMU back while the target is behind; once QEMU stops
/// the guest, what it still sends must go at once (`Sender::release`).
fn release_at_stop(qmp: &Qmp, session: Arc<Sender>) -> AbortOnDropHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = qmp.events();
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if ev.event == "STOP" => {
                    session.release();
                    return;
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    }))
}

/// QEMU judges the final pass by the bandwidth it sees into its socket, which
/// DWCP's local end flatters: tell it what the link really delivers, and leave
/// the bytes already on their way their share of the downtime.
async fn tell_qemu_the_link(qmp: &Qmp, session: &Sender, m: &Migration) {
    let st = session.stats();
    if st.raw_bytes_s <= 0.0 {
        return;
    }
    let limit_s = plan::qemu_downtime_limit(
        m.spec.max_downtime_ms as f64 / 1e3,
        st.wire_bytes.saturating_sub(st.acked_wire_bytes) as f64,
        st.wire_bytes_s,
        st.rtt_ms / 1e3,
    );
    tracing::debug!(migration = %m.metadata.name, qemu_limit_ms = (limit_s * 1e3) as u64, "QEMU's share of the downtime");
    let _ = qmp
        .run(&MigrateSetParameters {
            avail_switchover_bandwidth: Some(st.raw_bytes_s as u64),
            downtime_limit: Some((limit_s * 1e3) as u64),
            ..Default::default()
        })
        .await;
}
