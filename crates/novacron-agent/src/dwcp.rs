//! This agent's end of DWCP: the listener other agents send migrations to,
//! the chunk caches for each peer, link measurements, and the guest-memory
//! sample the planner uses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_api::Node;
use novacron_dwcp::cache::chunk_hash;
use novacron_dwcp::{CacheStore, Hello, Receiver, Sender, SessionConfig};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// A link measurement stays good this long; after that a session probes again.
const LINK_FRESH: Duration = Duration::from_secs(600);
/// A probe lasts this many round trips, within the bounds below; its first
/// six, TCP start-up on a long fat link, do not count. Every round trip of it
/// is a fixed cost of the first migration to a peer (in time, and in link
/// bytes where no guest pages ride along).
const PROBE_RTTS: f64 = 15.0;
const PROBE_TIME: (Duration, Duration) = (Duration::from_millis(600), Duration::from_secs(3));
/// ... or this many bytes, whichever comes first (a LAN needs a fraction of a second).
const PROBE_BYTES: u64 = 32 << 20;
/// From this round trip on, a probe carries guest memory (filler only in
/// between): such links are slower than the encoder (a lan may not be), and
/// the probe's seconds are worth using.
const FILL_PROBE_RTT: Duration = Duration::from_millis(20);
/// Pages of guest memory sampled for the prediction.
const SAMPLE_PAGES: u64 = 512;

pub struct DwcpNode {
    pub receiver: Receiver,
    pub port: u16,
    client_tls: Arc<rustls::ClientConfig>,
    /// Sender-side caches, one per target node.
    senders: CacheStore,
    /// Last delivery rate measured to each peer (wire bytes/s).
    links: Mutex<HashMap<String, (Instant, f64)>>,
    node: String,
}

impl DwcpNode {
    /// Listens for DWCP sessions on `ip` (port chosen by the OS).
    pub async fn start(
        node: &str,
        ip: IpAddr,
        tls: &Arc<novacron_tls::LiveTls>,
        cache_bytes: usize,
        shutdown: CancellationToken,
    ) -> Result<Arc<DwcpNode>, String> {
        let server = tls
            .server_config(novacron_tls::ClientAuth::Required)
            .map_err(|e| e.to_string())?;
        let client = tls.client_config().map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|e| format!("cannot listen for DWCP on {ip}: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let receiver = Receiver::new(CacheStore::new(cache_bytes));
        tokio::spawn(receiver.clone().serve(listener, server, shutdown));
        tracing::info!(node, port, cache_mib = cache_bytes >> 20, "DWCP listening");
        Ok(Arc::new(DwcpNode {
            receiver,
            port,
            client_tls: Arc::new(client),
            senders: CacheStore::new(cache_bytes),
            links: Mutex::default(),
            node: node.to_string(),
        }))
    }

    /// Opens a session to `target`'s DWCP listener at `port`.
    pub async fn connect(
        &self,
        target: &Node,
        port: u16,
        session: &str,
        rate_limit_bytes_s: Option<u64>,
    ) -> Result<Arc<Sender>, PeerError> {
        let host = host_of(&target.spec.address).ok_or_else(|| PeerError::NoHost(target.spec.address.clone()))?;
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| PeerError::Resolve {
                host: host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| PeerError::NoAddress(host.clone()))?;
        let sender = Sender::connect(
            addr,
            &host,
            self.client_tls.clone(),
            Hello {
                session: session.to_string(),
                node: self.node.clone(),
            },
            &self.senders,
            &target.metadata.name,
            SessionConfig {
                rate_limit_bytes_s,
                ..Default::default()
            },
        )
        .await?;
        Ok(Arc::new(sender))
    }

    /// What the link to `peer` delivers (wire bytes/s): the last measurement
    /// if fresh, else a probe over `sender`, which carries `fill` (guest pages
    /// sent ahead) when the link is long enough that the encoder outruns it.
    pub async fn link_rate(
        &self,
        peer: &str,
        sender: &Sender,
        fill: Option<&mut tokio::sync::mpsc::Receiver<Vec<u8>>>,
    ) -> Result<f64, novacron_dwcp::DwcpError> {
        if let Some((at, rate)) = self.links.lock().get(peer).copied() {
            if at.elapsed() < LINK_FRESH && rate > 0.0 {
                return Ok(rate);
            }
        }
        let rtt = Duration::from_secs_f64(sender.stats().rtt_ms / 1e3);
        let fill = fill.filter(|_| rtt >= FILL_PROBE_RTT);
        let rate = sender
            .probe(
                rtt.mul_f64(PROBE_RTTS).clamp(PROBE_TIME.0, PROBE_TIME.1),
                PROBE_BYTES,
                fill,
            )
            .await?;
        self.remember_link(peer, rate);
        Ok(rate)
    }

    pub fn remember_link(&self, peer: &str, wire_bytes_s: f64) {
        if wire_bytes_s > 0.0 {
            self.links
                .lock()
                .insert(peer.to_string(), (Instant::now(), wire_bytes_s));
        }
    }

    /// Samples the guest memory of QEMU `pid` (`ram_bytes` of RAM): share of
    /// zero pages, wire bytes per byte of the rest after zstd, and share of
    /// pages the target already holds (our copy of its cache says which).
    pub fn sample_memory(&self, pid: u32, ram_bytes: u64, peer: &str) -> Option<MemorySample> {
        let cache = self.senders.take(peer);
        let sample = sample_guest(pid, ram_bytes, |page| cache.contains(&chunk_hash(page)));
        self.senders.put(peer, cache);
        sample
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemorySample {
    pub zero_share: f64,
    /// zstd output / input for the non-zero pages sampled.
    pub compression: f64,
    /// How fast zstd took them (input bytes/s on one core).
    pub compress_bytes_s: f64,
    pub known_share: f64,
    /// The non-zero pages sampled (page number, content), to see later how
    /// the guest rewrites them.
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// Reads `SAMPLE_PAGES` pages spread over the guest's RAM from
/// `/proc/PID/mem` (the smallest anonymous mapping at least `ram_bytes`
/// long: the guest's RAM, not a larger reservation).
/// None when QEMU's memory cannot be read (then the planner assumes the worst).
pub fn sample_guest(pid: u32, ram_bytes: u64, known: impl Fn(&[u8]) -> bool) -> Option<MemorySample> {
    use std::os::unix::fs::FileExt;
    let (mem, start) = open_guest_ram(pid, ram_bytes)?;
    let pages = ram_bytes / 4096;
    let step = (pages / SAMPLE_PAGES).max(1);
    let (mut zero, mut known_pages, mut total) = (0u64, 0u64, 0u64);
    let mut nonzero = Vec::new();
    let mut pages_kept = Vec::new();
    let mut page = vec![0u8; 4096];
    // A fixed odd stride with an offset spreads samples without a pattern.
    for i in 0..SAMPLE_PAGES.min(pages) {
        let index = (i * step + (i * 7919) % step) % pages;
        if mem.read_exact_at(&mut page, start + index * 4096).is_err() {
            return None;
        }
        total += 1;
        if page.iter().all(|&b| b == 0) {
            zero += 1;
        } else {
            pages_kept.push((index, page.clone()));
            if known(&page) {
                known_pages += 1;
            } else {
                nonzero.extend_from_slice(&page);
            }
        }
    }
    if total == 0 {
        return None;
    }
    let started = std::time::Instant::now();
    let compression = if nonzero.is_empty() {
        1.0
    } else {
        zstd::bulk::compress(&nonzero, 3)
            .map(|c| (c.len() as f64 / nonzero.len() as f64).min(1.0))
            .unwrap_or(1.0)
    };
    let compress_bytes_s = match started.elapsed().as_secs_f64() {
        t if t > 0.0 && !nonzero.is_empty() => nonzero.len() as f64 / t,
        _ => f64::INFINITY,
    };
    let nonzero_pages = total - zero;
    Some(MemorySample {
        zero_share: zero as f64 / total as f64,
        compression,
        compress_bytes_s,
        known_share: if nonzero_pages > 0 {
            known_pages as f64 / nonzero_pages as f64
        } else {
            0.0
        },
        pages: pages_kept,
    })
}

/// Wire bytes per byte of a rewritten page, from the sampled pages as the
/// guest holds them now (`novacron_dwcp::plan::rewrite_cost`). None when
/// QEMU's memory cannot be read, or too few pages changed to say.
pub fn rewrite_cost(pid: u32, ram_bytes: u64, sample: &MemorySample) -> Option<f64> {
    use std::os::unix::fs::FileExt;
    let (mem, start) = open_guest_ram(pid, ram_bytes)?;
    let mut now = Vec::with_capacity(sample.pages.len());
    for (index, _) in &sample.pages {
        let mut page = vec![0u8; 4096];
        mem.read_exact_at(&mut page, start + index * 4096).ok()?;
        now.push(page);
    }
    let pages = sample
        .pages
        .iter()
        .zip(&now)
        .map(|((_, before), now)| (&before[..], &now[..]));
    novacron_dwcp::plan::rewrite_cost(pages, sample.compression)
}

/// QEMU's `/proc/PID/mem` and the address of the guest's RAM in it (the
/// smallest anonymous mapping at least `ram_bytes` long).
fn open_guest_ram(pid: u32, ram_bytes: u64) -> Option<(std::fs::File, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let start = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3);
            let (a, b) = range.split_once('-')?;
            let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
            (perms.starts_with("rw") && path.is_none() && b - a >= ram_bytes).then_some((b - a, a))
        })
        .min()?
        .1;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    Some((mem, start))
}

/// The guest's non-zero pages as QEMU RAM page records, read on demand
/// (the reader waits while nobody takes them).
pub fn guest_pages(pid: u32, ram_bytes: u64) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || read_guest_pages(pid, ram_bytes, &tx));
    rx
}

/// Starts sending the rest of `pages` ahead of QEMU over `session`
/// (`Sender::prefill`); cancelling the returned token stops it.
pub fn start_prefill(session: Arc<Sender>, pages: tokio::sync::mpsc::Receiver<Vec<u8>>, vm: &str) -> CancellationToken {
    let stop = CancellationToken::new();
    let (halt, vm) = (stop.clone(), vm.to_string());
    tokio::spawn(async move {
        match session.prefill(pages, halt).await {
            Ok(bytes) => tracing::info!(vm = %vm, mib = bytes >> 20, "guest memory sent ahead of QEMU"),
            Err(e) => tracing::debug!(vm = %vm, error = %e, "sending guest memory ahead stopped"),
        }
    });
    stop
}

/// Reads the guest's RAM in address order and hands on its non-zero pages
/// (QEMU sends zero pages as a flag anyway) as QEMU's RAM page records of
/// the `pc.ram` block, until `tx` closes.
fn read_guest_pages(pid: u32, ram_bytes: u64, tx: &tokio::sync::mpsc::Sender<Vec<u8>>) {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 256 * 1024;
    /// QEMU's name for the RAM of a `pc` machine.
    const BLOCK: &[u8] = b"pc.ram";
    let Some((mem, start)) = open_guest_ram(pid, ram_bytes) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK as usize];
    for at in (0..ram_bytes).step_by(CHUNK as usize) {
        // Each chunk names the block: a chunk may start a channel (the probe
        // carries the first ones, a later channel the rest).
        let mut first = true;
        let n = CHUNK.min(ram_bytes - at) as usize;
        if mem.read_exact_at(&mut buf[..n], start + at).is_err() {
            return;
        }
        let mut records = Vec::with_capacity(n + n / 64);
        for (i, page) in buf[..n].chunks_exact(4096).enumerate() {
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            novacron_dwcp::scan::push_ram_page(&mut records, BLOCK, first, at + i as u64 * 4096, page);
            first = false;
        }
        if !records.is_empty() && tx.blocking_send(records).is_err() {
            return;
        }
    }
}

/// Why a DWCP session to a peer agent could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("This agent has no cluster certificate (plain-HTTP cluster)")]
    NoCertificate,
    #[error("No host in agent address {0:?}")]
    NoHost(String),
    #[error("Cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} has no address")]
    NoAddress(String),
    #[error("Cannot ask {node} for its DWCP port")]
    Ask {
        node: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Node {node} does not offer DWCP ({status})")]
    NotOffered { node: String, status: u16 },
    #[error("Session")]
    Session(#[from] novacron_dwcp::DwcpError),
}

/// Host part of an agent URL (`https://host:port`), bare (`::1` for IPv6).
pub fn host_of(address: &str) -> Option<String> {
    novacron_tls::bare_host(&url::Url::parse(address).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_agent_urls() {
        assert_eq!(host_of("https://10.99.0.2:8421").as_deref(), Some("10.99.0.2"));
        assert_eq!(
            host_of("https://node-1.example:8421/").as_deref(),
            Some("node-1.example")
        );
        assert_eq!(host_of("https://[::1]:8421").as_deref(), Some("::1"));
        assert_eq!(host_of("10.99.0.2:8421"), None);
    }

    #[test]
    fn samples_our_own_memory() {
        // Our own process: its heap holds a large zeroed buffer and some text.
        let mut buf = vec![0u8; 64 << 20];
        for (i, b) in buf.iter_mut().enumerate().take(16 << 20) {
            *b = b"hello world "[i % 12];
        }
        std::hint::black_box(&buf);
        let s = sample_guest(std::process::id(), 64 << 20, |_| false);
        let Some(s) = s else {
            // Reading /proc/self/mem can be forbidden (e.g. by a sandbox); nothing to check then.
            return;
        };
        assert!(s.zero_share > 0.0 && s.zero_share < 1.0, "{s:?}");
        assert!(s.compression < 0.5, "{s:?}");
    }

    /// The probe takes some chunks and a later channel the rest, so every
    /// chunk must read as pages to a scanner that starts with it.
    #[test]
    fn each_chunk_of_guest_pages_stands_alone() {
        let mut buf = vec![0u8; 64 << 20];
        for (i, b) in buf.iter_mut().enumerate().take(4 << 20) {
            *b = (i % 251) as u8 | 1;
        }
        std::hint::black_box(&buf);
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reader = std::thread::spawn(move || read_guest_pages(std::process::id(), 64 << 20, &tx));
        let mut chunks = 0;
        while let Some(chunk) = rx.blocking_recv() {
            let mut scanner = novacron_dwcp::scan::Scanner::new(novacron_dwcp::Role::Prefill);
            let (segments, used) = scanner.scan(&chunk, false);
            assert_eq!(used, chunk.len());
            let pages = segments
                .iter()
                .filter(|s| matches!(s, novacron_dwcp::scan::Segment::Page { .. }))
                .count();
            // The first record names the block (7 bytes more), the rest continue it.
            assert_eq!(pages, (chunk.len() - 7) / (8 + 4096), "chunk {chunks}");
            chunks += 1;
        }
        let _ = reader.join();
        drop(buf);
        // Reading /proc/self/mem can be forbidden (e.g. by a sandbox); nothing to check then.
        if chunks > 0 {
            assert!(chunks >= 16, "4 MiB of pages come in 256 KiB chunks: {chunks}");
        }
    }
}
