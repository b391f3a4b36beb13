//! Test harness: a real server and real agents as processes, in a temp dir,
//! on ports chosen at runtime. Dropping the cluster kills every process whose
//! command line mentions the temp dir (server, agents and their QEMUs), so
//! nothing outlives a test, also when it fails.
#![allow(dead_code)]

pub mod backup;
pub mod guestnet;
pub mod netlab;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_api::{CreateVm, RunStrategy, Vm, VmPhase, VmSpec};
use novacron_client::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_novacron");

pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("NOVACRON_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initrd.img").exists(),
        "demo guest missing in {}: run scripts/build-guest-image.sh",
        dir.display()
    );
    dir
}

/// Stdout of a CLI command that must succeed (its output is in the failure message).
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` until it returns Some, or panics after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct AgentProc {
    pub name: String,
    /// The host namespace the agent runs in (clusters on an underlay).
    pub netns: Option<String>,
    pub data_dir: PathBuf,
    pub child: Child,
    pub args: Vec<String>,
}

/// Numbers join tokens: their names must be unique.
static JOIN_TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// HTTPS with agents on certificates (the default), or plain HTTP with tokens.
    pub tls: bool,
    /// CA of a server certificate given with --tls-cert (instead of the cluster CA's).
    pub server_ca: Option<PathBuf>,
    pub port: u16,
    pub url: String,
    pub token: String,
    pub client: Client,
    pub server: Option<Child>,
    pub server_args: Vec<String>,
    /// Arguments every agent gets besides its own.
    pub agent_extra_args: Vec<String>,
    /// Servers the agents fail over to, after this cluster's own.
    pub other_servers: Vec<String>,
    pub agents: Vec<AgentProc>,
    /// Hosts as network namespaces (dropped after the processes in them).
    pub underlay: Option<netlab::Underlay>,
}

pub struct Options {
    pub agents: usize,
    pub agent_memory: &'static str,
    pub agent_vcpus: u32,
    pub heartbeat: &'static str,
    pub node_grace: &'static str,
    pub tls: bool,
    /// Directory with `server.crt`, `server.key` and the `ca.crt` that issued
    /// them: the server uses this certificate instead of generating one.
    pub server_cert: Option<PathBuf>,
    /// `--node-cert-lifetime` (default: the server's).
    pub node_cert_lifetime: Option<&'static str>,
    /// `--max-connections` (default: the server's).
    pub max_connections: Option<u32>,
    /// Run each agent (and its QEMUs) in its own network namespace on an
    /// underlay, as hosts of their own: what VM networking needs.
    pub netns: bool,
    /// `--otlp-endpoint` of the server and every agent.
    pub otlp_endpoint: Option<String>,
    /// `--store` of the server (default: embedded).
    pub store: Option<String>,
    /// The admin token, when another server on the same store made it.
    pub admin_token: Option<String>,
    /// More servers (URLs) the agents may use when this cluster's is gone.
    pub other_servers: Vec<String>,
    /// More arguments for the server.
    pub server_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: 1,
            agent_memory: "2GiB",
            agent_vcpus: 4,
            heartbeat: "1s",
            node_grace: "15s",
            tls: true,
            server_cert: None,
            node_cert_lifetime: None,
            max_connections: None,
            netns: false,
            otlp_endpoint: None,
            store: None,
            admin_token: None,
            other_servers: Vec::new(),
            server_args: Vec::new(),
        }
    }
}

/// A process's log; a restarted process appends to what it wrote before.
pub fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .map(Stdio::from)
        .unwrap_or(Stdio::null())
}

/// Starts `novacron` with `args` (a `server` whose `--data-dir` is
/// `data_dir`), its log in `log_dir/NAME.log`, and waits for the address it
/// reports listening on.
pub async fn spawn_server(
    args: &[String],
    data_dir: &Path,
    log_dir: &Path,
    name: &str,
) -> (Child, std::net::SocketAddr) {
    let addr_file = data_dir.join(novacron_server::LISTEN_ADDR_FILE);
    let _ = std::fs::remove_file(&addr_file);
    let child = Command::new(BIN)
        .args(args)
        .env("NOVACRON_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file(log_dir, name))
        .spawn()
        .expect("spawn server");
    let addr = wait_until(
        &format!("{name} to report its address"),
        Duration::from_secs(30),
        || {
            let addr_file = addr_file.clone();
            async move { std::fs::read_to_string(addr_file).ok()?.trim().parse().ok() }
        },
    )
    .await;
    (child, addr)
}

impl Cluster {
    pub async fn start(opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("nc-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        // The server binds port 0 and reports what it got (no bind-and-release
        // race); a restart binds that port again.
        let port = 0;
        let url = String::new();
        let underlay = opts.netns.then(netlab::Underlay::new);
        let listen_ip = underlay
            .as_ref()
            .map(|u| u.server_ip().to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        let mut server_args = vec![
            "server".to_string(),
            "--data-dir".into(),
            dir.path().join("server").display().to_string(),
            "--listen".into(),
            format!("{listen_ip}:0"),
            "--node-grace".into(),
            opts.node_grace.into(),
        ];
        if !opts.tls {
            server_args.push("--insecure-http".into());
        }
        if let Some(lifetime) = opts.node_cert_lifetime {
            server_args.extend(["--node-cert-lifetime".into(), lifetime.into()]);
        }
        if let Some(n) = opts.max_connections {
            server_args.extend(["--max-connections".into(), n.to_string()]);
        }
        if let Some(d) = &opts.server_cert {
            server_args.extend([
                "--tls-cert".into(),
                d.join("server.crt").display().to_string(),
                "--tls-key".into(),
                d.join("server.key").display().to_string(),
            ]);
        }
        let otlp: Vec<String> = opts
            .otlp_endpoint
            .iter()
            .flat_map(|e| ["--otlp-endpoint".to_string(), e.clone()])
            .collect();
        server_args.extend(otlp.iter().cloned());
        if let Some(store) = &opts.store {
            server_args.extend(["--store".into(), store.clone()]);
        }
        server_args.extend(opts.server_args.iter().cloned());
        let mut cluster = Cluster {
            tls: opts.tls,
            server_ca: opts.server_cert.as_ref().map(|d| d.join("ca.crt")),
            port,
            url: url.clone(),
            token: String::new(),
            client: Client::new(&url, "none").expect("client"),
            server: None,
            server_args,
            agent_extra_args: otlp,
            other_servers: opts.other_servers.clone(),
            agents: Vec::new(),
            underlay,
            dir,
        };
        cluster.start_server().await;
        let token_path = cluster.dir.path().join("server/admin.token");
        cluster.token = match &opts.admin_token {
            Some(token) => token.clone(),
            None => std::fs::read_to_string(&token_path)
                .expect("admin token")
                .trim()
                .to_string(),
        };
        cluster.client = cluster.client_with_token(&cluster.token.clone());
        for i in 1..=opts.agents {
            cluster
                .add_agent(
                    &format!("node-{i}"),
                    opts.agent_vcpus,
                    opts.agent_memory,
                    opts.heartbeat,
                )
                .await;
        }
        cluster
    }

    /// The backup key every agent of the cluster holds (stores added with
    /// `--encryption-key` of it keep backups sealed).
    pub fn backup_key_path(&self) -> PathBuf {
        self.dir.path().join("backup.key")
    }

    /// The CA that issued the server's certificate (TLS clusters).
    pub fn ca_path(&self) -> PathBuf {
        self.server_ca
            .clone()
            .unwrap_or_else(|| self.dir.path().join("server/pki/ca.crt"))
    }

    fn tls_config(&self, identity: Option<&novacron_tls::Identity>) -> Option<novacron_tls::rustls::ClientConfig> {
        self.tls.then(|| {
            let ca = std::fs::read_to_string(self.ca_path()).expect("CA certificate");
            novacron_tls::client_config(&ca, identity).expect("TLS config")
        })
    }

    /// An API client with `token`, trusting the cluster CA.
    pub fn client_with_token(&self, token: &str) -> Client {
        Client::with_tls(&self.url, token, self.tls_config(None)).expect("client")
    }

    /// An API client for other servers of the cluster (`urls`, comma-separated),
    /// trusting the cluster CA.
    pub fn client_at(&self, urls: &str, token: &str) -> Client {
        Client::with_tls(urls, token, self.tls_config(None)).expect("client")
    }

    /// A plain HTTP client for raw requests, trusting the cluster CA.
    pub fn http(&self) -> reqwest::Client {
        match self.tls_config(None) {
            Some(cfg) => reqwest::Client::builder()
                .use_preconfigured_tls(cfg)
                .build()
                .expect("http client"),
            None => reqwest::Client::new(),
        }
    }

    pub async fn start_server(&mut self) {
        let (child, addr) = spawn_server(
            &self.server_args,
            &self.dir.path().join("server"),
            self.dir.path(),
            "server",
        )
        .await;
        self.server = Some(child);
        if self.port == 0 {
            self.port = addr.port();
            self.url = format!("{}://{addr}", if self.tls { "https" } else { "http" });
            self.client = Client::new(&self.url, "none").expect("client");
            if let Some(listen) = self.server_args.iter_mut().find(|a| a.ends_with(":0")) {
                *listen = addr.to_string();
            }
        }
        assert_eq!(addr.port(), self.port, "server came back on another port");
        let url = format!("{}/readyz", self.url);
        wait_until("server ready", Duration::from_secs(30), || {
            // The cluster CA file appears at the first start.
            let http = (!self.tls || self.ca_path().exists()).then(|| self.http());
            let url = url.clone();
            async move {
                http?
                    .get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
    }

    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A one-time join token for `name`.
    pub async fn join_token(&self, name: &str) -> String {
        let issued: novacron_api::IssuedToken = self
            .client
            .post_json(
                "tokens",
                &novacron_api::CreateToken {
                    name: format!(
                        "join-{name}-{}",
                        JOIN_TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    ),
                    role: "join".into(),
                    project: None,
                    ttl_s: None,
                    join: true,
                },
            )
            .await
            .expect("join token");
        issued.secret
    }

    pub async fn add_agent(&mut self, name: &str, vcpus: u32, memory: &str, heartbeat: &str) {
        let data_dir = self.dir.path().join(name);
        let credentials = if self.tls {
            vec![
                "--join-token".to_string(),
                self.join_token(name).await,
                "--ca-cert".into(),
                self.ca_path().display().to_string(),
            ]
        } else {
            vec!["--token".to_string(), self.token.clone()]
        };
        let key = self.backup_key_path();
        if !key.exists() {
            novacron_backup::ChunkKey::create(&key).expect("backup key");
        }
        let servers = std::iter::once(self.url.clone())
            .chain(self.other_servers.iter().cloned())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec!["agent".to_string(), "--server".into(), servers];
        args.extend(credentials);
        args.extend(["--backup-key".into(), key.display().to_string()]);
        args.extend([
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
            "--memory".into(),
            memory.into(),
            "--heartbeat".into(),
            heartbeat.into(),
            // The probe itself is tested on its own; agents here go straight to TCG.
            "--accel".into(),
            "tcg".to_string(),
        ]);
        args.extend(self.agent_extra_args.iter().cloned());
        let n = self.agents.len() as u8 + 1;
        let netns = self.underlay.as_mut().map(|u| {
            let ns = u.add_host(n);
            args.extend([
                "--listen".into(),
                format!("{}:0", u.host_ip(n)),
                "--label".into(),
                format!("host={name}"),
            ]);
            ns
        });
        let child = self.spawn_agent(name, netns.as_deref(), &args);
        self.agents.push(AgentProc {
            netns,
            name: name.into(),
            data_dir,
            child,
            args,
        });
        let client = self.client.clone();
        let n = name.to_string();
        wait_until("agent registered and Ready", Duration::from_secs(30), || {
            let client = client.clone();
            let n = n.clone();
            async move {
                client
                    .get::<novacron_api::Node>(&n)
                    .await
                    .ok()
                    .filter(|node| node.status.ready)
                    .map(|_| ())
            }
        })
        .await;
    }

    fn spawn_agent(&self, name: &str, netns: Option<&str>, args: &[String]) -> Child {
        let mut command = match netns {
            Some(ns) => netlab::Underlay::exec(ns, BIN),
            None => Command::new(BIN),
        };
        command
            .args(args)
            .env("NOVACRON_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), name))
            .spawn()
            .expect("spawn agent")
    }

    pub fn agent(&mut self, name: &str) -> &mut AgentProc {
        self.agents.iter_mut().find(|a| a.name == name).expect("agent")
    }

    pub fn kill_agent(&mut self, name: &str) {
        let a = self.agent(name);
        let _ = a.child.kill();
        let _ = a.child.wait();
    }

    pub fn restart_agent(&mut self, name: &str) {
        self.kill_agent(name);
        let args = self.agent(name).args.clone();
        let netns = self.agent(name).netns.clone();
        let child = self.spawn_agent(name, netns.as_deref(), &args);
        self.agent(name).child = child;
    }

    pub async fn import_demo(&self) {
        let g = guest_dir();
        let out = self
            .cli(&[
                "image",
                "import",
                "demo",
                "--kernel",
                &g.join("vmlinuz").display().to_string(),
                "--initrd",
                &g.join("initrd.img").display().to_string(),
            ])
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "image import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CLI command pointed at this cluster.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("NOVACRON_SERVER", &self.url)
            .env("NOVACRON_TOKEN", &self.token)
            .env("NOVACRON_DEV_DIR", self.dir.path().join("no-dev"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .stdin(Stdio::null());
        if self.tls {
            c.env("NOVACRON_CA_CERT", self.ca_path());
        } else {
            c.env_remove("NOVACRON_CA_CERT");
        }
        c
    }

    pub async fn create_vm(&self, name: &str, memory_mib: u64, strategy: RunStrategy, data_disk: bool) -> Vm {
        self.create_vm_with_args(name, memory_mib, strategy, data_disk, None)
            .await
    }

    /// `kernel_args` reach the guest, e.g. `novacron.workload=64` starts the memory workload.
    pub async fn create_vm_with_args(
        &self,
        name: &str,
        memory_mib: u64,
        strategy: RunStrategy,
        data_disk: bool,
        kernel_args: Option<&str>,
    ) -> Vm {
        self.client
            .create_vm(&CreateVm {
                name: name.into(),
                project: None,
                labels: Default::default(),
                no_default_network: false,
                spec: VmSpec {
                    disk_mib: Some(256),
                    data_disk_mib: data_disk.then_some(64),
                    run_strategy: strategy,
                    kernel_args: kernel_args.map(str::to_string),
                    ..VmSpec::new("demo", 1, memory_mib)
                },
            })
            .await
            .expect("create vm")
    }

    /// QEMU pids running out of one node's data dir.
    pub fn qemu_pids_on(&self, node: &str) -> Vec<u32> {
        pids_mentioning(&self.dir.path().join(node), "qemu-system")
    }

    pub async fn vm(&self, name: &str) -> Vm {
        self.client.get::<Vm>(name).await.expect("get vm")
    }

    pub async fn wait_phase(&self, name: &str, phase: VmPhase, timeout: Duration) -> Vm {
        let client = self.client.clone();
        wait_until(&format!("{name} to be {phase}"), timeout, || {
            let client = client.clone();
            let name = name.to_string();
            async move { client.get::<Vm>(&name).await.ok().filter(|v| v.status.phase == phase) }
        })
        .await
    }

    /// Waits until migration `name` has ended, however it ended.
    pub async fn wait_migration_final(&self, name: &str, timeout: Duration) -> novacron_api::Migration {
        let client = self.client.clone();
        wait_until(&format!("migration {name} to end"), timeout, || {
            let client = client.clone();
            let name = name.to_string();
            async move {
                client
                    .get::<novacron_api::Migration>(&name)
                    .await
                    .ok()
                    .filter(|m| m.status.phase.is_final())
            }
        })
        .await
    }

    pub async fn logs(&self, name: &str) -> String {
        use futures::StreamExt;
        let mut s = match self.client.vm_logs(name, false).await {
            Ok(s) => s,
            Err(_) => return String::new(),
        };
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = s.next().await {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&out).to_string()
    }

    /// Waits until the console log has `n` lines containing `marker`.
    pub async fn wait_console(&self, name: &str, marker: &str, n: usize, timeout: Duration) -> String {
        wait_until(&format!("{n}x {marker:?} on {name}'s console"), timeout, || async {
            let log = self.logs(name).await;
            (log.lines().filter(|l| l.contains(marker)).count() >= n).then_some(log)
        })
        .await
    }

    /// Pids of QEMU processes whose command line mentions this cluster's dir.
    pub fn qemu_pids(&self) -> Vec<u32> {
        pids_mentioning(self.dir.path(), "qemu-system")
    }
}

/// Processes whose command line contains `dir` (and `program`, if not empty).
pub fn pids_mentioning(dir: &Path, program: &str) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state_ok = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
            .unwrap_or(false);
        if state_ok && cmd.contains(&needle) && cmd.contains(program) {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        self.kill_server();
        // QEMU runs daemonized (own session), so find it by its paths.
        for _ in 0..50 {
            let pids = pids_mentioning(self.dir.path(), "");
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test visible: every process's, and
            // each QEMU's own log.
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            for agent in &self.agents {
                let vms = std::fs::read_dir(agent.data_dir.join("vms"))
                    .into_iter()
                    .flatten()
                    .flatten();
                logs.extend(vms.map(|vm| vm.path().join("qemu.log")).filter(|p| p.exists()));
            }
            logs.sort();
            for path in logs {
                let f = path
                    .strip_prefix(self.dir.path())
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                if let Ok(log) = std::fs::read_to_string(&path) {
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- {f} (last 40 lines) ---");
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}
