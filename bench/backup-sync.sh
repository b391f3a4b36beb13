#!/usr/bin/env bash
# Off-site sync benchmark: in the WAN lab, the server (host 1) copies a
# store's backups to a `backup-store serve` process (host 2) with
# `backup-store sync`, many chunk transfers in flight (ours) against one
# at a time (the PBS pain point), per profile. Throughput is bytes copied
# (as stored: random data, so incompressible) over the sync's time, as a
# share of the link's rate. Needs root (network namespaces).
# Writes bench/results/backup-sync.{json,md}.
#   PROFILES="wan intercontinental"   the profiles
#   RUNS=3                            runs of each row (medians are shown)
#   MIB=400                           the backup synced with many in flight
#   BASELINE_MIB=48                   the one synced one chunk at a time (smaller:
#                                     at a few Mbit/s it would take many minutes)
#   IN_FLIGHT="32 64 1"               the settings compared
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/backup-sync.sh needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
cargo build --release -p novacron -p novacron-wanlab -p novacron-bench
PROFILES=${PROFILES:-"wan intercontinental"}
RUNS=${RUNS:-3}
MIB=${MIB:-400}
BASELINE_MIB=${BASELINE_MIB:-48}
IN_FLIGHT=${IN_FLIGHT:-"32 64 1"}
rows=target/backup-sync.jsonl
: > "$rows"
lab=bs$$
labpid=
serverpid=
storepid=
W=
stop() {
	local pid
	for pid in $storepid $serverpid $labpid; do
		kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
	done
	storepid= serverpid= labpid=
	target/release/novacron-wanlab down --name "$lab" --hosts 2 >/dev/null 2>&1 || true
	[ -n "$W" ] && rm -rf "$W"
	W=
}
trap stop EXIT
wait_file() {
	for _ in $(seq 300); do
		[ -s "$1" ] && return 0
		sleep 0.1
	done
	echo "bench/backup-sync.sh: $1 did not appear" >&2
	return 1
}
nc() { ip netns exec "$lab-h1" env NOVACRON_SERVER="$url" NOVACRON_TOKEN="$token" NOVACRON_CA_CERT="$W/server/pki/ca.crt" target/release/novacron "$@"; }
for p in $PROFILES; do
	case $p in
	lan | metro) rate=1000 ;;
	wan) rate=100 ;;
	intercontinental) rate=50 ;;
	*) echo "unknown profile $p" >&2; exit 2 ;;
	esac
	for run in $(seq "$RUNS"); do
		W=$(mktemp -d /tmp/ncbench-sync.XXXXXX)
		target/release/backup_fill "$W/server/backups" bench-many "$MIB" "$run" >/dev/null
		target/release/backup_fill "$W/server/backups" bench-one "$BASELINE_MIB" "$((run + 1000))" >/dev/null
		target/release/novacron-wanlab up --name "$lab" --hosts 2 --profile "$p" &
		labpid=$!
		for _ in $(seq 100); do
			ip netns exec "$lab-h2" ip link show wan0 >/dev/null 2>&1 && break
			sleep 0.1
		done
		ip netns exec "$lab-h1" target/release/novacron server --data-dir "$W/server" --listen 10.99.0.1:0 \
			>"$W/server.log" 2>&1 &
		serverpid=$!
		wait_file "$W/server/listen.addr"
		wait_file "$W/server/admin.token"
		url="https://$(cat "$W/server/listen.addr")"
		token=$(cat "$W/server/admin.token")
		join=$(nc token create vault --join)
		ip netns exec "$lab-h2" target/release/novacron backup-store serve --dir "$W/vault" --listen 10.99.0.2:7443 \
			--name vault --host 10.99.0.2 --join-token "$join" --server "$url" --ca-cert "$W/server/pki/ca.crt" \
			>"$W/vault.log" 2>&1 &
		storepid=$!
		wait_file "$W/vault/.store-tls/listen.addr"
		nc backup-store add vault --url https://10.99.0.2:7443 >/dev/null
		for n in $IN_FLIGHT; do
			rm -rf "$W/vault/.chunks" "$W/vault/vm"
			mkdir -p "$W/vault/.chunks" "$W/vault/vm"
			vm=bench-many
			[ "$n" = 1 ] && vm=bench-one
			nc -o json backup-store sync local vault --vm "$vm" --in-flight "$n" >"$W/sync.json"
			python3 - "$W/sync.json" "$p" "$rate" "$n" "$run" >>"$rows" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rate = int(sys.argv[3]) * 1e6
secs = r["duration_ms"] / 1000
bits = r["bytes_copied"] * 8
print(json.dumps({"profile": sys.argv[2], "rate_mbit": int(sys.argv[3]), "in_flight": int(sys.argv[4]),
    "run": int(sys.argv[5]), "bytes": r["bytes_copied"], "chunks": r["chunks_copied"], "seconds": secs,
    "mbit_s": bits / secs / 1e6, "share": bits / secs / rate}))
PY
			tail -n 1 "$rows"
		done
		stop
	done
done
python3 - "$rows" <<'PY'
import json, statistics, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
json.dump(out, open("bench/results/backup-sync.json", "w"), indent=1)
keys = []
for r in rows:
    k = (r["profile"], r["in_flight"])
    if k not in keys:
        keys.append(k)
lines = ["# Off-site sync over the WAN lab (`bash bench/backup-sync.sh`)", "",
    f"Generated {out['generated']}. The server (lab host 1) copies a backup of random data from its "
    "`local` store to a `backup-store serve` process on lab host 2 with "
    "`backup-store sync local vault --vm VM --in-flight N`; throughput is bytes copied over the sync's time "
    "(median of the runs, min-max), share = throughput / link rate. Target: share >= 0.8 at 150 ms "
    "(intercontinental: 50 Mbit/s, 150 ms, 0.5% loss). One at a time syncs a smaller backup: at its "
    "speed the large one would take many minutes.", "",
    "| profile | link | chunk transfers in flight | copied | runs | throughput Mbit/s | share of link |",
    "|---|---|---|---|---|---|---|"]
for p, n in keys:
    rs = [r for r in rows if r["profile"] == p and r["in_flight"] == n]
    mb = [r["mbit_s"] for r in rs]
    sh = [r["share"] for r in rs]
    who = f"{n} (ours)" if n > 1 else "1 (one at a time)"
    lines.append(f"| {p} | {rs[0]['rate_mbit']} Mbit/s | {who} | {rs[0]['bytes'] / 2**20:.0f} MiB | {len(rs)} | {statistics.median(mb):.1f} ({min(mb):.1f}-{max(mb):.1f}) | "
        f"{statistics.median(sh):.2f} ({min(sh):.2f}-{max(sh):.2f}) |")
open("bench/results/backup-sync.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
