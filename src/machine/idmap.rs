//! User namespace ranges of job machines, and the idmapped overlay root of plain-store jobs.

use crate::error::{Context, Error, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// uids (and gids) per job machine: what a Debian system expects (0..65535, nobody included).
pub const RANGE: u32 = 65536;
/// The first base handed out. nspawn's own `--private-users=pick` stays below 0x6FFF0000, so
/// our ranges never collide with machines someone else starts with `pick`.
pub const FIRST_BASE: u32 = 0x7000_0000;
/// How many ranges there are (up to 0x8000_0000): more machines than any host runs at once.
const SLOTS: u32 = 4096;

/// The lowest base not in `used`.
pub fn pick_base(used: &HashSet<u32>) -> Result<u32> {
    (0..SLOTS)
        .map(|slot| FIRST_BASE + slot * RANGE)
        .find(|base| !used.contains(base))
        .ok_or_else(|| Error::new(format!("all {SLOTS} uid ranges of job machines are in use")))
}

/// True if `base` is one of the bases `pick_base` hands out (a state file is not trusted).
pub fn is_our_base(base: u32) -> bool {
    base >= FIRST_BASE && (base - FIRST_BASE) % RANGE == 0 && (base - FIRST_BASE) / RANGE < SLOTS
}

/// The overlay root of a plain-store job, in `job_dir`: `lower` (the snapshot, idmapped to the
/// job's range), `upper` and `work` (the job's writes), `root` (what the machine boots).
pub struct IdmappedOverlay<'a> {
    pub tree: &'a Path,
    pub job_dir: &'a Path,
    pub base: u32,
}

impl IdmappedOverlay<'_> {
    /// The directory the machine boots, once `mount` ran.
    pub fn root(job_dir: &Path) -> PathBuf {
        job_dir.join("root")
    }

    /// In a new private mount namespace of this process (which then execs nspawn, so the
    /// mounts go away with the machine): the snapshot idmapped to the job's range at `lower`,
    /// an overlay of it at `root`. Files the job creates land in `upper` owned by its range;
    /// the snapshot is never written and keeps its real ownership. O(1), whatever the tree's size.
    pub fn mount(&self) -> Result<PathBuf> {
        let (lower, upper, work, root) = (
            self.job_dir.join("lower"),
            self.job_dir.join("upper"),
            self.job_dir.join("work"),
            Self::root(self.job_dir),
        );
        for dir in [&lower, &work, &root] {
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::from(e).context(format!("creating {}", dir.display())))
                }
                _ => {}
            }
        }
        // overlayfs shows the upper dir's owner as the machine's `/`: root of the job's range.
        std::os::unix::fs::chown(&upper, Some(self.base), Some(self.base))
            .with_context(|| format!("chown {}", upper.display()))?;
        unshare(CloneFlags::CLONE_NEWNS).context("unsharing the mount namespace")?;
        // Host mounts still propagate in; nothing of ours propagates out.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
            .context("making / a slave mount")?;
        let userns = userns_of_range(self.base)?;
        let tree = open_tree_clone(self.tree)?;
        set_idmap(&tree, &userns).with_context(|| format!("idmapping {}", self.tree.display()))?;
        move_mount_to(&tree, &lower)?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_escape(&lower),
            overlay_escape(&upper),
            overlay_escape(&work)
        );
        mount(Some("overlay"), &root, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
            .with_context(|| format!("mounting the overlay at {}", root.display()))?;
        Ok(root)
    }
}

/// overlayfs splits its options at ',' and lowerdir at ':'; a backslash escapes them.
fn overlay_escape(path: &Path) -> String {
    let mut escaped = String::new();
    for c in path.display().to_string().chars() {
        if matches!(c, '\\' | ':' | ',') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A user namespace mapping 0..RANGE to `base`..: made by a child that unshares and waits
/// until its namespace is opened; the namespace outlives it through the fd.
fn userns_of_range(base: u32) -> Result<OwnedFd> {
    let (ready_read, ready_write) = nix::unistd::pipe().context("making a pipe")?;
    let (done_read, done_write) = nix::unistd::pipe().context("making a pipe")?;
    // SAFETY: this process is single-threaded here (the spawn wrapper, before exec), and the
    // child only makes async-signal-safe system calls before _exit.
    match unsafe { nix::unistd::fork() }.context("forking")? {
        nix::unistd::ForkResult::Child => {
            drop(ready_read);
            drop(done_write);
            let ok = unshare(CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_write, &[u8::from(ok)]);
            let mut byte = [0u8];
            let _ = nix::unistd::read(done_read.as_raw_fd(), &mut byte);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_write);
            drop(done_read);
            let result = (|| {
                let mut byte = [0u8];
                let n = nix::unistd::read(ready_read.as_raw_fd(), &mut byte).context("waiting for the child")?;
                if n != 1 || byte[0] != 1 {
                    return Err(Error::new("cannot create a user namespace (unshare CLONE_NEWUSER failed)"));
                }
                let proc = PathBuf::from(format!("/proc/{child}"));
                for map in ["uid_map", "gid_map"] {
                    std::fs::write(proc.join(map), format!("0 {base} {RANGE}\n"))
                        .with_context(|| format!("writing {map} of the job's user namespace"))?;
                }
                let ns = std::fs::File::open(proc.join("ns/user")).context("opening the job's user namespace")?;
                Ok(OwnedFd::from(ns))
            })();
            drop(done_write);
            let _ = nix::sys::wait::waitpid(child, None);
            result
        }
    }
}

/// open_tree(2) with OPEN_TREE_CLONE: a detached copy of the mount tree at `path`.
fn open_tree_clone(path: &Path) -> Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::new("path contains NUL"))?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: a plain system call with a valid C string; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context(format!("open_tree {}", path.display())));
    }
    // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// mount_setattr(2) MOUNT_ATTR_IDMAP: `tree`'s files appear shifted into `userns`'s range.
fn set_idmap(tree: &OwnedFd, userns: &OwnedFd) -> Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: valid fds, an empty C string and a mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::new(format!(
            "mount_setattr MOUNT_ATTR_IDMAP: {e} (the file system must support idmapped mounts)"
        )));
    }
    Ok(())
}

/// move_mount(2) of a detached tree onto `target`.
fn move_mount_to(tree: &OwnedFd, target: &Path) -> Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let c_target = CString::new(target.as_os_str().as_bytes()).map_err(|_| Error::new("path contains NUL"))?;
    let empty = c"";
    // SAFETY: valid fd and C strings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context(format!("move_mount to {}", target.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_handed_out_lowest_first_and_never_twice() {
        let mut used = HashSet::new();
        for expected in [FIRST_BASE, FIRST_BASE + RANGE, FIRST_BASE + 2 * RANGE] {
            let base = pick_base(&used).unwrap();
            assert_eq!(base, expected);
            assert!(is_our_base(base));
            used.insert(base);
        }
        used.remove(&(FIRST_BASE + RANGE));
        assert_eq!(pick_base(&used).unwrap(), FIRST_BASE + RANGE);
        assert!(!is_our_base(0) && !is_our_base(FIRST_BASE + 1) && !is_our_base(FIRST_BASE + SLOTS * RANGE));
        let all: HashSet<u32> = (0..SLOTS).map(|s| FIRST_BASE + s * RANGE).collect();
        assert!(pick_base(&all).is_err());
    }

    #[test]
    fn overlay_options_escape_separators() {
        assert_eq!(overlay_escape(Path::new("/a,b:c\\d")), "/a\\,b\\:c\\\\d");
    }
}
