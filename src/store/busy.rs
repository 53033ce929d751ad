//! Whether a tree of the store is in use on this host, asked of the kernel rather than of any
//! record: a lock nspawn holds beside it, a process whose root it is, or, of the processes
//! outside job machines (nspawn, the tools of the host), one whose arguments name it or whose
//! mount namespace has a mount on or below it or built on it (overlay layers).

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What the host's processes use, gathered in one pass over /proc.
#[derive(Debug, Default)]
pub struct Users {
    /// (device, inode) of the processes' root directories, with one pid each.
    roots: HashMap<(u64, u64), i32>,
    /// The arguments of every process whose root is the host's, with its pid.
    args: Vec<(i32, String)>,
    /// Mount points, in the mount namespaces of processes whose root is the host's.
    mount_points: Vec<String>,
    /// The super options of the mounts there: overlayfs names its layers in them (`lowerdir=`,
    /// `upperdir=`, `workdir=`) with the paths the mounter gave.
    mount_options: Vec<String>,
}

impl Users {
    /// Looks at every process of the host (gone ones are skipped). Only processes whose root is
    /// the host's count with their arguments and mounts: those of a job's machine are the job's
    /// to choose, and a hostile job must not keep another job's trees from being deleted by
    /// naming them. A machine counts by its root, and by the arguments and mounts of its nspawn.
    pub fn scan() -> Users {
        let mut users = Users::default();
        let host_root = std::fs::metadata("/").map(|m| (m.dev(), m.ino())).ok();
        let mut namespaces_seen = HashSet::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return users };
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let proc = entry.path();
            let Ok(root) = std::fs::metadata(proc.join("root")) else { continue };
            let root = (root.dev(), root.ino());
            users.roots.entry(root).or_insert(pid);
            if Some(root) != host_root {
                continue;
            }
            if let Ok(cmdline) = std::fs::read(proc.join("cmdline")) {
                let args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
                users.args.extend(args.map(|a| (pid, String::from_utf8_lossy(a).into_owned())));
            }
            let Ok(namespace) = std::fs::metadata(proc.join("ns/mnt")) else { continue };
            if !namespaces_seen.insert(namespace.ino()) {
                continue;
            }
            let Ok(mountinfo) = std::fs::read_to_string(proc.join("mountinfo")) else { continue };
            for line in mountinfo.lines() {
                let Some((before, after)) = line.split_once(" - ") else { continue };
                users.mount_points.extend(before.split(' ').nth(4).map(unescape));
                users.mount_options.extend(after.split(' ').nth(2).map(unescape));
            }
        }
        users
    }

    /// What uses the tree at `path`, if anything: a process with it as its root, a process
    /// naming it (or something in it) in its arguments, a mount at or below it, a mount built
    /// on it. A path that does not exist is used by nothing.
    pub fn user_of(&self, path: &Path) -> Option<String> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        if let Some(pid) = self.roots.get(&(meta.dev(), meta.ino())) {
            return Some(format!("it is the root of process {pid}"));
        }
        let text = path.to_string_lossy();
        if let Some((pid, _)) = self.args.iter().find(|(_, arg)| mentions(arg, &text)) {
            return Some(format!("process {pid} names it"));
        }
        if let Some(point) = self.mount_points.iter().find(|point| mentions(point, &text)) {
            return Some(format!("{point} is mounted"));
        }
        if self.mount_options.iter().any(|options| mentions(options, &text)) {
            return Some("a mount is built on it".to_owned());
        }
        None
    }
}

/// True when `text` names `path` or a path below it: `path` standing alone or after `=`, `:`
/// or `,` (an option's value, an overlay layer), followed by the end, `/`, `:` or `,`.
fn mentions(text: &str, path: &str) -> bool {
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return false;
    }
    text.match_indices(path).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + path.len()..].chars().next();
        matches!(before, None | Some('=' | ':' | ',')) && matches!(after, None | Some('/' | ':' | ','))
    })
}

/// Undoes the octal escapes (`\040` for a space) of /proc/PID/mountinfo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// nspawn's lock file for the tree at `path` (`.#NAME.lck` beside it), which nspawn holds for
/// as long as it runs; for an ephemeral copy it takes it before it makes the copy.
pub fn nspawn_lock_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".#{name}.lck"))
}

/// True when somebody holds a lock on the file at `path`. nspawn takes open file description
/// locks (which flock(2) does not see); F_OFD_GETLK also reports classic POSIX locks. Anything
/// but a clear answer counts as held; a missing file as free.
pub fn lock_held(path: &Path) -> bool {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => return e.kind() != std::io::ErrorKind::NotFound,
    };
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut query: libc::flock = unsafe { std::mem::zeroed() };
    query.l_type = libc::F_WRLCK as libc::c_short;
    query.l_whence = libc::SEEK_SET as libc::c_short;
    match nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut query)) {
        Ok(_) => query.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => true,
    }
}

/// What uses the tree at `path`: nspawn's lock beside it, or what `users` saw.
pub fn user_of(path: &Path, users: &Users) -> Option<String> {
    if lock_held(&nspawn_lock_path(path)) {
        return Some("nspawn holds its lock".to_owned());
    }
    users.user_of(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_needs_the_whole_path_as_a_value() {
        let path = "/s/.jobs/run-1";
        for yes in [
            "/s/.jobs/run-1",
            "--directory=/s/.jobs/run-1/root",
            "lowerdir=/s/img/1_2,upperdir=/s/.jobs/run-1/upper,workdir=/s/.jobs/run-1/work",
            "--overlay=/s/img/1_2:/s/.jobs/run-1/upper:/",
        ] {
            assert!(mentions(yes, path), "{yes}");
        }
        for no in ["/s/.jobs/run-12", "/x/s/.jobs/run-1", "--directory=/s/.jobs/run-10/root", ""] {
            assert!(!mentions(no, path), "{no}");
        }
        assert!(!mentions("/anything", "/"), "the root names everything and is never asked about");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/plain\x"), r"/plain\x");
    }

    #[test]
    fn this_process_is_seen_using_its_own_directories_and_locks() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-busy-test-{}", std::process::id()));
        let tree = dir.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let users = Users::scan();
        assert!(users.user_of(Path::new("/")).is_some(), "nothing has / as its root?");
        assert_eq!(user_of(&tree, &users), None);
        // A process naming the tree in its arguments uses it.
        let mut sleeper = std::process::Command::new("sleep");
        let mut sleeper = std::os::unix::process::CommandExt::arg0(&mut sleeper, &tree).arg("60").spawn().unwrap();
        let seen = Users::scan().user_of(&tree);
        assert!(seen.as_deref().is_some_and(|u| u.contains("names it")), "{seen:?}");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        // An open file description lock on nspawn's lock file, as nspawn takes it.
        let lock = std::fs::File::create(nspawn_lock_path(&tree)).unwrap();
        assert!(!lock_held(&nspawn_lock_path(&tree)));
        let mut take: libc::flock = unsafe { std::mem::zeroed() };
        take.l_type = libc::F_WRLCK as libc::c_short;
        take.l_whence = libc::SEEK_SET as libc::c_short;
        nix::fcntl::fcntl(lock.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&take)).unwrap();
        assert_eq!(user_of(&tree, &Users::default()).as_deref(), Some("nspawn holds its lock"));
        drop(lock);
        assert!(!lock_held(&nspawn_lock_path(&tree)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
