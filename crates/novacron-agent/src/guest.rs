//! The QEMU guest agents inside this node's VMs: what they report (OS, host
//! name, addresses: `status.guest`), a clean shutdown when the guest ignores
//! ACPI, commands run in the guest (`vm exec`), and filesystems frozen
//! around a snapshot.
//!
//! A guest agent's socket serves one client at a time, so every use of one
//! VM's agent goes through that VM's lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use novacron_api::{ExecResult, GuestInfo, GuestInterface};
use novacron_qmp::guest_agent::{
    Exec, ExecStatus, FsfreezeFreeze, FsfreezeThaw, GetHostName, GetOsInfo, GuestAgent, NetworkGetInterfaces, Shutdown,
};
use novacron_qmp::QmpError;
use parking_lot::Mutex;

use crate::node::NodeContext;
use crate::qemu::VmDir;

/// How long one answer of a guest agent may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often running guests are asked what they are.
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How long freezing (or thawing) the guest's filesystems may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Output kept of a command run in the guest (qemu-ga itself caps at 16 MiB).
pub const MAX_EXEC_OUTPUT: usize = 1024 * 1024;

#[derive(Default)]
pub struct Guests {
    info: Mutex<HashMap<String, GuestInfo>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("The VM is not running here")]
    NotRunning,
    #[error("No guest agent answers in the VM (is qemu-guest-agent installed and running?)")]
    NoAgent(#[source] QmpError),
    #[error("The guest agent refused")]
    Agent(#[source] QmpError),
    #[error("The command did not end within {0:?}")]
    Timeout(Duration),
    #[error("The guest agent sent output that is not base64")]
    Output,
    #[error("No command given")]
    EmptyCommand,
    #[error("The guest agent is busy with another request")]
    Busy,
}

impl Guests {
    /// The last report of `vm_id`'s guest agent, if it answered the last time.
    pub fn info(&self, vm_id: &str) -> Option<GuestInfo> {
        self.info.lock().get(vm_id).cloned()
    }

    fn lock_of(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(vm_id.to_string()).or_default().clone()
    }

    /// Forgets a VM that stopped or left.
    pub fn forget(&self, vm_id: &str) {
        self.info.lock().remove(vm_id);
    }

    /// Asks the guest agent to shut the guest down (for a guest that
    /// ignores the ACPI power button).
    pub async fn shutdown(&self, vm_id: &str, dir: &VmDir) -> Result<(), GuestError> {
        let lock = self.lock_of(vm_id);
        let _one = lock.lock().await;
        let mut agent = connect(dir).await?;
        agent.send(&Shutdown).await.map_err(GuestError::Agent)
    }

    /// Runs `during` with the guest's filesystems frozen by its agent (their
    /// caches flushed, writes held), when one answers, and thaws them after
    /// whatever `during` gives; `during` is told whether they are frozen.
    /// Without an agent it runs all the same.
    pub async fn while_frozen<T, F: std::future::Future<Output = T>>(
        &self,
        vm_id: &str,
        dir: &VmDir,
        during: impl FnOnce(bool) -> F,
    ) -> T {
        if !dir.guest_agent().exists() || dir.running_pid().is_none() {
            return during(false).await;
        }
        let lock = self.lock_of(vm_id);
        let _one = lock.lock().await;
        // Flushing a busy guest's caches takes a while under TCG.
        let mut agent = match GuestAgent::connect(&dir.guest_agent(), FREEZE_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(vm = %vm_id, error = %e, "no guest agent to freeze filesystems: crash-consistent");
                return during(false).await;
            }
        };
        let frozen = match agent.run(&FsfreezeFreeze).await {
            Ok(n) => {
                tracing::info!(vm = %vm_id, filesystems = n, "guest filesystems frozen");
                true
            }
            Err(e) => {
                tracing::warn!(vm = %vm_id, error = %e, "the guest agent did not freeze: crash-consistent");
                false
            }
        };
        let out = during(frozen).await;
        // Thawed even after a failed freeze, which may have frozen some.
        for attempt in 1..=3 {
            match agent.run(&FsfreezeThaw).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(vm = %vm_id, attempt, error = %e, "guest filesystems not thawed yet");
                    if let Ok(fresh) = GuestAgent::connect(&dir.guest_agent(), FREEZE_TIMEOUT).await {
                        agent = fresh;
                    }
                }
            }
        }
        out
    }

    /// Runs `argv` in the guest, waiting up to `timeout` for it to end.
    pub async fn exec(
        &self,
        vm_id: &str,
        dir: &VmDir,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecResult, GuestError> {
        let (path, args) = argv.split_first().ok_or(GuestError::EmptyCommand)?;
        let lock = self.lock_of(vm_id);
        let _one = lock.lock().await;
        let mut agent = connect(dir).await?;
        let started = agent
            .run(&Exec {
                path: path.clone(),
                arg: args.to_vec(),
                capture_output: true,
            })
            .await
            .map_err(GuestError::Agent)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let status = agent
                .run(&ExecStatus { pid: started.pid })
                .await
                .map_err(GuestError::Agent)?;
            if status.exited {
                let decode = |data: Option<String>| -> Result<(String, bool), GuestError> {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data.unwrap_or_default())
                        .map_err(|_| GuestError::Output)?;
                    let cut = bytes.len() > MAX_EXEC_OUTPUT;
                    let kept = &bytes[..bytes.len().min(MAX_EXEC_OUTPUT)];
                    Ok((String::from_utf8_lossy(kept).into_owned(), cut))
                };
                let (stdout, out_cut) = decode(status.out_data)?;
                let (stderr, err_cut) = decode(status.err_data)?;
                return Ok(ExecResult {
                    exit_code: status.exitcode,
                    signal: status.signal,
                    stdout,
                    stderr,
                    truncated: out_cut || err_cut || status.out_truncated || status.err_truncated,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GuestError::Timeout(timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One report from `dir`'s guest agent; `Busy` while a command runs
    /// in the guest (the last report stands meanwhile).
    async fn ask(&self, vm_id: &str, dir: &VmDir) -> Result<GuestInfo, GuestError> {
        let lock = self.lock_of(vm_id);
        let Ok(_one) = lock.try_lock() else {
            return Err(GuestError::Busy);
        };
        let mut agent = connect(dir).await?;
        let os = agent.run(&GetOsInfo).await.map_err(GuestError::Agent)?;
        let host = agent.run(&GetHostName).await.map_err(GuestError::Agent)?;
        let ifaces = agent.run(&NetworkGetInterfaces).await.map_err(GuestError::Agent)?;
        Ok(GuestInfo {
            os: os.pretty_name.or(os.name),
            kernel: os.kernel_release,
            hostname: Some(host.host_name),
            interfaces: ifaces
                .into_iter()
                .filter(|i| i.name != "lo")
                .map(|i| GuestInterface {
                    name: i.name,
                    mac: i.hardware_address,
                    addresses: i
                        .ip_addresses
                        .into_iter()
                        .map(|a| format!("{}/{}", a.ip_address, a.prefix))
                        .collect(),
                })
                .collect(),
        })
    }
}

async fn connect(dir: &VmDir) -> Result<GuestAgent, GuestError> {
    if dir.running_pid().is_none() {
        return Err(GuestError::NotRunning);
    }
    GuestAgent::connect(&dir.guest_agent(), ANSWER_TIMEOUT)
        .await
        .map_err(GuestError::NoAgent)
}

/// Asks every running guest with an agent port what it is, every few
/// seconds; the reconciler puts the answers into the VMs' status.
pub async fn keep_polling(node: Arc<NodeContext>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(entries) = std::fs::read_dir(&node.vms_root) else {
            continue;
        };
        let ids: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // All at once: a guest whose agent does not answer (paused, still
        // booting, none installed) costs its timeout, not everyone's.
        let asks = ids.into_iter().map(|id| {
            let node = node.clone();
            async move {
                let dir = node.vm_dir(&id);
                // A migration owns the QEMU (and pauses it at the end): leave it be.
                if !dir.guest_agent().exists() || node.claims.is_claimed(&id) {
                    node.guests.forget(&id);
                    return;
                }
                match node.guests.ask(&id, &dir).await {
                    Ok(info) => {
                        node.guests.info.lock().insert(id, info);
                    }
                    Err(GuestError::Busy) => {}
                    Err(e) => {
                        tracing::trace!(vm_id = %id, error = %e, "guest agent does not answer");
                        node.guests.forget(&id);
                    }
                }
            }
        });
        futures::future::join_all(asks).await;
    }
}
