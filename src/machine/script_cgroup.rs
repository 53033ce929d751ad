//! A cgroup of its own for each run stage's script, beside the machine init's, and a guard
//! process: whatever the script leaves running (background, setsid'd or double-forked
//! processes) ends with its stage, even when gitlab-runner SIGKILLs the stage.

use super::{privileges, wait_until, Running};
use crate::error::{Context, Error, Result};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A script's leaf is `<PREFIX><pid of its run stage>`.
const PREFIX: &str = "nspawn-runner-script-";
/// Where a booted systemd keeps itself in every hierarchy it manages; the machine's own tree
/// is its parent.
const INIT_SCOPE: &str = "init.scope";
/// How long the processes of a leaf may take to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The cgroups one run stage's script joins.
pub struct ScriptCgroup {
    /// Its leaf beside the init's `init.scope` in each hierarchy the machine's systemd manages;
    /// the init's own cgroup in the others (the v1 controllers of a hybrid host).
    join: Vec<PathBuf>,
    /// The leaves made for it.
    leaves: Vec<PathBuf>,
}

impl ScriptCgroup {
    /// Makes this stage's leaf in the machine whose init is `leader`. A machine whose init is in
    /// no `init.scope` (no systemd managing a hierarchy) gets none: its script joins the init's
    /// cgroups, as `shell` does.
    pub fn create(leader: i32) -> Result<ScriptCgroup> {
        let name = format!("{PREFIX}{}", std::process::id());
        let mut cgroup = ScriptCgroup { join: Vec::new(), leaves: Vec::new() };
        for dir in privileges::cgroups_of(leader)? {
            let Some(machine) = machine_tree(&dir) else {
                cgroup.join.push(dir);
                continue;
            };
            let leaf = machine.join(&name);
            match std::fs::create_dir(&leaf) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    let _ = cgroup.end();
                    return Err(Error::from(e).context(format!("creating cgroup {}", leaf.display())));
                }
                _ => {}
            }
            cgroup.leaves.push(leaf.clone());
            cgroup.join.push(leaf);
        }
        if cgroup.leaves.is_empty() {
            log::info!("the machine's init is in no {INIT_SCOPE}: the script gets no cgroup of its own");
        }
        Ok(cgroup)
    }

    /// The cgroups to join.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.join
    }

    /// Kills what is left in the leaf and removes it; returns how many processes were left.
    pub fn end(&self) -> Result<usize> {
        end_leaves(&self.leaves)
    }

    /// Starts the guard of this leaf: a process of the host outside the stage's process group
    /// and session (gitlab-runner's SIGKILL does not reach it) that gets SIGTERM when the stage
    /// dies (PR_SET_PDEATHSIG), then ends the leaf and exits. Call before joining the machine's
    /// pid namespace; the caller must be single-threaded.
    pub fn guard(&self) -> Result<Guard> {
        let stage = nix::unistd::getpid();
        // SAFETY: this process is single-threaded, so the child may do anything; it never
        // returns into the caller's code and leaves by _exit.
        match unsafe { nix::unistd::fork() }.context("starting the script's guard")? {
            nix::unistd::ForkResult::Parent { child } => Ok(Guard { pid: child }),
            nix::unistd::ForkResult::Child => {
                guard_leaves(&self.leaves, stage);
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
        }
    }
}

/// The guard process of a stage's script leaf; stop it once the leaf has ended.
pub struct Guard {
    pid: Pid,
}

impl Guard {
    /// Ends the guard: the stage is ending its leaf itself.
    pub fn stop(self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// The guard's life: detach from the stage's stdio (gitlab-runner waits for EOF on them), its
/// descriptors and its session, wait until the stage is gone, end `leaves`.
fn guard_leaves(leaves: &[PathBuf], stage: Pid) {
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    let detached = (|| -> std::io::Result<()> {
        term.thread_set_mask().map_err(std::io::Error::from)?;
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
        for fd in 0..3 {
            nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd).map_err(std::io::Error::from)?;
        }
        drop(null);
        // SAFETY: close_range with integer arguments; nothing above fd 2 is used again.
        unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
        nix::unistd::setsid().map_err(std::io::Error::from)?;
        Ok(())
    })();
    if detached.is_err() {
        return;
    }
    // A SIGTERM while the stage lives is not ours to act on (a `systemctl stop` of
    // gitlab-runner's unit signals every process of it): the stage itself ends its script then.
    while nix::unistd::getppid() == stage {
        if term.wait().is_err() {
            return;
        }
    }
    let _ = end_leaves(leaves);
}

/// The machine's own cgroup tree in the hierarchy where the init's cgroup is `dir`: the parent
/// of its `init.scope`. None in a hierarchy the machine's systemd does not manage.
fn machine_tree(dir: &Path) -> Option<&Path> {
    dir.file_name().filter(|name| *name == INIT_SCOPE).and_then(|_| dir.parent())
}

/// Ends what the scripts of run stages left in the machine of `running` (their stage was
/// SIGKILLed, and their guard too); returns how many processes there were.
pub fn end_leftover_scripts(running: &Running) -> Result<usize> {
    let mut leaves = Vec::new();
    for dir in privileges::cgroups_of(running.leader_pid)? {
        let Some(machine) = machine_tree(&dir) else { continue };
        let entries = match std::fs::read_dir(machine) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other.with_context(|| format!("listing cgroup {}", machine.display()))?,
        };
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                leaves.push(entry.path());
            }
        }
    }
    end_leaves(&leaves)
}

/// Kills every process in `leaves` and below, then removes them; returns how many processes
/// there were. cgroup v2 kills a whole cgroup at once (`cgroup.kill`, forks in flight
/// included); elsewhere every process listed is SIGKILLed until none is left.
fn end_leaves(leaves: &[PathBuf]) -> Result<usize> {
    if leaves.is_empty() {
        return Ok(0);
    }
    let left: BTreeSet<i32> = leaves.iter().flat_map(|leaf| processes_below(leaf)).collect();
    for leaf in leaves {
        let kill_file = leaf.join("cgroup.kill");
        if kill_file.exists() {
            std::fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()))?;
        }
    }
    let emptied = wait_until(KILL_WAIT, || {
        let mut empty = true;
        for leaf in leaves {
            for pid in processes_below(leaf) {
                empty = false;
                kill_if_still_in(pid, leaf);
            }
        }
        empty
    });
    if !emptied {
        return Err(Error::new(format!("processes in {} survive SIGKILL", leaves[0].display())));
    }
    super::cgroup::remove(leaves)?;
    Ok(left.len())
}

/// The processes (host pids) of cgroup `dir` and its descendants; none when it is gone.
fn processes_below(dir: &Path) -> Vec<i32> {
    let own = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let mut pids: Vec<i32> = own.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            pids.extend(processes_below(&entry.path()));
        }
    }
    pids
}

/// SIGKILLs `pid` if it is still a process of `leaf` (or below): through a pidfd taken before
/// that check, so a pid that was reused by another process meanwhile is never signalled.
fn kill_if_still_in(pid: i32, leaf: &Path) {
    // SAFETY: pidfd_open with integer arguments; the descriptor is owned (and closed) below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // gone
    }
    // SAFETY: fd is a pidfd just opened by us and closed only by this OwnedFd.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    if processes_below(leaf).contains(&pid) {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, raw, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_tree_is_the_parent_of_init_scope() {
        let init = Path::new("/sys/fs/cgroup/machine.slice/nspawn-runner-run-7.service/payload/init.scope");
        assert_eq!(
            machine_tree(init),
            Some(Path::new("/sys/fs/cgroup/machine.slice/nspawn-runner-run-7.service/payload"))
        );
        assert_eq!(machine_tree(Path::new("/sys/fs/cgroup/memory/nspawn-runner-run-7")), None);
        assert_eq!(machine_tree(Path::new("/sys/fs/cgroup/pids")), None);
    }

    #[test]
    fn nothing_to_end_is_fine() {
        assert_eq!(end_leaves(&[]).unwrap(), 0);
        let gone = Path::new("/sys/fs/cgroup/nspawn-runner-script-0-no-such-leaf");
        assert!(processes_below(gone).is_empty());
    }
}
