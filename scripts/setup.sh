#!/usr/bin/env bash
# Installs what NovaCron needs on a Debian machine (idempotent): QEMU >= 10, qemu-img,
# busybox-static and a C toolchain for the guest image, curl for the demo, python3-venv
# for the API fuzzer, iproute2, dnsmasq-base and nftables for VM networks, xorriso for
# cloud-init seeds, prometheus for the metrics test, chromium and Node.js for the
# dashboard's browser tests, etcd and protoc for the etcd store backend. (scripts/build-debian-image.sh
# installs what the Debian image needs.)
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# QEMU >= 10: Debian 12's QEMU 7.2 loses guest stores under TCG live migration
# when the host CPU is contended (reproduced with plain QEMU, see
# scripts/plain-qemu-migration-check.py); 10.0 comes from bookworm-backports.
MIN_QEMU_MAJOR=10
qemu_major() {
  qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}
. "$(dirname "$0")/apt-mirror.sh"

major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt "$MIN_QEMU_MAJOR" ]; then
  . /etc/os-release
  qemu_pkgs=(qemu-system-x86 qemu-utils)
  target=()
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    list=/etc/apt/sources.list.d/novacron-bookworm-backports.list
    if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      mirror=$(apt_mirror_for bookworm)
      if [ -z "$mirror" ]; then
        echo "setup: no apt source for bookworm found to take the backports mirror from; add bookworm-backports by hand" >&2
        exit 1
      fi
      echo "setup: adding bookworm-backports from $mirror for QEMU $MIN_QEMU_MAJOR"
      echo "deb $mirror bookworm-backports main" | $SUDO tee "$list" >/dev/null
    fi
    target=(-t bookworm-backports)
  fi
  echo "setup: installing QEMU >= $MIN_QEMU_MAJOR (${qemu_pkgs[*]})"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${qemu_pkgs[@]}" >/dev/null
  major=$(qemu_major || true)
  if [ -z "$major" ] || [ "$major" -lt "$MIN_QEMU_MAJOR" ]; then
    echo "setup: warning: QEMU ${major:-missing} is older than $MIN_QEMU_MAJOR; busy guests may see stale pages after TCG migration" >&2
  fi
fi

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx mke2fs || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v curl >/dev/null || need+=(curl)
command -v xz >/dev/null || need+=(xz-utils)
# VM networking: links, bridges and VXLAN (iproute2), DHCP for guests
# (dnsmasq-base: the daemon without a system service), firewall and NAT.
command -v ip >/dev/null && command -v bridge >/dev/null || need+=(iproute2)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v nft >/dev/null || need+=(nftables)
# cloud-init seeds (ISO 9660 "cidata" volumes) for disk-image guests.
command -v xorriso >/dev/null || need+=(xorriso)
# Tests log in to the Debian guest over SSH.
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
# Tests scrape /metrics with a real Prometheus (started by the test itself).
command -v prometheus >/dev/null || need+=(prometheus)
# The dashboard's browser tests: Debian's Chromium, driven by playwright-core under Node.js.
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# The etcd store backend: its client's build compiles etcd's protobuf API
# (protoc); tests and `novacron dev --store etcd` start Debian's etcd server.
command -v protoc >/dev/null || need+=(protobuf-compiler)
# ... and its well-known types (google/protobuf/*.proto).
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
# The API fuzzer (scripts/api-fuzz.sh) runs from a virtual environment.
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The test starts its own Prometheus: the package's service, which a
  # systemd host starts on install, is not wanted.
  # Likewise etcd's: tests and `novacron dev` start their own members.
  if [ -d /run/systemd/system ]; then
    for service in prometheus etcd; do
      if [[ " ${need[*]} " == *" $service"* ]]; then
        $SUDO systemctl disable --now "$service" >/dev/null 2>&1 || true
      fi
    done
  fi
fi

# playwright-core for the browser tests, at the version the lock file pins
# (from the registry npm is configured for; it never downloads a browser).
ui_tests="$(dirname "$0")/../crates/novacron/tests/ui"
lock_sum=$(sha256sum "$ui_tests/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$ui_tests/node_modules/.installed-lock" 2>/dev/null)" != "$lock_sum" ]; then
  echo "setup: installing the browser tests' packages (npm ci in crates/novacron/tests/ui)"
  (cd "$ui_tests" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --ignore-scripts --silent)
  echo "$lock_sum" >"$ui_tests/node_modules/.installed-lock"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo (Rust >= 1.88) is required; install it with rustup" >&2
  exit 1
fi
