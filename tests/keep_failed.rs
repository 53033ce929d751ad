//! Debugging a failed job (NSPAWN_RUNNER_KEEP_FAILED): cleanup leaves the machine of a failed job
//! up, `nspawn-runner shell JOB` enters it, gc stops it once its time is up; on real machines on
//! a btrfs store and a plain store. Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;

both_stores! {
    failed_job_machine_is_kept_entered_and_reaped;
    only_failed_jobs_are_kept;
    shell_refuses_bad_jobs;
}

/// A job whose build_script failed, through cleanup.
fn failed_job<'a>(env: &'a TestEnv) -> Job<'a> {
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    job.run("build_script", &job.user_body(&["echo in-the-job > /root/left-by-job", "exit 3"])).assert_code(1);
    job.run("after_script", &job.user_body(&["true"])).assert_ok();
    job
}

fn state_json(env: &TestEnv, id: &str) -> serde_json::Value {
    let text = fs::read_to_string(env.state_dir.join(format!("{id}.json"))).expect("the kept job's state file");
    serde_json::from_str(&text).unwrap()
}

fn failed_job_machine_is_kept_entered_and_reaped(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "keepfailed") else { return };
    env.set("NSPAWN_RUNNER_KEEP_FAILED", "5");
    let job = failed_job(&env);
    let out = job.cleanup();
    out.assert_ok();
    assert!(out.stdout.contains("stays up for 5 minutes"), "{}", out.describe());
    let state = state_json(&env, &job.id);
    assert_eq!(state["phase"], "kept", "{state}");
    assert!(!nspawn_pids(&job.machine()).is_empty(), "the kept machine is gone");

    // shell: a command in the machine, with its exit code, seeing what the job left
    let out = env.admin(&["shell", &job.id, "--", "sh", "-c", "hostname; cat /root/left-by-job"]);
    out.assert_ok();
    assert_eq!(out.stdout, format!("{}\nin-the-job\n", job.machine()), "{}", out.describe());
    env.admin(&["shell", &job.id, "--", "sh", "-c", "exit 7"]).assert_code(7);
    // without a terminal, the login shell reads its commands from stdin
    let commands = env.work.join("shell-input");
    fs::write(&commands, "hostname\n").unwrap();
    let out = env.admin_cmd(&["shell", &job.id]).stdin(fs::File::open(&commands).unwrap()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(&job.machine()), "{out:?}");

    let out = env.admin(&["status"]);
    assert!(out.stdout.contains("kept, 5m left"), "{}", out.describe());
    // gc before the time is up leaves it alone (and its snapshot leased)
    env.admin(&["image", "gc"]).assert_ok();
    assert!(!nspawn_pids(&job.machine()).is_empty(), "gc stopped a kept machine before its time");
    env.admin(&["shell", &job.id, "--", "true"]).assert_ok();

    // the time is up (the clock, moved forward in the record): gc stops it and removes it all
    let path = env.state_dir.join(format!("{}.json", job.id));
    let mut state = state_json(&env, &job.id);
    state["kept_until"] = serde_json::json!(1);
    fs::write(&path, state.to_string()).unwrap();
    let out = env.admin(&["image", "gc"]);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("stopped the kept machine of failed job {}", job.id)), "{}", out.describe());
    assert_nothing_left(&env, &job.id);
    let out = env.admin(&["shell", &job.id, "--", "true"]);
    out.assert_code(1).assert_one_line_stderr();
}

fn only_failed_jobs_are_kept(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "keeponly") else { return };
    env.set("NSPAWN_RUNNER_KEEP_FAILED", "5");
    // a job that succeeded, and one whose after_script alone failed: both stopped by cleanup
    env.job().run_whole_job("true");
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    job.run("build_script", &job.user_body(&["true"])).assert_ok();
    job.run("after_script", &job.user_body(&["false"])).assert_code(1);
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    // a kept job's second cleanup (by hand) stops it
    let job = failed_job(&env);
    job.cleanup().assert_ok();
    assert_eq!(state_json(&env, &job.id)["phase"], "kept");
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    // without the setting a failed job is cleaned up as always
    env.set("NSPAWN_RUNNER_KEEP_FAILED", "0");
    let job = failed_job(&env);
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn shell_refuses_bad_jobs(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "shellbad") else { return };
    let before = tree(&env.state_dir);
    for args in [
        vec!["shell", "../../etc"],
        vec!["shell", "nosuchjob"],
        vec!["shell", "nosuchjob", "stray", "args"],
        vec!["shell", "-x"],
    ] {
        let out = env.admin(&args);
        assert!(matches!(out.code, Some(1 | 2)), "{args:?}\n{}", out.describe());
        out.assert_one_line_stderr();
    }
    assert_same_tree("shells of bad jobs", &before, &tree(&env.state_dir));
}
