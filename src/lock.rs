//! Advisory file locks (flock) with a timeout, for transactions, pinning and per-job work.

use crate::error::{Context, Error, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A held lock; released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
pub struct Lock {
    _flock: Flock<File>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// How often a waiting lock is retried: short enough not to add latency to a job start.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

impl Lock {
    /// Takes the lock on `path` (created if missing), waiting at most `timeout`.
    /// `what` names the lock in the error message.
    pub fn acquire(path: &Path, mode: Mode, timeout: Duration, what: &str) -> Result<Lock> {
        let deadline = Instant::now() + timeout;
        let arg = match mode {
            Mode::Shared => FlockArg::LockSharedNonblock,
            Mode::Exclusive => FlockArg::LockExclusiveNonblock,
        };
        let mut file = open_lock_file(path)?;
        loop {
            match Flock::lock(file, arg) {
                Ok(flock) => return Ok(Lock { _flock: flock }),
                Err((returned, nix::Error::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::new(format!(
                            "{what} is busy: gave up waiting after {} s for {}",
                            timeout.as_secs(),
                            path.display()
                        )));
                    }
                    file = returned;
                    std::thread::sleep(RETRY_INTERVAL);
                }
                Err((_, e)) => return Err(Error::from(e).context(format!("locking {}", path.display()))),
            }
        }
    }

    /// Takes the lock only if nobody holds it; `None` when it is held.
    pub fn try_acquire(path: &Path, mode: Mode) -> Result<Option<Lock>> {
        match Lock::acquire(path, mode, Duration::ZERO, "lock") {
            Ok(lock) => Ok(Some(lock)),
            Err(_) if path.exists() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l");
        let a = Lock::acquire(&path, Mode::Shared, Duration::ZERO, "x").unwrap();
        let b = Lock::acquire(&path, Mode::Shared, Duration::ZERO, "x").unwrap();
        let err = Lock::acquire(&path, Mode::Exclusive, Duration::from_millis(50), "the image").unwrap_err();
        assert!(err.to_string().starts_with("the image is busy"), "{err}");
        assert!(Lock::try_acquire(&path, Mode::Exclusive).unwrap().is_none());
        drop((a, b));
        assert!(Lock::try_acquire(&path, Mode::Exclusive).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
