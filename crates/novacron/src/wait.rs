//! Waiting for a VM's agent to carry out a spec change (`--wait`).

use std::time::Duration;

use anyhow::Result;
use novacron_api::Vm;

/// A change to a VM's spec its agent carries out (a NIC or volume plugged
/// or unplugged): what `--wait` waits for.
pub struct VmChange {
    /// The VM's generation with the change.
    pub generation: u64,
    pub timeout: Duration,
    /// What the VM "is" while the change is pending, for the timeout error.
    pub pending: &'static str,
    /// How `status.reason` starts when the agent gave up on the change.
    pub failed: &'static str,
}

impl VmChange {
    /// Watches the VM until its agent has acted on the change and `done`
    /// holds, or the agent reports the change failed.
    pub async fn wait(&self, c: &novacron_client::Client, name: &str, done: impl Fn(&Vm) -> bool) -> Result<Vm> {
        use futures::StreamExt;
        let mut changes = std::pin::pin!(novacron_client::watcher::watch_object::<Vm>(c.clone(), name));
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let vm = match tokio::time::timeout_at(deadline, changes.next()).await {
                Ok(Some(Some(vm))) => vm,
                Ok(Some(None)) => anyhow::bail!("VM {name:?} was deleted"),
                Ok(None) => anyhow::bail!("Watch of VM {name:?} ended"),
                Err(_) => anyhow::bail!("VM {name:?} {} after {}s", self.pending, self.timeout.as_secs()),
            };
            if vm.status.observed_generation < self.generation {
                continue;
            }
            if done(&vm) {
                return Ok(vm);
            }
            if let Some(why) = vm.status.reason.as_deref().filter(|r| r.starts_with(self.failed)) {
                anyhow::bail!("{why}");
            }
        }
    }
}
