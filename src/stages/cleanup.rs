//! The cleanup stage: power the job's machine off and remove everything the job left.

use crate::error::{Error, Result};
use crate::jobs::state::JobState;
use crate::jobs::JobContext;
use crate::machine;
use crate::machine::Host;
use crate::store::backend;
use crate::store::delete_ephemeral_copy;
use std::path::{Component, Path, PathBuf};

/// Cleans up the job; a job that never started or is already gone is fine.
pub fn cleanup(ctx: &JobContext) -> Result<()> {
    if !ctx.settings.state_dir.exists() {
        return Ok(());
    }
    let _job_lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
    match ctx.states.load(&ctx.job)? {
        Some(state) => clean_job(ctx, machine::host(&ctx.settings).as_ref(), &state)?,
        None => ctx.states.remove(&ctx.job)?,
    }
    ctx.states.remove_lock(&ctx.job)
}

/// Stops the machine of `state` and removes its copies, job directory and state files.
/// The caller holds the job lock.
pub fn clean_job(ctx: &JobContext, host: &dyn Host, state: &JobState) -> Result<()> {
    host.stop(state, ctx.settings.stop_timeout())?;
    // nspawn removes its ephemeral copy when it exits normally; not when it was killed.
    let ephemeral = state.running.as_ref().and_then(|r| r.ephemeral.as_ref());
    let leftovers: Vec<&PathBuf> = ephemeral.into_iter().chain(state.job_dir.as_ref()).collect();
    if let Some(path) = leftovers.iter().find(|p| !is_inside(&state.store, p)) {
        return Err(Error::new(format!("refusing to delete {}: not inside the store", path.display())));
    }
    if !leftovers.is_empty() {
        let store_backend = backend::detect(&state.store)?;
        if let Some(copy) = ephemeral {
            delete_ephemeral_copy(store_backend.as_ref(), copy)?;
        }
        if let Some(job_dir) = &state.job_dir {
            store_backend.delete(job_dir)?;
        }
    }
    ctx.states.remove(&ctx.job)
}

/// True when `path` lies strictly below `store` with no `..` that could lead out of it.
fn is_inside(store: &Path, path: &Path) -> bool {
    path.starts_with(store) && path != store && !path.components().any(|c| c == Component::ParentDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_below_the_store_are_deleted() {
        let store = Path::new("/var/lib/nspawn-runner");
        assert!(is_inside(store, Path::new("/var/lib/nspawn-runner/.jobs/run-1")));
        assert!(!is_inside(store, store));
        assert!(!is_inside(store, Path::new("/var/lib/nspawn-runner/../../etc")));
        assert!(!is_inside(store, Path::new("/var/lib/nspawn-runner-other/x")));
        assert!(!is_inside(store, Path::new("/etc")));
    }
}
