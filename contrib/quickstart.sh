#!/usr/bin/env bash
# nspawn-runner quick start, as root on a Debian host:
#   installs what is needed, builds nspawn-runner, sets up an image store if there is none
#   (a loop-mounted btrfs file system at /var/lib/nspawn-runner and a fresh Debian image),
#   then runs a demo job through the four stage symlinks exactly the way gitlab-runner does.
# Settings: NSPAWN_RUNNER_ROOT (default /var/lib/nspawn-runner), NSPAWN_RUNNER_SUITE (image
# suite, default bookworm here), DEMO_STORE_SIZE (default 8G), DEMO_IMAGE (default "default").
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=${NSPAWN_RUNNER_ROOT:-/var/lib/nspawn-runner}
suite=${NSPAWN_RUNNER_SUITE:-bookworm}
image=${DEMO_IMAGE:-default}
store_size=${DEMO_STORE_SIZE:-8G}

say() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "run me as root" >&2; exit 1; }

say "installing packages"
"$here/contrib/install-deps.sh"

say "building nspawn-runner"
cargo build --release --manifest-path "$here/Cargo.toml"
bin="$here/target/release/nspawn-runner"
links=$(mktemp -d /tmp/nspawn-runner-links.XXXXXX)
"$bin" install-links "$links" >/dev/null

if [ ! -e "$root" ] || [ -z "$(ls -A "$root" 2>/dev/null)" ]; then
    if [ "$(stat -f -c %T "$(dirname "$root")")" != btrfs ]; then
        say "no image store yet: making a ${store_size} btrfs file system at $root (loop mounted)"
        img="$root.img"
        [ -e "$img" ] || { truncate -s "$store_size" "$img"; mkfs.btrfs -q "$img"; }
        mkdir -p "$root"
        mountpoint -q "$root" || mount -o loop "$img" "$root"
        chmod 700 "$root"
        echo "(to keep it across reboots: echo '$img $root btrfs loop 0 0' >> /etc/fstab)"
    fi
fi
export NSPAWN_RUNNER_ROOT="$root"

if ! "$bin" image list "$image" >/dev/null 2>&1; then
    say "creating image '$image' ($suite) with mmdebstrap"
    "$bin" image create "$image" --suite "$suite"
fi
"$bin" image list "$image"

# A demo job, driven like gitlab-runner drives a custom executor: a temporary directory as
# cwd, the job's variables as CUSTOM_ENV_*, one script file per stage.
job_id=demo-$$
work=$(mktemp -d /tmp/custom-executor.XXXXXX)
trap 'CUSTOM_ENV_CI_JOB_ID=$job_id "$links/cleanup" >/dev/null 2>&1 || true; rm -rf "$work" "$links"' EXIT
export TMPDIR="$work" BUILD_FAILURE_EXIT_CODE=1 SYSTEM_FAILURE_EXIT_CODE=2
# The job payload gitlab-runner writes: its project id chooses the job's /cache.
export JOB_RESPONSE_FILE="$work/response.json" BUILD_EXIT_CODE_FILE="$work/build_exit_code"
printf '{"id": 1, "job_info": {"name": "demo", "project_id": 1}}\n' > "$JOB_RESPONSE_FILE"
chmod 0600 "$JOB_RESPONSE_FILE"
export CUSTOM_ENV_CI_JOB_ID="$job_id" CUSTOM_ENV_CI_JOB_IMAGE="$image"
export CUSTOM_ENV_CI_BUILDS_DIR="" CUSTOM_ENV_CI_PROJECT_DIR=""

# The body of one stage wrapped as gitlab-runner (>= 19.1) writes it.
# shellcheck source=/dev/null
. "$here/contrib/gitlab-script.sh"
write_script() {
    local dir="$work/script$1"
    mkdir -p "$dir"
    gitlab_script "$dir/script" "$2"
    echo "$dir/script"
}

cd "$work"
say "config"
"$links/config"
say "prepare"
time "$links/prepare"
n=0
run_stage() {
    local stage=$1 body=$2
    n=$((n + 1))
    say "run $stage"
    "$links/run" "$(write_script "$n" "$body")" "$stage"
}
run_stage prepare_script 'echo "Running on $(hostname) via $(cat /etc/debian_version)..."'
run_stage get_sources 'mkdir -p /builds/demo/project && cd /builds/demo/project && echo "int main(void){return 0;}" > main.c && echo "sources ready"'
run_stage build_script 'cd /builds/demo/project && ls -l && systemctl is-system-running || true; echo "the job ran in a real systemd machine"'
run_stage after_script 'echo "after_script sees $(ls /builds/demo/project)"; date > /cache/last-demo-run && echo "the project cache /cache is writable"'
say "cleanup"
time "$links/cleanup"
trap 'rm -rf "$work" "$links"' EXIT
say "demo job passed; machine and overlays are gone: $("$bin" status)"
