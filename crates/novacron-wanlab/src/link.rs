//! One direction of an emulated link: a token-bucket serialiser at the link
//! rate, a bounded queue (tail drop), a propagation delay with jitter that
//! keeps packets in order, and random loss. Pure: time comes in as an
//! argument, so it is tested without sleeping.

use std::time::{Duration, Instant};

/// A link profile (both directions alike).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub rate_bps: u64,
    pub rtt: Duration,
    pub jitter: Duration,
    pub loss: f64,
}

pub const PROFILES: [Profile; 4] = [
    Profile {
        name: "lan",
        rate_bps: 1_000_000_000,
        rtt: Duration::from_micros(500),
        jitter: Duration::from_micros(20),
        loss: 0.0,
    },
    Profile {
        name: "metro",
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(5),
        jitter: Duration::from_micros(200),
        loss: 0.0,
    },
    Profile {
        name: "wan",
        rate_bps: 100_000_000,
        rtt: Duration::from_millis(50),
        jitter: Duration::from_millis(1),
        loss: 0.001,
    },
    Profile {
        name: "intercontinental",
        rate_bps: 50_000_000,
        rtt: Duration::from_millis(150),
        jitter: Duration::from_millis(2),
        loss: 0.005,
    },
];

pub fn profile(name: &str) -> Option<Profile> {
    PROFILES.into_iter().find(|p| p.name == name)
}

/// Deterministic per-link randomness (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
pub struct Link {
    profile: Profile,
    /// When the serialiser is free again.
    busy_until: Option<Instant>,
    last_release: Option<Instant>,
    /// Most queueing delay before tail drop.
    queue_limit: Duration,
    rng: Rng,
    pub sent: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Deliver at this time.
    Deliver(Instant),
    Lost,
    QueueFull,
}

impl Link {
    pub fn new(profile: Profile, seed: u64) -> Link {
        // Room for two bandwidth-delay products, at least 100 ms worth
        // (a router buffer of a sensible size: big enough for one TCP flow).
        let queue_limit = (profile.rtt * 2).max(Duration::from_millis(100));
        Link {
            profile,
            busy_until: None,
            last_release: None,
            queue_limit,
            rng: Rng::new(seed),
            sent: 0,
            dropped_loss: 0,
            dropped_queue: 0,
        }
    }

    pub fn admit(&mut self, len: usize, now: Instant) -> Fate {
        if self.profile.loss > 0.0 && self.rng.next_f64() < self.profile.loss {
            self.dropped_loss += 1;
            return Fate::Lost;
        }
        let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
        if start - now > self.queue_limit {
            self.dropped_queue += 1;
            return Fate::QueueFull;
        }
        let tx = Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / self.profile.rate_bps.max(1));
        let done = start + tx;
        self.busy_until = Some(done);
        let jitter = self.profile.jitter.mul_f64(self.rng.next_f64());
        let mut release = done + self.profile.rtt / 2 + jitter;
        // Jitter never reorders packets.
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.sent += 1;
        Fate::Deliver(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_delay_and_order() {
        let wan = profile("wan").unwrap();
        let mut link = Link::new(Profile { loss: 0.0, ..wan }, 1);
        let t0 = Instant::now();
        let mut last = t0;
        // 1000 packets of 1250 bytes at 100 Mbit/s: 0.1 ms each, 100 ms in all.
        for _ in 0..1000 {
            match link.admit(1250, t0) {
                Fate::Deliver(at) => {
                    assert!(at >= last);
                    last = at;
                }
                other => panic!("{other:?}"),
            }
        }
        let took = last - t0;
        // 100 ms serialisation + 25 ms one-way delay (+ up to 1 ms jitter).
        assert!(
            took >= Duration::from_millis(125) && took <= Duration::from_millis(127),
            "{took:?}"
        );
        // The queue holds 100 ms: a few more fit, then tail drop.
        let fates: Vec<Fate> = (0..10).map(|_| link.admit(1250, t0)).collect();
        assert_eq!(fates.last(), Some(&Fate::QueueFull), "{fates:?}");
        assert!(link.dropped_queue > 0);
    }

    #[test]
    fn loss_rate_is_the_profile_s() {
        let p = profile("intercontinental").unwrap();
        let mut link = Link::new(p, 7);
        let mut now = Instant::now();
        for _ in 0..200_000 {
            link.admit(100, now);
            now += Duration::from_millis(1);
        }
        let rate = link.dropped_loss as f64 / 200_000.0;
        assert!((0.004..0.006).contains(&rate), "{rate}");
        assert_eq!(link.dropped_queue, 0);
    }
}
