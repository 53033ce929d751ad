//! The backend for any filesystem: full (reflink where possible) copies and overlay job roots.

use super::{Backend, JobRoot};
use crate::error::{Context, Error, Result};
use std::path::Path;
use std::process::Command;

pub struct Plain;

/// Copies the tree `source` to `dest` (which may exist already, as an empty directory).
/// cp knows every corner of copying an OS tree (hard links, xattrs, ACLs, devices, sparse
/// files) and uses reflinks where the filesystem has them (btrfs, XFS, bcachefs).
pub fn copy_tree(source: &Path, dest: &Path) -> Result<()> {
    let mut command = Command::new("cp");
    command.args(["-a", "--reflink=auto", "--no-target-directory"]).arg(source).arg(dest);
    crate::signals::terminate_with_parent(&mut command);
    let status = command.status().context("running cp")?;
    if !status.success() {
        return Err(Error::new(format!("copying {} to {} failed ({status})", source.display(), dest.display())));
    }
    Ok(())
}

impl Backend for Plain {
    fn name(&self) -> &'static str {
        "plain"
    }

    fn create_empty(&self, path: &Path) -> Result<()> {
        std::fs::create_dir(path).with_context(|| format!("creating {}", path.display()))
    }

    fn snapshot(&self, source: &Path, dest: &Path) -> Result<()> {
        copy_tree(source, dest).inspect_err(|_| {
            // A partial copy is never left behind (e.g. after ENOSPC).
            let _ = self.delete(dest);
        })
    }

    fn delete(&self, path: &Path) -> Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.with_context(|| format!("removing {}", path.display())),
        }
    }

    fn job_root(&self) -> JobRoot {
        // `--ephemeral` would make a full copy here; an overlay costs nothing up front.
        JobRoot::Overlay
    }

    fn make_durable(&self, dir: &Path) -> Result<()> {
        // Journaling file systems make a directory's entries durable with it, and whatever
        // was unlinked below a removed entry goes with that entry.
        crate::store::fsync_dir(dir)
    }
}
