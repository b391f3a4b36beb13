//! The NoCloud seed of a disk-image VM: an ISO 9660 volume labelled
//! `cidata` with meta-data, user-data, vendor-data and network-config
//! (novacron_api::cloudinit), attached read-only as a CD-ROM.
//!
//! It is written again before every launch, on this node or the target of
//! a migration, from the VM's spec alone and with fixed timestamps: every
//! node makes the same bytes, so the seed follows the VM without copying.

use std::net::Ipv4Addr;
use std::path::Path;

use novacron_api::cloudinit::{seed_files, SeedNic};
use novacron_api::{Network, Vm};
use novacron_client::{Client, ClientError};

use crate::qemu::VmDir;

/// The ISO's timestamps (xorriso honours SOURCE_DATE_EPOCH).
const SEED_EPOCH: &str = "1700000000";

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("Cannot read network {name:?} for the cloud-init network config")]
    Network {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("NIC {0} has no address or a bad one from the server")]
    Address(usize),
    #[error("Network {0:?} has a bad subnet or gateway")]
    BadNetwork(String),
    #[error("Cannot write the cloud-init seed in {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot run xorriso (scripts/setup.sh installs it)")]
    Spawn(#[source] std::io::Error),
    #[error("xorriso failed to make the cloud-init seed: {0}")]
    Xorriso(String),
}

/// The addresses of the VM's NICs, in slot order, as the guest should set them.
async fn seed_nics(client: &Client, vm: &Vm) -> Result<Vec<SeedNic>, SeedError> {
    let mut by_slot: Vec<(u8, usize)> = (0..vm.spec.nics.len())
        .map(|i| (novacron_api::network::nic_slot(&vm.spec.nics, i), i))
        .collect();
    by_slot.sort();
    let mut nics = Vec::new();
    for (_, i) in by_slot {
        let nic = &vm.spec.nics[i];
        let net: Network = client.get(&nic.network).await.map_err(|source| SeedError::Network {
            name: nic.network.clone(),
            source,
        })?;
        let bad_net = || SeedError::BadNetwork(nic.network.clone());
        let subnet = net.subnet().map_err(|_| bad_net())?;
        let gateway = net.gateway().map_err(|_| bad_net())?;
        let ip: Ipv4Addr = nic
            .ip
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .ok_or(SeedError::Address(i))?;
        let mac = nic.mac.clone().ok_or(SeedError::Address(i))?;
        nics.push(SeedNic {
            mac,
            ip,
            prefix: subnet.prefix(),
            gateway,
            mtu: net.spec.mtu,
            gateway_dns: net.spec.dhcp,
        });
    }
    Ok(nics)
}

/// Writes `dir/seed.iso` for `vm` (replacing it atomically).
pub async fn write(client: &Client, vm: &Vm, dir: &VmDir) -> Result<(), SeedError> {
    let nics = seed_nics(client, vm).await?;
    let files = seed_files(&vm.metadata.id, &vm.metadata.name, vm.spec.cloud_init.as_ref(), &nics);
    let staging = dir.path.join("seed.d");
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SeedError::Io { path, source }
    };
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let mut args: Vec<String> = ["-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock", "-o"]
        .map(String::from)
        .to_vec();
    let partial = dir.path.join("seed.iso.partial");
    args.push(partial.display().to_string());
    for (name, body) in files.entries() {
        let path = staging.join(name);
        std::fs::write(&path, body).map_err(io(&path))?;
        args.push(path.display().to_string());
    }
    let out = tokio::process::Command::new("xorriso")
        .args(&args)
        .env("SOURCE_DATE_EPOCH", SEED_EPOCH)
        .output()
        .await
        .map_err(SeedError::Spawn);
    let _ = std::fs::remove_dir_all(&staging);
    let out = out?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(SeedError::Xorriso(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    std::fs::rename(&partial, dir.seed()).map_err(io(&dir.seed()))?;
    tracing::debug!(vm = %vm.metadata.name, nics = nics.len(), "wrote cloud-init seed");
    Ok(())
}
