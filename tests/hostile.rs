//! Hostile input: image names, job ids, `current` links and admin arguments that try to leave the store.
//! Each must be a clean system failure (SYSTEM_FAILURE_EXIT_CODE, one line on stderr) that creates nothing.
//! Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

both_stores! {
    hostile_image_names;
    empty_image_means_default;
    hostile_job_ids;
    longest_valid_job_id;
    hostile_current_links;
    hostile_admin_names;
    a_job_naming_another_jobs_trees_cannot_keep_them;
}

/// Everything a bad call could touch: the test's store dir and its state dir / work dir (minus the job
/// temp dirs, where the test itself writes scripts).
/// Benign store entries a refused call may still create: the image's lock files and an empty ROOT/.jobs.
fn snapshot(env: &TestEnv) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut work = tree(&env.work);
    work.retain(|k, _| !(k == "tmp" || k.starts_with("tmp/")));
    let mut store = tree(&env.store_dir);
    store.retain(|k, v| {
        !((k.starts_with(&format!("s/root/{IMAGE}/.")) && k.ends_with(".lock")) || (k == "s/root/.jobs" && v == "dir"))
    });
    (store, work)
}

#[track_caller]
fn assert_unchanged(what: &str, before: &(BTreeMap<String, String>, BTreeMap<String, String>), env: &TestEnv) {
    let after = snapshot(env);
    assert_same_tree(&format!("{what} (store)"), &before.0, &after.0);
    assert_same_tree(&format!("{what} (state/work dir)"), &before.1, &after.1);
}

fn etc_marker_names() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/etc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == "current" || n.contains('_'))
        .collect();
    v.sort();
    v
}

fn hostile_image_names(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hostimg") else { return };
    let etc_before = etc_marker_names();
    for name in ["../../etc", "a/b", ".hidden", "..", ".", "/etc", "bookworm/current", "book worm", "x\ny"] {
        let job = env.job().with_image(name);
        let before = snapshot(&env);
        job.config().assert_ok();
        let out = job.prepare();
        out.assert_system_failure(2);
        assert_unchanged(&format!("prepare with image {name:?}"), &before, &env);
        assert_eq!(nspawn_pids(&job.machine()), Vec::<i32>::new(), "a machine was started for image {name:?}");
        // gitlab-runner calls cleanup after the failed prepare
        job.cleanup().assert_ok();
        assert_unchanged(&format!("cleanup after image {name:?}"), &before, &env);
        assert_nothing_left(&env, &job.id);
    }
    assert_eq!(etc_before, etc_marker_names(), "something was created in /etc");
}

fn empty_image_means_default(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "emptyimg") else { return };
    // NSPAWN_RUNNER_DEFAULT_IMAGE=bookworm in the fixture; an empty CI_JOB_IMAGE maps to it
    let out = env.job().with_image("").run_whole_job("grep -q bookworm /etc/os-release && echo default-image-ok");
    assert!(out.stdout.contains("default-image-ok"), "{}", out.describe());
    // and with the default image missing, the error is a clean system failure
    env.set("NSPAWN_RUNNER_DEFAULT_IMAGE", "nonexistent-default");
    let job = env.job().with_image("");
    let before = snapshot(&env);
    job.prepare().assert_system_failure(2);
    assert_unchanged("prepare with a missing default image", &before, &env);
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn hostile_job_ids(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hostid") else { return };
    let too_long = "1".repeat(49);
    for id in ["1/2", "../x", "a b", "", "..", ".", "1\n2", "x;reboot", "ü", "-", too_long.as_str()] {
        // "-" is valid by the contract's alphabet ([A-Za-z0-9-]) but makes `run--`: it may be accepted (then
        // it must work and clean up) or refused like the others; it must never escape.
        let job = Job::new(&env, id);
        let before = snapshot(&env);
        job.config().assert_ok();
        let out = job.prepare();
        if id == "-" && out.code == Some(0) {
            job.cleanup().assert_ok();
            assert_nothing_left(&env, id);
            continue;
        }
        out.assert_system_failure(2);
        assert_unchanged(&format!("prepare with job id {id:?}"), &before, &env);
        let out = job.run("build_script", &job.user_body(&["true"]));
        out.assert_system_failure(2);
        assert_unchanged(&format!("run with job id {id:?}"), &before, &env);
        let out = job.cleanup();
        out.assert_system_failure(2);
        assert_unchanged(&format!("cleanup with job id {id:?}"), &before, &env);
        assert!(fs::read_dir(&env.state_dir).unwrap().next().is_none(), "state dir not empty after id {id:?}");
        assert_store_idle(&env);
    }
    // no id at all
    let job = env.job();
    let before = snapshot(&env);
    let mut cmd = job.stage_cmd("prepare", true);
    cmd.env_remove("CUSTOM_ENV_CI_JOB_ID");
    run_cmd("prepare without CUSTOM_ENV_CI_JOB_ID", &mut cmd).assert_system_failure(2);
    assert_unchanged("prepare without a job id", &before, &env);
    assert_store_idle(&env);
}

fn longest_valid_job_id(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "longid") else { return };
    let mut id = format!("{}-{}-", std::process::id(), kind as u8);
    while id.len() < 48 {
        id.push('Z');
    }
    let out = Job::new(&env, &id).run_whole_job("echo \"id=$CI_JOB_ID\"");
    assert!(out.stdout.contains(&format!("id={id}")), "{}", out.describe());
}

/// `current` that dangles, points outside ROOT/NAME (relative, absolute, through a symlinked snapshot
/// entry) at a complete bootable tree, or is not a symlink: prepare must refuse each.
fn hostile_current_links(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hostcur") else { return };
    let img = env.image_dir(IMAGE);
    let snap = env.current(IMAGE).unwrap();
    let cur = img.join("current");
    // move the real tree outside ROOT/NAME (a rename: cheap, works for subvolumes too)
    let outside_dir = env.store_dir.join("s").join("outside");
    fs::create_dir_all(&outside_dir).unwrap();
    let outside = outside_dir.join(&snap);
    fs::rename(img.join(&snap), &outside).unwrap();

    let set_current = |target: &str| {
        let _ = fs::remove_file(&cur);
        let _ = fs::remove_dir(&cur);
        symlink(target, &cur).unwrap();
    };
    let check = |what: &str| {
        let job = env.job();
        let before = snapshot(&env);
        job.config().assert_ok();
        let out = job.prepare();
        out.assert_system_failure(2);
        assert_eq!(nspawn_pids(&job.machine()), Vec::<i32>::new(), "a machine was started with {what}");
        assert_unchanged(&format!("prepare with {what}"), &before, &env);
        job.cleanup().assert_ok();
        assert_nothing_left(&env, &job.id);
    };

    set_current("1234_5678");
    check("a dangling current");
    set_current(&format!("../../outside/{snap}"));
    check("current -> ../../outside/<complete tree>");
    set_current(outside.to_str().unwrap());
    check("current -> /abs/path/outside/<complete tree>");
    set_current("../../");
    check("current -> ../../");
    symlink(&outside, img.join("99_99")).unwrap();
    set_current("99_99");
    check("current -> 99_99, itself a symlink to a tree outside");
    fs::remove_file(img.join("99_99")).unwrap();
    set_current(&format!("{snap}/../../../outside/{snap}"));
    check("current -> <snap>/../../../outside/<snap>");
    let _ = fs::remove_file(&cur);
    fs::create_dir(&cur).unwrap();
    check("current being a directory, not a symlink");
    fs::remove_dir(&cur).unwrap();
    check("no current at all");

    // put everything back: the same store boots again (proves the refusals above were about the links)
    fs::rename(&outside, img.join(&snap)).unwrap();
    set_current(&snap);
    env.job().run_whole_job("true");
}

/// Admin commands with names that try to leave the store: refused, nothing changed. (Targets stay below
/// the test's own store dir even if a buggy binary followed them.)
fn hostile_admin_names(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hostadm") else { return };
    let tar = base_tarball();
    let snap = env.current(IMAGE).unwrap();
    for name in ["..", "../..", "../x", "a/b", ".hidden", ".", "bookworm/..", "x\ny"] {
        let cmds: Vec<Vec<&str>> = vec![
            vec!["image", "import", name, tar.to_str().unwrap()],
            vec!["image", "list", name],
            vec!["image", "gc", name],
            vec!["image", "rollback", name],
            vec!["image", "maintain", name, "--", "true"],
            vec!["image", "remove", name, "--force"],
        ];
        for args in cmds {
            let before = snapshot(&env);
            let out = env.admin(&args);
            assert!(out.code.is_some() && out.code != Some(0), "{args:?} must be refused\n{}", out.describe());
            assert!(!out.stderr.trim().is_empty(), "{args:?}: no error message\n{}", out.describe());
            assert_unchanged(&format!("{args:?}"), &before, &env);
        }
    }
    assert_eq!(env.current(IMAGE).as_deref(), Some(snap.as_str()));
    assert!(Path::new(&env.image_dir(IMAGE).join(&snap)).join("usr/lib/systemd/systemd").exists());
    assert_store_idle(&env);
}

/// gc and cleanup ask the kernel whether a tree is still in use, but a job's own processes have no
/// say: job A running processes whose arguments name job B's trees and machine
/// (`--machine=run-B`) neither keeps B's cleanup from deleting them nor makes gc think B lives.
fn a_job_naming_another_jobs_trees_cannot_keep_them(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hostnames") else { return };
    let (a, b) = (env.job(), env.job());
    for job in [&a, &b] {
        job.config().assert_ok();
        job.prepare().assert_ok();
    }
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(env.state_dir.join(format!("{}.json", b.id))).unwrap()).unwrap();
    let job_dir = env.root.join(".jobs").join(b.machine());
    let trees: Vec<String> = [record["running"]["ephemeral"].as_str().map(str::to_owned)]
        .into_iter()
        .flatten()
        .chain([job_dir.join("upper").display().to_string(), job_dir.display().to_string()])
        .collect();
    // Processes that outlive the stage (daemons of the machine's own systemd: what a script
    // leaves in its own cgroup ends with its stage), named like B's trees and machine.
    let mut cmds = Vec::new();
    for tree in &trees {
        cmds.push(format!(
            "systemd-run --quiet --collect bash -c 'sleep 600; :' {} --machine={} </dev/null >/dev/null 2>&1",
            ansi_c_quote(tree),
            b.machine()
        ));
    }
    a.run("build_script", &a.get_sources_body(&cmds.join("\n"))).assert_ok();
    let named = || processes().into_iter().filter(|(_, argv)| argv.iter().any(|arg| trees.contains(arg))).count();
    // systemd starts them: the stage may end before the last of them runs bash.
    assert!(wait_until(CMD_TIMEOUT, || named() == trees.len()), "the job's processes naming B's trees do not run");
    b.cleanup().assert_ok();
    assert_nothing_left_of_job(&env, &b);
    env.admin(&["image", "gc", IMAGE]).assert_ok();
    a.cleanup().assert_ok();
    assert_nothing_left(&env, &a.id);
}

/// Nothing of `job` is left, while other jobs may still run.
#[track_caller]
fn assert_nothing_left_of_job(env: &TestEnv, job: &Job) {
    assert_eq!(nspawn_pids(&job.machine()), Vec::<i32>::new(), "B's machine still runs");
    let job_dir = env.root.join(".jobs").join(job.machine());
    assert!(!job_dir.exists(), "{} left", job_dir.display());
    let left: Vec<String> = fs::read_dir(&env.state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{}.", job.id)) || n.starts_with(&format!(".{}.", job.id)))
        .collect();
    assert!(left.is_empty(), "state files of job {} left: {left:?}", job.id);
    let copies: Vec<String> = env.entries(IMAGE).into_iter().filter(|n| n.starts_with(".#machine.")).collect();
    assert!(copies.len() <= 1, "B's copy is left beside A's: {copies:?}");
}
