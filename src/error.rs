//! The one error type of nspawn-runner: a message with the context chain that led to it.

use std::fmt;

/// What went wrong, and whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The runner's side: bad settings, a missing image, a broken machine, the system.
    System,
    /// The user's job script failed (the only build failure there is).
    Build,
}

/// An error with its context, outermost first when displayed.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A runner-side failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Error { kind: Kind::System, message: message.into() }
    }

    /// The job script failed; `message` says how.
    pub fn build(message: impl Into<String>) -> Self {
        Error { kind: Kind::Build, message: message.into() }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Prefixes the message with what was being done when it happened.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error { kind: self.kind, message: format!("{what}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, always: gitlab-runner shows it as the reason of a system failure.
        f.write_str(&self.message.replace('\n', " "))
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(e.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::new(e.desc())
    }
}

/// Adds context to any fallible result, turning it into our `Result`.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_chains_outermost_first_on_one_line() {
        let r: std::result::Result<(), std::io::Error> =
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "gone\nreally"));
        let e = r.context("reading x").unwrap_err().context("preparing job 5");
        assert_eq!(e.to_string(), "preparing job 5: reading x: gone really");
        assert_eq!(e.kind(), Kind::System);
    }

    #[test]
    fn build_kind_survives_context() {
        let e = Error::build("script exited with 3").context("stage build_script");
        assert_eq!(e.kind(), Kind::Build);
    }
}
