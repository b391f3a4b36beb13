#!/usr/bin/env bash
# Migration benchmark: QEMU's default migration parameters vs NovaCron's, 256 MiB
# and 1 GiB guests, idle and busy. Writes bench/results/migration.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest-image.sh
cargo build --release -p novacron -p novacron-bench
exec target/release/migration
