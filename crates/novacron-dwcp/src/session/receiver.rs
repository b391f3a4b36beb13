//! The target end of sessions: one listener for all of them; each session's
//! frames are put back in order, decoded and written to its local connections.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::stream::{bbr_available, read_frames, tune_socket};
use super::{write_local, Health, PROTOCOL_VERSION, READ_CHUNK};
use crate::cache::{new_cache_id, CacheStore, ChunkCache};
use crate::codec::decode;
use crate::frame::{read_frame, write_frame, Frame, Kind, PayloadReader};
use crate::nbd::Tally;
use crate::scan::Role;
use crate::DwcpError;

const ACK_EVERY: Duration = Duration::from_millis(20);

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
        self.routes.lock().insert(session.to_string(), routes);
        self.disks.lock().insert(session.to_string(), Arc::default());
    }

    pub fn forget(&self, session: &str) {
        self.routes.lock().remove(session);
        self.disks.lock().remove(session);
    }

    /// Waits until `disks` disk channels of `session` have settled: each one's
    /// mirror closed it and the target's export confirmed every request it
    /// carried (see [`crate::nbd`]). Only then may the target VM use its disks.
    pub async fn disks_settled(&self, session: &str, disks: usize, timeout: Duration) -> Result<(), DwcpError> {
        let tally = self.disks.lock().get(session).cloned();
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
            let entry = self.sessions.lock().get(&session).cloned();
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
        let (frames_tx, frames_rx) = mpsc::channel::<Frame>(64);
        let (back_tx, mut back_rx) = mpsc::channel::<Frame>(64);
        let health = Arc::new(Health::default());
        let wire = Arc::new(AtomicU64::new(0));
        // Known before the answer: the source's other streams join as soon as it has it.
        self.sessions.lock().insert(
            session.clone(),
            SessionEntry {
                frames: frames_tx.clone(),
                wire: wire.clone(),
                health: health.clone(),
            },
        );
        if let Err(e) = write_frame(&mut stream, &Frame::new(Kind::HelloAck, 0, 0, ack)).await {
            self.sessions.lock().remove(&session);
            return Err(e);
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
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
        self.sessions.lock().remove(&session);
        match result {
            Ok(()) => {
                self.store.put(&key, cache);
                tracing::info!(session = %session, "DWCP session done");
            }
            Err(e) => {
                health.fail(e.to_string());
                if let Some(tally) = self.disks.lock().get(&session) {
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
        let addr = self
            .routes
            .lock()
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
        let tally = self
            .disks
            .lock()
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
