#!/usr/bin/env bash
# Installs (as root, with apt) what nspawn-runner needs to build, run and be tested on Debian:
# systemd-nspawn, btrfs tools, mmdebstrap/debootstrap, a C compiler for the tests' attack
# program, and cargo (with rustfmt and clippy, which CI runs) when there is none yet.
set -euo pipefail
packages=(systemd-container btrfs-progs mmdebstrap debootstrap ca-certificates util-linux tar procps gcc libc6-dev)
command -v cargo >/dev/null || packages+=(cargo)
cargo fmt --version >/dev/null 2>&1 || packages+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || packages+=(rust-clippy)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# Cargo.toml's rust-version: Debian 13 ships it, Debian 12's cargo is too old to build us.
need=1.85
have=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    echo "install-deps: cargo $have is older than $need (Debian 12 ships 1.63): install a newer Rust with rustup, or build on Debian 13" >&2
    exit 1
fi
# Loop devices and btrfs are modules on stock kernels.
modprobe loop 2>/dev/null || true
modprobe btrfs 2>/dev/null || true
