#!/usr/bin/env python3
"""bench/backup: NovaCron's backups against the by-hand baseline, side by
side in one run. Run by bench/backup.sh (which builds everything and starts
a one-agent `novacron dev` cluster); writes bench/results/backup.{md,json}.

The disk: a VM's root disk, a linked clone of the Debian image the project
builds (2 GiB virtual, ~530 MiB of files) plus DATA_MIB (default 512) of
random data written into it: what a backup reads is the image's data and
the VM's own.

Rows:
  full backup: `backup create` of the VM while its QEMU runs (the guest
    paused: nothing writes), MB/s of the disk's data; against
    `qemu-img convert -O raw` of the same disk + `zstd -1` to a file (the
    by-hand baseline), on the same disk, stopped.
  incremental after 1% and 10% change: the VM stopped, random data written
    into its disk with qemu-io (which records the writes in the disk's
    tracking bitmap, as QEMU does); a backup of the stopped VM (qemu-nbd
    over the file with the bitmap): time, bytes read from the disk, bytes
    of the previous backup's chunks fetched (to lay changes over), bytes
    newly stored. Two write patterns: "files" (runs of 8 MiB at random
    64 KiB-aligned offsets) and "scattered" (1 MiB at random offsets).
  restore: `backup restore --as NEW --start` until the VM's QEMU runs (its
    agent fetches and checks every chunk while `qemu-img convert` copies
    them from its NBD export into the qcow2);
    against `zstd -d` + `qemu-img convert -O qcow2` of the baseline's file;
    RESTORES (default 3) runs of each, interleaved, and their medians.
  dedup: five VMs from the image (linked clones, then paused), each
    backed up into an empty store: its size against the sum of their disks'
    data.
  GC: 50 backups (a 1 MiB change between each), the oldest 25 pruned, then
    `backup-store gc --grace-s 0`: its time and what it removed.
  live restore: `backup restore --as NEW --live` until its QEMU runs, and
    (paused at once) until its disks are its own; then, each on a fresh VM,
    until the guest agent answers, live against restored-then-started.
Off-site sync: bench/backup-sync.sh.
"""

import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
BIN = str(REPO / "target/release/novacron")
IMAGE = REPO / "target/guest-debian/debian-12.qcow2"
WORK = pathlib.Path(os.environ["WORK"])
ENV = dict(os.environ, NOVACRON_DEV_DIR=str(WORK))
DATA_MIB = int(os.environ.get("DATA_MIB", "512"))
GC_BACKUPS = int(os.environ.get("GC_BACKUPS", "50"))
RESTORES = int(os.environ.get("RESTORES", "3"))
MIB = 1024 * 1024
STORE = WORK / "server" / "backups"
rng = random.Random(7)


def cli(*args, check=True):
    out = subprocess.run([BIN, *args], env=ENV, capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"novacron {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


def cli_json(*args):
    return json.loads(cli("-o", "json", *args))


def vm(name):
    return cli_json("vm", "get", name)


def wait(what, timeout, check, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    sys.exit(f"timed out waiting for {what}")


def wait_phase(name, phase, timeout=600):
    return wait(f"{name} {phase}", timeout, lambda: (lambda v: v if v["status"].get("phase") == phase else None)(vm(name)))


def disk_of(name):
    return WORK / "agent-1" / "vms" / vm(name)["metadata"]["id"] / "root.qcow2"


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


def store_bytes(store=STORE):
    return sum(f.stat().st_size for f in (store / ".chunks").rglob("*") if f.is_file())


def backup(name, store=None):
    start = time.monotonic()
    out = cli_json("backup", "create", name, *(["--store", store] if store else []))
    took = time.monotonic() - start
    b = out[0]
    # Backups are named by the second they start in.
    time.sleep(max(0.0, 1.05 - (time.monotonic() - start)))
    return b, took


def read(b):
    return sum(d["bytes_read"] for d in b["disks"])


def stored(b):
    return sum(d["stored_bytes"] for d in b["disks"])


def write_random(disk, pattern, total_mib):
    """Writes total_mib of random data into the stopped VM's disk."""
    size = 2048 * MIB
    run_len = 8 * MIB if pattern == "files" else MIB
    cmds = []
    for i in range(total_mib * MIB // run_len):
        align = 64 * 1024 if pattern == "files" else 4096
        at = rng.randrange(0, (size - run_len) // align) * align
        cmds += ["-c", f"write -s {fresh_random(i, run_len)} {at} {run_len}"]
    run("qemu-io", "-f", "qcow2", *cmds, str(disk))


def fresh_random(i, length):
    """A file of `length` random bytes of its own (data written twice
    would be stored once, flattering the figures)."""
    path = WORK / f"random-{i}.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(length))
    return path


def stop(name):
    cli("vm", "stop", name, "--force", "--wait")


def main():
    if cli("image", "get", "debian", check=False) == "":
        cli("image", "import", "debian", str(IMAGE))
    results = {"date": time.strftime("%Y-%m-%d"), "data_mib": DATA_MIB}

    # The disk: the image plus DATA_MIB of random data, then started paused.
    cli("vm", "create", "subject", "--image", "debian", "--memory", "256MiB", "--wait")
    cli("vm", "pause", "subject", "--wait")
    stop("subject")
    disk = disk_of("subject")
    writes = [["-c", f"write -s {fresh_random(i, 64 * MIB)} {1024 * MIB + i * 64 * MIB} {64 * MIB}"]
              for i in range(DATA_MIB // 64)]
    run("qemu-io", "-f", "qcow2", *sum(writes, []), str(disk))
    cli("vm", "start", "subject", "--wait")
    cli("vm", "pause", "subject", "--wait")

    # Full: ours while QEMU runs; the baseline on the same disk, stopped.
    full, took = backup("subject")
    results["full"] = {"seconds": round(took, 2), "bytes_read": read(full), "bytes_stored": stored(full),
                       "mb_s": round(read(full) / MIB / took, 1), "reason": full.get("full_reason")}
    print(f"full: {read(full) / MIB:.0f} MiB read in {took:.1f} s", flush=True)
    stop("subject")
    base_dir = WORK / "baseline"
    base_dir.mkdir(exist_ok=True)
    start = time.monotonic()
    run("qemu-img", "convert", "-O", "raw", str(disk), str(base_dir / "disk.raw"))
    run("zstd", "-q", "-1", "-T1", "--rm", str(base_dir / "disk.raw"), "-o", str(base_dir / "disk.raw.zst"))
    base_took = time.monotonic() - start
    results["full_baseline"] = {"seconds": round(base_took, 2), "bytes": (base_dir / "disk.raw.zst").stat().st_size,
                                "mb_s": round(read(full) / MIB / base_took, 1)}
    print(f"baseline full: {base_took:.1f} s", flush=True)

    # Incrementals of the stopped VM after 1% and 10% of the disk changed.
    results["incremental"] = []
    for pattern in ["files", "scattered"]:
        for share in [1, 10]:
            changed = 2048 * share // 100
            write_random(disk, pattern, changed)
            b, took = backup("subject")
            row = {"pattern": pattern, "changed_pct": share, "changed_bytes": changed * MIB, "seconds": round(took, 2),
                   "bytes_read": read(b), "bytes_stored": stored(b), "incremental": b.get("full_reason") is None,
                   "bytes_from_previous": sum(d.get("bytes_from_previous", 0) for d in b["disks"]),
                   "read_per_changed": round(read(b) / (changed * MIB), 2)}
            results["incremental"].append(row)
            print(f"incremental {pattern} {share}%: {row}", flush=True)
    last = b

    # Restore: ours into a new VM until its QEMU runs; the baseline back to
    # qcow2. This machine's disk speed drifts: RESTORES runs of each,
    # interleaved, and their medians.
    data = sum(d["size"] for d in last["disks"])
    ours, base_restore, same = [], [], True
    for n in range(RESTORES):
        start = time.monotonic()
        cli("backup", "restore", last["id"], "--as", f"restored-{n}", "--start")
        wait_phase(f"restored-{n}", "Running")
        ours.append(time.monotonic() - start)
        # Paused before the guest gets past its firmware (seconds under TCG),
        # so the disk is still as restored.
        cli("vm", "pause", f"restored-{n}", "--wait")
        start = time.monotonic()
        run("zstd", "-q", "-f", "-d", "-T1", str(base_dir / "disk.raw.zst"), "-o", str(base_dir / "back.raw"))
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base_dir / "back.raw"),
            str(base_dir / "back.qcow2"))
        base_restore.append(time.monotonic() - start)
        compare = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                                  str(disk_of(f"restored-{n}")), str(disk)], capture_output=True, text=True)
        if compare.returncode != 0:
            same = False
            print(f"qemu-img compare: {compare.stdout}{compare.stderr}", flush=True)
        cli("vm", "delete", f"restored-{n}")
        for f in ["back.raw", "back.qcow2"]:
            (base_dir / f).unlink()
    results["restore"] = {"seconds": round(statistics.median(ours), 2), "runs": [round(x, 2) for x in ours],
                          "baseline_seconds": round(statistics.median(base_restore), 2),
                          "baseline_runs": [round(x, 2) for x in base_restore],
                          "disk_bytes": data, "identical_to_source": same}
    print(f"restore: {results['restore']}", flush=True)
    shutil.rmtree(base_dir, ignore_errors=True)

    # Live restore: paused as soon as it runs, so its disks end as restored
    # (compared once its QEMU quit, which flushes them).
    start = time.monotonic()
    cli("backup", "restore", last["id"], "--as", "live", "--live")
    wait_phase("live", "Running")
    live_running = time.monotonic() - start
    cli("vm", "pause", "live", "--wait")
    wait("the live restore to end", 600, lambda: vm("live")["status"].get("live_restore") is None, every=0.2)
    live_done = time.monotonic() - start
    stop("live")
    compare = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(disk_of("live")),
                              str(disk)], capture_output=True, text=True)
    live_same = compare.returncode == 0
    if not live_same:
        print(f"qemu-img compare (live): {compare.stdout}{compare.stderr}", flush=True)
    cli("vm", "delete", "live", "--wait")
    # Until the guest answers (its guest agent), on a backup of a VM that
    # boots (the subject's random data lands on its filesystem): restored
    # then started, and live.
    cli("vm", "create", "bootable", "--image", "debian", "--memory", "256MiB", "--wait")
    cli("vm", "pause", "bootable", "--wait")
    bootable, _ = backup("bootable")
    cli("vm", "delete", "bootable", "--wait")
    answers = {}
    for name, flags in [("boot-restored", ["--start"]), ("boot-live", ["--live"])]:
        start = time.monotonic()
        cli("backup", "restore", bootable["id"], "--as", name, *flags)
        wait(f"{name}'s guest agent", 900, lambda: vm(name)["status"].get("guest"), every=0.2)
        answers[name] = time.monotonic() - start
        cli("vm", "delete", name, "--wait")
    results["live_restore"] = {"running_seconds": round(live_running, 2), "done_seconds": round(live_done, 2),
                               "identical_to_source": live_same,
                               "answers_restored_seconds": round(answers["boot-restored"], 1),
                               "answers_live_seconds": round(answers["boot-live"], 1), "bootable_bytes": read(bootable)}
    print(f"live restore: {results['live_restore']}", flush=True)

    # Dedup: five VMs from the image, each backed up once into a new store.
    dedup = WORK / "dedup-store"
    cli("backup-store", "add", "dedup", str(dedup))
    disks = 0
    for i in range(1, 6):
        name = f"twin-{i}"
        cli("vm", "create", name, "--image", "debian", "--memory", "128MiB", "--wait")
        cli("vm", "pause", name, "--wait")
        b, _ = backup(name, "dedup")
        disks += read(b)
    grew = store_bytes(dedup)
    results["dedup"] = {"vms": 5, "disks_data_bytes": disks, "store_grew_bytes": grew, "ratio": round(disks / max(grew, 1), 1)}
    print(f"dedup: {results['dedup']}", flush=True)
    for i in range(1, 6):
        cli("vm", "delete", f"twin-{i}")

    # GC: GC_BACKUPS backups of the subject, a 1 MiB change between each;
    # prune the older half, collect.
    for i in range(GC_BACKUPS):
        write_random(disk, "scattered", 1)
        backup("subject")
    total = len(cli_json("backup", "list", "--vm", "subject"))
    chunks_before = sum(1 for f in (STORE / ".chunks").rglob("*") if f.is_file())
    pruned = cli_json("backup", "prune", "subject", "--keep-last", str(total // 2))
    start = time.monotonic()
    gc = cli_json("backup-store", "gc", "local", "--grace-s", "0")
    gc_took = time.monotonic() - start
    results["gc"] = {"backups": total, "pruned": len(pruned["removed"]), "chunks_before": chunks_before,
                     "seconds": round(gc_took, 3), **gc}
    print(f"gc: {results['gc']}", flush=True)

    out = REPO / "bench" / "results"
    (out / "backup.json").write_text(json.dumps(results, indent=2) + "\n")
    write_md(out / "backup.md", results)


def write_md(path, r):
    f, fb = r["full"], r["full_baseline"]
    lines = [
        f"# Backup benchmark (`bash bench/backup.sh`, {r['date']})",
        "",
        f"Disk: a VM of the Debian image the project builds (2 GiB virtual, ~530 MiB of files) plus {r['data_mib']} MiB",
        "of random data; one-agent dev cluster, local store on the same machine (2 cores), release build.",
        "",
        "## Full backup",
        "",
        "| | time | data | MB/s | bytes written |",
        "|---|---|---|---|---|",
        f"| NovaCron `backup create` (QEMU running, paused guest; point-in-time NBD export) | {f['seconds']} s | {f['bytes_read'] / MIB:.0f} MiB | {f['mb_s']} | {f['bytes_stored'] / MIB:.0f} MiB (chunks) |",
        f"| baseline `qemu-img convert -O raw` + `zstd -1 -T1` to a file (VM stopped) | {fb['seconds']} s | same | {fb['mb_s']} | {fb['bytes'] / MIB:.0f} MiB |",
        "",
        "## Incremental backups (VM stopped; writes made with qemu-io, recorded in the disk's bitmap)",
        "",
        "| writes | changed | incremental | time | bytes read (disk) | read / changed | previous chunks fetched | bytes stored |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in r["incremental"]:
        lines.append(f"| {i['pattern']} | {i['changed_pct']}% ({i['changed_bytes'] / MIB:.0f} MiB) | {'yes' if i['incremental'] else 'NO'} | {i['seconds']} s | {i['bytes_read'] / MIB:.0f} MiB | {i['read_per_changed']}x | {i['bytes_from_previous'] / MIB:.0f} MiB | {i['bytes_stored'] / MIB:.0f} MiB |")
    rs, lr, d, g = r["restore"], r["live_restore"], r["dedup"], r["gc"]
    lines += [
        "",
        "\"files\": runs of 8 MiB at random 64 KiB-aligned offsets; \"scattered\": 1 MiB at random 4 KiB-aligned offsets.",
        "A chunk (4 MiB) changed in more than half is read whole; one changed in at most half has only its changed",
        "extents read (the bitmap's 64 KiB granules), laid over the previous backup's chunk fetched from the store",
        "(\"previous chunks fetched\", decoded bytes).",
        "",
        "## Restore",
        "",
        f"Median of {len(rs['runs'])} runs each, interleaved (all runs: ours {rs['runs']} s, baseline {rs['baseline_runs']} s).",
        "",
        "| | time | disk |",
        "|---|---|---|",
        f"| NovaCron `backup restore --as NEW --start` until the new VM's QEMU runs (identical to the source: {rs['identical_to_source']}) | {rs['seconds']} s | {rs['disk_bytes'] / MIB:.0f} MiB virtual |",
        f"| baseline `zstd -d` + `qemu-img convert -O qcow2` | {rs['baseline_seconds']} s | same |",
        "",
        "",
        "## Live restore (`backup restore --as NEW --live`)",
        "",
        "| | time |",
        "|---|---|",
        f"| until the new VM's QEMU runs | {lr['running_seconds']} s |",
        f"| until its disks are its own (guest paused meanwhile; identical to the source: {lr['identical_to_source']}) | {lr['done_seconds']} s |",
        f"| until the guest agent answers, live (a backup of a fresh Debian VM, {lr['bootable_bytes'] / MIB:.0f} MiB of data) | {lr['answers_live_seconds']} s |",
        f"| until the guest agent answers, restored then started (`--start`) | {lr['answers_restored_seconds']} s |",
        "",
        "Boot under TCG (nested KVM hangs here) dominates the last two rows.",
        "",
        "## Dedup: five VMs from one image, one backup each",
        "",
        f"Their disks' data: {d['disks_data_bytes'] / MIB:.0f} MiB; the store (empty before) holds {d['store_grew_bytes'] / MIB:.1f} MiB ({d['ratio']}x).",
        "",
        f"## Garbage collection: {g['backups']} backups, {g['pruned']} pruned",
        "",
        f"{g['chunks_before']} chunks before; `backup-store gc --grace-s 0` took {g['seconds']} s (server: {g['duration_ms']} ms),",
        f"removed {g['chunks_removed']} chunks ({g['bytes_removed'] / MIB:.0f} MiB), {g['chunks_in_use']} in use.",
        "",
        "Off-site sync: `bench/results/backup-sync.md`.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
