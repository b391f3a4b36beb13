#!/usr/bin/env bash
# Build NovaCron's real guest: a minimal Debian 12 cloud image that boots from
# its own disk through GRUB, like the distributions' cloud images.
#
#   scripts/build-debian-image.sh [OUTDIR]     (default: <repo>/target/guest-debian)
#
# Outputs:
#   OUTDIR/debian-12.qcow2   MBR disk, one ext4 partition (LABEL=debian-root),
#                            GRUB in the MBR, systemd, cloud-init (NoCloud),
#                            openssh-server, qemu-guest-agent, console on ttyS0
#   OUTDIR/VERSION           "inputs=sha256:<hash>" and the image's sha256
#
# Packages come from the archive the machine's apt sources already name
# (mmdebstrap, run as root). GRUB is installed by booting the new system's
# own kernel once in a throwaway TCG VM (guest/debian/rootfs/usr/local/sbin/
# novacron-image-finish), so the build needs no loop devices or mounts.
#
# Idempotent: when VERSION matches the inputs (this script, guest/debian/,
# the package list) and the image is intact, nothing is done. The packages'
# versions are not an input: REBUILD=1 takes the archive's newest.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
FILES_DIR=$REPO_ROOT/guest/debian
OUTDIR=${1:-$REPO_ROOT/target/guest-debian}
IMAGE_NAME=debian-12.qcow2
SUITE=bookworm
# The virtual disk (grown by cloud-init's growpart to the VM's root disk size).
DISK_MIB=2048
PART_START_MIB=1
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
PACKAGES=(
	systemd-sysv udev dbus linux-image-cloud-amd64 grub-pc
	cloud-init cloud-guest-utils fdisk e2fsprogs
	openssh-server qemu-guest-agent
	ifupdown isc-dhcp-client iproute2 sudo ca-certificates
)

log() { echo "build-debian-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap installs packages into a chroot)"
. "$SCRIPT_DIR/apt-mirror.sh"

ensure_host_packages() {
	local missing=() p
	for p in mmdebstrap fdisk e2fsprogs qemu-utils; do
		[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] ||
			missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		log "installing host packages: ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (run scripts/setup.sh)"
}

inputs_hash() {
	{
		echo "builder $(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
		echo "suite $SUITE disk $DISK_MIB epoch $SOURCE_DATE_EPOCH"
		echo "packages ${PACKAGES[*]}"
		(cd "$FILES_DIR" && find . -type f | LC_ALL=C sort | while IFS= read -r f; do
			echo "file $f $(stat -c %a "$f") $(sha256sum "$f" | cut -d' ' -f1)"
		done)
	} | sha256sum | cut -d' ' -f1
}

up_to_date() {
	local v=$OUTDIR/VERSION
	[ -z "${REBUILD:-}" ] && [ -f "$v" ] && [ -f "$OUTDIR/$IMAGE_NAME" ] || return 1
	[ "$(sed -n 's/^inputs=//p' "$v")" = "sha256:$INPUTS_HASH" ] || return 1
	[ "$(sed -n "s/^$IMAGE_NAME=sha256://p" "$v")" = "$(sha256sum "$OUTDIR/$IMAGE_NAME" | cut -d' ' -f1)" ]
}

# One-line sources for the suite, from the archives the host already uses.
apt_sources() {
	local main security
	main=$(apt_mirror_for "$SUITE")
	[ -n "$main" ] || die "no apt source for $SUITE on this machine to take the archive from"
	echo "deb $main $SUITE main"
	echo "deb $main $SUITE-updates main"
	security=$(apt_mirror_for "$SUITE-security")
	[ -n "$security" ] && echo "deb $security $SUITE-security main"
	return 0
}

bootstrap() {
	local root=$1 sources
	sources=$(apt_sources)
	log "mmdebstrap $SUITE (${#PACKAGES[@]} packages and their dependencies)"
	local inc
	inc=$(IFS=,; echo "${PACKAGES[*]}")
	# grub-pc's postinst must not touch a device of the build host.
	mmdebstrap --mode=root --variant=apt --format=directory \
		--include="$inc" \
		--essential-hook='echo "grub-pc grub-pc/install_devices multiselect" | chroot "$1" debconf-set-selections' \
		--essential-hook='echo "grub-pc grub-pc/install_devices_empty boolean true" | chroot "$1" debconf-set-selections' \
		--customize-hook='cp -a "'"$FILES_DIR"'/rootfs/." "$1/"' \
		--customize-hook='chroot "$1" sh -c "
			set -e
			echo debian > /etc/hostname
			printf \"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n\" > /etc/hosts
			printf \"LABEL=debian-root / ext4 errors=remount-ro,discard 0 1\n\" > /etc/fstab
			# Per-instance identity: systemd and cloud-init make these on first boot.
			: > /etc/machine-id
			rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
			printf \"auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n\" > /etc/network/interfaces
			# Timers that would only slow a TCG guest down.
			systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer
			apt-get clean
			rm -rf /var/lib/apt/lists/*
		"' \
		"$SUITE" "$root" - <<<"$sources"
}

build() {
	local stage=$OUTDIR/.build.$$
	trap 'rm -rf "'"$stage"'"' EXIT
	rm -rf "$OUTDIR"/.build.*
	mkdir -p "$stage"
	local root=$stage/root
	bootstrap "$root"
	local kernel initrd
	kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | LC_ALL=C sort | tail -n 1)
	initrd=$(find "$root/boot" -maxdepth 1 -name 'initrd.img-*' | LC_ALL=C sort | tail -n 1)
	[ -f "$kernel" ] && [ -f "$initrd" ] || die "no kernel or initrd in the new system"

	log "making the root file system"
	local part_mib=$((DISK_MIB - PART_START_MIB))
	# orphan_file and metadata_csum_seed: newer than bookworm's GRUB reads.
	mkfs.ext4 -q -F -L debian-root -O ^orphan_file,^metadata_csum_seed \
		-E root_owner=0:0 -d "$root" "$stage/root.ext4" "${part_mib}M"
	truncate -s "${DISK_MIB}M" "$stage/disk.raw"
	echo "${PART_START_MIB}MiB,,L,*" | sfdisk -q --label dos "$stage/disk.raw"
	dd if="$stage/root.ext4" of="$stage/disk.raw" bs=1M seek="$PART_START_MIB" conv=notrunc,sparse status=none
	rm -f "$stage/root.ext4"

	log "installing GRUB from inside a throwaway VM"
	cp "$kernel" "$stage/vmlinuz"
	cp "$initrd" "$stage/initrd.img"
	rm -rf "$root"
	timeout 900 qemu-system-x86_64 -accel tcg -machine pc -cpu max -m 512 -smp 1 \
		-nodefaults -no-user-config -display none -no-reboot \
		-serial "file:$stage/finish.log" \
		-kernel "$stage/vmlinuz" -initrd "$stage/initrd.img" \
		-append "root=LABEL=debian-root rw console=ttyS0 panic=-1 init=/usr/local/sbin/novacron-image-finish" \
		-drive "file=$stage/disk.raw,format=raw,if=virtio" ||
		die "the bootloader VM failed (see $stage/finish.log)"
	if ! grep -q "novacron-image-finish: DONE" "$stage/finish.log"; then
		tail -n 30 "$stage/finish.log" >&2
		trap - EXIT
		die "installing GRUB failed; console log: $stage/finish.log"
	fi

	log "converting to qcow2"
	qemu-img convert -q -f raw -O qcow2 "$stage/disk.raw" "$stage/$IMAGE_NAME"
	rm -f "$OUTDIR/VERSION"
	mv -f "$stage/$IMAGE_NAME" "$OUTDIR/$IMAGE_NAME"
	{
		echo "inputs=sha256:$INPUTS_HASH"
		echo "$IMAGE_NAME=sha256:$(sha256sum "$OUTDIR/$IMAGE_NAME" | cut -d' ' -f1)"
	} > "$stage/VERSION"
	mv -f "$stage/VERSION" "$OUTDIR/VERSION"
	rm -rf "$stage"
	trap - EXIT
}

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
[ -d "$FILES_DIR/rootfs" ] || die "missing $FILES_DIR/rootfs"
INPUTS_HASH=$(inputs_hash)
if up_to_date; then
	log "up to date: $OUTDIR/$IMAGE_NAME"
	exit 0
fi
ensure_host_packages
build
log "built $OUTDIR/$IMAGE_NAME ($(du -k "$OUTDIR/$IMAGE_NAME" | cut -f1) KiB on disk)"
