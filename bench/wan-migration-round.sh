#!/usr/bin/env bash
# The WAN migration table in one round: bench/wan-migration.sh in five parts,
# each row as often as it needs (5 runs for the rows that carry targets, 3
# for the rest, qemu-plain only where a target names it), rendered together.
# About 80 minutes on 2 cores. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMMAND="bash bench/wan-migration-round.sh"
: > target/wan-migration.jsonl 2>/dev/null || true
: > target/dwcp-goodput.jsonl 2>/dev/null || true
: > target/machine-speed.jsonl 2>/dev/null || true
export APPEND=1
PROFILES=wan WORKLOADS=web-like METHODS=qemu-best,dwcp RUNS=5 TARGET_RUNS=5 bash bench/wan-migration.sh
PROFILES=intercontinental WORKLOADS=web-like METHODS=qemu-best,dwcp RUNS=5 TARGET_RUNS=5 bash bench/wan-migration.sh
PROFILES="lan metro" METHODS=qemu-best,dwcp RUNS=3 TARGET_RUNS=3 bash bench/wan-migration.sh
PROFILES="wan intercontinental" WORKLOADS=idle,db-like METHODS=qemu-best,dwcp RUNS=3 TARGET_RUNS=0 bash bench/wan-migration.sh
PROFILES=wan WORKLOADS=web-like METHODS=qemu-plain RUNS=5 TARGET_RUNS=0 bash bench/wan-migration.sh
