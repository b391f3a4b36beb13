#!/usr/bin/env bash
# Backup benchmark: NovaCron's backups against the by-hand baseline
# (qemu-img convert + zstd), side by side in one run, on the Debian image
# plus written data. Full, incremental after 1% and 10% change, restore,
# dedup of five VMs from one image, garbage collection after pruning half
# of 50 backups. Needs root (setup). Writes bench/results/backup.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/backup.sh needs root (setup)" >&2; exit 1; }
scripts/setup.sh
scripts/build-debian-image.sh
cargo build --release -p novacron
export WORK=$(mktemp -d /tmp/ncbench-backup.XXXXXX)
devpid=
cleanup() {
	[ -n "$devpid" ] && kill "$devpid" 2>/dev/null && wait "$devpid" 2>/dev/null
	# VMs outlive `novacron dev` by design: remove this run's.
	pkill -f "$WORK" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/novacron dev --data-dir "$WORK" --agents 1 --agent-vcpus 64 --agent-memory 16GiB \
	--listen "127.0.0.1:$port" --hosts process >"$WORK/dev.log" 2>&1 &
devpid=$!
ready=
for _ in $(seq 600); do
	if [ -s "$WORK/server.url" ] && NOVACRON_DEV_DIR=$WORK target/release/novacron node list 2>/dev/null | grep -q Ready; then
		ready=1
		break
	fi
	sleep 0.2
done
if [ -z "$ready" ]; then
	echo "bench/backup.sh: the dev cluster did not come up in 120 s:" >&2
	tail -n 20 "$WORK/dev.log" >&2
	exit 1
fi
python3 bench/backup.py
