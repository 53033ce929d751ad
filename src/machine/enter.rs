//! Running a job script inside a machine by joining its namespaces (setns), no helper process.

use super::privileges::{self, Capabilities, Limits};
use super::script_cgroup::{self, ScriptCgroup};
use super::seccomp::Filters;
use super::{Running, SAFE_PATH};
use crate::error::{Context, Error, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// The namespaces to join, in order. The pid namespace is joined before the fork (it applies to
/// children); the user namespace last, so that host root's rights in the machine's other
/// namespaces are used before they are given up; after the mount namespace, /proc/<pid>/ns
/// paths of the host are no longer reachable (all are opened first).
const NAMESPACES: [(&str, CloneFlags); 7] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("user", CloneFlags::CLONE_NEWUSER),
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

/// Reads the machine's seccomp filters once, at prepare, into `path` (see `Filters::capture`).
pub fn capture_seccomp(running: &Running, path: &Path) -> Result<()> {
    Filters::capture(running.leader_pid)?.save(path)
}

/// The filters prepare saved at `path`; read from the machine's init if there is no file (a
/// job prepared by an earlier version).
fn machine_filters(running: &Running, path: &Path) -> Result<Filters> {
    if path.exists() {
        Filters::load(path)
    } else {
        log::info!("no {}: reading the machine's seccomp filter now", path.display());
        Filters::capture(running.leader_pid)
    }
}

/// Everything the forked child needs to become a process of the machine, gathered on the host.
struct Entry {
    cgroups: Vec<File>,
    limits: Limits,
    namespaces: Vec<(File, CloneFlags)>,
    root: File,
    capabilities: Capabilities,
    filters: Filters,
}

impl Entry {
    /// Gathers what the machine's init has (its seccomp filters from `seccomp`, see
    /// `machine_filters`; the child joins `cgroups`), and joins its pid namespace here, so the
    /// forked child is the machine's process (as nsenter does with its extra fork). This
    /// process is single-threaded and forks nothing else after this.
    fn open(running: &Running, seccomp: &Path, cgroups: &[PathBuf]) -> Result<Entry> {
        let leader = running.leader_pid;
        let mut entry = Entry {
            cgroups: privileges::open_procs(cgroups)?,
            limits: Limits::of(leader)?,
            namespaces: open_namespaces(leader)?,
            root: File::open(format!("/proc/{leader}/root")).context("opening the machine's root")?,
            capabilities: Capabilities::of(leader)?,
            filters: machine_filters(running, seccomp)?,
        };
        if let Some(index) = entry.namespaces.iter().position(|(_, flag)| *flag == CloneFlags::CLONE_NEWPID) {
            let (pid_ns, flag) = entry.namespaces.remove(index);
            setns(std::os::fd::AsFd::as_fd(&pid_ns), flag).context("joining the machine's pid namespace")?;
        }
        Ok(entry)
    }

    /// `argv` to run as root inside the machine, in a clean environment, with our stdout and
    /// stderr; in a session of its own when `own_session` (else in our terminal's session).
    fn command(self, argv: &[String], own_session: bool) -> Command {
        let parent = std::process::id() as i32;
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
            command.pre_exec(move || enter_machine(&self, own_session, parent));
        }
        command
    }
}

/// Runs `script` with bash as root inside the machine of `running`, in a clean environment,
/// with our stdout/stderr, on either kind of host. The script gets what the machine's init has:
/// its cgroups, rlimits, namespaces, root, capability sets, NoNewPrivs and seccomp filters
/// (those prepare saved at `seccomp`), and no file descriptor of ours but stdio. On
/// SIGTERM/SIGINT/SIGHUP the script's process group gets SIGTERM, then SIGKILL after `grace`.
///
/// The script runs in a cgroup of its own (`ScriptCgroup`), ended when it is over: nothing it
/// started outlives the stage, not even when the stage is SIGKILLed (bash dies with it, and the
/// leaf's guard ends the rest). Daemons a job wants between stages, it starts with systemctl.
/// What earlier stages' scripts left (their stage and guard were SIGKILLed) is ended first.
pub fn run_script(running: &Running, script: &Path, seccomp: &Path, grace: Duration) -> Result<ScriptOutcome> {
    let script_file = open_script(script)?;
    let earlier = script_cgroup::end_leftover_scripts(running)
        .map_err(|e| e.context("ending what earlier stages' scripts left running"))?;
    if earlier > 0 {
        log::warn!("ended {} that the scripts of earlier stages left running", processes(earlier));
    }
    let cgroup = ScriptCgroup::create(running.leader_pid)?;
    let guard = match cgroup.guard() {
        Ok(guard) => guard,
        Err(e) => {
            let _ = cgroup.end();
            return Err(e);
        }
    };
    let outcome = run_in(&cgroup, running, script_file, seccomp, grace);
    match cgroup.end() {
        Ok(0) => {}
        Ok(left) => log::warn!(
            "ended {} that the script left running (a daemon for later stages needs systemctl)",
            processes(left)
        ),
        Err(e) => log::warn!("ending what the script left running: {e}"),
    }
    guard.stop();
    outcome
}

/// "1 process", "2 processes".
fn processes(count: usize) -> String {
    format!("{count} process{}", if count == 1 { "" } else { "es" })
}

/// `run_script` in `cgroup`.
fn run_in(
    cgroup: &ScriptCgroup,
    running: &Running,
    script_file: File,
    seccomp: &Path,
    grace: Duration,
) -> Result<ScriptOutcome> {
    // Entry::open makes our later children the machine's (its pid namespace): undone once bash
    // is forked, so that a process running several scripts (a health check) forks the next
    // script's guard on the host, where it sees its parent.
    let own_pid_namespace = File::open("/proc/self/ns/pid").context("opening our pid namespace")?;
    let entry = Entry::open(running, seccomp, cgroup.dirs())?;

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
    if let Err(e) = setns(std::os::fd::AsFd::as_fd(&own_pid_namespace), CloneFlags::CLONE_NEWPID) {
        // Only a later script of this process is affected, and its guard then fails visibly.
        log::warn!("returning to our pid namespace: {e}");
    }
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

/// Opens the script gitlab-runner wrote. Anything but a regular file is the runner's problem,
/// not the job's: bash would report a directory as a failing script (a build failure).
fn open_script(script: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let context = || format!("opening script {}", script.display());
    // Non-blocking, so that a FIFO is refused instead of waiting for a writer; reads of a
    // regular file never block anyway.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(script).with_context(context)?;
    let file_type = file.metadata().with_context(context)?.file_type();
    if !file_type.is_file() {
        let what = if file_type.is_dir() { "a directory" } else { "not a regular file" };
        return Err(Error::new(format!("script {} is {what}", script.display())));
    }
    Ok(file)
}

/// Runs `command` (an interactive login shell when empty) as root inside the machine of
/// `running`, with what an entered script gets, on our terminal: stdin too is ours, `TERM` is
/// passed on, and the keyboard's SIGINT and SIGQUIT are the shell's, not ours. Returns its
/// exit code.
pub fn open_shell(running: &Running, seccomp: &Path, command: &[String]) -> Result<i32> {
    let login = ["/bin/bash".to_owned(), "--login".to_owned()];
    let argv = if command.is_empty() { &login[..] } else { command };
    let cgroups = privileges::cgroups_of(running.leader_pid)?;
    let mut child = Entry::open(running, seccomp, &cgroups)?.command(argv, false);
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

/// In the forked child, in the order of runc's setns init and LXC's attach: become
/// non-dumpable (no machine process may ptrace us while we hold host descriptors), join the
/// machine's cgroups, take its rlimits, join its namespaces (user last) as its root, enter its
/// root directory, get a session, take its capabilities and NoNewPrivs, mark every descriptor
/// but stdio close-on-exec, and load its seccomp filters last. Without `own_session` it stays
/// in our terminal's session (an interactive shell). It dies with `parent`, us.
fn enter_machine(entry: &Entry, own_session: bool, parent: i32) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let check = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    SigSet::empty().thread_set_mask().map_err(std::io::Error::from)?;
    for signal in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: restoring a default disposition (a shell's parent ignores these).
        unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(std::io::Error::from)?;
    }
    // SAFETY (all blocks below): system calls with integer arguments or valid pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    for procs in &entry.cgroups {
        // "0" moves the writing process.
        nix::unistd::write(procs.as_fd(), b"0").map_err(std::io::Error::from)?;
    }
    entry.limits.apply()?;
    for (file, flag) in &entry.namespaces {
        setns(file.as_fd(), *flag).map_err(std::io::Error::from)?;
    }
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    check(unsafe { libc::setresgid(0, 0, 0) })?;
    check(unsafe { libc::setresuid(0, 0, 0) })?;
    // Joining a mount namespace puts us at the namespace's root, which is not the machine's
    // root when nspawn had to stack it elsewhere (e.g. the host itself runs in a chroot).
    // Go to the root the machine's init sees, and make sure that is where we are.
    nix::unistd::fchdir(entry.root.as_raw_fd()).map_err(std::io::Error::from)?;
    nix::unistd::chroot(".").map_err(std::io::Error::from)?;
    nix::unistd::chdir("/").map_err(std::io::Error::from)?;
    let expected = nix::sys::stat::fstat(entry.root.as_raw_fd()).map_err(std::io::Error::from)?;
    let actual = nix::sys::stat::stat("/").map_err(std::io::Error::from)?;
    if (expected.st_dev, expected.st_ino) != (actual.st_dev, actual.st_ino) {
        return Err(std::io::Error::other("could not enter the machine's root directory"));
    }
    // Its own session and process group: we decide when the script is signalled.
    if own_session {
        nix::unistd::setsid().map_err(std::io::Error::from)?;
    }
    entry.capabilities.apply()?;
    // SIGKILLed when we die, however we die (gitlab-runner's force kill): set after the last
    // change of credentials, which clears it. Our pid is not in the machine's pid namespace,
    // so getppid() says 0 while we live, and something else once we are gone.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) })?;
    if ![0, parent].contains(&nix::unistd::getppid().as_raw()) {
        return Err(std::io::Error::other("the stage died"));
    }
    // Whatever gitlab-runner or we left open (namespaces, cgroups, the machine's root) closes
    // at exec; std's own exec-error pipe already is close-on-exec.
    check(unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) })?;
    entry.filters.apply()
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
}
