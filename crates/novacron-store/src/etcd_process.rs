//! Local etcd members (Debian's `etcd` binary) for tests, benches and
//! `novacron dev --store etcd`: each in its own data directory, on ports it
//! binds itself (client port 0, read back from its log) or, for the peers of a
//! cluster, on ports chosen just before start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EtcdProcessError {
    #[error("cannot start etcd ({binary}); scripts/setup.sh installs it")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("etcd member {name} did not come up: {why} (log: {log})")]
    NotReady { name: String, why: String, log: String },
}

/// One etcd process; killed when dropped.
pub struct EtcdMember {
    pub name: String,
    /// `HOST:PORT` clients connect to.
    pub client_addr: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    /// The process id, while it runs (benches measure its memory and CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the member (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of local members, stopped when dropped.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
}

/// The etcd binary: `NOVACRON_ETCD` or `etcd` on the PATH.
pub fn etcd_binary() -> String {
    std::env::var("NOVACRON_ETCD").unwrap_or_else(|_| "etcd".to_string())
}

fn free_port() -> Result<u16, std::io::Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The address from etcd's "serving client traffic" log line, once written.
fn client_address(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|l| l.contains("serving client traffic"))
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["address"].as_str().map(str::to_string)
        })
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

impl EtcdCluster {
    /// Starts `size` members with data under `dir` (kept: a cluster started
    /// again on the same `dir` has its data) and waits until each serves
    /// clients. Peer ports are chosen just before the start; if one was taken
    /// in between, a new cluster's start is retried.
    pub fn start(dir: &Path, size: usize) -> Result<EtcdCluster, EtcdProcessError> {
        let existed = dir.join("m0").exists();
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_once(dir, size) {
                Ok(cluster) => return Ok(cluster),
                Err(e) if existed => return Err(e),
                Err(e) => {
                    for i in 0..size.max(1) {
                        let _ = std::fs::remove_dir_all(dir.join(format!("m{i}")));
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| EtcdProcessError::NotReady {
            name: "etcd".into(),
            why: "no attempt made".into(),
            log: String::new(),
        }))
    }

    fn start_once(dir: &Path, size: usize) -> Result<EtcdCluster, EtcdProcessError> {
        std::fs::create_dir_all(dir)?;
        let size = size.max(1);
        let peers: Vec<(String, String)> = (0..size)
            .map(|i| Ok((format!("m{i}"), format!("http://127.0.0.1:{}", free_port()?))))
            .collect::<Result<_, std::io::Error>>()?;
        let initial_cluster = peers
            .iter()
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, peer_url) in &peers {
            let log = dir.join(format!("{name}.log"));
            // A fresh log: its "serving" line is this start's.
            let log_file = std::fs::File::create(&log)?;
            let child = Command::new(etcd_binary())
                .arg("--name")
                .arg(name)
                .arg("--data-dir")
                .arg(dir.join(name))
                .args(["--listen-client-urls", "http://127.0.0.1:0"])
                .args(["--advertise-client-urls", "http://127.0.0.1:0"])
                .args(["--listen-peer-urls", peer_url])
                .args(["--initial-advertise-peer-urls", peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("nc-{}", std::process::id())])
                // The HTTP gateway would dial the advertised port 0; clients use gRPC.
                .args(["--enable-grpc-gateway=false"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                // Member failure tests want a quick election.
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|source| EtcdProcessError::Spawn {
                    binary: etcd_binary(),
                    source,
                })?;
            members.push(EtcdMember {
                name: name.clone(),
                client_addr: String::new(),
                log,
                child: Some(child),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for member in &mut members {
            loop {
                if let Some(addr) = client_address(&member.log) {
                    member.client_addr = addr;
                    break;
                }
                let exited = member
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .is_some();
                if exited || Instant::now() > deadline {
                    return Err(EtcdProcessError::NotReady {
                        name: member.name.clone(),
                        why: if exited {
                            "exited"
                        } else {
                            "no client address within 20 s"
                        }
                        .into(),
                        log: log_tail(&member.log),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(EtcdCluster { members })
    }

    /// `etcd://HOST:PORT,...{root}` naming every member.
    pub fn url(&self, root: &str) -> String {
        let members: Vec<&str> = self.members.iter().map(|m| m.client_addr.as_str()).collect();
        format!("etcd://{}{root}", members.join(","))
    }
}

/// Connects to `url` once its members have elected a leader (a fresh cluster
/// needs a moment), or fails at the deadline with the last error.
pub async fn connect_when_ready(url: &crate::EtcdUrl, within: Duration) -> Result<crate::EtcdStore, crate::StoreError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match crate::EtcdStore::connect(url).await {
            Ok(store) => return Ok(store),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
