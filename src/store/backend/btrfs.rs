//! The btrfs backend: subvolumes and snapshots through the btrfs ioctls, no btrfs-progs needed.

use super::{Backend, JobRoot};
use crate::error::{Context, Error, Result};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Btrfs;

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
/// Inode number of the root directory of every btrfs subvolume.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// `struct btrfs_ioctl_vol_args` from linux/btrfs.h.
#[repr(C)]
pub struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` from linux/btrfs.h (the unions flattened to their largest member).
#[repr(C)]
pub struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(ioc_subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);
nix::ioctl_read!(ioc_start_sync, BTRFS_IOCTL_MAGIC, 24, u64);
nix::ioctl_write_ptr!(ioc_wait_sync, BTRFS_IOCTL_MAGIC, 22, u64);

/// Splits `path` into an open handle on its parent directory and its last component.
fn parent_and_name(path: &Path) -> Result<(File, &OsStr)> {
    let name = path.file_name().ok_or_else(|| Error::new(format!("{} has no final component", path.display())))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    Ok((dir, name))
}

fn copy_name(dest: &mut [u8], name: &OsStr) -> Result<()> {
    let bytes = name.as_bytes();
    if bytes.len() >= dest.len() || bytes.contains(&0) {
        return Err(Error::new(format!("subvolume name {name:?} is too long or invalid")));
    }
    dest[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

fn vol_args(name: &OsStr) -> Result<Box<VolArgs>> {
    let mut args = Box::new(VolArgs { fd: 0, name: [0; BTRFS_PATH_NAME_MAX + 1] });
    copy_name(&mut args.name, name)?;
    Ok(args)
}

/// True when `path` is the root of a btrfs subvolume.
fn is_subvolume(meta: &std::fs::Metadata) -> bool {
    meta.is_dir() && meta.ino() == BTRFS_FIRST_FREE_OBJECTID
}

/// Subvolumes nested anywhere below `root` (not `root` itself), deepest first.
fn nested_subvolumes(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            if is_subvolume(&meta) {
                found.push(path.clone());
            }
            pending.push(path);
        }
    }
    // Deeper paths have more components; delete children before their parents.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(found)
}

impl Btrfs {
    fn destroy_one(&self, path: &Path) -> nix::Result<()> {
        let (dir, name) = parent_and_name(path).map_err(|_| nix::Error::ENOENT)?;
        let args = vol_args(name).map_err(|_| nix::Error::ENAMETOOLONG)?;
        // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args that outlives the call.
        unsafe { ioc_snap_destroy(dir.as_raw_fd(), &*args) }.map(drop)
    }
}

impl Backend for Btrfs {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn create_empty(&self, path: &Path) -> Result<()> {
        let (dir, name) = parent_and_name(path)?;
        let args = vol_args(name)?;
        // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args that outlives the call.
        unsafe { ioc_subvol_create(dir.as_raw_fd(), &*args) }
            .with_context(|| format!("creating subvolume {}", path.display()))?;
        Ok(())
    }

    fn snapshot(&self, source: &Path, dest: &Path) -> Result<()> {
        let source_meta = std::fs::metadata(source).with_context(|| format!("stat {}", source.display()))?;
        if !is_subvolume(&source_meta) {
            // A plain directory (an old-layout image, a tree to import): a subvolume holding a
            // reflink copy, so later snapshots and ephemeral jobs are cheap again.
            self.create_empty(dest)?;
            return super::plain::copy_tree(source, dest).inspect_err(|_| {
                let _ = self.delete(dest);
            });
        }
        let source_dir = File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let (dest_dir, name) = parent_and_name(dest)?;
        let mut args = Box::new(VolArgsV2 {
            fd: source_dir.as_raw_fd() as i64,
            transid: 0,
            flags: 0,
            unused: [0; 4],
            name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
        });
        copy_name(&mut args.name, name)?;
        // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args_v2 that outlives the call.
        unsafe { ioc_snap_create_v2(dest_dir.as_raw_fd(), &*args) }
            .with_context(|| format!("snapshotting {} to {}", source.display(), dest.display()))?;
        Ok(())
    }

    fn delete(&self, path: &Path) -> Result<()> {
        let meta = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other.with_context(|| format!("stat {}", path.display()))?,
        };
        if meta.file_type().is_symlink() {
            // Never a tree to delete through: only the link goes, as with the plain backend.
            return std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()));
        }
        if !is_subvolume(&meta) {
            // A plain directory on btrfs (e.g. an overlay upper dir, or a tree copied in by hand).
            for nested in nested_subvolumes(path)? {
                self.delete(&nested)?;
            }
            return super::Plain.delete(path);
        }
        match self.destroy_one(path) {
            Ok(()) => Ok(()),
            // systemd creates subvolumes inside images (/var/lib/machines, /var/lib/portables):
            // a subvolume holding others cannot be destroyed until they are gone.
            Err(nix::Error::ENOTEMPTY) => {
                for nested in nested_subvolumes(path)? {
                    self.destroy_one(&nested)
                        .with_context(|| format!("deleting nested subvolume {}", nested.display()))?;
                }
                self.destroy_one(path).with_context(|| format!("deleting subvolume {}", path.display()))
            }
            Err(e) => Err(Error::from(e).context(format!("deleting subvolume {}", path.display()))),
        }
    }

    fn job_root(&self) -> JobRoot {
        JobRoot::EphemeralSnapshot
    }

    fn make_durable(&self, dir: &Path) -> Result<()> {
        // A subvolume deletion is durable once its transaction is committed. Commit the running
        // transaction and wait for it, as `btrfs subvolume delete --commit-after` does: unlike
        // syncfs or BTRFS_IOC_SYNC, this writes no file data (of running jobs, say).
        let context = || format!("committing the btrfs file system of {}", dir.display());
        let dir = File::open(dir).with_context(context)?;
        let mut transid: u64 = 0;
        // SAFETY: both ioctls take a pointer to one u64, valid for the duration of the call.
        unsafe {
            ioc_start_sync(dir.as_raw_fd(), &mut transid).with_context(context)?;
            ioc_wait_sync(dir.as_raw_fd(), &transid).with_context(context)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_argument_structs_match_the_kernel_abi() {
        // Both structs are 4096 bytes in linux/btrfs.h; the ioctl numbers encode that size.
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        assert!(vol_args(OsStr::new("1700000000_1")).is_ok());
        assert!(vol_args(OsStr::from_bytes(&[b'x'; 5000])).is_err());
        assert!(vol_args(OsStr::from_bytes(b"a\0b")).is_err());
    }
}
