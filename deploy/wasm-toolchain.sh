#!/usr/bin/env bash
# Installs, once and cached, the toolchain that builds the API component for
# wasm32-wasip1 on this machine kind (rustup here cannot fetch a wasm target):
# Debian's rustc-web with its matching std sources and wasi-libc, unpacked into the cache
# (nothing changes in /usr; rustup stays the default). Prints the environment a cargo
# build needs, for `eval "$(deploy/wasm-toolchain.sh)"`, then:
#
#   cargo build -Zbuild-std=std,panic_abort --target wasm32-wasip1 --release
#
# Groundwork for the public-API issue; measured here: a spin-sdk 5.2 component's core
# module builds in ~70 s clean (std included), and `api-component/componentize` turns it
# into a component with the preview1 *proxy* adapter.
set -euo pipefail

cache=${NULLSPACE_CACHE:-/var/cache/nullspace}/wasm
mkdir -p "$cache"
step="resolve packages"
on_error() { echo "wasm toolchain FAILED at step: $step" >&2; [ -n "${tmp:-}" ] && rm -rf "$tmp"; }
trap on_error ERR

depends() { apt-cache depends "$1" | awk -v p="$2" '$1 == "Depends:" && $2 ~ p {print $2; exit}'; }
libstd=$(depends libstd-rust-web-dev '^libstd-rust-web-[0-9]')
libllvm=$(depends "$libstd" '^libllvm[0-9]')
pkgs="rustc-web rust-web-src libstd-rust-web-dev $libstd $libllvm wasi-libc"
# rustc-web and rust-web-src move together in security updates: key on all versions.
key=$(for p in $pkgs; do echo "$p $(apt-cache policy "$p" | awk '/Candidate:/{print $2}')"; done | sha256sum | cut -c1-16)
root="$cache/root-$key"

if [ ! -x "$root/usr/bin/rustc" ]; then
    echo "[wasm-toolchain] unpacking $pkgs" >&2
    tmp=$(mktemp -d "$cache/.tmp-XXXXXX")
    step="download $pkgs"
    (cd "$tmp" && apt-get download $pkgs >/dev/null 2>&1)
    step="unpack"
    mkdir -p "$tmp/root"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
    step="check rustc"
    LD_LIBRARY_PATH="$tmp/root/usr/lib/x86_64-linux-gnu" "$tmp/root/usr/bin/rustc" --version >&2
    step="commit"
    mv -T "$tmp/root" "$root"
    rm -rf "$tmp"
    tmp=""
fi

sysroot=$(rustc --print sysroot)
lld="$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"
[ -x "$lld" ] || { step="find rust-lld"; echo "no rust-lld at $lld" >&2; false; }
cat <<ENV
export RUSTC="$root/usr/bin/rustc"
export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_WASM32_WASIP1_LINKER="$lld"
export RUSTFLAGS="-L native=$root/usr/lib/wasm32-wasi"
ENV
