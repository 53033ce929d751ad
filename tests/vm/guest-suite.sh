#!/bin/bash
# guest-suite.sh [BINARY] - runs INSIDE the test-bed VM (systemd as PID 1, machined,
# btrfs at /var/lib/nspawn-runner) against a host-built nspawn-runner binary, the way
# gitlab-runner drives a custom executor: stage symlinks from `install-links`, the
# CUSTOM_ENV_*/BUILD_FAILURE_EXIT_CODE/SYSTEM_FAILURE_EXIT_CODE/TMPDIR environment,
# script files written like gitlab-runner's bash wrapper, SIGTERM to the stage's
# process group on cancel.
#
# BINARY defaults to $NSPAWN_RUNNER_BIN or ./nspawn-runner (next to this script).
# Knobs: SUITE_PATHS="systemd plain" (which host paths to run the job scenarios on),
#        SUITE_MAINT=1 (transactional maintenance + gc checks), SUITE_CRASH=1 (machine
#        killed under a job), SUITE_JOB=1 (the full jobs), SUITE_PARALLEL=1 (two jobs at once),
#        SUITE_PCANCEL=1 (SIGTERM during prepare), SUITE_VERBOSE=1, and SUITE_<NAME> of each
#        scenarios/NAME.sh (e.g. SUITE_SECURITY).
# Prints PASS:/FAIL: lines and "N passed, N failed"; exit status 0 only if all passed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC_BIN="${1:-${NSPAWN_RUNNER_BIN:-$HERE/nspawn-runner}}"
: "${SUITE_PATHS:=systemd plain}"
: "${SUITE_MAINT:=1}"
: "${SUITE_VERBOSE:=}"

BASE_IMAGE=/var/lib/nspawn-runner/images/bookworm   # test bed's btrfs subvolume
STORE=/var/lib/nspawn-runner/store                  # NSPAWN_RUNNER_ROOT for the suite
STATE_DIR=/run/nspawn-runner
IMG=deb
WORK=/var/tmp/nspawn-runner-suite
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

passed=0; failed=0
T_START=$(date +%s.%N)
ts() { date +%s.%N; }
dt() { awk "BEGIN{printf \"%.1f\", $(ts) - $1}"; }
log() { printf '[%6.1fs] %s\n' "$(awk "BEGIN{print $(ts) - $T_START}")" "$*"; }
el() { awk "BEGIN{printf \"%.0f\", $(ts) - $T_START}"; }
pass() { echo "PASS: $*  [$(el) s]"; passed=$((passed+1)); }
fail() { echo "FAIL: $*  [$(el) s]"; failed=$((failed+1)); }
check() {  # check DESCRIPTION COMMAND... : PASS if COMMAND succeeds
    local d="$1"; shift
    if "$@"; then pass "$d"; else fail "$d"; fi
}
section() { printf "\n=== %s  [%.0f s]\n" "$*" "$(awk "BEGIN{print $(ts) - $T_START}")"; }
show() {  # show FILE LABEL: print a stage's output (indented), always on failure paths
    [ -s "$1" ] && sed "s/^/    $2| /" "$1" | head -n 40
    return 0
}

# ---- setup -------------------------------------------------------------------------
section "setup"
[ "$(cat /proc/1/comm)" = systemd ] || { echo "FAIL: PID 1 is not systemd"; exit 1; }
[ -x "$SRC_BIN" ] || { echo "FAIL: no binary at $SRC_BIN"; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK/links" "$WORK/tmp"
# a local copy: executing from the 9p share works, but a local file is what a package installs
install -m 755 "$SRC_BIN" "$WORK/nspawn-runner"
BIN="$WORK/nspawn-runner"
"$BIN" install-links "$WORK/links" >"$WORK/links.out" 2>&1
check "install-links makes config/prepare/run/cleanup" \
    sh -c "for s in config prepare run cleanup; do [ -L '$WORK/links/'\$s ] && [ \"\$(readlink -f '$WORK/links/'\$s)\" = '$BIN' ] || exit 1; done"
show "$WORK/links.out" install-links

# settings shared by every call (gitlab-runner's own environment is passed through to the stages)
SETTINGS=(
    NSPAWN_RUNNER_ROOT="$STORE"
    NSPAWN_RUNNER_STATE_DIR="$STATE_DIR"
    NSPAWN_RUNNER_CONFIG_DIR="$WORK/etc"
    NSPAWN_RUNNER_CACHE_DIR="$WORK/cache"
    NSPAWN_RUNNER_DEFAULT_IMAGE="$IMG"
    NSPAWN_RUNNER_PREPARE_TIMEOUT=180
    NSPAWN_RUNNER_STOP_TIMEOUT=10
    NSPAWN_RUNNER_MEMORY_MAX=256M
    NSPAWN_RUNNER_CPU_WEIGHT=50
    NSPAWN_RUNNER_TASKS_MAX=200
    NSPAWN_RUNNER_GITLAB_RUNNER=
    # The test bed's base tree (mk-container-image: minbase, systemd, dbus) has no git, which
    # the health check before a commit requires: the maintenance here tests the transaction.
    NSPAWN_RUNNER_CHECK=false
)
mkdir -p "$WORK/etc" "$WORK/cache"
admin() { env -i PATH="$PATH" HOME=/root "${SETTINGS[@]}" "$@" "$BIN" "${ADMIN_ARGS[@]}"; }
nr() { ADMIN_ARGS=("$@"); admin; }

# a VM that ran the suite before: start from an empty store
if [ -e "$STORE" ]; then
    btrfs subvolume list -o /var/lib/nspawn-runner 2>/dev/null | awk '{print $NF}' | grep '^store/' \
        | sort -r | while read -r sv; do btrfs -q subvolume delete "/var/lib/nspawn-runner/$sv"; done
    btrfs subvolume list /var/lib/nspawn-runner 2>/dev/null | awk '{print $NF}' | grep '^store/' \
        | sort -r | while read -r sv; do btrfs -q subvolume delete "/var/lib/nspawn-runner/$sv"; done
    rm -rf "$STORE"
fi
mkdir -p "$STORE"
t=$(ts)
nr image import "$IMG" "$BASE_IMAGE" >"$WORK/import.out" 2>&1; rc=$?
check "image import $IMG $BASE_IMAGE (exit $rc, $(dt "$t") s)" [ $rc = 0 ]
show "$WORK/import.out" import
cur="$(readlink "$STORE/$IMG/current" 2>/dev/null)"
check "store layout: $IMG/current -> '$cur' is <time>_<pid> and a btrfs subvolume" \
    sh -c "echo '$cur' | grep -Eq '^[0-9]+_[0-9]+\$' && btrfs subvolume show '$STORE/$IMG/$cur' >/dev/null 2>&1"
if [ -z "$cur" ] || [ ! -d "$STORE/$IMG/$cur" ]; then
    # fall back to the layout made by hand so that the job scenarios still run
    echo "    (import failed: making the store layout by hand)"
    mkdir -p "$STORE/$IMG"
    btrfs -q subvolume snapshot "$BASE_IMAGE" "$STORE/$IMG/1700000000_1"
    ln -sfn 1700000000_1 "$STORE/$IMG/current"
fi
nr image list >"$WORK/list.out" 2>&1
check "image list shows $IMG" grep -q "$IMG" "$WORK/list.out"

# ---- gitlab-runner emulation ---------------------------------------------------------
# gitlab-runner's bash wrapper (shells/bash.go, v19.1+): staged beside this script by run.sh
# shellcheck source=/dev/null
. "$HERE/gitlab-script.sh"
SCRIPT_N=0
mkscript() {  # mkscript JOBTMP BODY -> prints the script path
    local dir="$1/script$((SCRIPT_N+=1))"
    mkdir -p "$dir"
    gitlab_script "$dir/script" "$2"
    echo "$dir/script"
}

# job_env JOBID: the environment gitlab-runner gives its executables
JOB_MODE=auto
job_env() {
    local id="$1"
    JOBTMP="$WORK/tmp/custom-executor-$id"; mkdir -p "$JOBTMP"
    ENVV=(PATH="$PATH" "${SETTINGS[@]}" NSPAWN_RUNNER_SYSTEMD="$JOB_MODE"
          TMPDIR="$JOBTMP" BUILD_FAILURE_EXIT_CODE=1 SYSTEM_FAILURE_EXIT_CODE=2
          BUILD_EXIT_CODE_FILE="$JOBTMP/build_exit_code" JOB_RESPONSE_FILE="$JOBTMP/response.json"
          CUSTOM_ENV_CI_JOB_ID="$id" CUSTOM_ENV_CI_JOB_IMAGE="$IMG"
          CUSTOM_ENV_CI_BUILDS_DIR=/builds CUSTOM_ENV_CI_PROJECT_DIR=/builds/group/project
          CUSTOM_ENV_CI_JOB_TOKEN=secret-token-must-not-leak CUSTOM_ENV_CI_SERVER=yes)
    # Without systemd-run the machine's cgroup would go below this shell's own (ssh.service here),
    # which has processes and so cannot delegate controllers: a limit there fails prepare by
    # design. The plain path's limits are tested on hosts without systemd (tests/confinement.rs).
    if [ "$JOB_MODE" = no ]; then ENVV+=(NSPAWN_RUNNER_MEMORY_MAX= NSPAWN_RUNNER_CPU_WEIGHT= NSPAWN_RUNNER_TASKS_MAX=); fi
    echo '{"id": 1, "job_info": {"name": "vm", "project_id": 7}}' > "$JOBTMP/response.json"
}
# stage NAME [ARGS...]: runs a stage executable like gitlab-runner (own process group,
# cwd = the job's tmp dir, stdin /dev/null); output in $OUT/$ERR, exit code in $RC
stage() {
    local name="$1"; shift
    OUT="$JOBTMP/$name.out"; ERR="$JOBTMP/$name.err"
    (cd "$JOBTMP" && exec env -i "${ENVV[@]}" setsid "$WORK/links/$name" "$@" </dev/null >"$OUT" 2>"$ERR")
    RC=$?
    if [ -n "$SUITE_VERBOSE" ]; then show "$OUT" "$name out"; show "$ERR" "$name err"; fi
}
# run_body STAGE BODY: one run_exec call with a wrapper script around BODY
run_body() { local s; s="$(mkscript "$JOBTMP" "$2")"; stage run "$s" "$1"; }
# start a run stage in the background, in its own process group (pgid = $BG)
run_body_bg() {
    local s; s="$(mkscript "$JOBTMP" "$2")"
    OUT="$JOBTMP/bg.out"; ERR="$JOBTMP/bg.err"
    (cd "$JOBTMP" && exec env -i "${ENVV[@]}" setsid "$WORK/links/run" "$s" "$1" </dev/null >"$OUT" 2>"$ERR") &
    BG=$!
}
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@"; do [ "$(date +%s)" -ge "$deadline" ] && return 1; sleep 0.2; done
}
machine_listed() { machinectl list --no-legend 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }
unit_loaded() { [ "$(systemctl show "$1" -p LoadState --value 2>/dev/null)" = loaded ]; }
ephemeral_copies() { find "$STORE/$IMG" -maxdepth 1 -name '.#machine.*' 2>/dev/null; }
procs_with() { pgrep -f "$1" >/dev/null; }

# ---- a full job --------------------------------------------------------------------------
job_scenario() {  # job_scenario MODE(systemd|plain)
    local mode="$1" id="vm-$1-$RANDOM" t rc
    local machine="run-$id" unit="nspawn-runner-run-$id.service"
    JOB_MODE=$([ "$mode" = systemd ] && echo yes || echo no)
    section "full job on the $mode path (NSPAWN_RUNNER_SYSTEMD=$JOB_MODE, job $id)"
    job_env "$id"
    local P="[$mode]"

    stage config
    check "$P config exits 0 and prints JSON with builds_dir" sh -c "[ $RC = 0 ] && jq -e '.builds_dir|strings' '$OUT' >/dev/null"
    [ $RC = 0 ] || show "$ERR" config

    t=$(ts); stage prepare; rc=$RC
    check "$P prepare exits 0 ($(dt "$t") s)" [ $rc = 0 ]
    [ $rc = 0 ] || { show "$OUT" "prepare out"; show "$ERR" "prepare err"; }
    check "$P prepare keeps stdout/stderr of the machine out of the job log (no boot noise)" \
        sh -c "! grep -q 'Welcome to' '$OUT' '$ERR'"
    check "$P state file $STATE_DIR/$id.json exists" [ -s "$STATE_DIR/$id.json" ]
    if [ "$mode" = systemd ]; then
        check "$P machinectl list shows $machine" machine_listed "$machine"
        check "$P $unit is active" systemctl is-active -q "$unit"
        check "$P machined registered the unit itself (Unit=$unit)" \
            [ "$(machinectl show "$machine" -p Unit --value 2>/dev/null)" = "$unit" ]
        local props; props="$(systemctl show "$unit" -p MemoryMax -p CPUWeight -p TasksMax 2>/dev/null | sort | tr '\n' ' ')"
        check "$P limits reach the unit: $props" \
            [ "$props" = "CPUWeight=50 MemoryMax=268435456 TasksMax=200 " ]
        local leader; leader="$(machinectl show "$machine" -p Leader --value 2>/dev/null)"
        check "$P the machine's init (pid $leader) runs inside $unit's cgroup" \
            grep -q "/nspawn-runner-run-$id.service/" "/proc/${leader:-0}/cgroup"
    else
        check "$P machinectl does not list $machine (plain path: --register=no)" sh -c "! machinectl list --no-legend | grep -q '^$machine '"
        check "$P no unit $unit" sh -c "! systemctl is-active -q '$unit'"
        check "$P a systemd-nspawn process runs for $machine" procs_with "[s]ystemd-nspawn.*--machine=$machine"
    fi

    nr status >"$JOBTMP/status.out" 2>&1
    check "$P nspawn-runner status lists $machine" grep -q "$machine" "$JOBTMP/status.out"
    run_body prepare_script 'echo "Running on $(hostname)..."'
    check "$P run prepare_script exits 0 and runs in the machine (hostname $(tr -d '\n' < "$OUT"))" \
        sh -c "[ $RC = 0 ] && grep -qx 'Running on $machine...' '$OUT'"
    [ $RC = 0 ] || show "$ERR" "prepare_script err"

    run_body get_sources 'mkdir -p /builds/group/project && cd /builds/group/project && echo shared-data > file.txt && echo got sources'
    check "$P run get_sources writes a file" sh -c "[ $RC = 0 ] && grep -q 'got sources' '$OUT'"

    run_body build_script 'cd /builds/group/project
echo "file: $(cat file.txt)"
echo "to-stderr" >&2
echo "uid=$(id -u) home=${HOME:-unset} cwd=$(pwd)"
env | sort > /tmp/env.txt
echo "env-lines=$(wc -l < /tmp/env.txt)"
if grep -E "^(CUSTOM_ENV_|TMPDIR=|NSPAWN_RUNNER_|JOB_RESPONSE_FILE=|BUILD_FAILURE_EXIT_CODE=)" /tmp/env.txt; then echo LEAK; fi
echo build-done'
    check "$P run build_script exits 0" [ $RC = 0 ]
    check "$P a later stage sees the earlier stage's file" grep -qx 'file: shared-data' "$OUT"
    check "$P script runs as root" grep -q '^uid=0 ' "$OUT"
    check "$P clean environment: no CUSTOM_ENV_/TMPDIR/NSPAWN_RUNNER_/JOB_RESPONSE_FILE inside" sh -c "! grep -q LEAK '$OUT'"
    check "$P stderr stays separate from stdout" sh -c "grep -qx to-stderr '$ERR' && ! grep -q to-stderr '$OUT'"
    [ $RC = 0 ] || { show "$OUT" "build out"; show "$ERR" "build err"; }
    grep -E '^(uid|env-lines)=' "$OUT" | sed 's/^/    info| /'

    run_body build_script 'echo before; false; echo not-reached'
    check "$P a failing command -> exit 1 (BUILD_FAILURE_EXIT_CODE) (got $RC)" [ $RC = 1 ]
    check "$P  ... and the script stopped at the failure" sh -c "grep -qx before '$OUT' && ! grep -q not-reached '$OUT'"
    rm -f "$JOBTMP/build_exit_code"
    run_body build_script 'exit 42'
    check "$P exit 42 in the script -> exit 1 (got $RC)" [ $RC = 1 ]
    check "$P  ... and BUILD_EXIT_CODE_FILE says 42 ($(cat "$JOBTMP/build_exit_code" 2>/dev/null))" \
        sh -c "[ \"\$(head -n1 '$JOBTMP/build_exit_code' 2>/dev/null)\" = 42 ]"

    if [ "$mode" = systemd ]; then
        # TasksMax=200 must bind the job script: 250 more processes cannot all start
        # (dash, not bash: bash retries a failed fork for up to half a minute)
        run_body build_script 'if sh -c "i=0; while [ \$i -lt 250 ]; do sleep 61 & i=\$((i+1)); done" 2>/dev/null; then echo ALL-STARTED; else echo FORK-LIMITED; fi'
        pkill -f 'sleep 61' 2>/dev/null; sleep 0.5
        check "$P TasksMax binds the job script (250 processes: $(tr -d '\n' < "$OUT"))" grep -qx FORK-LIMITED "$OUT"
        # MemoryMax=256M must bind it too: dd with a 300 MB buffer is OOM-killed (a big shell
        # string would do, but reclaim thrashing makes that take minutes under emulation), which is the
        # script's failure (exit 1), not the machine's (2); the machine lives on
        local cg; cg="/sys/fs/cgroup$(systemctl show "$unit" -p ControlGroup --value)"
        local oom0; oom0="$(awk '$1=="oom_kill"{print $2}' "$cg/memory.events" 2>/dev/null)"
        run_body build_script 'dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null; echo dd-survived'
        local oom1; oom1="$(awk '$1=="oom_kill"{print $2}' "$cg/memory.events" 2>/dev/null)"
        check "$P MemoryMax binds the job script (oom_kill ${oom0:-?} -> ${oom1:-?}, run exit $RC)" \
            sh -c "[ $RC = 1 ] && [ '${oom1:-0}' -gt '${oom0:-0}' ]"
        run_body build_script 'echo still-up'
        check "$P the machine survives the OOM kill (exit $RC)" sh -c "[ $RC = 0 ] && grep -qx still-up '$OUT'"
    fi

    # cancel: SIGTERM to the run stage's process group during a sleep
    run_body_bg build_script 'echo started; sleep 1001 & sleep 1002; echo not-reached'
    if wait_for 60 procs_with 'sleep 1002'; then
        local sp; sp="$(pgrep -f 'sleep 1002' | head -n1)"
        if [ "$mode" = systemd ]; then
            check "$P the job script runs inside $unit's cgroup ($(cut -d: -f3 /proc/$sp/cgroup 2>/dev/null))" \
                grep -q "/nspawn-runner-run-$id.service/" "/proc/$sp/cgroup"
        fi
        t=$(ts); kill -TERM -- "-$BG"
        local waited=0
        while kill -0 "$BG" 2>/dev/null && [ $waited -lt 300 ]; do sleep 0.1; waited=$((waited+1)); done
        local el; el=$(dt "$t")
        if kill -0 "$BG" 2>/dev/null; then
            fail "$P run exits promptly after SIGTERM (still running after 30 s)"
            kill -KILL -- "-$BG" 2>/dev/null
        else
            pass "$P run exits promptly after SIGTERM ($el s)"
        fi
        wait "$BG"; rc=$?
        check "$P cancelled stage exits non-zero (got $rc)" [ $rc != 0 ]
        sleep 1
        check "$P the stage's processes (sleep 1001/1002) are gone" sh -c "! pgrep -f 'sleep 100[12]' >/dev/null"
        pkill -f 'sleep 100[12]' 2>/dev/null
    else
        fail "$P cancel: the sleep never started"; show "$OUT" "bg out"; show "$ERR" "bg err"
        kill -KILL -- "-$BG" 2>/dev/null; wait "$BG"
    fi
    run_body after_script 'echo "Running after script..."'
    check "$P the machine still works after a cancelled stage (after_script exit $RC)" sh -c "[ $RC = 0 ] && grep -q 'after script' '$OUT'"

    # force kill: SIGKILL to the run stage's process group (gitlab-runner's force_kill_timeout);
    # what the script started, even in a session of its own, ends with the stage (its guard),
    # while a daemon it started with the machine's systemd lives on until cleanup
    run_body_bg build_script 'systemd-run --quiet --unit=vm-job-daemon sleep 1005; setsid sleep 1003 >/dev/null 2>&1 & sleep 1004'
    if wait_for 60 procs_with 'sleep 1004'; then
        kill -KILL -- "-$BG"; wait "$BG"
        check "$P a SIGKILLed stage's processes (sleep 1003/1004) end with it" \
            wait_for 20 sh -c "! pgrep -f 'sleep 100[34]' >/dev/null"
        check "$P a daemon the job started with systemd-run lives on" procs_with 'sleep 1005'
    else
        fail "$P force kill: the sleep never started"; show "$OUT" "bg out"; show "$ERR" "bg err"
        kill -KILL -- "-$BG" 2>/dev/null; wait "$BG"
    fi
    pkill -f 'sleep 100[34]' 2>/dev/null

    # cleanup
    local eph; eph="$(ephemeral_copies)"
    local leader; leader="$(jq -r '.running.leader_pid // empty' "$STATE_DIR/$id.json" 2>/dev/null)"
    t=$(ts); stage cleanup; rc=$RC
    check "$P cleanup exits 0 ($(dt "$t") s)" [ $rc = 0 ]
    [ $rc = 0 ] || show "$ERR" "cleanup err"
    check "$P machinectl no longer lists $machine" sh -c "! machinectl list --no-legend | grep -q '^$machine '"
    check "$P no unit $unit left (LoadState=$(systemctl show "$unit" -p LoadState --value))" sh -c "! systemctl show '$unit' -p LoadState --value | grep -qx loaded"
    check "$P no systemd-nspawn process for $machine left" sh -c "! pgrep -f '[s]ystemd-nspawn.*--machine=$machine' >/dev/null"
    check "$P cleanup ended the job's daemon (sleep 1005)" sh -c "! pgrep -f 'sleep 100[5]' >/dev/null"
    check "$P the machine's init (pid ${leader:-?}) is gone" sh -c "[ -n '$leader' ] && { [ ! -e /proc/$leader ] || ! grep -q systemd /proc/$leader/comm 2>/dev/null; }"
    check "$P no ephemeral copy left (was: ${eph:-none})" sh -c "[ -z \"\$(find '$STORE/$IMG' -maxdepth 1 -name '.#machine.*')\" ]"
    check "$P no .jobs/$machine left" sh -c "[ ! -e '$STORE/.jobs/$machine' ]"
    check "$P no state file $STATE_DIR/$id.json left" sh -c "[ ! -e '$STATE_DIR/$id.json' ]"
    stage cleanup
    check "$P a second cleanup is fine (exit $RC)" [ $RC = 0 ]
    run_body build_script 'echo hi'
    check "$P run after cleanup -> system failure 2 (got $RC) with 'nspawn-runner:' on stderr" \
        sh -c "[ $RC = 2 ] && grep -q '^nspawn-runner: ' '$ERR'"
}

# ---- the machine dies under the job (nspawn SIGKILLed: it cannot remove its ephemeral copy) ----
crash_scenario() {  # crash_scenario MODE(systemd|plain)
    local mode="$1" id="vm-crash-$1-$RANDOM" t rc
    local machine="run-$id" unit="nspawn-runner-run-$id.service"
    JOB_MODE=$([ "$mode" = systemd ] && echo yes || echo no)
    section "machine killed under a job on the $mode path (job $id)"
    job_env "$id"
    local P="[$mode crash]"
    t=$(ts); stage prepare
    check "$P prepare exits 0 ($(dt "$t") s)" [ $RC = 0 ]
    [ $RC = 0 ] || show "$ERR" "prepare err"
    local leader; leader="$(jq -r '.running.leader_pid // empty' "$STATE_DIR/$id.json" 2>/dev/null)"
    # the machine is killed while a stage runs
    run_body_bg build_script 'echo started; sleep 1003'
    wait_for 60 procs_with 'sleep 1003'
    if [ "$mode" = systemd ]; then
        systemctl kill -s KILL "$unit"
    else
        pkill -KILL -f "[s]ystemd-nspawn.*--machine=$machine"
        # the orphaned init must die too for "the machine died during the stage"
        [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null
    fi
    wait_for 20 sh -c "! pgrep -f '[s]ystemd-nspawn.*--machine=$machine' >/dev/null"
    local waited=0
    while kill -0 "$BG" 2>/dev/null && [ $waited -lt 300 ]; do sleep 0.1; waited=$((waited+1)); done
    kill -KILL -- "-$BG" 2>/dev/null; wait "$BG"; rc=$?
    check "$P the stage running when the machine died -> system failure 2 (got $rc)" [ $rc = 2 ]
    show "$ERR" "bg err"
    pkill -f 'sleep 1003' 2>/dev/null
    check "$P the killed nspawn left its ephemeral copy behind ($(ephemeral_copies | wc -l) found)" [ -n "$(ephemeral_copies)" ]
    run_body build_script 'echo hi'
    if [ "$mode" = systemd ]; then
        # the whole unit was killed: the machine is gone
        check "$P run in a dead machine -> system failure 2 (got $RC) with 'nspawn-runner:' on stderr" \
            sh -c "[ $RC = 2 ] && grep -q '^nspawn-runner: ' '$ERR'"
    else
        # only nspawn was killed: the machine's init may live on as an orphan; either it
        # still runs the script or the stage is a system failure
        check "$P run after nspawn was killed -> 0 (init still alive) or 2 (got $RC)" sh -c "[ $RC = 0 ] || [ $RC = 2 ]"
    fi
    show "$ERR" "run err"
    t=$(ts); stage cleanup
    check "$P cleanup exits 0 ($(dt "$t") s)" [ $RC = 0 ]
    [ $RC = 0 ] || show "$ERR" "cleanup err"
    check "$P cleanup removed the leftover ephemeral copy" [ -z "$(ephemeral_copies)" ]
    check "$P the machine's init (pid ${leader:-?}) is gone" sh -c "[ -n '$leader' ] && { [ ! -e /proc/$leader ] || ! grep -q systemd /proc/$leader/comm 2>/dev/null; }"
    check "$P no nspawn lock files (.#.#machine.*.lck) of the removed copy left" sh -c "[ -z \"\$(find '$STORE/$IMG' -maxdepth 1 -name '.#.#machine.*')\" ]"
    check "$P nothing left: machine, unit, state file, container processes" sh -c "
        ! machinectl list --no-legend | grep -q '^$machine ' &&
        ! systemctl show '$unit' -p LoadState --value | grep -qx loaded &&
        [ ! -e '$STATE_DIR/$id.json' ] &&
        ! pgrep -f '[s]ystemd-nspawn.*--machine=$machine' >/dev/null"
    # leftover .lck files from nspawn are harmless but shown
    find "$STORE/$IMG" -maxdepth 1 -name '.#*' | sed 's/^/    left| /'
}

# ---- cancel during prepare: SIGTERM to prepare's process group while the machine boots ----------
prepare_cancel_scenario() {  # prepare_cancel_scenario MODE(systemd|plain)
    local mode="$1" id="vm-pcancel-$1-$RANDOM" t rc
    local machine="run-$id" unit="nspawn-runner-run-$id.service"
    JOB_MODE=$([ "$mode" = systemd ] && echo yes || echo no)
    section "SIGTERM during prepare on the $mode path (job $id)"
    job_env "$id"
    local P="[$mode prepare-cancel]"
    OUT="$JOBTMP/prepare.out"; ERR="$JOBTMP/prepare.err"
    (cd "$JOBTMP" && exec env -i "${ENVV[@]}" setsid "$WORK/links/prepare" </dev/null >"$OUT" 2>"$ERR") &
    local bg=$!
    # wait until nspawn runs (the machine is booting), then cancel
    wait_for 60 procs_with "[s]ystemd-nspawn.*--machine=$machine"
    sleep 1
    t=$(ts); kill -TERM -- "-$bg" 2>/dev/null
    local waited=0
    while kill -0 "$bg" 2>/dev/null && [ $waited -lt 900 ]; do sleep 0.1; waited=$((waited+1)); done
    if kill -0 "$bg" 2>/dev/null; then
        fail "$P prepare exits after SIGTERM (still running after 90 s)"; kill -KILL -- "-$bg" 2>/dev/null
    else
        pass "$P prepare exits after SIGTERM ($(dt "$t") s)"
    fi
    wait "$bg"; rc=$?
    check "$P cancelled prepare exits non-zero (got $rc)" [ $rc != 0 ]
    show "$ERR" "prepare err"
    t=$(ts); stage cleanup
    check "$P cleanup exits 0 ($(dt "$t") s)" [ $RC = 0 ]
    sleep 1
    check "$P nothing left: machine, unit, nspawn, ephemeral copy, state file" sh -c "
        ! machinectl list --no-legend | grep -q '^$machine ' &&
        ! systemctl show '$unit' -p LoadState --value | grep -qx loaded &&
        ! pgrep -f '[s]ystemd-nspawn.*--machine=$machine' >/dev/null &&
        [ -z \"\$(find '$STORE/$IMG' -maxdepth 1 -name '.#machine.*')\" ] &&
        [ ! -e '$STATE_DIR/$id.json' ]"
    machinectl list --no-legend | sed 's/^/    machines| /'
}

# ---- two jobs prepared and cleaned up at the same time ---------------------------------------
parallel_scenario() {  # parallel_scenario MODE(systemd|plain)
    local mode="$1" t i rc ok=1
    JOB_MODE=$([ "$mode" = systemd ] && echo yes || echo no)
    local ids=("vm-par1-$mode-$RANDOM" "vm-par2-$mode-$RANDOM") tmps=() envs1=() envs2=() pids=()
    section "two jobs at once on the $mode path (${ids[*]})"
    local P="[$mode parallel]"
    job_env "${ids[0]}"; envs1=("${ENVV[@]}"); tmps+=("$JOBTMP")
    job_env "${ids[1]}"; envs2=("${ENVV[@]}"); tmps+=("$JOBTMP")
    t=$(ts)
    (cd "${tmps[0]}" && exec env -i "${envs1[@]}" setsid "$WORK/links/prepare" </dev/null >prepare.out 2>prepare.err) & pids+=($!)
    (cd "${tmps[1]}" && exec env -i "${envs2[@]}" setsid "$WORK/links/prepare" </dev/null >prepare.out 2>prepare.err) & pids+=($!)
    for i in 0 1; do wait "${pids[$i]}" || { ok=0; show "${tmps[$i]}/prepare.err" "prepare ${ids[$i]}"; }; done
    check "$P both prepares exit 0 ($(dt "$t") s)" [ $ok = 1 ]
    for i in 0 1; do
        if [ $i = 0 ]; then ENVV=("${envs1[@]}"); else ENVV=("${envs2[@]}"); fi
        JOBTMP="${tmps[$i]}"
        run_body build_script 'echo "host=$(hostname)"'
        check "$P job ${ids[$i]} runs in its own machine ($(tr -d '\n' < "$OUT"))" grep -qx "host=run-${ids[$i]}" "$OUT"
    done
    if [ "$mode" = systemd ]; then
        check "$P machinectl lists both" sh -c "machinectl list --no-legend | grep -q '^run-${ids[0]} ' && machinectl list --no-legend | grep -q '^run-${ids[1]} '"
    fi
    pids=(); t=$(ts)
    (cd "${tmps[0]}" && exec env -i "${envs1[@]}" setsid "$WORK/links/cleanup" </dev/null >cleanup.out 2>cleanup.err) & pids+=($!)
    (cd "${tmps[1]}" && exec env -i "${envs2[@]}" setsid "$WORK/links/cleanup" </dev/null >cleanup.out 2>cleanup.err) & pids+=($!)
    ok=1; for i in 0 1; do wait "${pids[$i]}" || { ok=0; show "${tmps[$i]}/cleanup.err" "cleanup ${ids[$i]}"; }; done
    check "$P both cleanups exit 0 ($(dt "$t") s)" [ $ok = 1 ]
    check "$P nothing left of either job" sh -c "
        ! machinectl list --no-legend | grep -q '^run-vm-par' &&
        ! pgrep -f '[s]ystemd-nspawn.*--machine=run-vm-par' >/dev/null &&
        [ -z \"\$(find '$STORE/$IMG' -maxdepth 1 -name '.#machine.*')\" ] &&
        [ ! -e '$STATE_DIR/${ids[0]}.json' ] && [ ! -e '$STATE_DIR/${ids[1]}.json' ]"
}

# ---- prepare failures -----------------------------------------------------------------------
failure_scenarios() {
    section "system failures"
    JOB_MODE=auto
    job_env "vm-missing-$RANDOM"
    ENVV+=(CUSTOM_ENV_CI_JOB_IMAGE=no-such-image)
    stage prepare
    check "prepare with a missing image -> exit 2 (got $RC) and a 'nspawn-runner:' line" \
        sh -c "[ $RC = 2 ] && grep -q '^nspawn-runner: ' '$ERR'"
    show "$ERR" "missing image"
    stage cleanup
    check "cleanup after a failed prepare exits 0 (got $RC)" [ $RC = 0 ]
    job_env 'bad/id'
    stage prepare
    check "prepare with a bad job id -> exit 2 (got $RC)" [ $RC = 2 ]
}

# ---- transactional maintenance ------------------------------------------------------------------
maint_scenario() {
    section "transactional maintenance and gc (NSPAWN_RUNNER_SYSTEMD=auto)"
    JOB_MODE=auto
    local a="vm-old-$RANDOM" b="vm-new-$RANDOM" t rc snap_a snap_b
    job_env "$a"; local ENV_A=("${ENVV[@]}") TMP_A="$JOBTMP"
    t=$(ts); stage prepare
    check "job A prepared before maintenance (exit $RC, $(dt "$t") s)" [ $RC = 0 ]
    [ $RC = 0 ] || show "$ERR" "prepare A"
    snap_a="$(readlink "$STORE/$IMG/current")"
    run_body build_script 'cat /etc/marker 2>/dev/null || echo no-marker'
    check "job A sees no /etc/marker before maintenance ($(tr -d '\n' < "$OUT"))" grep -qx no-marker "$OUT"

    t=$(ts); nr image maintain "$IMG" -- sh -c 'echo new > /etc/marker' >"$WORK/maintain.out" 2>&1; rc=$?
    check "image maintain $IMG -- sh -c 'echo new > /etc/marker' (exit $rc, $(dt "$t") s)" [ $rc = 0 ]
    show "$WORK/maintain.out" maintain
    if [ $rc != 0 ] && grep -q 'execv(--)' "$WORK/maintain.out"; then
        # argh hands the "--" over as part of the command: go on without it so that the
        # transaction checks below still say something
        echo "    (the '--' reached the command; retrying as: image maintain $IMG sh -c ...)"
        nr image maintain "$IMG" sh -c 'echo new > /etc/marker' >"$WORK/maintain.out" 2>&1; rc=$?
        check "image maintain $IMG sh -c 'echo new > /etc/marker' (no --) (exit $rc)" [ $rc = 0 ]
        show "$WORK/maintain.out" maintain
    fi
    snap_b="$(readlink "$STORE/$IMG/current")"
    check "current moved to a new snapshot ($snap_a -> $snap_b)" [ -n "$snap_b" -a "$snap_a" != "$snap_b" ]
    check "the new snapshot has /etc/marker = new" grep -qx new "$STORE/$IMG/$snap_b/etc/marker"
    check "the old snapshot is untouched" [ ! -e "$STORE/$IMG/$snap_a/etc/marker" ]

    ENVV=("${ENV_A[@]}"); JOBTMP="$TMP_A"
    run_body build_script 'cat /etc/marker 2>/dev/null || echo no-marker'
    check "job A (started before) still sees the old tree ($(tr -d '\n' < "$OUT"))" grep -qx no-marker "$OUT"

    job_env "$b"; local ENV_B=("${ENVV[@]}") TMP_B="$JOBTMP"
    t=$(ts); stage prepare
    check "job B prepared after maintenance (exit $RC, $(dt "$t") s)" [ $RC = 0 ]
    run_body build_script 'cat /etc/marker 2>/dev/null || echo no-marker'
    check "job B sees the new tree ($(tr -d '\n' < "$OUT"))" grep -qx new "$OUT"

    # gc with KEEP=0 would delete every non-current snapshot; A's must survive while A runs
    ADMIN_ARGS=(image gc "$IMG"); admin NSPAWN_RUNNER_KEEP=0 >"$WORK/gc1.out" 2>&1; rc=$?
    check "image gc $IMG while job A runs (exit $rc)" [ $rc = 0 ]
    show "$WORK/gc1.out" gc
    check "gc kept job A's snapshot $snap_a (leased)" [ -d "$STORE/$IMG/$snap_a" ]
    check "gc kept current $snap_b" [ -d "$STORE/$IMG/$snap_b" ]
    ENVV=("${ENV_A[@]}"); JOBTMP="$TMP_A"
    run_body build_script 'test -d /usr/bin && cat /etc/os-release | head -n1'
    check "job A still runs after gc (exit $RC)" [ $RC = 0 ]
    stage cleanup; check "cleanup A (exit $RC)" [ $RC = 0 ]
    ENVV=("${ENV_B[@]}"); JOBTMP="$TMP_B"
    stage cleanup; check "cleanup B (exit $RC)" [ $RC = 0 ]

    ADMIN_ARGS=(image gc "$IMG"); admin NSPAWN_RUNNER_KEEP=0 >"$WORK/gc2.out" 2>&1; rc=$?
    check "gc with KEEP=0 after the jobs ended removes $snap_a (exit $rc)" [ ! -e "$STORE/$IMG/$snap_a" ]
    show "$WORK/gc2.out" gc2
    check "current ($snap_b) still there" [ "$(readlink "$STORE/$IMG/current")" = "$snap_b" -a -d "$STORE/$IMG/$snap_b" ]
    check "no ephemeral copies, no machines left" sh -c "[ -z \"\$(find '$STORE/$IMG' -maxdepth 1 -name '.#machine.*')\" ] && ! machinectl list --no-legend | grep -q '^run-'"
}

# ---- more scenarios: scenarios/NAME.sh beside this script (staged by run.sh) --------------------
# Each file defines scenario_NAME MODE (run once per path in SUITE_PATHS, with every helper above:
# job_env, stage, run_body, check, show...) and sets the default of its knob SUITE_<NAME> (1 runs it).
SCENARIOS=()
for f in "$HERE"/scenarios/*.sh; do
    [ -e "$f" ] || continue
    # shellcheck source=/dev/null
    . "$f"
    SCENARIOS+=("$(basename "$f" .sh)")
done

[ "${SUITE_JOB:-1}" = 1 ] && for p in $SUITE_PATHS; do job_scenario "$p"; done
[ "${SUITE_CRASH:-1}" = 1 ] && for p in $SUITE_PATHS; do crash_scenario "$p"; done
[ "${SUITE_PCANCEL:-1}" = 1 ] && for p in $SUITE_PATHS; do prepare_cancel_scenario "$p"; done
[ "${SUITE_PARALLEL:-1}" = 1 ] && parallel_scenario systemd
failure_scenarios
for n in "${SCENARIOS[@]}"; do
    knob="SUITE_${n^^}"
    [ "${!knob:-0}" = 1 ] && for p in $SUITE_PATHS; do "scenario_$n" "$p"; done
done
[ "$SUITE_MAINT" = 1 ] && maint_scenario

section "leftovers"
left="$(machinectl list --no-legend 2>/dev/null | grep '^run-')"
check "no job machines left anywhere${left:+ ($left)}" [ -z "$left" ]
left="$(systemctl list-units --all --no-legend --plain 'nspawn-runner-*' 2>/dev/null)"
check "no nspawn-runner units left${left:+ ($left)}" [ -z "$left" ]
left="$(find "$STORE" -mindepth 2 -maxdepth 2 -name '.#*machine.*' 2>/dev/null | tr '\n' ' ')"
check "no ephemeral copies or their .lck files left in the store${left:+ ($left)}" [ -z "$left" ]
left="$(ls "$STATE_DIR" 2>/dev/null | grep '\.json$')"
check "no state files left${left:+ ($left)}" [ -z "$left" ]

echo
log "guest suite finished"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
