//! Per-job state files under the state dir: which machine, image and snapshot a job uses.

use crate::error::{Context, Error, Result};
use crate::lock::{Lock, Mode};
use crate::machine::Machine;
use crate::names::{ImageName, JobId, SnapshotName};
use crate::settings::Settings;
use crate::store::{remove_if_present, write_atomically};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a job is in its life, as the stage working on it last recorded it. Whether its
/// machine really still runs is a question for the host (`Machine::is_up`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// prepare resolved `current` and recorded the lease; nothing else exists yet.
    Pinned,
    /// prepare is making the job's directory and booting its machine. Also what a state file
    /// of an older version without a phase counts as: it may have anything.
    #[default]
    Booting,
    /// The machine is up; run stages enter it.
    Running,
    /// cleanup is stopping the machine and deleting what the job left.
    Stopping,
    /// The job failed and cleanup left its machine up for debugging (NSPAWN_RUNNER_KEEP_FAILED)
    /// until `kept_until`; gc (or the next cleanup) stops it after that.
    Kept,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pinned => "pinned",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Kept => "kept",
        }
    }
}

/// A job's record: its machine, the snapshot it leases and its phase. Everything later stages
/// (and gc) need to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub job_id: JobId,
    #[serde(flatten)]
    pub machine: Machine,
    /// The store root the job's image lives in.
    pub store: PathBuf,
    pub image: ImageName,
    /// The snapshot the job is pinned to (a lease gc respects).
    pub snapshot: SnapshotName,
    /// Per-job writable layer directory (overlay stores), removed at cleanup.
    pub job_dir: Option<PathBuf>,
    #[serde(default)]
    pub phase: Phase,
    /// A run stage of the job's own scripts failed (a build failure).
    #[serde(default)]
    pub failed: bool,
    /// Kept machines: when (unix seconds) gc may stop them.
    #[serde(default)]
    pub kept_until: Option<u64>,
    /// When (unix seconds) prepare pinned the job: its age, which NSPAWN_RUNNER_MAX_JOB_AGE
    /// bounds. None in records of versions before it.
    #[serde(default)]
    pub pinned_at: Option<u64>,
}

/// The state files of one state dir.
pub struct StateDir {
    dir: PathBuf,
    /// The store every record must be about (the settings', never the record's own word).
    store: PathBuf,
}

impl StateDir {
    pub fn new(settings: &Settings) -> StateDir {
        StateDir { dir: settings.state_dir.clone(), store: settings.root.clone() }
    }

    pub fn path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.json"))
    }

    /// Where the machine's console output goes (shown when a boot fails).
    pub fn log_path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.log"))
    }

    /// The seccomp filters of the job machine's init, read at prepare, loaded by every run.
    pub fn seccomp_path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.seccomp"))
    }

    /// Serialises prepare and cleanup of one job; gc skips jobs whose lock is held.
    pub fn lock_job(&self, job: &JobId, timeout: Duration) -> Result<Lock> {
        Lock::acquire(&self.lock_path(job), Mode::Exclusive, timeout, &format!("job {job}"))
    }

    /// Takes the job's lock only if nobody holds it.
    pub fn try_lock_job(&self, job: &JobId) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.lock_path(job), Mode::Exclusive)
    }

    /// Serialises decisions that depend on every job's record (the choice of a uid range):
    /// a lock on the directory itself, so it leaves no file behind. Held for milliseconds.
    pub fn lock_all(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let dir = std::fs::File::open(&self.dir).with_context(|| format!("opening {}", self.dir.display()))?;
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::from(e).context(format!("locking {}", self.dir.display())))
    }

    fn lock_path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.lock"))
    }

    /// The record of `job`, checked (see `JobState::check`): a record that names anything but
    /// what the settings and the job's name give is refused.
    pub fn load(&self, job: &JobId) -> Result<Option<JobState>> {
        let path = self.path(job);
        match load_file(&path)? {
            Some(state) => {
                state
                    .check(job, &self.store)
                    .map_err(|e| e.context(format!("refusing state file {}", path.display())))?;
                Ok(Some(state))
            }
            None => Ok(None),
        }
    }

    /// Writes the state atomically (temporary file + rename); a failed write leaves nothing.
    pub fn save(&self, state: &JobState) -> Result<()> {
        let temp = self.temp_path(&state.job_id);
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::new(e.to_string()))?;
        write_atomically(&self.path(&state.job_id), &temp, &json)
    }

    /// Where `save` writes the record before it renames it into place.
    fn temp_path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!(".{job}.json.tmp"))
    }

    /// Removes the job's state, log and seccomp files, and the half-written ones a stage killed
    /// while saving leaves.
    pub fn remove(&self, job: &JobId) -> Result<()> {
        remove_if_present(&self.temp_path(job))?;
        remove_if_present(&crate::machine::seccomp_temp_path(&self.seccomp_path(job)))?;
        remove_if_present(&self.path(job))?;
        remove_if_present(&self.seccomp_path(job))?;
        remove_if_present(&self.log_path(job))
    }

    /// Removes the job's lock file, once the job is over (its holder may still hold it).
    pub fn remove_lock(&self, job: &JobId) -> Result<()> {
        remove_if_present(&self.lock_path(job))
    }

    /// Every job with a sound state file, with whether somebody holds its lock right now. A
    /// corrupt or foreign record is skipped with a warning: it must not stop status or gc.
    pub fn all(&self) -> Result<Vec<(JobState, bool)>> {
        let mut states = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(states),
            other => other.with_context(|| format!("listing {}", self.dir.display()))?,
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(Ok(job)) = name.strip_suffix(".json").map(JobId::parse) else { continue };
            match self.load(&job) {
                Ok(Some(state)) => {
                    let busy = Lock::try_acquire(&self.lock_path(&job), Mode::Exclusive)?.is_none();
                    states.push((state, busy));
                }
                Ok(None) => {}
                Err(e) => log::warn!("skipping job {job}: {e}"),
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
    /// The record of job `job_id` pinned to `snapshot`, before anything is started.
    pub fn pinned(job_id: JobId, store: PathBuf, image: ImageName, snapshot: SnapshotName) -> JobState {
        let machine = Machine::new(job_id.machine_name());
        JobState {
            job_id,
            machine,
            store,
            image,
            snapshot,
            job_dir: None,
            phase: Phase::Pinned,
            failed: false,
            kept_until: None,
            pinned_at: Some(unix_now()),
        }
    }

    /// Checks that the record names nothing but what `job` and the store at `store` give: the
    /// store itself, the job's machine and unit, its job directory and an nspawn copy of its
    /// snapshot in its image's directory. Everything cleanup and gc touch is derived from the
    /// settings and these names; a record saying otherwise (damaged, foreign, forged) is refused.
    pub fn check(&self, job: &JobId, store: &Path) -> Result<()> {
        let machine = job.machine_name();
        let refuse = |what: String| Err(Error::new(what));
        if self.job_id != *job {
            return refuse(format!("it is about job {}", self.job_id));
        }
        if self.store != store {
            return refuse(format!("it names store {}, not {}", self.store.display(), store.display()));
        }
        if self.machine.name != machine {
            return refuse(format!("it names machine {:?}, not {machine}", self.machine.name));
        }
        let unit = crate::machine::unit_name(&machine);
        if let Some(other) = self.machine.unit.as_ref().filter(|u| **u != unit) {
            return refuse(format!("it names unit {other:?}, not {unit}"));
        }
        let job_dir = crate::store::job_dir_in(store, &machine);
        if let Some(dir) = self.job_dir.as_ref().filter(|d| **d != job_dir) {
            return refuse(format!("it names job directory {}, not {}", dir.display(), job_dir.display()));
        }
        let copy = self.machine.running.as_ref().and_then(|r| r.ephemeral.as_deref());
        if let Some(copy) = copy.filter(|c| !crate::store::is_copy_of(c, store, &self.image, &self.snapshot)) {
            return refuse(format!("it names {} as its machine's copy", copy.display()));
        }
        // Cleanup kills what runs in them: only this machine's own will do.
        let leaf = crate::machine::cgroup::leaf_name(&machine);
        let running = self.machine.running.iter().flat_map(|r| &r.cgroups);
        let booting = self.machine.booting.iter().flat_map(|b| &b.cgroups);
        if let Some(dir) = running.chain(booting).find(|d| d.file_name() != Some(leaf.as_ref())) {
            return refuse(format!("it names {} as its machine's cgroup", dir.display()));
        }
        Ok(())
    }

    /// True while the job may still use its snapshot: its machine runs or boots (also one whose
    /// prepare was killed), or prepare/cleanup is working on it right now (`busy`).
    pub fn is_live(&self, busy: bool) -> bool {
        busy || self.machine.is_up() || self.machine.is_booting()
    }

    /// How the job stands, for `status`: the phase while a stage works on it (`busy`), else
    /// whether its machine still runs, died, or never came up (a crashed prepare or cleanup).
    pub fn condition(&self, busy: bool) -> &'static str {
        if busy {
            self.phase.as_str()
        } else if self.machine.is_up() {
            if self.phase == Phase::Kept {
                "kept"
            } else {
                "running"
            }
        } else if self.machine.is_booting() {
            // Nobody works on it, yet its nspawn runs: the prepare that started it was killed.
            "abandoned"
        } else if self.machine.running.is_some() {
            "dead"
        } else {
            "crashed"
        }
    }
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl JobState {
    /// True for a machine kept after a failure whose time is up (at unix time `now`).
    pub fn kept_expired(&self, now: u64) -> bool {
        self.phase == Phase::Kept && self.kept_until.is_none_or(|until| until <= now)
    }

    /// Seconds since prepare pinned the job (at unix time `now`); for a record that does not
    /// say, the age of its machine's nspawn process. None when neither is known.
    pub fn age(&self, now: u64) -> Option<u64> {
        match self.pinned_at {
            Some(pinned) => Some(now.saturating_sub(pinned)),
            None => self.machine.running.as_ref().and_then(|r| r.age()).map(|age| age.as_secs()),
        }
    }

    /// True when the job is older than `max` (at unix time `now`).
    pub fn over_age(&self, max: Duration, now: u64) -> bool {
        self.age(now).is_some_and(|age| age > max.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Running;

    fn record() -> JobState {
        let mut state = JobState::pinned(
            JobId::parse("42").unwrap(),
            "/var/lib/nspawn-runner".into(),
            ImageName::parse("bookworm").unwrap(),
            SnapshotName::new(1700000000, 1),
        );
        state.machine.unit = Some("nspawn-runner-run-42.service".into());
        state.machine.running = Some(Running {
            nspawn_pid: 10,
            nspawn_start_time: 1,
            leader_pid: 11,
            leader_start_time: 2,
            ephemeral: None,
            cgroup: Some("/machine.slice/nspawn-runner-run-42.service".into()),
            cgroups: vec![],
        });
        state.phase = Phase::Running;
        state
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = record();
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
        assert!(state.is_live(true));
        assert!(!state.is_live(false), "pid 11 with start time 2 is not alive");
        assert_eq!(state.condition(false), "dead");
        assert_eq!(state.condition(true), "running");
    }

    #[test]
    fn a_record_of_a_machine_left_booting_is_live_while_its_nspawn_runs() {
        let mut state = record();
        state.machine.running = None;
        state.phase = Phase::Booting;
        let me = std::process::id() as i32;
        let start = crate::machine::process_start_time(me).unwrap();
        let cgroups = vec!["/sys/fs/cgroup/nspawn-runner-run-42".into()];
        state.machine.booting = Some(crate::machine::Booting { nspawn: Some((me, start)), cgroups });
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
        assert!(state.check(&JobId::parse("42").unwrap(), Path::new("/var/lib/nspawn-runner")).is_ok());
        assert!(state.is_live(false) && !state.machine.is_up());
        assert_eq!(state.condition(false), "abandoned");
        state.machine.booting = Some(crate::machine::Booting { nspawn: Some((me, start + 1)), cgroups: vec![] });
        assert!(!state.is_live(false), "a reused pid is not the machine's nspawn");
        assert_eq!(state.condition(false), "crashed");
    }

    #[test]
    fn state_files_of_the_previous_version_still_load() {
        let old = r#"{"job_id":"42","machine":"run-42","store":"/s","image":"bookworm","snapshot":"1_2",
            "job_dir":null,"unit":null,"running":null}"#;
        let state: JobState = serde_json::from_str(old).unwrap();
        assert_eq!((state.machine.name.as_str(), state.phase), ("run-42", Phase::Booting));
        assert_eq!(state.condition(false), "crashed");
        assert!(!state.failed && state.kept_until.is_none() && state.pinned_at.is_none());
        assert_eq!(state.age(unix_now()), None, "no prepare time and no machine: no age");
    }

    #[test]
    fn the_age_counts_from_prepare_else_from_the_machine_process() {
        let mut state = record();
        let now = state.pinned_at.unwrap();
        assert_eq!(state.age(now + 30), Some(30));
        assert!(
            state.over_age(Duration::from_secs(29), now + 30) && !state.over_age(Duration::from_secs(30), now + 30)
        );
        // A record of an older version: the machine's process age, here this test process's.
        state.pinned_at = None;
        let me = std::process::id() as i32;
        let running = state.machine.running.as_mut().unwrap();
        (running.nspawn_pid, running.nspawn_start_time) = (me, crate::machine::process_start_time(me).unwrap());
        assert!(state.age(now).is_some_and(|age| age < 24 * 3600));
    }

    #[test]
    fn kept_machines_expire() {
        let mut state = record();
        assert!(!state.kept_expired(100));
        state.phase = Phase::Kept;
        state.kept_until = Some(100);
        assert!(!state.kept_expired(99) && state.kept_expired(100));
        state.kept_until = None;
        assert!(state.kept_expired(0));
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
    }

    #[test]
    fn a_record_naming_another_store_machine_unit_or_directory_is_refused() {
        let (job, store) = (JobId::parse("42").unwrap(), Path::new("/var/lib/nspawn-runner"));
        assert!(record().check(&job, store).is_ok());
        let forged: [fn(&mut JobState); 8] = [
            |s| s.store = "/".into(),
            |s| s.job_dir = Some("/etc".into()),
            |s| s.machine.name = "../x".into(),
            |s| s.machine.unit = Some("sshd.service".into()),
            |s| s.machine.running.as_mut().unwrap().ephemeral = Some("/etc".into()),
            |s| s.job_id = JobId::parse("43").unwrap(),
            |s| s.machine.running.as_mut().unwrap().cgroups = vec!["/sys/fs/cgroup/nspawn-runner-run-43".into()],
            |s| {
                let cgroups = vec!["/sys/fs/cgroup/system.slice".into()];
                s.machine.booting = Some(crate::machine::Booting { nspawn: None, cgroups });
            },
        ];
        for forge in forged {
            let mut state = record();
            forge(&mut state);
            let e = state.check(&job, store).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let mut state = record();
        state.job_dir = Some("/var/lib/nspawn-runner/.jobs/run-42".into());
        state.machine.running.as_mut().unwrap().ephemeral =
            Some("/var/lib/nspawn-runner/bookworm/.#machine.1700000000_1abc".into());
        assert!(state.check(&job, store).is_ok());
    }

    #[test]
    fn a_corrupt_or_foreign_state_file_is_skipped_by_the_listing_but_refused_by_load() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let states = StateDir { dir: dir.clone(), store: "/var/lib/nspawn-runner".into() };
        states.save(&record()).unwrap();
        let (corrupt, foreign) = (JobId::parse("43").unwrap(), JobId::parse("44").unwrap());
        std::fs::write(states.path(&corrupt), b"{not json").unwrap();
        let mut other = record();
        other.job_id = foreign.clone();
        other.machine = Machine::new(foreign.machine_name());
        other.store = "/".into();
        states.save(&other).unwrap();
        let listed: Vec<JobId> = states.all().unwrap().into_iter().map(|(s, _)| s.job_id).collect();
        assert_eq!(listed, [JobId::parse("42").unwrap()]);
        for job in [&corrupt, &foreign] {
            let e = states.load(job).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_names_in_a_state_file_are_refused() {
        let json = serde_json::to_string(&record()).unwrap();
        for (good, bad) in [("\"bookworm\"", "\"../../etc\""), ("\"1700000000_1\"", "\"../x\"")] {
            assert!(serde_json::from_str::<JobState>(&json.replace(good, bad)).is_err(), "{bad} accepted");
        }
    }
}
