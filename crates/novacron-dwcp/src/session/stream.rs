//! The TCP streams of a session (TLS 1.3 each): their socket options, how
//! the source connects them, and the tasks that write and read their frames.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::rate::{Bucket, RateMeter};
use super::{Health, ReverseSinks, Stats};
use crate::frame::{read_frame, write_frame, Frame, Kind, PayloadReader};
use crate::inflight::{self, Cap};
use crate::DwcpError;

/// A stream with nothing to send but bytes unacknowledged sends a small frame
/// after this long, a few times: should its last packets be lost, the acks of
/// these reveal it within a round trip, where TCP's tail-loss probe waits two.
/// At the switchover, the last packets of every stream are the guest's pause.
const TAIL_PROBE_AFTER: Duration = Duration::from_millis(10);
const TAIL_PROBES: u32 = 3;

/// Streams for a link with this round trip: long fat pipes need several TCP
/// connections to fill them quickly and to ride out losses; short ones one.
pub fn streams_for_rtt(rtt: Duration, max: usize) -> usize {
    (1 + rtt.as_millis() as usize / 30).clamp(1, max.max(1))
}

pub(super) fn tune_socket(sock: &impl std::os::fd::AsFd, bbr: bool) {
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

pub(super) async fn connect_stream(
    addr: SocketAddr,
    name: &ServerName<'static>,
    tls: &TlsConnector,
    bbr: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DwcpError> {
    let tcp = connect_tcp(addr, bbr).await?;
    Ok(tls.connect(name.clone(), tcp).await?)
}

/// The TCP part of a stream's connection (its handshake is one round trip,
/// which the session takes as a first measure of the link's).
pub(super) async fn connect_tcp(addr: SocketAddr, bbr: bool) -> Result<TcpStream, DwcpError> {
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
    Ok(tcp)
}

/// The writer of the source's stream `i`: takes the next frame whenever its
/// socket has room.
pub(super) struct StreamWriter {
    pub(super) i: usize,
    /// Our own handle on the socket, for its TCP state and unsent limit.
    pub(super) fd: OwnedFd,
    /// The encoder's frames, shared by the writers of all streams.
    pub(super) frames: Arc<tokio::sync::Mutex<mpsc::Receiver<Frame>>>,
    pub(super) bucket: Option<Arc<tokio::sync::Mutex<Bucket>>>,
    pub(super) cap: Arc<Cap>,
    pub(super) health: Arc<Health>,
    pub(super) stats: Arc<Stats>,
}

impl StreamWriter {
    pub(super) async fn run<W: AsyncWrite + Unpin>(self, mut wr: W) {
        let StreamWriter {
            i,
            fd,
            frames,
            bucket,
            cap,
            health,
            stats,
        } = self;
        let mut unsent_limit = inflight::MAX_UNSENT;
        loop {
            tokio::select! {
                _ = health.cancel.cancelled() => return,
                _ = cap.room(&fd, &mut unsent_limit) => {}
            }
            let mut probes = 0;
            let frame = loop {
                let probe = probes < TAIL_PROBES && inflight::sending(&fd).is_some_and(|s| s.unacked > 0);
                tokio::select! {
                    _ = health.cancel.cancelled() => return,
                    f = async { frames.lock().await.recv().await } => break f,
                    _ = tokio::time::sleep(TAIL_PROBE_AFTER), if probe => {
                        probes += 1;
                        let ping = Frame::new(Kind::Ping, 0, 0, Vec::new());
                        if let Err(e) = write_frame(&mut wr, &ping).await {
                            health.fail(format!("stream {i} broke while sending: {e}"));
                            return;
                        }
                    }
                }
            };
            let Some(frame) = frame else { break };
            if let Some(b) = &bucket {
                Bucket::take(b, frame.wire_len()).await;
            }
            let sent = tokio::select! {
                _ = health.cancel.cancelled() => return,
                r = write_frame(&mut wr, &frame) => r,
            };
            if let Err(e) = sent {
                health.fail(format!("stream {i} broke while sending: {e}"));
                return;
            }
            stats.wire_bytes.fetch_add(frame.wire_len() as u64, Ordering::Relaxed);
        }
        // Keep the stream open until the session ends.
        health.cancel.cancelled().await;
    }
}

/// The reader of the source's stream `i`: stream 0 carries reverse bytes and
/// acks; on the others only the end of the stream is news.
pub(super) struct StreamReader {
    pub(super) i: usize,
    /// The link's round trip and the session's number of streams (for the cap).
    pub(super) rtt: Duration,
    pub(super) streams: usize,
    pub(super) reverse: ReverseSinks,
    pub(super) end_ack: Arc<tokio::sync::Notify>,
    pub(super) cap: Arc<Cap>,
    pub(super) health: Arc<Health>,
    pub(super) stats: Arc<Stats>,
}

impl StreamReader {
    pub(super) async fn run<R: AsyncRead + Unpin>(self, mut rd: R) {
        let StreamReader {
            i,
            rtt,
            streams,
            reverse,
            end_ack,
            cap,
            health,
            stats,
        } = self;
        let mut rates = RateMeter::default();
        loop {
            let frame = tokio::select! {
                _ = health.cancel.cancelled() => return,
                f = read_frame(&mut rd) => f,
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => {
                    health.fail(format!("the target closed stream {i}"));
                    return;
                }
                Err(e) => {
                    health.fail(format!("stream {i}: {e}"));
                    return;
                }
            };
            match frame.kind {
                Kind::Reverse | Kind::ReverseClose => {
                    let tx = reverse.lock().get(&frame.channel).cloned();
                    if let Some(tx) = tx {
                        let msg = (frame.kind == Kind::Reverse).then_some(frame.payload);
                        let _ = tx.send(msg).await;
                    }
                }
                Kind::Ack => {
                    let mut r = PayloadReader::new(&frame.payload);
                    if let (Ok(wire), Ok(raw)) = (r.u64(), r.u64()) {
                        stats.acked_wire_bytes.store(wire, Ordering::Relaxed);
                        stats.acked_raw_bytes.store(raw, Ordering::Relaxed);
                        if let Some((w, r)) = rates.update(wire, raw) {
                            stats.wire_rate.store(w.to_bits(), Ordering::Relaxed);
                            stats.raw_rate.store(r.to_bits(), Ordering::Relaxed);
                            cap.set(w, rtt, streams);
                            tracing::trace!(smoothed = w, "delivery rate");
                        }
                    }
                }
                Kind::Abort => {
                    health.fail(format!("target: {}", String::from_utf8_lossy(&frame.payload)));
                    return;
                }
                Kind::EndAck => {
                    health.done.store(true, Ordering::Relaxed);
                    end_ack.notify_one();
                }
                _ => {}
            }
        }
    }
}

/// Reads a stream's frames into the session: pings are answered here,
/// everything ordered goes to the assembler.
pub(super) async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: mpsc::Sender<Frame>,
    back: Option<mpsc::Sender<Frame>>,
    wire: Arc<AtomicU64>,
) -> Result<(), DwcpError> {
    while let Some(f) = read_frame(rd).await? {
        // Tail probes are not counted on either side: acks confirm what the
        // source counts as sent, and nothing acks a ping after the last data.
        if f.kind != Kind::Ping {
            wire.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
        }
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
