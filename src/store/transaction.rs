//! Transactions on an image: work in a new snapshot, then switch `current` atomically or throw it away.

use super::{backend, Image, PENDING_PREFIX};
use crate::error::{Context, Result};
use crate::lock::Lock;
use crate::names::SnapshotName;
use log::info;
use std::path::{Path, PathBuf};

/// What a transaction's new snapshot starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A copy of the snapshot `current` points to.
    Current,
    /// An empty tree (image creation, or a rebuild from scratch).
    Empty,
}

/// A change to an image in progress. Dropping it without `commit` throws the work away.
pub struct Transaction<'i> {
    image: &'i Image<'i>,
    _lock: Lock,
    name: SnapshotName,
    pending: PathBuf,
    finished: bool,
}

impl<'i> Transaction<'i> {
    /// Takes the image's transaction lock and makes the new snapshot to work in.
    pub fn begin(image: &'i Image<'i>, base: Base) -> Result<Transaction<'i>> {
        let lock = image.lock_transactions()?;
        let name = unique_name(image);
        let pending = image.dir().join(format!("{PENDING_PREFIX}{name}"));
        let store_backend = image.store().backend();
        match base {
            Base::Current => {
                let current = image.current()?;
                info!("image {}: snapshotting {} for maintenance", image.name(), current);
                store_backend.snapshot(&image.snapshot_path(&current), &pending)?;
            }
            Base::Empty => store_backend.create_empty(&pending)?,
        }
        Ok(Transaction { image, _lock: lock, name, pending, finished: false })
    }

    /// The tree to work in.
    pub fn tree(&self) -> &Path {
        &self.pending
    }

    /// The snapshot name the tree gets when it commits.
    pub fn name(&self) -> &SnapshotName {
        &self.name
    }

    pub fn image(&self) -> &Image<'i> {
        self.image
    }

    /// Makes the work durable and puts it in production. Jobs already running keep their snapshot.
    pub fn commit(mut self) -> Result<SnapshotName> {
        let image = self.image;
        // Everything the work wrote must be on disk before anything points at it.
        backend::sync_filesystem(&self.pending)?;
        let final_path = image.snapshot_path(&self.name);
        std::fs::rename(&self.pending, &final_path)
            .with_context(|| format!("renaming {} to {}", self.pending.display(), final_path.display()))?;
        self.finished = true;
        // No fsync between the two renames: both are in the same directory, and journaled
        // filesystems (btrfs, ext4, XFS) never make the later one durable without the earlier
        // one, so `current` cannot survive a crash pointing at a name that did not. The fsync
        // in switch_current makes both durable at once (each fsync costs a btrfs commit).
        image.switch_current(&self.name)?;
        info!("image {}: {} is now current", image.name(), self.name);
        Ok(self.name.clone())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            info!("image {}: discarding {}", self.image.name(), self.pending.display());
            if let Err(e) = self.image.store().backend().delete(&self.pending) {
                // gc removes it later: pending trees never become current.
                log::warn!("could not discard {}: {e}", self.pending.display());
            }
        }
    }
}

/// A snapshot name not used yet in the image (two commits within a second by one pid differ).
fn unique_name(image: &Image) -> SnapshotName {
    let now = SnapshotName::now();
    let mut time = now.time();
    loop {
        let candidate = SnapshotName::new(time, std::process::id());
        let taken = image.snapshot_path(&candidate).exists()
            || image.dir().join(format!("{PENDING_PREFIX}{candidate}")).exists();
        if !taken {
            return candidate;
        }
        time += 1;
    }
}
