#!/usr/bin/env bash
# Installs what Nullspace needs on a Debian bookworm host (this machine kind), in one apt
# transaction and only what is missing, then checks that every tool the platform and its
# tests run really runs. Stops with the fix named when one does not. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
[ "$(id -u)" = 0 ] || die "install-deps needs root (the VM user, /dev/kvm and apt): run it as root"

packages=(qemu-system-x86 busybox-static mmdebstrap e2fsprogs cpio gzip iproute2 curl util-linux
    gcc libc6-dev  # crates that build C
    nftables  # each VM's network namespace: its traffic to the egress proxy
    chromium openssh-client  # chromium: the preview tests load pages in a real browser
    dnsmasq-base  # the egress tests' DNS server, in a namespace of their own
    postgresql  # the catalog's shared backend: its tests run one (deploy/postgres.sh)
    openssl  # the catalog TLS test makes a CA and a server certificate
    systemd)  # systemd-analyze verify checks the units (deploy/check-manifests.sh); nothing is started

installed_version() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }
candidate_version() { { apt-cache policy "$1" 2>/dev/null || true; } | awk '/Candidate:/ && $2 != "(none)" {print $2}'; }
available() { { apt-cache madison "$1" 2>/dev/null || true; } | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$2"; }

# qemu-img must come from the same QEMU as qemu-system-x86_64: a machine may ship a newer
# qemu-utils (bookworm-backports) that Debian's qemu-system-common breaks, so installing
# the system emulator alone would remove qemu-img. Both are pinned to one version in one
# transaction: the installed emulator's, if apt still offers it, else the candidate.
qemu_version() {
    local v
    v=$(installed_version qemu-system-x86)
    if [ -z "$v" ] || ! available qemu-utils "$v"; then
        v=$(candidate_version qemu-system-x86)
    fi
    echo "$v"
}
missing() {
    for p in "${packages[@]}"; do
        [ -n "$(installed_version "$p")" ] || echo "$p"
    done
}
qemu=$(qemu_version)
wanted=$(missing)
# qemu-system-data is built once for all architectures: no binNMU suffix (+bN).
data_version() { sed 's/+b[0-9]*$//' <<<"$qemu"; }
qemu_mismatch() {
    for p in qemu-system-x86 qemu-system-common qemu-utils; do
        [ "$(installed_version "$p")" = "$qemu" ] || return 0
    done
    [ "$(installed_version qemu-system-data)" = "$(data_version)" ] || return 0
    return 1
}
apt_update() {
    apt-get update -q >&2 ||
        die "apt-get update failed (its output is above): check the network and /etc/apt/sources.list (Debian bookworm main)"
}
if [ -n "$wanted" ] || [ -z "$qemu" ] || qemu_mismatch; then
    apt_update
    qemu=$(qemu_version)
    [ -n "$qemu" ] || die "no qemu-system-x86 package in the apt sources: add Debian bookworm main to /etc/apt/sources.list"
    wanted=$(missing | grep -vx qemu-system-x86 || true)
    # Every package of the QEMU source at one version: a newer qemu-utils can have
    # pulled a newer qemu-system-data, which breaks the older qemu-system-common.
    qemu_pins="qemu-system-x86=$qemu qemu-system-common=$qemu qemu-system-data=$(data_version) qemu-utils=$qemu"
    echo "[install-deps] installing:" $wanted $qemu_pins >&2
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades \
        $wanted $qemu_pins >&2 ||
        die "apt-get install failed (its output is above): fix what apt names (a held or broken package, dpkg --configure -a), then run deploy/install-deps.sh again"
fi
# The kernel package must be resolvable for the guest image build.
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt_update

if ! command -v cargo-nextest >/dev/null 2>&1; then
    step "installing cargo-nextest" cargo install --locked cargo-nextest
fi

# QEMU runs as this unprivileged account (see vmm::qemu::VM_USER).
if ! id nullspace-vm >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nullspace-vm
fi
# /dev/kvm as Debian's udev rules leave it (root:kvm 0660), where no udev ran.
if [ -c /dev/kvm ]; then
    getent group kvm >/dev/null || groupadd --system kvm
    [ "$(stat -c %G /dev/kvm)" = kvm ] || chgrp kvm /dev/kvm
    [ "$(stat -c %a /dev/kvm)" = 660 ] || chmod 0660 /dev/kvm
fi
if getent group kvm >/dev/null && ! id -nG nullspace-vm | grep -qw kvm; then
    usermod -a -G kvm nullspace-vm
fi

# --- verify: every tool runs, not merely "is installed" -------------------------------------
failed=0
check() { # NAME FIX COMMAND...
    local name=$1 fix=$2 out
    shift 2
    if out=$("$@" 2>&1); then
        echo "[install-deps] ✓ $name: $(head -1 <<<"$out")" >&2
    else
        echo "[install-deps] ✗ $name: $(head -1 <<<"$out")" >&2
        echo "                fix: $fix" >&2
        failed=1
    fi
}
qemu_fix="apt-get install --allow-downgrades qemu-system-x86=$qemu qemu-system-common=$qemu qemu-system-data=$(data_version) qemu-utils=$qemu"
check qemu-system-x86_64 "$qemu_fix" qemu-system-x86_64 --version
check qemu-img "$qemu_fix" qemu-img --version
emulator=$({ qemu-system-x86_64 --version 2>/dev/null || true; } | awk 'NR==1{print $4}')
img=$({ qemu-img --version 2>/dev/null || true; } | awk 'NR==1{print $3}')
same_version() { [ -n "$emulator" ] && [ "$emulator" = "$img" ] && echo "$emulator" ||
    { echo "qemu-system-x86_64 ${emulator:-missing}, qemu-img ${img:-missing}"; false; }; }
check "one QEMU version" "$qemu_fix" same_version
check mkfs.ext4 "apt-get install e2fsprogs" mkfs.ext4 -V
check nft "apt-get install nftables" nft --version
check ip "apt-get install iproute2" ip -V
check nsenter "apt-get install util-linux" nsenter --version
check busybox "apt-get install busybox-static" /bin/busybox --help
check mmdebstrap "apt-get install mmdebstrap" mmdebstrap --version
check cpio "apt-get install cpio" cpio --version
check curl "apt-get install curl" curl --version
check chromium "apt-get install chromium" sh -c "chromium --version 2>/dev/null"
check ssh "apt-get install openssh-client" ssh -V
check dnsmasq "apt-get install dnsmasq-base" dnsmasq --version
check postgresql "apt-get install postgresql" deploy/postgres.sh version
check openssl "apt-get install openssl" openssl version
check systemd-analyze "apt-get install systemd" systemd-analyze --version
check cargo "install Rust with rustup (https://rustup.rs)" cargo --version
check cargo-nextest "cargo install --locked cargo-nextest" cargo nextest --version
check cc "apt-get install gcc" cc --version
check "python3 venv" "install a Python 3 with its venv module (Debian: apt-get install python3-venv)" python3 -c 'import venv, ensurepip; print("venv ok")'
node20() { node -e 'const v = +process.versions.node.split(".")[0]; console.log("node " + process.version); process.exit(v >= 20 ? 0 : 1)'; }
check "Node.js 20+" "install Node.js 20 or later with its npm (NodeSource's nodejs 20 package; Debian bookworm's nodejs is 18, too old)" node20
check npm "install npm with Node.js 20+" npm --version
check "VM user" "useradd --system nullspace-vm" id nullspace-vm
[ "$failed" = 0 ] || die "install-deps: the tools marked ✗ above are missing or broken; apply the fixes and run it again"
