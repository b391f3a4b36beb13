#!/usr/bin/env bash
# VM network benchmark: TCP throughput and round trip host<->host (the
# baseline), VM<->VM on one host and across hosts (VXLAN), and the gap a live
# migration leaves in a UDP stream (pre-copy, post-copy). Needs root (network
# namespaces). Writes bench/results/network.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/network.sh needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-bench
exec target/release/network
