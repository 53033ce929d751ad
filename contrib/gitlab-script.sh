# shellcheck shell=bash
# gitlab-runner's bash wrapper around a stage script (shells/bash.go, v19.1+; protocol doc
# section 6), the body ANSI-C quoted on one line. Sourced by contrib/quickstart.sh,
# tests/vm/guest-suite.sh and .ci/deb-check.sh; the Rust tests and benchmarks get the same text
# from nspawn_runner::jobs::script::bash_wrapper.

# gitlab_ansi_c TEXT: prints TEXT as one bash $'...' word.
gitlab_ansi_c() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\'/\\\'}"
    s="${s//$'\n'/\\n}"
    s="${s//$'\t'/\\t}"
    s="${s//$'\r'/\\r}"
    printf "\$'%s'" "$s"
}

# gitlab_script FILE BODY: writes FILE (mode 0700) that runs BODY as gitlab-runner's would.
gitlab_script() {
    {
        printf '#!/usr/bin/env bash\n\n'
        printf "trap 'exit 1' TERM\n\n"
        # shellcheck disable=SC2016
        printf 'case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit\n'
        printf 'set +o noclobber\n'
        printf "(trap 'exit 1' TERM; eval %s) < /dev/null\n" "$(gitlab_ansi_c "$2")"
        printf 'exit 0\n'
    } > "$1"
    chmod 700 "$1"
}
