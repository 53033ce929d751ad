//! The health check before a commit: a transaction's tree, booted like a job's machine, must reach
//! systemd `running` or `degraded`, have bash and git, and pass the image's own smoke script.

use crate::error::{Context, Error, Result};
use crate::jobs::env::JobEnv;
use crate::jobs::state::{JobState, Phase, StateDir};
use crate::jobs::JobContext;
use crate::machine::{self, Host, MachineSpec, Running, ScriptOutcome};
use crate::names::{ImageName, JobId, SnapshotName};
use crate::settings::{ImageSettings, Settings};
use crate::stages::cleanup::clean_job;
use crate::stages::prepare::{job_binds, pick_uid_range, start_recorded, JobPlan};
use crate::store::backend::JobRoot;
use crate::store::remove_if_present;
use crate::store::transaction::Transaction;
use crate::store::Store;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// The log of the last failed check of `image`: `.check-<image>.log` in the store's root, beside
/// the image directory rather than in it, so that it outlives a failed creation, which deletes
/// that. No image, snapshot or job directory: gc and `image list` leave it alone; a passing check
/// and `image remove` delete it.
pub fn log_path(store: &Store, image: &ImageName) -> PathBuf {
    store.root().join(format!(".check-{image}.log"))
}
/// Marks the lines of the check script that say what failed.
const MARK: &str = "nspawn-runner-check:";
/// Exit codes of the check script.
const SYSTEMD_NOT_UP: i32 = 3;
const NO_GIT: i32 = 4;

/// Checks the transaction's tree (unless the settings skip it), then commits it. A tree that
/// fails is not committed: the caller drops the transaction, which deletes it.
pub fn commit_checked(settings: &Settings, tx: Transaction) -> Result<SnapshotName> {
    check(settings, &tx)?;
    tx.commit()
}

fn check(settings: &Settings, tx: &Transaction) -> Result<()> {
    let image = tx.image();
    if !settings.check || !ImageSettings::load(&settings.config_dir, image.name())?.checked() {
        log::info!("image {}: health check skipped (check=false)", image.name());
        return Ok(());
    }
    let log = log_path(image.store(), image.name());
    let smoke = settings.config_dir.join(format!("{}.check", image.name()));
    let smoke = smoke.is_file().then_some(smoke);
    let ctx = JobContext {
        settings: settings.clone(),
        env: JobEnv::default(),
        job: check_job(tx.name())?,
        states: StateDir::new(settings),
    };
    let host = machine::host(settings);
    log::info!("image {}: booting {} to check it", image.name(), tx.tree().display());
    match boot_and_check(&ctx, host.as_ref(), tx, &log, smoke.as_deref()) {
        Ok(()) => remove_if_present(&log),
        Err(e) => Err(e.context(format!("health check of the new tree failed (log: {})", log.display()))),
    }
}

/// The check's machine is a job of the state dir (`run-check-<snapshot>`), so its uid range is
/// reserved from jobs, `status` shows it, and gc reaps what a killed check left.
fn check_job(snapshot: &SnapshotName) -> Result<JobId> {
    JobId::parse(&format!("check-{}", snapshot.to_string().replace('_', "-")))
}

fn boot_and_check(ctx: &JobContext, host: &dyn Host, tx: &Transaction, log: &Path, smoke: Option<&Path>) -> Result<()> {
    let plan = JobPlan::new(&ctx.settings, tx.image().store(), tx.image().name(), None)?;
    // A stop request must not leave the machine booting with nobody to stop it.
    let _deferred = crate::signals::Deferred::block();
    ctx.settings.ensure_state_dir()?;
    let _lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
    let mut machine = CheckMachine::record(ctx, host, tx, plan.privileged)?;
    let checked = machine.start(plan, log).and_then(|running| run_checks(ctx, &running, log, smoke));
    let stopped = machine.stop();
    ctx.states.remove_lock(&ctx.job)?;
    checked.and(stopped)
}

/// The check's machine and its record; dropped without `stop`, it is stopped all the same.
struct CheckMachine<'a> {
    ctx: &'a JobContext,
    host: &'a dyn Host,
    tx: &'a Transaction<'a>,
    state: JobState,
    stopped: bool,
}

impl<'a> CheckMachine<'a> {
    /// Records the machine with a uid range of its own (unless the image is `privileged`).
    fn record(ctx: &'a JobContext, host: &'a dyn Host, tx: &'a Transaction<'a>, privileged: bool) -> Result<Self> {
        let image = tx.image();
        let mut state = JobState::pinned(
            ctx.job.clone(),
            image.store().root().to_path_buf(),
            image.name().clone(),
            tx.name().clone(),
        );
        state.phase = Phase::Booting;
        {
            let _ranges = pick_uid_range(ctx, &mut state, privileged)?;
            ctx.states.save(&state)?;
        }
        Ok(CheckMachine { ctx, host, tx, state, stopped: false })
    }

    /// Boots the tree as the image's jobs boot (root kind, user namespace, binds, limits).
    fn start(&mut self, plan: JobPlan, log: &Path) -> Result<Running> {
        let (settings, tx) = (&self.ctx.settings, self.tx);
        let store = tx.image().store();
        let machine = self.state.machine.name.clone();
        if plan.root == JobRoot::Overlay {
            // Recorded before it exists, like a job's: a killed check leaves nothing unrecorded.
            self.state.job_dir = Some(store.job_dir(&machine));
            self.ctx.states.save(&self.state)?;
            store.create_job_dir(&machine, tx.tree())?;
        }
        let mut properties = plan.properties;
        // A check runs for seconds; a unit whose maintenance was killed must not run on.
        properties.push(format!("RuntimeMaxSec={}", 3 * settings.prepare_timeout + settings.stop_timeout));
        let spec = MachineSpec {
            machine,
            tree: tx.tree().to_path_buf(),
            root: plan.root,
            uid_base: self.state.machine.uid_base,
            job_dir: self.state.job_dir.clone(),
            leftovers: store.job_leftovers(&self.state.image, &self.state.snapshot, &self.state.job_id),
            binds: job_binds(settings, None, plan.image_binds, self.state.machine.uid_base.is_some()),
            properties,
            limits: plan.limits,
            log: log.to_path_buf(),
            ready_timeout: settings.prepare_timeout(),
            stop_timeout: settings.stop_timeout(),
            dies_with_caller: true,
        };
        start_recorded(self.ctx, self.host, &mut self.state, &spec).map_err(|e| e.context("booting"))?;
        let running = self.state.machine.running.clone().ok_or_else(|| Error::new("the host reported no machine"))?;
        if let Some(unit) = &self.state.machine.unit {
            append(log, &format!("{MARK} the console output is in the journal: journalctl -u {unit}\n"))?;
        }
        Ok(running)
    }

    /// Stops the machine and deletes what it left and its record.
    fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        clean_job(self.ctx, self.host, self.tx.image().store(), self.state.clone())
    }
}

impl Drop for CheckMachine<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            if let Err(e) = self.stop() {
                log::warn!("stopping the health check's machine: {e}");
            }
        }
    }
}

/// What the check runs in the booted machine, with bash (whose absence fails it): systemd must
/// come up within `timeout` seconds, git must be there.
fn check_script(timeout: u64) -> String {
    format!(
        r#"state=$(timeout {timeout} systemctl is-system-running --wait 2>&1)
echo "{MARK} systemd is $state"
case "$state" in
running) ;;
degraded) systemctl --no-pager --failed ;;
*) systemctl --no-pager --failed; exit {SYSTEMD_NOT_UP} ;;
esac
command -v git >/dev/null || {{ echo "{MARK} git is missing"; exit {NO_GIT}; }}
"#
    )
}

/// Runs the checks and the smoke script `smoke` in the machine, their output going to `log`.
fn run_checks(ctx: &JobContext, running: &Running, log: &Path, smoke: Option<&Path>) -> Result<()> {
    let script = script_file(&check_script(ctx.settings.prepare_timeout))?;
    let outcome = run_logged(ctx, running, &fd_path(&script), log).map_err(|e| e.context("running the checks"))?;
    match outcome {
        ScriptOutcome::Exited(0) => {}
        ScriptOutcome::Exited(SYSTEMD_NOT_UP) => {
            let said = last_mark(log).unwrap_or_else(|| "systemd did not come up".to_owned());
            return Err(Error::new(format!("{said}, not running or degraded")));
        }
        ScriptOutcome::Exited(NO_GIT) => return Err(Error::new("git is missing (jobs need it to fetch sources)")),
        ScriptOutcome::Exited(code) => return Err(Error::new(format!("the check script exited with {code}"))),
        ScriptOutcome::Terminated => return Err(Error::new("interrupted")),
    }
    if let Some(smoke) = smoke {
        log::info!("running the smoke script {}", smoke.display());
        match run_logged(ctx, running, smoke, log)? {
            ScriptOutcome::Exited(0) => {}
            ScriptOutcome::Exited(code) => return Err(Error::new(format!("{} exited with {code}", smoke.display()))),
            ScriptOutcome::Terminated => return Err(Error::new("interrupted")),
        }
    }
    // Asked to stop meanwhile: nothing is committed.
    if crate::signals::stop_requested() {
        return Err(Error::new("interrupted"));
    }
    Ok(())
}

/// `run_script` with its stdout and stderr (ours, which it passes on) appended to `log`.
fn run_logged(ctx: &JobContext, running: &Running, script: &Path, log: &Path) -> Result<ScriptOutcome> {
    let _redirected = Redirected::to(&open_log(log)?)?;
    machine::run_script(running, script, &ctx.states.seccomp_path(&ctx.job), ctx.settings.stop_timeout())
}

/// Our stdout and stderr pointed at a file until dropped (this admin process is single-threaded).
struct Redirected {
    saved: [File; 2],
}

impl Redirected {
    fn to(file: &File) -> Result<Redirected> {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let dup = |fd: i32| {
            nix::unistd::dup(fd).map(|fd| {
                // SAFETY: dup returned a new descriptor that nothing else owns.
                unsafe { File::from_raw_fd(fd) }
            })
        };
        let saved = [dup(1).context("saving stdout")?, dup(2).context("saving stderr")?];
        for fd in [1, 2] {
            nix::unistd::dup2(file.as_raw_fd(), fd).context("redirecting the check's output")?;
        }
        Ok(Redirected { saved })
    }
}

impl Drop for Redirected {
    fn drop(&mut self) {
        for (fd, saved) in [1, 2].into_iter().zip(&self.saved) {
            let _ = nix::unistd::dup2(saved.as_raw_fd(), fd);
        }
    }
}

/// An anonymous file holding `text` (nothing on disk to leak if we are killed).
fn script_file(text: &str) -> Result<File> {
    // SAFETY: a NUL-terminated name and flags; the result is a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"nspawn-runner-check".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context("creating the check script"));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(text.as_bytes()).context("writing the check script")?;
    Ok(file)
}

/// A path that opens `file` afresh (at its start).
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The log, for appending (nspawn may still write its console output to it).
fn open_log(log: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))
}

fn append(log: &Path, text: &str) -> Result<()> {
    open_log(log)?.write_all(text.as_bytes()).with_context(|| format!("writing {}", log.display()))
}

/// The last line the check script marked, as one short printable line (it comes from the machine).
fn last_mark(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().rev().find_map(|l| l.strip_prefix(MARK))?;
    let line: String = line.trim().chars().filter(|c| !c.is_control()).take(120).collect();
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_machines_are_jobs_named_after_the_snapshot() {
        let job = check_job(&SnapshotName::new(1764061300, 4242)).unwrap();
        assert_eq!(job.machine_name(), "run-check-1764061300-4242");
    }

    #[test]
    fn the_failure_said_last_is_one_clean_line() {
        let log = std::env::temp_dir().join(format!("nspawn-runner-check-log-{}", std::process::id()));
        std::fs::write(&log, format!("boot\n{MARK} systemd is starting\x1b[0m\nmore\n")).unwrap();
        assert_eq!(last_mark(&log).as_deref(), Some("systemd is starting[0m"));
        std::fs::write(&log, "nothing marked\n").unwrap();
        assert_eq!(last_mark(&log), None);
        std::fs::remove_file(&log).unwrap();
    }

    #[test]
    fn the_check_script_bounds_the_wait_and_names_its_failures() {
        let script = check_script(42);
        assert!(script.contains("timeout 42 systemctl is-system-running --wait"), "{script}");
        assert!(script.contains(&format!("exit {SYSTEMD_NOT_UP}")) && script.contains(&format!("exit {NO_GIT}")));
    }
}
