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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::cache::{new_cache_id, CacheStore, ChunkCache};
use crate::codec::{decode, Encoder, LevelChooser};
use crate::frame::{put_string, read_frame, write_frame, Frame, Kind, PayloadReader};
use crate::inflight::{self, Cap};
use crate::nbd::Tally;
use crate::scan::{Role, Scanner};
use crate::DwcpError;

const PROTOCOL_VERSION: u8 = 2;
/// Input read from a local connection in one go (and the most one block holds).
const READ_CHUNK: usize = 256 * 1024;
/// A read at least this large suggests more is queued behind it.
const MORE_COMING: usize = 32 * 1024;
/// A local connection idle this long gets its partial record flushed.
const FLUSH_AFTER: Duration = Duration::from_millis(20);
const ACK_EVERY: Duration = Duration::from_millis(20);
/// A stream with nothing to send but bytes unacknowledged sends a small frame
/// after this long, a few times: should its last packets be lost, the acks of
/// these reveal it within a round trip, where TCP's tail-loss probe waits two.
/// At the switchover, the last packets of every stream are the guest's pause.
const TAIL_PROBE_AFTER: Duration = Duration::from_millis(10);
const TAIL_PROBES: u32 = 3;
/// Local bytes read and not yet confirmed decoded by the target are held to
/// what the target decodes and QEMU loads within the guest's pause that is
/// left after the way there and one lost packet (`Sender::set_downtime_limit`).
/// Dedup and deltas shrink a migration's later passes a hundredfold, so the
/// link alone would let the target fall behind by hundreds of megabytes, all
/// of it to work off while the guest is paused. Held here, QEMU keeps them and
/// its own accounting sees it. Lifted at the switchover ([`Sender::release`]),
/// where holding would cost a round trip of acks.
const TARGET_RAW_BYTES_S: f64 = 250e6;
/// The target's work the hold allows at least (and before a limit is set).
const MIN_RAW_AHEAD: Duration = Duration::from_millis(65);
/// The target's part of the switchover besides decoding (as `plan` allows).
const TARGET_SWITCH: Duration = Duration::from_millis(40);
const RAW_HELD_POLL: Duration = Duration::from_millis(2);
/// A gap between acks (seconds) longer than this means the session was idle.
const IDLE_AFTER: f64 = 1.0;

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

fn raw_ahead_max(limit: Duration, rtt: Duration) -> u64 {
    let left = limit.saturating_sub(rtt * 3 / 2 + TARGET_SWITCH).max(MIN_RAW_AHEAD);
    (TARGET_RAW_BYTES_S * left.as_secs_f64()) as u64
}

/// Streams for a link with this round trip: long fat pipes need several TCP
/// connections to fill them quickly and to ride out losses; short ones one.
pub fn streams_for_rtt(rtt: Duration, max: usize) -> usize {
    (1 + rtt.as_millis() as usize / 30).clamp(1, max.max(1))
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
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            tracing::warn!(error = %why, "DWCP session failed");
            *e = Some(why);
        }
        self.cancel.cancel();
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Filler a probe sends after each chunk of prefill pages.
const PROBE_GAP: usize = 16 * 1024;

fn tune_socket(sock: &impl std::os::fd::AsFd, bbr: bool) {
    if bbr {
        let _ = nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::TcpCongestion, &"bbr".into());
    }
    // Unsent bytes a stream's kernel buffer may hold until the link is
    // measured (then `Cap` sets it). Without a limit the send buffer grows to
    // megabytes, which sit in front of every later frame.
    let _ = socket2::SockRef::from(sock).set_tcp_notsent_lowat(inflight::MAX_UNSENT as u32);
}

/// Whether the kernel lets us use BBR.
pub fn bbr_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|s| s.split_whitespace().any(|c| c == "bbr"))
        .unwrap_or(false)
}

async fn connect_stream(
    addr: SocketAddr,
    name: &ServerName<'static>,
    tls: &TlsConnector,
    bbr: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DwcpError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    tune_socket(&sock, bbr);
    let tcp = tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .map_err(|_| DwcpError::Handshake(format!("connecting to {addr} timed out")))??;
    tcp.set_nodelay(true)?;
    Ok(tls.connect(name.clone(), tcp).await?)
}

// ================================================================= sender

/// Where bytes coming back for each channel go (`None`: end of stream).
type ReverseSinks = Arc<Mutex<HashMap<u32, mpsc::Sender<Option<Vec<u8>>>>>>;

enum Input {
    Open(u32, Role),
    Data(u32, Vec<u8>, bool),
    Flush(u32),
    Close(u32),
    End,
}

/// The source end of a session.
pub struct Sender {
    input: mpsc::Sender<Input>,
    health: Arc<Health>,
    stats: Arc<Stats>,
    next_channel: AtomicU32,
    reverse: ReverseSinks,
    end_ack: Arc<tokio::sync::Notify>,
    cache_back: Mutex<Option<std::sync::mpsc::Receiver<ChunkCache>>>,
    store: CacheStore,
    cache_key: String,
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.health.cancel.cancel();
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

impl Sender {
    /// Opens a session to the target agent's DWCP listener at `addr`.
    /// `peer` names the target (the source's cache for it is kept under it).
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        hello: Hello,
        store: &CacheStore,
        peer: &str,
        cfg: SessionConfig,
    ) -> Result<Sender, DwcpError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| DwcpError::Handshake(format!("{server_name:?} is not a valid server name")))?;
        let connector = TlsConnector::from(tls);
        let bbr = cfg.bbr && bbr_available();
        let mut cache = store.take(peer);
        let mut first = connect_stream(addr, &name, &connector, bbr).await?;
        let hello_sent = Instant::now();
        write_frame(&mut first, &hello_frame(&hello, 0, &cache)).await?;
        let ack = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut first))
            .await
            .map_err(|_| DwcpError::Handshake("no answer to hello".into()))??;
        let ack = match ack {
            Some(f) if f.kind == Kind::HelloAck => f,
            Some(f) if f.kind == Kind::Abort => {
                return Err(DwcpError::Handshake(String::from_utf8_lossy(&f.payload).into_owned()))
            }
            _ => return Err(DwcpError::Handshake("unexpected answer to hello".into())),
        };
        let mut r = PayloadReader::new(&ack.payload);
        let (cache_id, reused, capacity) = (r.u64()?, r.u8()? == 1, r.u64()? as usize);
        if !reused || cache.capacity() != capacity {
            cache.clear(cache_id, capacity);
        }
        // Round trip: the better of the hello and one ping (each round trip
        // here is one the migration waits for).
        let hello_rtt = hello_sent.elapsed();
        let ping_sent = Instant::now();
        write_frame(&mut first, &Frame::new(Kind::Ping, 0, 0, Vec::new())).await?;
        loop {
            match read_frame(&mut first).await? {
                Some(f) if f.kind == Kind::Pong => break,
                Some(_) => continue,
                None => return Err(DwcpError::Handshake("target closed during ping".into())),
            }
        }
        let rtt = hello_rtt.min(ping_sent.elapsed());
        let n = cfg
            .streams
            .unwrap_or_else(|| streams_for_rtt(rtt, cfg.max_streams))
            .max(1);
        // The other streams connect at once, not one after another.
        let mut connecting = tokio::task::JoinSet::new();
        for i in 1..n {
            let (name, connector, hello) = (name.clone(), connector.clone(), hello_frame(&hello, i as u32, &cache));
            connecting.spawn(async move {
                let mut s = connect_stream(addr, &name, &connector, bbr).await?;
                write_frame(&mut s, &hello).await?;
                Ok::<_, DwcpError>((i, s))
            });
        }
        let mut more = Vec::with_capacity(n - 1);
        while let Some(joined) = connecting.join_next().await {
            more.push(joined.map_err(|e| DwcpError::Handshake(format!("connecting a stream failed: {e}")))??);
        }
        more.sort_by_key(|(i, _)| *i);
        let mut streams = vec![first];
        streams.extend(more.into_iter().map(|(_, s)| s));
        tracing::info!(session = %hello.session, %addr, streams = n, rtt_ms = rtt.as_secs_f64() * 1e3, cache_reused = reused, cache_entries = cache.len(), "DWCP session open");

        let health = Arc::new(Health::default());
        let stats = Arc::new(Stats::default());
        stats.streams.store(n as u64, Ordering::Relaxed);
        stats.rtt_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
        stats
            .raw_ahead_max
            .store(raw_ahead_max(Duration::ZERO, rtt), Ordering::Relaxed);
        // Small queues: bytes buffered here are bytes QEMU believes sent, and
        // they all have to cross the link during the switchover pause.
        let (input_tx, input_rx) = mpsc::channel::<Input>(2);
        let (out_tx, out_rx) = mpsc::channel::<Frame>(n + 1);
        let out_rx = Arc::new(tokio::sync::Mutex::new(out_rx));
        let bucket = cfg
            .rate_limit_bytes_s
            .map(|r| Arc::new(tokio::sync::Mutex::new(Bucket::new(r))));
        let reverse: ReverseSinks = Arc::default();
        let end_ack = Arc::new(tokio::sync::Notify::new());

        // What each stream may hold in the network (see `inflight`); no cap
        // until the first delivery rate is measured.
        let cap = Arc::new(Cap::default());
        for (i, s) in streams.into_iter().enumerate() {
            // Our own handle on the socket, for its TCP state and unsent limit.
            let fd = s.get_ref().0.as_fd().try_clone_to_owned()?;
            let (mut rd, mut wr) = tokio::io::split(s);
            // Writer: takes the next frame whenever its socket has room.
            let (out_rx, health2, stats2, bucket, cap2) = (
                out_rx.clone(),
                health.clone(),
                stats.clone(),
                bucket.clone(),
                cap.clone(),
            );
            tokio::spawn(async move {
                let mut unsent_limit = inflight::MAX_UNSENT;
                loop {
                    tokio::select! {
                        _ = health2.cancel.cancelled() => return,
                        _ = cap2.room(&fd, &mut unsent_limit) => {}
                    }
                    let mut probes = 0;
                    let frame = loop {
                        let probe = probes < TAIL_PROBES && inflight::sending(&fd).is_some_and(|s| s.unacked > 0);
                        tokio::select! {
                            _ = health2.cancel.cancelled() => return,
                            f = async { out_rx.lock().await.recv().await } => break f,
                            _ = tokio::time::sleep(TAIL_PROBE_AFTER), if probe => {
                                probes += 1;
                                let ping = Frame::new(Kind::Ping, 0, 0, Vec::new());
                                if let Err(e) = write_frame(&mut wr, &ping).await {
                                    health2.fail(format!("stream {i} broke while sending: {e}"));
                                    return;
                                }
                                stats2.wire_bytes.fetch_add(ping.wire_len() as u64, Ordering::Relaxed);
                            }
                        }
                    };
                    let Some(frame) = frame else { break };
                    if let Some(b) = &bucket {
                        Bucket::take(b, frame.wire_len()).await;
                    }
                    let sent = tokio::select! {
                        _ = health2.cancel.cancelled() => return,
                        r = write_frame(&mut wr, &frame) => r,
                    };
                    if let Err(e) = sent {
                        health2.fail(format!("stream {i} broke while sending: {e}"));
                        return;
                    }
                    stats2.wire_bytes.fetch_add(frame.wire_len() as u64, Ordering::Relaxed);
                }
                // Keep the stream open until the session ends.
                health2.cancel.cancelled().await;
            });
            // Reader: stream 0 carries reverse bytes and acks; on the others
            // only the end of the stream is news.
            let (health2, stats2, reverse2, end_ack2, cap2) = (
                health.clone(),
                stats.clone(),
                reverse.clone(),
                end_ack.clone(),
                cap.clone(),
            );
            tokio::spawn(async move {
                let (mut rates, mut link) = (RateMeter::default(), 0.0f64);
                loop {
                    let frame = tokio::select! {
                        _ = health2.cancel.cancelled() => return,
                        f = read_frame(&mut rd) => f,
                    };
                    let frame = match frame {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            health2.fail(format!("the target closed stream {i}"));
                            return;
                        }
                        Err(e) => {
                            health2.fail(format!("stream {i}: {e}"));
                            return;
                        }
                    };
                    match frame.kind {
                        Kind::Reverse | Kind::ReverseClose => {
                            let tx = lock(&reverse2).get(&frame.channel).cloned();
                            if let Some(tx) = tx {
                                let msg = (frame.kind == Kind::Reverse).then_some(frame.payload);
                                let _ = tx.send(msg).await;
                            }
                        }
                        Kind::Ack => {
                            let mut r = PayloadReader::new(&frame.payload);
                            if let (Ok(wire), Ok(raw)) = (r.u64(), r.u64()) {
                                stats2.acked_wire_bytes.store(wire, Ordering::Relaxed);
                                stats2.acked_raw_bytes.store(raw, Ordering::Relaxed);
                                if let Some((w, r)) = rates.update(wire, raw) {
                                    stats2.wire_rate.store(w.to_bits(), Ordering::Relaxed);
                                    stats2.raw_rate.store(r.to_bits(), Ordering::Relaxed);
                                    link = link.max(w);
                                    cap2.set(link, rtt, n);
                                    tracing::trace!(smoothed = w, link, "delivery rate");
                                }
                            }
                        }
                        Kind::Abort => {
                            health2.fail(format!("target: {}", String::from_utf8_lossy(&frame.payload)));
                            return;
                        }
                        Kind::EndAck => {
                            health2.done.store(true, Ordering::Relaxed);
                            end_ack2.notify_one();
                        }
                        _ => {}
                    }
                }
            });
        }

        // The encoder runs on its own thread: it is the CPU-heavy part.
        let (cache_tx, cache_rx) = std::sync::mpsc::channel();
        let levels = match cfg.zstd_level {
            Some(l) => LevelChooser::fixed(l),
            None => LevelChooser::default(),
        };
        let (health2, stats2) = (health.clone(), stats.clone());
        tokio::task::spawn_blocking(move || {
            let result = encode_loop(input_rx, out_tx, &mut cache, levels, &stats2);
            if let Err(e) = result {
                health2.fail(e.to_string());
            }
            let _ = cache_tx.send(cache);
        });

        Ok(Sender {
            input: input_tx,
            health,
            stats,
            next_channel: AtomicU32::new(1),
            reverse,
            end_ack,
            cache_back: Mutex::new(Some(cache_rx)),
            store: store.clone(),
            cache_key: peer.to_string(),
        })
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The guest's pause may last `limit`: local reads are held to what the
    /// target can work off in what is left of it after the way there and a
    /// lost packet's round trip.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let rtt = Duration::from_micros(self.stats.rtt_us.load(Ordering::Relaxed));
        self.stats
            .raw_ahead_max
            .store(raw_ahead_max(limit, rtt), Ordering::Relaxed);
    }

    /// QEMU stopped the guest: from now on every byte it still has goes at
    /// once, however far behind the target is.
    pub fn release(&self) {
        self.stats.released.store(true, Ordering::Relaxed);
    }

    /// The reason the session failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.health.error()
    }

    /// Carries `io` (a local connection) to a new channel with this role.
    pub async fn open<S>(&self, role: Role, io: S) -> Result<u32, DwcpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let ch = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (rev_tx, mut rev_rx) = mpsc::channel::<Option<Vec<u8>>>(16);
        lock(&self.reverse).insert(ch, rev_tx);
        self.input
            .send(Input::Open(ch, role))
            .await
            .map_err(|_| self.closed())?;
        let (mut rd, mut wr) = tokio::io::split(io);
        let (input, health, stats) = (self.input.clone(), self.health.clone(), self.stats.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; READ_CHUNK];
            let mut unflushed = false;
            loop {
                if stats.raw_held() {
                    // Held: what we hold back of a record goes now, not after the wait.
                    if std::mem::take(&mut unflushed) && input.send(Input::Flush(ch)).await.is_err() {
                        return;
                    }
                    while stats.raw_held() {
                        tokio::select! {
                            _ = health.cancel.cancelled() => return,
                            _ = tokio::time::sleep(RAW_HELD_POLL) => {}
                        }
                    }
                }
                let read = async {
                    if unflushed {
                        tokio::time::timeout(FLUSH_AFTER, rd.read(&mut buf)).await.ok()
                    } else {
                        Some(rd.read(&mut buf).await)
                    }
                };
                let n = tokio::select! {
                    _ = health.cancel.cancelled() => return,
                    r = read => r,
                };
                let Some(n) = n else {
                    // Nothing more for a while: send the record we held back.
                    unflushed = false;
                    if input.send(Input::Flush(ch)).await.is_err() {
                        return;
                    }
                    continue;
                };
                match n {
                    Ok(0) => {
                        let _ = input.send(Input::Close(ch)).await;
                        return;
                    }
                    Ok(n) => {
                        stats.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let more = n >= MORE_COMING;
                        unflushed = more;
                        if input.send(Input::Data(ch, buf[..n].to_vec(), more)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(channel = ch, error = %e, "local connection read failed");
                        let _ = input.send(Input::Close(ch)).await;
                        return;
                    }
                }
            }
        });
        let cancel = self.health.cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = write_local(&mut rev_rx, &mut wr, &cancel).await {
                tracing::debug!(channel = ch, error = %e, "local connection write failed");
            }
        });
        Ok(ch)
    }

    /// A local Unix socket at `path` whose every connection becomes a channel
    /// with this role; it stops (and the socket file goes) with the session.
    /// Unix rather than loopback TCP: loopback buffers grow to megabytes that
    /// QEMU counts as sent, and all of them would cross the link during the
    /// switchover pause; a Unix socket holds only the writer's small buffer.
    pub fn listen(self: &Arc<Self>, role: Role, path: &Path) -> Result<(), DwcpError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let this = Arc::downgrade(self);
        let cancel = self.health.cancel.clone();
        let path = path.to_path_buf();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((conn, _)) = accepted else { continue };
                let Some(sender) = this.upgrade() else { break };
                if role == Role::Nbd {
                    // Answered here (see `nbd`); the handshake waits a round trip.
                    tokio::spawn(async move {
                        let (ours, theirs) = tokio::io::duplex(READ_CHUNK);
                        if let Err(e) = sender.open(role, theirs).await {
                            tracing::warn!(error = %e, "cannot open a DWCP disk channel");
                            return;
                        }
                        drop(sender);
                        if let Err(e) = crate::nbd::serve_source(conn, ours).await {
                            tracing::warn!(error = %e, "DWCP disk channel failed");
                        }
                    });
                } else if let Err(e) = sender.open(role, conn).await {
                    tracing::warn!(error = %e, "cannot open a DWCP channel");
                }
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(())
    }

    fn closed(&self) -> DwcpError {
        DwcpError::Session(self.error().unwrap_or_else(|| "session closed".into()))
    }

    /// Ends the session once everything sent so far is delivered; returns
    /// the final counters. The chunk cache is kept for the next session.
    pub async fn finish(&self, timeout: Duration) -> Result<StatsSnapshot, DwcpError> {
        let notified = self.end_ack.clone();
        let wait = notified.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        self.input.send(Input::End).await.map_err(|_| self.closed())?;
        tokio::select! {
            _ = &mut wait => {}
            _ = self.health.cancel.cancelled() => return Err(self.closed()),
            _ = tokio::time::sleep(timeout) => return Err(DwcpError::Session("the target did not confirm the end of the session".into())),
        }
        // The encoder stopped at End and hands the cache back.
        let rx = lock(&self.cache_back).take();
        if let Some(rx) = rx {
            let back = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)).ok()).await;
            if let Ok(Some(cache)) = back {
                self.store.put(&self.cache_key, cache);
            }
        }
        Ok(self.stats.snapshot())
    }

    /// Measures what the link delivers: sends incompressible bytes for
    /// `duration` on a probe channel and returns the delivered bytes/s.
    /// Stops after `max_bytes` (once they are delivered) so that a fast link
    /// is not flooded for the whole `duration`. When it runs long enough, the
    /// first third is left out: that is TCP's start-up, not what the link
    /// delivers to a migration that runs for seconds.
    ///
    /// With `fill`, the probe carries prefill pages (see [`Sender::prefill`])
    /// whenever one is ready, so the link time it takes is not lost. A little
    /// filler goes between them, cheap to encode, so that an encoder short of
    /// CPU does not pass for a slow link. Only worth it where the encoder
    /// outruns the link: otherwise this measures the encoder.
    pub async fn probe(
        &self,
        duration: Duration,
        max_bytes: u64,
        mut fill: Option<&mut mpsc::Receiver<Vec<u8>>>,
    ) -> Result<f64, DwcpError> {
        let (mut local, remote) = tokio::io::duplex(READ_CHUNK);
        self.open(Role::Probe, remote).await?;
        let mut prefill = match fill {
            Some(_) => {
                let (local, remote) = tokio::io::duplex(READ_CHUNK);
                self.open(Role::Prefill, remote).await?;
                Some(local)
            }
            None => None,
        };
        let start_acked = self.stats.acked_wire_bytes.load(Ordering::Relaxed);
        let start_wire = self.stats.wire_bytes.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        let acked_now = |s: &Stats| s.acked_wire_bytes.load(Ordering::Relaxed) - start_acked;
        let mut steady: Option<(Instant, u64)> = None;
        let mut mark = |stats: &Stats| {
            if steady.is_none() && started.elapsed() >= duration / 3 {
                steady = Some((Instant::now(), acked_now(stats)));
            }
        };
        while started.elapsed() < duration && written < max_bytes {
            mark(&self.stats);
            let page = fill.as_deref_mut().map(|rx| rx.try_recv());
            let mut filler = buf.len();
            if let (Some(Ok(chunk)), Some(out)) = (page, prefill.as_mut()) {
                self.write_channel(out, &chunk).await?;
                self.stats
                    .prefill_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                filler = PROBE_GAP;
            }
            let buf = &mut buf[..filler];
            written += buf.len() as u64;
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            self.write_channel(&mut local, buf).await?;
        }
        if written >= max_bytes {
            // Time until the target confirmed all of it.
            let sent = |s: &Stats| s.wire_bytes.load(Ordering::Relaxed) - start_wire;
            while started.elapsed() < duration * 2 {
                let acked = self.stats.acked_wire_bytes.load(Ordering::Relaxed) - start_acked;
                if acked >= sent(&self.stats) && acked >= max_bytes {
                    break;
                }
                mark(&self.stats);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if let Some(out) = prefill.as_mut() {
            let _ = out.shutdown().await;
        }
        let _ = local.shutdown().await;
        let acked = acked_now(&self.stats);
        let rate = match steady {
            Some((at, from)) if acked > from && at.elapsed() > duration / 4 => {
                (acked - from) as f64 / at.elapsed().as_secs_f64()
            }
            _ => acked as f64 / started.elapsed().as_secs_f64(),
        };
        Ok(rate)
    }

    /// Writes `bytes` into a channel's local end, unless the session fails first.
    async fn write_channel(&self, out: &mut tokio::io::DuplexStream, bytes: &[u8]) -> Result<(), DwcpError> {
        tokio::select! {
            r = out.write_all(bytes) => Ok(r?),
            _ = self.health.cancel.cancelled() => Err(self.closed()),
        }
    }

    /// Sends guest pages ahead of QEMU (RAM page records in QEMU's format, so
    /// they get the keys QEMU's pages will have): QEMU's own pass then finds
    /// them in the target's cache and sends references, or deltas for pages
    /// the guest changed since. Uses link time that would otherwise go unused
    /// (while the disks are mirrored); runs until `pages` ends or `stop` fires.
    pub async fn prefill(&self, mut pages: mpsc::Receiver<Vec<u8>>, stop: CancellationToken) -> Result<u64, DwcpError> {
        let (mut local, remote) = tokio::io::duplex(READ_CHUNK);
        self.open(Role::Prefill, remote).await?;
        let mut sent = 0u64;
        loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => break,
                c = pages.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
            };
            tokio::select! {
                r = local.write_all(&chunk) => r?,
                _ = stop.cancelled() => break,
                _ = self.health.cancel.cancelled() => return Err(self.closed()),
            }
            sent += chunk.len() as u64;
            self.stats
                .prefill_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = local.shutdown().await;
        Ok(sent)
    }
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

fn encode_loop(
    mut input: mpsc::Receiver<Input>,
    out: mpsc::Sender<Frame>,
    cache: &mut ChunkCache,
    levels: LevelChooser,
    stats: &Stats,
) -> Result<(), DwcpError> {
    let mut encoder = Encoder::new(levels);
    let mut channels: HashMap<u32, (Scanner, Vec<u8>)> = HashMap::new();
    let mut seq = 0u64;
    let mut send = |kind: Kind, ch: u32, payload: Vec<u8>| -> Result<(), DwcpError> {
        let f = Frame::new(kind, ch, seq, payload);
        seq += 1;
        out.blocking_send(f)
            .map_err(|_| DwcpError::Session("the streams are gone".into()))
    };
    while let Some(msg) = input.blocking_recv() {
        match msg {
            Input::Open(ch, role) => {
                channels.insert(ch, (Scanner::new(role), Vec::new()));
                send(Kind::Open, ch, vec![role as u8])?;
            }
            Input::Data(ch, bytes, more) => {
                let Some((scanner, pending)) = channels.get_mut(&ch) else {
                    continue;
                };
                pending.extend_from_slice(&bytes);
                encoder
                    .levels
                    .set_link(f64::from_bits(stats.wire_rate.load(Ordering::Relaxed)));
                let block = encode_pending(&mut encoder, cache, ch, scanner, pending, more)?;
                if let Some(b) = block {
                    send(Kind::Data, ch, b)?;
                }
            }
            Input::Flush(ch) | Input::Close(ch) => {
                let close = matches!(msg, Input::Close(_));
                if let Some((scanner, pending)) = channels.get_mut(&ch) {
                    if let Some(b) = encode_pending(&mut encoder, cache, ch, scanner, pending, false)? {
                        send(Kind::Data, ch, b)?;
                    }
                }
                if close {
                    channels.remove(&ch);
                    send(Kind::Close, ch, Vec::new())?;
                }
            }
            Input::End => {
                send(Kind::End, 0, Vec::new())?;
                break;
            }
        }
        let s = encoder.stats;
        stats.pages.store(s.pages, Ordering::Relaxed);
        stats.pages_ref.store(s.pages_ref, Ordering::Relaxed);
        stats.pages_delta.store(s.pages_delta, Ordering::Relaxed);
        stats.zstd_level.store(encoder.levels.level() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Encodes what the scanner can take from `pending` (all of it unless `more`).
fn encode_pending(
    encoder: &mut Encoder,
    cache: &mut ChunkCache,
    ch: u32,
    scanner: &mut Scanner,
    pending: &mut Vec<u8>,
    more: bool,
) -> Result<Option<Vec<u8>>, DwcpError> {
    if pending.is_empty() {
        return Ok(None);
    }
    let (segments, used) = scanner.scan(pending, more);
    if used == 0 {
        return Ok(None);
    }
    // Guest RAM is one key space whichever channel carries it (QEMU's, or a
    // prefill); each disk channel is its own. Channel numbers start at 1.
    let space = match scanner.role() {
        Role::Migration | Role::Prefill => 0,
        Role::Nbd | Role::Probe => ch,
    };
    let block = encoder.encode(cache, space, &pending[..used], &segments, scanner.role() != Role::Probe)?;
    pending.drain(..used);
    Ok(Some(block))
}

/// EWMA of delivery rates from the target's cumulative acks.
#[derive(Default)]
struct RateMeter {
    last: Option<(Instant, u64, u64)>,
    wire: f64,
    raw: f64,
}

impl RateMeter {
    fn update(&mut self, wire: u64, raw: u64) -> Option<(f64, f64)> {
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

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = (rate * 0.05).max(256.0 * 1024.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    async fn take(bucket: &tokio::sync::Mutex<Bucket>, n: usize) {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ================================================================= receiver

/// Where the target connects each role's channels for one session.
pub type Routes = HashMap<Role, SocketAddr>;

/// What a joining stream needs of its session.
#[derive(Clone)]
struct SessionEntry {
    frames: mpsc::Sender<Frame>,
    wire: Arc<AtomicU64>,
    health: Arc<Health>,
}

/// The target end: one listener for all sessions, routed by session name.
#[derive(Clone)]
pub struct Receiver {
    routes: Arc<Mutex<HashMap<String, Routes>>>,
    sessions: Arc<Mutex<HashMap<String, SessionEntry>>>,
    /// How each expected session's disk channels stand.
    disks: Arc<Mutex<HashMap<String, Tally>>>,
    store: CacheStore,
    bbr: bool,
}

impl Receiver {
    pub fn new(store: CacheStore) -> Receiver {
        Receiver {
            routes: Arc::default(),
            sessions: Arc::default(),
            disks: Arc::default(),
            store,
            bbr: bbr_available(),
        }
    }

    /// Accept sessions named `session`, connecting their channels per `routes`.
    pub fn expect(&self, session: &str, routes: Routes) {
        lock(&self.routes).insert(session.to_string(), routes);
        lock(&self.disks).insert(session.to_string(), Arc::default());
    }

    pub fn forget(&self, session: &str) {
        lock(&self.routes).remove(session);
        lock(&self.disks).remove(session);
    }

    /// Waits until `disks` disk channels of `session` have settled: each one's
    /// mirror closed it and the target's export confirmed every request it
    /// carried (see [`crate::nbd`]). Only then may the target VM use its disks.
    pub async fn disks_settled(&self, session: &str, disks: usize, timeout: Duration) -> Result<(), DwcpError> {
        let tally = lock(&self.disks).get(session).cloned();
        let tally = tally.ok_or_else(|| DwcpError::Session(format!("no DWCP session {session:?} expected here")))?;
        let mut watch = tally.subscribe();
        let waited = tokio::time::timeout(timeout, watch.wait_for(|t| t.failed.is_some() || t.settled >= disks)).await;
        let tally = match waited {
            Ok(Ok(t)) => t.clone(),
            Ok(Err(_)) => return Err(DwcpError::Session("the session went away".into())),
            Err(_) => {
                let t = tally.borrow().clone();
                return Err(DwcpError::Session(format!(
                    "{} of {disks} disks settled on the target after {}s ({} opened)",
                    t.settled,
                    timeout.as_secs(),
                    t.opened
                )));
            }
        };
        match tally.failed {
            Some(why) => Err(DwcpError::Session(why)),
            None => Ok(()),
        }
    }

    /// Serves sessions on `listener` until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, tls: Arc<rustls::ServerConfig>, shutdown: CancellationToken) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, from)) = accepted else { continue };
            tune_socket(&tcp, self.bbr);
            let _ = tcp.set_nodelay(true);
            let (this, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%from, error = %e, "DWCP TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                if let Err(e) = this.stream(stream).await {
                    tracing::warn!(%from, error = %e, "DWCP stream refused");
                }
            });
        }
    }

    async fn stream<S>(&self, mut stream: S) -> Result<(), DwcpError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let hello = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
            .await
            .map_err(|_| DwcpError::Handshake("no hello".into()))??
            .filter(|f| f.kind == Kind::Hello)
            .ok_or_else(|| DwcpError::Handshake("first frame is not a hello".into()))?;
        let mut r = PayloadReader::new(&hello.payload);
        if r.u8()? != PROTOCOL_VERSION {
            return Err(DwcpError::Handshake("unsupported protocol version".into()));
        }
        let (session, node, index) = (r.string()?, r.string()?, r.u32()?);
        let (cache_id, cache_ops, capacity) = (r.u64()?, r.u64()?, r.u64()? as usize);
        if index > 0 {
            let entry = lock(&self.sessions).get(&session).cloned();
            let entry = entry.ok_or_else(|| DwcpError::Handshake(format!("no session {session:?} to join")))?;
            // Nothing goes back on the extra streams; they close with the session.
            tokio::spawn(async move {
                let SessionEntry { frames, wire, health } = entry;
                tokio::select! {
                    _ = health.cancel.cancelled() => {}
                    r = read_frames(&mut stream, frames, None, wire) => match r {
                        Err(e) => health.fail(format!("stream {index}: {e}")),
                        Ok(()) => health.fail(format!("the source closed stream {index}")),
                    },
                }
            });
            return Ok(());
        }
        let capacity = capacity.min(self.store.capacity());
        let key = format!("from:{node}");
        let mut cache = self.store.take(&key);
        let reused = cache.id == cache_id && cache.ops == cache_ops && cache.capacity() == capacity;
        if !reused {
            cache.clear(new_cache_id(), capacity);
        }
        let mut ack = cache.id.to_be_bytes().to_vec();
        ack.push(reused as u8);
        ack.extend_from_slice(&(capacity as u64).to_be_bytes());
        write_frame(&mut stream, &Frame::new(Kind::HelloAck, 0, 0, ack)).await?;

        let (frames_tx, frames_rx) = mpsc::channel::<Frame>(64);
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (back_tx, mut back_rx) = mpsc::channel::<Frame>(64);
        let health = Arc::new(Health::default());
        let wire = Arc::new(AtomicU64::new(0));
        lock(&self.sessions).insert(
            session.clone(),
            SessionEntry {
                frames: frames_tx.clone(),
                wire: wire.clone(),
                health: health.clone(),
            },
        );
        // Stream 0 writer: pongs, reverse bytes, acks.
        let h2 = health.clone();
        tokio::spawn(async move {
            while let Some(f) = back_rx.recv().await {
                if write_frame(&mut wr, &f).await.is_err() {
                    h2.fail("stream 0 broke while answering");
                    return;
                }
            }
        });
        tokio::spawn({
            let (frames_tx, back_tx, health, wire) = (frames_tx.clone(), back_tx.clone(), health.clone(), wire.clone());
            async move {
                tokio::select! {
                    _ = health.cancel.cancelled() => {}
                    r = read_frames(&mut rd, frames_tx, Some(back_tx), wire) => match r {
                        Err(e) => health.fail(format!("stream 0: {e}")),
                        Ok(()) => health.fail("the source closed stream 0"),
                    },
                }
            }
        });
        drop(frames_tx);
        let assembler = Assembler {
            routes: self.routes.clone(),
            disks: self.disks.clone(),
            session: session.clone(),
            back: back_tx.clone(),
            health: health.clone(),
            wire,
        };
        let result = assembler.run(frames_rx, &mut cache).await;
        lock(&self.sessions).remove(&session);
        match result {
            Ok(()) => {
                self.store.put(&key, cache);
                tracing::info!(session = %session, "DWCP session done");
            }
            Err(e) => {
                health.fail(e.to_string());
                if let Some(tally) = lock(&self.disks).get(&session) {
                    tally.send_modify(|t| {
                        t.failed.get_or_insert_with(|| e.to_string());
                    });
                }
                let _ = back_tx
                    .send(Frame::new(Kind::Abort, 0, 0, e.to_string().into_bytes()))
                    .await;
                // Our cache may be ahead of or behind the sender's: start afresh next time.
                tracing::warn!(session = %session, error = %e, "DWCP session failed");
            }
        }
        // Give the answers a moment to leave, then close everything.
        tokio::time::sleep(Duration::from_millis(200)).await;
        health.cancel.cancel();
        Ok(())
    }
}

/// Reads a stream's frames into the session: pings are answered here,
/// everything ordered goes to the assembler.
async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: mpsc::Sender<Frame>,
    back: Option<mpsc::Sender<Frame>>,
    wire: Arc<AtomicU64>,
) -> Result<(), DwcpError> {
    while let Some(f) = read_frame(rd).await? {
        wire.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
        if matches!(f.kind, Kind::Open | Kind::Data | Kind::Close | Kind::End) {
            if tx.send(f).await.is_err() {
                return Ok(());
            }
            continue;
        }
        match f.kind {
            Kind::Ping => {
                if let Some(b) = &back {
                    let _ = b.send(Frame::new(Kind::Pong, 0, f.seq, Vec::new())).await;
                }
            }
            Kind::Abort => {
                return Err(DwcpError::Session(format!(
                    "source: {}",
                    String::from_utf8_lossy(&f.payload)
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

struct Assembler {
    /// Looked up when a channel opens: a session may start (and probe the
    /// link) before the target knows where its migration's channels go.
    routes: Arc<Mutex<HashMap<String, Routes>>>,
    /// Where sessions' disk channels report (see [`Receiver::disks_settled`]),
    /// looked up like the routes.
    disks: Arc<Mutex<HashMap<String, Tally>>>,
    session: String,
    back: mpsc::Sender<Frame>,
    health: Arc<Health>,
    wire: Arc<AtomicU64>,
}

enum Sink {
    Conn(mpsc::Sender<Option<Vec<u8>>>),
    Discard,
}

impl Assembler {
    async fn run(&self, mut frames: mpsc::Receiver<Frame>, cache: &mut ChunkCache) -> Result<(), DwcpError> {
        let mut waiting: BTreeMap<u64, Frame> = BTreeMap::new();
        let mut next = 0u64;
        let mut sinks: HashMap<u32, Sink> = HashMap::new();
        let mut raw = 0u64;
        let mut last_ack = Instant::now();
        let mut unacked = false;
        let mut out = Vec::with_capacity(READ_CHUNK * 2);
        loop {
            let frame = tokio::select! {
                _ = self.health.cancel.cancelled() => {
                    return Err(DwcpError::Session(self.health.error().unwrap_or_else(|| "cancelled".into())));
                }
                f = frames.recv() => f,
                // A quiet moment: confirm what arrived, so the sender's measurements are not stale.
                _ = tokio::time::sleep(ACK_EVERY), if unacked => {
                    unacked = false;
                    last_ack = Instant::now();
                    // Nothing else to do: wait for room rather than lose the last ack.
                    let _ = self.back.send(self.ack_frame(raw)).await;
                    continue;
                }
            };
            unacked = true;
            let Some(frame) = frame else {
                return Err(DwcpError::Session(
                    "the source closed the session before its end".into(),
                ));
            };
            if frame.seq < next || waiting.contains_key(&frame.seq) {
                return Err(DwcpError::Corrupt(format!("frame {} arrived twice", frame.seq)));
            }
            waiting.insert(frame.seq, frame);
            while let Some(frame) = waiting.remove(&next) {
                next += 1;
                match frame.kind {
                    Kind::Open => {
                        let role = frame
                            .payload
                            .first()
                            .and_then(|&r| Role::from_u8(r))
                            .ok_or_else(|| DwcpError::Corrupt("open without a role".into()))?;
                        let sink = self.connect(frame.channel, role).await?;
                        sinks.insert(frame.channel, sink);
                    }
                    Kind::Data => {
                        out.clear();
                        decode(cache, &frame.payload, &mut out)?;
                        raw += out.len() as u64;
                        match sinks.get(&frame.channel) {
                            Some(Sink::Conn(tx)) => {
                                if tx.send(Some(std::mem::take(&mut out))).await.is_err() {
                                    return Err(DwcpError::Session(format!(
                                        "the local end of channel {} went away",
                                        frame.channel
                                    )));
                                }
                            }
                            Some(Sink::Discard) => {}
                            None => {
                                return Err(DwcpError::Corrupt(format!(
                                    "data for unknown channel {}",
                                    frame.channel
                                )))
                            }
                        }
                    }
                    Kind::Close => {
                        if let Some(Sink::Conn(tx)) = sinks.remove(&frame.channel) {
                            let _ = tx.send(None).await;
                        }
                    }
                    Kind::End => {
                        self.health.done.store(true, Ordering::Relaxed);
                        let _ = self.back.send(self.ack_frame(raw)).await;
                        let _ = self.back.send(Frame::new(Kind::EndAck, 0, 0, Vec::new())).await;
                        return Ok(());
                    }
                    _ => {}
                }
            }
            // Busy: an ack that finds no room is skipped (the next one says more).
            if last_ack.elapsed() >= ACK_EVERY && self.back.try_send(self.ack_frame(raw)).is_ok() {
                last_ack = Instant::now();
                unacked = false;
            }
        }
    }

    fn ack_frame(&self, raw: u64) -> Frame {
        let mut p = self.wire.load(Ordering::Relaxed).to_be_bytes().to_vec();
        p.extend_from_slice(&raw.to_be_bytes());
        Frame::new(Kind::Ack, 0, 0, p)
    }

    async fn connect(&self, ch: u32, role: Role) -> Result<Sink, DwcpError> {
        if matches!(role, Role::Probe | Role::Prefill) {
            return Ok(Sink::Discard);
        }
        let addr = lock(&self.routes)
            .get(&self.session)
            .and_then(|r| r.get(&role).copied())
            .ok_or_else(|| {
                DwcpError::Session(format!("session {:?} has no route for {role:?} channels", self.session))
            })?;
        let conn = TcpStream::connect(addr)
            .await
            .map_err(|e| DwcpError::Session(format!("cannot reach {addr} for {role:?}: {e}")))?;
        let _ = conn.set_nodelay(true);
        if role != Role::Nbd {
            return Ok(self.attach(ch, conn, addr.to_string()));
        }
        // Disk channels are replayed request by request (see `nbd`).
        let tally = lock(&self.disks)
            .get(&self.session)
            .cloned()
            .ok_or_else(|| DwcpError::Session(format!("session {:?} takes no disk channels", self.session)))?;
        let (ours, theirs) = tokio::io::duplex(READ_CHUNK);
        let health = self.health.clone();
        tokio::spawn(async move {
            let served = tokio::select! {
                _ = health.cancel.cancelled() => return,
                r = crate::nbd::serve_target(theirs, conn, &tally) => r,
            };
            // The session's failure marks the tally failed (see `Receiver::stream`).
            if let Err(e) = served {
                health.fail(e.to_string());
            }
        });
        Ok(self.attach(ch, ours, format!("the disk relay to {addr}")))
    }

    /// Connects channel `ch` to `local`: its bytes are written there, and what
    /// `local` answers goes back to the source.
    fn attach<S>(&self, ch: u32, local: S, what: String) -> Sink
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(local);
        let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(8);
        let health = self.health.clone();
        tokio::spawn(async move {
            if let Err(e) = write_local(&mut rx, &mut wr, &health.cancel).await {
                health.fail(format!("writing to {what}: {e}"));
                return;
            }
            // Keep the socket until the session ends (QEMU may still answer).
            health.cancel.cancelled().await;
        });
        let (back, health) = (self.back.clone(), self.health.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::select! {
                    _ = health.cancel.cancelled() => return,
                    r = rd.read(&mut buf) => r,
                };
                match n {
                    Ok(0) | Err(_) => {
                        let _ = back.send(Frame::new(Kind::ReverseClose, ch, 0, Vec::new())).await;
                        return;
                    }
                    Ok(n) => {
                        if back
                            .send(Frame::new(Kind::Reverse, ch, 0, buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Sink::Conn(tx)
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
