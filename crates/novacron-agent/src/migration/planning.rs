//! Planning a live migration on the source: open the transport, measure
//! the link, the guest's dirty rate and a sample of its memory, and let
//! DWCP's planner (`novacron_dwcp::plan`) predict and pick the strategy.
//! Also the dry run, which plans and moves nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use novacron_api::agent::{PlanAsk, PlanRequest};
use novacron_api::error::chain;
use novacron_api::{
    MigrationPlan, MigrationPrediction, MigrationStepKind, MigrationStrategy, MigrationTransport, Node, Vm,
};
use novacron_dwcp::plan::{self, Carrier, MemoryFigures, PlanInput, Strategy, WireInput};
use novacron_dwcp::Sender;
use novacron_qmp::commands::{CalcDirtyRate, QueryDirtyRate};
use novacron_qmp::types::DirtyRateStatus;
use novacron_qmp::{Qmp, QmpError};

use super::timeline::Timeline;
use super::{MigrationError, Migrations, MULTIFD_CHANNELS, QMP_TIMEOUT};

/// Assumed link speed for the prediction when nothing better is known.
const DEFAULT_LINK_BYTES_S: f64 = 1e9;

/// How a plan runs: the DWCP session's name, whether the probe sends guest
/// pages ahead (a migration; not a dry run), and the timeline to record in.
pub(super) struct PlanRun<'a> {
    pub(super) session: &'a str,
    pub(super) send_ahead: bool,
    pub(super) timeline: &'a Timeline,
}

/// The outcome of planning: transport (and its open session), strategy, prediction.
pub(super) struct Planned {
    pub(super) transport: MigrationTransport,
    pub(super) transport_reason: Option<String>,
    pub(super) session: Option<Arc<Sender>>,
    /// The rest of the guest's pages still to send ahead (DWCP).
    pub(super) pages: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    pub(super) strategy: MigrationStrategy,
    pub(super) prediction: MigrationPrediction,
}

impl Migrations {
    /// Measures what the prediction needs and picks transport and strategy.
    pub(super) async fn plan(
        &self,
        qmp: &Qmp,
        vm: &Vm,
        target: &Node,
        ask: PlanAsk,
        how: PlanRun<'_>,
    ) -> Result<Planned, MigrationError> {
        let PlanRun {
            session: session_name,
            send_ahead,
            timeline,
        } = how;
        let measuring = Instant::now();
        let peer = &target.metadata.name;
        let ram_bytes = vm.spec.memory_mib * 1024 * 1024;
        let dir = self.dir(&vm.metadata.id);
        // Before the session opens: a session holds the cache of what the
        // target knows while it runs, and the sample asks that cache.
        let sampling = timeline.begin(MigrationStepKind::MemorySample);
        let sample = match (&self.dwcp, dir.running_pid()) {
            (Some(d), Some(pid)) => d.sample_memory(pid, ram_bytes, peer),
            (None, Some(pid)) => crate::dwcp::sample_guest(pid, ram_bytes, |_| false),
            _ => None,
        };
        timeline.end(sampling, None);
        // QEMU samples the dirty rate while the session opens and probes the link.
        let open_and_measure = async {
            let mut transport = ask.transport;
            let mut transport_reason = None;
            let mut session = None;
            if transport == MigrationTransport::Dwcp {
                let opening = self.open_dwcp(target, session_name, ask.bandwidth_mib_s);
                match timeline.time(MigrationStepKind::SessionOpen, opening).await {
                    Ok(s) => session = Some(s),
                    Err(e) => {
                        let why = chain(&e).to_string();
                        tracing::warn!(vm = %vm.metadata.name, reason = %why, "DWCP unavailable; QEMU's own stream instead");
                        transport = MigrationTransport::Qemu;
                        transport_reason = Some(format!("DWCP unavailable: {why}; QEMU's own stream instead"));
                    }
                }
            }
            let mut pages = match (&session, dir.running_pid()) {
                (Some(_), Some(pid)) if send_ahead => Some(crate::dwcp::guest_pages(pid, ram_bytes)),
                _ => None,
            };
            let link = match (&session, &self.dwcp) {
                (Some(s), Some(d)) => {
                    let rate = timeline
                        .time(MigrationStepKind::LinkProbe, d.link_rate(peer, s, pages.as_mut()))
                        .await
                        .map_err(|source| MigrationError::Session {
                            what: "probe the link".into(),
                            source,
                        })?;
                    let st = s.stats();
                    (rate, st.rtt_ms / 1e3, st.streams)
                }
                // QEMU carries the streams, but DWCP can still measure the link.
                (None, Some(d)) => match timeline
                    .time(
                        MigrationStepKind::SessionOpen,
                        self.open_dwcp(target, &format!("{session_name}-probe"), None),
                    )
                    .await
                {
                    Ok(probe) => {
                        let rate = timeline
                            .time(MigrationStepKind::LinkProbe, d.link_rate(peer, &probe, None))
                            .await
                            .unwrap_or(DEFAULT_LINK_BYTES_S);
                        let rtt = probe.stats().rtt_ms / 1e3;
                        let _ = probe.finish(Duration::from_secs(10)).await;
                        (rate, rtt, 1)
                    }
                    Err(_) => (DEFAULT_LINK_BYTES_S, 0.0, 1),
                },
                _ => (DEFAULT_LINK_BYTES_S, 0.0, 1),
            };
            Ok::<_, MigrationError>((transport, transport_reason, session, pages, link))
        };
        let cap = ask.bandwidth_mib_s.map(|b| b as f64 * 1048576.0);
        // The guest's CPU use over the dirty-rate sample: what it leaves the
        // encoder on this host's cores.
        let cpu_before = dir
            .running_pid()
            .and_then(|pid| Some((pid, process_cpu_s(pid)?, Instant::now())));
        let (dirty, opened) = tokio::join!(
            timeline.time(MigrationStepKind::DirtyRate, measure_dirty_rate(qmp)),
            open_and_measure
        );
        let guest_busy_cores = cpu_before.and_then(|(pid, before, at)| {
            let used = process_cpu_s(pid)? - before;
            Some(used / at.elapsed().as_secs_f64().max(1e-3))
        });
        let (transport, transport_reason, session, pages, link) = opened?;
        let dirty = dirty?.unwrap_or(0.0);
        let (mut link, rtt_s, streams) = link;
        if let Some(s) = &session {
            // Probed or remembered: the session's streams need not find it out.
            s.assume_link(link);
        }
        if let Some(c) = cap {
            link = link.min(c);
        }
        let disk_bytes = dir
            .disk_files()
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|md| {
                use std::os::unix::fs::MetadataExt;
                md.blocks() * 512
            })
            .sum();
        let memory = sample.as_ref().map_or(MemoryFigures::UNKNOWN, |s| MemoryFigures {
            zero_share: s.zero_share,
            compression: s.compression,
            known_share: s.known_share,
            compress_bytes_s: s.compress_bytes_s,
        });
        // DWCP re-sends a page the guest changed a little as a delta: what the
        // sampled pages' changes since the sample would cost.
        let rewrite_cost = match (&sample, dir.running_pid(), transport) {
            (Some(s), Some(pid), MigrationTransport::Dwcp) => crate::dwcp::rewrite_cost(pid, ram_bytes, s),
            _ => None,
        };
        let cost = plan::wire_cost(&WireInput {
            carrier: carrier(transport),
            memory_bytes: ram_bytes,
            memory,
            // What the probe already carried ahead is known to the target now.
            sent_ahead_bytes: session.as_ref().map_or(0, |s| s.stats().prefill_bytes) as f64,
            rewrite_cost,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
            guest_busy_cores: guest_busy_cores.unwrap_or(0.0),
        });
        let (zero, compression, known) = (memory.zero_share, memory.compression, cost.known_share);
        let input = PlanInput {
            memory_bytes: ram_bytes,
            disk_bytes,
            first_pass_cost: cost.first_pass_cost,
            dirty_cost: cost.dirty_cost,
            disk_cost: cost.disk_cost,
            dirty_bytes_s: dirty,
            working_set_bytes: cost.working_set_bytes,
            link_bytes_s: link,
            rtt_s,
            encode_bytes_s: cost.encode_bytes_s,
            measured_s: measuring.elapsed().as_secs_f64(),
            prefill: transport == MigrationTransport::Dwcp && dir.running_pid().is_some(),
            max_downtime_s: ask.max_downtime_ms as f64 / 1000.0,
        };
        let (mut prediction, mut reason) = match ask.strategy {
            MigrationStrategy::Auto => {
                let (p, numbers) = plan::choose(&input);
                (p, format!("auto: {numbers}"))
            }
            requested => {
                let p = plan::predict(&input, to_plan(requested));
                (p, format!("requested; predicted {:.1} s", p.total_s))
            }
        };
        if transport == MigrationTransport::QemuMultifd && prediction.strategy == Strategy::Postcopy {
            prediction = plan::predict(&input, Strategy::AutoConverge);
            reason.push_str("; QEMU multifd cannot switch to post-copy: auto-converge");
        }
        if sample.is_none() {
            reason.push_str("; guest memory not readable: assumed incompressible");
        }
        if let Some(busy) = guest_busy_cores {
            reason.push_str(&format!(
                "; guest busy {busy:.1} of {} cores, codec {:.0} MiB/s a core",
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory.compress_bytes_s / 1048576.0
            ));
        }
        let strategy = from_plan(prediction.strategy);
        Ok(Planned {
            transport,
            transport_reason,
            session,
            pages,
            strategy,
            prediction: MigrationPrediction {
                strategy: Some(strategy),
                total_s: prediction.total_s,
                downtime_ms: prediction.downtime_s * 1000.0,
                wire_bytes: prediction.wire_bytes as u64,
                link_bytes_s: link,
                rtt_ms: rtt_s * 1000.0,
                streams,
                dirty_rate_bytes_s: dirty,
                zero_page_share: zero,
                compression,
                known_page_share: known,
                reason,
            },
        })
    }

    /// Dry run of a migration from this node: measure and predict, move nothing.
    pub(crate) async fn dry_run(&self, req: PlanRequest) -> Result<MigrationPlan, MigrationError> {
        if self.node.claims.is_claimed(&req.vm.metadata.id) {
            return Err(MigrationError::Conflict("the VM is being migrated".into()));
        }
        let dir = self.dir(&req.vm.metadata.id);
        if dir.running_pid().is_none() {
            return Err(MigrationError::Conflict(
                "the VM has no running QEMU on this node".into(),
            ));
        }
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        let session = format!("plan-{}-{}", req.vm.metadata.id, Utc::now().timestamp_millis());
        let planned = self
            .plan(
                &qmp,
                &req.vm,
                &req.target,
                req.ask,
                PlanRun {
                    session: &session,
                    send_ahead: false,
                    timeline: &Timeline::default(),
                },
            )
            .await?;
        if let Some(s) = &planned.session {
            let _ = s.finish(Duration::from_secs(10)).await;
        }
        Ok(MigrationPlan {
            vm: req.vm.metadata.name.clone(),
            source_node: self.node.name.clone(),
            target_node: req.target.metadata.name.clone(),
            transport: planned.transport,
            transport_reason: planned.transport_reason,
            prediction: planned.prediction,
        })
    }
}

fn to_plan(s: MigrationStrategy) -> Strategy {
    match s {
        MigrationStrategy::AutoConverge => Strategy::AutoConverge,
        MigrationStrategy::Postcopy => Strategy::Postcopy,
        _ => Strategy::Precopy,
    }
}

/// How the transport counts in the planner's wire cost model.
fn carrier(t: MigrationTransport) -> Carrier {
    match t {
        MigrationTransport::Dwcp => Carrier::Dwcp,
        MigrationTransport::QemuMultifd => Carrier::QemuMultifd {
            channels: MULTIFD_CHANNELS,
        },
        MigrationTransport::Qemu => Carrier::Qemu,
    }
}

fn from_plan(s: Strategy) -> MigrationStrategy {
    match s {
        Strategy::Precopy => MigrationStrategy::Precopy,
        Strategy::AutoConverge => MigrationStrategy::AutoConverge,
        Strategy::Postcopy => MigrationStrategy::Postcopy,
    }
}

/// Dirty rate of the guest in bytes/s, sampled by QEMU for one second. The
/// most sample pages QEMU allows: the default 512 per GiB misses a moderate
/// rate spread over a large working set. (The dirty-bitmap mode reads 0
/// under TCG on QEMU 10.0.)
///
/// `None` when QEMU cannot measure (it refuses, or takes too long): the
/// prediction then goes without. A reply QEMU's schema does not allow is an
/// error, as everywhere.
async fn measure_dirty_rate(qmp: &Qmp) -> Result<Option<f64>, QmpError> {
    let measure = async {
        let calc = CalcDirtyRate {
            calc_time: 1,
            calc_time_unit: None,
            sample_pages: Some(4096),
            mode: None,
        };
        qmp.run(&calc).await?;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let info = qmp.run(&QueryDirtyRate::default()).await?;
            if info.status == DirtyRateStatus::Measured {
                return Ok(info.dirty_rate.map(|mb| mb as f64 * 1024.0 * 1024.0));
            }
        }
        Ok(None)
    };
    match measure.await {
        Err(e @ QmpError::UnexpectedReply { .. }) => Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "no dirty rate from QEMU");
            Ok(None)
        }
        measured => measured,
    }
}

/// CPU seconds process `pid` has used (user + system, all its threads).
/// None when it cannot be read (the process is gone).
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields count from its end.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let ticks_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    // utime and stime: fields 14 and 15 of the line, 11 and 12 after the name.
    Some((ticks(11)? + ticks(12)?) as f64 / ticks_s as f64)
}
