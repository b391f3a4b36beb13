//! Sessions between a sender and a receiver over real TLS on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use novacron_dwcp::{nbd, CacheStore, Hello, Receiver, Role, Sender, SessionConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Pki {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Result<Pki, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let ca = novacron_tls::ClusterCa::load_or_create(dir.path())?;
    let target = ca.issue("node-2", &["127.0.0.1".into(), "localhost".into()], None)?;
    let source = ca.issue("node-1", &["127.0.0.1".into()], None)?;
    let server = novacron_tls::server_config(&target, &ca.cert_pem, novacron_tls::ClientAuth::Required)?;
    let client = Arc::new(novacron_tls::client_config(&ca.cert_pem, Some(&source))?);
    Ok(Pki { client, server })
}

/// A QEMU-like RAM stream of `n` text pages whose content depends on `variant`.
fn qemu_stream(n: usize, variant: u32) -> Vec<u8> {
    let mut s = b"QEVM\0\0\0\x03".to_vec();
    for i in 0..n {
        let off = (i as u64) << 12;
        if i == 0 {
            s.extend_from_slice(&(off | 0x08).to_be_bytes());
            s.push(6);
            s.extend_from_slice(b"pc.ram");
        } else {
            s.extend_from_slice(&(off | 0x28).to_be_bytes());
        }
        s.extend_from_slice(&text_page(i, variant));
    }
    s.extend_from_slice(b"\x10device state");
    s
}

/// Page `i` of `qemu_stream`: hex digits of a per-page sequence, which
/// compress about 2:1, not more.
fn text_page(i: usize, variant: u32) -> Vec<u8> {
    let mut page = format!("hits={variant}\n").into_bytes();
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while page.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        page.extend_from_slice(format!("{x:016x}").as_bytes());
    }
    page.truncate(4096);
    page
}

/// A local server standing in for the target QEMU: collects what arrives
/// and answers `reply` once the stream ends.
async fn sink(reply: &'static [u8]) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<Vec<u8>>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        let Ok((mut c, _)) = l.accept().await else {
            return Vec::new();
        };
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got).await;
        let _ = c.write_all(reply).await;
        let _ = c.shutdown().await;
        got
    });
    Ok((addr, task))
}

/// A target QEMU's NBD export: a disk of `size` bytes in memory, returned
/// once the client disconnects.
async fn export(size: usize) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<Vec<u8>>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        let mut disk = vec![0u8; size];
        let Ok((c, _)) = l.accept().await else {
            return disk;
        };
        let (rd, mut wr) = c.into_split();
        let mut rd = tokio::io::BufReader::new(rd);
        let mut hello = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        hello.extend_from_slice(b"IHAVEOPT\0\x03");
        let _ = wr.write_all(&hello).await;
        let mut opt = [0u8; 20];
        let _ = rd.read_exact(&mut opt).await;
        let mut go = vec![0u8; u32::from_be_bytes([opt[16], opt[17], opt[18], opt[19]]) as usize];
        let _ = rd.read_exact(&mut go).await;
        let mut info = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        info.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        info.extend_from_slice(&(size as u64).to_be_bytes());
        info.extend_from_slice(&0x4du16.to_be_bytes());
        info.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
        info.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        let _ = wr.write_all(&info).await;
        let mut h = [0u8; 28];
        while rd.read_exact(&mut h).await.is_ok() {
            let cmd = u16::from_be_bytes([h[6], h[7]]);
            if cmd == 2 {
                break;
            }
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()) as usize;
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap_or_default()) as usize;
            if cmd == 1 {
                let _ = rd.read_exact(&mut disk[offset..offset + len]).await;
            }
            let mut reply = 0x6744_6698u32.to_be_bytes().to_vec();
            reply.extend_from_slice(&[0; 4]);
            reply.extend_from_slice(&h[8..16]);
            let _ = wr.write_all(&reply).await;
        }
        disk
    });
    Ok((addr, task))
}

/// Writes `disk` the way QEMU's mirror would: NBD through the session's
/// local socket at `path`, 64 KiB at a time, then flush and disconnect.
async fn mirror_through(sender: &Arc<Sender>, path: &std::path::Path, disk: &[u8]) -> std::io::Result<()> {
    sender
        .listen(Role::Nbd, path)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let conn = tokio::net::UnixStream::connect(path).await?;
    let (mut rd, mut wr) = conn.into_split();
    nbd::client_handshake(&mut rd, &mut wr, b"root")
        .await
        .map_err(std::io::Error::other)?;
    let request = |cmd: u16, offset: usize, len: usize| nbd::request(cmd, offset as u64, offset as u64, len as u32);
    let mut requests = 0;
    for (i, chunk) in disk.chunks(64 * 1024).enumerate() {
        wr.write_all(&request(1, i * 64 * 1024, chunk.len())).await?;
        wr.write_all(chunk).await?;
        requests += 1;
    }
    wr.write_all(&request(3, 0, 0)).await?;
    for _ in 0..=requests {
        let mut reply = [0u8; 16];
        rd.read_exact(&mut reply).await?;
        assert_eq!(reply[4..8], [0; 4], "answered without error");
    }
    wr.write_all(&request(2, 0, 0)).await?;
    Ok(())
}

async fn receiver(pki: &Pki, store: CacheStore) -> std::io::Result<(Receiver, SocketAddr, CancellationToken)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let r = Receiver::new(store);
    let stop = CancellationToken::new();
    tokio::spawn(r.clone().serve(l, pki.server.clone(), stop.clone()));
    Ok((r, addr, stop))
}

async fn send_through(sender: &Sender, role: Role, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (local, remote) = tokio::io::duplex(64 * 1024);
    sender
        .open(role, remote)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut back = Vec::new();
    let (mut rd, mut wr) = tokio::io::split(local);
    let w = async {
        wr.write_all(&data).await?;
        wr.shutdown().await
    };
    let r = rd.read_to_end(&mut back);
    let (a, b) = tokio::join!(w, r);
    a?;
    b?;
    Ok(back)
}

async fn session(
    pki: &Pki,
    addr: SocketAddr,
    store: &CacheStore,
    name: &str,
    streams: usize,
) -> Result<Sender, novacron_dwcp::DwcpError> {
    Sender::connect(
        addr,
        "127.0.0.1",
        pki.client.clone(),
        Hello {
            session: name.into(),
            node: "node-1".into(),
        },
        store,
        "node-2",
        SessionConfig {
            streams: Some(streams),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_arrive_intact_and_the_cache_outlives_the_session() -> TestResult {
    let pki = pki()?;
    let (rx_store, tx_store) = (CacheStore::new(256 << 20), CacheStore::new(256 << 20));
    let (receiver, addr, stop) = receiver(&pki, rx_store).await?;
    let data = qemu_stream(2000, 0);
    let mut wire = Vec::new();
    for (round, name) in ["m1", "m2"].into_iter().enumerate() {
        let (mig, mig_task) = sink(b"migration done").await?;
        let disk: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (nbd, nbd_task) = export(disk.len()).await?;
        receiver.expect(name, HashMap::from([(Role::Migration, mig), (Role::Nbd, nbd)]));
        let sender = Arc::new(session(&pki, addr, &tx_store, name, 3).await?);
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("nbd.sock");
        let (a, b) = tokio::join!(
            send_through(&sender, Role::Migration, data.clone()),
            mirror_through(&sender, &socket, &disk)
        );
        assert_eq!(a?, b"migration done", "reverse bytes of round {round}");
        b?;
        receiver.disks_settled(name, 1, Duration::from_secs(10)).await?;
        let stats = sender.finish(Duration::from_secs(10)).await?;
        assert_eq!(mig_task.await?, data, "migration bytes of round {round}");
        assert_eq!(nbd_task.await?, disk, "disk of round {round}");
        assert_eq!(stats.streams, 3);
        assert!(stats.pages >= 2000, "{stats:?}");
        wire.push(stats.wire_bytes);
        if round == 1 {
            assert!(stats.pages_ref >= 2000, "second session reuses the cache: {stats:?}");
        }
    }
    assert!(wire[1] * 5 < wire[0], "second migration sends far less: {wire:?}");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefilled_pages_travel_as_deltas() -> TestResult {
    let pki = pki()?;
    let (receiver, addr, stop) = receiver(&pki, CacheStore::new(64 << 20)).await?;
    let (mig, mig_task) = sink(b"").await?;
    receiver.expect("m", HashMap::from([(Role::Migration, mig)]));
    let sender = Arc::new(session(&pki, addr, &CacheStore::new(64 << 20), "m", 2).await?);
    // Pages in chunks of odd sizes; the source stays open until told to stop.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let halt = CancellationToken::new();
    let prefill = tokio::spawn({
        let (sender, halt) = (sender.clone(), halt.clone());
        async move { sender.prefill(rx, halt).await }
    });
    let pages = qemu_stream(1000, 0);
    for chunk in pages.chunks(37 * 4096) {
        tx.send(chunk.to_vec()).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline && sender.stats().prefill_bytes < pages.len() as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    halt.cancel();
    assert_eq!(prefill.await??, pages.len() as u64);
    // The guest changed every page a little since.
    let data = qemu_stream(1000, 1);
    send_through(&sender, Role::Migration, data.clone()).await?;
    let stats = sender.finish(Duration::from_secs(10)).await?;
    assert_eq!(mig_task.await?, data, "QEMU's bytes arrive intact");
    assert_eq!(stats.prefill_bytes, pages.len() as u64);
    assert!(stats.pages_delta >= 1000, "QEMU's pages went as deltas: {stats:?}");
    stop.cancel();
    Ok(())
}

/// A probe given pages to send ahead carries them instead of filler, and a
/// later prefill channel takes the rest where it stopped: QEMU's pass then
/// finds every page known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_carries_pages_ahead() -> TestResult {
    let pki = pki()?;
    let (receiver, addr, stop) = receiver(&pki, CacheStore::new(64 << 20)).await?;
    let (mig, mig_task) = sink(b"").await?;
    receiver.expect("pa", HashMap::from([(Role::Migration, mig)]));
    let sender = Arc::new(session(&pki, addr, &CacheStore::new(64 << 20), "pa", 2).await?);
    // Chunks of 50 pages, each naming its block (as the agent's reader does);
    // the second half only once the probe is over.
    let (tx, mut pages) = tokio::sync::mpsc::channel(2);
    let (probed, probe_over) = tokio::sync::oneshot::channel::<()>();
    let feeder = tokio::spawn(async move {
        let mut probe_over = Some(probe_over);
        for chunk in 0..20 {
            if chunk == 10 {
                if let Some(over) = probe_over.take() {
                    let _ = over.await;
                }
            }
            let mut records = Vec::new();
            for i in chunk * 50..(chunk + 1) * 50 {
                let page = text_page(i, 0);
                novacron_dwcp::scan::push_ram_page(&mut records, b"pc.ram", i % 50 == 0, (i as u64) << 12, &page);
            }
            if tx.send(records).await.is_err() {
                return;
            }
        }
    });
    // Loopback outruns 8 MiB long before the probe's time is up.
    sender.probe(Duration::from_secs(5), 8 << 20, Some(&mut pages)).await?;
    let during_probe = sender.stats().prefill_bytes;
    assert!(during_probe > 0, "the probe carried pages");
    let _ = probed.send(());
    let halt = CancellationToken::new();
    let rest = tokio::spawn({
        let (sender, halt) = (sender.clone(), halt.clone());
        async move { sender.prefill(pages, halt).await }
    });
    feeder.await?;
    rest.await??;
    let data = qemu_stream(1000, 0);
    send_through(&sender, Role::Migration, data.clone()).await?;
    let stats = sender.finish(Duration::from_secs(10)).await?;
    assert_eq!(mig_task.await?, data, "QEMU's bytes arrive intact");
    assert!(stats.prefill_bytes > during_probe, "the rest went after the probe");
    assert!(stats.prefill_bytes >= 1000 * 4096, "{stats:?}");
    assert!(stats.pages_ref >= 1000, "every page was known: {stats:?}");
    halt.cancel();
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_fails_the_session_and_closes_the_channels() -> TestResult {
    let pki = pki()?;
    let (receiver, addr, stop) = receiver(&pki, CacheStore::new(64 << 20)).await?;
    // A relay we can cut: the "network".
    let relay = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay.local_addr()?;
    let cut = CancellationToken::new();
    let cut2 = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = relay.accept().await {
            let cut = cut2.clone();
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(addr).await else {
                    return;
                };
                tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                }
            });
        }
    });
    let (mig, mig_task) = sink(b"").await?;
    receiver.expect("m-cut", HashMap::from([(Role::Migration, mig)]));
    let sender = session(&pki, relay_addr, &CacheStore::new(64 << 20), "m-cut", 2).await?;
    let (mut local, remote) = tokio::io::duplex(64 * 1024);
    sender.open(Role::Migration, remote).await?;
    local.write_all(&qemu_stream(100, 1)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cut.cancel();
    // The local end (QEMU's socket) must see the session end, not hang.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if local.write_all(&[0u8; 4096]).await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(10), local.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "local connection still open after the stream broke");
    let err = sender.error().unwrap_or_default();
    assert!(err.contains("stream"), "error names the stream: {err:?}");
    // The target side got a prefix of the data at most, and its connection closed.
    let got = tokio::time::timeout(Duration::from_secs(10), mig_task).await??;
    assert!(got.len() <= qemu_stream(100, 1).len() + 4096 * 4096);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_cluster_is_refused() -> TestResult {
    let pki = pki()?;
    let other = self::pki()?;
    let (_receiver, addr, stop) = receiver(&pki, CacheStore::new(1 << 20)).await?;
    let refused = session(&other, addr, &CacheStore::new(1 << 20), "x", 1).await;
    assert!(refused.is_err());
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_measures_delivery() -> TestResult {
    let pki = pki()?;
    let (_receiver, addr, stop) = receiver(&pki, CacheStore::new(1 << 20)).await?;
    let sender = session(&pki, addr, &CacheStore::new(1 << 20), "probe", 2).await?;
    let rate = sender.probe(Duration::from_millis(800), u64::MAX, None).await?;
    assert!(rate > 1e6, "loopback delivers more than 1 MB/s: {rate}");
    // With a byte cap the probe ends once those bytes are confirmed, long
    // before its time is up on a fast link.
    let started = std::time::Instant::now();
    let capped = sender.probe(Duration::from_secs(5), 8 << 20, None).await?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(capped > 2e6, "{capped}");
    sender.finish(Duration::from_secs(10)).await?;
    stop.cancel();
    Ok(())
}
