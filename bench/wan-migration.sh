#!/usr/bin/env bash
# WAN migration benchmark: in the WAN lab, per profile, 512 MiB VMs (idle,
# web-like, db-like) moved by qemu-plain, qemu-best (multifd + zstd) and DWCP,
# plus five VMs from one image in sequence (wan profile); then the DWCP
# micro-benchmarks (codec throughput; transport goodput vs link per profile).
#
# Every row runs RUNS times (default 3); the rows that carry targets (web-like
# on wan and intercontinental, and the five VMs) TARGET_RUNS times (default 5).
# Each run is a fresh lab with the methods in a rotating order; the tables
# show medians and min-max, and each lab records the machine's speed first.
# Writes bench/results/wan-migration.{json,md} and bench/results/dwcp-micro.md.
# Needs root (network namespaces).
#   PROFILES="wan"            limits the profiles
#   WORKLOADS="web-like"      limits the workloads (and METHODS the methods)
#   RUNS=3 TARGET_RUNS=5      how often each row runs
#   APPEND=1                  adds to the rows of the runs before (see
#                             bench/wan-migration-round.sh) instead of starting anew
#   COMMAND="..."             the command the table names
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/wan-migration.sh needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-wanlab -p novacron-bench
PROFILES=${PROFILES:-"lan metro wan intercontinental"}
WORKLOADS=${WORKLOADS:-"idle,web-like,db-like"}
RUNS=${RUNS:-3}
TARGET_RUNS=${TARGET_RUNS:-5}
rows=target/wan-migration.jsonl
micro=target/dwcp-goodput.jsonl
speed=target/machine-speed.jsonl
if [ -z "${APPEND:-}" ]; then
	: > "$rows"
	: > "$micro"
	: > "$speed"
fi
lab=wm$$
labpid=
cleanup() {
	[ -n "$labpid" ] && kill "$labpid" 2>/dev/null && wait "$labpid" 2>/dev/null
	target/release/novacron-wanlab down --name "$lab" --hosts 2 >/dev/null 2>&1 || true
}
trap cleanup EXIT
has() { [[ ",$1," == *",$2,"* ]]; }
max_runs=$((RUNS > TARGET_RUNS ? RUNS : TARGET_RUNS))
for run in $(seq "$max_runs"); do
	for p in $PROFILES; do
		case $p in
		lan | metro) rate=1000 ;;
		wan) rate=100 ;;
		intercontinental) rate=50 ;;
		*) echo "unknown profile $p" >&2; exit 2 ;;
		esac
		# What this run moves: every row up to RUNS, the target rows up to TARGET_RUNS.
		workloads=
		five=
		if [ "$run" -le "$RUNS" ]; then
			workloads=$WORKLOADS
		fi
		if [ "$run" -le "$TARGET_RUNS" ]; then
			case $p in
			wan | intercontinental) has "$WORKLOADS" web-like && ! has "$workloads" web-like && workloads=${workloads:+$workloads,}web-like ;;
			esac
			[ "$p" = wan ] && five=--five-vm
		fi
		[ -z "$workloads" ] && [ -z "$five" ] && continue
		target/release/novacron-wanlab up --name "$lab" --hosts 2 --profile "$p" &
		labpid=$!
		for _ in $(seq 100); do
			ip netns exec "$lab-h2" ip link show wan0 >/dev/null 2>&1 && break
			sleep 0.1
		done
		target/release/dwcp_micro speed --json "$speed" --profile "$p" --run "$run"
		if [ "$run" = 1 ] && ! grep -q "\"profile\":\"$p\"" "$micro"; then
			ip netns exec "$lab-h1" target/release/dwcp_micro goodput --lab "$lab" --profile "$p" --rate-mbit "$rate" --json "$micro"
		fi
		# An empty WORKLOADS list moves only the five VMs.
		WORKLOADS=${workloads:-none} ip netns exec "$lab-h1" target/release/wan_migration run --lab "$lab" \
			--profile "$p" --rate-mbit "$rate" --run "$run" --json "$rows" $five
		kill "$labpid"
		wait "$labpid" 2>/dev/null || true
		labpid=
	done
done
target/release/wan_migration render --json "$rows" --speed "$speed" --out-json bench/results/wan-migration.json --md bench/results/wan-migration.md \
	--command "${COMMAND:-bash bench/wan-migration.sh}"
target/release/dwcp_micro render --goodput "$micro" --md bench/results/dwcp-micro.md
cat bench/results/wan-migration.md bench/results/dwcp-micro.md
