//! AMST: one session between two agents carries any number of byte channels
//! (QEMU's migration connections, NBD connections of the disk mirrors) over
//! N parallel TLS 1.3 streams.
//!
//! ```text
//! source                                                   target
//! local conns ─▶ readers ─▶ encoder (seq, HDE) ─▶ N stream writers ══TLS══▶ stream readers
//!                                                                    │
//!   QEMU ◀── reverse writers ◀── stream 0 reader ◀══ Reverse/Ack ══  assembler (reorder by seq,
//!                                                                     decode, verify) ─▶ QEMU
//! ```
//! Forward frames are numbered; the target reorders them, so frames may take
//! any stream (a writer takes the next frame when its socket has room, which
//! spreads load by what each stream actually achieves). The few reverse bytes
//! (return path, NBD replies) and acks go back on stream 0. Any error fails the
//! whole session: every local connection is closed, so QEMU sees a broken
//! migration and NovaCron rolls it back; bytes are never guessed.
//!
//! The parts: `sender` is the source end (local connections, the encoder),
//! `receiver` the target end (one listener, the assembler), `stream` the TCP
//! streams between them and the tasks that move frames over each, `rate` what
//! measures and paces them. What they share (configuration, counters, the
//! hello, the error state) is here.

mod rate;
mod receiver;
mod sender;
mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::ChunkCache;
use crate::frame::{put_string, Frame, Kind};

pub use receiver::{Receiver, Routes};
pub use sender::Sender;
pub use stream::{bbr_available, streams_for_rtt};

const PROTOCOL_VERSION: u8 = 2;
/// Input read from a local connection in one go (and the most one block holds).
const READ_CHUNK: usize = 256 * 1024;

/// How a session is set up.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Parallel streams; `None` picks them from the measured round trip.
    pub streams: Option<usize>,
    pub max_streams: usize,
    /// Token-bucket limit on bytes sent (all streams together).
    pub rate_limit_bytes_s: Option<u64>,
    /// Ask the kernel for BBR congestion control when it offers it.
    pub bbr: bool,
    /// Fixed zstd level (tests, benchmarks); `None` adapts to the link.
    pub zstd_level: Option<i32>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            streams: None,
            max_streams: 8,
            rate_limit_bytes_s: None,
            bbr: true,
            zstd_level: None,
        }
    }
}

/// What the source says about itself in `Hello`.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Names the session (the migration id); the target routes channels by it.
    pub session: String,
    /// The source node, which names the target's cache for it.
    pub node: String,
}

/// Live counters of a session (sender side unless noted).
#[derive(Default)]
pub struct Stats {
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    acked_wire_bytes: AtomicU64,
    acked_raw_bytes: AtomicU64,
    /// Local bytes that may be read ahead of the target's decoding (`TARGET_RAW_BYTES_S`).
    raw_ahead_max: AtomicU64,
    /// The switchover began: local reads are no longer held.
    released: AtomicBool,
    pages: AtomicU64,
    pages_ref: AtomicU64,
    pages_delta: AtomicU64,
    prefill_bytes: AtomicU64,
    streams: AtomicU64,
    rtt_us: AtomicU64,
    zstd_level: AtomicU64,
    /// f64 bits: EWMA of acked wire bytes/s and raw bytes/s.
    wire_rate: AtomicU64,
    raw_rate: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StatsSnapshot {
    /// Bytes read from the local connections.
    pub raw_bytes: u64,
    /// Frame bytes written to the streams.
    pub wire_bytes: u64,
    /// Frame bytes the target confirmed, and the raw bytes they decoded to.
    pub acked_wire_bytes: u64,
    pub acked_raw_bytes: u64,
    pub pages: u64,
    pub pages_ref: u64,
    pub pages_delta: u64,
    /// Guest bytes sent ahead of QEMU into the target's cache.
    pub prefill_bytes: u64,
    pub streams: u64,
    pub rtt_ms: f64,
    pub zstd_level: u64,
    /// Measured delivery rate on the wire (bytes/s).
    pub wire_bytes_s: f64,
    /// The same in bytes before encoding: what the link is worth to QEMU.
    pub raw_bytes_s: f64,
}

impl Stats {
    fn raw_held(&self) -> bool {
        let read = self.raw_bytes.load(Ordering::Relaxed);
        let ahead = read.saturating_sub(self.acked_raw_bytes.load(Ordering::Relaxed));
        ahead >= self.raw_ahead_max.load(Ordering::Relaxed) && !self.released.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        StatsSnapshot {
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            acked_wire_bytes: self.acked_wire_bytes.load(Ordering::Relaxed),
            acked_raw_bytes: self.acked_raw_bytes.load(Ordering::Relaxed),
            pages: self.pages.load(Ordering::Relaxed),
            pages_ref: self.pages_ref.load(Ordering::Relaxed),
            pages_delta: self.pages_delta.load(Ordering::Relaxed),
            prefill_bytes: self.prefill_bytes.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            rtt_ms: self.rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
            zstd_level: self.zstd_level.load(Ordering::Relaxed),
            wire_bytes_s: f(&self.wire_rate),
            raw_bytes_s: f(&self.raw_rate),
        }
    }
}

/// Error state shared by a session's tasks: the first failure wins and
/// cancels everything.
#[derive(Default)]
struct Health {
    error: Mutex<Option<String>>,
    cancel: CancellationToken,
    /// Set once the session ended well: streams closing after that are no failure.
    done: std::sync::atomic::AtomicBool,
}

impl Health {
    fn fail(&self, why: impl Into<String>) {
        if self.done.load(Ordering::Relaxed) {
            self.cancel.cancel();
            return;
        }
        let why = why.into();
        let mut e = self.error.lock();
        if e.is_none() {
            tracing::warn!(error = %why, "DWCP session failed");
            *e = Some(why);
        }
        self.cancel.cancel();
    }

    fn error(&self) -> Option<String> {
        self.error.lock().clone()
    }
}

/// Where bytes coming back for each channel go (`None`: end of stream).
type ReverseSinks = Arc<Mutex<HashMap<u32, mpsc::Sender<Option<Vec<u8>>>>>>;

fn hello_frame(hello: &Hello, stream: u32, cache: &ChunkCache) -> Frame {
    let mut p = vec![PROTOCOL_VERSION];
    put_string(&mut p, &hello.session);
    put_string(&mut p, &hello.node);
    p.extend_from_slice(&stream.to_be_bytes());
    p.extend_from_slice(&cache.id.to_be_bytes());
    p.extend_from_slice(&cache.ops.to_be_bytes());
    p.extend_from_slice(&(cache.capacity() as u64).to_be_bytes());
    Frame::new(Kind::Hello, 0, 0, p)
}

/// Copies what arrives for a channel into its local connection until the
/// channel ends (then shuts the connection's write side) or `cancel` fires.
async fn write_local<W: AsyncWrite + Unpin>(
    rx: &mut mpsc::Receiver<Option<Vec<u8>>>,
    wr: &mut W,
    cancel: &CancellationToken,
) -> std::io::Result<()> {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = rx.recv() => m,
        };
        match msg {
            Some(Some(bytes)) => wr.write_all(&bytes).await?,
            Some(None) | None => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    }
}
