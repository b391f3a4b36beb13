#!/usr/bin/env bash
# Scheduler benchmark, one core: 10,000 nodes and 100,000 VMs of mixed sizes.
# Placement throughput and latency, packing against the lower bound and
# first-fit-decreasing, and the rebalancer. Writes bench/results/scheduler.md
# and bench/results/scheduler.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p novacron-bench --bin scheduler
exec taskset -c 0 target/release/scheduler
