//! What real runner hosts do: image directories that are symlinks out of the store, a full state
//! dir, a script path that is no file, an import source given through a symlink. Every refusal
//! is one clear line and changes nothing; decoys live below the test's own directories.
//! Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

both_stores! {
    symlinked_image_dirs_are_refused;
    symlinked_entries_are_never_followed;
    a_full_state_dir_is_reported_and_leaves_nothing;
    a_script_that_is_no_file_is_a_system_failure;
    import_follows_a_symlinked_source;
}

/// A snapshot-like directory of the decoy: a subvolume holding another on btrfs (what a delete
/// that followed a link would destroy), a plain directory with a file elsewhere.
fn decoy_tree(env: &TestEnv, path: &Path) {
    match env.kind {
        StoreKind::Btrfs => {
            sh(&["btrfs", "-q", "subvolume", "create", path.to_str().unwrap()]);
            sh(&["btrfs", "-q", "subvolume", "create", path.join("inner").to_str().unwrap()]);
        }
        StoreKind::Plain => fs::create_dir_all(path.join("inner")).unwrap(),
    }
    fs::write(path.join("inner/file"), "decoy").unwrap();
}

/// `ROOT/bookworm` is a symlink to a complete image directory outside the store (the real one,
/// moved) with old snapshots, a transaction's leftover and a machine copy that gc would delete:
/// every command refuses it with one line naming it, and nothing outside changes.
fn symlinked_image_dirs_are_refused(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "symimg") else { return };
    let img = env.image_dir(IMAGE);
    let snap = env.current(IMAGE).unwrap();
    let decoy = env.store_dir.join("s").join("decoy");
    fs::rename(&img, &decoy).unwrap();
    for old in ["100_1", ".tx-5_5", &format!(".#machine.{snap}abc")] {
        decoy_tree(&env, &decoy.join(old));
    }
    symlink("../decoy", &img).unwrap();
    let decoy_before = tree(&decoy);
    let root_before = tree(&env.root);
    let unchanged = |what: &str| {
        assert_same_tree(&format!("{what}: the decoy"), &decoy_before, &tree(&decoy));
        let mut root = tree(&env.root);
        root.retain(|k, v| !(k == ".jobs" && v == "dir"));
        assert_same_tree(&format!("{what}: the store"), &root_before, &root);
    };
    let refused = |out: &Out| {
        assert!(out.stderr.contains("is a symlink (to ../decoy)"), "not refused as a symlink\n{}", out.describe());
    };

    let job = env.job();
    job.config().assert_ok();
    let out = job.prepare();
    out.assert_system_failure(2);
    refused(&out);
    assert_eq!(nspawn_pids(&job.machine()), Vec::<i32>::new(), "a machine was started from the decoy");
    unchanged("prepare");
    job.cleanup().assert_ok();
    let states: Vec<_> = fs::read_dir(&env.state_dir).unwrap().flatten().map(|e| e.path()).collect();
    assert!(states.is_empty(), "state files left: {states:?}");

    let tar = base_tarball();
    for args in [
        vec!["image", "gc", IMAGE],
        vec!["image", "remove", IMAGE, "--force"],
        vec!["image", "list", IMAGE],
        vec!["image", "maintain", IMAGE, "--", "true"],
        vec!["image", "rollback", IMAGE],
        vec!["image", "import", IMAGE, tar.to_str().unwrap()],
    ] {
        let out = env.admin_env(&args, &[("NSPAWN_RUNNER_KEEP", "0")]);
        out.assert_code(1).assert_one_line_stderr();
        refused(&out);
        unchanged(&args.join(" "));
    }
    // Going through every image: the link is named, and passed over.
    let gc = env.admin_env(&["image", "gc"], &[("NSPAWN_RUNNER_KEEP", "0")]);
    gc.assert_ok();
    refused(&gc);
    assert!(gc.stderr.contains("skipping image bookworm"), "{}", gc.describe());
    let list = env.admin(&["image", "list"]);
    list.assert_ok();
    refused(&list);
    let maintain = env.admin(&["image", "maintain", "--all"]);
    maintain.assert_code(1);
    refused(&maintain);
    assert!(maintain.stderr.contains("maintenance failed for: bookworm"), "{}", maintain.describe());
    unchanged("gc, list and maintenance of every image");

    // Put it back: the same image boots again (the refusals were about the link).
    fs::remove_file(&img).unwrap();
    fs::rename(&decoy, &img).unwrap();
    env.admin_env(&["image", "gc", IMAGE], &[("NSPAWN_RUNNER_KEEP", "0")]).assert_ok();
    assert_eq!(env.snapshots(IMAGE), [snap]);
    env.job().run_whole_job("true");
}

/// Entries of a real image directory that are symlinks out of it (a transaction's leftover, a
/// machine copy, a snapshot name, `current`'s target) and a `.jobs` that is one: gc, list and
/// remove never delete through them or boot what they point at.
fn symlinked_entries_are_never_followed(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "syment") else { return };
    let img = env.image_dir(IMAGE);
    let snap = env.current(IMAGE).unwrap();
    let outside = env.store_dir.join("s").join("outside");
    fs::create_dir_all(&outside).unwrap();
    for name in ["tx", "copy", "snapshot", "job"] {
        decoy_tree(&env, &outside.join(name));
    }
    symlink("../../outside/tx", img.join(".tx-6_6")).unwrap();
    symlink("../../outside/copy", img.join(format!(".#machine.{snap}xyz"))).unwrap();
    symlink("../../outside/snapshot", img.join("200_1")).unwrap();
    let outside_before = tree(&outside);

    let jobs = env.root.join(".jobs");
    let _ = fs::remove_dir(&jobs);
    symlink("../outside", &jobs).unwrap();
    let gc = env.admin_env(&["image", "gc"], &[("NSPAWN_RUNNER_KEEP", "0")]);
    gc.assert_code(1).assert_one_line_stderr();
    assert!(gc.stderr.contains(".jobs is a symlink"), "{}", gc.describe());
    assert_same_tree("gc with .jobs a symlink", &outside_before, &tree(&outside));
    fs::remove_file(&jobs).unwrap();

    env.admin_env(&["image", "gc"], &[("NSPAWN_RUNNER_KEEP", "0")]).assert_ok();
    assert_same_tree("gc", &outside_before, &tree(&outside));
    let mut left = env.entries(IMAGE);
    left.retain(|e| !e.ends_with(".lock"));
    assert_eq!(left, [snap.as_str(), "200_1", "current"], "gc removes the links it owns, only them");
    env.admin(&["image", "list"]).assert_ok();

    // current pointing at the snapshot-named link: refused, nothing booted.
    fs::remove_file(img.join("current")).unwrap();
    symlink("200_1", img.join("current")).unwrap();
    let job = env.job();
    let out = job.prepare();
    out.assert_system_failure(2);
    assert!(out.stderr.contains("which is a symlink, not a snapshot directory"), "{}", out.describe());
    job.cleanup().assert_ok();
    fs::remove_file(img.join("current")).unwrap();
    symlink(&snap, img.join("current")).unwrap();
    env.job().run_whole_job("true");

    symlink("../../outside/tx", img.join(".tx-7_7")).unwrap();
    env.admin(&["image", "remove", IMAGE, "--force"]).assert_ok();
    assert!(fs::symlink_metadata(&img).is_err(), "image remove left {}", img.display());
    assert_same_tree("image remove", &outside_before, &tree(&outside));
    assert_store_idle(&env);
}

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        sh(&["mount", "-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs", path.to_str().unwrap()]);
        Tmpfs(path.to_owned())
    }

    /// Fills it with `filler` until only `free` bytes are left.
    fn fill(&self, free: u64) {
        let filler = self.0.join("filler");
        let _ = fs::remove_file(&filler);
        let stat = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let available = stat.blocks_available() * stat.fragment_size();
        fs::write(&filler, vec![0u8; available.saturating_sub(free) as usize]).unwrap();
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(&self.0).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A state dir that is full, or too full for a machine's console log: prepare fails with one
/// line saying so, and rolls back (no machine, no lease, no temporary file).
fn a_full_state_dir_is_reported_and_leaves_nothing(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "fullstate") else { return };
    let state = Tmpfs::mount(&env.work.join("small-state"), "1m");
    env.set("NSPAWN_RUNNER_STATE_DIR", state.0.to_str().unwrap());
    for free in [0, 8 << 10, 64 << 10] {
        state.fill(free);
        let job = env.job();
        job.config().assert_ok();
        let out = job.prepare();
        out.assert_system_failure(2);
        assert!(out.stderr.to_lowercase().contains("no space left"), "{free} bytes free\n{}", out.describe());
        assert_eq!(nspawn_pids(&job.machine()), Vec::<i32>::new(), "{free} bytes free: a machine runs");
        assert_eq!(state.entries(), ["filler"], "{free} bytes free: the state dir keeps more");
        job.cleanup().assert_ok();
        assert_eq!(state.entries(), ["filler"]);
        assert_nothing_left(&env, &job.id);
    }
    // With room again, the same state dir serves a job, which leaves it as it found it.
    state.fill(512 << 10);
    env.job().run_whole_job("true");
    assert_eq!(state.entries(), ["filler"]);
    drop(state);
    assert_store_idle(&env);
}

/// `run` given a directory or a missing path as its script: a system failure in one line, the
/// machine keeps running, the job is not marked failed, and the next script runs.
fn a_script_that_is_no_file_is_a_system_failure(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "noscript") else { return };
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    let dir = job.tmp.join("a-directory");
    fs::create_dir(&dir).unwrap();
    for script in [dir.clone(), job.tmp.join("missing")] {
        let mut cmd = job.stage_cmd("run", true);
        cmd.arg(&script).arg("build_script");
        let out = run_cmd(&format!("run {}", script.display()), &mut cmd);
        out.assert_system_failure(2);
        assert!(out.stderr.contains(script.to_str().unwrap()), "{}", out.describe());
    }
    assert!(!job.tmp.join("build_exit_code").exists(), "an exit code was reported for a script that never ran");
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(env.state_dir.join(format!("{}.json", job.id))).unwrap()).unwrap();
    assert_eq!(state["failed"], false, "the job was marked failed");
    let out = job.run("build_script", &job.get_sources_body("echo still-up"));
    out.assert_ok();
    assert!(out.stdout.contains("still-up"), "{}", out.describe());
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

/// `image import NAME PATH` with PATH a symlink to a tree, or to a tarball: the tree or tarball
/// is imported (not the link), and boots.
fn import_follows_a_symlinked_source(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "importlink") else { return };
    let tree_link = env.work.join("tree-link");
    symlink(env.image_dir(IMAGE).join(env.current(IMAGE).unwrap()), &tree_link).unwrap();
    let tar_link = env.work.join("tar-link");
    symlink(base_tarball(), &tar_link).unwrap();
    for (name, source) in [("viatree", &tree_link), ("viatar", &tar_link)] {
        env.admin(&["image", "import", name, source.to_str().unwrap()]).assert_ok();
        let snapshot = env.image_dir(name).join(env.current(name).unwrap());
        assert!(fs::symlink_metadata(&snapshot).unwrap().is_dir(), "{} is no directory", snapshot.display());
        assert!(snapshot.join("usr/lib/systemd/systemd").exists(), "{} is incomplete", snapshot.display());
        if kind == StoreKind::Btrfs {
            assert!(is_subvolume(&snapshot), "{} is no subvolume", snapshot.display());
        }
    }
    env.job().with_image("viatree").run_whole_job("test -x /usr/lib/systemd/systemd");
}
