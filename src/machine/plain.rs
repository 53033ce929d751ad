//! The plain host path (PID 1 is not systemd): nspawn detached in its own session, driven by signals.

use super::notify::NotifySocket;
use super::{
    cgroup, describe_running, find_ephemeral_copy, first_child, launch_command, process_start_time, spawn, wait_until,
    Booting, Host, Machine, MachineSpec, Running, Save, SAFE_PATH,
};
use crate::error::{Context, Error, Result};
use crate::store::backend::JobRoot;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct PlainHost;

/// How long to wait after SIGKILL before declaring a machine unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Host for PlainHost {
    fn start(&self, spec: &MachineSpec, machine: &mut Machine, save: &mut Save) -> Result<()> {
        // Its own cgroup, so that its limits apply and no other machine shares (or sees) it.
        let cgroups = cgroup::create(&spec.machine, &spec.limits, |planned| {
            machine.booting = Some(Booting { nspawn: None, cgroups: planned.dirs.clone() });
            save(machine)
        })?;
        let started = start_in(spec, &cgroups, machine, save);
        if started.is_err() {
            if let Err(e) = cgroup::remove(&cgroups.dirs) {
                log::warn!("{e}");
            }
        }
        started
    }

    fn stop(&self, machine: &Machine, timeout: Duration) -> Result<()> {
        match (&machine.running, &machine.booting) {
            (Some(running), _) => stop_machine(&machine.name, running, timeout)?,
            (None, Some(Booting { nspawn: Some(nspawn), .. })) => abort_boot(&machine.name, *nspawn)?,
            (None, _) => {}
        }
        let running = machine.running.as_ref().map(|r| r.cgroups.as_slice());
        let booting = machine.booting.as_ref().map(|b| b.cgroups.as_slice());
        cgroup::remove(running.or(booting).unwrap_or_default())
    }
}

/// Boots the machine with nspawn in `cgroups`, recording nspawn in `machine` (and saving it)
/// before it may do anything.
fn start_in(
    spec: &MachineSpec,
    cgroups: &cgroup::MachineCgroups,
    machine: &mut Machine,
    save: &mut Save,
) -> Result<()> {
    let socket = NotifySocket::bind(&spec.machine)?;
    let log = create_log(&spec.log)?;
    let log_err = log.try_clone().context("duplicating log file")?;
    let (program, args) = launch_command(spec, false, cgroups.dirs.clone(), true)?;
    let mut command = Command::new(program);
    command
        .args(args)
        // Nothing of gitlab-runner's environment (job secrets, its TMPDIR) reaches nspawn.
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env("NOTIFY_SOCKET", socket.env_value())
        // The spawn wrapper's gate: it waits for the go on its stdin (see `spawn::SpawnPlan`).
        .stdin(Stdio::piped())
        // gitlab-runner waits for EOF on the stage's stdout/stderr: the machine must not hold them.
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
    let mut gate = child.stdin.take();
    // Write-ahead: the record names nspawn before nspawn may start. Should this stage die
    // before the go, the wrapper reads EOF and exits: no machine ever runs unrecorded.
    let recorded = process_start_time(nspawn_pid)
        .ok_or_else(|| Error::new("the machine's spawn wrapper died at once"))
        .and_then(|start| {
            if let Some(booting) = machine.booting.as_mut() {
                booting.nspawn = Some((nspawn_pid, start));
            }
            save(machine)
        })
        .and_then(|()| {
            let gate = gate.as_mut().ok_or_else(|| Error::new("no pipe to the spawn wrapper"))?;
            gate.write_all(spawn::GO).context("letting the spawn wrapper go")
        });
    drop(gate);
    if let Err(e) = recorded {
        let _ = child.wait();
        return Err(e.context(format!("starting machine {}", spec.machine)));
    }
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
            abort_own_boot(&mut child, spec);
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
    machine.running = Some(running);
    machine.booting = None;
    Ok(())
}

/// Powers the machine off (SIGTERM to nspawn), killing it after `timeout`.
fn stop_machine(name: &str, running: &Running, timeout: Duration) -> Result<()> {
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
    log::warn!("machine {name} did not power off in {} s, killing it", timeout.as_secs());
    let leader = running.leader_alive().then_some(running.leader_pid);
    kill_machine(if running.nspawn_alive() { running.nspawn_pid } else { 0 }, leader);
    if wait_until(KILL_WAIT, || !alive()) {
        Ok(())
    } else {
        Err(Error::new(format!("machine {name} survived SIGKILL")))
    }
}

/// Ends a machine that is still booting, with nspawn `(pid, start time)`, without leaving
/// its ephemeral copy behind: its init (nspawn's child) is SIGKILLed, ending the machine, so
/// that nspawn itself sees it exit and removes the copy. A SIGTERM would not do: an init that
/// has not installed its handlers yet ignores it. nspawn without a child yet gets a SIGTERM.
fn abort_boot(name: &str, (nspawn_pid, start_time): (i32, u64)) -> Result<()> {
    let alive = || process_start_time(nspawn_pid) == Some(start_time);
    let mut told = false;
    let ended = wait_until(KILL_WAIT, || {
        if !alive() {
            return true;
        }
        match first_child(nspawn_pid) {
            Some(child) => drop(kill(Pid::from_raw(child), Signal::SIGKILL)),
            None if !told => told = kill(Pid::from_raw(nspawn_pid), Signal::SIGTERM).is_ok(),
            None => {}
        }
        false
    });
    if ended {
        return Ok(());
    }
    kill_machine(nspawn_pid, first_child(nspawn_pid));
    if wait_until(KILL_WAIT, || !alive()) {
        Ok(())
    } else {
        Err(Error::new(format!("booting machine {name} survived SIGKILL")))
    }
}

/// `abort_boot` of the machine this stage is starting (`child` is its nspawn), which also
/// deletes its ephemeral copy should nspawn not have.
fn abort_own_boot(child: &mut Child, spec: &MachineSpec) {
    let nspawn_pid = child.id() as i32;
    let copy = match (spec.root, first_child(nspawn_pid)) {
        (JobRoot::EphemeralSnapshot, Some(leader)) => find_ephemeral_copy(leader, &spec.tree).ok().flatten(),
        _ => None,
    };
    let ended = process_start_time(nspawn_pid)
        .ok_or_else(|| Error::new("nspawn is gone"))
        .and_then(|start| abort_boot(&spec.machine, (nspawn_pid, start)));
    if let Err(e) = ended {
        log::warn!("{e}");
    }
    let _ = child.wait();
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

/// Room reserved for the machine's console log: its boot and poweroff take a few KiB.
const LOG_RESERVE: i64 = 256 * 1024;

/// Creates the machine's console log with room reserved for it. nspawn fails when it cannot
/// write its console output, and the boot would then end in a puzzling error: a state dir
/// without that room is reported as such before anything starts.
fn create_log(path: &Path) -> Result<std::fs::File> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    // Appending, to a new file: a health check adds its own lines to the same log while nspawn
    // still writes.
    crate::store::remove_if_present(path)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    match fallocate(log.as_raw_fd(), FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, LOG_RESERVE) {
        // A file system that cannot reserve (EOPNOTSUPP) gets its chance with the writes.
        Ok(()) | Err(nix::Error::EOPNOTSUPP) => Ok(log),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(Error::from(std::io::Error::from(e)).context(format!(
                "reserving {} KiB for the console log {}",
                LOG_RESERVE / 1024,
                path.display()
            )))
        }
    }
}

/// The last line nspawn wrote, for a one-line error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
    format!("{} (full log: {})", last.trim(), log.display())
}
