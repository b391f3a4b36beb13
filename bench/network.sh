#!/usr/bin/env bash
# VM network benchmark: TCP throughput and round trip host<->host (the
# baseline), VM<->VM on one host and across hosts (VXLAN), and the gap a live
# migration leaves in a UDP stream (pre-copy, post-copy); then the same gap
# over the WAN lab's `wan` profile with DWCP (3 hosts). Needs root (network
# namespaces). Writes bench/results/network.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/network.sh needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-bench -p novacron-wanlab
target/release/network
lab=nw$$
labpid=
cleanup() {
	[ -n "$labpid" ] && kill "$labpid" 2>/dev/null && wait "$labpid" 2>/dev/null
	target/release/novacron-wanlab down --name "$lab" --hosts 3 >/dev/null 2>&1 || true
}
trap cleanup EXIT
target/release/novacron-wanlab up --name "$lab" --hosts 3 --profile wan &
labpid=$!
for _ in $(seq 100); do
	ip netns exec "$lab-h3" ip link show wan0 >/dev/null 2>&1 && break
	sleep 0.1
done
ip netns exec "$lab-h1" target/release/network_wan --lab "$lab" --profile wan --json target/network-wan.json
