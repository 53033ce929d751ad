#!/bin/bash
# tests/vm/run.sh - the systemd-host suite: runs tests/vm/guest-suite.sh inside the test-bed
# VM (Debian 12, systemd PID 1, machined, btrfs store) against this checkout's release binary.
#
#   1. builds target/release/nspawn-runner (cargo build --release), unless NSPAWN_RUNNER_BIN is set
#   2. makes sure qemu is installed (host-deps.sh), then builds/reuses the VM images (build-vm.sh)
#   3. boots a fresh VM sharing only a staging dir (the binary + guest-suite.sh)
#   4. runs the guest suite, stops the VM (always), exits with the suite's status
#
# Needs root (qemu, the test bed's image cache in /var/cache/nspawn-testbed). Nothing on the
# host's /var/lib/nspawn-runner is touched: everything happens inside the VM.
#
# Settings (environment):
#   NSPAWN_RUNNER_TESTBED   the test bed dir (default: ../shared/testbed beside the checkout)
#   NSPAWN_RUNNER_BIN       use this binary instead of building one
#   VM_SUITE_TIMEOUT        seconds for the guest suite (default 900)
#   SUITE_PATHS, SUITE_MAINT, SUITE_VERBOSE   passed to guest-suite.sh
#   TESTBED_*               passed to the test bed (TESTBED_MEM, TESTBED_CPUS, TESTBED_CACHE...)
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
T0=$(date +%s)
say() { printf '[vm %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "FAIL: $*"; echo "0 passed, 1 failed"; exit 1; }

[ "$(id -u)" = 0 ] || die "tests/vm/run.sh needs root (qemu, /var/cache/nspawn-testbed)"

TESTBED="${NSPAWN_RUNNER_TESTBED:-}"
if [ -z "$TESTBED" ]; then
    for d in "$REPO/../shared/testbed" /work/shared/testbed; do
        [ -x "$d/run-in-vm.sh" ] && { TESTBED="$(cd "$d" && pwd)"; break; }
    done
fi
[ -n "$TESTBED" ] && [ -x "$TESTBED/run-in-vm.sh" ] || die "no test bed found (set NSPAWN_RUNNER_TESTBED)"

# 1. the binary
if [ -n "${NSPAWN_RUNNER_BIN:-}" ]; then
    BIN="$NSPAWN_RUNNER_BIN"
else
    say "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release"
    BIN="$REPO/target/release/nspawn-runner"
fi
[ -x "$BIN" ] || die "no binary at $BIN"

# 2. qemu + images
"$HERE/host-deps.sh" > /tmp/nspawn-runner-vm-deps.log 2>&1 \
    || { tail -n 20 /tmp/nspawn-runner-vm-deps.log; die "installing qemu (host-deps.sh)"; }
say "build-vm.sh (about 2-3 min the first time, instant when cached)"
"$TESTBED/build-vm.sh" > /tmp/nspawn-runner-vm-build.log 2>&1 \
    || { tail -n 30 /tmp/nspawn-runner-vm-build.log; die "test bed build-vm.sh"; }

# 3. a staging dir as the share: the VM sees only the binary and the guest suite
STAGE="$(mktemp -d /var/tmp/nspawn-runner-vm.XXXXXX)"
install -m 755 "$BIN" "$STAGE/nspawn-runner"
install -m 755 "$HERE/guest-suite.sh" "$STAGE/guest-suite.sh"
install -m 644 "$HERE/../../contrib/gitlab-script.sh" "$STAGE/gitlab-script.sh"
export TESTBED_SHARE="$STAGE" TESTBED_INSTANCE="nspawn-runner-suite-$$" TESTBED_KEEP=1 TESTBED_PERSIST=0
: "${TESTBED_CACHE:=/var/cache/nspawn-testbed}"; export TESTBED_CACHE
cleanup() {
    "$TESTBED/run-in-vm.sh" --stop >/dev/null 2>&1
    rm -rf "$STAGE" "$TESTBED_CACHE/run/$TESTBED_INSTANCE"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

say "booting the VM (instance $TESTBED_INSTANCE)"
"$TESTBED/run-in-vm.sh" --start >/dev/null 2>/tmp/nspawn-runner-vm-boot.log \
    || { tail -n 20 /tmp/nspawn-runner-vm-boot.log; die "VM boot"; }
say "VM up: $(cat "$TESTBED_CACHE/run/$TESTBED_INSTANCE/boot-times" 2>/dev/null)"

# 4. the suite
say "guest suite"
rc=0
timeout --kill-after=10 "${VM_SUITE_TIMEOUT:-900}" "$TESTBED/run-in-vm.sh" env \
    SUITE_PATHS="${SUITE_PATHS:-systemd plain}" SUITE_MAINT="${SUITE_MAINT:-1}" SUITE_VERBOSE="${SUITE_VERBOSE:-}" \
    ./guest-suite.sh ./nspawn-runner || rc=$?
case $rc in
    0) say "VM suite passed" ;;
    124|137|143) echo "FAIL: the guest suite timed out after ${VM_SUITE_TIMEOUT:-900} s" ;;
    125) echo "FAIL: the test bed failed (exit 125)" ;;
    255) echo "FAIL: ssh to the VM failed (exit 255)" ;;
    *) say "VM suite failed (exit $rc)" ;;
esac
say "total $(( $(date +%s) - T0 )) s"
exit $(( rc != 0 ))
