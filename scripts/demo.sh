#!/usr/bin/env bash
# The main job on a fresh Debian machine: install, build, build the demo guest,
# start a local cluster (server + 2 agents) in the background, boot a VM and
# show it Running with its node and the tail of its console. Idempotent: a
# running dev cluster and an existing VM are reused.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release -p novacron
scripts/build-guest-image.sh

BIN="$PWD/target/release/novacron"
export NOVACRON_DEV_DIR="${NOVACRON_DEV_DIR:-$HOME/.local/share/novacron/dev}"
mkdir -p "$NOVACRON_DEV_DIR"
URL="https://127.0.0.1:8420"
CA="$NOVACRON_DEV_DIR/server/pki/ca.crt"

if ! curl -sf --cacert "$CA" "$URL/readyz" >/dev/null 2>&1; then
  echo "demo: starting the dev cluster (log: $NOVACRON_DEV_DIR/dev.log)"
  nohup "$BIN" dev --data-dir "$NOVACRON_DEV_DIR" >"$NOVACRON_DEV_DIR/dev.log" 2>&1 &
  echo $! >"$NOVACRON_DEV_DIR/dev.pid"
fi
for _ in $(seq 1 120); do
  ready=$("$BIN" node list -o json 2>/dev/null | grep -c '"ready": true' || true)
  [ "${ready:-0}" -ge 2 ] && "$BIN" image list 2>/dev/null | grep -q 'demo .*Ready' && break
  sleep 0.5
done

# demo-2 runs on the other node (anti-affinity on the app label).
"$BIN" vm get demo-1 >/dev/null 2>&1 || \
  "$BIN" vm create demo-1 --image demo --memory 256MiB --data-disk 64MiB --label app=demo >/dev/null
"$BIN" vm start demo-1 --wait >/dev/null

echo "demo: waiting for the guest to boot (TCG can take ~10 s)"
for _ in $(seq 1 240); do
  "$BIN" vm logs demo-1 2>/dev/null | grep -q NOVACRON-GUEST-READY && break
  sleep 0.5
done

# As root, `novacron dev` runs its agents in network namespaces and makes a
# default network (DHCP, NAT) that VMs join: show demo-1's address and a
# ping from demo-1 to demo-2 on the other node, across the VXLAN overlay.
address_of() {
  "$BIN" vm get "$1" -o json | python3 -c 'import json, sys; n = json.load(sys.stdin)["spec"].get("nics", []); print(n[0]["ip"] if n else "")'
}
ping_line=""
if "$BIN" network get default >/dev/null 2>&1 && [ -n "$(address_of demo-1)" ]; then
  "$BIN" vm get demo-2 >/dev/null 2>&1 || \
    "$BIN" vm create demo-2 --image demo --memory 128MiB --label app=demo --anti-affinity app=demo >/dev/null
  "$BIN" vm start demo-2 --wait >/dev/null
  for vm in demo-1 demo-2; do
    for _ in $(seq 1 240); do
      "$BIN" vm logs "$vm" 2>/dev/null | grep -q "NOVACRON-NET dev=eth0" && break
      sleep 0.5
    done
  done
  ip2=$(address_of demo-2)
  before=$("$BIN" vm logs demo-1 | grep -c '^PING-DONE' || true)
  # The first line only wakes the console; the marker is split so that the
  # echo of the typed line does not count.
  printf '\n\nping -c 3 %s; echo PING""-DONE\n' "$ip2" | "$BIN" vm console demo-1 >/dev/null
  for _ in $(seq 1 60); do
    [ "$("$BIN" vm logs demo-1 | grep -c '^PING-DONE' || true)" -gt "$before" ] && break
    sleep 0.5
  done
  ping_line=$("$BIN" vm logs demo-1 | grep 'packets transmitted' | tail -n 1)
fi

echo; "$BIN" node list
echo; "$BIN" vm list
echo; echo "--- console of demo-1 (last 12 lines) ---"
"$BIN" vm logs demo-1 --tail 12
if [ -n "$ping_line" ]; then
  echo
  echo "demo-1 ($(address_of demo-1), on $("$BIN" vm get demo-1 -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["node"])')) pinged demo-2 ($ip2, on $("$BIN" vm get demo-2 -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["node"])')) over network \"default\": $ping_line"
else
  echo; echo "(no VM networks: run as root so that novacron dev puts its agents in network namespaces)"
fi
cat <<EOT

Try:  $BIN vm console demo-1     (Ctrl-] detaches)
      $BIN vm stop demo-1 --wait ; $BIN vm delete demo-1 --wait
Stop the cluster: kill \$(cat $NOVACRON_DEV_DIR/dev.pid)   (VMs keep running and are re-adopted on the next start)
EOT
