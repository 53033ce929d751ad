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
    a_full_state_dir_is_reported_and_leaves_nothing;
    a_script_that_is_no_file_is_a_system_failure;
    import_follows_a_symlinked_source;
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
