//! Per-job state files under the state dir: which machine, image and snapshot a job uses.

use crate::error::{Context, Error, Result};
use crate::lock::{Lock, Mode};
use crate::names::JobId;
use crate::settings::Settings;
use crate::store::remove_if_present;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything later stages (and gc) need to know about a job's machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub job_id: String,
    pub machine: String,
    /// The store root the job's image lives in.
    pub store: PathBuf,
    pub image: String,
    /// The snapshot the job is pinned to (a lease gc respects).
    pub snapshot: String,
    /// Per-job writable layer directory (overlay stores), removed at cleanup.
    pub job_dir: Option<PathBuf>,
    /// The transient unit, when started through systemd.
    pub unit: Option<String>,
    /// The machine's processes, once it is up.
    pub running: Option<Running>,
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
}

impl Running {
    /// True while the machine's init still runs.
    pub fn leader_alive(&self) -> bool {
        process_start_time(self.leader_pid) == Some(self.leader_start_time)
    }

    pub fn nspawn_alive(&self) -> bool {
        process_start_time(self.nspawn_pid) == Some(self.nspawn_start_time)
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

/// The state files of one state dir.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(settings: &Settings) -> StateDir {
        StateDir { dir: settings.state_dir.clone() }
    }

    pub fn path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.json"))
    }

    /// Where the machine's console output goes (shown when a boot fails).
    pub fn log_path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.log"))
    }

    /// Serialises prepare and cleanup of one job; gc skips jobs whose lock is held.
    pub fn lock_job(&self, job: &JobId, timeout: Duration) -> Result<Lock> {
        Lock::acquire(&self.lock_path(job.as_str()), Mode::Exclusive, timeout, &format!("job {job}"))
    }

    /// Takes the job's lock only if nobody holds it.
    pub fn try_lock_job(&self, job: &JobId) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.lock_path(job.as_str()), Mode::Exclusive)
    }

    fn lock_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.lock"))
    }

    pub fn load(&self, job: &JobId) -> Result<Option<JobState>> {
        load_file(&self.path(job))
    }

    /// Writes the state atomically (temporary file + rename).
    pub fn save(&self, state: &JobState) -> Result<()> {
        let path = self.dir.join(format!("{}.json", state.job_id));
        let temp = self.dir.join(format!(".{}.json.tmp", state.job_id));
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::new(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("writing {}", temp.display()))?;
        file.write_all(&json).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", temp.display()))?;
        std::fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Removes the job's state and log files.
    pub fn remove(&self, job: &JobId) -> Result<()> {
        remove_if_present(&self.path(job))?;
        remove_if_present(&self.log_path(job))
    }

    /// Removes the job's lock file, once the job is over (its holder may still hold it).
    pub fn remove_lock(&self, job: &JobId) -> Result<()> {
        remove_if_present(&self.lock_path(job.as_str()))
    }

    /// Every job with a state file, with whether somebody holds its lock right now.
    pub fn all(&self) -> Result<Vec<(JobState, bool)>> {
        let mut states = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(states),
            other => other.with_context(|| format!("listing {}", self.dir.display()))?,
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(job_id) = name.strip_suffix(".json") else { continue };
            if JobId::parse(job_id).is_err() {
                continue;
            }
            if let Some(state) = load_file(&entry.path())? {
                let busy = Lock::try_acquire(&self.lock_path(job_id), Mode::Exclusive)?.is_none();
                states.push((state, busy));
            }
        }
        states.sort_by(|a, b| a.0.job_id.cmp(&b.0.job_id));
        Ok(states)
    }
}

fn load_file(path: &Path) -> Result<Option<JobState>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from(e).context(format!("reading {}", path.display()))),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::new(format!("corrupt state file {}: {e}", path.display()))),
    }
}

impl JobState {
    /// True while the job may still use its snapshot: its machine runs, or prepare/cleanup
    /// is working on it right now (`busy`).
    pub fn is_live(&self, busy: bool) -> bool {
        busy || self.running.as_ref().is_some_and(Running::leader_alive)
    }
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
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = JobState {
            job_id: "42".into(),
            machine: "run-42".into(),
            store: "/var/lib/nspawn-runner".into(),
            image: "bookworm".into(),
            snapshot: "1700000000_1".into(),
            job_dir: None,
            unit: Some("nspawn-runner-run-42.service".into()),
            running: Some(Running {
                nspawn_pid: 10,
                nspawn_start_time: 1,
                leader_pid: 11,
                leader_start_time: 2,
                ephemeral: None,
                cgroup: Some("/machine.slice/nspawn-runner-run-42.service".into()),
            }),
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
        assert!(state.is_live(true));
        assert!(!state.is_live(false), "pid 11 with start time 2 is not alive");
    }
}
