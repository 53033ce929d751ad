//! Garbage collection of an image: old snapshots no job needs, leftovers of crashed transactions and machines.

use super::{busy, Entry, Image, CURRENT_TEMP_PREFIX, PENDING_PREFIX};
use crate::error::Result;
use crate::lock::Mode;
use crate::names::{JobId, SnapshotName};
use log::warn;
use std::collections::{BTreeMap, HashSet};

/// What live jobs hold in one image; gc's caller knows the jobs (see `Leases`).
#[derive(Debug, Default)]
pub struct InUse {
    /// Snapshots leased by live jobs, with the ids of those jobs.
    pub leased: BTreeMap<SnapshotName, Vec<JobId>>,
    /// nspawn ephemeral copies (entry names) belonging to running machines.
    pub ephemeral: HashSet<String>,
    /// A live job has not recorded its ephemeral copy yet: keep every ephemeral entry.
    pub job_starting: bool,
}

/// Who tells gc what live jobs hold: asked while gc holds the image's pin lock, so that no job
/// can pin a snapshot between the answer and the deletion.
pub trait Leases {
    fn in_use(&self, image: &Image) -> Result<InUse>;
}

/// Splits the snapshots other than `current` into those beyond the `keep` newest (oldest
/// first) and the `keep` newest, which gc keeps for rollback.
pub fn split_previous<'a>(
    snapshots: impl IntoIterator<Item = &'a SnapshotName>,
    current: &SnapshotName,
    keep: usize,
) -> (Vec<&'a SnapshotName>, Vec<&'a SnapshotName>) {
    let mut others: Vec<&SnapshotName> = snapshots.into_iter().filter(|s| *s != current).collect();
    others.sort();
    let kept = others.split_off(others.len().saturating_sub(keep));
    (others, kept)
}

/// Decides which entries of an image directory to delete. Pure, so it is unit-tested.
/// `current` is `None` when the link is broken: then no snapshot is deleted at all.
/// `busy` are the entries the kernel says are in use (see `busy`), whatever the records say:
/// trees of live machines and the lock files nspawn holds.
pub fn plan(
    entries: &[Entry],
    current: Option<&SnapshotName>,
    in_use: &InUse,
    busy: &HashSet<String>,
    keep: usize,
) -> Vec<String> {
    let mut doomed = Vec::new();
    if let Some(current) = current {
        let snapshots = entries.iter().filter_map(|e| match e {
            Entry::Snapshot(s) => Some(s),
            _ => None,
        });
        let (beyond_keep, _kept) = split_previous(snapshots, current, keep);
        for snapshot in beyond_keep {
            let name = snapshot.to_string();
            if !in_use.leased.contains_key(snapshot) && !busy.contains(&name) {
                doomed.push(name);
            }
        }
    }
    for entry in entries {
        match entry {
            Entry::Pending(name) => doomed.push(name.clone()),
            Entry::Ephemeral(name)
                if !in_use.job_starting && !in_use.ephemeral.contains(name) && !busy.contains(name) =>
            {
                doomed.push(name.clone())
            }
            Entry::Bookkeeping(name) if name.starts_with(CURRENT_TEMP_PREFIX) => doomed.push(name.clone()),
            Entry::NspawnLock(name) if !busy.contains(name) => doomed.push(name.clone()),
            _ => {}
        }
    }
    doomed
}

/// The entries of `image` the kernel says are in use: nspawn lock files somebody holds, and
/// snapshots and copies some process, mount or nspawn uses (a machine whose record is lost or
/// was never written). Listed after `entries`: a copy made since is not among them, and nspawn
/// locks a copy before it makes it.
fn busy_entries(image: &Image, entries: &[Entry]) -> HashSet<String> {
    let users = busy::Users::scan();
    let mut in_use = HashSet::new();
    for entry in entries {
        let (name, user) = match entry {
            Entry::NspawnLock(name) => (name.clone(), busy::lock_held(&image.dir().join(name)).then(|| "held".into())),
            Entry::Snapshot(snapshot) => (snapshot.to_string(), busy::user_of(&image.snapshot_path(snapshot), &users)),
            Entry::Ephemeral(name) => (name.clone(), busy::user_of(&image.dir().join(name), &users)),
            _ => continue,
        };
        if let Some(user) = user {
            log::debug!("gc: image {}: {name} is in use ({user})", image.name());
            in_use.insert(name);
        }
    }
    in_use
}

/// Runs gc on one image, under its transaction lock; returns the names it deleted.
pub fn collect_image(image: &Image, leases: &dyn Leases, keep: usize) -> Result<Vec<String>> {
    let _transactions = image.lock_transactions()?;
    let backend = image.store().backend();
    let mut moved = Vec::new();
    let mut renamed = false;
    {
        // Under the pin lock no job can pin a snapshot we are about to delete. Victims are only
        // renamed to pending names here (fast); the slow deletion happens after the lock is released.
        let _pins = image.lock_pins(Mode::Exclusive)?;
        let in_use = leases.in_use(image)?;
        let entries = image.entries()?;
        let busy = busy_entries(image, &entries);
        let current = image.current().ok();
        for name in plan(&entries, current.as_ref(), &in_use, &busy, keep) {
            let from = image.dir().join(&name);
            if name.starts_with(PENDING_PREFIX) || name.starts_with(CURRENT_TEMP_PREFIX) || name.ends_with(".lck") {
                moved.push((name, from));
                continue;
            }
            let to = image.dir().join(format!("{PENDING_PREFIX}gc-{name}"));
            match std::fs::rename(&from, &to) {
                Ok(()) => {
                    moved.push((name, to));
                    renamed = true;
                }
                Err(e) => warn!("gc: cannot move {} aside: {e}", from.display()),
            }
        }
    }
    // A crash must not bring a snapshot's name back on a half-deleted tree (that rollback
    // could make current): the renames are durable before any deletion starts.
    if renamed {
        backend.make_durable(image.dir())?;
    }
    let mut deleted = Vec::new();
    for (name, path) in moved {
        let result = if std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false) {
            backend.delete(&path)
        } else {
            std::fs::remove_file(&path).map_err(Into::into)
        };
        match result {
            Ok(()) => deleted.push(name),
            Err(e) => warn!("gc: image {}: cannot delete {name}: {e}", image.name()),
        }
    }
    // What gc reports deleted stays deleted, whatever happens next: one commit for them all.
    if !deleted.is_empty() {
        backend.make_durable(image.dir())?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(t: u64) -> SnapshotName {
        SnapshotName::new(t, 1)
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    fn entries(times: &[u64], extra: &[Entry]) -> Vec<Entry> {
        times.iter().map(|t| Entry::Snapshot(snap(*t))).chain(extra.iter().cloned()).collect()
    }

    #[test]
    fn keeps_current_and_the_newest_previous_ones() {
        let e = entries(&[10, 20, 30, 40], &[]);
        let mut doomed = plan(&e, Some(&snap(40)), &InUse::default(), &none(), 1);
        doomed.sort();
        assert_eq!(doomed, ["10_1", "20_1"]);
        assert!(plan(&e, Some(&snap(40)), &InUse::default(), &none(), 3).is_empty());
        assert_eq!(plan(&e, Some(&snap(40)), &InUse::default(), &none(), 0).len(), 3);
    }

    #[test]
    fn after_a_rollback_the_newer_snapshot_counts_as_kept() {
        let e = entries(&[10, 20, 30], &[]);
        assert_eq!(plan(&e, Some(&snap(20)), &InUse::default(), &none(), 1), ["10_1"]);
    }

    #[test]
    fn leased_snapshots_survive() {
        let e = entries(&[10, 20, 30], &[]);
        let in_use = InUse { leased: [(snap(10), vec![JobId::parse("7").unwrap()])].into(), ..Default::default() };
        assert!(plan(&e, Some(&snap(30)), &in_use, &none(), 1).is_empty());
        assert_eq!(plan(&e, Some(&snap(30)), &in_use, &none(), 0), ["20_1"]);
        let busy: HashSet<String> = ["20_1".to_string()].into();
        assert!(plan(&e, Some(&snap(30)), &in_use, &busy, 0).is_empty(), "a snapshot in use is no garbage");
    }

    #[test]
    fn a_broken_current_deletes_no_snapshot() {
        let e = entries(&[10, 20], &[Entry::Pending(".tx-30_1".into())]);
        assert_eq!(plan(&e, None, &InUse::default(), &none(), 0), [".tx-30_1"]);
    }

    #[test]
    fn leftovers_go_but_running_machines_and_foreign_files_stay() {
        let e = entries(
            &[10],
            &[
                Entry::Pending(".tx-11_1".into()),
                Entry::Ephemeral(".#machine.10_1abc".into()),
                Entry::Ephemeral(".#machine.10_1def".into()),
                Entry::Bookkeeping("current".into()),
                Entry::Bookkeeping(".current.55".into()),
                Entry::Foreign("notes.txt".into()),
                Entry::NspawnLock(".#10_1.lck".into()),
                Entry::NspawnLock(".#.#machine.10_1def.lck".into()),
            ],
        );
        let in_use = InUse { ephemeral: [".#machine.10_1abc".to_string()].into(), ..Default::default() };
        let held: HashSet<String> = [".#10_1.lck".to_string()].into();
        let doomed = plan(&e, Some(&snap(10)), &in_use, &held, 1);
        assert_eq!(doomed, [".tx-11_1", ".#machine.10_1def", ".current.55", ".#.#machine.10_1def.lck"]);
        // A copy and its lock that no record names but a live machine uses stay all the same.
        let busy: HashSet<String> =
            [".#10_1.lck", ".#machine.10_1def", ".#.#machine.10_1def.lck"].map(String::from).into();
        assert_eq!(plan(&e, Some(&snap(10)), &in_use, &busy, 1), [".tx-11_1", ".current.55"]);
        let starting = InUse { job_starting: true, ..in_use };
        assert_eq!(
            plan(&e, Some(&snap(10)), &starting, &held, 1),
            [".tx-11_1", ".current.55", ".#.#machine.10_1def.lck"]
        );
    }
}
