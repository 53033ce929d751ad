//! The cleanup stage: power the job's machine off and remove everything the job left.

use crate::error::Result;
use crate::jobs::env::JobEnv;
use crate::jobs::state::{unix_now, JobState, Phase, StateDir};
use crate::jobs::JobContext;
use crate::machine::{self, Host};
use crate::names::JobId;
use crate::settings::Settings;
use crate::store::Store;

/// Cleans up the job; a job that never started or is already gone is fine.
pub fn cleanup(ctx: &JobContext) -> Result<()> {
    if !ctx.settings.state_dir.exists() {
        return Ok(());
    }
    let host = machine::host(&ctx.settings);
    cleanup_job(ctx, host.as_ref(), |ctx| Store::open(&ctx.settings))
}

/// cleanup on `host`; `open_store` is only called when there is a job record (or kept machines).
pub fn cleanup_job(ctx: &JobContext, host: &dyn Host, open_store: impl Fn(&JobContext) -> Result<Store>) -> Result<()> {
    {
        let _job_lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
        let state = ctx.states.load(&ctx.job)?;
        if let Some(running) = state.as_ref().and_then(|s| s.machine.running.as_ref()).filter(|r| r.leader_alive()) {
            // What SIGKILLed run stages' scripts left ends before the machine is kept for a
            // human, or stopped (which would end it too, less promptly).
            match machine::end_leftover_scripts(running) {
                Ok(0) => {}
                Ok(left) => log::info!("job {}: processes that run stages' scripts left, ended: {left}", ctx.job),
                Err(e) => log::warn!("job {}: ending what run stages' scripts left: {e}", ctx.job),
            }
        }
        match state {
            Some(state) if keeps_machine(ctx, &state) => keep_machine(ctx, state)?,
            Some(state) => clean_job(ctx, host, &open_store(ctx)?, state)?,
            None => ctx.states.remove(&ctx.job)?,
        }
        ctx.states.remove_lock(&ctx.job)?;
    }
    if ctx.settings.keep_failed().is_some() {
        // Nobody else may run gc soon: stop the kept machines whose time is up.
        if let Err(e) = open_store(ctx).and_then(|store| stop_expired_kept(&ctx.settings, host, &store)) {
            log::warn!("stopping expired kept machines: {e}");
        }
    }
    Ok(())
}

/// True when cleanup leaves the job's machine up: the job failed, NSPAWN_RUNNER_KEEP_FAILED is
/// set, and the machine runs (a second cleanup of a kept job stops it).
fn keeps_machine(ctx: &JobContext, state: &JobState) -> bool {
    state.failed && state.phase == Phase::Running && ctx.settings.keep_failed().is_some() && state.machine.is_up()
}

/// Records the machine as kept until NSPAWN_RUNNER_KEEP_FAILED from now.
fn keep_machine(ctx: &JobContext, mut state: JobState) -> Result<()> {
    let minutes = ctx.settings.keep_failed().unwrap_or_default();
    state.phase = Phase::Kept;
    state.kept_until = Some(unix_now() + minutes.as_secs());
    ctx.states.save(&state)?;
    println!(
        "nspawn-runner: job {} failed: machine {} stays up for {} minutes (`nspawn-runner shell {}`)",
        ctx.job,
        state.machine.name,
        minutes.as_secs() / 60,
        ctx.job
    );
    Ok(())
}

/// Cleans up every machine kept after a failure whose time is up; returns their job ids.
pub fn stop_expired_kept(settings: &Settings, host: &dyn Host, store: &Store) -> Result<Vec<JobId>> {
    let now = unix_now();
    let stopped = clean_idle_jobs(settings, host, store, |state| state.kept_expired(now))?;
    Ok(stopped.into_iter().map(|state| state.job_id).collect())
}

/// Cleans up every job older than NSPAWN_RUNNER_MAX_JOB_AGE (none when it is 0), whatever its
/// phase: after a crash of gitlab-runner nobody calls its cleanup. Returns their records.
pub fn stop_over_age(settings: &Settings, host: &dyn Host, store: &Store) -> Result<Vec<JobState>> {
    let Some(max) = settings.max_job_age() else { return Ok(Vec::new()) };
    let now = unix_now();
    clean_idle_jobs(settings, host, store, |state| state.over_age(max, now))
}

/// Cleans up every job of `store` that `due` picks and whose lock nobody holds (a prepare or
/// cleanup working on it), under its lock; returns the records it cleaned. A job that cannot
/// be cleaned is a warning: it must not keep the others running.
fn clean_idle_jobs(
    settings: &Settings,
    host: &dyn Host,
    store: &Store,
    due: impl Fn(&JobState) -> bool,
) -> Result<Vec<JobState>> {
    let mut cleaned = Vec::new();
    for (state, busy) in StateDir::new(settings).all()? {
        if busy || state.store != store.root() || !due(&state) {
            continue;
        }
        let ctx = JobContext {
            settings: settings.clone(),
            env: JobEnv::default(),
            job: state.job_id.clone(),
            states: StateDir::new(settings),
        };
        match clean_if_due(&ctx, host, store, &due) {
            Ok(Some(state)) => cleaned.push(state),
            Ok(None) => {}
            Err(e) => log::warn!("job {}: {e}", ctx.job),
        }
    }
    Ok(cleaned)
}

/// Cleans up the job of `ctx` if nobody holds its lock and its record, read again under the
/// lock (a stage may have changed it since the listing), is still `due`.
fn clean_if_due(
    ctx: &JobContext,
    host: &dyn Host,
    store: &Store,
    due: impl Fn(&JobState) -> bool,
) -> Result<Option<JobState>> {
    let Some(_lock) = ctx.states.try_lock_job(&ctx.job)? else { return Ok(None) };
    match ctx.states.load(&ctx.job)? {
        Some(state) if due(&state) => {
            clean_job(ctx, host, store, state.clone())?;
            ctx.states.remove_lock(&ctx.job)?;
            Ok(Some(state))
        }
        Some(_) => Ok(None),
        // Its cleanup finished meanwhile: our locking must not leave a lock file behind.
        None => ctx.states.remove_lock(&ctx.job).map(|()| None),
    }
}

/// Stops the machine of `state` and removes its copies, job directory and state files.
/// The caller holds the job lock.
pub fn clean_job(ctx: &JobContext, host: &dyn Host, store: &Store, mut state: JobState) -> Result<()> {
    if state.phase != Phase::Pinned {
        state.phase = Phase::Stopping;
        // Only for `status`: failing to record it (a full state dir, when a prepare rolls
        // back for that very reason) must neither keep the machine running nor be news.
        if let Err(e) = ctx.states.save(&state) {
            log::info!("job {}: {e}", ctx.job);
        }
        host.stop(&state.machine, ctx.settings.stop_timeout())?;
        // nspawn removes its ephemeral copy when it exits normally; not when it was killed.
        let copy = state.machine.running.as_ref().and_then(|r| r.ephemeral.as_deref());
        store.job_leftovers(&state.image, &state.snapshot, &ctx.job).delete(copy)?;
    }
    ctx.states.remove(&ctx.job)
}
