//! Hollow agents, for scale tests and benches only: the agent's own joining,
//! registration, heartbeats, watch and control loop, with a simulated
//! hypervisor in place of QEMU, so one process can be a thousand nodes. No
//! guest runs: a hollow VM's status says so (`accel: "hollow"`), and its
//! node's address takes no connections. Never used to pass a test about
//! real VM behaviour.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::Utc;
use novacron_api::{PowerState, RegisterNode, Resources, Vm, VmPhase};
use novacron_client::Client;
use parking_lot::{Mutex, RwLock};

use crate::control::{control_loop, Driver};
use crate::reconcile::Outcome;
use crate::{certs, AgentError};

/// What the simulated hypervisor reports as its accelerator.
pub const HOLLOW_ACCEL: &str = "hollow";

/// Where a hollow node says it listens: port 9 (discard) on loopback, where
/// nothing listens, so a call from the server to a hollow node fails at once.
const HOLLOW_ADDRESS: &str = "https://127.0.0.1:9";

/// What all hollow nodes of one process share.
pub struct HollowCluster {
    /// The servers, comma-separated.
    pub server: String,
    /// The cluster CA, to trust the server when joining.
    pub ca_cert: PathBuf,
    pub heartbeat: Duration,
    /// Where each node records when it first saw each VM.
    pub seen: Option<SeenLog>,
}

/// One hollow node.
pub struct HollowNode {
    pub name: String,
    /// Its certificate lives here once joined.
    pub data_dir: PathBuf,
    /// Needed only until the node has a certificate.
    pub join_token: Option<String>,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
}

/// One line per VM a hollow node sees for the first time:
/// `{"vm":..,"node":..,"seen_unix_ms":..}`, so a test or bench can tell how
/// long a VM took from its create to its agent.
pub struct SeenLog(Mutex<std::fs::File>);

impl SeenLog {
    pub fn create(path: &Path) -> std::io::Result<SeenLog> {
        Ok(SeenLog(Mutex::new(std::fs::File::create(path)?)))
    }

    fn record(&self, vm: &str, node: &str) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut line = serde_json::json!({"vm": vm, "node": node, "seen_unix_ms": ms}).to_string();
        line.push('\n');
        if let Err(e) = self.0.lock().write_all(line.as_bytes()) {
            tracing::warn!(vm, node, error = %e, "cannot record a VM seen");
        }
    }
}

/// Hollow node `node`'s client: with its certificate, got with its join
/// token the first time.
pub async fn join(cluster: &HollowCluster, node: &HollowNode) -> Result<Client, AgentError> {
    let with = certs::JoinWith {
        server: &cluster.server,
        name: &node.name,
        join_token: node.join_token.as_deref(),
        ca_cert: Some(&cluster.ca_cert),
    };
    let tls = certs::load_or_join(&node.data_dir, with, "127.0.0.1").await?;
    Ok(Client::with_tls(&cluster.server, "", Some(tls.client_config()?))?)
}

/// Whether hollow node `node` has its certificate already.
pub fn has_joined(node: &HollowNode) -> bool {
    novacron_tls::AgentFiles::in_dir(&node.data_dir).exist()
}

/// Runs hollow node `node` with `client` (from `join`) until its watch ends
/// for good: registers, heartbeats and reconciles its VMs with the simulated
/// hypervisor.
pub async fn run_hollow(cluster: Arc<HollowCluster>, node: HollowNode, client: Client) {
    let registration = RegisterNode {
        qemu: Default::default(),
        name: node.name.clone(),
        address: HOLLOW_ADDRESS.into(),
        capacity: node.capacity,
        labels: node.labels,
        accel: HOLLOW_ACCEL.into(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        dwcp_port: None,
        underlay_ip: None,
    };
    let secret = Arc::new(RwLock::new(None));
    let heartbeat = crate::register_and_keep_alive(client.clone(), registration, secret, cluster.heartbeat).await;
    let hypervisor = HollowHypervisor {
        node: node.name,
        started: HashSet::new(),
        cluster,
    };
    control_loop(hypervisor, client).await;
    heartbeat.abort();
}

/// The simulated hypervisor: a VM is in whatever power state its spec asks
/// for as soon as it is asked.
struct HollowHypervisor {
    node: String,
    /// The ids of the VMs this node holds.
    started: HashSet<String>,
    cluster: Arc<HollowCluster>,
}

impl Driver for HollowHypervisor {
    fn node_name(&self) -> &str {
        &self.node
    }

    fn is_claimed(&self, _vm_id: &str) -> bool {
        // Hollow nodes take part in no migration.
        false
    }

    async fn reconcile(&mut self, vm: &Vm) -> Outcome {
        let id = &vm.metadata.id;
        if vm.metadata.deletion_requested_at.is_some() {
            self.started.remove(id);
            return Outcome::Finalized;
        }
        if self.started.insert(id.clone()) {
            if let Some(seen) = &self.cluster.seen {
                seen.record(&vm.metadata.name, &self.node);
            }
        }
        let mut st = vm.status.clone();
        st.observed_generation = vm.metadata.generation;
        st.observed_start_request = vm.spec.start_request;
        st.reason = None;
        st.qemu_pid = None;
        match vm.spec.power_state {
            PowerState::Stopped => st.phase = VmPhase::Stopped,
            running => {
                st.phase = if running == PowerState::Paused {
                    VmPhase::Paused
                } else {
                    VmPhase::Running
                };
                st.started_at.get_or_insert_with(Utc::now);
                st.accel = Some(HOLLOW_ACCEL.into());
                st.observed_reboot_generation = vm.spec.reboot_generation;
            }
        }
        Outcome::Status(Box::new(st))
    }

    fn retain(&mut self, ids: &HashSet<String>) {
        self.started.retain(|id| ids.contains(id));
    }

    async fn remove_orphans(&mut self, keep: &HashSet<String>) {
        self.retain(keep);
    }

    async fn remove_vm_state(&mut self, id: &str) {
        self.started.remove(id);
    }

    async fn work_ended(&self) {
        std::future::pending().await
    }
}
