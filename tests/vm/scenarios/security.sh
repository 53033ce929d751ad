# shellcheck shell=bash
# scenarios/security.sh - sourced by guest-suite.sh: what confines a job's script on each host path
# (issue 8). On by default (SUITE_SECURITY=0 skips it). Per path, on the suite's btrfs store and on a
# plain store (ext4 root disk): the job's uid_map and Seccomp, the unit's DevicePolicy (systemd
# path), and the attack program of tests/security.rs (tests/attack/attack.c, built by run.sh and
# staged beside this suite as ./attack) run from a job script, judged by its own verdict line. Then
# a privileged image's job must be able to use a loop device, on both paths.
: "${SUITE_SECURITY:=1}"

SEC_ATTACK="$HERE/attack"
SEC_PLAIN_ROOT=/var/lib/nspawn-runner-suite-plain/store   # on the VM's ext4 root disk: overlay roots
SEC_DECOYS=/var/lib/nspawn-runner/suite-decoys            # beside the suite's btrfs store, same file system
SEC_PLAIN_READY=""

# sec_plain_store: imports the image into the plain store, once per suite run
sec_plain_store() {
    [ -n "$SEC_PLAIN_READY" ] && return 0
    rm -rf "$SEC_PLAIN_ROOT"; mkdir -p "$SEC_PLAIN_ROOT"
    local t rc; t=$(ts)
    ADMIN_ARGS=(image import "$IMG" "$BASE_IMAGE"); admin NSPAWN_RUNNER_ROOT="$SEC_PLAIN_ROOT" >"$WORK/sec-import.out" 2>&1; rc=$?
    check "[security] image import $IMG into the plain store $SEC_PLAIN_ROOT (exit $rc, $(dt "$t") s, $(stat -f -c %T "$SEC_PLAIN_ROOT"))" \
        sh -c "[ $rc = 0 ] && [ \"\$(stat -f -c %T '$SEC_PLAIN_ROOT')\" != btrfs ]"
    [ $rc = 0 ] || { show "$WORK/sec-import.out" import; return 1; }
    SEC_PLAIN_READY=1
}

# sec_attacks MODE STORE(btrfs|plain): one job that runs the attack program
sec_attacks() {
    local mode="$1" store="$2" id="vm-sec-$1-$2-$RANDOM" decoy="" decoy_id=0 root="$STORE"
    local unit="nspawn-runner-run-$id.service" P="[$1 security, $2 store]"
    section "containment of a job's script on the $mode path, $store store (job $id)"
    job_env "$id"
    if [ "$store" = plain ]; then
        sec_plain_store || return
        root="$SEC_PLAIN_ROOT"; ENVV+=(NSPAWN_RUNNER_ROOT="$root")
    else
        # a subvolume of the store's file system for SNAP_DESTROY_V2 to aim at
        mkdir -p "$SEC_DECOYS"; decoy="$SEC_DECOYS/$id"
        btrfs -q subvolume create "$decoy" && decoy_id="$(btrfs inspect-internal rootid "$decoy")"
        check "$P decoy subvolume $decoy (id $decoy_id)" [ "$decoy_id" -gt 0 ]
    fi
    local t; t=$(ts); stage prepare
    check "$P prepare exits 0 ($(dt "$t") s)" [ "$RC" = 0 ]
    [ "$RC" = 0 ] || { show "$ERR" "prepare err"; stage cleanup; return; }
    check "$P the job's seccomp filters ($STATE_DIR/$id.seccomp) are private" \
        [ "$(stat -c %a "$STATE_DIR/$id.seccomp" 2>/dev/null)" = 600 ]
    run_body build_script 'echo "uid_map=$(tr -s " " < /proc/self/uid_map | sed "s/^ //" | head -n1)"
grep -E "^(Seccomp|NoNewPrivs|CapBnd):" /proc/self/status | tr -d "\t" | sed "s/:/=/"'
    sed 's/^/    info| /' "$OUT"
    check "$P root in the job is not host root (uid_map: $(sed -n 's/^uid_map=//p' "$OUT"))" \
        sh -c "grep -q '^uid_map=' '$OUT' && ! grep -qx 'uid_map=0 0 4294967295' '$OUT'"
    check "$P the script has a seccomp filter ($(grep '^Seccomp=' "$OUT"))" grep -qx 'Seccomp=2' "$OUT"
    if [ "$mode" = systemd ]; then
        local dp da
        dp="$(systemctl show "$unit" -p DevicePolicy --value 2>/dev/null)"
        da="$(systemctl show "$unit" -p DeviceAllow --value 2>/dev/null | paste -sd,)"
        echo "    info| DevicePolicy=$dp DeviceAllow=$da"
        check "$P $unit has DevicePolicy=closed (got '$dp')" [ "$dp" = closed ]
        check "$P $unit allows no loop device" sh -c "! echo '$da' | grep -q loop"
    fi

    # the attack program, in the job's project cache (its /cache) like tests/security.rs
    local cached="$WORK/cache/projects/7/attack"
    if [ -x "$SEC_ATTACK" ] && install -m 755 "$SEC_ATTACK" "$cached"; then
        run_body build_script "/cache/attack $decoy_id"
        grep -E '^(attack|check) ' "$OUT" | grep -Ev ': (ok|refused) ' | sed 's/^/    got| /'
        check "$P the attack program runs (exit $RC)" [ "$RC" = 0 ]
        check "$P every attack is refused and the script has what init has ($(grep '^done: ' "$OUT"))" \
            grep -qx 'done: attack program, 0 failed' "$OUT"
        [ "$RC" = 0 ] && grep -qx 'done: attack program, 0 failed' "$OUT" || { show "$OUT" attack; show "$ERR" "attack err"; }
        rm -f "$cached"
    else
        fail "$P no attack program at $SEC_ATTACK (run.sh builds it from tests/attack/attack.c)"
    fi
    # builds still work, as root and as an unprivileged user
    run_body build_script 'test "$(setpriv --reuid=65534 --regid=65534 --clear-groups id -u)" = 65534
runuser -u nobody -- sh -c "echo unprivileged-ok > /tmp/unprivileged && cat /tmp/unprivileged"'
    check "$P an unprivileged user still works in the job (exit $RC)" sh -c "[ $RC = 0 ] && grep -qx unprivileged-ok '$OUT'"

    stage cleanup
    check "$P cleanup exits 0" [ "$RC" = 0 ]
    check "$P nothing left: unit, state file, seccomp file, .jobs/run-$id" sh -c "
        ! systemctl show '$unit' -p LoadState --value | grep -qx loaded &&
        [ ! -e '$STATE_DIR/$id.json' ] && [ ! -e '$STATE_DIR/$id.seccomp' ] && [ ! -e '$root/.jobs/run-$id' ]"
    if [ -n "$decoy" ]; then
        check "$P the decoy subvolume survived" btrfs subvolume show "$decoy" >/dev/null 2>&1
        btrfs -q subvolume delete "$decoy" 2>/dev/null
    fi
}

# sec_privileged_loop MODE: a privileged image's job attaches, writes and reads a loop device (the
# reason to make an image privileged); its /dev has no loop nodes, so it makes them
sec_privileged_loop() {
    local mode="$1" id="vm-priv-$1-$RANDOM"
    local unit="nspawn-runner-run-$id.service" P="[$1 privileged]"
    section "a privileged image's job uses a loop device on the $mode path (job $id)"
    job_env "$id"
    mkdir -p "$WORK/etc-privileged"; echo privileged=true > "$WORK/etc-privileged/$IMG.conf"
    ENVV+=(NSPAWN_RUNNER_CONFIG_DIR="$WORK/etc-privileged")
    local t; t=$(ts); stage prepare
    check "$P prepare exits 0 ($(dt "$t") s)" [ "$RC" = 0 ]
    [ "$RC" = 0 ] || { show "$ERR" "prepare err"; stage cleanup; return; }
    if [ "$mode" = systemd ]; then
        local dp da
        dp="$(systemctl show "$unit" -p DevicePolicy --value 2>/dev/null)"
        da="$(systemctl show "$unit" -p DeviceAllow --value 2>/dev/null | paste -sd,)"
        echo "    info| DevicePolicy=$dp DeviceAllow=$da"
        check "$P $unit keeps DevicePolicy=closed and allows the loop devices" sh -c "[ '$dp' = closed ] &&
            echo '$da' | grep -q '/dev/loop-control rwm' && echo '$da' | grep -q 'block-loop rwm'"
    fi
    run_body build_script 'echo "uid_map=$(tr -s " " < /proc/self/uid_map | sed "s/^ //" | head -n1)"
[ -e /dev/loop-control ] || mknod -m 600 /dev/loop-control c 10 237
i=0; while [ $i -lt 64 ]; do [ -e /dev/loop$i ] || mknod -m 600 /dev/loop$i b 7 $i; i=$((i+1)); done
truncate -s 4M /tmp/disk.img
dev="$(losetup -f --show /tmp/disk.img)"
trap "losetup -d $dev" EXIT
printf loop-data | dd of="$dev" conv=notrunc status=none
echo "read back through $dev: $(head -c 9 "$dev")"'
    sed 's/^/    info| /' "$OUT"
    check "$P root in the job is host root" grep -qx 'uid_map=0 0 4294967295' "$OUT"
    check "$P the job attaches, writes and reads a loop device (exit $RC)" \
        sh -c "[ $RC = 0 ] && grep -q ': loop-data\$' '$OUT'"
    [ "$RC" = 0 ] || show "$ERR" "loop err"
    stage cleanup
    check "$P cleanup exits 0, no unit or state file left" sh -c "[ $RC = 0 ] &&
        ! systemctl show '$unit' -p LoadState --value | grep -qx loaded && [ ! -e '$STATE_DIR/$id.json' ]"
    check "$P no loop device of the job left attached" sh -c "! losetup -a | grep -q 'disk.img'"
}

scenario_security() {  # scenario_security MODE(systemd|plain)
    JOB_MODE=$([ "$1" = systemd ] && echo yes || echo no)
    sec_attacks "$1" btrfs
    sec_attacks "$1" plain
    sec_privileged_loop "$1"
}
