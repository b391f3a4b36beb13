#!/usr/bin/env bash
# Foundation benchmark: boot time (NovaCron vs plain QEMU) and API latency with
# 10,000 stored VMs. Writes bench/results/foundation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-bench
exec target/release/foundation
