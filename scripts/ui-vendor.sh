#!/usr/bin/env bash
# Rebuilds the dashboard's third-party files (crates/novacron-server/ui/vendor/)
# from the npm registry the machine's npm is configured for, at the versions
# crates/novacron-server/ui/package-lock.json pins (with their integrity
# hashes). The files are committed: `cargo build` compiles them into the
# server and never runs npm. Run this only to change a version.
set -euo pipefail
cd "$(dirname "$0")/../crates/novacron-server/ui"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp package.json package-lock.json "$work/"
(cd "$work" && npm ci --no-audit --no-fund --ignore-scripts --silent)
cp "$work/node_modules/@xterm/xterm/lib/xterm.js" vendor/xterm.js
cp "$work/node_modules/@xterm/xterm/css/xterm.css" vendor/xterm.css
cp "$work/node_modules/@xterm/xterm/LICENSE" vendor/xterm.LICENSE
sha256sum vendor/xterm.js vendor/xterm.css
