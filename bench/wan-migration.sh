#!/usr/bin/env bash
# WAN migration benchmark (issue 6): in the WAN lab, per profile, 512 MiB VMs
# (idle, web-like, db-like) moved by qemu-plain, qemu-best (multifd + zstd) and
# DWCP, plus five VMs from one image in sequence (wan profile); then the DWCP
# micro-benchmarks (codec throughput; transport goodput vs link per profile).
# Writes bench/results/wan-migration.{json,md} and bench/results/dwcp-micro.md.
# Needs root (network namespaces). PROFILES="wan" limits the profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/wan-migration.sh needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-wanlab -p novacron-bench
PROFILES=${PROFILES:-"lan metro wan intercontinental"}
rows=target/wan-migration.jsonl
micro=target/dwcp-goodput.jsonl
: > "$rows"
: > "$micro"
lab=wm$$
labpid=
cleanup() {
	[ -n "$labpid" ] && kill "$labpid" 2>/dev/null && wait "$labpid" 2>/dev/null
	target/release/novacron-wanlab down --name "$lab" --hosts 2 >/dev/null 2>&1 || true
}
trap cleanup EXIT
for p in $PROFILES; do
	case $p in
	lan | metro) rate=1000 ;;
	wan) rate=100 ;;
	intercontinental) rate=50 ;;
	*) echo "unknown profile $p" >&2; exit 2 ;;
	esac
	target/release/novacron-wanlab up --name "$lab" --hosts 2 --profile "$p" &
	labpid=$!
	for _ in $(seq 100); do
		ip netns exec "$lab-h2" ip link show wan0 >/dev/null 2>&1 && break
		sleep 0.1
	done
	ip netns exec "$lab-h1" target/release/dwcp_micro goodput --lab "$lab" --profile "$p" --rate-mbit "$rate" --json "$micro"
	five=
	[ "$p" = wan ] && five=--five-vm
	ip netns exec "$lab-h1" target/release/wan_migration run --lab "$lab" --profile "$p" --rate-mbit "$rate" --json "$rows" $five
	kill "$labpid"
	wait "$labpid" 2>/dev/null || true
	labpid=
done
target/release/wan_migration render --json "$rows" --out-json bench/results/wan-migration.json --md bench/results/wan-migration.md
target/release/dwcp_micro render --goodput "$micro" --md bench/results/dwcp-micro.md
cat bench/results/wan-migration.md bench/results/dwcp-micro.md
