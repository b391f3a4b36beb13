//! Volumes: blank disks with a life of their own, attached to at most one
//! VM at a time and moved with it. A volume's data lives on one node: in
//! the directory of the VM it is attached to, or, detached, in that node's
//! volume pool (`status.node`), from where the next VM to attach it takes it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::types::Metadata;
use crate::validate::MAX_DISK_MIB;

/// How a VM's `status.reason` starts when its volumes could not be brought
/// to the spec (attach, detach or grow).
pub const VOLUME_CHANGE_FAILED: &str = "Volume change failed";

/// Volumes one VM may have; each has a fixed PCI slot (see [`pci_addr`]).
pub const MAX_VOLUMES: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub metadata: Metadata,
    pub spec: VolumeSpec,
    #[serde(default)]
    pub status: VolumeStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSpec {
    /// Size the guest sees; grows only.
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VolumePhase {
    /// Attached to no VM.
    #[default]
    Available,
    /// In a VM's spec (plugged once its agent has it).
    Attached,
    /// Detached from a VM whose agent has not let it go yet (the guest has
    /// not released the device).
    Detaching,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeStatus {
    /// Filled in on read from the VMs that hold it.
    #[serde(default)]
    pub phase: VolumePhase,
    /// The VM that holds it (filled in on read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The node holding its data: the VM's node while attached, else the
    /// node whose pool keeps it; none before it was first attached (no
    /// data yet: it is made blank on first attach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateVolume {
    /// DNS label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Owning project; defaults to the caller's token project, else `default`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: u64,
}

/// Body of `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResizeVolume {
    /// The new size: larger than the current one.
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: u64,
}

/// Body of `POST /v1/vms/{name}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttachVolume {
    /// Name or id of the volume.
    pub volume: String,
}

/// A volume in a VM's spec. The server fills it in at attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeAttachment {
    /// The volume's name.
    pub volume: String,
    /// The volume's id: names its file and its serial number in the guest.
    pub id: String,
    pub size_mib: u64,
    /// 0-7: fixes the PCI slot and QEMU's names for it.
    #[schema(maximum = 7)]
    pub slot: u8,
    /// Where the volume's data was when attached (none: it has none yet);
    /// the VM's agent takes it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
}

/// A volume a VM's agent holds: its file is in the VM's directory and, while
/// QEMU runs, the device is plugged. An entry here that has left the spec is
/// being detached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttachedVolume {
    pub volume: String,
    pub id: String,
    pub slot: u8,
    /// Size of the disk as QEMU (or the image) has it.
    pub size_mib: u64,
    /// Plugged into the running QEMU.
    #[serde(default)]
    pub plugged: bool,
}

/// QEMU block node of the volume in `slot`.
pub fn node_name(slot: u8) -> String {
    format!("vol{slot}")
}

/// QEMU device id of the volume in `slot`.
pub fn device_id(slot: u8) -> String {
    format!("vol{slot}-dev")
}

/// PCI slot of the volume in `slot`: after the NICs' 0x10-0x17.
pub fn pci_addr(slot: u8) -> String {
    format!("{:#x}", 0x18 + u32::from(slot))
}

/// The serial number the guest sees (`/dev/disk/by-id/virtio-SERIAL`):
/// the first 20 characters of the volume's id, virtio-blk's limit.
pub fn serial(id: &str) -> String {
    id.chars().take(20).collect()
}

/// Whether `id` is a volume id as the server makes them (a UUID): it names
/// files, so nothing else gets through.
pub fn valid_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The lowest slot neither the spec's volumes nor those still held (being
/// detached) use.
pub fn free_slot(spec: &[VolumeAttachment], held: &[AttachedVolume]) -> Option<u8> {
    (0..MAX_VOLUMES as u8).find(|s| !spec.iter().any(|a| a.slot == *s) && !held.iter().any(|h| h.slot == *s))
}

/// Whether the agent holds exactly the spec's volumes, at their sizes: no
/// attach, detach or resize is under way.
pub fn settled(spec: &[VolumeAttachment], held: &[AttachedVolume]) -> bool {
    spec.len() == held.len()
        && spec.iter().all(|a| {
            held.iter()
                .any(|h| h.id == a.id && h.slot == a.slot && h.size_mib == a.size_mib)
        })
}

pub fn size(field: &str, size_mib: u64) -> Result<(), FieldError> {
    if size_mib == 0 || size_mib > MAX_DISK_MIB {
        return Err(FieldError::new(
            field,
            format!("volume size must be between 1 and {MAX_DISK_MIB} MiB"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(slot: u8, size_mib: u64) -> VolumeAttachment {
        VolumeAttachment {
            volume: format!("v{slot}"),
            id: format!("id{slot}"),
            size_mib,
            slot,
            from_node: None,
        }
    }

    fn held(slot: u8, size_mib: u64) -> AttachedVolume {
        AttachedVolume {
            volume: format!("v{slot}"),
            id: format!("id{slot}"),
            slot,
            size_mib,
            plugged: true,
        }
    }

    #[test]
    fn slots_skip_those_in_use_or_being_released() {
        assert_eq!(free_slot(&[], &[]), Some(0));
        assert_eq!(free_slot(&[att(0, 1)], &[held(1, 1)]), Some(2));
        let full: Vec<_> = (0..8).map(|s| att(s, 1)).collect();
        assert_eq!(free_slot(&full, &[]), None);
        assert_eq!(pci_addr(7), "0x1f");
    }

    #[test]
    fn settled_means_same_volumes_at_the_same_sizes() {
        assert!(settled(&[], &[]));
        assert!(settled(&[att(0, 64)], &[held(0, 64)]));
        assert!(!settled(&[att(0, 128)], &[held(0, 64)]), "resize pending");
        assert!(!settled(&[], &[held(0, 64)]), "detach pending");
        assert!(!settled(&[att(0, 64)], &[]), "attach pending");
    }

    #[test]
    fn only_uuids_are_ids() {
        assert!(valid_id("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b"));
        assert!(!valid_id("../../etc/passwd-aaaaaaaaaaaaaaaaaaaaaaa"));
        assert_eq!(serial("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b"), "0f8e2a4c-1b2d-4e5f-8");
    }
}
