#!/usr/bin/env bash
# Builds the guest image set: Debian's cloud kernel, an initramfs, and the `minimal` and
# `base` root filesystems (ext4, made with `mkfs.ext4 -d`, never mounted).
#
#   deploy/guest-image/build.sh AGENT_BINARY
#
# Each layer is cached under $NULLSPACE_CACHE/images by a hash of its inputs, so a second
# run with unchanged inputs does no work. A layer is built in a temporary directory and
# renamed into place only when complete: a failed build leaves nothing in the cache, and
# says which step failed. Prints the directory of the finished image set on stdout and
# points $NULLSPACE_CACHE/images/current at it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
agent=${1:?usage: build.sh AGENT_BINARY}
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
images="$cache/images"
suite=bookworm
mkdir -p "$images"

step="start"
tmp=""
on_error() {
    echo "guest image build FAILED at step: $step" >&2
    [ -n "$tmp" ] && rm -rf "$tmp"
}
trap on_error ERR
log() { echo "[guest-image] $*" >&2; }

hash_of() { sha256sum | cut -c1-16; }

# --- inputs ------------------------------------------------------------------------------
step="resolve kernel package"
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$kernel_pkg" ] || { echo "cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; false; }
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/{print $2}')
busybox_ver=$(dpkg-query -W -f='${Version}' busybox-static)

step="hash inputs"
kernel_key=$( { echo "$kernel_pkg $kernel_ver busybox $busybox_ver"; cat "$here/init" "$here/modules.order"; sed -n '/^# --- kernel layer/,/^# --- end kernel layer/p' "$0"; } | hash_of)
base_key=$( { echo "$suite"; cat "$here/base-packages"; sed -n '/^# --- base tree layer/,/^# --- end base tree layer/p' "$0"; } | hash_of)
agent_key=$(sha256sum "$agent" | cut -c1-16)
final_key=$( { echo "$kernel_key $base_key $agent_key"; sed -n '/^# --- final layer/,/^# --- end final layer/p' "$0"; } | hash_of)

final="$images/set-$final_key"
if [ -f "$final/manifest.json" ]; then
    ln -sfn "set-$final_key" "$images/current"
    echo "$final"
    exit 0
fi

# --- kernel layer ------------------------------------------------------------------------
kernel_dir="$images/kernel-$kernel_key"
if [ ! -f "$kernel_dir/initrd.img" ]; then
    log "building kernel + initramfs ($kernel_pkg $kernel_ver)"
    tmp=$(mktemp -d "$images/.tmp-kernel-XXXXXX")
    step="download $kernel_pkg"
    (cd "$tmp" && apt-get download "$kernel_pkg=$kernel_ver" >/dev/null 2>&1)
    step="unpack $kernel_pkg"
    dpkg-deb -x "$tmp"/*.deb "$tmp/pkg"
    kver=$(ls "$tmp/pkg/lib/modules")
    cp "$tmp/pkg/boot/vmlinuz-$kver" "$tmp/vmlinuz"
    # QEMU 10's microvm loads the initramfs at the very top of a 2048 MiB guest's RAM,
    # over the ACPI tables SeaBIOS put there: the guest then hangs in ACPI init (2047
    # and 2049 MiB boot). A lower initrd_addr_max in the boot header (offset 0x22c,
    # after the "HdrS" magic at 0x202) makes QEMU leave room for the tables.
    step="lower initrd_addr_max"
    [ "$(dd if="$tmp/vmlinuz" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ]
    printf '\xff\xff\xff\x7e' | dd of="$tmp/vmlinuz" bs=1 seek=$((0x22c)) conv=notrunc status=none
    step="assemble initramfs"
    ird="$tmp/initramfs"
    mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
    cp /bin/busybox "$ird/bin/busybox"
    while read -r m; do
        [ -n "$m" ] || continue
        mkdir -p "$ird/lib/modules/$(dirname "$m")"
        cp "$tmp/pkg/lib/modules/$kver/$m" "$ird/lib/modules/$m"
    done <"$here/modules.order"
    cp "$here/modules.order" "$ird/modules.order"
    install -m 0755 "$here/init" "$ird/init"
    (cd "$ird" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$tmp/initrd.img"
    echo "$kver" >"$tmp/kernel-release"
    rm -rf "$tmp/pkg" "$ird" "$tmp"/*.deb
    step="commit kernel layer"
    mv -T "$tmp" "$kernel_dir"
    tmp=""
fi
# --- end kernel layer

# --- base tree layer ---------------------------------------------------------------------
base_tar="$images/base-tree-$base_key.tar"
if [ ! -f "$base_tar" ]; then
    log "building the base tree (mmdebstrap $suite)"
    tmp=$(mktemp -d "$images/.tmp-base-XXXXXX")
    step="mmdebstrap $suite"
    mmdebstrap --quiet --variant=minbase \
        --include="$(paste -sd, "$here/base-packages")" \
        --customize-hook='chroot "$1" useradd --create-home --uid 1000 --shell /bin/bash user' \
        --customize-hook='mkdir -p "$1/workspace" && chown 1000:1000 "$1/workspace"' \
        --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
        "$suite" "$tmp/base.tar" >&2
    step="commit base tree"
    mv "$tmp/base.tar" "$base_tar"
    rm -rf "$tmp"
    tmp=""
fi
# --- end base tree layer

# --- final layer -------------------------------------------------------------------------
log "composing image set $final_key"
tmp=$(mktemp -d "$images/.tmp-set-XXXXXX")
step="copy kernel"
cp "$kernel_dir/vmlinuz" "$kernel_dir/initrd.img" "$kernel_dir/kernel-release" "$tmp/"

# Size of a tree in MiB plus headroom, for mkfs; the disk grows at boot to the asked size.
image_mib() { echo $(( $(du -sm "$1" | cut -f1) + $2 )); }

step="minimal rootfs"
root="$tmp/minimal-root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,home/user,workspace}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$agent" "$root/sbin/nullspace-agent"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' >"$root/etc/group"
echo sandbox >"$root/etc/hostname"
chown 1000:1000 "$root/home/user" "$root/workspace"
chmod 1777 "$root/tmp"
step="mkfs minimal.ext4"
mkfs.ext4 -q -F -L nullspace-root -E root_owner=0:0 -d "$root" "$tmp/minimal.ext4" "$(image_mib "$root" 48)M" >&2
rm -rf "$root"

step="base rootfs"
root="$tmp/base-root"
mkdir -p "$root"
tar -xpf "$base_tar" --numeric-owner -C "$root"
install -m 0755 "$agent" "$root/sbin/nullspace-agent"
echo sandbox >"$root/etc/hostname"
step="mkfs base.ext4"
mkfs.ext4 -q -F -L nullspace-root -E root_owner=0:0 -d "$root" "$tmp/base.ext4" "$(image_mib "$root" 256)M" >&2
rm -rf "$root"

step="manifest"
cat >"$tmp/manifest.json" <<JSON
{
  "set": "$final_key",
  "kernel_package": "$kernel_pkg",
  "kernel_version": "$kernel_ver",
  "kernel_release": "$(cat "$tmp/kernel-release")",
  "kernel_key": "$kernel_key",
  "base_key": "$base_key",
  "agent_sha256": "$(sha256sum "$agent" | cut -d' ' -f1)",
  "rootfs": ["minimal", "base"]
}
JSON
step="commit image set"
chmod 0755 "$tmp"
chmod 0644 "$tmp"/*
mv -T "$tmp" "$final"
tmp=""
ln -sfn "set-$final_key" "$images/current"
# Every agent change makes a new set (~330 MB): keep the three newest. Snapshots whose
# disk chain ends in a pruned set's rootfs no longer restore, so production hosts
# should pin NULLSPACE_IMAGES instead of rebuilding.
step="prune old image sets"
ls -1dt "$images"/set-* | tail -n +4 | while read -r old; do
    log "pruning $old"
    rm -rf "$old"
done
# Layers are only inputs of sets: keep just the ones the current set was made from.
for old in "$images"/kernel-* "$images"/base-tree-*.tar; do
    [ "$old" = "$kernel_dir" ] || [ "$old" = "$base_tar" ] || [ ! -e "$old" ] || rm -rf "$old"
done
# --- end final layer
log "image set ready: $final"
echo "$final"
