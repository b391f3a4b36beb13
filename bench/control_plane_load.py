#!/usr/bin/env python3
"""What the control plane costs an agent: API requests per live migration,
and the CPU time of an idle agent per minute while 200 VMs sit on another
node. Runs one binary (ours, or an older build to compare) on a local
plain-HTTP cluster: a server, node-1 and node-2 (a 256 MiB busybox VM moves
between them) and node-3 (200 stopped VMs). Writes one JSON line to stdout.

    python3 bench/control_plane_load.py target/debug/novacron [--label NAME]
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, check, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = check()
            if v:
                return v
        except Exception:  # noqa: BLE001 - polling until it works
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--label", default="")
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--idle-s", type=int, default=60)
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    d = tempfile.mkdtemp(prefix="nc-load-", dir="/tmp")
    procs = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, NOVACRON_LOG="info,tower_http=debug", NO_COLOR="1")
        log = open(f"{d}/server.log", "w")
        procs.append(subprocess.Popen(
            [binary, "server", "--data-dir", f"{d}/server", "--listen", f"127.0.0.1:{port}", "--insecure-http",
             "--rate-limit", "0"],
            stderr=log, stdout=subprocess.DEVNULL, env=env))
        wait("server", lambda: urllib.request.urlopen(f"{url}/readyz").status == 200)
        token = open(f"{d}/server/admin.token").read().strip()
        cli_env = dict(os.environ, NOVACRON_SERVER=url, NOVACRON_TOKEN=token, XDG_CONFIG_HOME=f"{d}/cfg",
                       NOVACRON_DEV_DIR=f"{d}/nodev")
        cli_env.pop("NOVACRON_CA_CERT", None)

        def cli(*args, check=True):
            r = subprocess.run([binary, *args], env=cli_env, capture_output=True, text=True)
            if check and r.returncode != 0:
                sys.exit(f"{' '.join(args)}: {r.stderr}")
            return r.stdout

        agents = {}
        for name, vcpus, mem in [("node-1", 4, "2GiB"), ("node-2", 4, "2GiB"), ("node-3", 400, "400GiB")]:
            agents[name] = subprocess.Popen(
                [binary, "agent", "--name", name, "--server", url, "--token", token, "--data-dir", f"{d}/{name}",
                 "--listen", "127.0.0.1:0", "--vcpus", str(vcpus), "--memory", mem, "--heartbeat", "1s",
                 "--accel", "tcg", "--label", f"host={name}", "--label", f"pair={name != 'node-3'}"],
                stderr=open(f"{d}/{name}.log", "w"), stdout=subprocess.DEVNULL, env=env)
            procs.append(agents[name])
        wait("3 nodes ready", lambda: cli("node", "list", "-o", "json").count('"ready": true') == 3)
        guest = os.path.join(ROOT, "target/guest")
        cli("image", "import", "demo", "--kernel", f"{guest}/vmlinuz", "--initrd", f"{guest}/initrd.img")
        cli("vm", "create", "mover", "--image", "demo", "--memory", "256MiB", "--node-selector", "pair=True",
            "--wait")
        wait("mover booted", lambda: "NOVACRON-GUEST-READY" in cli("vm", "logs", "mover"))
        for i in range(a.vms):
            cli("vm", "create", f"other-{i}", "--image", "demo", "--memory", "64MiB", "--no-start",
                "--node-selector", "host=node-3")
        def on_node_3():
            vms = json.loads(cli("vm", "list", "-o", "json"))
            return sum(1 for v in vms if (v.get("status") or {}).get("node") == "node-3") == a.vms
        wait(f"{a.vms} VMs on node-3", on_node_3, timeout=300)
        time.sleep(5)  # let the creates settle

        # Idle: the agent running one VM; nothing changes.
        source = json.loads(cli("vm", "get", "mover", "-o", "json"))["status"]["node"]
        pid = agents[source].pid
        before = cpu_seconds(pid)
        time.sleep(a.idle_s)
        idle_cpu = (cpu_seconds(pid) - before) * 60.0 / a.idle_s

        # One live migration node-1 -> node-2: requests the server saw meanwhile.
        log.flush()
        start = os.path.getsize(f"{d}/server.log")
        t0 = time.time()
        source = json.loads(cli("vm", "get", "mover", "-o", "json"))["status"]["node"]
        target = "node-2" if source == "node-1" else "node-1"
        cli("vm", "migrate", "mover", "--to", target, "--wait")
        took = time.time() - t0
        time.sleep(2)  # the source's last status writes
        text = open(f"{d}/server.log").read()[start:]
        reqs = re.findall(r'method=(\w+) uri=(\S+)[^\n]*started processing request', text)
        if not reqs:
            reqs = re.findall(r'request\{method=(\w+) uri=(\S+)', text)
        heartbeats = sum(1 for _, u in reqs if u.endswith("/heartbeat"))
        total = len(reqs)
        print(json.dumps({
            "label": a.label, "binary": binary, "vms_on_other_node": a.vms,
            "idle_agent_cpu_s_per_min": round(idle_cpu, 3),
            "migration_s": round(took, 1),
            "requests_during_migration": total,
            "heartbeats_during_migration": heartbeats,
            "requests_without_heartbeats": total - heartbeats,
            "by_path": sorted({re.sub(r"[0-9a-f-]{36}|mig-[^/?]+|\?.*", "*", u) for _, u in reqs}),
        }))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        subprocess.run(["pkill", "-9", "-f", d], check=False)
        time.sleep(0.5)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
