//! A real distribution as the guest: the Debian 12 cloud image that
//! scripts/build-debian-image.sh builds boots from its own disk through
//! GRUB, cloud-init configures it from the NoCloud seed the agent makes, and
//! the test logs in over SSH through the VM network.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{guestnet, ok, wait_until, Cluster, Options};
use novacron_api::VmPhase;

/// A TCG boot of Debian takes 45-100 s alone, depending on the host;
/// beside other tests, more.
const SSH_UP: Duration = Duration::from_secs(300);
/// Five TCG boots at once on two cores (about 300 s on a slow host).
const CLONES_UP: Duration = Duration::from_secs(600);
/// `openssl passwd -6 -salt novacron0 novacron`
const PASSWORD_HASH: &str =
    "$6$novacron0$TP3vOscJvc95y6YFYB78Baqm/t7YGQJQ6pU5EYJauymlekBKJEa8lVDFuparnPlpA4grJ09Ff2UKHaCg0h/M21";

fn debian_image() -> PathBuf {
    let path = std::env::var_os("NOVACRON_DEBIAN_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest-debian/debian-12.qcow2"));
    assert!(
        path.exists(),
        "Debian guest missing at {}: run scripts/build-debian-image.sh",
        path.display()
    );
    path
}

/// A cluster of one host (a namespace, so the VM network is reachable
/// from it) with the Debian image and a DHCP network `lan`.
async fn debian_cluster() -> Cluster {
    debian_cluster_sized(4).await
}

async fn debian_cluster_sized(vcpus: u32) -> Cluster {
    let c = Cluster::start(Options {
        agents: 1,
        netns: true,
        agent_memory: "4GiB",
        agent_vcpus: vcpus,
        ..Default::default()
    })
    .await;
    ok(
        c.cli(&["image", "import", "debian", &debian_image().display().to_string()])
            .output()
            .expect("cli"),
    );
    let (status, body) = guestnet::post(
        &c,
        "networks",
        serde_json::to_value(guestnet::network("lan", "10.77.0.0/24")).expect("json"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    c
}

/// An SSH key pair in the cluster's directory; returns the private key's path.
fn ssh_key(c: &Cluster, name: &str) -> PathBuf {
    let key = c.dir.path().join(name);
    ok(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen"));
    key
}

/// Runs `cmd` on the guest at `ip` over SSH from the VM's host.
fn ssh(c: &Cluster, key: &Path, ip: &str, cmd: &str) -> Output {
    let ns = c.underlay.as_ref().expect("underlay").netns(1);
    common::netlab::Underlay::exec(&ns, "ssh")
        .args([
            "-i",
            &key.display().to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            &format!("debian@{ip}"),
            cmd,
        ])
        .output()
        .expect("ssh")
}

/// Waits until SSH logs in and `cmd` succeeds; returns its output.
async fn ssh_when_up(c: &Cluster, key: &Path, vm: &str, ip: &str, cmd: &str) -> String {
    ssh_by(c, key, vm, ip, cmd, std::time::Instant::now() + SSH_UP).await
}

/// Waits until SSH logs in and `cmd` succeeds, up to `deadline`; returns its
/// output. On a timeout the failure carries the last SSH error and the
/// guest's console.
async fn ssh_by(c: &Cluster, key: &Path, vm: &str, ip: &str, cmd: &str, deadline: std::time::Instant) -> String {
    loop {
        let out = ssh(c, key, ip, cmd);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if std::time::Instant::now() > deadline {
            let id = c.vm(vm).await.metadata.id;
            let log = std::fs::read_to_string(c.dir.path().join("node-1/vms").join(&id).join("console.log"))
                .unwrap_or_else(|e| format!("(no console log: {e})"));
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "timed out waiting for SSH into {vm} at {ip}: {}\n--- console (last 60 lines) ---\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn debian_guest_is_configured_by_cloud_init_and_answers_ssh() {
    let c = debian_cluster().await;
    let key = ssh_key(&c, "id_test");
    let user_data = c.dir.path().join("user-data.yaml");
    std::fs::write(
        &user_data,
        // The guest ignores the ACPI power button, so a stop must go
        // through the guest agent to be clean.
        "#cloud-config\nwrite_files:\n  - path: /etc/systemd/logind.conf.d/ignore-power-key.conf\n    content: |\n      [Login]\n      HandlePowerKey=ignore\nruncmd:\n  - [systemctl, restart, systemd-logind]\n  - [sh, -c, 'echo made-by-runcmd > /var/tmp/novacron-marker']\n",
    )
    .expect("write user-data");
    ok(c.cli(&[
        "vm",
        "create",
        "deb1",
        "--image",
        "debian",
        "--memory",
        "512MiB",
        "--vcpus",
        "2",
        "--network",
        "lan",
        "--cloud-init",
        &user_data.display().to_string(),
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--hostname",
        "deb-one",
        "--password-hash",
        PASSWORD_HASH,
    ])
    .output()
    .expect("cli"));
    let vm = c.wait_phase("deb1", VmPhase::Running, guestnet::BOOT).await;
    let ip = vm.spec.nics[0].ip.clone().expect("address from IPAM");
    let out = ssh_when_up(
        &c,
        &key,
        "deb1",
        &ip,
        // runcmd runs in cloud-init's last stage, after sshd is up.
        "cloud-init status --wait >/dev/null; hostname; cat /var/tmp/novacron-marker; sudo grep ^debian: /etc/shadow; ip -4 -o addr show eth0",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"deb-one"), "{out}");
    assert_eq!(lines.get(1), Some(&"made-by-runcmd"), "{out}");
    assert!(
        lines
            .get(2)
            .is_some_and(|l| l.starts_with(&format!("debian:{PASSWORD_HASH}:"))),
        "{out}"
    );
    assert!(out.contains(&format!("inet {ip}/24")), "{out}");
    // The seed is a read-only CD-ROM labelled cidata.
    let seed = ok(ssh(&c, &key, &ip, "sudo blkid -s LABEL -o value /dev/sr0"));
    assert_eq!(seed.trim(), "cidata");

    // The guest agent: OS, host name and the address from IPAM in `vm get`.
    let guest = wait_until("the guest agent's report in vm get", SSH_UP, || async {
        let vm = c.vm("deb1").await;
        vm.status
            .guest
            .filter(|g| g.interfaces.iter().any(|i| i.addresses.contains(&format!("{ip}/24"))))
    })
    .await;
    assert_eq!(guest.hostname.as_deref(), Some("deb-one"));
    assert!(guest.os.as_deref().is_some_and(|os| os.contains("Debian")), "{guest:?}");
    let shown = ok(c.cli(&["vm", "get", "deb1"]).output().expect("cli"));
    assert!(shown.contains("Debian GNU/Linux 12"), "{shown}");

    // vm exec: output and exit status come back; it is audited.
    let out = ok(c
        .cli(&["vm", "exec", "deb1", "--", "cat", "/etc/hostname"])
        .output()
        .expect("cli"));
    assert_eq!(out.trim(), "deb-one");
    let failed = c
        .cli(&["vm", "exec", "deb1", "--", "sh", "-c", "echo oops >&2; exit 3"])
        .output()
        .expect("cli");
    assert_eq!(failed.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&failed.stderr).trim(), "oops");
    let audit = ok(c.cli(&["audit", "list", "-o", "json"]).output().expect("cli"));
    assert!(audit.contains("/v1/vms/deb1/exec"), "exec is not in the audit log");

    // A snapshot of the running guest is quiesced by its agent, which thaws
    // the filesystems after it (a write still goes through).
    let taken = ok(c
        .cli(&["vm", "snapshot", "create", "deb1", "quiet", "-o", "json"])
        .output()
        .expect("cli"));
    let taken: Vec<novacron_api::Snapshot> = serde_json::from_str(&taken).expect("snapshot JSON");
    assert!(taken[0].taken_running && taken[0].quiesced, "{taken:?}");
    let out = ok(c
        .cli(&[
            "vm",
            "exec",
            "deb1",
            "--",
            "sh",
            "-c",
            "echo thawed > /root/after && cat /root/after",
        ])
        .output()
        .expect("cli"));
    assert_eq!(out.trim(), "thawed");

    // The guest ignores ACPI: the stop is clean through the guest agent,
    // not a kill at the end of the grace period.
    ok(c.cli(&["vm", "stop", "deb1"]).output().expect("cli"));
    let stopped = c.wait_phase("deb1", VmPhase::Stopped, Duration::from_secs(60)).await;
    assert_eq!(stopped.status.reason, None, "the stop was not clean");
    let agent_log = std::fs::read_to_string(c.dir.path().join("node-1.log")).expect("agent log");
    assert!(
        agent_log.contains("asked its guest agent to shut down"),
        "ACPI alone stopped it"
    );
}

/// Runs a shell command in the guest through its guest agent; its output.
fn guest_sh(c: &Cluster, vm: &str, cmd: &str) -> String {
    ok(c.cli(&["vm", "exec", vm, "--", "sh", "-c", cmd]).output().expect("cli"))
}

/// The source VM's identity as seen inside: host name, machine id, SSH host key.
const IDENTITY: &str = "cloud-init status --wait >/dev/null; hostname; cat /etc/machine-id; cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub";

#[tokio::test]
async fn linked_clones_of_a_template_boot_as_distinct_machines() {
    let c = debian_cluster_sized(8).await;
    let key = ssh_key(&c, "id_clone");
    let pubkey = format!("{}.pub", key.display());
    ok(c.cli(&[
        "vm",
        "create",
        "base",
        "--image",
        "debian",
        "--memory",
        "256MiB",
        "--network",
        "lan",
        "--ssh-key",
        &pubkey,
    ])
    .output()
    .expect("cli"));
    let base = c.wait_phase("base", VmPhase::Running, guestnet::BOOT).await;
    let base_ip = base.spec.nics[0].ip.clone().expect("address");
    let base_id = ssh_when_up(&c, &key, "base", &base_ip, IDENTITY).await;
    // A template is made of a stopped VM only.
    let running = c
        .cli(&["vm", "template", "base", "--image", "base-tpl"])
        .output()
        .expect("cli");
    assert!(!running.status.success(), "a running VM became a template");
    ok(c.cli(&["vm", "stop", "base"]).output().expect("cli"));
    c.wait_phase("base", VmPhase::Stopped, Duration::from_secs(120)).await;
    ok(c.cli(&["vm", "template", "base", "--image", "base-tpl"])
        .output()
        .expect("cli"));

    let names: Vec<String> = (1..=5).map(|i| format!("clone-{i}")).collect();
    for name in &names {
        ok(c.cli(&["vm", "clone", "base-tpl", name, "--linked"])
            .output()
            .expect("cli"));
    }
    let mut seen = vec![base_id.clone()];
    let (mut ips, mut macs) = (vec![base_ip], Vec::new());
    // The five boot at once, sharing two cores: the first answers about
    // when the last does, so they share one deadline.
    let all_up = std::time::Instant::now() + CLONES_UP;
    for name in &names {
        let vm = c.wait_phase(name, VmPhase::Running, SSH_UP).await;
        let ip = vm.spec.nics[0].ip.clone().expect("address");
        macs.push(vm.spec.nics[0].mac.clone().expect("mac"));
        let id = ssh_by(&c, &key, name, &ip, IDENTITY, all_up).await;
        assert_eq!(id.lines().next(), Some(name.as_str()), "{id}");
        ips.push(ip);
        seen.push(id);
    }
    // Every line of every identity (host name, machine id, host key) is its own.
    for line in 0..3 {
        let values: std::collections::HashSet<&str> = seen.iter().filter_map(|id| id.lines().nth(line)).collect();
        assert_eq!(values.len(), seen.len(), "identity line {line} repeats: {seen:?}");
    }
    for list in [&ips, &macs] {
        let distinct: std::collections::HashSet<&String> = list.iter().collect();
        assert_eq!(distinct.len(), list.len(), "{list:?}");
    }

    // A volume hot-plugged into a running guest is formatted and written,
    // detached, attached to another VM and read back there, and grown online.
    ok(c.cli(&["volume", "create", "data1", "--size", "64MiB"])
        .output()
        .expect("cli"));
    let vol: novacron_api::Volume = c.client.get("data1").await.expect("volume");
    let dev = format!(
        "/dev/disk/by-id/virtio-{}",
        novacron_api::volume::serial(&vol.metadata.id)
    );
    let appears = format!("for i in $(seq 150); do [ -e {dev} ] && break; sleep 0.2; done");
    ok(c.cli(&["vm", "volume", "attach", "clone-1", "data1", "--wait"])
        .output()
        .expect("cli"));
    let wrote = guest_sh(
        &c,
        "clone-1",
        &format!("{appears}; mkfs.ext4 -q {dev} && mount {dev} /mnt && echo kept-on-volume > /mnt/note && umount /mnt && echo written"),
    );
    assert_eq!(wrote.trim(), "written");
    ok(c.cli(&["vm", "volume", "detach", "clone-1", "data1", "--wait"])
        .output()
        .expect("cli"));
    assert_eq!(
        guest_sh(&c, "clone-1", &format!("[ -e {dev} ] && echo still || echo gone")).trim(),
        "gone"
    );
    ok(c.cli(&["vm", "volume", "attach", "clone-2", "data1", "--wait"])
        .output()
        .expect("cli"));
    let read = guest_sh(
        &c,
        "clone-2",
        &format!("{appears}; mount -o ro {dev} /mnt && cat /mnt/note && umount /mnt"),
    );
    assert_eq!(read.trim(), "kept-on-volume");
    ok(c.cli(&["volume", "resize", "data1", "--size", "128MiB"])
        .output()
        .expect("cli"));
    let size = guest_sh(
        &c,
        "clone-2",
        &format!("for i in $(seq 150); do [ $(blockdev --getsize64 {dev}) = 134217728 ] && break; sleep 0.2; done; blockdev --getsize64 {dev}"),
    );
    assert_eq!(size.trim(), "134217728", "the guest does not see the grown volume");
    // The template exports as a standalone qcow2 (the CLI checks its SHA-256).
    let exported = c.dir.path().join("base-tpl.qcow2");
    ok(c.cli(&["image", "export", "base-tpl", &exported.display().to_string()])
        .output()
        .expect("cli"));
    let info = ok(std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&exported)
        .output()
        .expect("qemu-img"));
    assert!(
        info.contains("\"format\": \"qcow2\"") && !info.contains("backing-filename"),
        "{info}"
    );
    // The template is in use: it cannot go.
    let refused = c.cli(&["image", "delete", "base-tpl"]).output().expect("cli");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("used by"),
        "{refused:?}"
    );

    // A full clone owns its disk: no backing file.
    for name in &names {
        ok(c.cli(&["vm", "delete", name]).output().expect("cli"));
    }
    ok(
        c.cli(&["vm", "clone", "base-tpl", "full-1", "--full", "--memory", "128MiB"])
            .output()
            .expect("cli"),
    );
    // The copy runs in the background, its percentage in the VM's reason.
    let mut reasons = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + SSH_UP;
    let full = loop {
        let vm = c.vm("full-1").await;
        reasons.extend(vm.status.reason.clone());
        if vm.status.phase == VmPhase::Running {
            break vm;
        }
        assert!(std::time::Instant::now() < deadline, "full-1 is not running: {vm:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("Copying the image for a full clone: ")),
        "no copy progress shown: {reasons:?}"
    );
    let disk = c
        .dir
        .path()
        .join("node-1/vms")
        .join(&full.metadata.id)
        .join("root.qcow2");
    let info = ok(std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&disk)
        .output()
        .expect("qemu-img"));
    assert!(!info.contains("backing-filename"), "{info}");
}
