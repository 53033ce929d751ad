//! `nspawn-runner image ...`: create, import, list, login, rollback, gc, remove, adopt.

use super::build::{bootstrap, collect, make_bootable, new_image_dir, suite_for};
use super::check::commit_checked;
use super::maintain;
use crate::admin::format_age;
use crate::cli::ImageSub;
use crate::error::{Context, Error, Result};
use crate::jobs::leases;
use crate::jobs::state::StateDir;
use crate::lock::Mode;
use crate::machine::chroot::{run_in_tree, TreeCommand};
use crate::names::{ImageName, JobId, SnapshotName};
use crate::settings::{ImageSettings, Settings};
use crate::store::gc;
use crate::store::transaction::{Base, Transaction};
use crate::store::{is_old_layout, Entry, Image, Store};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

pub fn dispatch(command: ImageSub) -> Result<()> {
    let settings = Settings::from_env()?;
    match command {
        ImageSub::Create(args) => {
            let suite = args.suite.unwrap_or_else(|| suite_for(&args.name, &settings));
            let mirror = args.mirror.or_else(|| settings.mirror.clone());
            let mut packages = settings.extra_packages();
            packages.extend(crate::settings::split_list(args.include.as_deref().unwrap_or("")));
            create(&settings, &ImageName::parse(&args.name)?, &suite, mirror.as_deref(), &packages)
        }
        ImageSub::Import(args) => import(&settings, &ImageName::parse(&args.name)?, &args.source),
        ImageSub::List(args) => list(&settings, args.name.as_deref(), args.json),
        ImageSub::Login(args) => login(&settings, &ImageName::parse(&args.name)?, args.discard),
        ImageSub::Maintain(args) => maintain::maintain(&settings, args),
        ImageSub::Rollback(args) => rollback(&settings, &ImageName::parse(&args.name)?, args.snapshot.as_deref()),
        ImageSub::Gc(args) => gc_command(&settings, args.name.as_deref()),
        ImageSub::Remove(args) => remove(&settings, &ImageName::parse(&args.name)?, args.force),
        ImageSub::Adopt(args) => adopt(&settings, &ImageName::parse(&args.name)?),
    }
}

fn create(settings: &Settings, name: &ImageName, suite: &str, mirror: Option<&str>, extra: &[String]) -> Result<()> {
    let store = Store::open_or_create(settings)?;
    let image = store.image(name)?;
    new_image_dir(&image)?;
    let result = (|| {
        let tx = Transaction::begin(&image, Base::Empty)?;
        bootstrap(tx.tree(), suite, mirror, extra)?;
        maintain::run_configured_steps(settings, &tx, false)?;
        commit_checked(settings, tx)
    })();
    finish_new_image(&image, result)
}

/// Reports the outcome of making a new image; a failed one leaves no directory behind.
fn finish_new_image(image: &Image, result: Result<SnapshotName>) -> Result<()> {
    match result {
        Ok(snapshot) => {
            println!("image {} created: snapshot {snapshot}", image.name());
            Ok(())
        }
        Err(e) => {
            if !image.exists() {
                let _ = std::fs::remove_dir_all(image.dir());
            }
            Err(e.context(format!("creating image {}", image.name())))
        }
    }
}

fn import(settings: &Settings, name: &ImageName, source: &Path) -> Result<()> {
    let store = Store::open_or_create(settings)?;
    let image = store.image(name)?;
    // A source given through a symlink is what it points to: cp -a would copy the link itself.
    let source = &std::fs::canonicalize(source).with_context(|| format!("import source {}", source.display()))?;
    let meta = std::fs::metadata(source).with_context(|| format!("import source {}", source.display()))?;
    let is_new = !image.exists();
    if is_new {
        new_image_dir(&image)?;
    }
    let result = (|| {
        let tx = Transaction::begin(&image, Base::Empty)?;
        if meta.is_dir() {
            crate::store::backend::plain::copy_tree(source, tx.tree())?;
        } else {
            extract_tar(source, tx.tree())?;
        }
        make_bootable(tx.tree())?;
        tx.commit()
    })();
    if is_new {
        return finish_new_image(&image, result);
    }
    let snapshot = result?;
    println!("image {name}: imported as snapshot {snapshot}, now current");
    Ok(())
}

fn extract_tar(archive: &Path, tree: &Path) -> Result<()> {
    let mut command = Command::new("tar");
    command
        .args(["--extract", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--file"])
        .arg(archive)
        .arg("--directory")
        .arg(tree);
    crate::signals::terminate_with_parent(&mut command);
    let status = command.status().context("running tar")?;
    if !status.success() {
        return Err(Error::new(format!("extracting {} failed ({status})", archive.display())));
    }
    Ok(())
}

/// How a snapshot stands, for `image list`.
fn snapshot_role(
    snapshot: &SnapshotName,
    current: Option<&SnapshotName>,
    kept: &[&SnapshotName],
    leases: &BTreeMap<SnapshotName, Vec<JobId>>,
) -> String {
    let mut roles = Vec::new();
    if Some(snapshot) == current {
        roles.push("current".to_owned());
    } else if kept.contains(&snapshot) {
        roles.push("kept".to_owned());
    }
    if let Some(jobs) = leases.get(snapshot) {
        let jobs: Vec<&str> = jobs.iter().map(JobId::as_str).collect();
        roles.push(format!("leased by job {}", jobs.join(",")));
    }
    if roles.is_empty() {
        roles.push("unused (gc deletes it)".to_owned());
    }
    roles.join(", ")
}

/// `image list`: every image (or `only`) with its settings, snapshots and their roles, as
/// text or (`json`) as a JSON array.
fn list(settings: &Settings, only: Option<&str>, json: bool) -> Result<()> {
    let store = Store::open(settings)?;
    let states = StateDir::new(settings).all()?;
    let now = SnapshotName::now().time();
    let mut images = Vec::new();
    for image in images_to_visit(&store, only)? {
        let name = image.name().clone();
        if only.is_none() && image.unfinished() {
            println!("{name}: no current: its creation was cut short (`image gc` deletes what it left)");
            continue;
        }
        image.must_exist()?;
        let image_settings = ImageSettings::load(&settings.config_dir, &name)?;
        let current = image.current();
        let broken = current.as_ref().err().map(|e| e.to_string());
        let current = current.ok();
        let leases = leases::in_use(&image, &states).leased;
        let snapshots = image.snapshots()?;
        let kept = match &current {
            Some(current) => gc::split_previous(&snapshots, current, settings.keep).1,
            None => Vec::new(),
        };
        let mut entries: Vec<serde_json::Value> = snapshots
            .iter()
            .map(|snapshot| {
                serde_json::json!({
                    "name": snapshot.to_string(),
                    "age_seconds": now.saturating_sub(snapshot.time()),
                    "role": snapshot_role(snapshot, current.as_ref(), &kept, &leases),
                })
            })
            .collect();
        for entry in image.entries()? {
            let (n, role) = match entry {
                Entry::Pending(n) => (n, "orphaned or in progress (transaction)"),
                Entry::Ephemeral(n) => (n, "job machine copy"),
                _ => continue,
            };
            entries.push(serde_json::json!({"name": n, "age_seconds": null, "role": role}));
        }
        images.push(serde_json::json!({
            "image": name.as_str(),
            "current": current.map(|c| c.to_string()),
            "broken": broken,
            "settings": image_settings,
            "snapshots": entries,
        }));
    }
    if json {
        let listing = serde_json::json!({"store": store.root(), "backend": store.backend().name(), "images": images});
        println!("{listing}");
        return Ok(());
    }
    println!("store {} ({})", store.root().display(), store.backend().name());
    for image in &images {
        let current = match (&image["current"], &image["broken"]) {
            (serde_json::Value::String(c), _) => c.clone(),
            (_, broken) => format!("BROKEN: {}", broken.as_str().unwrap_or("no current snapshot")),
        };
        println!("{}: current {current}", image["image"].as_str().unwrap_or("?"));
        let image_settings: ImageSettings = serde_json::from_value(image["settings"].clone()).unwrap_or_default();
        let summary = image_settings.summary();
        if !summary.is_empty() {
            println!("  settings: {summary}");
        }
        for snapshot in image["snapshots"].as_array().into_iter().flatten() {
            let age = snapshot["age_seconds"].as_u64().map(format_age).unwrap_or_else(|| "-".to_owned());
            println!(
                "  {:<24} {age:>8}  {}",
                snapshot["name"].as_str().unwrap_or("?"),
                snapshot["role"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

fn login(settings: &Settings, name: &ImageName, discard: bool) -> Result<()> {
    let store = Store::open(settings)?;
    let image = store.image(name)?;
    let tx = Transaction::begin(&image, Base::Current)?;
    let shell = ["/bin/bash".to_owned(), "-l".to_owned()];
    let status = run_in_tree(&TreeCommand { tree: tx.tree(), command: &shell, binds: vec![], interactive: true })?;
    if discard || !status.success() {
        drop(tx);
        println!("image {name}: changes discarded ({})", if discard { "--discard" } else { "shell failed" });
        return Ok(());
    }
    let snapshot = commit_checked(settings, tx).map_err(|e| e.context(format!("image {name}: changes discarded")))?;
    println!("image {name}: committed snapshot {snapshot}");
    collect(settings, &image)
}

fn rollback(settings: &Settings, name: &ImageName, target: Option<&str>) -> Result<()> {
    let store = Store::open(settings)?;
    let image = store.image(name)?;
    image.must_exist()?;
    let _lock = image.lock_transactions()?;
    let snapshots = image.snapshots()?;
    let current = image.current().ok();
    let target = match target {
        Some(t) => {
            let t = SnapshotName::parse(t)?;
            if !snapshots.contains(&t) {
                return Err(Error::new(format!("image {name} has no snapshot {t}")));
            }
            t
        }
        None => {
            let older = snapshots.iter().rfind(|s| current.as_ref().is_none_or(|c| *s < c));
            older.cloned().ok_or_else(|| Error::new(format!("image {name} has no snapshot older than current")))?
        }
    };
    image.switch_current(&target)?;
    println!("image {name}: current is now {target}");
    Ok(())
}

fn gc_command(settings: &Settings, only: Option<&str>) -> Result<()> {
    let store = Store::open(settings)?;
    let states = StateDir::new(settings);
    // Jobs over NSPAWN_RUNNER_MAX_JOB_AGE, kept machines of failed jobs whose time is up, and
    // crashed jobs first: their leases end, so gc can free their snapshots too.
    let host = crate::machine::host(settings);
    let now = crate::jobs::state::unix_now();
    for state in crate::stages::cleanup::stop_over_age(settings, host.as_ref(), &store)? {
        println!(
            "stopped machine {} of job {}: {} old, over NSPAWN_RUNNER_MAX_JOB_AGE={}",
            state.machine.name,
            state.job_id,
            state.age(now).map(format_age).unwrap_or_else(|| "?".to_owned()),
            settings.max_job_age
        );
    }
    for job in crate::stages::cleanup::stop_expired_kept(settings, host.as_ref(), &store)? {
        println!("stopped the kept machine of failed job {job}");
    }
    // After a reboot the state dir (on /run) is gone while the store may still hold job dirs of
    // crashed jobs, which reaping locks by job id in the state dir.
    settings.ensure_state_dir()?;
    for machine in leases::reap_crashed(&store, &states)? {
        println!("reaped leftovers of {machine}");
    }
    for image in images_to_visit(&store, only)? {
        // A creation cut short left only leftovers (a `.tx-*` tree): gc deletes them too.
        if !image.unfinished() {
            image.must_exist()?;
        }
        collect(settings, &image)?;
    }
    Ok(())
}

/// The image named `only`, or every image of the store; when listing them all, one that cannot
/// be opened (a symlink out of the store) is skipped with a warning, so nothing is read or
/// deleted through it and the others are still visited.
fn images_to_visit<'s>(store: &'s Store, only: Option<&str>) -> Result<Vec<Image<'s>>> {
    let Some(name) = only else {
        let images = store.images()?.into_iter().map(|name| store.image(&name));
        return Ok(images.filter_map(|image| image.map_err(|e| log::warn!("skipping {e}")).ok()).collect());
    };
    Ok(vec![store.image(&ImageName::parse(name)?)?])
}

fn remove(settings: &Settings, name: &ImageName, force: bool) -> Result<()> {
    let store = Store::open(settings)?;
    let image = store.image(name)?;
    image.must_exist()?;
    let _lock = image.lock_transactions()?;
    let _pins = image.lock_pins(Mode::Exclusive)?;
    let in_use = leases::in_use(&image, &StateDir::new(settings).all()?);
    if !in_use.leased.is_empty() && !force {
        return Err(Error::new(format!("image {name} is used by running jobs (use --force)")));
    }
    for entry in image.entries()? {
        let entry_name = match entry {
            Entry::Snapshot(s) => s.to_string(),
            Entry::Pending(n) | Entry::Ephemeral(n) => n,
            _ => continue,
        };
        store.backend().delete(&image.dir().join(entry_name))?;
    }
    std::fs::remove_dir_all(image.dir()).with_context(|| format!("removing {}", image.dir().display()))?;
    crate::store::remove_if_present(&super::check::log_path(&store, name))?;
    println!("image {name} removed");
    Ok(())
}

/// Moves an image from the Python nspawn-runner's layout (ROOT/NAME is the tree) into this one,
/// with no moment at which ROOT/NAME is missing: the new directory is swapped in atomically.
fn adopt(settings: &Settings, name: &ImageName) -> Result<()> {
    let store = Store::open(settings)?;
    let image = store.image(name)?;
    if image.exists() {
        return Err(Error::new(format!("image {name} already uses the snapshot layout")));
    }
    if !is_old_layout(image.dir()) {
        return Err(Error::new(format!("{} is not an OS tree to adopt", image.dir().display())));
    }
    let staging = store.root().join(format!(".adopt-{name}"));
    store.backend().delete(&staging)?;
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let snapshot = SnapshotName::now();
    let result = (|| {
        store.backend().snapshot(image.dir(), &staging.join(snapshot.to_string()))?;
        std::os::unix::fs::symlink(snapshot.to_string(), staging.join(crate::store::CURRENT))
            .context("creating current")?;
        crate::store::backend::sync_filesystem(&staging)?;
        exchange(&staging, image.dir())
    })();
    if let Err(e) = result {
        let _ = store.backend().delete(&staging.join(snapshot.to_string()));
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!("adopting {name}")));
    }
    let old = store.root().join(format!(".adopted-{name}-{}", snapshot.time()));
    std::fs::rename(&staging, &old).with_context(|| format!("renaming {}", staging.display()))?;
    println!("image {name} adopted: snapshot {snapshot} is current; the old tree is kept at {}", old.display());
    println!("delete it once no job of the old runner uses it: nspawn-runner does not touch it again");
    Ok(())
}

/// Swaps two directory entries atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::new("path with NUL"));
    let (a_c, b_c) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD makes them relative to our cwd.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, a_c.as_ptr(), libc::AT_FDCWD, b_c.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc != 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context(format!(
            "exchanging {} and {}",
            a.display(),
            b.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_roles_for_image_list() {
        let s = |t| SnapshotName::new(t, 1);
        let leases = [(s(10), vec![JobId::parse("77").unwrap()])].into();
        let kept = s(20);
        assert_eq!(snapshot_role(&s(30), Some(&s(30)), &[&kept], &leases), "current");
        assert_eq!(snapshot_role(&s(20), Some(&s(30)), &[&kept], &leases), "kept");
        assert_eq!(snapshot_role(&s(10), Some(&s(30)), &[&kept], &leases), "leased by job 77");
        assert_eq!(snapshot_role(&s(5), Some(&s(30)), &[&kept], &leases), "unused (gc deletes it)");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(format_age(5), "5s");
        assert_eq!(format_age(600), "10m");
        assert_eq!(format_age(10_000), "2h");
        assert_eq!(format_age(1_000_000), "11d");
    }
}
