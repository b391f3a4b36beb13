//! What this node is and holds, shared by the reconciler, the migration
//! driver and the HTTP endpoint: built once at start-up. Also who owns a VM
//! for the moment: the reconciler, or a migration that holds its claim.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use novacron_client::Client;

use crate::images::ImageCache;
use crate::qemu::VmDir;

pub struct NodeContext {
    /// This node's name.
    pub name: String,
    /// The key backups are sealed with for stores that ask for it.
    pub backup_key: Option<novacron_backup::ChunkKey>,
    /// The QEMU binary and the accelerator it runs with (`kvm` or `tcg`).
    pub qemu: String,
    pub accel: String,
    /// Where each VM's directory lives.
    pub vms_root: PathBuf,
    /// The pool of detached volumes kept here (crate::volumes).
    pub volumes_root: PathBuf,
    /// Calls to other agents (fetching a volume).
    pub peers: reqwest::Client,
    pub images: Arc<ImageCache>,
    pub client: Client,
    /// The secret the server and peer agents present (unset until registered).
    pub secret: Arc<RwLock<Option<String>>>,
    /// Host name or address peers use to reach this node's QEMUs.
    pub host: String,
    /// VMs a migration owns: the reconciler leaves them alone.
    pub claims: MigrationClaims,
    /// The host's side of VM networks: bridges, VXLAN, taps, DHCP.
    pub net: Arc<crate::network::Overlay>,
    /// The guest agents inside this node's VMs.
    pub guests: crate::guest::Guests,
    /// Full clones' root disks being copied.
    pub copies: crate::copies::FullCopies,
    /// Disks restored from backups (not live), each VM's in a task.
    pub restores: crate::copies::VmJobs,
    /// The exports of live restores' backups.
    pub live_restores: crate::backup::live::LiveRestores,
}

impl NodeContext {
    pub fn vm_dir(&self, vm_id: &str) -> VmDir {
        VmDir::new(&self.vms_root, vm_id)
    }

    /// The secret peers' agent endpoints expect (empty until registered).
    pub fn agent_secret(&self) -> String {
        self.secret.read().clone().unwrap_or_default()
    }
}

/// The VMs of this node that a migration owns while it runs. A VM is in the
/// set exactly as long as its [`MigrationClaim`] lives, so a claim ends with
/// the migration however it ends (return, error, panic, abort).
#[derive(Clone, Default)]
pub struct MigrationClaims(Arc<Mutex<HashSet<String>>>);

impl MigrationClaims {
    /// Claims `vm_id` for a migration; `None` while another one holds it.
    pub fn claim(&self, vm_id: &str) -> Option<MigrationClaim> {
        self.0.lock().insert(vm_id.to_string()).then(|| MigrationClaim {
            claims: self.clone(),
            vm_id: vm_id.to_string(),
        })
    }

    /// Whether a migration owns `vm_id` (then nothing else may touch its QEMU).
    pub fn is_claimed(&self, vm_id: &str) -> bool {
        self.0.lock().contains(vm_id)
    }
}

/// A migration's hold on a VM: released when dropped.
#[must_use = "the claim is released when dropped"]
pub struct MigrationClaim {
    claims: MigrationClaims,
    vm_id: String,
}

impl Drop for MigrationClaim {
    fn drop(&mut self) {
        self.claims.0.lock().remove(&self.vm_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_and_ends_when_dropped() {
        let claims = MigrationClaims::default();
        let claim = claims.claim("vm-1").expect("first claim");
        assert!(claims.is_claimed("vm-1"));
        assert!(!claims.is_claimed("vm-2"));
        assert!(claims.claim("vm-1").is_none(), "a second migration of the same VM");
        drop(claim);
        assert!(!claims.is_claimed("vm-1"));
        assert!(claims.claim("vm-1").is_some());
    }
}
