#!/usr/bin/env python3
"""bench/guest: the Debian guest under NovaCron against bare QEMU, and
linked against full clones. Run by bench/guest.sh (which builds everything
and starts a one-agent `novacron dev` cluster in namespaces); writes
bench/results/guest.{md,json}.

Rows:
  create -> SSH answers: `vm create` with cloud-init (SSH key) until `ssh true`
    succeeds over the VM network, against QEMU started by hand on the same
    image with a seed made the same way (same files, same xorriso flags; the
    addresses are user networking's), same CPU model, memory and devices;
    interleaved, median of RUNS (default 3), TCG. The agent's image cache
    is warmed first (one VM created and deleted), as on a host that has run
    the image before.
  20 linked vs 20 full clones of a template: time from the first `vm clone
    --paused` to all 20 QEMUs up (Paused), and the bytes the 20 root disks
    take on the host's disk (allocated blocks).
  volume hot-attach -> visible: from `vm volume attach` (a fresh 64 MiB
    volume, running guest) until a waiter in the guest, started through the
    guest agent right after the call, sees /dev/disk/by-id/virtio-SERIAL;
    median of VOLUMES (default 5). The figure includes one `vm exec` round
    trip, measured alone (`vm exec -- true`) and reported beside it.
"""

import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
BIN = str(REPO / "target/release/novacron")
IMAGE = REPO / "target/guest-debian/debian-12.qcow2"
WORK = pathlib.Path(os.environ["WORK"])
NS = "ncdev-1"
RUNS = int(os.environ.get("RUNS", "3"))
CLONES = int(os.environ.get("CLONES", "20"))
VOLUMES = int(os.environ.get("VOLUMES", "5"))
ENV = dict(os.environ, NOVACRON_DEV_DIR=str(WORK))
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR"]


def cli(*args, check=True):
    out = subprocess.run([BIN, *args], env=ENV, capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"novacron {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


def vm(name):
    return json.loads(cli("vm", "get", name, "-o", "json"))


def wait(what, timeout, check, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    sys.exit(f"timed out waiting for {what}")


def wait_phase(name, phase, timeout=600):
    return wait(f"{name} {phase}", timeout, lambda: (lambda v: v if v["status"].get("phase") == phase else None)(vm(name)))


def wait_gone(name):
    wait(f"{name} deleted", 120, lambda: cli("vm", "get", name, check=False) == "" and True)


def ssh_answers(key, target, port=22, netns=None):
    cmd = ["ssh", "-i", str(key), *SSH_OPTS, "-p", str(port), f"debian@{target}", "true"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def novacron_boot(key, name):
    start = time.monotonic()
    cli("vm", "create", name, "--image", "debian", "--memory", "512MiB", "--vcpus", "1", "--ssh-key", f"{key}.pub")
    v = wait_phase(name, "Running")
    ip = v["spec"]["nics"][0]["ip"]
    wait(f"SSH on {name}", 600, lambda: ssh_answers(key, ip, netns=NS), every=0.5)
    took = time.monotonic() - start
    cli("vm", "delete", name)
    wait_gone(name)
    return took, v


def seed_iso(dir, key, mac):
    """The seed as the agent makes it (novacron_api::cloudinit), for user networking."""
    files = {
        "meta-data": {"instance-id": "bare-qemu", "local-hostname": "bare", "public-keys": [open(f"{key}.pub").read().strip()]},
        "user-data": "#cloud-config\n{}\n",
        "vendor-data": "#cloud-config\n" + json.dumps({"bootcmd": [["cloud-init-per", "instance", "novacron-machine-id", "sh", "-c",
                                                                    "rm -f /etc/machine-id /var/lib/dbus/machine-id && systemd-machine-id-setup"]]}) + "\n",
        "network-config": {"version": 2, "ethernets": {"eth0": {"match": {"macaddress": mac}, "set-name": "eth0",
                                                                 "addresses": ["10.0.2.15/24"], "mtu": 1500, "gateway4": "10.0.2.2",
                                                                 "nameservers": {"addresses": ["10.0.2.3"]}}}},
    }
    paths = []
    for name, body in files.items():
        p = dir / name
        p.write_text(body if isinstance(body, str) else json.dumps(body) + "\n")
        paths.append(str(p))
    iso = dir / "seed.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock", "-o", str(iso), *paths],
                   env=dict(os.environ, SOURCE_DATE_EPOCH="1700000000"), check=True, capture_output=True)
    return iso


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_boot(key, like):
    """QEMU by hand, with the machine, CPU and devices NovaCron gave `like`."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="bare-", dir=WORK))
    mac = "52:54:00:12:34:56"
    iso = seed_iso(d, key, mac)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(d / "root.qcow2")], check=True)
    port = free_port()
    spec = like["spec"]
    start = time.monotonic()
    qemu = subprocess.Popen([
        "qemu-system-x86_64", "-accel", "tcg", "-machine", spec.get("machine", "pc"), "-cpu", spec.get("cpu_model", "qemu64"),
        "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{d / 'console.log'}",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        "-blockdev", f"driver=qcow2,node-name=root,discard=unmap,file.driver=file,file.filename={d / 'root.qcow2'}",
        "-device", "virtio-blk-pci,drive=root,id=root-dev,bootindex=0",
        "-blockdev", f"driver=raw,node-name=cidata,read-only=on,file.driver=file,file.filename={iso}",
        "-device", "ide-cd,drive=cidata,id=cidata-dev",
        "-chardev", f"socket,id=qga0,path={d / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ])
    try:
        wait("SSH on bare QEMU", 600, lambda: ssh_answers(key, "127.0.0.1", port), every=0.5)
        return time.monotonic() - start
    finally:
        qemu.kill()
        qemu.wait()
        shutil.rmtree(d, ignore_errors=True)


def vm_dir(v):
    return WORK / "agent-1" / "vms" / v["metadata"]["id"]


def clones(template, full):
    kind = "full" if full else "linked"
    names = [f"{kind}-{i}" for i in range(1, CLONES + 1)]
    start = time.monotonic()
    for n in names:
        cli("vm", "clone", template, n, "--full" if full else "--linked", "--paused", "--memory", "128MiB")
    vms = [wait_phase(n, "Paused") for n in names]
    took = time.monotonic() - start
    disk = sum((vm_dir(v) / "root.qcow2").stat().st_blocks * 512 for v in vms)
    for n in names:
        cli("vm", "delete", n)
    for n in names:
        wait_gone(n)
    return {"kind": kind, "count": CLONES, "seconds": round(took, 2), "per_clone_s": round(took / CLONES, 3), "disk_bytes": disk}


def hot_attach(name):
    """ms from `vm volume attach` to the disk visible in the guest, and the
    round trip of one `vm exec` alone, for VOLUMES fresh volumes."""
    attach_ms, exec_ms = [], []
    for i in range(VOLUMES):
        t0 = time.monotonic()
        cli("vm", "exec", name, "--", "true")
        exec_ms.append((time.monotonic() - t0) * 1000)
        vol = f"bench-vol-{i}"
        cli("volume", "create", vol, "--size", "64MiB")
        serial = json.loads(cli("volume", "get", vol, "-o", "json"))[0]["metadata"]["id"][:20]
        dev = f"/dev/disk/by-id/virtio-{serial}"
        t0 = time.monotonic()
        cli("vm", "volume", "attach", name, vol)
        cli("vm", "exec", name, "--", "sh", "-c", f"while [ ! -e {dev} ]; do sleep 0.01; done")
        attach_ms.append((time.monotonic() - t0) * 1000)
        cli("vm", "volume", "detach", name, vol, "--wait")
        cli("volume", "delete", vol)
        print(f"hot-attach {i + 1}: {attach_ms[-1]:.0f} ms (exec round trip {exec_ms[-1]:.0f} ms)", flush=True)
    return {"runs": VOLUMES, "attach_to_visible_ms": [round(x) for x in attach_ms],
            "exec_round_trip_ms": [round(x) for x in exec_ms],
            "median_ms": round(statistics.median(attach_ms)), "exec_median_ms": round(statistics.median(exec_ms))}


def main():
    key = WORK / "id_bench"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    if cli("image", "get", "debian", check=False) == "":
        cli("image", "import", "debian", str(IMAGE))
    # Warm the agent's image cache (a host that has run the image before).
    novacron_boot(key, "warm-up")

    boots = []
    for i in range(RUNS):
        ours, like = novacron_boot(key, f"boot-{i}")
        bare = bare_boot(key, like)
        boots.append({"run": i + 1, "novacron_s": round(ours, 2), "bare_qemu_s": round(bare, 2)})
        print(f"boot run {i + 1}: novacron {ours:.1f} s, bare QEMU {bare:.1f} s", flush=True)

    cli("vm", "create", "tpl-src", "--image", "debian", "--memory", "256MiB", "--ssh-key", f"{key}.pub")
    ip = wait_phase("tpl-src", "Running")["spec"]["nics"][0]["ip"]
    wait("SSH on tpl-src", 600, lambda: ssh_answers(key, ip, netns=NS), every=0.5)
    wait("the guest agent on tpl-src", 120, lambda: vm("tpl-src")["status"].get("guest"), every=0.5)
    volumes = hot_attach("tpl-src")
    cli("vm", "stop", "tpl-src")
    wait_phase("tpl-src", "Stopped")
    t0 = time.monotonic()
    cli("vm", "template", "tpl-src", "--image", "tpl")
    template_s = time.monotonic() - t0
    rows = [clones("tpl", full=False), clones("tpl", full=True)]
    for r in rows:
        print(f"{r['count']} {r['kind']} clones: {r['seconds']} s, {r['disk_bytes'] / 2**20:.1f} MiB", flush=True)

    med = lambda k: statistics.median(b[k] for b in boots)
    lo_hi = lambda k: (min(b[k] for b in boots), max(b[k] for b in boots))
    result = {"runs": boots, "clones": rows, "template_s": round(template_s, 2), "volume_hot_attach": volumes,
              "image_virtual_bytes": json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(IMAGE)],
                                                               capture_output=True, text=True).stdout)["virtual-size"],
              "cpu": "TCG", "date": time.strftime("%Y-%m-%d")}
    (REPO / "bench/results/guest.json").write_text(json.dumps(result, indent=2) + "\n")
    linked, full = rows
    md = f"""# Guest benchmark (`bash bench/guest.sh`, {result['date']})

Debian 12 image built by `scripts/build-debian-image.sh` ({result['image_virtual_bytes'] / 2**30:.0f} GiB virtual), TCG, 2-core machine.

## Create -> SSH answers (median of {RUNS}, min-max; 1 vCPU, 512 MiB)

| | median | min-max |
|---|---|---|
| NovaCron (`vm create --ssh-key`, cloud-init seed, VM network) | {med('novacron_s'):.1f} s | {lo_hi('novacron_s')[0]:.1f}-{lo_hi('novacron_s')[1]:.1f} s |
| bare QEMU, same image, same seed layout, user networking | {med('bare_qemu_s'):.1f} s | {lo_hi('bare_qemu_s')[0]:.1f}-{lo_hi('bare_qemu_s')[1]:.1f} s |

NovaCron's time includes the API call, scheduling, the overlay, the seed, the
NIC's tap and DHCP reservation, and QEMU's start; the agent's image cache was
warm (one VM created and deleted before).

## {CLONES} clones of a template (`vm clone --paused`, 128 MiB each)

Template made of a booted VM in {result['template_s']:.1f} s (`vm template`: flatten + store).

| clones | all {CLONES} up (Paused) | per clone | root disks on the host |
|---|---|---|---|
| linked (`--linked`, overlay) | {linked['seconds']:.1f} s | {linked['per_clone_s']:.2f} s | {linked['disk_bytes'] / 2**20:.1f} MiB |
| full (`--full`, copy) | {full['seconds']:.1f} s | {full['per_clone_s']:.2f} s | {full['disk_bytes'] / 2**20:.1f} MiB |

## Volume hot-attach -> visible in the guest ({VOLUMES} fresh 64 MiB volumes, running Debian guest)

| | median | min-max |
|---|---|---|
| `vm volume attach` -> `/dev/disk/by-id/virtio-SERIAL` exists in the guest | {volumes['median_ms']} ms | {min(volumes['attach_to_visible_ms'])}-{max(volumes['attach_to_visible_ms'])} ms |
| of which one `vm exec` round trip (measured alone) | {volumes['exec_median_ms']} ms | {min(volumes['exec_round_trip_ms'])}-{max(volumes['exec_round_trip_ms'])} ms |

The attach includes the API call, the agent's reconcile (a blank qcow2 made,
`blockdev-add`, `device_add`), the guest's PCI hot-plug and udev's link.
"""
    (REPO / "bench/results/guest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
