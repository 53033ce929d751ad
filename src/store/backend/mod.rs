//! Snapshot backends: how a store makes, copies and deletes image trees (btrfs or plain directories).

mod btrfs;
pub mod plain;

use crate::error::{Context, Result};
use std::path::Path;

pub use btrfs::Btrfs;
pub use plain::Plain;

/// What differs between a btrfs store and any other filesystem.
pub trait Backend {
    /// Short name shown to users ("btrfs", "plain").
    fn name(&self) -> &'static str;
    /// Creates an empty tree at `path` (a subvolume on btrfs).
    fn create_empty(&self, path: &Path) -> Result<()>;
    /// Makes `dest` a writable copy of `source` (a CoW snapshot on btrfs, a reflink-or-copy elsewhere).
    fn snapshot(&self, source: &Path, dest: &Path) -> Result<()>;
    /// Deletes the tree at `path`, including nested subvolumes; a missing path is not an error.
    fn delete(&self, path: &Path) -> Result<()>;
    /// How a job gets a throw-away root on top of a snapshot.
    fn job_root(&self) -> JobRoot;
    /// Makes the renames and deletions of entries of `dir` survive a crash (a power cut must
    /// not bring back what gc reported deleted).
    fn make_durable(&self, dir: &Path) -> Result<()>;
}

/// The way a job's writes are kept away from the snapshot it boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRoot {
    /// `systemd-nspawn --ephemeral`: a CoW snapshot that nspawn makes and removes itself.
    EphemeralSnapshot,
    /// An overlay with the snapshot as lower layer and a per-job upper directory.
    Overlay,
    /// `systemd-nspawn --volatile=overlay`: an overlay whose upper layer is a tmpfs.
    Volatile,
}

/// Picks the backend for the filesystem holding `dir`.
pub fn detect(dir: &Path) -> Result<Box<dyn Backend>> {
    let fs = nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    if fs.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
        Ok(Box::new(Btrfs))
    } else {
        Ok(Box::new(Plain))
    }
}

/// Makes everything written under `dir`'s filesystem durable: nspawn may have run with sync
/// suppressed, and `current` must never point at a tree that a crash could leave half written.
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&file))
        .with_context(|| format!("syncing the filesystem of {}", dir.display()))
}
