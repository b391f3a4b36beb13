//! Address management: VNIs for networks, addresses and MACs for NICs.
//! Each unique value is a [`Reservation`] named after it, so the store's
//! create-if-absent decides between concurrent claimants (compare-and-swap
//! without a lock, which also holds with several servers on one store).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use novacron_api::network::{Mac, VNI_RANGE};
use novacron_api::{Metadata, Network, NicSpec, Reservation, Vm};
use novacron_store::{SharedStore, StoreError, StoreExt};

use crate::error::{ApiError, ApiResult};

/// Claims `key` for `owner`; false when someone holds it already.
async fn claim(store: &SharedStore, key: &str, network: &str, owner: &str) -> ApiResult<bool> {
    let r = Reservation {
        metadata: Metadata::new(key, Default::default()),
        network: network.to_string(),
        owner: owner.to_string(),
    };
    match store.create_obj(&r).await {
        Ok(_) => Ok(true),
        Err(StoreError::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reservations whose name starts with `prefix`.
async fn reserved_with_prefix(store: &SharedStore, prefix: &str) -> ApiResult<Vec<Reservation>> {
    Ok(store
        .list_all::<Reservation>()
        .await?
        .into_iter()
        .filter(|r| r.metadata.name.starts_with(prefix))
        .collect())
}

/// The lowest free VNI, claimed for the network `network_id`.
pub async fn claim_vni(store: &SharedStore, network_id: &str) -> ApiResult<u32> {
    let used: HashSet<String> = reserved_with_prefix(store, "vni-")
        .await?
        .into_iter()
        .map(|r| r.metadata.name)
        .collect();
    for vni in VNI_RANGE {
        let key = Reservation::vni_key(vni);
        if !used.contains(&key) && claim(store, &key, network_id, network_id).await? {
            return Ok(vni);
        }
    }
    Err(ApiError::conflict("every VXLAN network identifier is in use"))
}

/// Addresses and MACs of NICs that are being claimed, to give back if the
/// VM is not created after all.
#[derive(Default)]
pub struct Claimed {
    keys: Vec<String>,
}

impl Claimed {
    /// Gives everything back (a failed create).
    pub async fn release(self, store: &SharedStore) {
        for key in self.keys {
            if let Err(e) = store.delete_obj::<Reservation>(&key, None).await {
                tracing::warn!(reservation = %key, error = %e, "cannot release a reservation");
            }
        }
    }
}

/// Fills in each NIC's address and MAC: checks the requested ones, picks
/// free ones otherwise, and claims them for the VM `vm_id`. On an error
/// everything claimed so far is released.
pub async fn claim_nics(store: &SharedStore, project: &str, vm_id: &str, nics: &mut [NicSpec]) -> ApiResult<Claimed> {
    claim_nics_from(store, project, vm_id, 0, nics).await
}

/// [`claim_nics`] for NICs that will be `spec.nics[first..]` of the VM
/// (errors name those fields).
pub async fn claim_nics_from(
    store: &SharedStore,
    project: &str,
    vm_id: &str,
    first: usize,
    nics: &mut [NicSpec],
) -> ApiResult<Claimed> {
    let mut claimed = Claimed::default();
    for (i, nic) in nics.iter_mut().enumerate() {
        if let Err(e) = claim_nic(store, project, vm_id, first + i, nic, &mut claimed).await {
            claimed.release(store).await;
            return Err(e);
        }
    }
    Ok(claimed)
}

async fn claim_nic(
    store: &SharedStore,
    project: &str,
    vm_id: &str,
    i: usize,
    nic: &mut NicSpec,
    claimed: &mut Claimed,
) -> ApiResult<()> {
    let field = |f: &str| format!("spec.nics[{i}].{f}");
    let network = match store.get_obj::<Network>(&nic.network).await? {
        Some(n) if n.metadata.project == project && n.metadata.deletion_requested_at.is_none() => n,
        _ => {
            return Err(ApiError::invalid(
                &field("network"),
                format!("unknown network {:?} in project {project:?}", nic.network),
            ))
        }
    };
    let net_id = network.metadata.id.clone();
    let subnet = network
        .subnet()
        .map_err(|e| ApiError::invalid(&field("network"), e.message))?;
    let gateway = network
        .gateway()
        .map_err(|e| ApiError::invalid(&field("network"), e.message))?;
    let ip = match &nic.ip {
        Some(asked) => {
            let ip: Ipv4Addr = asked
                .parse()
                .map_err(|_| ApiError::invalid(&field("ip"), format!("{asked:?} is not an IPv4 address")))?;
            if !subnet.is_host(ip) {
                return Err(ApiError::invalid(
                    &field("ip"),
                    format!(
                        "{ip} is not a host address of network {:?} ({subnet})",
                        network.metadata.name
                    ),
                ));
            }
            if ip == gateway {
                return Err(ApiError::invalid(
                    &field("ip"),
                    format!("{ip} is the network's gateway"),
                ));
            }
            let key = Reservation::ip_key(&net_id, ip);
            if !claim(store, &key, &net_id, vm_id).await? {
                return Err(ApiError::conflict(format!(
                    "address {ip} of network {:?} is in use",
                    network.metadata.name
                ))
                .with_field(field("ip")));
            }
            claimed.keys.push(key);
            ip
        }
        None => {
            let prefix = format!("ip-{net_id}-");
            let used: HashSet<String> = reserved_with_prefix(store, &prefix)
                .await?
                .into_iter()
                .map(|r| r.metadata.name)
                .collect();
            let mut got = None;
            for ip in subnet.hosts().filter(|ip| *ip != gateway) {
                let key = Reservation::ip_key(&net_id, ip);
                // A concurrent create may take an address between the list
                // and the claim: the claim fails and the next one is tried.
                if !used.contains(&key) && claim(store, &key, &net_id, vm_id).await? {
                    claimed.keys.push(key);
                    got = Some(ip);
                    break;
                }
            }
            got.ok_or_else(|| {
                ApiError::conflict(format!("network {:?} has no free address left", network.metadata.name))
                    .with_field(field("network"))
            })?
        }
    };
    let mac = match &nic.mac {
        Some(asked) => {
            let mac: Mac = asked.parse().map_err(|e: String| ApiError::invalid(&field("mac"), e))?;
            let key = Reservation::mac_key(mac);
            if !claim(store, &key, &net_id, vm_id).await? {
                return Err(ApiError::conflict(format!("MAC {mac} is in use")).with_field(field("mac")));
            }
            claimed.keys.push(key);
            mac
        }
        None => {
            let mac = Mac::for_ip(ip);
            let key = Reservation::mac_key(mac);
            // Someone asked for this MAC by hand: the NIC gets a random one.
            let mac = if claim(store, &key, &net_id, vm_id).await? {
                claimed.keys.push(key);
                mac
            } else {
                random_mac(store, &net_id, vm_id, claimed).await?
            };
            mac
        }
    };
    nic.ip = Some(ip.to_string());
    nic.mac = Some(mac.to_string());
    Ok(())
}

async fn random_mac(store: &SharedStore, net_id: &str, vm_id: &str, claimed: &mut Claimed) -> ApiResult<Mac> {
    for _ in 0..16 {
        let mut tail = [0u8; 3];
        crate::auth::random_bytes(&mut tail).map_err(|e| ApiError::internal("Cannot pick a MAC", &e))?;
        let mac = Mac([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]);
        let key = Reservation::mac_key(mac);
        if claim(store, &key, net_id, vm_id).await? {
            claimed.keys.push(key);
            return Ok(mac);
        }
    }
    Err(ApiError::conflict("cannot find a free MAC"))
}

/// Releases everything held by `owner` (a deleted VM or network). Failures
/// are logged: a leftover reservation only keeps a value from being reused.
pub async fn release_owner(store: &SharedStore, owner: &str) {
    let held = match store.list_all::<Reservation>().await {
        Ok(all) => all.into_iter().filter(|r| r.owner == owner),
        Err(e) => {
            tracing::warn!(owner, error = %e, "cannot list reservations to release");
            return;
        }
    };
    for r in held {
        match store
            .delete_obj::<Reservation>(&r.metadata.name, Some(r.metadata.resource_version))
            .await
        {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => tracing::warn!(reservation = %r.metadata.name, error = %e, "cannot release a reservation"),
        }
    }
}

/// How many addresses each network (by id) has taken.
pub async fn addresses_used_by_network(store: &SharedStore) -> ApiResult<std::collections::HashMap<String, u64>> {
    let mut used = std::collections::HashMap::new();
    for r in reserved_with_prefix(store, "ip-").await? {
        *used.entry(r.network).or_insert(0) += 1;
    }
    Ok(used)
}

/// The reservations a VM holds: those of the NICs in its spec and of the
/// NICs still plugged into its QEMU (a removed NIC keeps its address until
/// the guest has let it go). `networks` maps network names to ids.
fn held_by(vm: &Vm, networks: &HashMap<String, String>) -> HashSet<String> {
    let mut held = HashSet::new();
    let spec = vm
        .spec
        .nics
        .iter()
        .map(|n| (&n.network, n.ip.as_deref(), n.mac.as_deref()));
    let plugged = vm
        .status
        .nics
        .iter()
        .map(|n| (&n.network, Some(n.ip.as_str()), Some(n.mac.as_str())));
    for (network, ip, mac) in spec.chain(plugged) {
        if let (Some(net_id), Some(ip)) = (networks.get(network), ip.and_then(|ip| ip.parse().ok())) {
            held.insert(Reservation::ip_key(net_id, ip));
        }
        if let Some(mac) = mac.and_then(|m| m.parse::<Mac>().ok()) {
            held.insert(Reservation::mac_key(mac));
        }
    }
    held
}

async fn network_ids(store: &SharedStore) -> Result<HashMap<String, String>, StoreError> {
    Ok(store
        .list_all::<Network>()
        .await?
        .into_iter()
        .map(|n| (n.metadata.name, n.metadata.id))
        .collect())
}

/// Releases the addresses and MACs of a VM's NICs that are neither in its
/// spec nor plugged into its QEMU any more (removed NICs the guest has let
/// go). The caller holds the lock NIC adds claim under, and passes the VM
/// as read under it (so a NIC being added, claimed but not yet in the
/// spec, is not taken for a removed one). Failures are logged; the next
/// call or server start retries.
pub async fn release_detached(store: &SharedStore, vm: &Vm) {
    match release_unheld(store, vm, chrono::Duration::zero()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(vm = %vm.metadata.name, released = n, "released the addresses of removed NICs"),
        Err(e) => tracing::warn!(vm = %vm.metadata.name, error = %e, "cannot release the addresses of removed NICs"),
    }
}

async fn release_unheld(store: &SharedStore, vm: &Vm, grace: chrono::Duration) -> Result<usize, StoreError> {
    let held = held_by(vm, &network_ids(store).await?);
    release_where(store, grace, |r| {
        r.owner == vm.metadata.id && !held.contains(&r.metadata.name)
    })
    .await
}

/// Releases the reservations older than `grace` that `unheld` picks.
async fn release_where(
    store: &SharedStore,
    grace: chrono::Duration,
    unheld: impl Fn(&Reservation) -> bool,
) -> Result<usize, StoreError> {
    let cutoff = chrono::Utc::now() - grace;
    let mut released = 0;
    for r in store.list_all::<Reservation>().await? {
        if !unheld(&r) || r.metadata.created_at > cutoff {
            continue;
        }
        match store
            .delete_obj::<Reservation>(&r.metadata.name, Some(r.metadata.resource_version))
            .await
        {
            Ok(_) => released += 1,
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(released)
}

/// Releases what no VM or network holds any more: reservations left by a
/// server that stopped between deleting a VM (or removing a NIC) and
/// releasing its addresses. Run at start; reservations younger than
/// `grace` are left alone (a create claims before its VM is stored).
pub async fn release_orphans(store: &SharedStore, grace: chrono::Duration) -> Result<usize, StoreError> {
    let networks = network_ids(store).await?;
    let held: HashMap<String, HashSet<String>> = store
        .list_all::<Vm>()
        .await?
        .into_iter()
        .map(|v| (v.metadata.id.clone(), held_by(&v, &networks)))
        .collect();
    let network_owners: HashSet<&String> = networks.values().collect();
    release_where(store, grace, |r| {
        !network_owners.contains(&r.owner) && !held.get(&r.owner).is_some_and(|keys| keys.contains(&r.metadata.name))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A store holding one network (no VNI claimed).
    async fn store_with_network(name: &str, subnet: &str) -> (SharedStore, Network) {
        let store: SharedStore = Arc::new(novacron_store::SqliteStore::in_memory().unwrap());
        let gateway = subnet.replace(".0/24", ".1");
        let net = Network {
            metadata: Metadata::new(name, Default::default()),
            spec: novacron_api::NetworkSpec {
                subnet: subnet.into(),
                gateway,
                dhcp: true,
                nat: false,
                mtu: 1450,
            },
            status: Default::default(),
        };
        let net = store.create_obj(&net).await.unwrap();
        (store, net)
    }

    /// The names of every reservation, sorted.
    async fn reserved(store: &SharedStore) -> Vec<String> {
        let mut names: Vec<String> = store
            .list_all::<Reservation>()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.metadata.name)
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn orphaned_reservations_are_released_and_held_ones_kept() {
        let (store, net) = store_with_network("red", "10.31.0.0/24").await;
        let ip = |last| Reservation::ip_key(&net.metadata.id, Ipv4Addr::new(10, 31, 0, last));
        assert!(
            claim(&store, &Reservation::vni_key(4096), &net.metadata.id, &net.metadata.id)
                .await
                .unwrap()
        );
        assert!(claim(&store, &ip(2), &net.metadata.id, "gone-vm").await.unwrap());
        // Within the grace period nothing goes; after it, only the orphan.
        assert_eq!(release_orphans(&store, chrono::Duration::seconds(60)).await.unwrap(), 0);
        assert_eq!(release_orphans(&store, chrono::Duration::zero()).await.unwrap(), 1);
        assert_eq!(reserved(&store).await, vec![Reservation::vni_key(4096)]);
    }

    #[tokio::test]
    async fn a_removed_nic_keeps_its_address_until_it_is_unplugged() {
        let (store, net) = store_with_network("blue", "10.32.0.0/24").await;
        let mut vm = Vm {
            metadata: Metadata::new("vm", Default::default()),
            spec: novacron_api::VmSpec::new("img", 1, 64),
            status: Default::default(),
        };
        vm.spec.nics = vec![NicSpec::on("blue"), NicSpec::on("blue")];
        claim_nics(&store, "default", &vm.metadata.id, &mut vm.spec.nics)
            .await
            .unwrap();
        let removed = vm.spec.nics.pop().unwrap();
        let plugged = |n: &NicSpec| novacron_api::NicStatus {
            network: n.network.clone(),
            ip: n.ip.clone().unwrap(),
            mac: n.mac.clone().unwrap(),
            slot: 1,
        };
        vm.status.nics = vec![plugged(&vm.spec.nics[0]), plugged(&removed)];
        let zero = chrono::Duration::zero();
        // Removed but plugged still: nothing goes.
        assert_eq!(release_unheld(&store, &vm, zero).await.unwrap(), 0);
        // Unplugged: its address and MAC go (unless claimed just now); the
        // other NIC, out of the spec but plugged, keeps its own.
        vm.spec.nics.clear();
        vm.status.nics.pop();
        assert_eq!(
            release_unheld(&store, &vm, chrono::Duration::seconds(60))
                .await
                .unwrap(),
            0
        );
        assert_eq!(release_unheld(&store, &vm, zero).await.unwrap(), 2);
        let ip: Ipv4Addr = vm.status.nics[0].ip.parse().unwrap();
        let mut want = vec![
            Reservation::ip_key(&net.metadata.id, ip),
            Reservation::mac_key(vm.status.nics[0].mac.parse().unwrap()),
        ];
        want.sort();
        assert_eq!(reserved(&store).await, want);
    }
}
