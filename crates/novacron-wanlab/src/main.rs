//! `novacron-wanlab`: hosts as network namespaces, joined by links that a
//! user-space forwarder emulates packet by packet (rate, delay, jitter,
//! loss) between TUN devices — this kernel has no netem, and a TCP proxy
//! would hide real TCP behaviour. Host i is `NAME-hI` with address
//! 10.99.0.I/24 on `wan0`.
//!
//!   novacron-wanlab up --name lab --hosts 2 --profile wan   (runs until SIGTERM, then removes the lab)
//!   novacron-wanlab check --name lab --profile wan           (RTT and single-stream TCP throughput, JSON)
//!   novacron-wanlab down --name lab --hosts 2                (remove a lab left behind)

mod link;
mod tun;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use parking_lot::Mutex;

const DEV: &str = "wan0";
const MTU: usize = 1500;

#[derive(Parser)]
#[command(name = "novacron-wanlab", about = "Network namespaces joined by emulated WAN links")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab and forward packets until SIGTERM/SIGINT; then remove it.
    Up {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// lan, metro, wan or intercontinental.
        #[arg(long)]
        profile: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Remove a lab's namespaces.
    Down {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
    },
    /// Measure RTT and single-stream TCP throughput from host 1 to host 2.
    Check {
        #[arg(long)]
        name: String,
        /// Seconds of TCP transfer.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Build a lab per profile in turn and measure it: the lab verifying itself.
    Verify {
        #[arg(long, default_value = "wanlab-verify")]
        name: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Write the table here as well (markdown).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// (inside a host) UDP echo and TCP sink for `check`.
    Serve {
        #[arg(long, default_value_t = 7000)]
        port: u16,
    },
    /// (inside a host) the measuring side of `check`.
    Probe {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 7000)]
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn host(name: &str, i: usize) -> String {
    format!("{name}-h{i}")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("Cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn down(name: &str, hosts: usize) {
    for i in 1..=hosts {
        let _ = ip(&["netns", "del", &host(name, i)]);
    }
}

fn build(name: &str, hosts: usize) -> Result<()> {
    for i in 1..=hosts {
        let ns = host(name, i);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "tuntap", "add", "dev", DEV, "mode", "tun"])?;
        ip(&["-n", &ns, "addr", "add", &format!("10.99.0.{i}/24"), "dev", DEV])?;
        ip(&["-n", &ns, "link", "set", DEV, "mtu", &MTU.to_string(), "up"])?;
    }
    Ok(())
}

/// Host index (1-based) a packet is for: the last octet of an IPv4 destination in 10.99.0.0/24.
fn destination(packet: &[u8]) -> Option<usize> {
    (packet.len() >= 20 && packet[0] >> 4 == 4 && packet[16..19] == [10, 99, 0]).then(|| packet[19] as usize)
}

fn up(name: &str, hosts: usize, profile: link::Profile, seed: u64) -> Result<()> {
    // Block the stop signals before any thread starts, so only `wait` sees them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block()?;
    down(name, hosts);
    if let Err(e) = build(name, hosts) {
        down(name, hosts);
        return Err(e);
    }
    let tuns = (1..=hosts)
        .map(|i| tun::open_in_netns(&host(name, i), DEV))
        .collect::<std::io::Result<Vec<_>>>();
    let tuns = match tuns {
        Ok(t) => t,
        Err(e) => {
            down(name, hosts);
            return Err(e).context("Cannot open the TUN devices");
        }
    };
    // One delivery thread per directed link: it sleeps until each packet's time.
    let mut senders = vec![vec![None; hosts + 1]; hosts + 1];
    for (from, row) in senders.iter_mut().enumerate().skip(1) {
        for to in 1..=hosts {
            if from == to {
                continue;
            }
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let mut out = tuns[to - 1].try_clone()?;
            std::thread::spawn(move || {
                for (at, packet) in rx {
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    let _ = out.write(&packet);
                }
            });
            let link = Arc::new(Mutex::new(link::Link::new(profile, seed ^ ((from * 31 + to) as u64))));
            row[to] = Some((tx, link));
        }
    }
    for from in 1..=hosts {
        let mut input = tuns[from - 1].try_clone()?;
        let routes: Vec<_> = senders[from].clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(n) => n,
                    Err(_) => return,
                };
                let Some((tx, link)) = destination(&buf[..n])
                    .and_then(|d| routes.get(d))
                    .and_then(|r| r.as_ref())
                else {
                    continue;
                };
                let fate = link.lock().admit(n, Instant::now());
                if let link::Fate::Deliver(at) = fate {
                    let _ = tx.send((at, buf[..n].to_vec()));
                }
            }
        });
    }
    println!(
        "wanlab {name}: {hosts} hosts up, profile {} (10.99.0.1-{hosts} on {DEV})",
        profile.name
    );
    std::io::stdout().flush()?;
    let sig = stop.wait()?;
    eprintln!("wanlab {name}: {sig:?}, removing");
    down(name, hosts);
    Ok(())
}

fn serve(port: u16) -> Result<()> {
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let start = Instant::now();
            let mut total = 0u64;
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            // Tell the sender what arrived and over how long.
            let _ = conn.write_all(format!("{total} {}\n", start.elapsed().as_secs_f64()).as_bytes());
        });
    }
    Ok(())
}

fn probe(to: &str, port: u16, seconds: u64) -> Result<serde_json::Value> {
    let udp = UdpSocket::bind("0.0.0.0:0")?;
    udp.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::new();
    for i in 0..20u32 {
        let t = Instant::now();
        udp.send_to(&i.to_be_bytes(), (to, port))?;
        let mut buf = [0u8; 64];
        // A lost probe (the link drops packets on purpose) just times out.
        if let Ok((4, _)) = udp.recv_from(&mut buf) {
            if buf[..4] == i.to_be_bytes() {
                rtts.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    if rtts.is_empty() {
        bail!("no echo from {to}:{port}");
    }
    rtts.sort_by(f64::total_cmp);
    let rtt_ms = rtts[rtts.len() / 2];
    let mut tcp = TcpStream::connect((to, port))?;
    let chunk = vec![0x5au8; 1 << 16];
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tcp.write_all(&chunk)?;
    }
    tcp.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply)?;
    let mut parts = reply.split_whitespace();
    let bytes: f64 = parts.next().and_then(|b| b.parse().ok()).context("bad sink reply")?;
    let secs: f64 = parts.next().and_then(|s| s.parse().ok()).context("bad sink reply")?;
    Ok(serde_json::json!({
        "rtt_ms": (rtt_ms * 100.0).round() / 100.0,
        "tcp_mbit_s": (bytes * 8.0 / secs / 1e6 * 10.0).round() / 10.0,
        "udp_probes_answered": rtts.len(),
    }))
}

fn check(name: &str, seconds: u64) -> Result<()> {
    print!("{}", measure(name, seconds)?);
    Ok(())
}

/// Runs `probe` in host 1 against `serve` in host 2; returns its JSON line.
fn measure(name: &str, seconds: u64) -> Result<String> {
    let me = std::env::current_exe()?;
    let me = me.to_string_lossy();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &host(name, 2), &me, "serve"])
        .spawn()
        .context("Cannot start the sink in host 2")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host(name, 1),
            &me,
            "probe",
            "--to",
            "10.99.0.2",
            "--seconds",
        ])
        .arg(seconds.to_string())
        .output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    if !out.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A lab run as a child process, removed when dropped.
struct RunningLab {
    child: std::process::Child,
}

impl RunningLab {
    fn start(name: &str, profile: &str) -> Result<RunningLab> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["up", "--name", name, "--hosts", "2", "--profile", profile])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("no stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        if !line.contains("up") {
            let _ = child.kill();
            bail!("lab did not come up");
        }
        Ok(RunningLab { child })
    }
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn verify(name: &str, seconds: u64, out: Option<&std::path::Path>) -> Result<()> {
    let mut table = String::from(
        "| profile | link | target RTT | measured RTT (median of 20) | single-stream TCP | of link rate |\n|---|---|---|---|---|---|\n",
    );
    for p in link::PROFILES {
        let lab = RunningLab::start(name, p.name)?;
        let line = measure(name, seconds)?;
        drop(lab);
        let v: serde_json::Value = serde_json::from_str(line.trim())?;
        let rtt = v["rtt_ms"].as_f64().unwrap_or(f64::NAN);
        let mbit = v["tcp_mbit_s"].as_f64().unwrap_or(f64::NAN);
        let rate = p.rate_bps as f64 / 1e6;
        table.push_str(&format!(
            "| {} | {} Mbit/s, {:.1}% loss | {:.1} ms | {rtt:.2} ms | {mbit:.1} Mbit/s | {:.0}% |\n",
            p.name,
            rate,
            p.loss * 100.0,
            p.rtt.as_secs_f64() * 1000.0,
            mbit / rate * 100.0
        ));
    }
    print!("{table}");
    if let Some(path) = out {
        std::fs::write(path, format!("# WAN lab self-check\n\nCommand: `novacron-wanlab verify` ({seconds} s of TCP per profile).\n\n{table}"))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Up {
            name,
            hosts,
            profile,
            seed,
        } => {
            let Some(p) = link::profile(&profile) else {
                bail!("unknown profile {profile:?}: lan, metro, wan or intercontinental");
            };
            if !(2..=8).contains(&hosts) {
                bail!("--hosts must be 2 to 8");
            }
            up(&name, hosts, p, seed)
        }
        Cmd::Down { name, hosts } => {
            down(&name, hosts);
            Ok(())
        }
        Cmd::Check { name, seconds } => check(&name, seconds),
        Cmd::Verify { name, seconds, out } => verify(&name, seconds, out.as_deref()),
        Cmd::Serve { port } => serve(port),
        Cmd::Probe { to, port, seconds } => {
            println!("{}", probe(&to, port, seconds)?);
            Ok(())
        }
    }
}
