//! What real runner hosts do: image directories that are symlinks out of the store, a full state
//! dir, a script path that is no file, an import source given through a symlink. Every refusal
//! is one clear line and changes nothing; decoys live below the test's own directories.
//! Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;

both_stores! {
    a_script_that_is_no_file_is_a_system_failure;
    import_follows_a_symlinked_source;
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
