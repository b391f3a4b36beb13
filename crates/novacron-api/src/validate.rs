//! Input validation shared by the server (authoritative) and the CLI (early feedback).

use std::collections::BTreeMap;

use crate::error::FieldError;
use crate::types::{CreateVm, VmSpec};

pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
pub const MAX_DISK_MIB: u64 = 64 * 1024 * 1024;

/// Names follow DNS-label rules (RFC 1123): 1–63 of `a-z0-9-`, alphanumeric at both ends.
pub fn name(field: &str, value: &str) -> Result<(), FieldError> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok = value
        .bytes()
        .next()
        .zip(value.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if value.is_empty() || value.len() > 63 || !ok_chars || !ends_ok {
        return Err(FieldError::new(
            field,
            format!("invalid name {value:?}: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"),
        ));
    }
    Ok(())
}

/// Label keys: an optional DNS-subdomain prefix and `/`, then a name of up to 63
/// characters of `A-Za-z0-9-_.`; values: the same characters, up to 63, may be empty.
pub fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), FieldError> {
    fn part_ok(s: &str, allow_empty: bool) -> bool {
        (allow_empty || !s.is_empty())
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    }
    for (k, v) in labels {
        let (prefix, key) = match k.rsplit_once('/') {
            Some((p, k)) => (Some(p), k),
            None => (None, k.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        });
        if !prefix_ok || !part_ok(key, false) {
            return Err(FieldError::new(field, format!("invalid label key {k:?}")));
        }
        if !part_ok(v, true) {
            return Err(FieldError::new(field, format!("invalid value {v:?} for label {k:?}")));
        }
    }
    Ok(())
}

pub fn vm_spec(spec: &VmSpec) -> Result<(), FieldError> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(FieldError::new(
            "spec.vcpus",
            format!("vcpus must be between 1 and {MAX_VCPUS}"),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(FieldError::new(
            "spec.memory_mib",
            format!("memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB"),
        ));
    }
    name("spec.image", &spec.image)?;
    for (field, size) in [
        ("spec.disk_mib", spec.disk_mib),
        ("spec.data_disk_mib", spec.data_disk_mib),
    ] {
        if let Some(size) = size {
            if size == 0 || size > MAX_DISK_MIB {
                return Err(FieldError::new(
                    field,
                    format!("disk size must be between 1 and {MAX_DISK_MIB} MiB"),
                ));
            }
        }
    }
    if spec.stop_timeout_s > 3600 {
        return Err(FieldError::new(
            "spec.stop_timeout_s",
            "stop timeout must be at most 3600 s",
        ));
    }
    if let Some(args) = &spec.kernel_args {
        if args.len() > 1024 || args.chars().any(|c| c.is_control()) {
            return Err(FieldError::new(
                "spec.kernel_args",
                "kernel arguments must be at most 1024 printable characters",
            ));
        }
    }
    for (field, value) in [("spec.machine", &spec.machine), ("spec.cpu_model", &spec.cpu_model)] {
        if let Some(v) = value {
            qemu_name(field, v)?;
        }
    }
    crate::network::nics(&spec.nics)?;
    if let Some(ci) = &spec.cloud_init {
        crate::cloudinit::validate("spec.cloud_init", ci)?;
    }
    if spec.cpu_model.as_deref() == Some("host") {
        return Err(FieldError::new(
            "spec.cpu_model",
            "CPU model \"host\" cannot migrate between hosts; name a model (e.g. qemu64, Nehalem)",
        ));
    }
    Ok(())
}

/// A QEMU machine type or CPU model name: what `-machine help` and
/// `-cpu help` print (letters, digits, `-`, `_`, `.`), at most 64 bytes.
pub fn qemu_name(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && value.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a QEMU name: letters, digits, '-', '_' and '.', at most 64 characters",
        ))
    }
}

pub fn create_vm(req: &CreateVm) -> Result<(), FieldError> {
    name("name", &req.name)?;
    labels("labels", &req.labels)?;
    if !req.spec.volumes.is_empty() {
        return Err(FieldError::new(
            "spec.volumes",
            "volumes are attached to a VM once it exists (POST /v1/vms/{name}/volumes)",
        ));
    }
    if req.spec.restore_from.is_some() {
        return Err(FieldError::new(
            "spec.restore_from",
            "VMs are restored from backups with POST /v1/backups/{store}/{vm}/{time}/restore",
        ));
    }
    vm_spec(&req.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_label_names() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
            assert!(name("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_rules() {
        let ok: BTreeMap<_, _> = [("zone".into(), "eu-1".into()), ("novacron.io/role".into(), "".into())].into();
        assert!(labels("labels", &ok).is_ok());
        let bad: BTreeMap<_, _> = [("bad key".into(), "v".into())].into();
        assert!(labels("labels", &bad).is_err());
    }
}
