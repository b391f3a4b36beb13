//! Shared harness of the benchmarks: the repository root, process cleanup and
//! console logs.

use std::path::{Path, PathBuf};
use std::process::Child;

pub mod lab;

use futures::StreamExt;
use novacron_client::Client;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Child processes of a benchmark plus its work dir: dropping it kills the
/// children and every process whose command line mentions the work dir
/// (daemonized QEMUs).
pub struct Procs(pub Vec<Child>, pub PathBuf);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let needle = self.1.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                .replace('\0', " ");
            if cmd.contains(&needle) && pid as u32 != std::process::id() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// A VM's whole serial console log ("" if unavailable).
pub async fn logs(client: &Client, name: &str) -> String {
    let Ok(mut s) = client.vm_logs(name, false).await else {
        return String::new();
    };
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = s.next().await {
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Imports the demo guest (target/guest) as image `demo` through the CLI.
pub fn import_demo(bin: &Path, url: &str, token: &str) -> anyhow::Result<()> {
    let guest = repo().join("target/guest");
    let out = std::process::Command::new(bin)
        .args(["image", "import", "demo", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.img"))
        .env("NOVACRON_SERVER", url)
        .env("NOVACRON_TOKEN", token)
        .output()?;
    if !out.status.success() {
        anyhow::bail!("image import failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Polls `f` every 250 ms until it yields a value, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The admin token a fresh server writes into its data dir.
pub async fn admin_token(server_dir: &Path) -> anyhow::Result<String> {
    let path = server_dir.join("admin.token");
    wait_for("server", std::time::Duration::from_secs(30), || async {
        std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string())
    })
    .await
}

/// The value after `--key` on a benchmark's command line.
pub fn arg(args: &[String], key: &str) -> anyhow::Result<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("missing {key}"))
}

/// Appends rows to a JSON-lines results file (a benchmark's runs accumulate there).
pub fn append_jsonl(path: impl AsRef<Path>, rows: &[serde_json::Value]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    for r in rows {
        writeln!(f, "{r}")?;
    }
    Ok(())
}

/// Reads a JSON-lines results file; a line that is not JSON is an error.
pub fn read_jsonl(path: impl AsRef<Path>) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = path.as_ref();
    std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: not JSON: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Types `line` on a VM's serial console through the CLI `bin`, talking
/// to `url` with `token` (and trusting `ca` when given).
pub fn type_on_console(
    bin: &Path,
    url: &str,
    token: &str,
    ca: Option<&Path>,
    vm: &str,
    line: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["vm", "console", vm])
        .env("NOVACRON_SERVER", url)
        .env("NOVACRON_TOKEN", token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    if let Some(ca) = ca {
        cmd.env("NOVACRON_CA_CERT", ca);
    }
    let mut c = cmd.spawn()?;
    if let Some(mut stdin) = c.stdin.take() {
        stdin.write_all(format!("\n{line}\n").as_bytes())?;
    }
    c.wait()?;
    Ok(())
}

/// Waits until migration `name` has ended (completed, failed or cancelled).
pub async fn migration_ended(
    client: &Client,
    name: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<novacron_api::Migration> {
    wait_for(&format!("migration {name}"), timeout, || async {
        client
            .get::<novacron_api::Migration>(name)
            .await
            .ok()
            .filter(|m| m.status.phase.is_final())
    })
    .await
}
