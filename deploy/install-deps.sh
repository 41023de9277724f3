#!/usr/bin/env bash
# Installs what Nullspace needs on a Debian bookworm host (this machine kind), and only
# what is missing, so a second run takes a second. Needs root.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils busybox-static mmdebstrap e2fsprogs cpio gzip iproute2 curl
    nftables  # each VM's network namespace: its traffic to the egress proxy
    chromium openssh-client  # chromium: the preview tests load pages in a real browser
    dnsmasq-base)  # the egress tests' DNS server, in a namespace of their own
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[install-deps] installing: ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
# The kernel package must be resolvable for the guest image build.
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -q >&2

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "[install-deps] installing cargo-nextest" >&2
    cargo install --locked cargo-nextest >&2
fi

# QEMU runs as this unprivileged account (see vmm::qemu::VM_USER).
if ! id nullspace-vm >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nullspace-vm
fi
# /dev/kvm as Debian's udev rules leave it (root:kvm 0660), where no udev ran.
if [ -c /dev/kvm ]; then
    getent group kvm >/dev/null || groupadd --system kvm
    [ "$(stat -c %G /dev/kvm)" = kvm ] || { chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; }
fi
if getent group kvm >/dev/null && ! id -nG nullspace-vm | grep -qw kvm; then
    usermod -a -G kvm nullspace-vm
fi
