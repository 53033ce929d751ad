//! Which snapshots live jobs lease, and what crashed jobs left: the job side of gc.

use super::state::{JobState, Phase, StateDir};
use crate::error::Result;
use crate::store::gc::{InUse, Leases};
use crate::store::{Image, Store};
use std::collections::HashSet;

/// What the live jobs among `states` hold in `image`.
pub fn in_use(image: &Image, states: &[(JobState, bool)]) -> InUse {
    let mut in_use = InUse::default();
    for (state, busy) in states {
        if state.store != image.store().root() || state.image != *image.name() || !state.is_live(*busy) {
            continue;
        }
        in_use.leased.entry(state.snapshot.clone()).or_default().push(state.job_id.clone());
        let copy = state.machine.running.as_ref().and_then(|r| r.ephemeral.as_ref());
        match copy.and_then(|path| path.file_name()) {
            Some(name) => {
                in_use.ephemeral.insert(name.to_string_lossy().into_owned());
            }
            // Its copy may exist without being recorded yet.
            None => in_use.job_starting |= matches!(state.phase, Phase::Pinned | Phase::Booting),
        }
    }
    in_use
}

impl Leases for StateDir {
    fn in_use(&self, image: &Image) -> Result<InUse> {
        Ok(in_use(image, &self.all()?))
    }
}

/// Removes what crashed jobs left in `store`: state files of machines that no longer run, their
/// job directories and ephemeral copies, and job directories nobody claims. Returns the machines.
pub fn reap_crashed(store: &Store, states: &StateDir) -> Result<Vec<String>> {
    let mut reaped = Vec::new();
    let mut claimed = HashSet::new();
    for (state, busy) in states.all()? {
        if state.store != store.root() {
            continue;
        }
        if state.is_live(busy) {
            claimed.insert(state.job_id.machine_name());
            continue;
        }
        // Lock it so a prepare or cleanup of the same job cannot start meanwhile.
        let Ok(Some(_lock)) = states.try_lock_job(&state.job_id) else { continue };
        let copy = state.machine.running.as_ref().and_then(|r| r.ephemeral.as_deref());
        store.job_leftovers(&state.image, &state.snapshot, &state.job_id).delete(copy)?;
        if let Some(running) = &state.machine.running {
            crate::machine::cgroup::remove(&running.cgroups)?;
        }
        states.remove(&state.job_id)?;
        states.remove_lock(&state.job_id)?;
        reaped.push(state.job_id.machine_name());
    }
    for machine in store.job_dirs()? {
        if !claimed.contains(&machine) && !reaped.contains(&machine) {
            store.backend().delete(&store.job_dir(&machine))?;
            reaped.push(machine);
        }
    }
    if !reaped.is_empty() {
        store.make_job_deletions_durable()?;
    }
    Ok(reaped)
}
