//! gitlab-runner's bash wrapper around a stage script, as it writes the files `run` gets (protocol
//! doc §6): for the tests, the benchmarks and anyone driving the stages by hand.

/// The v19.1+ wrapper around `body`.
pub fn bash_wrapper(body: &str) -> String {
    format!(
        "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\n\
         set +o noclobber\n(trap 'exit 1' TERM; eval {}) < /dev/null\nexit 0\n",
        ansi_c_quote(body)
    )
}

/// Bash ANSI-C quoting (`$'...'`), like gitlab-runner's ShellEscape.
pub fn ansi_c_quote(s: &str) -> String {
    let mut o = String::from("$'");
    for b in s.bytes() {
        match b {
            b'\\' => o.push_str("\\\\"),
            b'\'' => o.push_str("\\'"),
            b'\n' => o.push_str("\\n"),
            b'\t' => o.push_str("\\t"),
            b'\r' => o.push_str("\\r"),
            0x07 => o.push_str("\\a"),
            0x08 => o.push_str("\\b"),
            0x0b => o.push_str("\\v"),
            0x0c => o.push_str("\\f"),
            0x1b => o.push_str("\\e"),
            0x20..=0x7e => o.push(b as char),
            _ => o.push_str(&format!("\\x{b:02x}")),
        }
    }
    o.push('\'');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_quoted_for_eval() {
        assert_eq!(ansi_c_quote("echo 'a'\n\x1b"), "$'echo \\'a\\'\\n\\e'");
        assert!(bash_wrapper("true").contains("(trap 'exit 1' TERM; eval $'true') < /dev/null\nexit 0\n"));
    }
}
