//! Log and error lines on stderr: the `nspawn-runner:` prefix, and journald priorities
//! (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) when stderr is the journal.

use log::Level;

/// True when stderr is the journal stream systemd gave this service (`JOURNAL_STREAM` names
/// its device and inode). A stage's stderr is gitlab-runner's pipe, which gets no prefixes.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var("JOURNAL_STREAM").ok() else { return false };
    let Some((dev, ino)) = stream.split_once(':') else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The line to print for `message` at `level`.
pub fn line(level: Level, message: impl std::fmt::Display) -> String {
    line_for(stderr_is_journal(), level, message)
}

fn line_for(journal: bool, level: Level, message: impl std::fmt::Display) -> String {
    if journal {
        format!("<{}>nspawn-runner: {message}", priority(level))
    } else {
        format!("nspawn-runner: {message}")
    }
}

/// Sets up the logger with `filter` (`debug`, `info`, `warn`, `error`, or env_logger's syntax).
pub fn init(filter: &str) {
    let journal = stderr_is_journal();
    env_logger::Builder::new()
        .parse_filters(filter)
        .format(move |out, record| {
            use std::io::Write;
            writeln!(out, "{}", line_for(journal, record.level(), record.args()))
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_priorities() {
        assert_eq!(line_for(true, Level::Error, "x"), "<3>nspawn-runner: x");
        assert_eq!(line_for(true, Level::Warn, "x"), "<4>nspawn-runner: x");
        assert_eq!(line_for(true, Level::Info, "x"), "<6>nspawn-runner: x");
        assert_eq!(line_for(false, Level::Error, "x"), "nspawn-runner: x");
    }
}
