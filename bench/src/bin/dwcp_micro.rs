//! DWCP micro-benchmarks (issue 6, point 7).
//!
//!   dwcp_micro goodput --lab NAME --profile P --rate-mbit R --json OUT
//!       (inside LAB-h1) transport goodput to LAB-h2 vs the link's capacity:
//!       DWCP with its adaptive stream count and with one stream, sending
//!       incompressible bytes for 8 s each.
//!   dwcp_micro serve --pki DIR --port N      (the receiving end, run in LAB-h2)
//!   dwcp_micro speed --json OUT [--profile P --run N]
//!       the machine's speed, recorded beside each WAN benchmark run: DWCP's
//!       encoder on web-like pages (zstd 3, one core), MB/s
//!   dwcp_micro render --goodput OUT --md OUT.md
//!       runs the codec benchmark (encode/decode MB/s on one core) and writes
//!       both tables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use novacron_bench::{append_jsonl, arg, read_jsonl};
use novacron_dwcp::cache::ChunkCache;
use novacron_dwcp::codec::{decode, Encoder, LevelChooser};
use novacron_dwcp::scan::{Role, Scanner, PAGE};
use novacron_dwcp::{CacheStore, Hello, Receiver, Sender, SessionConfig};
use serde_json::{json, Value};

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Pages like the guest workload's: HTML-like text, random data, and a
/// freshly booted guest's mix (mostly zero pages, some text).
fn pages(kind: &str, n: usize) -> Vec<Vec<u8>> {
    const WORDS: [&str; 16] = [
        "<div class=\"item\">",
        "</div>",
        "<li>",
        "price",
        "order",
        "customer",
        "session",
        "cart",
        "the",
        "and",
        "{\"id\":",
        "\"qty\":",
        "EUR",
        "available",
        "in stock",
        "\n",
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| match kind {
            "random" => (0..PAGE / 8).flat_map(|_| xorshift(&mut x).to_le_bytes()).collect(),
            "idle-guest" if i % 8 != 0 => vec![0u8; PAGE],
            _ => {
                let mut p = Vec::with_capacity(PAGE + 32);
                while p.len() < PAGE {
                    let r = xorshift(&mut x);
                    if r >> 61 == 0 {
                        p.extend_from_slice(format!("{} ", (r >> 8) % 100_000).as_bytes());
                    } else {
                        p.extend_from_slice(WORDS[(r >> 16) as usize % WORDS.len()].as_bytes());
                        p.push(b' ');
                    }
                }
                p.truncate(PAGE);
                p
            }
        })
        .collect()
}

/// A QEMU RAM stream of these pages (8-byte headers; zero pages as 9-byte records).
fn qemu_stream(pages: &[Vec<u8>]) -> Vec<u8> {
    let mut s = Vec::with_capacity(pages.len() * (PAGE + 8));
    for (i, p) in pages.iter().enumerate() {
        let off = (i as u64) << 12;
        let zero = p.iter().all(|&b| b == 0);
        let flags: u64 = if zero { 0x02 } else { 0x08 };
        if i == 0 {
            s.extend_from_slice(&(off | flags).to_be_bytes());
            s.push(6);
            s.extend_from_slice(b"pc.ram");
        } else {
            s.extend_from_slice(&(off | flags | 0x20).to_be_bytes());
        }
        if zero {
            s.push(0);
        } else {
            s.extend_from_slice(p);
        }
    }
    s
}

fn codec_rows() -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for kind in ["web-like", "web-like rewritten", "random", "idle-guest"] {
        // "rewritten": the same pages again, each with a small change (a
        // migration's later passes), after a first pass filled both caches.
        let (first, stream) = match kind {
            "web-like rewritten" => {
                let mut pages = pages("web-like", 16 * 1024);
                let first = qemu_stream(&pages);
                for (i, p) in pages.iter_mut().enumerate() {
                    p[100..108].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                }
                (Some(first), qemu_stream(&pages))
            }
            _ => (None, qemu_stream(&pages(kind, 16 * 1024))),
        };
        for level in [1, 3, 6] {
            let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
            let mut enc = Encoder::new(LevelChooser::fixed(level));
            if let Some(first) = &first {
                let (blocks, _) = encode_stream(&mut enc, &mut tx, first)?;
                let mut out = Vec::new();
                for b in &blocks {
                    decode(&mut rx, b, &mut out)?;
                }
            }
            let started = Instant::now();
            let (blocks, pos) = encode_stream(&mut enc, &mut tx, &stream)?;
            let encode_s = started.elapsed().as_secs_f64();
            let wire: usize = blocks.iter().map(Vec::len).sum();
            let started = Instant::now();
            let mut out = Vec::new();
            for b in &blocks {
                decode(&mut rx, b, &mut out)?;
            }
            let decode_s = started.elapsed().as_secs_f64();
            if out[..] != stream[..pos] {
                bail!("codec round trip differs");
            }
            rows.push(json!({
                "data": kind, "zstd_level": level, "input_mib": pos as f64 / 1048576.0,
                "ratio": wire as f64 / pos as f64,
                "encode_mb_s": pos as f64 / encode_s / 1e6, "decode_mb_s": pos as f64 / decode_s / 1e6,
            }));
        }
    }
    Ok(rows)
}

/// DWCP's encoder on a web-like stream at zstd level 3, one core, best of
/// three passes (MB/s of input): a figure of how fast this machine is now.
fn speed(args: &[String]) -> Result<()> {
    let stream = qemu_stream(&pages("web-like", 16 * 1024));
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let mut cache = ChunkCache::new(1 << 30);
        let mut enc = Encoder::new(LevelChooser::fixed(3));
        let started = Instant::now();
        let (_, pos) = encode_stream(&mut enc, &mut cache, &stream)?;
        best = best.max(pos as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    let row = json!({
        "profile": arg(args, "--profile").ok(),
        "run": arg(args, "--run").ok().and_then(|r| r.parse::<u64>().ok()),
        "encode_mb_s": best,
    });
    println!("{row}");
    append_jsonl(arg(args, "--json")?, &[row])
}

/// Encodes a QEMU stream in 256 KiB reads, as a session does: the blocks,
/// and how much of the stream they cover.
fn encode_stream(enc: &mut Encoder, cache: &mut ChunkCache, stream: &[u8]) -> Result<(Vec<Vec<u8>>, usize)> {
    let mut scanner = Scanner::new(Role::Migration);
    let chunk = 256 * 1024;
    let mut blocks = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let end = (pos + chunk).min(stream.len());
        let (segs, used) = scanner.scan(&stream[pos..end], end < stream.len());
        if used == 0 {
            break;
        }
        blocks.push(enc.encode(cache, 1, &stream[pos..pos + used], &segs, true)?);
        pos += used;
    }
    Ok((blocks, pos))
}

fn pki_configs(dir: &Path) -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>)> {
    let ca = novacron_tls::ClusterCa::load_or_create(dir)?;
    let server = ca.issue("receiver", &["10.99.0.2".into()], None)?;
    let client = ca.issue("sender", &["10.99.0.1".into()], None)?;
    Ok((
        Arc::new(novacron_tls::client_config(&ca.cert_pem, Some(&client))?),
        novacron_tls::server_config(&server, &ca.cert_pem, novacron_tls::ClientAuth::Required)?,
    ))
}

async fn serve(args: &[String]) -> Result<()> {
    let dir = arg(args, "--pki")?;
    let port: u16 = arg(args, "--port")?.parse()?;
    let (_, server) = pki_configs(Path::new(&dir))?;
    let listener = tokio::net::TcpListener::bind(("10.99.0.2", port)).await?;
    let r = Receiver::new(CacheStore::new(64 << 20));
    r.expect("goodput", HashMap::new());
    r.serve(listener, server, tokio_util::sync::CancellationToken::new())
        .await;
    Ok(())
}

async fn goodput(args: &[String]) -> Result<()> {
    let lab = arg(args, "--lab")?;
    let profile = arg(args, "--profile")?;
    let rate_bits: f64 = arg(args, "--rate-mbit")?.parse::<f64>()? * 1e6;
    let json_path = arg(args, "--json")?;
    let pki = tempfile::tempdir()?;
    let (client, _) = pki_configs(pki.path())?;
    let port = 7400;
    let me = std::env::current_exe()?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &format!("{lab}-h2")])
        .arg(&me)
        .args(["serve", "--port", &port.to_string(), "--pki"])
        .arg(pki.path())
        .stdout(Stdio::null())
        .spawn()?;
    let addr: SocketAddr = format!("10.99.0.2:{port}").parse()?;
    let mut results = Vec::new();
    for streams in [None, Some(1)] {
        let store = CacheStore::new(1 << 20);
        let deadline = Instant::now() + Duration::from_secs(10);
        let sender = loop {
            let cfg = SessionConfig {
                streams,
                ..Default::default()
            };
            let hello = Hello {
                session: "goodput".into(),
                node: "sender".into(),
            };
            match Sender::connect(addr, "10.99.0.2", client.clone(), hello, &store, "receiver", cfg).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    let _ = server.kill();
                    return Err(e.into());
                }
            }
        };
        let rate = sender.probe(Duration::from_secs(8), u64::MAX, None).await?;
        let st = sender.finish(Duration::from_secs(30)).await?;
        let row = json!({
            "profile": profile, "streams": st.streams, "adaptive": streams.is_none(), "rtt_ms": st.rtt_ms,
            "goodput_mbit_s": rate * 8.0 / 1e6, "link_mbit_s": rate_bits / 1e6,
            "share_of_link": rate * 8.0 / rate_bits,
        });
        eprintln!("{row}");
        results.push(row);
    }
    let _ = server.kill();
    let _ = server.wait();
    append_jsonl(json_path, &results)
}

fn render(args: &[String]) -> Result<()> {
    let goodput = read_jsonl(arg(args, "--goodput")?)?;
    let mut md = String::from(
        "# DWCP micro-benchmarks\n\nCommand: `bash bench/wan-migration.sh` (release build).\n\n\
         ## Codec, one core (QEMU RAM streams of 64 MiB; encode includes page scanning, BLAKE3 and the cache)\n\n\
         | data | zstd level | wire/raw | encode MB/s | decode MB/s |\n|---|---|---|---|---|\n",
    );
    for r in codec_rows()? {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.0} | {:.0} |\n",
            r["data"].as_str().unwrap_or("?"),
            r["zstd_level"],
            r["ratio"].as_f64().unwrap_or(0.0),
            r["encode_mb_s"].as_f64().unwrap_or(0.0),
            r["decode_mb_s"].as_f64().unwrap_or(0.0)
        ));
    }
    md.push_str(
        "\n## Transport goodput vs link capacity (WAN lab, incompressible data, 8 s per row, TLS 1.3, BBR)\n\n\
         | profile | streams | rtt ms | goodput Mbit/s | link Mbit/s | share of link |\n|---|---|---|---|---|---|\n",
    );
    for r in &goodput {
        md.push_str(&format!(
            "| {} | {}{} | {:.1} | {:.1} | {:.0} | {:.0}% |\n",
            r["profile"].as_str().unwrap_or("?"),
            r["streams"],
            if r["adaptive"] == true { " (adaptive)" } else { "" },
            r["rtt_ms"].as_f64().unwrap_or(0.0),
            r["goodput_mbit_s"].as_f64().unwrap_or(0.0),
            r["link_mbit_s"].as_f64().unwrap_or(0.0),
            r["share_of_link"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
    std::fs::write(arg(args, "--md")?, md)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("goodput") => goodput(&args).await,
        Some("serve") => serve(&args).await,
        Some("render") => render(&args),
        Some("speed") => speed(&args),
        _ => bail!("usage: dwcp_micro goodput|serve|speed|render ..."),
    }
}
