#!/usr/bin/env bash
# Guest benchmark: Debian create -> SSH under NovaCron vs bare QEMU (median
# of 3, interleaved), 20 linked vs 20 full clones (time, disk bytes), and
# volume hot-attach -> visible in the guest (median of 5).
# Needs root (the dev cluster's agent runs in a network namespace). Writes
# bench/results/guest.{md,json}. RUNS=N, CLONES=N and VOLUMES=N change the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/guest.sh needs root (network namespaces)" >&2; exit 1; }
if ip netns list | grep -q '^ncdev-1\b'; then
	echo "bench/guest.sh: a novacron dev cluster's namespace ncdev-1 exists; stop that cluster first" >&2
	exit 1
fi
scripts/setup.sh
scripts/build-guest-image.sh
scripts/build-debian-image.sh
cargo build --release -p novacron
export WORK=$(mktemp -d /tmp/ncbench-guest.XXXXXX)
devpid=
cleanup() {
	[ -n "$devpid" ] && kill "$devpid" 2>/dev/null && wait "$devpid" 2>/dev/null
	# VMs and namespaces outlive `novacron dev` by design: remove this run's.
	pkill -f "$WORK" 2>/dev/null || true
	ip netns del ncdev-1 2>/dev/null || true
	ip link del ncdev0 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/novacron dev --data-dir "$WORK" --agents 1 --agent-vcpus 64 --agent-memory 16GiB \
	--listen "127.0.0.1:$port" --hosts namespaces >"$WORK/dev.log" 2>&1 &
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
	echo "bench/guest.sh: the dev cluster did not come up in 120 s:" >&2
	tail -n 20 "$WORK/dev.log" >&2
	exit 1
fi
python3 bench/guest.py
