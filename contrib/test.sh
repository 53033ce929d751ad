#!/usr/bin/env bash
# Runs nspawn-runner's tests (unit tests and the integration tests, which boot real
# systemd-nspawn machines on a loop-mounted btrfs store and on a plain store).
# As root on Debian; installs the packages the tests need first. Extra arguments go to
# `cargo test` (e.g. `contrib/test.sh --test stages`).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(systemd-container btrfs-progs mmdebstrap debootstrap util-linux tar procps)
command -v cargo >/dev/null || packages+=(cargo)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# The integration tests need the loop driver and btrfs (both modules on stock kernels).
modprobe loop 2>/dev/null || true
modprobe btrfs 2>/dev/null || true

exec cargo test "$@"
