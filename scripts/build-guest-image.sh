#!/usr/bin/env bash
# Build the NovaCron test guest: a Debian kernel + a small busybox initramfs.
#
#   scripts/build-guest-image.sh [OUTDIR]        (default: <repo>/target/guest)
#
# Outputs:
#   OUTDIR/vmlinuz      Debian's stock kernel (linux-image-<abi>-amd64)
#   OUTDIR/initrd.img   gzip'd newc cpio: busybox, guest/init, nc-workload, nc-nettest,
#                       virtio-blk / virtio-net / ACPI button / evdev / ext4 modules
#   OUTDIR/VERSION      "kernel=<release> package=<deb> inputs=sha256:<hash>"
#                       plus the sha256 of both outputs (used for up-to-date checks)
#   OUTDIR/cache/       downloaded kernel .deb and its extracted tree
#
# Boot it with QEMU direct kernel boot, e.g.
#   qemu-system-x86_64 -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img \
#     -append "console=ttyS0 novacron.workload=64" -serial stdio ...
# See guest/init for the novacron.* kernel command line options.
#
# Idempotent: when VERSION matches the current inputs and the outputs are
# intact, the script exits without touching anything.
# Environment: EXTRA_MODULES="mod1 mod2"  additional kernel modules to include.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
GUEST_DIR=$REPO_ROOT/guest
SCRIPT_PATH=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")

OUTDIR=${1:-$REPO_ROOT/target/guest}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE=$OUTDIR/cache
mkdir -p "$CACHE"

# Modules the guest needs (dependencies are added from modules.dep).
# crc32c_generic: ext4/jbd2 soft dependency (crypto-crc32c).
GUEST_MODULES="virtio_ring virtio virtio_pci virtio_blk virtio_net button evdev crc32c_generic ext4 ${EXTRA_MODULES:-}"

BUSYBOX=/bin/busybox             # from busybox-static
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

log() { echo "build-guest-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- host tools
as_root() {
	if [ "$(id -u)" = 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

ensure_host_packages() {
	local missing=() p
	for p in busybox-static cpio gcc libc6-dev qemu-utils; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		log "installing host packages: ${missing[*]}"
		as_root apt-get update
		as_root env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends "${missing[@]}"
	fi
	local c
	for c in apt-cache apt-get dpkg-deb gzip cpio gcc sha256sum; do
		command -v "$c" >/dev/null 2>&1 || die "missing host command: $c"
	done
	[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (busybox-static)"
	if readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'program interpreter'; then
		die "$BUSYBOX is not statically linked (install busybox-static)"
	fi
}

# ---------------------------------------------------------------- kernel .deb
# Sets KPKG, KDEB, KDEB_SHA256.
resolve_kernel_package() {
	KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && !found { p = $2; gsub(/[<>]/, "", p);
		     if (p ~ /^linux-image-.*-amd64$/) { print p; found = 1 } }' || true)
	local ver=""
	if [ -n "$KPKG" ]; then
		ver=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null |
			awk '/^Version:/ && !v { v = $2 } END { print v }' || true)
	fi
	if [ -z "$KPKG" ] || [ -z "$ver" ]; then
		# No apt metadata (offline?): fall back to a previously cached .deb.
		local cached=("$CACHE"/linux-image-*-amd64_*.deb)
		KDEB=
		[ -f "${cached[-1]}" ] && KDEB=${cached[-1]}
		[ -n "$KDEB" ] || die "cannot resolve linux-image-amd64 dependency (apt-cache depends) and no cached kernel .deb"
		log "WARNING: apt metadata unavailable, using cached $(basename "$KDEB")"
		KPKG=$(basename "$KDEB"); KPKG=${KPKG%%_*}
	else
		KDEB=$CACHE/${KPKG}_${ver//:/%3a}_amd64.deb
		if [ ! -f "$KDEB" ]; then
			log "downloading $KPKG=$ver"
			local dl=$CACHE/.download
			rm -rf "$dl"
			mkdir -p "$dl"
			local aptopts=()
			[ "$(id -u)" = 0 ] && aptopts=(-o APT::Sandbox::User=root)
			(cd "$dl" && apt-get "${aptopts[@]}" download "$KPKG=$ver") ||
				die "apt-get download $KPKG=$ver failed"
			local debs=("$dl"/*.deb)
			local got=${debs[0]}
			[ -f "$got" ] || die "apt-get download produced no .deb"
			local want_sha
			want_sha=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null |
				awk '/^SHA256:/ && !s { s = $2 } END { print s }' || true)
			local have_sha
			have_sha=$(sha256sum "$got" | cut -d' ' -f1)
			if [ -n "$want_sha" ] && [ "$want_sha" != "$have_sha" ]; then
				die "sha256 mismatch for downloaded $(basename "$got")"
			fi
			echo "$have_sha" > "$got.sha256"
			mv "$got.sha256" "$KDEB.sha256"
			mv "$got" "$KDEB"
			rm -rf "$dl"
			# drop older kernels from the cache
			local old
			for old in "$CACHE"/linux-image-*.deb; do
				[ "$old" = "$KDEB" ] && continue
				[ -f "$old" ] || continue
				log "removing old cached $(basename "$old")"
				rm -f "$old" "$old.sha256"
				rm -rf "$CACHE/extract/$(basename "$old" .deb)"
			done
		fi
	fi
	if [ -f "$KDEB.sha256" ] && [ "$KDEB.sha256" -nt "$KDEB" ]; then
		KDEB_SHA256=$(cat "$KDEB.sha256")
	else
		KDEB_SHA256=$(sha256sum "$KDEB" | cut -d' ' -f1)
		echo "$KDEB_SHA256" > "$KDEB.sha256"
	fi
}

# Sets KTREE, KREL, MODDIR, VMLINUZ.
find_kernel_tree() {
	local base
	for base in "$1" "$1/usr"; do
		if [ -d "$base/lib/modules" ]; then
			KBASE=$base
			break
		fi
	done
	[ -n "${KBASE:-}" ] || die "no lib/modules in $(basename "$KDEB")"
	local dirs n
	dirs=$(find "$KBASE/lib/modules" -mindepth 1 -maxdepth 1 -type d)
	n=$(printf '%s\n' "$dirs" | grep -c . || true)
	[ "$n" = 1 ] || die "expected one kernel in $KBASE/lib/modules, found $n"
	KREL=$(basename "$dirs")
	MODDIR=$KBASE/lib/modules/$KREL
	VMLINUZ=$1/boot/vmlinuz-$KREL
	[ -f "$VMLINUZ" ] || die "kernel image $VMLINUZ missing"
}

extract_kernel() {
	KTREE=$CACHE/extract/$(basename "$KDEB" .deb)
	if [ ! -f "$KTREE/.complete" ]; then
		log "extracting $(basename "$KDEB")"
		local tmp=$KTREE.tmp
		rm -rf "$KTREE" "$tmp"
		mkdir -p "$tmp"
		dpkg-deb -x "$KDEB" "$tmp"
		KBASE=
		find_kernel_tree "$tmp"
		if [ ! -f "$MODDIR/modules.dep" ]; then
			# Debian's package ships no modules.dep (depmod runs at install time).
			log "generating modules.dep for $KREL"
			if command -v depmod >/dev/null 2>&1 && depmod -V 2>/dev/null | grep -q kmod; then
				depmod -b "$KBASE" "$KREL"
			else
				"$BUSYBOX" depmod -b "$KBASE" "$KREL"
			fi
		fi
		[ -s "$MODDIR/modules.dep" ] || die "modules.dep generation failed"
		touch "$tmp/.complete"
		mv "$tmp" "$KTREE"
	fi
	KBASE=
	find_kernel_tree "$KTREE"
}

# ---------------------------------------------------------------- inputs hash
# guest/debian/ belongs to scripts/build-debian-image.sh.
guest_files() {
	(cd "$GUEST_DIR" && find . -path ./debian -prune -o \( -type f -o -type l \) -print) | LC_ALL=C sort
}

inputs_hash() {
	{
		echo "kernel-deb $(basename "$KDEB") $KDEB_SHA256"
		echo "builder $(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"
		echo "busybox $(sha256sum "$BUSYBOX" | cut -d' ' -f1)"
		echo "gcc $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
		echo "libc $(dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || true)"
		echo "modules $GUEST_MODULES"
		echo "epoch $SOURCE_DATE_EPOCH"
		local f
		while IFS= read -r f; do
			echo "guest $f $(stat -c %a "$GUEST_DIR/$f") $(sha256sum "$GUEST_DIR/$f" | cut -d' ' -f1)"
		done < <(guest_files)
	} | sha256sum | cut -d' ' -f1
}

version_line() {
	echo "kernel=$KREL package=$(basename "$KDEB" .deb) inputs=sha256:$INPUTS_HASH"
}

up_to_date() {
	local v=$OUTDIR/VERSION
	[ -f "$v" ] && [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initrd.img" ] || return 1
	[ "$(head -n 1 "$v")" = "$(version_line)" ] || return 1
	[ "$(sed -n 's/^vmlinuz=sha256://p' "$v")" = "$(sha256sum "$OUTDIR/vmlinuz" | cut -d' ' -f1)" ] || return 1
	[ "$(sed -n 's/^initrd.img=sha256://p' "$v")" = "$(sha256sum "$OUTDIR/initrd.img" | cut -d' ' -f1)" ] || return 1
}

# ---------------------------------------------------------------- modules
declare -A DEP_OF=() PATH_OF=() VISITED=()
MOD_ORDER=()

load_modules_dep() {
	local line path deps name
	while IFS= read -r line; do
		path=${line%%:*}
		deps=${line#*:}
		name=$(basename "$path" .ko)
		name=${name//-/_}
		PATH_OF[$name]=$path
		DEP_OF[$path]=$deps
	done < "$MODDIR/modules.dep"
}

# depth-first, dependencies before the module itself
visit_module_path() {
	local path=$1 d
	[ -n "${VISITED[$path]:-}" ] && return 0
	VISITED[$path]=1
	for d in ${DEP_OF[$path]}; do
		visit_module_path "$d"
	done
	MOD_ORDER+=("$path")
}

resolve_modules() {
	load_modules_dep
	local m key
	for m in $GUEST_MODULES; do
		key=${m//-/_}
		if [ -z "${PATH_OF[$key]:-}" ]; then
			if grep -qE "/${m//_/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
				log "module $m is built in"
				continue
			fi
			die "module $m not found in $MODDIR/modules.dep"
		fi
		visit_module_path "${PATH_OF[$key]}"
	done
}

# ---------------------------------------------------------------- build
build() {
	local stage=$OUTDIR/.build.$$
	trap 'rm -rf "'"$stage"'"' EXIT
	rm -rf "$OUTDIR"/.build.*
	local root=$stage/root
	mkdir -p "$root"
	(cd "$root" && mkdir -p bin sbin usr/bin usr/sbin etc/novacron proc sys dev run tmp \
		root mnt/root mnt/data "lib/modules/$KREL")
	chmod 1777 "$root/tmp"
	chmod 700 "$root/root"

	# busybox + applet symlinks
	install -m 755 "$BUSYBOX" "$root/bin/busybox"
	local a
	while IFS= read -r a; do
		[ -n "$a" ] || continue
		[ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
	done < <("$BUSYBOX" --list-full)
	# Debian's busybox has mke2fs; provide the usual mkfs.ext2 name as well
	[ -e "$root/sbin/mkfs.ext2" ] || ln -s /bin/busybox "$root/sbin/mkfs.ext2"

	# guest files
	install -m 755 "$GUEST_DIR/init" "$root/init"
	if [ -d "$GUEST_DIR/rootfs" ]; then
		cp -a "$GUEST_DIR/rootfs/." "$root/"
	fi

	# workload
	log "compiling nc-workload"
	gcc -static -O2 -s -Wall -o "$root/bin/nc-workload" "$GUEST_DIR/workload.c"
	log "compiling nc-nettest"
	gcc -static -O2 -s -Wall -o "$root/bin/nc-nettest" "$GUEST_DIR/nettest.c"

	# kernel modules, in dependency order
	local p
	: > "$root/etc/novacron/modules"
	: > "$root/lib/modules/$KREL/modules.dep"
	for p in "${MOD_ORDER[@]}"; do
		mkdir -p "$root/lib/modules/$KREL/$(dirname "$p")"
		cp "$MODDIR/$p" "$root/lib/modules/$KREL/$p"
		echo "$p" >> "$root/etc/novacron/modules"
		echo "$p:${DEP_OF[$p]}" >> "$root/lib/modules/$KREL/modules.dep"
	done
	for p in modules.builtin modules.order; do
		[ -f "$MODDIR/$p" ] && cp "$MODDIR/$p" "$root/lib/modules/$KREL/$p"
	done

	# reproducible archive
	find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	log "creating initrd.img"
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) |
		gzip -n -9 > "$stage/initrd.img"
	cp "$VMLINUZ" "$stage/vmlinuz"

	# install outputs; VERSION last, so an interrupted build is never "up to date"
	rm -f "$OUTDIR/VERSION"
	mv -f "$stage/vmlinuz" "$OUTDIR/vmlinuz"
	mv -f "$stage/initrd.img" "$OUTDIR/initrd.img"
	{
		version_line
		echo "vmlinuz=sha256:$(sha256sum "$OUTDIR/vmlinuz" | cut -d' ' -f1)"
		echo "initrd.img=sha256:$(sha256sum "$OUTDIR/initrd.img" | cut -d' ' -f1)"
		echo "modules=$(printf '%s ' "${MOD_ORDER[@]##*/}" | sed 's/\.ko//g; s/ $//')"
	} > "$stage/VERSION"
	mv -f "$stage/VERSION" "$OUTDIR/VERSION"
	rm -rf "$stage"
	trap - EXIT
}

# ---------------------------------------------------------------- main
ensure_host_packages
resolve_kernel_package
for f in init workload.c nettest.c; do
	[ -f "$GUEST_DIR/$f" ] || die "missing $GUEST_DIR/$f"
done
extract_kernel
INPUTS_HASH=$(inputs_hash)
if up_to_date; then
	log "up to date: $(head -n 1 "$OUTDIR/VERSION")"
	exit 0
fi
resolve_modules
build
log "built $OUTDIR/vmlinuz and $OUTDIR/initrd.img ($(stat -c %s "$OUTDIR/initrd.img") bytes)"
log "$(head -n 1 "$OUTDIR/VERSION")"
