#!/bin/bash
# host-deps.sh - make sure the host has gcc with static glibc (run.sh builds the attack program of
# the security scenario) and qemu-system-x86_64 before the test bed's build-vm.sh runs.  The test
# bed installs "qemu-system-x86=<qemu-utils version>" from a temporary bookworm-backports source,
# but without "-t bookworm-backports" apt resolves its dependencies (qemu-system-common/-data,
# seabios) from bookworm and gives up.  This does the same with the target release set.  No
# permanent change to /etc/apt.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
inst() { apt-get install -y -q --no-install-recommends --no-remove "$@"; }
if ! command -v gcc >/dev/null || ! dpkg -s libc6-dev >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "host-deps.sh: need root to install gcc and libc6-dev" >&2; exit 1; }
    apt-get update -q
    inst gcc libc6-dev
fi
command -v qemu-system-x86_64 >/dev/null && exit 0
[ "$(id -u)" = 0 ] || { echo "host-deps.sh: need root to install qemu-system-x86" >&2; exit 1; }
qv="$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)"
if [[ "$qv" == *bpo12* ]]; then
    bpo="$(mktemp -d)"; trap 'rm -rf "$bpo"' EXIT
    mkdir -p "$bpo/lists/partial" "$bpo/archives/partial"
    # main + backports in one private list set, so apt can mix them
    {
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
    } > "$bpo/sources.list"
    o=(-o "Dir::Etc::sourcelist=$bpo/sources.list" -o "Dir::Etc::sourceparts=-"
       -o "Dir::State::lists=$bpo/lists" -o "Dir::Cache::archives=$bpo/archives"
       -o APT::Sandbox::User=root)
    apt-get "${o[@]}" update -q
    inst "${o[@]}" -t bookworm-backports "qemu-system-x86=$qv"
else
    apt-get update -q
    inst qemu-system-x86 qemu-utils
fi
command -v qemu-system-x86_64 >/dev/null
