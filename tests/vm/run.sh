#!/bin/bash
# tests/vm/run.sh - the systemd-host suite: runs tests/vm/guest-suite.sh inside the test-bed VM
# (systemd PID 1, machined, btrfs store) against this checkout's release binary, once per Debian
# release in VM_SUITES, then cuts the VM's power during maintenance and gc (guest-powercut.sh).
#
#   1. builds target/release/nspawn-runner (cargo build --release), unless NSPAWN_RUNNER_BIN is set
#   2. makes sure qemu, gcc and static glibc are installed (host-deps.sh) and builds the security
#      scenario's attack program (tests/attack/attack.c, static: any image runs it)
#   then for each release:
#   3. builds/reuses its VM images (build-vm.sh) and boots a fresh VM on persistent overlays
#      (TESTBED_PERSIST=1, so that its disks outlive a power cut), sharing only a staging dir
#   4. runs the guest suite
#   5. power cuts: POWERCUT_ROUNDS times, starts maintenance and gc on a btrfs and a plain store,
#      SIGKILLs QEMU after a random delay, boots the same disks again and verifies the stores
#   6. stops the VM (always) and deletes its overlays
#
# Needs root (qemu, the test bed's image caches). Nothing on the host's /var/lib/nspawn-runner is
# touched: everything happens inside the VM.
#
# Settings (environment):
#   VM_SUITES               Debian releases to run on, in order (default: $TESTBED_SUITE or bookworm;
#                           CI: "bookworm trixie"). Each uses the image cache /var/cache/nspawn-testbed
#                           (bookworm) or /var/cache/nspawn-testbed-RELEASE; TESTBED_CACHE overrides it
#                           when VM_SUITES names one release.
#   POWERCUT_ROUNDS         power cuts per release (default 2; 0 skips them; e.g. 40 for a soak)
#   POWERCUT_MIN_DELAY, POWERCUT_MAX_DELAY  seconds between the start of the load and the cut
#                           (uniformly random, 0.1 s steps; default 2 and 45)
#   NSPAWN_RUNNER_TESTBED   the test bed dir (default: ../shared/testbed beside the checkout)
#   NSPAWN_RUNNER_BIN       use this binary instead of building one
#   VM_SUITE_TIMEOUT        seconds for the guest suite (default 1800)
#   SUITE_*                 every one is passed to guest-suite.sh (SUITE_PATHS, SUITE_MAINT, SUITE_SECURITY...)
#   TESTBED_*               passed to the test bed (TESTBED_MEM, TESTBED_CPUS...)
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

VM_SUITES="${VM_SUITES:-${TESTBED_SUITE:-bookworm}}"
: "${POWERCUT_ROUNDS:=2}" "${POWERCUT_MIN_DELAY:=2}" "${POWERCUT_MAX_DELAY:=45}"
read -r -a suites <<< "$VM_SUITES"
[ ${#suites[@]} -gt 0 ] || die "VM_SUITES is empty"

# 1. the binary
if [ -n "${NSPAWN_RUNNER_BIN:-}" ]; then
    BIN="$NSPAWN_RUNNER_BIN"
else
    say "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release"
    BIN="$REPO/target/release/nspawn-runner"
fi
[ -x "$BIN" ] || die "no binary at $BIN"

# 2. qemu, gcc
"$HERE/host-deps.sh" > /tmp/nspawn-runner-vm-deps.log 2>&1 \
    || { tail -n 20 /tmp/nspawn-runner-vm-deps.log; die "installing qemu and gcc (host-deps.sh)"; }

# a staging dir as the share: the VM sees only the binary, the attack program, the guest scripts
# and the power-cut logs
STAGE="$(mktemp -d /var/tmp/nspawn-runner-vm.XXXXXX)"
gcc -O2 -static -o "$STAGE/attack" "$REPO/tests/attack/attack.c" \
    || { rm -rf "$STAGE"; die "gcc -static tests/attack/attack.c"; }
install -m 755 "$BIN" "$STAGE/nspawn-runner"
install -m 755 "$HERE/guest-suite.sh" "$HERE/guest-powercut.sh" "$STAGE/"
install -m 644 "$REPO/contrib/gitlab-script.sh" "$STAGE/gitlab-script.sh"
mkdir -p "$STAGE/scenarios"
for f in "$HERE"/scenarios/*.sh; do [ -e "$f" ] && install -m 644 "$f" "$STAGE/scenarios/"; done
export TESTBED_SHARE="$STAGE" TESTBED_KEEP=1 TESTBED_PERSIST=1
ONE_CACHE="${TESTBED_CACHE:-}"
ST=""
stop_vm() {
    [ -n "$ST" ] || return 0
    "$TESTBED/run-in-vm.sh" --kill >/dev/null 2>&1
    rm -rf "$ST"; ST=""
}
trap 'stop_vm; rm -rf "$STAGE"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# every SUITE_* of ours goes to the guest suite
suite_env=()
while read -r v; do suite_env+=("$v=${!v}"); done < <(compgen -e | grep '^SUITE_')

boot() {  # boot WHAT: (re)boot the instance on its overlays
    "$TESTBED/run-in-vm.sh" --start >/dev/null 2>"$STAGE/boot.log" \
        || { tail -n 20 "$STAGE/boot.log"; echo "FAIL: VM boot ($1)"; return 1; }
    say "VM up ($1): $(cat "$ST/boot-times" 2>/dev/null)"
}
guest() { "$TESTBED/run-in-vm.sh" "$@"; }

# power cut round R: load on both stores, SIGKILL QEMU at a random moment, boot, verify
powercut_round() {
    local r="$1" log="$STAGE/pc-load-$1.log" lp pid span delay i
    span=$(( (POWERCUT_MAX_DELAY - POWERCUT_MIN_DELAY) * 10 ))
    delay=$(( POWERCUT_MIN_DELAY * 10 + ( span > 0 ? (RANDOM * 32768 + RANDOM) % (span + 1) : 0 ) ))
    guest ./guest-powercut.sh load "$r" > "$log" 2>&1 &
    lp=$!
    for i in $(seq 600); do grep -q '^PC load-started' "$log" 2>/dev/null && break; sleep 0.1; done
    sleep "$((delay / 10)).$((delay % 10))"
    pid="$(cat "$ST/qemu.pid" 2>/dev/null)"
    if [ -z "$pid" ] || ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q qemu-system; then
        echo "FAIL: power cut round $r: no QEMU process to kill"; kill "$lp" 2>/dev/null; wait "$lp"; return 1
    fi
    kill -KILL "$pid"
    wait "$lp"
    local where=""
    for s in btrfs plain; do
        where+="$s: $(grep "^PC phase $s " "$log" | tail -n1 | cut -d' ' -f4-) ($(grep -c "^PC phase $s maintain" "$log") maintains); "
    done
    say "power cut $r after $((delay / 10)).$((delay % 10)) s of load: $where"
    CUTS+=("$suite round $r at $((delay / 10)).$((delay % 10)) s: $where")
    boot "after power cut $r" || return 1
    guest ./guest-powercut.sh verify "$r"
}

# 3.-6. each release
declare -A TIMES=() RESULT=()
CUTS=()
overall=0
for suite in "${suites[@]}"; do
    t_rel=$(date +%s)
    export TESTBED_SUITE="$suite" TESTBED_INSTANCE="nspawn-runner-suite-$$-$suite"
    if [ ${#suites[@]} = 1 ] && [ -n "$ONE_CACHE" ]; then TESTBED_CACHE="$ONE_CACHE"
    elif [ "$suite" = bookworm ]; then TESTBED_CACHE=/var/cache/nspawn-testbed
    else TESTBED_CACHE="/var/cache/nspawn-testbed-$suite"; fi
    export TESTBED_CACHE
    ST="$TESTBED_CACHE/run/$TESTBED_INSTANCE"
    say "== $suite (images in $TESTBED_CACHE)"
    rc=0
    "$TESTBED/build-vm.sh" > "$STAGE/build-$suite.log" 2>&1 \
        || { tail -n 30 "$STAGE/build-$suite.log"; echo "FAIL: test bed build-vm.sh ($suite)"; rc=1; }
    [ $rc = 0 ] && { boot "$suite, fresh" || rc=1; }
    t_boot=$(( $(date +%s) - t_rel ))
    t_suite0=$(date +%s)
    if [ $rc = 0 ]; then
        say "guest suite ($suite)"
        src=0
        timeout --kill-after=10 "${VM_SUITE_TIMEOUT:-1800}" "$TESTBED/run-in-vm.sh" env "${suite_env[@]}" \
            ./guest-suite.sh ./nspawn-runner || src=$?
        case $src in
            0) say "guest suite passed ($suite)" ;;
            124|137|143) echo "FAIL: the guest suite timed out after ${VM_SUITE_TIMEOUT:-1800} s ($suite)" ;;
            125) echo "FAIL: the test bed failed (exit 125, $suite)" ;;
            255) echo "FAIL: ssh to the VM failed (exit 255, $suite)" ;;
            *) say "guest suite failed (exit $src, $suite)" ;;
        esac
        [ $src = 0 ] || rc=1
    fi
    t_suite=$(( $(date +%s) - t_suite0 ))
    t_pc0=$(date +%s)
    if [ "$POWERCUT_ROUNDS" -gt 0 ] && [ -n "$ST" ] && [ -e "$ST/ready" ]; then
        say "power cuts ($suite): setup, then $POWERCUT_ROUNDS rounds"
        if guest ./guest-powercut.sh setup; then
            for r in $(seq "$POWERCUT_ROUNDS"); do
                powercut_round "$r" || { rc=1; say "power cut round $r failed ($suite)"; }
                [ -e "$ST/ready" ] || break
            done
        else
            rc=1; echo "FAIL: power-cut setup ($suite)"
        fi
    fi
    t_pc=$(( $(date +%s) - t_pc0 ))
    stop_vm
    TIMES[$suite]="total $(( $(date +%s) - t_rel )) s (build+boot $t_boot s, guest suite $t_suite s, power cuts $t_pc s)"
    RESULT[$suite]=$([ $rc = 0 ] && echo passed || echo FAILED)
    [ $rc = 0 ] || overall=1
done

echo
say "summary"
for suite in "${suites[@]}"; do echo "  $suite: ${RESULT[$suite]}, ${TIMES[$suite]}"; done
for c in "${CUTS[@]}"; do echo "  cut: $c"; done
say "total $(( $(date +%s) - T0 )) s"
exit $overall
