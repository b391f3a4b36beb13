//! PBA: predicts a migration from measured numbers and picks the strategy.
//!
//! Inputs: what the link delivers (bytes/s on the wire), what the guest's
//! memory costs on the wire per byte (sampled: zero pages, compression,
//! pages the target's cache already holds), the dirty rate, and the disk to
//! mirror. Pre-copy is modelled pass by pass: each pass sends what the guest
//! dirtied during the previous one, until a pass fits in the downtime limit.

use serde::{Deserialize, Serialize};

/// Measured inputs of a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Disk bytes the mirror has to copy.
    pub disk_bytes: u64,
    /// Wire bytes per guest-memory byte on the first pass (zero pages, compression, dedup included).
    pub first_pass_cost: f64,
    /// Wire bytes per byte of a re-sent (dirtied) page.
    pub dirty_cost: f64,
    /// Wire bytes per disk byte.
    pub disk_cost: f64,
    /// Guest dirty rate (bytes/s) and the size of the memory it keeps rewriting.
    pub dirty_bytes_s: f64,
    pub working_set_bytes: f64,
    /// What the link delivers (wire bytes/s) and its round trip (s).
    pub link_bytes_s: f64,
    pub rtt_s: f64,
    /// Guest bytes/s the sending side can encode (measured on a sample of the
    /// guest's own pages); when the link is fast, this is the limit.
    pub encode_bytes_s: f64,
    /// Time already spent measuring these inputs (part of the migration's total).
    pub measured_s: f64,
    /// Whether memory is sent ahead while the disks are mirrored (DWCP's
    /// prefill): the link then carries first-pass bytes during the setup.
    pub prefill: bool,
    pub max_downtime_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Precopy,
    AutoConverge,
    Postcopy,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub strategy: Strategy,
    pub total_s: f64,
    pub downtime_s: f64,
    pub wire_bytes: f64,
    /// Whether pre-copy reaches the downtime limit at all.
    pub converges: bool,
}

/// Fixed costs seen on every migration besides measuring: target QEMU start,
/// QMP calls, device state, the switch (about 0.5 s on the lab's lan).
const SETUP_S: f64 = 0.5;
/// Round trips spent in control calls outside the measurement: the mirror
/// hand-off and the finish (the session opens in three while the target
/// prepares, both inside `measured_s`).
const CONTROL_RTTS: f64 = 6.0;
const MAX_PASSES: usize = 30;
/// Auto-converge throttles until the guest dirties at most this share of the link.
const THROTTLED_SHARE: f64 = 0.3;
/// Throttle steps take time to bite (QEMU raises it by 10% per pass).
const THROTTLE_RAMP_PASSES: f64 = 3.0;

pub fn predict(input: &PlanInput, strategy: Strategy) -> Prediction {
    let link = input.link_bytes_s.max(1.0);
    let encode = input.encode_bytes_s.max(1.0);
    // A pass takes as long as the slower of the link (wire bytes) and the
    // encoder (the non-zero guest bytes QEMU hands over).
    let pace = |wire: f64, guest: f64| (wire / link).max(guest / encode);
    let fixed = input.measured_s + SETUP_S + CONTROL_RTTS * input.rtt_s;
    let disk_wire = input.disk_bytes as f64 * input.disk_cost;
    let first_wire = input.memory_bytes as f64 * input.first_pass_cost;
    let first_s = pace(
        disk_wire + first_wire,
        input.disk_bytes as f64 + input.working_set_bytes,
    );
    // Sent ahead: as much of the first pass as the link carries while the
    // mirror and the control calls around it wait on round trips (about the
    // setup time: calibrated on the lab's wan and intercontinental runs).
    let ahead_s = if input.prefill {
        (SETUP_S + CONTROL_RTTS * input.rtt_s).min(pace(first_wire, input.working_set_bytes))
    } else {
        0.0
    };
    let fixed = fixed - ahead_s;
    let dirty_wire_s = input.dirty_bytes_s * input.dirty_cost;
    let dirty_cost = input.dirty_cost.max(1e-6);
    let downtime_floor = 2.0 * input.rtt_s + 0.03;
    match strategy {
        Strategy::Postcopy => {
            // One pre-copy pass, then the pages dirtied meanwhile follow on demand.
            let rest = (input.dirty_bytes_s * first_s).min(input.working_set_bytes) * input.dirty_cost;
            Prediction {
                strategy,
                total_s: fixed + first_s + pace(rest, rest / dirty_cost),
                downtime_s: downtime_floor,
                wire_bytes: disk_wire + first_wire + rest,
                converges: true,
            }
        }
        Strategy::Precopy | Strategy::AutoConverge => {
            let mut dirty_wire_s = dirty_wire_s;
            let mut total = first_s;
            let mut wire = disk_wire + first_wire;
            let mut pass_s = first_s;
            let mut converges = false;
            for pass in 0..MAX_PASSES {
                if strategy == Strategy::AutoConverge && dirty_wire_s > THROTTLED_SHARE * link {
                    // The throttle lowers the dirty rate a step per pass.
                    let target = THROTTLED_SHARE * link;
                    let step = (dirty_wire_s - target) / THROTTLE_RAMP_PASSES;
                    if pass as f64 >= THROTTLE_RAMP_PASSES {
                        dirty_wire_s = target;
                    } else {
                        dirty_wire_s -= step;
                    }
                }
                let next_wire = (dirty_wire_s * pass_s).min(input.working_set_bytes * input.dirty_cost);
                let next_s = pace(next_wire, next_wire / dirty_cost);
                if next_s <= input.max_downtime_s {
                    total += next_s;
                    wire += next_wire;
                    pass_s = next_s;
                    converges = true;
                    break;
                }
                total += next_s;
                wire += next_wire;
                pass_s = next_s;
            }
            Prediction {
                strategy,
                total_s: fixed + total,
                downtime_s: pass_s + downtime_floor,
                wire_bytes: wire,
                converges,
            }
        }
    }
}

/// The strategy with the shortest predicted time among those that keep the
/// downtime limit; pre-copy is preferred when within 10% of post-copy,
/// because a post-copy failure after the switch cannot be rolled back.
pub fn choose(input: &PlanInput) -> (Prediction, String) {
    let pre = predict(input, Strategy::Precopy);
    let auto = predict(input, Strategy::AutoConverge);
    let post = predict(input, Strategy::Postcopy);
    let within = |p: &Prediction| p.converges && p.downtime_s <= input.max_downtime_s + 2.0 * input.rtt_s + 0.03;
    let numbers = format!(
        "link {:.1} MiB/s, rtt {:.0} ms, dirty {:.1} MiB/s, first pass {:.2} wire B/B, rewrites {:.2} wire B/B, encoding {}; predicted pre-copy {}, auto-converge {}, post-copy {:.1} s",
        input.link_bytes_s / 1048576.0,
        input.rtt_s * 1e3,
        input.dirty_bytes_s / 1048576.0,
        input.first_pass_cost,
        input.dirty_cost,
        match input.encode_bytes_s {
            e if e.is_finite() => format!("{:.0} MiB/s", e / 1048576.0),
            _ => "unlimited".into(),
        },
        show(&pre),
        show(&auto),
        post.total_s
    );
    let best = if within(&pre) && pre.total_s <= post.total_s * 1.1 {
        pre
    } else if within(&auto) && auto.total_s <= post.total_s * 1.1 {
        auto
    } else {
        post
    };
    (best, numbers)
}

fn show(p: &Prediction) -> String {
    if p.converges {
        format!("{:.1} s", p.total_s)
    } else {
        "does not converge".into()
    }
}

/// What carries a migration's streams, as far as their wire cost goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// DWCP: zero-page runs, cache references, deltas, zstd; one encoder thread.
    Dwcp,
    /// QEMU multifd with zstd, on `channels` threads (as many at once as there are cores).
    QemuMultifd { channels: u8 },
    /// QEMU's own stream: copies, compresses nothing.
    Qemu,
}

/// What a sample of the guest's memory showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryFigures {
    /// Share of zero pages.
    pub zero_share: f64,
    /// zstd output / input for the non-zero pages.
    pub compression: f64,
    /// Share of the non-zero pages the target's cache already holds.
    pub known_share: f64,
    /// How fast zstd took them (input bytes/s on one core).
    pub compress_bytes_s: f64,
}

impl MemoryFigures {
    /// Nothing could be sampled: every page counts, incompressible and unknown.
    pub const UNKNOWN: MemoryFigures = MemoryFigures {
        zero_share: 0.0,
        compression: 1.0,
        known_share: 0.0,
        compress_bytes_s: f64::INFINITY,
    };
}

/// Inputs of [`wire_cost`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireInput {
    pub carrier: Carrier,
    pub memory_bytes: u64,
    pub memory: MemoryFigures,
    /// Guest bytes already carried ahead to the target (they are known there now).
    pub sent_ahead_bytes: f64,
    /// Wire bytes per byte of a page the guest rewrote (see [`rewrite_cost`]), if measured.
    pub rewrite_cost: Option<f64>,
    /// Cores the sending side can encode on.
    pub cores: u32,
    /// Of those, what the guest keeps busy (measured): the encoder, and
    /// QEMU's migration thread beside it, share the rest.
    pub guest_busy_cores: f64,
}

/// What each guest and disk byte costs on the wire, and how fast it can be encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireCost {
    /// The [`PlanInput`] fields of the same names.
    pub first_pass_cost: f64,
    pub dirty_cost: f64,
    pub disk_cost: f64,
    pub encode_bytes_s: f64,
    pub working_set_bytes: f64,
    /// The sampled share of known pages, plus what was sent ahead.
    pub known_share: f64,
}

/// The least share of the cores the encoding side is assumed to get, however
/// busy the guest was while it was measured.
const MIN_SPARE_CORES: f64 = 0.5;

/// Wire bytes per guest byte. QEMU sends a zero page as a 9-byte record
/// (DWCP compresses runs of them to almost nothing); a known page costs DWCP
/// a 17-byte reference. DWCP re-sends a page the guest changed a little as a
/// delta. DWCP encodes on one thread; multifd compresses on one thread per
/// channel, as many at once as there are cores; plain QEMU only copies.
pub fn wire_cost(input: &WireInput) -> WireCost {
    let MemoryFigures {
        zero_share: zero,
        compression,
        compress_bytes_s,
        ..
    } = input.memory;
    let mut known = input.memory.known_share;
    let working_set = (1.0 - zero) * input.memory_bytes as f64;
    if working_set > 0.0 {
        known += (1.0 - known) * (input.sent_ahead_bytes / working_set).min(1.0);
    }
    let (first_pass_cost, dirty_cost, disk_cost) = match input.carrier {
        Carrier::Dwcp => (
            zero * 0.5 / 4096.0 + (1.0 - zero) * (known * 17.0 / 4096.0 + (1.0 - known) * compression),
            input.rewrite_cost.map_or(compression, |c| c.min(compression)),
            compression,
        ),
        Carrier::QemuMultifd { .. } => (zero * 9.0 / 4096.0 + (1.0 - zero) * compression, compression, 1.0),
        Carrier::Qemu => (zero * 9.0 / 4096.0 + (1.0 - zero), 1.0, 1.0),
    };
    // The sample timed the codec on a core of its own; during the migration
    // QEMU's migration thread wants one too, and the guest keeps its share.
    let spare = (f64::from(input.cores) - input.guest_busy_cores).clamp(MIN_SPARE_CORES, f64::from(input.cores));
    let encode_bytes_s = match input.carrier {
        Carrier::Dwcp => compress_bytes_s * (spare / 2.0).min(1.0),
        Carrier::QemuMultifd { channels } => {
            compress_bytes_s * f64::from(input.cores.min(u32::from(channels))).min(spare)
        }
        Carrier::Qemu => f64::INFINITY,
    };
    WireCost {
        first_pass_cost,
        dirty_cost,
        disk_cost,
        encode_bytes_s,
        working_set_bytes: working_set,
        known_share: known,
    }
}

/// Wire bytes per byte of a rewritten page, from sampled pages as they were
/// and as they are now: a page with a few changed runs travels as a delta
/// (DWCP), any other as compressed content (`compression`). `None` when too
/// few changed to say.
pub fn rewrite_cost<'a>(pages: impl IntoIterator<Item = (&'a [u8], &'a [u8])>, compression: f64) -> Option<f64> {
    const MIN_CHANGED: usize = 4;
    let (mut changed, mut cost) = (0usize, 0.0f64);
    for (before, now) in pages {
        if before == now {
            continue;
        }
        changed += 1;
        cost += crate::codec::delta_bytes(before, now).map_or(4096.0 * compression, |d| d as f64);
    }
    (changed >= MIN_CHANGED).then(|| cost / (changed as f64 * 4096.0))
}

/// Live estimate of the seconds left: `remaining` guest bytes still to send,
/// `raw_rate` guest bytes/s the transport moves, `dirty` bytes/s re-dirtied.
pub fn eta_remaining(remaining: f64, raw_rate: f64, dirty: f64, postcopy_active: bool) -> Option<f64> {
    if raw_rate <= 0.0 {
        return None;
    }
    if postcopy_active {
        return Some(remaining / raw_rate);
    }
    let net = raw_rate - dirty;
    (net > raw_rate * 0.05).then(|| remaining / net)
}

/// Time the target needs after the guest stops for its own part of the
/// switchover: the disks' last flush, the NBD server's stop, `cont`.
const SWITCH_ALLOWANCE_S: f64 = 0.04;
/// QEMU keeps at least this share of the guest's downtime limit.
const MIN_QEMU_SHARE: f64 = 0.2;

/// The downtime limit to give QEMU (seconds) so that the guest's pause stays
/// within `limit_s`. QEMU stops the guest once its last pass fits its limit
/// at the rate it is told, but the guest only resumes on the target after the
/// bytes already on their way (`in_flight_bytes` sent and not yet confirmed,
/// at `wire_rate`) have crossed the link too, the last one taking at least
/// half a round trip. A packet lost among the last ones costs a round trip
/// more before TCP has it again; on a WAN one usually is, so that is budgeted.
pub fn qemu_downtime_limit(limit_s: f64, in_flight_bytes: f64, wire_rate: f64, rtt_s: f64) -> f64 {
    // Confirmations lag half a round trip: that much of what is unconfirmed has arrived.
    let queued_s = if wire_rate > 0.0 {
        in_flight_bytes / wire_rate
    } else {
        0.0
    };
    let ahead_s = (queued_s - rtt_s / 2.0).max(rtt_s / 2.0) + rtt_s;
    (limit_s - ahead_s - SWITCH_ALLOWANCE_S).max(limit_s * MIN_QEMU_SHARE)
}

#[cfg(test)]
mod tests {
    #[test]
    fn qemu_gets_the_downtime_left_after_the_bytes_on_their_way() {
        use super::qemu_downtime_limit;
        // A lan: nothing queued, a short round trip: almost all of it.
        assert!((qemu_downtime_limit(0.3, 0.0, 1e8, 0.001) - 0.2585).abs() < 1e-9);
        // 50 ms away with 0.1 s worth unconfirmed: half a round trip of it has
        // arrived, the rest takes 75 ms more, a lost packet 50.
        assert!((qemu_downtime_limit(0.3, 1.25e6, 12.5e6, 0.05) - 0.135).abs() < 1e-9);
        // 150 ms away: the way there and one loss leave QEMU its minimum share.
        assert!((qemu_downtime_limit(0.3, 0.9e6, 6e6, 0.15) - 0.06).abs() < 1e-9);
        // Far more queued than the limit: QEMU keeps its minimum share.
        assert!((qemu_downtime_limit(0.3, 6e6, 6e6, 0.15) - 0.06).abs() < 1e-9);
    }

    use super::*;

    fn input(dirty_mib_s: f64, link_mib_s: f64) -> PlanInput {
        PlanInput {
            memory_bytes: 512 << 20,
            disk_bytes: 16 << 20,
            first_pass_cost: 0.5,
            dirty_cost: 1.0,
            disk_cost: 0.5,
            dirty_bytes_s: dirty_mib_s * 1048576.0,
            working_set_bytes: 300.0 * 1048576.0,
            link_bytes_s: link_mib_s * 1048576.0,
            rtt_s: 0.05,
            encode_bytes_s: f64::INFINITY,
            measured_s: 0.0,
            prefill: false,
            max_downtime_s: 0.3,
        }
    }

    #[test]
    fn idle_guest_goes_pre_copy_in_about_one_pass() {
        let i = input(0.0, 12.0);
        let (p, why) = choose(&i);
        assert_eq!(p.strategy, Strategy::Precopy, "{why}");
        let one_pass = (512.0 * 0.5 + 8.0) / 12.0;
        assert!((p.total_s - one_pass - SETUP_S - 0.6).abs() < 0.5, "{}", p.total_s);
    }

    #[test]
    fn a_slow_encoder_bounds_a_fast_link() {
        let mut i = input(0.0, 1000.0);
        let fast = predict(&i, Strategy::Precopy);
        i.encode_bytes_s = 100.0 * 1048576.0;
        let slow = predict(&i, Strategy::Precopy);
        // 300 MiB of non-zero memory and 16 MiB of disk at 100 MiB/s instead
        // of 264 MiB on the wire at 1000 MiB/s.
        let more = 316.0 / 100.0 - 264.0 / 1000.0;
        assert!(
            (slow.total_s - fast.total_s - more).abs() < 0.01,
            "{} vs {}",
            slow.total_s,
            fast.total_s
        );
        i.measured_s = 2.0;
        assert!((predict(&i, Strategy::Precopy).total_s - slow.total_s - 2.0).abs() < 1e-9);
    }

    #[test]
    fn memory_sent_ahead_overlaps_the_setup() {
        let mut i = input(0.0, 12.0);
        let plain = predict(&i, Strategy::Precopy);
        i.prefill = true;
        let ahead = predict(&i, Strategy::Precopy);
        let setup = SETUP_S + CONTROL_RTTS * i.rtt_s;
        assert!((plain.total_s - ahead.total_s - setup).abs() < 1e-9);
        // Never more than the first pass itself.
        i.memory_bytes = 1 << 20;
        i.working_set_bytes = 1048576.0;
        let tiny = predict(&i, Strategy::Precopy);
        i.prefill = false;
        assert!(predict(&i, Strategy::Precopy).total_s - tiny.total_s <= 1.0 / 12.0 * 0.5 + 1e-9);
    }

    #[test]
    fn dirtying_faster_than_the_link_means_post_copy() {
        let (p, why) = choose(&input(40.0, 12.0));
        assert_eq!(p.strategy, Strategy::Postcopy, "{why}");
        assert!(!predict(&input(40.0, 12.0), Strategy::Precopy).converges);
        assert!(why.contains("does not converge"));
    }

    #[test]
    fn more_dirtying_takes_longer() {
        let a = predict(&input(1.0, 12.0), Strategy::Precopy);
        let b = predict(&input(4.0, 12.0), Strategy::Precopy);
        assert!(b.total_s > a.total_s && b.wire_bytes > a.wire_bytes);
    }

    #[test]
    fn eta_counts_the_dirty_rate() {
        assert_eq!(eta_remaining(100.0, 10.0, 0.0, false), Some(10.0));
        assert_eq!(eta_remaining(100.0, 10.0, 5.0, false), Some(20.0));
        assert_eq!(eta_remaining(100.0, 10.0, 12.0, false), None);
        assert_eq!(eta_remaining(100.0, 10.0, 12.0, true), Some(10.0));
    }

    fn sampled() -> MemoryFigures {
        MemoryFigures {
            zero_share: 0.5,
            compression: 0.4,
            known_share: 0.25,
            compress_bytes_s: 200e6,
        }
    }

    fn wire(carrier: Carrier, memory: MemoryFigures) -> WireInput {
        WireInput {
            carrier,
            memory_bytes: 1 << 30,
            memory,
            sent_ahead_bytes: 0.0,
            rewrite_cost: None,
            cores: 2,
            guest_busy_cores: 0.0,
        }
    }

    #[test]
    fn plain_qemu_sends_every_non_zero_byte() {
        let c = wire_cost(&wire(Carrier::Qemu, sampled()));
        assert!((c.first_pass_cost - (0.5 * 9.0 / 4096.0 + 0.5)).abs() < 1e-12);
        assert_eq!((c.dirty_cost, c.disk_cost, c.encode_bytes_s), (1.0, 1.0, f64::INFINITY));
        assert!((c.working_set_bytes - 512.0 * 1048576.0).abs() < 1e-6);
    }

    #[test]
    fn multifd_compresses_on_as_many_cores_as_it_has_channels() {
        let c = wire_cost(&wire(Carrier::QemuMultifd { channels: 4 }, sampled()));
        assert!((c.first_pass_cost - (0.5 * 9.0 / 4096.0 + 0.5 * 0.4)).abs() < 1e-12);
        assert_eq!((c.dirty_cost, c.disk_cost), (0.4, 1.0));
        assert_eq!(c.encode_bytes_s, 400e6, "2 cores of 4 channels");
    }

    #[test]
    fn a_busy_guest_leaves_the_encoders_less() {
        // One of two cores busy with the guest: DWCP's encoder shares the
        // other with QEMU's migration thread; multifd's threads get one core.
        let mut i = wire(Carrier::Dwcp, sampled());
        i.guest_busy_cores = 1.0;
        assert_eq!(wire_cost(&i).encode_bytes_s, 100e6);
        i.carrier = Carrier::QemuMultifd { channels: 4 };
        assert_eq!(wire_cost(&i).encode_bytes_s, 200e6);
        // However busy the guest, the encoders keep half a core.
        i.guest_busy_cores = 4.0;
        assert_eq!(wire_cost(&i).encode_bytes_s, 100e6);
        i.carrier = Carrier::Dwcp;
        assert_eq!(wire_cost(&i).encode_bytes_s, 50e6);
    }

    #[test]
    fn dwcp_counts_known_pages_and_what_was_sent_ahead() {
        let mut i = wire(Carrier::Dwcp, sampled());
        let c = wire_cost(&i);
        let first = 0.5 * 0.5 / 4096.0 + 0.5 * (0.25 * 17.0 / 4096.0 + 0.75 * 0.4);
        assert!((c.first_pass_cost - first).abs() < 1e-12);
        assert_eq!((c.dirty_cost, c.disk_cost, c.encode_bytes_s), (0.4, 0.4, 200e6));
        // Half the working set sent ahead: half the unknown pages are known now.
        i.sent_ahead_bytes = 256.0 * 1048576.0;
        assert!((wire_cost(&i).known_share - 0.625).abs() < 1e-12);
        // A measured rewrite cost counts, never above plain compression.
        i.rewrite_cost = Some(0.1);
        assert_eq!(wire_cost(&i).dirty_cost, 0.1);
        i.rewrite_cost = Some(0.9);
        assert_eq!(wire_cost(&i).dirty_cost, 0.4);
    }

    #[test]
    fn nothing_sampled_is_incompressible() {
        let c = wire_cost(&wire(Carrier::Dwcp, MemoryFigures::UNKNOWN));
        assert_eq!((c.first_pass_cost, c.dirty_cost, c.disk_cost), (1.0, 1.0, 1.0));
        assert_eq!(c.known_share, 0.0);
    }

    #[test]
    fn rewrites_cost_their_deltas() {
        let before = vec![7u8; 4096];
        let mut small = before.clone();
        small[100] = 1;
        let pages: Vec<(&[u8], &[u8])> = vec![(&before, &small); 4];
        let cost = rewrite_cost(pages.iter().copied(), 0.5).expect("four changed pages");
        assert!(cost < 0.1, "{cost}");
        // Unchanged pages do not count; three changed ones are too few to say.
        let mut few = vec![(&before[..], &before[..]); 8];
        few.extend(vec![(&before[..], &small[..]); 3]);
        assert_eq!(rewrite_cost(few, 0.5), None);
    }
}
