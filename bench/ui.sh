#!/usr/bin/env bash
# The dashboard with 5,000 VMs in the store (bench/ui.mjs in headless
# Chromium): first load (bytes transferred, time to the VM list rendered)
# and update latency (API write -> row changed on screen), against the
# targets of issue #22 (first load <= 1 MB and <= 2 s; update <= 500 ms).
# The server runs here on TLS (HTTP/2, as a browser gets it) in a temp dir,
# with no agents: the VMs wait unplaced. Results: bench/results/ui.{md,json}.
#   VMS=N (default 5000), UPDATES=N (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --quiet --release -p novacron
bin=target/release/novacron
dir=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
"$bin" server --data-dir "$dir" --listen 127.0.0.1:0 --rate-limit 100000 --rate-burst 100000 >"$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 300); do
  [ -s "$dir/listen.addr" ] && [ -s "$dir/admin.token" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.1
done
url="https://$(tr -d '\n' <"$dir/listen.addr")"
token=$(tr -d '\n' <"$dir/admin.token")
api() {
  local method=$1 path=$2
  shift 2
  curl -fsS --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" -X "$method" "$url$path" "$@" >/dev/null
}
api POST /v1/images -H 'content-type: application/json' -d '{"name":"bench","format":"kernel","public":true}'
for part in kernel initrd; do
  head -c 4096 /dev/zero | api PUT "/v1/images/bench/files/$part" --data-binary @-
done
result=$(NC_URL="$url" NC_TOKEN="$token" NC_VMS="${VMS:-5000}" NC_UPDATES="${UPDATES:-30}" node bench/ui.mjs)
echo "$result"
mkdir -p bench/results
echo "$result" >bench/results/ui.json
python3 - "$result" <<'PY' >bench/results/ui.md
import json, subprocess, sys
r = json.loads(sys.argv[1])
loads = sorted(r["first_load_ms"])
size = max(r["first_load_bytes"])
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
def verdict(ok):
    return "met" if ok else "MISSED"
print("# Dashboard with %d VMs in the store (`bash bench/ui.sh`)\n" % r["vms"])
print("Headless Chromium (Debian), server on TLS/HTTP-2 over loopback, no agents (the VMs wait unplaced); %s, %d cores. Three cold first loads (cache off), then %d status writes to VMs whose rows are in view.\n" % (cpu, int(subprocess.run(["nproc"], capture_output=True, text=True).stdout), r["updates"]))
print("| measure | ours | target | |")
print("|---|---|---|---|")
print("| first load, bytes transferred (largest of 3) | %.0f KiB | <= 1 MB | %s |" % (size / 1024, verdict(size <= 1_000_000)))
print("| first load, navigation to VM list rendered (median of 3: %s ms) | %d ms | <= 2 s | %s |" % (", ".join(map(str, r["first_load_ms"])), loads[1], verdict(loads[1] <= 2000)))
print("| update: API write to row changed (median) | %.0f ms | <= 500 ms | %s |" % (r["update_ms_median"], verdict(r["update_ms_median"] <= 500)))
print("| update: p95 / max | %.0f / %.0f ms | | |" % (r["update_ms_p95"], r["update_ms_max"]))
print("\nPopulating the store took %.1f s (%d creates, 8 at a time, through the API)." % (r["populate_s"], r["vms"]))
PY
cat bench/results/ui.md
