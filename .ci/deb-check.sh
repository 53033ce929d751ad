#!/bin/bash
# End-to-end check of the Debian package of nspawn-runner.
#
#  1. build the .deb with dpkg-buildpackage in a clean Debian 13 (trixie) chroot
#     made by mmdebstrap, with the build dependencies from Debian's archive
#     (offline cargo build from Debian's librust-*-dev packages, no crates.io);
#  2. lintian on the result: no error, no warning;
#  3. install it (apt-get) into another clean trixie chroot, import a bookworm
#     image into its store and drive ONE job through
#     /usr/lib/nspawn-runner/{config,prepare,run,cleanup} as gitlab-runner does;
#  4. apt-get purge, then check that nothing is left behind.
#
# Needs root, a network path to the Debian archive, and about 3 GB in the work dir.
# Everything goes under $DEB_CHECK_WORK (default /var/tmp/nspawn-runner-deb-check);
# nothing outside it is written or removed, except the packages installed on
# the host by apt-get (mmdebstrap and its helpers).
#
# Environment:
#   DEB_CHECK_WORK    work dir (default /var/tmp/nspawn-runner-deb-check)
#   DEB_CHECK_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#   DEB_CHECK_STEPS   which steps to run: "build,lintian,job,purge" (default all;
#                     job and purge need the .deb from build in the same work dir)
#   DEB_CHECK_TREE    what to build: "worktree" (default: the files git tracks or
#                     would track, as they are on disk) or "head" (git archive HEAD)
#   DEB_CHECK_BTRFS   1 (default): also drive the job with the store on a
#                     loop-mounted btrfs; 0: only the plain store
#   DEB_CHECK_PATCH   a patch (-p1) applied to the copied tree before building,
#                     to try a fix without committing it
#   DEB_BUILD_OPTIONS passed to dpkg-buildpackage; default "": the build runs the
#                     library's unit tests (debian/rules override_dh_auto_test);
#                     "nocheck" skips them

set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${DEB_CHECK_WORK:-/var/tmp/nspawn-runner-deb-check}"
MIRROR="${DEB_CHECK_MIRROR:-http://deb.debian.org/debian}"
STEPS="${DEB_CHECK_STEPS:-build,lintian,job,purge}"
IMAGE_NAME="bookworm"
JOB_ID="4242"
T0="$(date +%s)"
FAILED=0

log() { printf '%s [deb-check +%ss] %s\n' "$(date -u +%T)" "$(( $(date +%s) - T0 ))" "$*" >&2; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILED=1; }
die() { printf 'FAIL: %s\n' "$*"; exit 1; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

[ "$(id -u)" = 0 ] || die "deb-check.sh must run as root"
case "$WORK" in
    /|/usr|/usr/*|/etc|/etc/*|/bin|/sbin|/lib|/lib64|/boot|/proc*|/sys*|/dev*|/run|"") die "refusing DEB_CHECK_WORK=$WORK" ;;
esac
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
ROOTFS="$WORK/testroot"

# --- host tools ---------------------------------------------------------------
need_pkgs=()
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v findmnt >/dev/null || need_pkgs+=(util-linux)
command -v git >/dev/null || need_pkgs+=(git)
[ -z "${DEB_CHECK_PATCH:-}" ] || command -v patch >/dev/null || need_pkgs+=(patch)
# mmdebstrap needs the trixie signing keys (bookworm's keyring has them since
# 2023.3+deb12u2).
[ -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ] || need_pkgs+=(debian-archive-keyring)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing on the host: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- mounts of the test chroot, always undone ---------------------------------
umount_under() {
    # Unmount everything mounted at or below $1, deepest first.
    local top="$1" m
    [ -d "$top" ] || return 0
    for _ in 1 2 3; do
        mapfile -t mnts < <(findmnt -rn -o TARGET | awk -v t="$top" 'index($0, t "/") == 1 || $0 == t' | sort -r)
        [ "${#mnts[@]}" -gt 0 ] || return 0
        for m in "${mnts[@]}"; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
    done
}
HOLDER=""
UNSHARE_PID=""
ns_procs() {
    # PIDs in the mount namespace of the test system ($HOLDER's) and all their
    # descendants (job machines live in child namespaces of nspawn), except
    # the holder itself.
    [ -n "$HOLDER" ] || return 0
    local ns p
    ns="$(readlink "/proc/$HOLDER/ns/mnt" 2>/dev/null)" || return 0
    python3 - "$ns" "$HOLDER" "${UNSHARE_PID:-0}" <<'PY'
import os, sys
ns, holder, unshare = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parent, members = {}, set()
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    pid = int(d)
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
            members.add(pid)
    except OSError:
        pass
found, changed = set(members), True
while changed:
    changed = False
    for pid, ppid in parent.items():
        if ppid in found and pid not in found:
            found.add(pid); changed = True
found.discard(holder)
found.discard(unshare)
for pid in sorted(found):
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        continue
    print(pid, comm)
PY
}
stop_testroot() {
    # End every process of the test system, then the holder: its private
    # mount namespace, with every mount made inside it, goes away with it.
    [ -n "$HOLDER" ] || return 0
    local pids
    for _ in 1 2 3; do
        pids="$(ns_procs | awk '{print $1}')"
        [ -n "$pids" ] || break
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 1
    done
    kill -9 "$HOLDER" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -n "$UNSHARE_PID" ] && [ -d "/proc/$UNSHARE_PID" ] || break
        sleep 0.1
    done
    HOLDER=""
    UNSHARE_PID=""
}
cleanup() {
    local rc=$?
    if [ -n "${SYSTEMS_PID:-}" ]; then
        kill_tree "$SYSTEMS_PID"
        sleep 1
    fi
    stop_testroot
    [ -d "$ROOTFS" ] && umount_under "$ROOTFS"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 0. the systems for steps 3 and 4, made in the background ----------------
# The bookworm job image (minbase + systemd + dbus, cached as a tarball in the
# work dir) and the clean trixie test system (minbase + systemd-container +
# btrfs-progs) are made while the package builds: mmdebstrap mostly waits for
# the network, the build for the CPU.
IMG_TAR="$WORK/cache/bookworm-minbase-systemd-v2.tar"
SYSTEMS_PID=""
make_systems() {
    if [ ! -s "$IMG_TAR" ]; then
        # /etc/deb-check-image marks the tree: job scripts refuse to run
        # anywhere else (so a broken "run" cannot write to the host).
        mmdebstrap --variant=minbase --include=systemd,dbus \
            --customize-hook='echo deb-check > "$1/etc/deb-check-image"' \
            bookworm "$IMG_TAR.tmp" "$MIRROR" > "$WORK/mmdebstrap-image.log" 2>&1 || return 1
        mv -- "$IMG_TAR.tmp" "$IMG_TAR" || return 1
    fi
    mmdebstrap --variant=minbase --include=systemd-container,btrfs-progs \
        trixie "$ROOTFS" "$MIRROR" > "$WORK/mmdebstrap-testroot.log" 2>&1 || return 1
}
start_systems() {
    umount_under "$ROOTFS"
    rm -rf --one-file-system -- "$ROOTFS"
    mkdir -p "$WORK/cache"
    rm -f -- "$WORK/systems.rc"
    log "making the job image (bookworm, unless cached) and the clean trixie test system (mmdebstrap), in the background"
    ( set +e; make_systems; echo "$?" > "$WORK/systems.rc" ) < /dev/null &
    SYSTEMS_PID=$!
}
wait_systems() {
    local t
    t="$(date +%s)"
    [ -n "$SYSTEMS_PID" ] || start_systems
    wait "$SYSTEMS_PID" 2>/dev/null || true
    SYSTEMS_PID=""
    if [ "$(cat "$WORK/systems.rc" 2>/dev/null)" != 0 ]; then
        tail -20 "$WORK/mmdebstrap-image.log" "$WORK/mmdebstrap-testroot.log" >&2 2>/dev/null || true
        die "mmdebstrap of the job image or of the test system failed (logs in $WORK)"
    fi
    log "job image and test system ready (waited $(( $(date +%s) - t ))s)"
}
kill_tree() {
    # kill -9 a process and all its descendants
    local pids
    pids="$(python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
parent = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
found, changed = {root}, True
while changed:
    changed = False
    for pid, ppid in parent.items():
        if ppid in found and pid not in found:
            found.add(pid); changed = True
print(" ".join(str(p) for p in sorted(found) if p in parent))
PY
)"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}
if want job || want purge; then
    start_systems
fi

# --- 1. build -----------------------------------------------------------------
OUT="$WORK/out"
if want build; then
    log "copying the source tree $SRC"
    rm -rf -- "$WORK/src" "$OUT"
    mkdir -p "$WORK/src/nspawn-runner" "$OUT"
    if [ "${DEB_CHECK_TREE:-worktree}" = head ]; then
        # the last commit only
        git -C "$SRC" archive --format=tar HEAD | tar -C "$WORK/src/nspawn-runner" -xf -
    elif git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
        # tracked + untracked-but-not-ignored files as they are on disk
        # (a clean clone gives HEAD)
        git -C "$SRC" ls-files -z --cached --others --exclude-standard \
            | (cd "$SRC" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done' sh) \
            | tar -C "$SRC" --null -T - -cf - | tar -C "$WORK/src/nspawn-runner" -xf -
    else
        tar -C "$SRC" --exclude=./target --exclude=./.git -cf - . | tar -C "$WORK/src/nspawn-runner" -xf -
    fi
    [ -f "$WORK/src/nspawn-runner/debian/control" ] || die "no debian/control in the copied tree"
    if [ -n "${DEB_CHECK_PATCH:-}" ]; then
        log "applying $DEB_CHECK_PATCH to the copy"
        patch -d "$WORK/src/nspawn-runner" -p1 < "$DEB_CHECK_PATCH" || die "$DEB_CHECK_PATCH does not apply"
    fi

    log "building in a clean trixie chroot (mmdebstrap, build-deps from Debian's archive, DEB_BUILD_OPTIONS=${DEB_BUILD_OPTIONS-})"
    tb="$(date +%s)"
    # The whole build runs inside mmdebstrap's customize hooks: mmdebstrap sets
    # up and tears down /proc, /dev, ... itself and throws the chroot away.
    # apt-get build-dep reads Build-Depends from debian/control; cargo is then
    # run by dh-cargo with CARGO_HOME pointing at Debian's registry only, and
    # the network is cut off for the build by unshare -n.
    cat > "$WORK/src/build-in-chroot.sh" <<'EOS'
#!/bin/sh
# Runs inside the clean trixie build chroot (mmdebstrap customize hook).
set -e
cd /build/nspawn-runner
mkdir -p /build/out
export DEBIAN_FRONTEND=noninteractive
if ! apt-get build-dep -y -q . > /build/out/build-dep.log 2>&1; then
    echo 1 > /build/out/build.rc
    exit 0
fi
# No network for the build itself: dh-cargo must find every crate in
# Debian's registry (/usr/share/cargo/registry).
rc=0
unshare -n env DEB_BUILD_OPTIONS="$1" dpkg-buildpackage -us -uc -b > /build/out/build.log 2>&1 || rc=$?
echo "$rc" > /build/out/build.rc
[ "$rc" = 0 ] || exit 0
cd /build
cp -a ./*.deb ./*.changes ./*.buildinfo /build/out/
rc=0
lintian --info --display-info --fail-on error,warning --tag-display-limit 0 ./nspawn-runner_*.changes \
    > /build/out/lintian.txt 2>&1 || rc=$?
echo "$rc" > /build/out/lintian.rc
EOS
    if mmdebstrap --variant=buildd --include=dh-cargo,lintian,ca-certificates \
        --customize-hook='mkdir -p "$1/build"' \
        --customize-hook="sync-in '$WORK/src' /build" \
        --customize-hook="chroot \"\$1\" sh /build/build-in-chroot.sh '${DEB_BUILD_OPTIONS-}'" \
        --customize-hook="sync-out /build/out '$OUT'" \
        trixie /dev/null "$MIRROR" > "$WORK/mmdebstrap-build.log" 2>&1; then
        :
    else
        tail -40 "$WORK/mmdebstrap-build.log" >&2
        die "build chroot (mmdebstrap) failed, see $WORK/mmdebstrap-build.log"
    fi
    if [ "$(cat "$OUT/build.rc" 2>/dev/null || echo x)" = 0 ] && ls "$OUT"/nspawn-runner_*.deb >/dev/null 2>&1; then
        pass "dpkg-buildpackage -us -uc -b in a clean trixie chroot, offline ($(( $(date +%s) - tb ))s): $(cd "$OUT" && ls nspawn-runner_*.deb)"
    else
        tail -30 "$OUT/build-dep.log" >&2 || true
        grep -v '^ *Running `' "$OUT/build.log" | tail -60 >&2 || true
        die "dpkg-buildpackage failed, see $OUT/build.log"
    fi
    if grep -qiE 'crates\.io|index\.crates|Downloading crates' "$OUT/build.log"; then
        fail "the build log mentions crates.io"
    else
        pass "no crates.io access in the build log"
    fi
fi

DEB="$(ls "$OUT"/nspawn-runner_*.deb 2>/dev/null | head -n1 || true)"

# --- 2. lintian -----------------------------------------------------------------
if want lintian; then
    [ -f "$OUT/lintian.txt" ] || die "no lintian output (did the build step run?)"
    sed 's/^/  lintian: /' "$OUT/lintian.txt"
    if [ "$(cat "$OUT/lintian.rc")" = 0 ] && ! grep -qE '^[EW]: ' "$OUT/lintian.txt"; then
        pass "lintian: no errors, no warnings ($(grep -c '^[IP]: ' "$OUT/lintian.txt" || true) info/pedantic tags)"
    else
        fail "lintian reports errors or warnings"
    fi
fi

# --- 3. install into a clean trixie system and drive one job ------------------
start_testroot() {
    # The test system gets a private mount namespace of its own, kept alive by
    # a "holder" process, with the test root pivot_root'ed to be its "/" (as on
    # a real host; a plain chroot would make systemd-nspawn stack the machine's
    # root on a directory that is not the namespace's root, and setns() into
    # the machine would then land in the host's root). /proc, /sys, /dev, a
    # fresh /run and the image cache (read-only) are mounted in it. Nothing of
    # it is visible on the host, and all of it vanishes with the namespace.
    rm -f -- "$ROOTFS/tmp/.deb-check-holder"
    unshare --mount --propagation private --fork -- /bin/bash -euc '
        R="$1"
        mount --bind "$R" "$R"
        mount -t proc proc "$R/proc"
        mount --rbind /sys "$R/sys"
        mount --rbind /dev "$R/dev"
        mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
        mkdir -p "$R/mnt/deb-check" "$R/.deb-check-oldroot"
        mount --bind "$2" "$R/mnt/deb-check"
        mount -o remount,bind,ro "$R/mnt/deb-check"
        cd "$R"
        pivot_root . .deb-check-oldroot
        umount -l /.deb-check-oldroot
        rmdir /.deb-check-oldroot
        echo "$$" > /tmp/.deb-check-holder
        exec sleep infinity
    ' holder "$ROOTFS" "$WORK/cache" < /dev/null > "$WORK/holder.log" 2>&1 &
    UNSHARE_PID=$!
    disown "$UNSHARE_PID"
    local i
    for i in $(seq 1 100); do
        [ -s "$ROOTFS/tmp/.deb-check-holder" ] && break
        sleep 0.1
    done
    HOLDER="$(cat "$ROOTFS/tmp/.deb-check-holder" 2>/dev/null || true)"
    [ -n "$HOLDER" ] || { cat "$WORK/holder.log" >&2; die "could not set up the test system's mount namespace"; }
}

in_root() { nsenter --target "$HOLDER" --mount --root --wd -- "$@"; }

file_list() {
    # Every path of the test system except the package manager's own books and
    # the virtual file systems.
    (cd "$ROOTFS" && find . -xdev \
        \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \
           -o -path ./var/lib/apt -o -path ./var/lib/dpkg -o -path ./var/cache/apt \
           -o -path ./var/cache/debconf -o -path ./var/log -o -path ./var/tmp \
           -o -path ./var/cache/ldconfig -o -path ./etc/ld.so.cache \) -prune \
        -o -print | LC_ALL=C sort)
}

# The job script, written as gitlab-runner >= 19.1 writes it: write_script FILE BODY.
# shellcheck source=/dev/null
. "$SRC/contrib/gitlab-script.sh"
write_script() { gitlab_script "$@"; }

# Run one executable of the custom executor inside the test system the way
# gitlab-runner does: fork/exec, cwd = TMPDIR, stdin /dev/null, the runner's
# environment + TMPDIR/BUILD_*_EXIT_CODE/JOB_RESPONSE_FILE + CUSTOM_ENV_*.
JOB_TMP=/tmp/custom-executor1234567
PROJECT_DIR=/builds/group/project
set_job_env() {
    # set_job_env JOB_ID IMAGE: the environment gitlab-runner gives the stages
    stage_env=(
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8
        TMPDIR="$JOB_TMP"
        BUILD_FAILURE_EXIT_CODE=1
        SYSTEM_FAILURE_EXIT_CODE=2
        BUILD_EXIT_CODE_FILE="$JOB_TMP/build_exit_code"
        JOB_RESPONSE_FILE="$JOB_TMP/response.json"
        CUSTOM_ENV_CI_JOB_ID="$1"
        CUSTOM_ENV_CI_JOB_IMAGE="$2"
        CUSTOM_ENV_CI_BUILDS_DIR=/builds
        CUSTOM_ENV_CI_PROJECT_DIR="$PROJECT_DIR"
        CUSTOM_ENV_CI_CONCURRENT_ID=0
        CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID=0
        CUSTOM_ENV_CI_SERVER=yes
        CUSTOM_ENV_CI_JOB_STATUS=running
        CUSTOM_ENV_CI_JOB_SERVICES=
    )
}
stage() {
    # stage NAME ARGS... ; stdout -> $WORK/job/NAME.out, stderr -> NAME.err
    local name="$1"; shift
    local tag="${JOB_KIND:-job}-${STAGE_TAG:-$name}"
    set +e
    env -i "${stage_env[@]}" nsenter --target "$HOLDER" --mount --root --wd -- env -C "$JOB_TMP" "/usr/lib/nspawn-runner/$name" "$@" \
        < /dev/null > "$WORK/job/$tag.out" 2> "$WORK/job/$tag.err"
    local rc=$?
    set -e
    sed "s/^/  [$tag stdout] /" "$WORK/job/$tag.out"
    sed "s/^/  [$tag stderr] /" "$WORK/job/$tag.err"
    return "$rc"
}
run_stage() {
    # run_stage STAGE BODY EXPECTED_RC
    local st="$1" body="$2" want_rc="$3" n rc=0
    n=$(( ${RUN_N:-0} + 1 )); RUN_N=$n
    local dir="$ROOTFS$JOB_TMP/script$n"
    mkdir -p "$dir"
    write_script "$dir/script" "test -e /etc/deb-check-image || { echo 'deb-check: not inside the job machine, refusing to run' >&2; exit 3; }
$body"
    STAGE_TAG="run-$n-$st" stage run "$JOB_TMP/script$n/script" "$st" || rc=$?
    if [ "$rc" = "$want_rc" ]; then
        pass "[$JOB_KIND] run $st exited $rc as expected"
    else
        fail "[$JOB_KIND] run $st exited $rc, expected $want_rc"
    fi
}

if want job || want purge; then
    [ -n "$DEB" ] && [ -f "$DEB" ] || die "no .deb in $OUT (run the build step first)"
    mkdir -p "$WORK/job"
    rm -f -- "$WORK/job"/*

    wait_systems
    start_testroot
    cp -- "$DEB" "$ROOTFS/tmp/"
    DEB_IN="/tmp/$(basename "$DEB")"

    file_list > "$WORK/files-before.txt"

    log "apt-get install $DEB_IN"
    in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1"' sh "$DEB_IN" \
        > "$WORK/apt-install.log" 2>&1 || { tail -30 "$WORK/apt-install.log" >&2; die "apt-get install of the .deb failed"; }
    pass "apt-get install ./$(basename "$DEB") into a clean trixie system"

    # What the package must have put in place.
    [ -x "$ROOTFS/usr/bin/nspawn-runner" ] && pass "/usr/bin/nspawn-runner installed" || fail "/usr/bin/nspawn-runner missing"
    for s in config prepare run cleanup; do
        l="$ROOTFS/usr/lib/nspawn-runner/$s"
        if [ -L "$l" ] && [ "$(in_root readlink -f "/usr/lib/nspawn-runner/$s")" = /usr/bin/nspawn-runner ]; then
            pass "/usr/lib/nspawn-runner/$s -> /usr/bin/nspawn-runner"
        else
            fail "/usr/lib/nspawn-runner/$s is not a link to /usr/bin/nspawn-runner"
        fi
    done
    perm="$(stat -c '%a %U:%G' "$ROOTFS/var/lib/nspawn-runner" 2>/dev/null || echo missing)"
    [ "$perm" = "700 root:root" ] && pass "/var/lib/nspawn-runner is 0700 root:root" || fail "/var/lib/nspawn-runner is '$perm', expected '700 root:root'"
    perm="$(in_root stat -c "%a %U:%G" /run/nspawn-runner 2>/dev/null || echo missing)"
    [ "$perm" = "700 root:root" ] && pass "/run/nspawn-runner created by tmpfiles.d, 0700 root:root" || fail "/run/nspawn-runner is '$perm', expected '700 root:root'"
    for f in usr/lib/systemd/system/nspawn-runner-maintenance.service usr/lib/systemd/system/nspawn-runner-maintenance.timer \
             usr/lib/systemd/system/nspawn-runner-gc.service usr/lib/systemd/system/nspawn-runner-gc.timer \
             usr/lib/tmpfiles.d/nspawn-runner.conf usr/share/man/man1/nspawn-runner.1.gz \
             usr/share/doc/nspawn-runner/examples/config.toml.example \
             usr/share/doc/nspawn-runner/examples/hooks/example.d/10-apt-upgrade \
             usr/share/doc/nspawn-runner/examples/ansible/example.yaml; do
        [ -e "$ROOTFS/$f" ] && pass "/$f shipped" || fail "/$f missing"
    done
    [ -x "$ROOTFS/usr/share/doc/nspawn-runner/examples/hooks/example.d/10-apt-upgrade" ] \
        && pass "example hook is executable" || fail "example hook is not executable"
    [ -L "$ROOTFS/etc/systemd/system/timers.target.wants/nspawn-runner-maintenance.timer" ] \
        && pass "maintenance timer enabled" || fail "maintenance timer not enabled"
    [ -L "$ROOTFS/etc/systemd/system/timers.target.wants/nspawn-runner-gc.timer" ] \
        && pass "gc timer enabled" || fail "gc timer not enabled"
    if in_root man -w nspawn-runner >/dev/null 2>&1 || [ -e "$ROOTFS/usr/share/man/man1/nspawn-runner.1.gz" ]; then
        if zcat "$ROOTFS/usr/share/man/man1/nspawn-runner.1.gz" | grep -q '^\.SH'; then pass "man page has sections"; else fail "man page is empty"; fi
    fi
fi

store_ls() { in_root sh -c 'ls -A "$1" 2>/dev/null' sh "$1"; }

# drive_job KIND JOB_ID: import the image into the store as it is now, then one
# job through config, prepare, five run stages, cleanup (twice), and checks
# that nothing of it is left.
drive_job() {
    JOB_KIND="$1"
    local id="$2" S=/var/lib/nspawn-runner cur rc tj tp
    RUN_N=0
    log "[$JOB_KIND] nspawn-runner image import $IMAGE_NAME /mnt/deb-check/$(basename "$IMG_TAR")"
    if in_root nspawn-runner image import "$IMAGE_NAME" "/mnt/deb-check/$(basename "$IMG_TAR")" > "$WORK/job/$JOB_KIND-import.log" 2>&1; then
        pass "[$JOB_KIND] nspawn-runner image import $IMAGE_NAME"
    else
        sed 's/^/  [import] /' "$WORK/job/$JOB_KIND-import.log"
        fail "[$JOB_KIND] nspawn-runner image import failed"
        return 0
    fi
    cur="$(in_root readlink "$S/$IMAGE_NAME/current" || true)"
    if [[ "$cur" =~ ^[0-9]+_[0-9]+$ ]] && in_root test -d "$S/$IMAGE_NAME/$cur/etc"; then
        pass "[$JOB_KIND] store: $IMAGE_NAME/current -> $cur"
    else
        fail "[$JOB_KIND] store: $IMAGE_NAME/current is '$cur'"
    fi
    in_root nspawn-runner image list > "$WORK/job/$JOB_KIND-image-list.log" 2>&1 && grep -q "$IMAGE_NAME" "$WORK/job/$JOB_KIND-image-list.log" \
        && pass "[$JOB_KIND] nspawn-runner image list shows $IMAGE_NAME" || fail "[$JOB_KIND] nspawn-runner image list does not show $IMAGE_NAME"

    rm -rf -- "${ROOTFS:?}$JOB_TMP"
    mkdir -p "$ROOTFS$JOB_TMP"
    chmod 0700 "$ROOTFS$JOB_TMP"
    printf '{"id": %s, "job_info": {"name": "deb-check", "project_id": 7}}\n' "$id" > "$ROOTFS$JOB_TMP/response.json"
    chmod 0600 "$ROOTFS$JOB_TMP/response.json"
    set_job_env "$id" "$IMAGE_NAME"

    tj="$(date +%s)"
    # config_exec
    if stage config; then
        if [ ! -s "$WORK/job/$JOB_KIND-config.out" ] || python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert isinstance(d, dict); [isinstance(v,str) or (_ for _ in ()).throw(SystemExit("non-string "+k)) for k,v in d.items() if k in ("builds_dir","cache_dir","hostname","shell")]' "$WORK/job/$JOB_KIND-config.out"; then
            pass "[$JOB_KIND] config exited 0 with valid config JSON"
        else
            fail "[$JOB_KIND] config printed invalid JSON"
        fi
    else
        fail "[$JOB_KIND] config exited non-zero"
    fi
    # prepare_exec
    tp="$(date +%s)"
    if stage prepare; then
        pass "[$JOB_KIND] prepare exited 0 ($(( $(date +%s) - tp ))s)"
        # run_exec, stage by stage, as gitlab-runner does for a job with
        # GIT_STRATEGY=none and an after_script.
        run_stage prepare_script 'echo "Running on $(hostname)..."
rm "-f" "/builds/group/project.tmp/gitlab_runner_env"' 0
        run_stage get_sources "export CI_JOB_ID=$id"'
export CI_PROJECT_DIR=/builds/group/project
mkdir -p "/builds/group/project"
echo "Skipping Git repository setup"' 0
        run_stage build_script "export CI_JOB_ID=$id"'
export CI_PROJECT_DIR=/builds/group/project
cd "/builds/group/project"
echo $'"'"'\e[32;1m$ uname -a\e[0;m'"'"'
uname -a
test "$(id -u)" = 0
grep -q "VERSION_CODENAME=bookworm" /etc/os-release
test ! -e "/tmp/custom-executor1234567/response.json"
test "${TMPDIR:-unset}" != "/tmp/custom-executor1234567"
echo "built by job $CI_JOB_ID" > "$CI_PROJECT_DIR/artifact.txt"
echo marker > /etc/deb-check-marker
echo "pid1=$(cat /proc/1/comm)"
echo "root=$(stat -L -c %d:%i /) pid1root=$(stat -L -c %d:%i /proc/1/root)"
echo "system=$(timeout 60 systemctl is-system-running --wait 2>&1 || true)"
echo "deb-check build ok"' 0
        run_stage after_script 'cd "/builds/group/project"
echo "Running after script..."
grep -q "built by job '"$id"'" artifact.txt' 0
        run_stage step_fail 'cd "/builds/group/project"
echo "this step fails with 3"
false || exit 3' 1
        if grep -qx 'pid1=systemd' "$WORK"/job/"$JOB_KIND"-run-*-build_script.out; then
            pass "[$JOB_KIND] the job runs in a booted machine (PID 1 is systemd)"
        else
            fail "[$JOB_KIND] PID 1 in the job's machine is not systemd"
        fi
        # Informational: whether systemctl in a job sees the machine's systemd
        # (jobs that start services need that).
        printf 'INFO: [%s] systemctl is-system-running in the job: %s\n' "$JOB_KIND" \
            "$(sed -n 's/^system=//p' "$WORK"/job/"$JOB_KIND"-run-*-build_script.out | tr '\n' ' ')"
        if grep -q 'deb-check build ok' "$WORK"/job/"$JOB_KIND"-run-*-build_script.out; then
            pass "[$JOB_KIND] build_script output streamed to stdout"
        else
            fail "[$JOB_KIND] build_script output not seen on stdout"
        fi
    else
        fail "[$JOB_KIND] prepare exited non-zero"
    fi
    # cleanup_exec: always, and idempotent
    if stage cleanup; then pass "[$JOB_KIND] cleanup exited 0"; else fail "[$JOB_KIND] cleanup exited non-zero"; fi
    STAGE_TAG=cleanup-again stage cleanup && pass "[$JOB_KIND] cleanup again exited 0 (idempotent)" || fail "[$JOB_KIND] second cleanup exited non-zero"
    pass "[$JOB_KIND] whole job took $(( $(date +%s) - tj ))s"

    # Nothing of the job must survive.
    ! in_root test -e "$S/$IMAGE_NAME/$cur/etc/deb-check-marker" && pass "[$JOB_KIND] image unchanged by the job" || fail "[$JOB_KIND] the job wrote into the image"
    store_mounts="$(in_root cat /proc/self/mountinfo | awk -v s="$S" '$5 ~ "^" s "/" {print $5}' | tr '\n' ' ')"
    if [ -n "$store_mounts" ]; then
        fail "[$JOB_KIND] mounts left in the store: $store_mounts"
    else
        pass "[$JOB_KIND] no mounts left in the store"
    fi
    left="$(ns_procs | tr '\n' ' ')"
    [ -z "$left" ] && pass "[$JOB_KIND] no machine process left" || fail "[$JOB_KIND] processes left in the test system: $left"
    if [ -n "$(store_ls /run/nspawn-runner)" ]; then
        fail "[$JOB_KIND] state left in /run/nspawn-runner: $(store_ls /run/nspawn-runner | tr '\n' ' ')"
    else
        pass "[$JOB_KIND] no job state left in /run/nspawn-runner"
    fi
    if store_ls "$S/$IMAGE_NAME" | grep -q '^\.#machine' || [ -n "$(store_ls "$S/.jobs")" ]; then
        fail "[$JOB_KIND] job leftovers in the store: $(store_ls "$S/$IMAGE_NAME" | tr '\n' ' ') / $(store_ls "$S/.jobs" | tr '\n' ' ')"
    else
        pass "[$JOB_KIND] no job leftovers in the store"
    fi
    # A job for an image that does not exist is a system failure (exit 2).
    set_job_env "$(( id + 1 ))" no-such-image
    rc=0; STAGE_TAG=prepare-missing-image stage prepare || rc=$?
    [ "$rc" = 2 ] && pass "[$JOB_KIND] prepare with a missing image exits 2 (system failure)" || fail "[$JOB_KIND] prepare with a missing image exited $rc, expected 2"
    STAGE_TAG=cleanup-missing-image stage cleanup || true
}

if want job; then
    # 1. the store as the package made it: a directory on the test system's
    #    file system (ext4 or whatever the work dir is on): overlay jobs.
    drive_job plain "$JOB_ID"

    # 2. the store on btrfs (what btrfs-progs is recommended for): a
    #    loop-mounted btrfs file system on /var/lib/nspawn-runner, mounted in
    #    the test system's namespace only; ephemeral snapshots for jobs.
    if [ "${DEB_CHECK_BTRFS:-1}" = 1 ]; then
        log "[btrfs] making a loop-mounted btrfs store"
        in_root sh -ec '
            truncate -s 3G /var/tmp/deb-check-store.btrfs
            mkfs.btrfs -q /var/tmp/deb-check-store.btrfs
            mount -o loop /var/tmp/deb-check-store.btrfs /var/lib/nspawn-runner
            chmod 0700 /var/lib/nspawn-runner' > "$WORK/job/btrfs-setup.log" 2>&1 \
            && BTRFS_OK=1 || BTRFS_OK=0
        if [ "$BTRFS_OK" = 1 ]; then
            drive_job btrfs "$(( JOB_ID + 10 ))"
            if in_root sh -ec 'umount /var/lib/nspawn-runner && rm -f /var/tmp/deb-check-store.btrfs' >> "$WORK/job/btrfs-setup.log" 2>&1; then
                pass "[btrfs] btrfs store unmounted"
            else
                sed 's/^/  [btrfs] /' "$WORK/job/btrfs-setup.log"
                fail "[btrfs] could not unmount the btrfs store (busy?)"
            fi
        else
            sed 's/^/  [btrfs] /' "$WORK/job/btrfs-setup.log"
            fail "[btrfs] could not make a loop-mounted btrfs store (set DEB_CHECK_BTRFS=0 where loop devices are missing)"
        fi
    fi
fi

# --- 4. purge -------------------------------------------------------------------
if want purge; then
    # The upgrade path (same version: preinst/prerm/postrm "upgrade",
    # postinst "configure OLD"): the store and a changed conffile survive.
    echo "# changed by deb-check" >> "$ROOTFS/etc/nspawn-runner/settings"
    images_before="$(store_ls /var/lib/nspawn-runner | { grep -v '^\.' || true; } | tr '\n' ' ')"
    log "apt-get install --reinstall (upgrade path), then apt-get remove"
    if in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall --no-install-recommends "$1"' sh "$DEB_IN" \
        > "$WORK/apt-reinstall.log" 2>&1; then
        pass "apt-get install --reinstall (maintainer scripts' upgrade path)"
    else
        tail -20 "$WORK/apt-reinstall.log" >&2; fail "apt-get install --reinstall failed"
    fi
    grep -q '^# changed by deb-check' "$ROOTFS/etc/nspawn-runner/settings" \
        && pass "the changed conffile /etc/nspawn-runner/settings is kept" || fail "the changed conffile was replaced"
    [ "$(store_ls /var/lib/nspawn-runner | { grep -v '^\.' || true; } | tr '\n' ' ')" = "$images_before" ] \
        && pass "the image store survives the upgrade (${images_before:-empty})" || fail "the image store changed in the upgrade"
    # remove keeps the store and the conffile; purge takes them.
    if in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get remove -y -q nspawn-runner' > "$WORK/apt-remove.log" 2>&1; then
        pass "apt-get remove nspawn-runner"
    else
        tail -20 "$WORK/apt-remove.log" >&2; fail "apt-get remove failed"
    fi
    st="$(in_root dpkg-query -W -f '${db:Status-Status}' nspawn-runner 2>/dev/null || echo not-installed)"
    [ "$st" = config-files ] && pass "dpkg: nspawn-runner config-files after remove" || fail "dpkg status after remove: $st"
    [ ! -e "$ROOTFS/usr/bin/nspawn-runner" ] && [ ! -e "$ROOTFS/usr/lib/nspawn-runner" ] \
        && pass "remove took the binary and the stage links" || fail "remove left the binary or the stage links"
    [ "$(store_ls /var/lib/nspawn-runner | { grep -v '^\.' || true; } | tr '\n' ' ')" = "$images_before" ] \
        && pass "remove keeps the image store" || fail "remove changed the image store"

    log "apt-get purge nspawn-runner"
    in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q nspawn-runner' > "$WORK/apt-purge.log" 2>&1 \
        && pass "apt-get purge nspawn-runner" || { tail -20 "$WORK/apt-purge.log" >&2; fail "apt-get purge failed"; }
    st="$(in_root dpkg-query -W -f '${db:Status-Status}' nspawn-runner 2>/dev/null || echo not-installed)"
    [ "$st" = not-installed ] && pass "dpkg: nspawn-runner not-installed (no config-files left)" || fail "dpkg status after purge: $st"
    file_list > "$WORK/files-after.txt"
    if diff -u "$WORK/files-before.txt" "$WORK/files-after.txt" > "$WORK/files.diff"; then
        pass "after purge the file system is as before the install"
    else
        sed 's/^/  /' "$WORK/files.diff"
        fail "files left or lost by install+purge (see above)"
    fi
    ! in_root test -e /run/nspawn-runner && pass "/run/nspawn-runner removed" || fail "/run/nspawn-runner left"

    # Purge with the store on a btrfs file system that is still mounted (the
    # quickstart's layout): snapshots are subvolumes, one with a nested one.
    if [ "${DEB_CHECK_BTRFS:-1}" = 1 ]; then
        log "[btrfs] install again, purge with a mounted btrfs store"
        if in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1"' sh "$DEB_IN" \
            > "$WORK/apt-install-btrfs.log" 2>&1 \
            && in_root sh -ec '
                truncate -s 1G /var/tmp/deb-check-purge.btrfs
                mkfs.btrfs -q /var/tmp/deb-check-purge.btrfs
                mount -o loop /var/tmp/deb-check-purge.btrfs /var/lib/nspawn-runner
                mkdir /var/lib/nspawn-runner/img
                btrfs -q subvolume create /var/lib/nspawn-runner/img/1_1
                mkdir -p /var/lib/nspawn-runner/img/1_1/var/lib
                btrfs -q subvolume create /var/lib/nspawn-runner/img/1_1/var/lib/machines
                ln -s 1_1 /var/lib/nspawn-runner/img/current' > "$WORK/btrfs-purge-setup.log" 2>&1; then
            in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q nspawn-runner' > "$WORK/apt-purge-btrfs.log" 2>&1 \
                && pass "[btrfs] apt-get purge with a mounted btrfs store" \
                || { tail -20 "$WORK/apt-purge-btrfs.log" >&2; fail "[btrfs] apt-get purge failed with a mounted btrfs store"; }
            [ -z "$(in_root ls -A /var/lib/nspawn-runner)" ] \
                && pass "[btrfs] purge emptied the mounted store (subvolumes deleted)" || fail "[btrfs] purge left files in the mounted store"
            grep -q 'left mounted' "$WORK/apt-purge-btrfs.log" \
                && pass "[btrfs] purge says it left the store mounted" || fail "[btrfs] purge did not say the store stays mounted"
            in_root sh -c 'umount /var/lib/nspawn-runner && rm -f /var/tmp/deb-check-purge.btrfs && rmdir /var/lib/nspawn-runner 2>/dev/null; true'
        else
            cat "$WORK/btrfs-purge-setup.log" >&2
            fail "[btrfs] could not set up the purge case"
        fi
    fi
fi

stop_testroot
umount_under "$ROOTFS"
log "done in $(( $(date +%s) - T0 ))s"
if [ "$FAILED" = 0 ]; then
    echo "PASS: deb-check ($(( $(date +%s) - T0 ))s)"
else
    echo "FAIL: deb-check ($(( $(date +%s) - T0 ))s)"
    exit 1
fi
