#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: install, build the guest
# image, check formatting and lints, run unit and integration tests (the
# integration tests boot real QEMU/TCG guests), then fuzz the API against its
# published OpenAPI document (scripts/api-fuzz.sh). Idempotent.
#
# Only the unit tests (no QEMU, no processes; about a minute once built):
#   cargo nextest run --workspace --lib
# One integration test binary, e.g. the migration tests:
#   cargo nextest run -p novacron --test migration
# Tests that boot QEMU run one at a time (test group `qemu` in .config/nextest.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

# A one-off build gains nothing from incremental caches (gigabytes on disk).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

scripts/setup.sh
scripts/build-guest-image.sh
scripts/build-debian-image.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
# The API contract: schemathesis against a server started for it (about 20 s).
scripts/api-fuzz.sh
