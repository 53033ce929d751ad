//! What identifies a job machine on the host: its name, its unit and its processes (with start
//! times, so a reused pid is never taken for the machine).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A job machine as the host knows it; a job's record embeds it (the field names are those of
/// the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// nspawn's machine name, also the machine's hostname.
    #[serde(rename = "machine")]
    pub name: String,
    /// The transient unit, when started through systemd.
    pub unit: Option<String>,
    /// The machine's processes, once it is up.
    pub running: Option<Running>,
    /// What prepare started before the machine was up, recorded before it waits for it
    /// (write-ahead): what a cleanup after a killed prepare stops. None once `running` is known.
    #[serde(default)]
    pub booting: Option<Booting>,
    /// Host uid of root in the machine (the base of its user namespace range); None for a
    /// privileged machine, and in records of versions before user namespaces.
    #[serde(default)]
    pub uid_base: Option<u32>,
}

impl Machine {
    /// A machine that is not started yet.
    pub fn new(name: String) -> Machine {
        Machine { name, unit: None, running: None, booting: None, uid_base: None }
    }

    /// True while the machine's init still runs.
    pub fn is_up(&self) -> bool {
        self.running.as_ref().is_some_and(Running::leader_alive)
    }

    /// True while the nspawn of a machine that was never recorded up still runs (a prepare
    /// killed during the boot leaves it so).
    pub fn is_booting(&self) -> bool {
        self.booting.as_ref().is_some_and(Booting::nspawn_alive)
    }
}

/// A machine on its way up: its cgroups (plain hosts), made before nspawn starts, and nspawn
/// once it is started. Its init is not known yet: it is nspawn's child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booting {
    /// nspawn's pid and start time, once started.
    pub nspawn: Option<(i32, u64)>,
    /// The machine's own cgroup directories (plain hosts), removed at cleanup.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

impl Booting {
    pub fn nspawn_alive(&self) -> bool {
        self.nspawn.is_some_and(|(pid, start)| process_start_time(pid) == Some(start))
    }
}

/// The processes of a started machine, with start times to detect pid reuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub nspawn_pid: i32,
    pub nspawn_start_time: u64,
    pub leader_pid: i32,
    pub leader_start_time: u64,
    /// nspawn's `--ephemeral` copy of the snapshot, if any; removed if nspawn could not.
    pub ephemeral: Option<PathBuf>,
    /// The machine unit's cgroup (systemd hosts), which entered scripts join.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The machine's own cgroup directories (plain hosts), removed at cleanup.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

impl Running {
    /// True while the machine's init still runs.
    pub fn leader_alive(&self) -> bool {
        process_start_time(self.leader_pid) == Some(self.leader_start_time)
    }

    pub fn nspawn_alive(&self) -> bool {
        process_start_time(self.nspawn_pid) == Some(self.nspawn_start_time)
    }

    /// How long ago the machine was started (its nspawn process), by the boot-time clock.
    pub fn age(&self) -> Option<std::time::Duration> {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0)?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        let started = self.nspawn_start_time as f64 / ticks_per_second as f64;
        Some(std::time::Duration::from_secs_f64((uptime - started).max(0.0)))
    }
}

/// The start time (field 22 of /proc/PID/stat, in clock ticks since boot) of a live process.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // after_name starts at field 3 (state); start time is field 22.
    fields.nth(22 - 4)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process_is_stable_and_dead_pids_have_none() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(i32::MAX), None);
        let running = Running {
            nspawn_pid: me,
            nspawn_start_time: t,
            leader_pid: me,
            leader_start_time: t,
            ephemeral: None,
            cgroup: None,
            cgroups: Vec::new(),
        };
        let age = running.age().unwrap();
        assert!(age < std::time::Duration::from_secs(24 * 3600), "this test process started {age:?} ago");
    }
}
