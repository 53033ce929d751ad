//! What real runner hosts do to jobs: gitlab-runner crashes and never calls cleanup (gc reaps
//! machines older than NSPAWN_RUNNER_MAX_JOB_AGE), and kills a run stage with SIGKILL (its
//! script's processes must not live on in the machine). Real machines on a btrfs store and a
//! plain store. Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

both_stores! {
    gc_reaps_jobs_over_the_max_age;
}

fn state_path(env: &TestEnv, id: &str) -> std::path::PathBuf {
    env.state_dir.join(format!("{id}.json"))
}

fn state_json(env: &TestEnv, id: &str) -> serde_json::Value {
    let text = fs::read_to_string(state_path(env, id)).expect("the job's state file");
    serde_json::from_str(&text).unwrap()
}

/// Moves the job's prepare time `seconds` into the past (the clock, in the record).
fn backdate(env: &TestEnv, id: &str, seconds: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let mut state = state_json(env, id);
    assert!(state["pinned_at"].as_u64().is_some_and(|t| t <= now), "prepare recorded no time: {state}");
    state["pinned_at"] = serde_json::json!(now - seconds);
    fs::write(state_path(env, id), state.to_string()).unwrap();
}

/// The `status --json` row of job `id`.
fn status_row(env: &TestEnv, id: &str) -> serde_json::Value {
    let out = env.admin(&["status", "--json"]);
    out.assert_ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    rows.into_iter().find(|r| r["job"] == id).unwrap_or_else(|| panic!("job {id} not in status\n{}", out.describe()))
}

fn prepared(env: &TestEnv) -> Job<'_> {
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    job
}

fn gc_reaps_jobs_over_the_max_age(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "maxage") else { return };
    env.set("NSPAWN_RUNNER_MAX_JOB_AGE", "3600");
    let out = env.admin(&["settings"]);
    assert!(out.stdout.contains("NSPAWN_RUNNER_MAX_JOB_AGE=3600"), "{}", out.describe());
    let (old, young) = (prepared(&env), prepared(&env));
    backdate(&env, &old.id, 7200);

    // status shows each job's age since its prepare, as JSON and as text
    assert!(status_row(&env, &old.id)["age_seconds"].as_u64().is_some_and(|a| a >= 7200));
    assert!(status_row(&env, &young.id)["age_seconds"].as_u64().is_some_and(|a| a < 3600));
    let out = env.admin(&["status"]);
    let line = out.stdout.lines().find(|l| l.starts_with(old.id.as_str())).unwrap_or_default().to_owned();
    assert!(line.contains(" 2h "), "the old job's age is not shown: {line:?}\n{}", out.describe());

    // gitlab-runner crashed: no cleanup for the old job; gc stops it, with one line, and only it
    let out = env.admin(&["image", "gc"]);
    out.assert_ok();
    let reaped: Vec<&str> = out.stdout.lines().filter(|l| l.contains("over NSPAWN_RUNNER_MAX_JOB_AGE")).collect();
    assert_eq!(
        reaped,
        [format!("stopped machine {} of job {}: 2h old, over NSPAWN_RUNNER_MAX_JOB_AGE=3600", old.machine(), old.id)],
        "{}",
        out.describe()
    );
    assert_eq!(nspawn_pids(&old.machine()), Vec::<i32>::new(), "the old job's machine still runs");
    assert!(!state_path(&env, &old.id).exists() && !env.state_dir.join(format!("{}.lock", old.id)).exists());
    assert!(!nspawn_pids(&young.machine()).is_empty(), "gc stopped a job younger than the max age");
    young.run("build_script", &young.user_body(&["echo still-here"])).assert_ok();
    // a later cleanup by gitlab-runner (it came back) of the reaped job is quiet
    old.cleanup().assert_ok();

    // a job whose lock a prepare or cleanup holds is left alone, however old
    backdate(&env, &young.id, 7200);
    let lock = FileLock::exclusive(&env.state_dir.join(format!("{}.lock", young.id)));
    let out = env.admin(&["image", "gc"]);
    out.assert_ok();
    assert!(!out.stdout.contains("over NSPAWN_RUNNER_MAX_JOB_AGE"), "{}", out.describe());
    assert!(!nspawn_pids(&young.machine()).is_empty(), "gc stopped a job whose lock is held");
    drop(lock);

    // NSPAWN_RUNNER_MAX_JOB_AGE=0: no limit
    env.set("NSPAWN_RUNNER_MAX_JOB_AGE", "0");
    env.admin(&["image", "gc"]).assert_ok();
    assert!(!nspawn_pids(&young.machine()).is_empty(), "gc stopped a job with NSPAWN_RUNNER_MAX_JOB_AGE=0");
    young.run("build_script", &young.user_body(&["echo still-here"])).assert_ok();

    // a record of an older version has no prepare time: the machine's process age counts
    let mut state = state_json(&env, &young.id);
    state.as_object_mut().unwrap().remove("pinned_at");
    fs::write(state_path(&env, &young.id), state.to_string()).unwrap();
    env.set("NSPAWN_RUNNER_MAX_JOB_AGE", "1");
    assert!(
        wait_until(Duration::from_secs(30), || status_row(&env, &young.id)["age_seconds"]
            .as_u64()
            .is_some_and(|a| a >= 2)),
        "the machine's age does not show for a record without a prepare time"
    );
    let out = env.admin(&["image", "gc"]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("stopped machine {} of job {}", young.machine(), young.id)),
        "{}",
        out.describe()
    );
    young.cleanup().assert_ok();
    assert_nothing_left(&env, &old.id);
    assert_nothing_left(&env, &young.id);
}
