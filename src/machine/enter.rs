//! Running a job script inside a machine by joining its namespaces (setns), no helper process.

use super::{Running, SAFE_PATH};
use crate::error::{Context, Error, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// It exited with this code (128+N when killed by signal N).
    Exited(i32),
    /// We were told to stop (SIGTERM/SIGINT/SIGHUP) and ended the script.
    Terminated,
}

/// The namespaces to join, user first (it grants the rights for the others), mount last
/// (after it, /proc/<pid>/ns paths of the host are no longer reachable).
const NAMESPACES: [(&str, CloneFlags); 7] = [
    ("user", CloneFlags::CLONE_NEWUSER),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Opens the namespaces of `leader` that differ from ours.
fn open_namespaces(leader: i32) -> Result<Vec<(File, CloneFlags)>> {
    let mut joined = Vec::new();
    for (name, flag) in NAMESPACES {
        let theirs = format!("/proc/{leader}/ns/{name}");
        let ours = format!("/proc/self/ns/{name}");
        let (Ok(their_meta), Ok(our_meta)) = (std::fs::metadata(&theirs), std::fs::metadata(&ours)) else {
            continue; // namespace type not supported by this kernel
        };
        if their_meta.ino() == our_meta.ino() && their_meta.dev() == our_meta.dev() {
            continue; // shared with the host (e.g. the network without --private-network)
        }
        joined.push((File::open(&theirs).with_context(|| format!("opening {theirs}"))?, flag));
    }
    Ok(joined)
}

/// The capability bounding set of the machine's init, so an entered script gets no more
/// privileges than the machine's own processes.
fn bounding_set(leader: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{leader}/status")).context("reading machine init status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| Error::new("no CapBnd in machine init status"))
}

/// Sub-cgroup of a machine's unit that entered scripts join (cgroup v2 only).
const JOB_CGROUP: &str = "nspawn-runner-job";

/// Opens `cgroup.procs` of a leaf cgroup below `unit_cgroup` (a path like
/// `/machine.slice/x.service`), creating it; `None` where that is not possible.
fn open_job_cgroup(unit_cgroup: &str) -> Option<File> {
    let base = Path::new("/sys/fs/cgroup");
    if !base.join("cgroup.controllers").exists() {
        return None; // cgroup v1: the unit's limits cannot be joined this way
    }
    let dir = base.join(unit_cgroup.trim_start_matches('/')).join(JOB_CGROUP);
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            log::warn!("cannot create {}: {e}; the script runs outside the machine's cgroup", dir.display());
            return None;
        }
    }
    std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).ok()
}

/// What entering a machine needs, opened by the parent before it forks.
struct Entry {
    namespaces: Vec<(File, CloneFlags)>,
    machine_root: File,
    keep_caps: u64,
    /// `cgroup.procs` of a leaf cgroup of the machine's unit, where there is one.
    cgroup_procs: Option<File>,
}

impl Entry {
    /// Opens what entering the machine of `running` needs, and joins its pid namespace here, so
    /// the forked child is the machine's process (as nsenter does with its extra fork). This
    /// process is single-threaded and forks nothing else.
    fn open(running: &Running) -> Result<Entry> {
        let cgroup_procs = running.cgroup.as_deref().and_then(open_job_cgroup);
        let mut namespaces = open_namespaces(running.leader_pid)?;
        if let Some(index) = namespaces.iter().position(|(_, flag)| *flag == CloneFlags::CLONE_NEWPID) {
            let (pid_ns, flag) = namespaces.remove(index);
            setns(std::os::fd::AsFd::as_fd(&pid_ns), flag).context("joining the machine's pid namespace")?;
        }
        let keep_caps = bounding_set(running.leader_pid)?;
        let machine_root =
            File::open(format!("/proc/{}/root", running.leader_pid)).context("opening the machine's root")?;
        Ok(Entry { namespaces, machine_root, keep_caps, cgroup_procs })
    }

    /// `argv` to run as root inside the machine, in a clean environment, with our stdout and
    /// stderr; in a session of its own when `own_session` (else in our terminal's session).
    fn command(self, argv: &[String], own_session: bool) -> Command {
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .env("PATH", SAFE_PATH)
            .env("HOME", "/root")
            .env("USER", "root")
            .env("LOGNAME", "root")
            .env("SHELL", "/bin/bash")
            .env("LANG", "C.UTF-8")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe system calls run between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &self.cgroup_procs {
                    use std::os::fd::AsFd;
                    // "0" moves the writing process; a failure only loses the limits, not the job.
                    let _ = nix::unistd::write(procs.as_fd(), b"0");
                }
                enter_machine(&self.namespaces, &self.machine_root, self.keep_caps, own_session)
            });
        }
        command
    }
}

/// Runs `script` with bash as root inside the machine of `running`, in a clean environment,
/// with our stdout/stderr, on either kind of host. Where the machine is a systemd unit, the
/// script joins a cgroup below the unit's, so the unit's limits (MemoryMax, TasksMax,
/// CPUWeight) bind it like every other process of the machine. On SIGTERM/SIGINT/SIGHUP the
/// script's process group gets SIGTERM, then SIGKILL after `grace`.
pub fn run_script(running: &Running, script: &Path, grace: Duration) -> Result<ScriptOutcome> {
    let script_file = File::open(script).with_context(|| format!("opening script {}", script.display()))?;
    let entry = Entry::open(running)?;

    // Block the stop signals before the child exists, so none is lost between fork and wait.
    let signals = crate::signals::stop_set();
    let mut blocked = signals;
    blocked.add(Signal::SIGCHLD);
    blocked.thread_block().context("blocking signals")?;

    let argv = ["/bin/bash".to_owned(), "-s".to_owned()];
    let mut command = entry.command(&argv, true);
    // bash reads the script from stdin; gitlab-runner's wrapper gives commands /dev/null.
    command.stdin(Stdio::from(script_file));
    let child = command.spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            let _ = blocked.thread_unblock();
            return Err(Error::from(e).context("starting bash inside the machine"));
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let outcome = supervise(pid, &blocked, &signals, grace);
    let _ = blocked.thread_unblock();
    outcome
}

/// Runs `command` (an interactive login shell when empty) as root inside the machine of
/// `running`, on our terminal: stdin too is ours, `TERM` is passed on, and the keyboard's
/// SIGINT and SIGQUIT are the shell's, not ours. Returns its exit code.
pub fn open_shell(running: &Running, command: &[String]) -> Result<i32> {
    let login = ["/bin/bash".to_owned(), "--login".to_owned()];
    let argv = if command.is_empty() { &login[..] } else { command };
    let mut child = Entry::open(running)?.command(argv, false);
    child.stdin(Stdio::inherit());
    if let Some(term) = std::env::var_os("TERM") {
        child.env("TERM", term);
    }
    let ignore = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigIgn,
        nix::sys::signal::SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: installing SIG_IGN, no handler code; the child puts the defaults back.
    unsafe {
        nix::sys::signal::sigaction(Signal::SIGINT, &ignore).context("ignoring SIGINT")?;
        nix::sys::signal::sigaction(Signal::SIGQUIT, &ignore).context("ignoring SIGQUIT")?;
    }
    let status = child.status().with_context(|| format!("starting {} inside the machine", argv[0]))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().or_else(|| status.signal().map(|signal| 128 + signal)).unwrap_or(1))
}

/// In the forked child: join the machine, drop privileges it does not have, get a session
/// (`own_session`).
fn enter_machine(
    namespaces: &[(File, CloneFlags)],
    machine_root: &File,
    keep_caps: u64,
    own_session: bool,
) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    SigSet::empty().thread_set_mask().map_err(std::io::Error::from)?;
    for signal in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: restoring a default disposition (a shell's parent ignores these).
        unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(std::io::Error::from)?;
    }
    for (file, flag) in namespaces {
        setns(file.as_fd(), *flag).map_err(std::io::Error::from)?;
    }
    // Joining a mount namespace puts us at the namespace's root, which is not the machine's
    // root when nspawn had to stack it elsewhere (e.g. the host itself runs in a chroot).
    // Go to the root the machine's init sees, and make sure that is where we are.
    nix::unistd::fchdir(machine_root.as_raw_fd()).map_err(std::io::Error::from)?;
    nix::unistd::chroot(".").map_err(std::io::Error::from)?;
    nix::unistd::chdir("/").map_err(std::io::Error::from)?;
    let expected = nix::sys::stat::fstat(machine_root.as_raw_fd()).map_err(std::io::Error::from)?;
    let actual = nix::sys::stat::stat("/").map_err(std::io::Error::from)?;
    if (expected.st_dev, expected.st_ino) != (actual.st_dev, actual.st_ino) {
        return Err(std::io::Error::other("could not enter the machine's root directory"));
    }
    for cap in 0..64u64 {
        if keep_caps & (1 << cap) == 0 {
            // EINVAL for capabilities this kernel does not know: nothing to drop.
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    if !own_session {
        return Ok(());
    }
    // Its own session and process group: we decide when the script is signalled.
    nix::unistd::setsid().map(drop).map_err(std::io::Error::from)
}

/// Waits for the script, forwarding a stop request as SIGTERM then SIGKILL to its group.
fn supervise(pid: Pid, wait_set: &SigSet, stop: &SigSet, grace: Duration) -> Result<ScriptOutcome> {
    loop {
        if let Some(code) = reap(pid)? {
            return Ok(ScriptOutcome::Exited(code));
        }
        let signal = wait_set.wait().context("waiting for signals")?;
        if stop.contains(signal) {
            terminate_group(pid, grace);
            return Ok(ScriptOutcome::Terminated);
        }
    }
}

/// Ends the script's process group: SIGTERM, then SIGKILL after `grace`.
fn terminate_group(pid: Pid, grace: Duration) {
    let group = Pid::from_raw(-pid.as_raw());
    let _ = kill(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(reap(pid), Ok(Some(_)) | Err(_)) && kill(group, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(group, Signal::SIGKILL);
    let _ = waitpid(pid, None);
}

/// The exit code of `pid` if it has ended.
fn reap(pid: Pid) -> Result<Option<i32>> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(code)),
        Ok(WaitStatus::Signaled(_, signal, _)) => Ok(Some(128 + signal as i32)),
        Ok(_) => Ok(None),
        Err(nix::Error::ECHILD) => Ok(Some(128 + Signal::SIGKILL as i32)),
        Err(e) => Err(Error::from(e).context("waiting for the script")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespaces_are_not_joined() {
        let me = std::process::id() as i32;
        assert!(open_namespaces(me).unwrap().is_empty());
    }

    #[test]
    fn bounding_set_is_read_from_proc() {
        let me = std::process::id() as i32;
        assert!(bounding_set(me).is_ok());
        assert!(bounding_set(i32::MAX).is_err());
    }
}
