//! A cluster in a WAN lab built by `novacron-wanlab up`: the server and
//! agent node-1 in `LAB-h1` (where the benchmark runs), agent node-i in
//! `LAB-hi`, joined with mTLS like a real cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use novacron_api::Node;
use novacron_client::Client;
use serde_json::Value;

use crate::{repo, wait_for, Procs};

pub struct Lab {
    pub name: String,
    pub bin: PathBuf,
    pub work: PathBuf,
    pub url: String,
    pub ca: PathBuf,
    pub client: Client,
    pub token: String,
    agents: Vec<Option<Child>>,
}

impl Lab {
    pub fn host_ip(i: usize) -> String {
        format!("10.99.0.{i}")
    }

    /// Starts (or restarts) agent `i` (1 or 2) in its namespace.
    pub async fn start_agent(&mut self, i: usize, join_token: Option<String>) -> Result<()> {
        if let Some(mut c) = self.agents[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let name = format!("node-{i}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-h{i}", self.name)])
            .arg(&self.bin)
            .args(["agent", "--server", &self.url, "--name", &name, "--data-dir"])
            .arg(self.work.join(&name))
            .args(["--listen", &format!("{}:8421", Self::host_ip(i))])
            .args([
                "--vcpus",
                "8",
                "--memory",
                "6GiB",
                "--accel",
                "tcg",
                "--heartbeat",
                "1s",
            ])
            .args(["--label", &format!("lab.novacron.io/host={i}")]);
        if let Some(t) = join_token {
            cmd.args(["--join-token", &t, "--ca-cert"]).arg(&self.ca);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join(format!("{name}.log")))?;
        self.agents[i - 1] = Some(cmd.stdout(Stdio::null()).stderr(log).spawn()?);
        let client = self.client.clone();
        let started = chrono::Utc::now();
        wait_for(&format!("{name} ready"), Duration::from_secs(60), || async {
            client
                .get::<Node>(&name)
                .await
                .ok()
                .filter(|n| n.status.ready && n.status.last_heartbeat.is_some_and(|h| h > started))
                .map(|_| ())
        })
        .await
    }

    pub fn tun_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for i in 1..=self.agents.len() {
            let out = Command::new("ip")
                .args(["netns", "exec", &format!("{}-h{i}", self.name), "cat"])
                .arg("/sys/class/net/wan0/statistics/tx_bytes")
                .output()?;
            total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0);
        }
        Ok(total)
    }

    /// Types `line` on a VM's serial console.
    pub fn console(&self, vm: &str, line: &str) -> Result<()> {
        crate::type_on_console(&self.bin, &self.url, &self.token, Some(&self.ca), vm, line)
    }

    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.bin)
            .args(args)
            .env("NOVACRON_SERVER", &self.url)
            .env("NOVACRON_TOKEN", &self.token)
            .env("NOVACRON_CA_CERT", &self.ca)
            .env("XDG_CONFIG_HOME", self.work.join("config"))
            .output()?)
    }
}

/// Starts the server (in this process's namespace: run it in host 1's) and
/// an agent in each of the lab's `hosts` namespaces, joined with mTLS, and
/// imports the demo image.
pub async fn start_lab(name: &str, work: &Path, hosts: usize) -> Result<(Lab, Procs)> {
    let bin = repo().join("target/release/novacron");
    let mut procs = Procs(Vec::new(), work.to_path_buf());
    let sdir = work.join("server");
    let url = format!("https://{}:8420", Lab::host_ip(1));
    // This process runs in host 1's namespace: the server listens on its lab address.
    procs.0.push(
        Command::new(&bin)
            .args(["server", "--data-dir"])
            .arg(&sdir)
            .args([
                "--listen",
                &format!("{}:8420", Lab::host_ip(1)),
                "--tls-name",
                &Lab::host_ip(1),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("server.log"))?)
            .spawn()?,
    );
    let token = crate::admin_token(&sdir).await?;
    let ca = sdir.join("pki/ca.crt");
    let tls = novacron_tls::client_config(&std::fs::read_to_string(&ca)?, None)?;
    let client = Client::with_tls(&url, &token, Some(tls))?;
    wait_for("server health", Duration::from_secs(30), || async {
        client
            .list_all::<Node>(&novacron_client::Selector::everything())
            .await
            .ok()
            .map(|_| ())
    })
    .await?;
    let mut lab = Lab {
        name: name.to_string(),
        bin,
        work: work.to_path_buf(),
        url,
        ca,
        client,
        token,
        agents: (0..hosts).map(|_| None).collect(),
    };
    for i in 1..=hosts {
        let out = lab.cli(&["token", "create", &format!("join-{i}"), "--join", "-o", "json"])?;
        if !out.status.success() {
            bail!("join token: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let secret = v["secret"].as_str().context("join token secret")?.to_string();
        lab.start_agent(i, Some(secret)).await?;
    }
    let guest = repo().join("target/guest");
    let out = lab.cli(&[
        "image",
        "import",
        "demo",
        "--kernel",
        &guest.join("vmlinuz").display().to_string(),
        "--initrd",
        &guest.join("initrd.img").display().to_string(),
    ])?;
    if !out.status.success() {
        bail!("image import: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((lab, procs))
}
