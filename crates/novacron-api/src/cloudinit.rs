//! cloud-init for disk-image VMs: what the user asks for at create, its
//! checks, and the files of the NoCloud seed the node agent writes.
//!
//! The seed is an ISO 9660 volume labelled `cidata` (not the NoCloud network
//! datasource): it needs no network, no metadata server reachable from every
//! VM network, and works unchanged with the distributions' own cloud images.
//! Its files are JSON (a subset of the YAML cloud-init reads), so no value
//! a user gives can change the structure around it.

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::error::FieldError;

/// user-data as large as Nova and Proxmox take.
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;
pub const MAX_SSH_KEYS: usize = 32;
const MAX_SSH_KEY_BYTES: usize = 16 * 1024;

/// What cloud-init gets on the VM's first boot. Fixed at create: cloud-init
/// acts on it once per instance, so a change would only mislead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudInitSpec {
    /// user-data as given: `#cloud-config` YAML, a script (`#!`), or MIME
    /// multipart; at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 65536)]
    pub user_data: Option<String>,
    /// OpenSSH public keys for the image's default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 32)]
    pub ssh_authorized_keys: Vec<String>,
    /// Guest host name (RFC 1123, may be a FQDN); default: the VM's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 253)]
    pub hostname: Option<String>,
    /// crypt(3) hash (`$6$...`, `$y$...`) of the default user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 512)]
    pub password_hash: Option<String>,
}

/// Checks a cloud-init spec; `field` is where it sits in the request.
pub fn validate(field: &str, spec: &CloudInitSpec) -> Result<(), FieldError> {
    if let Some(data) = &spec.user_data {
        if data.len() > MAX_USER_DATA_BYTES {
            return Err(FieldError::new(
                format!("{field}.user_data"),
                format!("user-data is {} bytes; at most {MAX_USER_DATA_BYTES}", data.len()),
            ));
        }
    }
    if spec.ssh_authorized_keys.len() > MAX_SSH_KEYS {
        return Err(FieldError::new(
            format!("{field}.ssh_authorized_keys"),
            format!("at most {MAX_SSH_KEYS} keys"),
        ));
    }
    for (i, key) in spec.ssh_authorized_keys.iter().enumerate() {
        ssh_public_key(key).map_err(|m| FieldError::new(format!("{field}.ssh_authorized_keys[{i}]"), m))?;
    }
    if let Some(h) = &spec.hostname {
        hostname(h).map_err(|m| FieldError::new(format!("{field}.hostname"), m))?;
    }
    if let Some(h) = &spec.password_hash {
        password_hash(h).map_err(|m| FieldError::new(format!("{field}.password_hash"), m))?;
    }
    Ok(())
}

/// One line of an `authorized_keys` file: `TYPE BASE64 [COMMENT]`.
fn ssh_public_key(key: &str) -> Result<(), String> {
    const TYPES: [&str; 8] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-dss",
    ];
    let mut parts = key.split_ascii_whitespace();
    let (kind, body) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body_ok = body.len() >= 16 && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if key.len() > MAX_SSH_KEY_BYTES || key.chars().any(|c| c.is_control()) || !TYPES.contains(&kind) || !body_ok {
        return Err("not an OpenSSH public key (one line: TYPE BASE64 [COMMENT], e.g. from ssh-keygen)".into());
    }
    Ok(())
}

/// A host name: dot-separated labels of `a-z0-9-` (any case), each 1-63
/// and not starting or ending with `-`; 253 in all.
fn hostname(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{name:?} is not a host name: dot-separated labels of letters, digits and '-', 1-63 each"
        ));
    }
    Ok(())
}

/// A crypt(3) hash as `mkpasswd` or `openssl passwd -6` print it.
fn password_hash(hash: &str) -> Result<(), String> {
    let known = ["$1$", "$5$", "$6$", "$y$", "$gy$", "$2b$", "$2y$"];
    let chars_ok = hash
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"$./=,-".contains(&b));
    if !known.iter().any(|p| hash.starts_with(p)) || !chars_ok || hash.len() < 13 || hash.len() > 512 {
        return Err("not a password hash: give crypt(3) output such as `mkpasswd -m sha-512` or `openssl passwd -6` prints, never the password".into());
    }
    Ok(())
}

/// One NIC as the guest should configure it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedNic {
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u32,
    /// The gateway answers DNS (the network serves DHCP and DNS).
    pub gateway_dns: bool,
}

/// The files of a NoCloud seed, in the order they go on the volume.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub vendor_data: String,
    /// Absent for a VM without NICs (cloud-init then keeps its fallback).
    pub network_config: Option<String>,
}

impl SeedFiles {
    /// `(file name, contents)` of every file.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![
            ("meta-data", self.meta_data.as_str()),
            ("user-data", self.user_data.as_str()),
            ("vendor-data", self.vendor_data.as_str()),
        ];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.as_str()));
        }
        files
    }
}

/// The seed of a VM: its id is the instance id (a clone, a new VM, runs
/// cloud-init's per-instance steps again: new host keys, machine id), its
/// name the default host name. NICs are ordered by slot and named `eth0`,
/// `eth1`, ... in that order; the first one carries the default route.
pub fn seed_files(vm_id: &str, vm_name: &str, spec: Option<&CloudInitSpec>, nics: &[SeedNic]) -> SeedFiles {
    let empty = CloudInitSpec::default();
    let spec = spec.unwrap_or(&empty);
    let meta = json!({
        "instance-id": vm_id,
        "local-hostname": spec.hostname.as_deref().unwrap_or(vm_name),
        "public-keys": spec.ssh_authorized_keys,
    });
    // The platform's part goes in vendor-data: user-data stays exactly what
    // the user gave, and overrides it where both speak.
    // A clone's disk carries its template's machine id: each instance
    // makes its own once (cloud-init makes the SSH host keys itself).
    let mut vendor = json!({
        "bootcmd": [[
            "cloud-init-per", "instance", "novacron-machine-id", "sh", "-c",
            "rm -f /etc/machine-id /var/lib/dbus/machine-id && systemd-machine-id-setup"
        ]],
    });
    if let Some(hash) = &spec.password_hash {
        vendor["password"] = json!(hash);
        vendor["chpasswd"] = json!({ "expire": false });
    }
    let network_config = (!nics.is_empty()).then(|| {
        let mut ethernets = serde_json::Map::new();
        for (i, nic) in nics.iter().enumerate() {
            let mut eth = json!({
                "match": { "macaddress": nic.mac.to_ascii_lowercase() },
                "set-name": format!("eth{i}"),
                "addresses": [format!("{}/{}", nic.ip, nic.prefix)],
                "mtu": nic.mtu,
            });
            if i == 0 {
                eth["gateway4"] = json!(nic.gateway.to_string());
            }
            if nic.gateway_dns {
                eth["nameservers"] = json!({ "addresses": [nic.gateway.to_string()] });
            }
            ethernets.insert(format!("eth{i}"), eth);
        }
        json!({ "version": 2, "ethernets": ethernets }).to_string() + "\n"
    });
    SeedFiles {
        meta_data: meta.to_string() + "\n",
        user_data: spec
            .user_data
            .clone()
            .unwrap_or_else(|| "#cloud-config\n{}\n".to_string()),
        vendor_data: format!("#cloud-config\n{vendor}\n"),
        network_config,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJyhmNesneRg8rOZ6LF1FXkR48HLHKYIADeNQnUMKLcY me@host";

    #[test]
    fn good_input_passes_and_bad_input_names_its_field() {
        let good = CloudInitSpec {
            user_data: Some("#cloud-config\nruncmd: [[touch, /x]]\n".into()),
            ssh_authorized_keys: vec![KEY.into()],
            hostname: Some("web-1.example.org".into()),
            password_hash: Some("$6$salt$Hx5Hd1kJ0W2xq4Wg0e3g3Uv5cHc9cS0bq9w1pQ0".into()),
        };
        assert_eq!(validate("spec.cloud_init", &good), Ok(()));
        let cases: Vec<(CloudInitSpec, &str)> = vec![
            (
                CloudInitSpec {
                    user_data: Some("x".repeat(MAX_USER_DATA_BYTES + 1)),
                    ..good.clone()
                },
                "spec.cloud_init.user_data",
            ),
            (
                CloudInitSpec {
                    ssh_authorized_keys: vec![KEY.into(), "hunter2".into()],
                    ..good.clone()
                },
                "spec.cloud_init.ssh_authorized_keys[1]",
            ),
            (
                CloudInitSpec {
                    ssh_authorized_keys: vec![format!("{KEY}\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB x")],
                    ..good.clone()
                },
                "spec.cloud_init.ssh_authorized_keys[0]",
            ),
            (
                CloudInitSpec {
                    hostname: Some("-bad".into()),
                    ..good.clone()
                },
                "spec.cloud_init.hostname",
            ),
            (
                CloudInitSpec {
                    hostname: Some("a..b".into()),
                    ..good.clone()
                },
                "spec.cloud_init.hostname",
            ),
            (
                CloudInitSpec {
                    password_hash: Some("hunter2".into()),
                    ..good.clone()
                },
                "spec.cloud_init.password_hash",
            ),
            (
                CloudInitSpec {
                    password_hash: Some("$6$salt$abc:def\n".into()),
                    ..good.clone()
                },
                "spec.cloud_init.password_hash",
            ),
        ];
        for (spec, field) in cases {
            let err = validate("spec.cloud_init", &spec).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn seed_carries_identity_keys_and_addresses_as_json() {
        let spec = CloudInitSpec {
            ssh_authorized_keys: vec![KEY.into()],
            password_hash: Some("$6$s$h\"quoted".into()),
            ..Default::default()
        };
        let nics = [
            SeedNic {
                mac: "52:54:0A:14:00:05".into(),
                ip: "10.20.0.5".parse().expect("ip"),
                prefix: 24,
                gateway: "10.20.0.1".parse().expect("ip"),
                mtu: 1450,
                gateway_dns: true,
            },
            SeedNic {
                mac: "52:54:0a:15:00:07".into(),
                ip: "10.21.0.7".parse().expect("ip"),
                prefix: 16,
                gateway: "10.21.0.1".parse().expect("ip"),
                mtu: 1400,
                gateway_dns: false,
            },
        ];
        let seed = seed_files("0f3c", "web", Some(&spec), &nics);
        let meta: serde_json::Value = serde_json::from_str(&seed.meta_data).expect("meta-data is JSON");
        assert_eq!(meta["instance-id"], "0f3c");
        assert_eq!(meta["local-hostname"], "web");
        assert_eq!(meta["public-keys"][0], KEY);
        assert_eq!(seed.user_data, "#cloud-config\n{}\n");
        let vendor = seed.vendor_data.strip_prefix("#cloud-config\n").expect("header");
        let vendor: serde_json::Value = serde_json::from_str(vendor).expect("vendor-data is JSON");
        assert_eq!(vendor["password"], "$6$s$h\"quoted");
        assert_eq!(vendor["bootcmd"][0][2], "novacron-machine-id");
        let net: serde_json::Value =
            serde_json::from_str(seed.network_config.as_deref().expect("network-config")).expect("JSON");
        assert_eq!(net["version"], 2);
        let eth0 = &net["ethernets"]["eth0"];
        assert_eq!(eth0["match"]["macaddress"], "52:54:0a:14:00:05");
        assert_eq!(eth0["addresses"][0], "10.20.0.5/24");
        assert_eq!(eth0["gateway4"], "10.20.0.1");
        assert_eq!(eth0["nameservers"]["addresses"][0], "10.20.0.1");
        let eth1 = &net["ethernets"]["eth1"];
        assert_eq!(eth1["gateway4"], serde_json::Value::Null);
        assert_eq!(eth1["nameservers"], serde_json::Value::Null);
        assert_eq!(eth1["mtu"], 1400);
        assert_eq!(seed.entries().len(), 4);

        let bare = seed_files("1", "db", None, &[]);
        assert!(bare.network_config.is_none());
        assert_eq!(bare.entries().len(), 3);
        let user = CloudInitSpec {
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            hostname: Some("db.example.org".into()),
            ..Default::default()
        };
        let given = seed_files("1", "db", Some(&user), &[]);
        assert_eq!(given.user_data, "#!/bin/sh\necho hi\n");
        assert!(given.meta_data.contains("\"local-hostname\":\"db.example.org\""));
    }
}
