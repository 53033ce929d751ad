//! An exclusive flock held for the life of a value: how test and bench binaries running at the
//! same time share target/nspawn-runner-test/ (the base image, the btrfs file system).
//! Included by tests/common and benches/common.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

pub struct FileLock(fs::File);

impl FileLock {
    pub fn exclusive(path: &Path) -> FileLock {
        let f = fs::OpenOptions::new().create(true).write(true).truncate(false).open(path).unwrap();
        // SAFETY: flock on a valid open fd.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock {}", path.display());
        FileLock(f)
    }
}
