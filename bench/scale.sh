#!/usr/bin/env bash
# Control plane at scale, SQLite and etcd side by side: 1,000 hollow nodes
# (simulated hypervisor, bench only) and 10,000 VMs; API latency, create →
# agent latency, server memory/CPU, leader failover (median of 5); with the
# scheduler families of bench/scheduler.sh. Writes bench/results/scale.md and
# bench/results/scale.json. Options: --nodes N --vms N.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/scheduler.sh
cargo build --release -p novacron -p novacron-bench --bin novacron --bin scale
exec target/release/scale "$@"
