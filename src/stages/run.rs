//! The run stage: one gitlab-runner script, run with bash as root inside the job's machine.

use crate::error::{Error, Result};
use crate::jobs::env::EXIT_CODES;
use crate::jobs::state::{JobState, Phase};
use crate::jobs::JobContext;
use crate::machine::{self, ScriptOutcome};
use std::path::Path;
use std::time::Duration;

/// How long a SIGKILLed script's machine gets to finish dying, to tell the two cases apart.
const MACHINE_DEATH_WAIT: Duration = Duration::from_secs(2);

/// Runs `script` (stage `stage`, any name) in the job's machine. Ok(()) when it succeeded; a
/// `Build` error when the script failed; a `System` error when the machine is gone or broken.
pub fn run(ctx: &JobContext, script: &Path, stage: &str) -> Result<()> {
    let state = ctx.states.load(&ctx.job)?.ok_or_else(|| {
        Error::new(format!("job {}: no machine (prepare did not run, or cleanup already did)", ctx.job))
    })?;
    let machine = &state.machine;
    let running = machine
        .running
        .as_ref()
        .filter(|r| r.leader_alive())
        .ok_or_else(|| Error::new(format!("job {}: machine {} is not running", ctx.job, machine.name)))?;
    match machine::run_script(running, script, &ctx.states.seccomp_path(&ctx.job), ctx.settings.stop_timeout())? {
        ScriptOutcome::Exited(0) => Ok(()),
        ScriptOutcome::Exited(code) => {
            if code == 128 + libc::SIGKILL {
                // SIGKILLed: perhaps the machine is going down. The kernel kills the other
                // processes of the machine's pid namespace before its init is gone, so give the
                // init a moment: the stage then reports a dead machine, not a failed script.
                machine::wait_until(MACHINE_DEATH_WAIT, || !running.leader_alive());
            }
            if !running.leader_alive() {
                return Err(Error::new(format!("machine {} died during stage {stage}", machine.name)));
            }
            record_exit_code(code);
            record_job_failure(ctx, &state, stage);
            Err(Error::build(format!("stage {stage} failed with exit code {code}")))
        }
        ScriptOutcome::Terminated => Err(Error::build(format!("stage {stage} was terminated"))),
    }
}

/// Stages whose failure does not fail the job (gitlab-runner only warns about them).
const STAGES_THAT_DO_NOT_FAIL_THE_JOB: [&str; 4] =
    ["after_script", "archive_cache", "archive_cache_on_failure", "cleanup_file_variables"];

/// Marks the job failed in its record, so cleanup can keep its machine (NSPAWN_RUNNER_KEEP_FAILED).
/// Under the job's lock, and only while the record is still there: a cleanup that already
/// runs (a cancelled job) must not find it rewritten, or recreated once it is gone.
fn record_job_failure(ctx: &JobContext, state: &JobState, stage: &str) {
    if state.failed || STAGES_THAT_DO_NOT_FAIL_THE_JOB.contains(&stage) {
        return;
    }
    let recorded = (|| {
        let Some(_lock) = ctx.states.try_lock_job(&ctx.job)? else { return Ok(()) };
        match ctx.states.load(&ctx.job)? {
            Some(mut state) if state.phase == Phase::Running => {
                state.failed = true;
                ctx.states.save(&state)
            }
            Some(_) => Ok(()),
            // cleanup is over: our locking must not leave a lock file behind either
            None => ctx.states.remove_lock(&ctx.job),
        }
    })();
    if let Err(e) = recorded {
        log::warn!("job {}: recording the failure: {e}", ctx.job);
    }
}

/// Tells gitlab-runner the script's real exit code (>= 17.9 reads it with exit code 1, so
/// `allow_failure: exit_codes` works). Written only together with a build failure exit.
fn record_exit_code(code: i32) {
    if EXIT_CODES.build_failure != 1 {
        return; // gitlab-runner reads the file only when the stage exits 1
    }
    if let Some(path) = std::env::var_os("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()) {
        if let Err(e) = std::fs::write(&path, format!("{code}\n")) {
            log::warn!("cannot write {}: {e}", Path::new(&path).display());
        }
    }
}
