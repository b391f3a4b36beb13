//! The session's rates: how far the source may read ahead of the target's
//! decoding, what the target's acks say the link delivers, and the token
//! bucket that holds the streams to a configured limit.

use std::time::{Duration, Instant};

/// Local bytes read and not yet confirmed decoded by the target are held to
/// what the target decodes and QEMU loads within the guest's pause that is
/// left after the way there and one lost packet (`Sender::set_downtime_limit`).
/// Dedup and deltas shrink a migration's later passes a hundredfold, so the
/// link alone would let the target fall behind by hundreds of megabytes, all
/// of it to work off while the guest is paused. Held here, QEMU keeps them and
/// its own accounting sees it. Lifted at the switchover
/// ([`Sender::release`](super::Sender::release)), where holding would cost a
/// round trip of acks.
const TARGET_RAW_BYTES_S: f64 = 250e6;
/// The target's work the hold allows at least (and before a limit is set).
const MIN_RAW_AHEAD: Duration = Duration::from_millis(65);
/// The target's part of the switchover besides decoding (as `plan` allows).
const TARGET_SWITCH: Duration = Duration::from_millis(40);

pub(super) fn raw_ahead_max(limit: Duration, rtt: Duration) -> u64 {
    let left = limit.saturating_sub(rtt * 3 / 2 + TARGET_SWITCH).max(MIN_RAW_AHEAD);
    (TARGET_RAW_BYTES_S * left.as_secs_f64()) as u64
}

/// A gap between acks (seconds) longer than this means the session was idle.
const IDLE_AFTER: f64 = 1.0;

/// EWMA of delivery rates from the target's cumulative acks.
#[derive(Default)]
pub(super) struct RateMeter {
    last: Option<(Instant, u64, u64)>,
    wire: f64,
    raw: f64,
}

impl RateMeter {
    pub(super) fn update(&mut self, wire: u64, raw: u64) -> Option<(f64, f64)> {
        let now = Instant::now();
        let Some((t, w0, r0)) = self.last else {
            self.last = Some((now, wire, raw));
            return None;
        };
        let dt = now.duration_since(t).as_secs_f64();
        if dt < 0.25 {
            return None;
        }
        let (w, r) = (wire.saturating_sub(w0) as f64 / dt, raw.saturating_sub(r0) as f64 / dt);
        self.last = Some((now, wire, raw));
        // Idle periods say nothing about the link. The target acks every
        // ACK_EVERY while bytes arrive: a longer silence was one.
        if w == 0.0 || dt > IDLE_AFTER {
            return None;
        }
        let a = if self.wire == 0.0 { 1.0 } else { 0.3 };
        self.wire = self.wire * (1.0 - a) + w * a;
        self.raw = self.raw * (1.0 - a) + r * a;
        Some((self.wire, self.raw))
    }
}

pub(super) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = (rate * 0.05).max(256.0 * 1024.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    pub(super) async fn take(bucket: &tokio::sync::Mutex<Bucket>, n: usize) {
        let wait = {
            let mut b = bucket.lock().await;
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * b.rate).min(b.burst);
            b.last = now;
            b.tokens -= n as f64;
            if b.tokens < 0.0 {
                Duration::from_secs_f64(-b.tokens / b.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_may_fall_behind_by_what_it_works_off_in_the_pause_left() {
        let ms = Duration::from_millis;
        // 300 ms over a 50 ms link: 300 - 75 - 40 = 185 ms of decoding.
        assert_eq!(raw_ahead_max(ms(300), ms(50)), 46_250_000);
        // 150 ms away, the way there and a loss take nearly all: the minimum.
        assert_eq!(raw_ahead_max(ms(300), ms(150)), 16_250_000);
        // No limit known yet: the minimum.
        assert_eq!(raw_ahead_max(Duration::ZERO, ms(1)), 16_250_000);
    }
}
