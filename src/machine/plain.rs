//! The plain host path (PID 1 is not systemd): nspawn detached in its own session, driven by signals.

use super::notify::NotifySocket;
use super::{
    cgroup, describe_running, find_ephemeral_copy, first_child, launch_command, wait_until, Host, Machine, MachineSpec,
    Running, SAFE_PATH,
};
use crate::error::{Context, Error, Result};
use crate::store::backend::JobRoot;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct PlainHost;

/// How long to wait after SIGKILL before declaring a machine unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Host for PlainHost {
    fn start(&self, spec: &MachineSpec) -> Result<(Running, Option<String>)> {
        // Its own cgroup, so that its limits apply and no other machine shares (or sees) it.
        let cgroups = cgroup::create(&spec.machine, &spec.limits)?;
        let started = start_in(spec, &cgroups);
        if started.is_err() {
            if let Err(e) = cgroup::remove(&cgroups.dirs) {
                log::warn!("{e}");
            }
        }
        started
    }

    fn stop(&self, machine: &Machine, timeout: Duration) -> Result<()> {
        stop_machine(machine, timeout)?;
        let cgroups = machine.running.as_ref().map(|r| r.cgroups.as_slice()).unwrap_or_default();
        cgroup::remove(cgroups)
    }
}

/// Boots the machine with nspawn in `cgroups`.
fn start_in(spec: &MachineSpec, cgroups: &cgroup::MachineCgroups) -> Result<(Running, Option<String>)> {
    let socket = NotifySocket::bind(&spec.machine)?;
    // Appending: a health check adds its own lines to the same log while nspawn still writes.
    crate::store::remove_if_present(&spec.log)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("creating {}", spec.log.display()))?;
    let log_err = log.try_clone().context("duplicating log file")?;
    let (program, args) = launch_command(spec, false, cgroups.dirs.clone())?;
    let mut command = Command::new(program);
    command
        .args(args)
        // Nothing of gitlab-runner's environment (job secrets, its TMPDIR) reaches nspawn.
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env("NOTIFY_SOCKET", socket.env_value())
        // gitlab-runner waits for EOF on the stage's stdout/stderr: the machine must not hold them.
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe. A new session keeps the machine out of the
    // stage's process group, which gitlab-runner signals when the stage ends or times out.
    unsafe {
        command.pre_exec(|| {
            // The stage may have deferred its stop signals; nspawn must get them normally.
            nix::sys::signal::SigSet::empty().thread_set_mask().map_err(std::io::Error::from)?;
            nix::unistd::setsid().map(drop).map_err(std::io::Error::from)
        });
    }
    if spec.dies_with_caller {
        crate::signals::terminate_with_parent(&mut command);
    }
    let mut child = command.spawn().context("starting systemd-nspawn")?;
    let nspawn_pid = child.id() as i32;
    let ready = socket.wait_ready(spec.ready_timeout, || match child.try_wait() {
        Ok(Some(status)) => Some(Error::new(format!(
            "systemd-nspawn exited ({status}) before the machine was ready: {}",
            log_tail(&spec.log)
        ))),
        _ if crate::signals::stop_requested() => Some(Error::new("interrupted while the machine was booting")),
        _ => None,
    });
    let ready = match ready {
        Ok(ready) => ready,
        Err(e) => {
            abort_boot(&mut child, spec);
            return Err(e.context(format!("starting machine {}", spec.machine)));
        }
    };
    let leader_pid = ready
        .leader_pid
        .or_else(|| first_child(nspawn_pid))
        .ok_or_else(|| Error::new(format!("machine {} has no init process", spec.machine)))?;
    // The child is deliberately not waited for: it outlives this stage.
    let mut running = describe_running(nspawn_pid, leader_pid, spec)?;
    running.cgroup = Some(cgroups.main.clone());
    running.cgroups = cgroups.dirs.clone();
    Ok((running, None))
}

/// Powers the machine off (SIGTERM to nspawn), killing it after `timeout`.
fn stop_machine(machine: &Machine, timeout: Duration) -> Result<()> {
    let Some(running) = &machine.running else { return Ok(()) };
    let alive = || running.nspawn_alive() || running.leader_alive();
    if !alive() {
        return Ok(());
    }
    if running.nspawn_alive() {
        // nspawn passes this on as its --kill-signal: an immediate poweroff of the machine.
        let _ = kill(Pid::from_raw(running.nspawn_pid), Signal::SIGTERM);
    } else {
        // nspawn died (killed, crashed): tell the orphaned init directly. SIGRTMIN+14 is
        // systemd's immediate poweroff; nix's Signal has no real-time signals.
        // SAFETY: kill(2) with plain integers; the pid was just checked to be the machine's init.
        unsafe { libc::kill(running.leader_pid, libc::SIGRTMIN() + 14) };
    }
    if wait_until(timeout, || !alive()) {
        return Ok(());
    }
    log::warn!("machine {} did not power off in {} s, killing it", machine.name, timeout.as_secs());
    let leader = running.leader_alive().then_some(running.leader_pid);
    kill_machine(if running.nspawn_alive() { running.nspawn_pid } else { 0 }, leader);
    if wait_until(KILL_WAIT, || !alive()) {
        Ok(())
    } else {
        Err(Error::new(format!("machine {} survived SIGKILL", machine.name)))
    }
}

/// Ends a machine that is still booting without leaving its ephemeral copy behind: its init
/// is SIGKILLed (ending the machine), so that nspawn itself sees it exit and removes the copy.
/// A SIGTERM would not do: an init that has not installed its handlers yet ignores it.
fn abort_boot(child: &mut Child, spec: &MachineSpec) {
    let nspawn_pid = child.id() as i32;
    let leader = first_child(nspawn_pid);
    let copy = match (spec.root, leader) {
        (JobRoot::EphemeralSnapshot, Some(leader)) => find_ephemeral_copy(leader, &spec.tree).ok().flatten(),
        _ => None,
    };
    match leader {
        Some(leader) => drop(kill(Pid::from_raw(leader), Signal::SIGKILL)),
        None => drop(kill(Pid::from_raw(nspawn_pid), Signal::SIGTERM)),
    }
    let exited = wait_until(KILL_WAIT, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        kill_machine(nspawn_pid, first_child(nspawn_pid));
        let _ = child.wait();
    }
    if let Some(copy) = copy.filter(|c| c.exists()) {
        if let Err(e) = spec.leftovers.delete(Some(&copy)) {
            log::warn!("cannot remove {} (gc will): {e}", copy.display());
        }
    }
}

/// SIGKILLs the machine's init (which ends every process in it) and nspawn.
fn kill_machine(nspawn_pid: i32, leader_pid: Option<i32>) {
    if let Some(leader) = leader_pid {
        let _ = kill(Pid::from_raw(leader), Signal::SIGKILL);
    }
    if nspawn_pid > 0 {
        let _ = kill(Pid::from_raw(nspawn_pid), Signal::SIGKILL);
    }
}

/// The last line nspawn wrote, for a one-line error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
    format!("{} (full log: {})", last.trim(), log.display())
}
