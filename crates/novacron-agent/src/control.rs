//! The loop every agent runs: learn of this node's VMs from the server,
//! drive each toward its spec through a `Driver`, write back what happened.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use novacron_api::error::chain;
use novacron_api::Vm;
use novacron_client::{watcher, Client, Selector};

use crate::reconcile::Outcome;

/// What the control loop drives on one node: QEMU processes (`Reconciler`),
/// or, for scale tests and benches only, the simulated hypervisor of
/// `hollow`. Everything else in the loop is the same code.
pub(crate) trait Driver: Send {
    fn node_name(&self) -> &str;
    /// A migration holds the VM: the loop leaves it to the migration.
    fn is_claimed(&self, vm_id: &str) -> bool;
    /// One step toward `vm`'s spec, and the status that results.
    fn reconcile(&mut self, vm: &Vm) -> impl Future<Output = Outcome> + Send;
    /// Forgets what it keeps in memory of VMs not in `ids`.
    fn retain(&mut self, ids: &HashSet<String>);
    /// Removes the state of VMs not in `keep` (deleted while the agent was away).
    fn remove_orphans(&mut self, keep: &HashSet<String>) -> impl Future<Output = ()> + Send;
    /// Stops and removes what this node holds of VM `id`.
    fn remove_vm_state(&mut self, id: &str) -> impl Future<Output = ()> + Send;
    /// Resolves when work outside the loop ended (a disk copy, a restore).
    fn work_ended(&self) -> impl Future<Output = ()> + Send;
}

/// Learns of this node's VMs from a watcher (the server sends only VMs bound
/// here, and a VM that leaves as deleted); reconciles on every change, when
/// a VM's disk copy or restore ends, and on a 1 s tick (which also notices
/// QEMU processes that died).
pub(crate) async fn control_loop<D: Driver>(mut rec: D, client: Client) {
    let (mut listed, mut orphans_checked) = (false, false);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut vms = std::pin::pin!(watcher::watch::<Vm>(
        client.clone(),
        Selector::fields(format!("status.node={}", rec.node_name()))
    ));
    let mut mine: HashMap<String, Vm> = HashMap::new();
    loop {
        tokio::select! {
            ev = vms.next() => match ev {
                Some(watcher::Event::Restarted(all)) => {
                    let now: HashMap<String, Vm> = all.into_iter().map(|v| (v.metadata.name.clone(), v)).collect();
                    let gone: Vec<Vm> = mine.values().filter(|v| !now.contains_key(&v.metadata.name)).cloned().collect();
                    for vm in gone {
                        left_this_node(&mut rec, &vm).await;
                    }
                    mine = now;
                    listed = true;
                }
                Some(watcher::Event::Applied(vm)) => {
                    mine.insert(vm.metadata.name.clone(), vm);
                }
                Some(watcher::Event::Deleted(vm)) => {
                    mine.remove(&vm.metadata.name);
                    left_this_node(&mut rec, &vm).await;
                }
                None => return,
            },
            _ = tick.tick() => {}
            _ = rec.work_ended() => {}
        }
        // Once, before the first reconcile: state left by VMs deleted or moved
        // away while this agent was down.
        if listed && !orphans_checked {
            orphans_checked = remove_orphans(&mut rec, &client, &mine).await;
        }
        if orphans_checked {
            reconcile_all(&mut rec, &client, &mut mine).await;
        }
    }
}

/// A VM was deleted, or is now bound to another node: nothing of it may keep
/// running here (a forced delete removes the record before any cleanup). A
/// migration that holds the VM cleans up itself.
async fn left_this_node<D: Driver>(rec: &mut D, vm: &Vm) {
    if !rec.is_claimed(&vm.metadata.id) {
        rec.remove_vm_state(&vm.metadata.id).await;
    }
}

/// Removes the state of VMs this node no longer runs, keeping VMs bound here
/// and VMs a migration is bringing here. False if that cannot be known yet.
async fn remove_orphans<D: Driver>(rec: &mut D, client: &Client, mine: &HashMap<String, Vm>) -> bool {
    let incoming = Selector::fields(format!("status.target_node={}", rec.node_name()));
    let Ok((migrations, _)) = client.list_all::<novacron_api::Migration>(&incoming).await else {
        return false;
    };
    let mut keep: HashSet<String> = mine.values().map(|v| v.metadata.id.clone()).collect();
    for m in migrations.iter().filter(|m| !m.status.phase.is_final()) {
        match client.get::<Vm>(&m.spec.vm).await {
            Ok(vm) => {
                keep.insert(vm.metadata.id);
            }
            Err(e) if e.is_not_found() => {}
            Err(_) => return false,
        }
    }
    rec.remove_orphans(&keep).await;
    true
}

/// Reconciles every VM of this node but those a migration claims.
async fn reconcile_all<D: Driver>(rec: &mut D, client: &Client, mine: &mut HashMap<String, Vm>) {
    // Forget VMs that left this node (deleted, or migrated away).
    let ids: HashSet<String> = mine.values().map(|v| v.metadata.id.clone()).collect();
    rec.retain(&ids);
    let names: Vec<String> = mine.keys().cloned().collect();
    for name in names {
        let Some(vm) = mine.get(&name).cloned() else {
            continue;
        };
        // The migration driver owns a VM while it moves.
        if rec.is_claimed(&vm.metadata.id) {
            continue;
        }
        match rec.reconcile(&vm).await {
            Outcome::Finalized => {
                mine.remove(&name);
                match client.finalize_vm(&name).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %chain(&e), "cannot finalize deletion")
                    }
                }
            }
            Outcome::Status(status) if *status != vm.status => {
                let mut updated = vm.clone();
                updated.status = *status;
                match client.put_vm_status(&name, &updated).await {
                    Ok(v) => {
                        mine.insert(name, v);
                    }
                    Err(e) if e.is_conflict() || e.is_not_found() => {
                        // Someone else wrote first: take the fresh object and go again.
                        match client.get::<Vm>(&name).await {
                            Ok(v) => {
                                mine.insert(name, v);
                            }
                            Err(e) if e.is_not_found() => {
                                mine.remove(&name);
                            }
                            Err(_) => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %chain(&e), "cannot write VM status")
                    }
                }
            }
            Outcome::Status(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use novacron_api::{Metadata, VmSpec, VmStatus};

    use super::*;
    use crate::node::{MigrationClaims, NodeContext};
    use crate::reconcile::Reconciler;
    use crate::{images, network};

    fn reconciler(vms_root: PathBuf) -> Reconciler {
        let client = Client::new("http://127.0.0.1:9", "token").expect("client");
        let node = NodeContext {
            name: "node-1".into(),
            backup_key: None,
            qemu: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
            images: Arc::new(images::ImageCache::new(vms_root.join("images"))),
            volumes_root: vms_root.join("volumes"),
            peers: reqwest::Client::new(),
            vms_root,
            client,
            secret: Arc::default(),
            host: "127.0.0.1".into(),
            claims: MigrationClaims::default(),
            net: Arc::new(network::Overlay::new("node-1", None, PathBuf::from("/nonexistent"))),
            guests: Default::default(),
            copies: Default::default(),
            live_restores: Default::default(),
            restores: Default::default(),
        };
        Reconciler {
            node: Arc::new(node),
            runtimes: HashMap::new(),
        }
    }

    /// A VM whose deletion was asked for: one reconcile removes its (absent)
    /// files and drops it from the VMs of this node, without QEMU.
    fn deleted_vm() -> Vm {
        let mut metadata = Metadata::new("doomed", BTreeMap::new());
        metadata.deletion_requested_at = Some(chrono::Utc::now());
        Vm {
            metadata,
            spec: VmSpec::new("image", 1, 64),
            status: VmStatus::default(),
        }
    }

    #[tokio::test]
    async fn the_reconciler_leaves_a_claimed_vm_alone_until_the_claim_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rec = reconciler(dir.path().join("vms"));
        let client = rec.node.client.clone();
        let vm = deleted_vm();
        let mut mine = HashMap::from([(vm.metadata.name.clone(), vm.clone())]);

        let claim = rec.node.claims.claim(&vm.metadata.id).expect("claim");
        reconcile_all(&mut rec, &client, &mut mine).await;
        assert!(mine.contains_key("doomed"), "a claimed VM was reconciled");

        drop(claim);
        reconcile_all(&mut rec, &client, &mut mine).await;
        assert!(!mine.contains_key("doomed"), "the VM was not reconciled once released");
    }
}
