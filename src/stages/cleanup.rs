//! The cleanup stage: power the job's machine off and remove everything the job left.

use crate::error::Result;
use crate::jobs::state::{JobState, Phase};
use crate::jobs::JobContext;
use crate::machine::{self, Host};
use crate::store::Store;

/// Cleans up the job; a job that never started or is already gone is fine.
pub fn cleanup(ctx: &JobContext) -> Result<()> {
    if !ctx.settings.state_dir.exists() {
        return Ok(());
    }
    let host = machine::host(&ctx.settings);
    cleanup_job(ctx, host.as_ref(), |ctx| Store::open(&ctx.settings))
}

/// cleanup on `host`; `open_store` is only called when there is a job record.
pub fn cleanup_job(
    ctx: &JobContext,
    host: &dyn Host,
    open_store: impl FnOnce(&JobContext) -> Result<Store>,
) -> Result<()> {
    let _job_lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
    match ctx.states.load(&ctx.job)? {
        Some(state) => clean_job(ctx, host, &open_store(ctx)?, state)?,
        None => ctx.states.remove(&ctx.job)?,
    }
    ctx.states.remove_lock(&ctx.job)
}

/// Stops the machine of `state` and removes its copies, job directory and state files.
/// The caller holds the job lock.
pub fn clean_job(ctx: &JobContext, host: &dyn Host, store: &Store, mut state: JobState) -> Result<()> {
    if state.phase != Phase::Pinned {
        state.phase = Phase::Stopping;
        // Only for `status`: failing to record it must not keep the machine running.
        if let Err(e) = ctx.states.save(&state) {
            log::warn!("job {}: {e}", ctx.job);
        }
        host.stop(&state.machine, ctx.settings.stop_timeout())?;
        // nspawn removes its ephemeral copy when it exits normally; not when it was killed.
        let copy = state.machine.running.as_ref().and_then(|r| r.ephemeral.as_deref());
        store.job_leftovers(&state.image, &state.snapshot, &ctx.job).delete(copy)?;
    }
    ctx.states.remove(&ctx.job)
}
