#!/usr/bin/env bash
# Runs nspawn-runner's tests (unit tests and the integration tests, which boot real
# systemd-nspawn machines on a loop-mounted btrfs store and on a plain store).
# As root on Debian; installs the packages the tests need first. Extra arguments go to
# `cargo test` (e.g. `contrib/test.sh --test stages`).
set -euo pipefail
cd "$(dirname "$0")/.."

"$PWD/contrib/install-deps.sh"

exec cargo test "$@"
