#!/bin/bash
# guest-powercut.sh setup|load|verify ROUND - runs INSIDE the test-bed VM; run.sh drives it and cuts the
# VM's power (SIGKILL of QEMU on the host) while `load` runs, then boots the same disks again and runs
# `verify`. Two stores: btrfs ($PC_ROOT/btrfs on the VM's btrfs disk) and plain ($PC_PLAIN on the
# ext4 root disk), each with image `pc` (maintained) and `pcimp` (re-imported).
#
#   setup        makes both stores: `pc` imported and maintained once (generation 1), `pcimp` imported;
#                records each image's file manifest, syncs
#   load ROUND   on both stores at once, forever: prepare a job (left running), then a loop of
#                `image maintain pc` (an 8 MB payload, then the marker /etc/pc-marker with its sha256,
#                written last), `image gc pc` (KEEP=0) and `image import pcimp BASE`; every step is
#                announced on stdout ("PC phase STORE STEP") and everything nspawn-runner prints is
#                passed on ("PC out STORE ..."), so the host log shows where the cut landed
#   verify ROUND [LOADLOG]  after the reboot, for each store and image: `current` names a snapshot, every
#                snapshot is complete (pc: marker matches payload, the rest of the tree as at setup;
#                pcimp: the manifest of the imported tree), a commit the host saw reported is still current
#                or older than current, a snapshot the host saw gc delete did not come back; `image list`
#                works; `image gc` removes every leftover (.tx-*, .#machine.*, .current.*, locks, .jobs/*)
#                and keeps current; a job boots on `pc` and sees current's marker (btrfs in odd rounds,
#                plain in even ones). LOADLOG is the host's log of the load (default /mnt/host/pc-load-ROUND.log).
#
# Prints PASS:/FAIL: lines and "N passed, N failed" (verify, setup); exit 0 only if all passed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
BASE_IMAGE=/var/lib/nspawn-runner/images/bookworm   # the test bed's base tree (the VM's own release)
PC_ROOT=/var/lib/nspawn-runner/pc                   # on the btrfs disk
PC_PLAIN=/var/lib/nspawn-runner-pc-plain            # on the ext4 root disk
WORK=/var/lib/nspawn-runner-pc-work                 # binary, manifests (persist across the cut)
STORES="btrfs plain"

passed=0; failed=0
pass() { echo "PASS: $*"; passed=$((passed+1)); }
fail() { echo "FAIL: $*"; failed=$((failed+1)); }
check() { local d="$1"; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }
finish() { echo "$passed passed, $failed failed"; [ "$failed" = 0 ]; }

store_root() { if [ "$1" = btrfs ]; then echo "$PC_ROOT/store"; else echo "$PC_PLAIN/store"; fi; }
# nr STORE ARGS...: nspawn-runner on STORE with the suite's settings (extra VAR=VALUE first via NR_ENV);
# no health check before commits: the base tree has no git, and power cuts test the bookkeeping
nr() {
    local s="$1"; shift
    env -i PATH="$PATH" HOME=/root NSPAWN_RUNNER_ROOT="$(store_root "$s")" \
        NSPAWN_RUNNER_STATE_DIR=/run/nspawn-runner NSPAWN_RUNNER_CONFIG_DIR="$WORK/etc" \
        NSPAWN_RUNNER_CACHE_DIR="$WORK/cache" NSPAWN_RUNNER_GITLAB_RUNNER= \
        NSPAWN_RUNNER_PREPARE_TIMEOUT=240 NSPAWN_RUNNER_STOP_TIMEOUT=10 \
        NSPAWN_RUNNER_CHECK=false \
        TMPDIR="$WORK/tmp" BUILD_FAILURE_EXIT_CODE=1 SYSTEM_FAILURE_EXIT_CODE=2 \
        ${NR_ENV:-} "$WORK/nspawn-runner" "$@"
}
# manifest TREE [EXCLUDE_REGEX]: one line per entry (files with their size), sorted, as a sha256
manifest() {
    (cd "$1" && { find . -xdev -type f -printf '%P f %s %m\n'; find . -xdev ! -type f -printf '%P %y %m\n'; } \
        | grep -Ev "${2:-^$}" | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
}
# the files maintenance writes; they are checked by the marker, not by the manifest
PC_OWN='^(pc-payload|etc/pc-marker(\.new)?) '
# maintenance generation N, inside the snapshot: payload first, marker with its checksum last
maint_cmd() {
    printf '%s' "head -c 8M /dev/urandom > /pc-payload && printf 'gen $1 %s\n' \"\$(sha256sum < /pc-payload | cut -d' ' -f1)\" > /etc/pc-marker.new && mv /etc/pc-marker.new /etc/pc-marker"
}
# marker_ok TREE: the marker names the payload's checksum
marker_ok() {
    local want; want="$(cut -d' ' -f3 "$1/etc/pc-marker" 2>/dev/null)"
    [ -n "$want" ] && [ "$(sha256sum < "$1/pc-payload" | cut -d' ' -f1)" = "$want" ]
}
snapshots() { find "$1" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+_[0-9]+' -printf '%f\n' | sort -t_ -k1,1n -k2,2n; }
leftovers() {  # leftovers STORE: what gc must remove after a cut
    local r; r="$(store_root "$1")"
    find "$r" -mindepth 2 -maxdepth 2 \( -name '.tx-*' -o -name '.#*' -o -name '.current.*' \) -printf '%P\n' 2>/dev/null
    find "$r/.jobs" -mindepth 1 -maxdepth 1 -printf '.jobs/%P\n' 2>/dev/null
}

case "${1:-}" in
setup)
    mkdir -p "$WORK/etc" "$WORK/cache" "$WORK/tmp" "$PC_ROOT" "$PC_PLAIN"
    install -m 755 "${NSPAWN_RUNNER_BIN:-$HERE/nspawn-runner}" "$WORK/nspawn-runner"
    for s in $STORES; do
        r="$(store_root "$s")"
        rm -rf "$r"; mkdir -p "$r"
        out="$(nr "$s" image import pc "$BASE_IMAGE" 2>&1)"; check "[$s] image import pc" [ $? = 0 ]
        # pcimp is created by the load (a first import is an image creation); its trees are pc's import
        manifest "$r/pc/$(readlink "$r/pc/current")" > "$WORK/$s-pcimp.manifest"
        out="$(nr "$s" image maintain pc -- sh -c "$(maint_cmd 1)" 2>&1)"; rc=$?
        check "[$s] image maintain pc (generation 1)" [ $rc = 0 ]
        [ $rc = 0 ] || echo "$out" | sed 's/^/    | /'
        NR_ENV=NSPAWN_RUNNER_KEEP=0 nr "$s" image gc pc >/dev/null 2>&1
        cur="$r/pc/$(readlink "$r/pc/current")"
        check "[$s] pc generation 1 is complete" marker_ok "$cur"
        manifest "$cur" "$PC_OWN" > "$WORK/$s-pc.manifest"
    done
    check "store kinds: $(stat -f -c %T "$PC_ROOT") and $(stat -f -c %T "$PC_PLAIN")" \
        sh -c "[ \"\$(stat -f -c %T '$PC_ROOT')\" = btrfs ] && [ \"\$(stat -f -c %T '$PC_PLAIN')\" != btrfs ]"
    sync
    finish; exit ;;

load)
    round="${2:?round}"
    # one load per store, in parallel; each line tagged with the store
    load_store() {
        local s="$1" gen i=0
        gen=$(( $(cut -d' ' -f2 "$(store_root "$s")/pc/current/etc/pc-marker" 2>/dev/null || echo 1) + 1 ))
        echo "PC phase $s prepare job pc-$round-$s"
        NSPAWN_RUNNER_SYSTEMD=auto nr "$s" prepare --job-id "pc-$round-$s" --image pc 2>&1 | sed "s/^/PC out $s prepare| /" &
        # the steps in turn, starting at a different one each round
        local steps=(maintain gc import) step
        while :; do
            step="${steps[$(( (round - 1 + i) % 3 ))]}"
            echo "PC phase $s $step$([ "$step" = maintain ] && echo " gen $gen")"
            case $step in
                maintain) nr "$s" image maintain pc -- sh -c "$(maint_cmd $gen)"; gen=$((gen+1)) ;;
                gc) NR_ENV=NSPAWN_RUNNER_KEEP=0 nr "$s" image gc pc ;;
                import) nr "$s" image import pcimp "$BASE_IMAGE" ;;
            esac 2>&1 | sed "s/^/PC out $s | /"
            [ "${PIPESTATUS[0]}" = 0 ] || echo "PC fail $s $step"
            i=$((i+1))
        done
    }
    echo "PC load-started round $round"
    for s in $STORES; do load_store "$s" & done
    wait; exit ;;

verify)
    round="${2:?round}"; log="${3:-/mnt/host/pc-load-$round.log}"
    [ -r "$log" ] || { echo "FAIL: no load log $log"; exit 1; }
    check "the load reported no failure before the cut$(grep -c '^PC fail' "$log" | sed 's/^0$//;s/^./ (&)/')" \
        sh -c "! grep -q '^PC fail' '$log'"
    for s in $STORES; do
        r="$(store_root "$s")"; P="[$s round $round]"
        echo "    $P cut during: $(grep "^PC phase $s " "$log" | tail -n1 | cut -d' ' -f4-)"
        echo "    $P leftovers before gc: $(leftovers "$s" | tr '\n' ' ')"
        for img in pc pcimp; do
            cur="$(readlink "$r/$img/current" 2>/dev/null)"
            # the last commit of IMG the host saw reported (the switch's log line, or the command's)
            seen="$(grep -E "^PC out $s \| (nspawn-runner: )?image $img(:| created:) " "$log" \
                | grep -Eo '(snapshot [0-9]+_[0-9]+|[0-9]+_[0-9]+ is now current)' | grep -Eo '[0-9]+_[0-9]+' | tail -n1)"
            if [ "$img" = pcimp ] && [ -z "$cur" ] && [ -z "$seen" ]; then
                # its creation was cut before it committed: gc must clean up what is left
                echo "    $P pcimp was not created before the cut: $(ls -A "$r/pcimp" 2>/dev/null | tr '\n' ' ')"
                continue
            fi
            check "$P $img/current -> '$cur' names a snapshot directory" \
                sh -c "echo '$cur' | grep -Eq '^[0-9]+_[0-9]+\$' && [ -d '$r/$img/$cur' ]"
            for snap in $(snapshots "$r/$img"); do
                tree="$r/$img/$snap"; tag="$img/$snap$([ "$snap" = "$cur" ] && echo ' (current)')"
                if [ "$img" = pc ]; then
                    check "$P $tag is complete: marker '$(cut -c1-16 "$tree/etc/pc-marker" 2>/dev/null)…' matches its payload" marker_ok "$tree"
                    check "$P $tag: the rest of the tree is as at setup" \
                        [ "$(manifest "$tree" "$PC_OWN")" = "$(cat "$WORK/$s-pc.manifest")" ]
                else
                    check "$P $tag is complete (manifest as imported at setup)" \
                        [ "$(manifest "$tree")" = "$(cat "$WORK/$s-pcimp.manifest")" ]
                fi
            done
            if [ -n "$seen" ]; then
                check "$P the last reported commit of $img ($seen) is durable: current $cur is it or newer" \
                    sh -c "[ -n '$cur' ] && [ '$(printf '%s\n%s\n' "$seen" "$cur" | sort -t_ -k1,1n -k2,2n | tail -n1)' = '$cur' ]"
            fi
        done
        # what gc reported deleted must stay deleted
        gone="$(grep -E "^PC out $s \| image (pc|pcimp): deleted [0-9]+_[0-9]+\$" "$log" | awk '{sub(":","",$6); print $6 "/" $NF}' | sort -u)"
        back=""; for g in $gone; do [ -e "$r/$g" ] && back="$back $g"; done
        check "$P snapshots gc reported deleted ($(echo $gone | wc -w)) did not come back${back:+ (back:$back)}" [ -z "$back" ]
        nr "$s" image list > "$WORK/list.out" 2>&1; rc=$?
        check "$P image list exits 0 and names pc's current (exit $rc)" \
            sh -c "[ $rc = 0 ] && grep -q '$(readlink "$r/pc/current")' '$WORK/list.out'"
        [ $rc = 0 ] || sed 's/^/    | /' "$WORK/list.out"
        before="$(readlink "$r/pc/current")"
        nr "$s" image gc > "$WORK/gc.out" 2>&1; rc=$?
        check "$P image gc after the cut exits 0 (exit $rc)" [ $rc = 0 ]
        sed 's/^/    gc| /' "$WORK/gc.out" | head -n 20
        left="$(leftovers "$s" | tr '\n' ' ')"
        check "$P gc removed every leftover${left:+ (left: $left)}" [ -z "$left" ]
        check "$P gc kept current ($before)" [ "$(readlink "$r/pc/current")" = "$before" -a -d "$r/pc/$before" ]
        if { [ "$s" = btrfs ] && [ $((round % 2)) = 1 ]; } || { [ "$s" = plain ] && [ $((round % 2)) = 0 ]; }; then
            id="pcv-$round-$s"
            out="$(NSPAWN_RUNNER_SYSTEMD=auto nr "$s" prepare --job-id "$id" --image pc 2>&1)"; rc=$?
            check "$P a job boots on pc's current (prepare exit $rc)" [ $rc = 0 ]
            [ $rc = 0 ] || echo "$out" | sed 's/^/    prepare| /'
            printf '#!/bin/sh\ncat /etc/pc-marker\n' > "$WORK/tmp/marker.sh"; chmod 755 "$WORK/tmp/marker.sh"
            got="$(nr "$s" run "$WORK/tmp/marker.sh" build_script --job-id "$id" 2>&1)"
            check "$P the job sees current's marker ($(echo "$got" | cut -c1-16)…)" \
                [ "$got" = "$(cat "$r/pc/$before/etc/pc-marker")" ]
            nr "$s" cleanup --job-id "$id" >/dev/null 2>&1
            check "$P cleanup of the job leaves nothing$(leftovers "$s" | tr '\n' ' ' | sed 's/^./ (&/;s/.$/&)/')" [ -z "$(leftovers "$s")" ]
        fi
    done
    finish; exit ;;
*) sed -n '2,24p' "$0"; exit 2 ;;
esac
