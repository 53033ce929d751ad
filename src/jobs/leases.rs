//! Which snapshots live jobs lease, and what crashed jobs left: the job side of gc.

use super::state::{JobState, Phase, StateDir};
use crate::error::Result;
use crate::names::JobId;
use crate::store::busy;
use crate::store::gc::{InUse, Leases};
use crate::store::{Image, Store};
use std::collections::HashSet;

/// True while job `state` may still use what it holds: by its record (see `JobState::is_live`),
/// or because its machine runs though the record says otherwise (`machines`, see
/// `machine::machines_running`).
fn is_live(state: &JobState, busy: bool, machines: &HashSet<String>) -> bool {
    state.is_live(busy) || machines.contains(&state.machine.name)
}

/// What the live jobs among `states` hold in `image`.
pub fn in_use(image: &Image, states: &[(JobState, bool)]) -> InUse {
    let mut in_use = InUse::default();
    let machines = crate::machine::machines_running();
    for (state, busy) in states {
        if state.store != image.store().root() || state.image != *image.name() || !is_live(state, *busy, &machines) {
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
    let machines = crate::machine::machines_running();
    for (state, busy) in states.all()? {
        if state.store != store.root() {
            continue;
        }
        if is_live(&state, busy, &machines) {
            claimed.insert(state.job_id.machine_name());
            continue;
        }
        // Lock it so a prepare or cleanup of the same job cannot start meanwhile.
        let Ok(Some(_lock)) = states.try_lock_job(&state.job_id) else { continue };
        let copy = state.machine.running.as_ref().and_then(|r| r.ephemeral.as_deref());
        let leftovers = store.job_leftovers(&state.image, &state.snapshot, &state.job_id);
        if let Some(user) = leftovers.delete_unless_used(copy)? {
            // Its record says dead, the kernel says otherwise: leave it to the job's cleanup.
            log::warn!("gc: not reaping job {}: {user}", state.job_id);
            claimed.insert(state.job_id.machine_name());
            continue;
        }
        let running = state.machine.running.as_ref().map(|r| r.cgroups.as_slice());
        let booting = state.machine.booting.as_ref().map(|b| b.cgroups.as_slice());
        crate::machine::cgroup::remove(running.or(booting).unwrap_or_default())?;
        states.remove(&state.job_id)?;
        states.remove_lock(&state.job_id)?;
        reaped.push(state.job_id.machine_name());
    }
    let users = busy::Users::scan();
    for machine in store.job_dirs()? {
        if claimed.contains(&machine) || reaped.contains(&machine) {
            continue;
        }
        // A prepare may have made it since the records were read: it holds the job's lock and
        // has recorded the job before it made the directory.
        let job = machine.strip_prefix("run-").and_then(|id| JobId::parse(id).ok());
        let _lock = match &job {
            Some(job) => match states.try_lock_job(job)? {
                Some(lock) if states.load(job).ok().flatten().is_none() => Some(lock),
                _ => continue,
            },
            None => None,
        };
        let user = store.delete_unclaimed_job_dir(&machine, &users)?;
        if let Some(user) = &user {
            log::warn!("gc: not deleting {}: {user}", store.job_dir(&machine).display());
        }
        if let Some(job) = &job {
            states.remove_lock(job)?;
        }
        if user.is_none() {
            reaped.push(machine);
        }
    }
    if !reaped.is_empty() {
        store.make_job_deletions_durable()?;
    }
    Ok(reaped)
}
