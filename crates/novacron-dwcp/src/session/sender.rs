//! The source end of a session: reads the local connections, encodes what
//! they carry on a thread of its own and hands the frames to the streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::rate::{raw_ahead_max, Bucket};
use super::stream::{bbr_available, connect_stream, connect_tcp, streams_for_rtt, StreamReader, StreamWriter};
use super::{hello_frame, write_local, Health, Hello, ReverseSinks, SessionConfig, Stats, StatsSnapshot, READ_CHUNK};
use crate::cache::{CacheStore, ChunkCache};
use crate::codec::{Encoder, LevelChooser};
use crate::frame::{read_frame, write_frame, Frame, Kind, PayloadReader};
use crate::inflight::Cap;
use crate::scan::{Role, Scanner};
use crate::DwcpError;

/// A read at least this large suggests more is queued behind it.
const MORE_COMING: usize = 32 * 1024;
/// A local connection idle this long gets its partial record flushed.
const FLUSH_AFTER: Duration = Duration::from_millis(20);
const RAW_HELD_POLL: Duration = Duration::from_millis(2);
/// The share of a probe's time TCP's start-up takes, left out of the rate.
const PROBE_WARMUP: f64 = 0.4;
/// Filler a probe sends after each chunk of prefill pages.
const PROBE_GAP: usize = 16 * 1024;

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
    /// What the streams may hold in flight.
    cap: Arc<Cap>,
    cache_back: Mutex<Option<std::sync::mpsc::Receiver<ChunkCache>>>,
    store: CacheStore,
    cache_key: String,
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.health.cancel.cancel();
    }
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
        // Each round trip here is one the migration waits for: the TCP
        // handshake measures the round trip, which picks the stream count, and
        // the other streams connect while the first one says hello.
        let connecting_first = Instant::now();
        let first_tcp = connect_tcp(addr, bbr).await?;
        let tcp_rtt = connecting_first.elapsed();
        let n = cfg
            .streams
            .unwrap_or_else(|| streams_for_rtt(tcp_rtt, cfg.max_streams))
            .max(1);
        let mut connecting = tokio::task::JoinSet::new();
        for i in 1..n {
            let (name, connector) = (name.clone(), connector.clone());
            connecting
                .spawn(async move { Ok::<_, DwcpError>((i, connect_stream(addr, &name, &connector, bbr).await?)) });
        }
        let mut first = connector.connect(name.clone(), first_tcp).await?;
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
        // Round trip: the better of the TCP handshake and the hello (which
        // includes the target's work on it).
        let rtt = tcp_rtt.min(hello_sent.elapsed());
        // The other streams join once the target knows the session.
        let mut more = Vec::with_capacity(n - 1);
        while let Some(joined) = connecting.join_next().await {
            let (i, mut s) = joined.map_err(|e| DwcpError::Handshake(format!("connecting a stream failed: {e}")))??;
            write_frame(&mut s, &hello_frame(&hello, i as u32, &cache)).await?;
            more.push((i, s));
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
            let (rd, wr) = tokio::io::split(s);
            let writer = StreamWriter {
                i,
                fd,
                frames: out_rx.clone(),
                bucket: bucket.clone(),
                cap: cap.clone(),
                health: health.clone(),
                stats: stats.clone(),
            };
            tokio::spawn(writer.run(wr));
            let reader = StreamReader {
                i,
                rtt,
                streams: n,
                reverse: reverse.clone(),
                end_ack: end_ack.clone(),
                cap: cap.clone(),
                health: health.clone(),
                stats: stats.clone(),
            };
            tokio::spawn(reader.run(rd));
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
            cap,
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

    /// The link is known to deliver `wire_bytes_s` (probed, or remembered
    /// from an earlier session): the streams are capped from now on instead
    /// of after their delivery rate stops growing, which a short session
    /// may never see before its switchover.
    pub fn assume_link(&self, wire_bytes_s: f64) {
        let rtt = Duration::from_micros(self.stats.rtt_us.load(Ordering::Relaxed));
        let streams = self.stats.streams.load(Ordering::Relaxed) as usize;
        self.cap.assume(wire_bytes_s, rtt, streams);
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
        self.reverse.lock().insert(ch, rev_tx);
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
        let rx = self.cache_back.lock().take();
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
    /// first 40% is left out: that is TCP's start-up (BBR's takes about five
    /// round trips), not what the link delivers to a migration that runs for
    /// seconds.
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
        // From 40% of the way in (the congestion window has opened) to
        // the last confirmation: a wait for the tail's ack is not link time.
        let mut steady: Option<(Instant, u64)> = None;
        let mut last = (started, 0u64);
        let mut mark = |stats: &Stats| {
            let acked = acked_now(stats);
            if acked > last.1 {
                last = (Instant::now(), acked);
            }
            if steady.is_none() && started.elapsed() >= duration.mul_f64(PROBE_WARMUP) {
                steady = Some(last);
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
        mark(&self.stats);
        let (last_at, acked) = last;
        let rate = match steady {
            Some((at, from)) if acked > from && last_at.duration_since(at) > duration / 4 => {
                (acked - from) as f64 / last_at.duration_since(at).as_secs_f64()
            }
            _ => acked as f64 / last_at.duration_since(started).as_secs_f64().max(1e-3),
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
