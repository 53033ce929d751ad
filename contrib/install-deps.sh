#!/usr/bin/env bash
# Installs (as root, with apt) what nspawn-runner needs to build, run and be tested on Debian:
# systemd-nspawn, btrfs tools, mmdebstrap/debootstrap, and cargo when there is none yet.
set -euo pipefail
packages=(systemd-container btrfs-progs mmdebstrap debootstrap ca-certificates util-linux tar procps)
command -v cargo >/dev/null || packages+=(cargo)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# Loop devices and btrfs are modules on stock kernels.
modprobe loop 2>/dev/null || true
modprobe btrfs 2>/dev/null || true
