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

"$BIN" vm get demo-1 >/dev/null 2>&1 || \
  "$BIN" vm create demo-1 --image demo --memory 256MiB --data-disk 64MiB >/dev/null
"$BIN" vm start demo-1 --wait >/dev/null

echo "demo: waiting for the guest to boot (TCG can take ~10 s)"
for _ in $(seq 1 240); do
  "$BIN" vm logs demo-1 2>/dev/null | grep -q NOVACRON-GUEST-READY && break
  sleep 0.5
done

echo; "$BIN" node list
echo; "$BIN" vm list
echo; echo "--- console of demo-1 (last 12 lines) ---"
"$BIN" vm logs demo-1 --tail 12
cat <<EOT

Try:  $BIN vm console demo-1     (Ctrl-] detaches)
      $BIN vm stop demo-1 --wait ; $BIN vm delete demo-1 --wait
Stop the cluster: kill \$(cat $NOVACRON_DEV_DIR/dev.pid)   (VMs keep running and are re-adopted on the next start)
EOT
