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

# QEMU comes from Debian's bookworm-backports (10.x): live migration's post-copy needs
# /dev/userfaultfd (QEMU 8.1+: QEMU runs unprivileged), and a template's memory file can
# stay read-only to VMs (8.2+). bookworm's own 7.2 has neither. The machine may already
# ship backports' qemu-utils; the suite is added where no apt source names it.
QEMU_MIN=10.0
backports_source=/etc/apt/sources.list.d/nullspace-bookworm-backports.sources
has_backports() { grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; }
if ! has_backports; then
    cat >"$backports_source" <<'SRC'
# Added by Nullspace's deploy/install-deps.sh: QEMU 10 (post-copy live migration).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    added_backports=1
fi
# qemu-img must come from the same QEMU as qemu-system-x86_64, and every package of the
# QEMU source at one version (a newer qemu-utils breaks an older qemu-system-common):
# the installed emulator's, if it is recent enough and apt still offers it, else the
# newest apt offers from backports.
recent() { dpkg --compare-versions "$1" ge "1:$QEMU_MIN"; }
qemu_version() {
    local v
    v=$(installed_version qemu-system-x86)
    if [ -z "$v" ] || ! recent "$v" || ! available qemu-utils "$v"; then
        v=$({ apt-cache madison qemu-system-x86 2>/dev/null || true; } |
            awk -F'|' '/bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}')
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
        die "apt-get update failed (its output is above): check the network and the apt sources (Debian bookworm main, and bookworm-backports for QEMU 10)"
}
if [ -n "${added_backports:-}" ] || [ -n "$wanted" ] || [ -z "$qemu" ] || qemu_mismatch; then
    apt_update
    qemu=$(qemu_version)
    [ -n "$qemu" ] && recent "$qemu" ||
        die "no qemu-system-x86 $QEMU_MIN or later in the apt sources (found '${qemu:-none}'): add Debian's bookworm-backports (see $backports_source) and run deploy/install-deps.sh again"
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

# Post-copy live migration: a destination's QEMU (only it) opens /dev/userfaultfd through
# this group (vmm::qemu::UFFD_GROUP); the udev rule keeps the mode across reboots.
getent group nullspace-uffd >/dev/null || groupadd --system nullspace-uffd
if [ -c /dev/userfaultfd ]; then
    uffd_rule='KERNEL=="userfaultfd", GROUP="nullspace-uffd", MODE="0660"'
    rules=/etc/udev/rules.d/60-nullspace-userfaultfd.rules
    if [ -d /etc/udev ] && [ "$(cat "$rules" 2>/dev/null)" != "$uffd_rule" ]; then
        mkdir -p /etc/udev/rules.d && echo "$uffd_rule" >"$rules"
    fi
    [ "$(stat -c %G /dev/userfaultfd)" = nullspace-uffd ] || chgrp nullspace-uffd /dev/userfaultfd
    [ "$(stat -c %a /dev/userfaultfd)" = 660 ] || chmod 0660 /dev/userfaultfd
fi

# --- verify: every tool runs, not merely "is installed" -------------------------------------
failed=0
check() { # NAME FIX COMMAND...  (SOFT=1: a ✗ is reported, not fatal)
    local name=$1 fix=$2 out
    shift 2
    if out=$("$@" 2>&1); then
        echo "[install-deps] ✓ $name: $(head -1 <<<"$out")" >&2
    else
        echo "[install-deps] ✗ $name: $(head -1 <<<"$out")${SOFT:+ (not fatal)}" >&2
        echo "                fix: $fix" >&2
        [ -n "${SOFT:-}" ] || failed=1
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
qemu_recent() { [ -n "$emulator" ] && dpkg --compare-versions "$emulator" ge "$QEMU_MIN" && echo "QEMU $emulator" ||
    { echo "QEMU ${emulator:-missing}, older than $QEMU_MIN"; false; }; }
check "QEMU $QEMU_MIN+" "$qemu_fix (from bookworm-backports)" qemu_recent
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
uffd() { [ -c /dev/userfaultfd ] && [ "$(stat -c %G:%a /dev/userfaultfd)" = nullspace-uffd:660 ] &&
    echo "/dev/userfaultfd for incoming live migrations (post-copy)" ||
    { echo "/dev/userfaultfd missing or not nullspace-uffd:660"; false; }; }
# Without it live migrations into this host stay pre-copy: reported, not fatal.
SOFT=1 check "post-copy" "a kernel of 6.1 or later has /dev/userfaultfd; run deploy/install-deps.sh again" uffd
[ "$failed" = 0 ] || die "install-deps: the tools marked ✗ above are missing or broken; apply the fixes and run it again"
