//! How much a session lets its streams hold on their way.
//!
//! Every byte a stream has taken is a byte QEMU believes sent, and at the
//! switchover all of them must cross before the target may run. BBR alone
//! keeps one flow's queue short, but several BBR flows together over-estimate
//! the bottleneck (each one's probes add up), and their queue grows towards
//! their summed 2 x BDP windows: on the intercontinental lab link the streams
//! held 2-6 MB in flight, 300 ms and more of queue, plus up to 128 KiB each
//! unsent in the kernel. So the session caps what each stream may have in
//! flight at its share of one bandwidth-delay product and a little, and what
//! it may leave unsent at a few milliseconds of its share of the link: the
//! backlog stays in QEMU, whose own accounting then sees it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Share of the round trip the cap allows beyond the bytes a full pipe holds:
/// room for the delivery rate to grow (the cap follows what is measured).
const GROWTH: f64 = 1.25;
/// Room for our own scheduling: a writer on a busy host wakes late.
const SLACK: Duration = Duration::from_millis(20);
/// How often a stream held at its cap looks again.
const HELD_POLL: Duration = Duration::from_millis(2);
/// No stream is held below this: small windows stall on a single delayed ack.
const MIN_PER_STREAM: u64 = 64 * 1024;
/// Link time a stream's unsent kernel buffer may hold: enough to keep it
/// sending until its writer is back with the next frame.
const UNSENT_TIME: Duration = Duration::from_millis(5);
/// Bounds of a stream's unsent buffer (`TCP_NOTSENT_LOWAT`).
const MIN_UNSENT: u64 = 16 * 1024;
pub const MAX_UNSENT: u64 = 128 * 1024;

/// What the kernel says about a stream's sending side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    /// Bytes in the network: sent, and neither acknowledged nor selectively
    /// acknowledged nor deemed lost.
    pub in_flight: u64,
    /// Bytes sent and not yet acknowledged in order (a hole holds them all).
    pub unacked: u64,
}

/// `None` where the kernel does not say (then the stream is not held back).
pub fn sending(fd: &OwnedFd) -> Option<Sending> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is open (we own it); `info` is a writable tcp_info of
    // `len` bytes, and the kernel writes at most `len` bytes.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < std::mem::size_of::<libc::tcp_info>() {
        return None;
    }
    // SAFETY: zero-initialised, then filled in whole by the kernel (checked above).
    #[allow(unsafe_code)]
    let info = unsafe { info.assume_init() };
    let mss = u64::from(info.tcpi_snd_mss);
    let packets = (info.tcpi_unacked + info.tcpi_retrans).saturating_sub(info.tcpi_sacked + info.tcpi_lost);
    Some(Sending {
        in_flight: u64::from(packets) * mss,
        unacked: u64::from(info.tcpi_unacked) * mss,
    })
}

/// What one stream may have in flight, and leave unsent, when `streams` share
/// a link delivering `rate` bytes/s with round trip `rtt`.
pub fn limits_per_stream(rate: f64, rtt: Duration, streams: usize) -> (u64, u64) {
    let n = streams.max(1) as f64;
    let in_flight = rate * (rtt.as_secs_f64() * GROWTH + SLACK.as_secs_f64()) / n;
    let unsent = rate * UNSENT_TIME.as_secs_f64() / n;
    (
        (in_flight as u64).max(MIN_PER_STREAM),
        (unsent as u64).clamp(MIN_UNSENT, MAX_UNSENT),
    )
}

/// A rate this much above the best one before it means the pipe still fills.
const FILLING_GROWTH: f64 = 1.25;
/// Rates in a row that do not grow so much mean it is full (as BBR's startup).
const FULL_AFTER_FLAT: u32 = 3;

/// Whether the session's delivery rate still grows as the congestion windows
/// open. A cap set from a rate measured meanwhile would hold the windows
/// near it: at 1.25 round trips of a smoothed rate, the lab's wan link took
/// about 2 s to fill instead of a few round trips.
#[derive(Debug, Default)]
struct Pipe {
    best: f64,
    flat: u32,
    full: bool,
    /// The highest rate since the pipe was full: the cap never falls.
    link: f64,
}

impl Pipe {
    /// Takes the next rate; true once the pipe is full.
    fn full(&mut self, rate: f64) -> bool {
        if !self.full {
            if rate >= self.best * FILLING_GROWTH {
                self.best = rate;
                self.flat = 0;
            } else {
                self.flat += 1;
                self.full = self.flat >= FULL_AFTER_FLAT;
            }
        }
        self.full
    }
}

/// The limits the session's stream writers obey.
pub struct Cap {
    in_flight: AtomicU64,
    unsent: AtomicU64,
    pipe: parking_lot::Mutex<Pipe>,
}

impl Default for Cap {
    /// No cap until the delivery rate stops growing.
    fn default() -> Cap {
        Cap {
            in_flight: AtomicU64::new(u64::MAX),
            unsent: AtomicU64::new(MAX_UNSENT),
            pipe: Default::default(),
        }
    }
}

impl Cap {
    /// `rate`: a smoothed delivery rate of the session (single samples jump
    /// when a retransmission releases what the target held behind a lost
    /// packet). The cap follows the highest one and never falls: when QEMU has little
    /// to send, deliveries say nothing about the link, and a cap below the
    /// link would hold QEMU's last bytes back at the switchover. A link that
    /// truly slowed down gets BBR's queue back, as without a cap.
    pub fn set(&self, rate: f64, rtt: Duration, streams: usize) {
        let rate = {
            let mut pipe = self.pipe.lock();
            if !pipe.full(rate) {
                return;
            }
            pipe.link = pipe.link.max(rate);
            pipe.link
        };
        let (in_flight, unsent) = limits_per_stream(rate, rtt, streams);
        self.in_flight.store(in_flight, Ordering::Relaxed);
        self.unsent.store(unsent, Ordering::Relaxed);
    }

    /// The link's rate is known: the pipe counts as full at once.
    pub fn assume(&self, rate: f64, rtt: Duration, streams: usize) {
        self.pipe.lock().full = true;
        self.set(rate, rtt, streams);
    }

    /// Waits until the stream on `fd` has less than the cap in flight, and
    /// brings its unsent limit up to date (`applied`: what it has now).
    pub async fn room(&self, fd: &OwnedFd, applied: &mut u64) {
        let unsent = self.unsent.load(Ordering::Relaxed);
        if unsent != *applied {
            // A socket that refuses keeps the limit it had: no harm beyond a longer queue.
            let _ = socket2::SockRef::from(fd).set_tcp_notsent_lowat(unsent as u32);
            *applied = unsent;
        }
        let held = |cap: &Cap| sending(fd).is_some_and(|s| s.in_flight >= cap.in_flight.load(Ordering::Relaxed));
        while held(self) {
            tokio::time::sleep(HELD_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_share_of_one_bandwidth_delay_product_and_a_little() {
        // 50 Mbit/s, 150 ms, 6 streams: 6.25 MB/s x (187.5 + 20) ms / 6, and
        // 5 ms of the link's share unsent (raised to the floor).
        assert_eq!(
            limits_per_stream(6.25e6, Duration::from_millis(150), 6),
            (216_145, MIN_UNSENT)
        );
        // A LAN's product is tiny: the floor and the scheduling slack rule.
        assert_eq!(
            limits_per_stream(1e6, Duration::from_micros(500), 1),
            (MIN_PER_STREAM, MIN_UNSENT)
        );
        assert_eq!(
            limits_per_stream(125e6, Duration::from_micros(500), 1),
            (2_578_125, MAX_UNSENT)
        );
        // 100 Mbit/s, 50 ms, 2 streams.
        assert_eq!(
            limits_per_stream(12.5e6, Duration::from_millis(50), 2),
            (515_625, 31_250)
        );
    }

    #[test]
    fn no_cap_while_the_rate_still_grows() {
        let cap = Cap::default();
        let rtt = Duration::from_millis(50);
        let capped = |c: &Cap| c.in_flight.load(Ordering::Relaxed) != u64::MAX;
        for rate in [1e6, 2e6, 4e6, 8e6, 12e6] {
            cap.set(rate, rtt, 2);
            assert!(!capped(&cap), "capped at {rate} while growing");
        }
        // Three rates within 25% of the best: the pipe is full.
        for rate in [12.5e6, 12.6e6] {
            cap.set(rate, rtt, 2);
            assert!(!capped(&cap));
        }
        cap.set(12.6e6, rtt, 2);
        assert_eq!(
            cap.in_flight.load(Ordering::Relaxed),
            limits_per_stream(12.6e6, rtt, 2).0
        );
        // Once full, a higher rate raises it, a lower one does not lower it.
        cap.set(20e6, rtt, 2);
        assert_eq!(cap.in_flight.load(Ordering::Relaxed), limits_per_stream(20e6, rtt, 2).0);
        cap.set(5e6, rtt, 2);
        assert_eq!(cap.in_flight.load(Ordering::Relaxed), limits_per_stream(20e6, rtt, 2).0);
        // A known link caps a new session at once.
        let known = Cap::default();
        known.assume(12.5e6, rtt, 2);
        assert_eq!(
            known.in_flight.load(Ordering::Relaxed),
            limits_per_stream(12.5e6, rtt, 2).0
        );
    }

    #[test]
    fn a_tcp_socket_reports_what_it_has_in_flight() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_rx, _) = listener.accept().unwrap();
        let fd = OwnedFd::from(tx.try_clone().unwrap());
        assert_eq!(
            sending(&fd),
            Some(Sending {
                in_flight: 0,
                unacked: 0
            })
        );
        tx.write_all(&[7u8; 4096]).unwrap();
        // Loopback delivers at once; in flight is at most what was written.
        assert!(sending(&fd).is_some_and(|s| s.in_flight <= 4096 + 1500 && s.unacked <= 4096 + 1500));
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert_eq!(sending(&file), None);
    }
}
