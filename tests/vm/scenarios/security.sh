# shellcheck shell=bash
# scenarios/security.sh - sourced by guest-suite.sh: what confines a job's script on each host path
# (issue 8). SUITE_SECURITY=1 runs it; off by default until job machines get a user namespace,
# the machine's seccomp filter and DevicePolicy=closed: it prints the values either way.
: "${SUITE_SECURITY:=0}"

scenario_security() {  # scenario_security MODE(systemd|plain)
    local mode="$1" id="vm-sec-$1-$RANDOM" t
    local unit="nspawn-runner-run-$id.service" P="[$1 security]"
    JOB_MODE=$([ "$mode" = systemd ] && echo yes || echo no)
    section "containment of a job's script on the $mode path (job $id)"
    job_env "$id"
    t=$(ts); stage prepare
    check "$P prepare exits 0 ($(dt "$t") s)" [ "$RC" = 0 ]
    [ "$RC" = 0 ] || { show "$ERR" "prepare err"; return; }
    run_body build_script 'echo "uid_map=$(tr -s " " < /proc/self/uid_map | sed "s/^ //" | head -n1)"
grep -E "^(Seccomp|NoNewPrivs|CapBnd):" /proc/self/status | tr -d "\t" | sed "s/:/=/"'
    sed 's/^/    info| /' "$OUT"
    check "$P root in the job is not host root (uid_map: $(sed -n 's/^uid_map=//p' "$OUT"))" \
        sh -c "grep -q '^uid_map=' '$OUT' && ! grep -qx 'uid_map=0 0 4294967295' '$OUT'"
    check "$P the script has a seccomp filter ($(grep '^Seccomp=' "$OUT"))" grep -qx 'Seccomp=2' "$OUT"
    if [ "$mode" = systemd ]; then
        local dp; dp="$(systemctl show "$unit" -p DevicePolicy --value 2>/dev/null)"
        echo "    info| DevicePolicy=$dp"
        check "$P $unit has DevicePolicy=closed (got '$dp')" [ "$dp" = closed ]
    fi
    stage cleanup
    check "$P cleanup exits 0" [ "$RC" = 0 ]
}
