//! The four custom-executor stages, driven as gitlab-runner drives them, on real machines on a btrfs
//! store and on a plain-directory store. Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

both_stores! {
    config_prints_only_json;
    passing_multi_stage_job;
    failing_build_script;
    build_failure_code_comes_from_env;
    missing_image_is_system_failure;
    job_images_map_like_the_python_runner;
    step_runner_is_bound_read_only;
    sigterm_during_build_script;
    two_jobs_at_once;
    prepare_retry_after_failed_prepare;
    prepare_twice_without_cleanup;
    cleanup_is_idempotent_and_quiet;
}

fn config_prints_only_json(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "config") else { return };
    let job = env.job();
    // gitlab-runner calls config_exec before it knows the builds dir: these are empty then.
    let out = job.config();
    out.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not exactly one JSON value ({e})\n{}", out.describe()));
    assert!(out.stdout.trim_start().starts_with('{'), "stdout must be a JSON object\n{}", out.describe());
    let o = v.as_object().expect("a JSON object");
    let s = |k: &str| {
        o.get(k).and_then(|x| x.as_str()).unwrap_or_else(|| panic!("`{k}` must be a string in {v}")).to_string()
    };
    let builds = s("builds_dir");
    let cache = s("cache_dir");
    assert!(builds.starts_with('/') && builds.len() > 1, "builds_dir must be an absolute path: {builds:?}");
    assert!(cache.starts_with('/') && cache.len() > 1, "cache_dir must be an absolute path: {cache:?}");
    assert_eq!(o.get("builds_dir_is_shared"), Some(&serde_json::Value::Bool(false)), "{v}");
    assert!(!s("hostname").is_empty(), "hostname empty in {v}");
    let driver = o.get("driver").and_then(|d| d.as_object()).unwrap_or_else(|| panic!("driver missing in {v}"));
    for k in ["name", "version"] {
        let x = driver.get(k).and_then(|x| x.as_str()).unwrap_or_else(|| panic!("driver.{k} missing in {v}"));
        assert!(!x.is_empty(), "driver.{k} empty in {v}");
    }
    // Every known key has the type Go's json.Unmarshal expects (a wrong type fails the job).
    for (k, val) in o {
        match k.as_str() {
            "builds_dir" | "cache_dir" | "hostname" | "shell" => assert!(val.is_string(), "{k} must be a string"),
            "builds_dir_is_shared" => assert!(val.is_boolean()),
            "driver" => {}
            "job_env" => {
                for (jk, jv) in val.as_object().expect("job_env must be an object") {
                    assert!(jv.is_string(), "job_env.{jk} must be a string");
                }
            }
            _ => {}
        }
    }
    // Nothing of a config call may look like a job on the host.
    assert_nothing_left(&env, &job.id);
}

fn passing_multi_stage_job(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "passing") else { return };
    let job = env.job().with_var("SECRET_HOST_VAR", "leak-me-if-you-can");
    job.config().assert_ok();
    let p = job.prepare();
    p.assert_ok();

    // prepare_script: the "is there a shell" probe
    let out = job.run("prepare_script", &job.prepare_script_body());
    out.assert_ok();
    assert!(out.stdout.contains("Running on "), "{}", out.describe());

    // get_sources: creates the project dir and a file (no network), and passes a variable through GITLAB_ENV
    let out = job.run(
        "get_sources",
        &job.get_sources_body(
            "echo \"hello from get_sources $CI_JOB_ID\" > input.txt\necho FROM_GET_SOURCES=yes >> \"$GITLAB_ENV\"",
        ),
    );
    out.assert_ok();

    // build_script: sees the file, the GITLAB_ENV variable, runs as root with a clean environment;
    // output on both streams, streamed while the script runs.
    let cache_probe = format!("probe-{}", job.id);
    let out = job.run(
        "build_script",
        &job.user_body(&[
            "cat input.txt",
            "test \"$FROM_GET_SOURCES\" = yes",
            "test \"$(id -u)\" = 0",
            "test \"$PWD\" = \"$CI_PROJECT_DIR\"",
            "echo \"SECRET=${SECRET_HOST_VAR-unset}\"",
            "env | sort",
            "echo to-stderr >&2",
            &format!("echo cached > /cache/{cache_probe}"),
            &format!("test ! -e {}/response.json", job.tmp.display()),
            "cat",
            "echo stdin-safe",
            "echo built > output.txt",
            "echo first-streamed-line",
            "sleep 3",
            "echo last-line",
        ]),
    );
    out.assert_ok();
    let expect = format!("hello from get_sources {}", job.id);
    assert!(out.stdout.contains(&expect), "build_script did not see get_sources' file\n{}", out.describe());
    assert!(out.stdout.contains("SECRET=unset"), "{}", out.describe());
    let all = out.all_output();
    assert!(!all.contains("leak-me-if-you-can"), "a host variable leaked into the job\n{}", out.describe());
    for host_only in ["NSPAWN_RUNNER_ROOT=", "JOB_RESPONSE_FILE=", "BUILD_FAILURE_EXIT_CODE=", "CUSTOM_ENV_"] {
        assert!(!all.contains(host_only), "{host_only} leaked into the job\n{}", out.describe());
    }
    assert!(
        !all.contains(&format!("TMPDIR={}", job.tmp.display())),
        "the host TMPDIR leaked into the job\n{}",
        out.describe()
    );
    assert!(all.contains("to-stderr"), "stderr of the script lost\n{}", out.describe());
    // streaming: the first line must arrive while the script still sleeps, not at the end
    let first = out
        .stdout_chunks
        .iter()
        .scan(String::new(), |acc, (t, c)| {
            acc.push_str(c);
            Some((*t, acc.contains("first-streamed-line")))
        })
        .find(|(_, seen)| *seen)
        .map(|(t, _)| t)
        .expect("first-streamed-line never seen");
    assert!(
        out.elapsed.saturating_sub(first) >= Duration::from_millis(2000),
        "output is not streamed: first line at {first:?}, exit at {:?}",
        out.elapsed
    );
    assert_eq!(
        fs::read_to_string(job.cache_dir().join(&cache_probe)).ok().as_deref(),
        Some("cached\n"),
        "/cache in the machine is not the project's host cache dir"
    );

    assert!(out.stdout.contains("stdin-safe\n"), "a command reading stdin ate the script\n{}", out.describe());

    // other step names are passed through (step_release etc.): any stage name must work
    let out = job.run("step_release", &job.user_body(&["cat output.txt"]));
    out.assert_ok();
    assert!(out.stdout.contains("built"), "{}", out.describe());

    // after_script: a separate process; sees build_script's files
    let out = job.run("after_script", &job.user_body(&["echo \"Running after script...\"", "cat output.txt"]));
    out.assert_ok();
    assert!(out.stdout.contains("built"), "{}", out.describe());

    let out = job.run("cleanup_file_variables", &job.cleanup_file_variables_body());
    out.assert_ok();

    let out = job.cleanup();
    out.assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn failing_build_script(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "failing") else { return };
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    let out = job.run("build_script", &job.user_body(&["echo before-failure", "false", "echo not-reached"]));
    out.assert_code(1);
    assert!(out.stdout.contains("before-failure"), "{}", out.describe());
    assert!(!out.stdout.contains("not-reached\n"), "errexit not honoured\n{}", out.describe());
    // an `exit 42` also is a build failure; if the driver writes BUILD_EXIT_CODE_FILE it must say 42
    let out = job.run("build_script", &job.user_body(&["exit 42"]));
    out.assert_code(1);
    if let Ok(code) = fs::read_to_string(job.tmp.join("build_exit_code")) {
        assert_eq!(code.lines().next(), Some("42"), "BUILD_EXIT_CODE_FILE must hold the script's code");
    }
    // the machine survives a failed script: after_script runs (gitlab-runner runs it after a failure)
    let out = job.run("after_script", &job.user_body(&["echo \"Running after script...\"", "echo after-ran"]));
    out.assert_ok();
    assert!(out.stdout.contains("after-ran"), "{}", out.describe());
    job.run("cleanup_file_variables", &job.cleanup_file_variables_body()).assert_ok();
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn build_failure_code_comes_from_env(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "failcode") else { return };
    let job = env.job().with_var("BUILD_FAILURE_EXIT_CODE", "7").with_var("SYSTEM_FAILURE_EXIT_CODE", "9");
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    job.run("build_script", &job.user_body(&["false"])).assert_code(7);
    job.run("build_script", &job.user_body(&["true"])).assert_ok();
    job.cleanup().assert_ok();
    // after cleanup the machine is gone: a run is now a system failure, with the code from the env
    let out = job.run("build_script", &job.user_body(&["true"]));
    out.assert_system_failure(9);
    assert_nothing_left(&env, &job.id);
}

fn missing_image_is_system_failure(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "missing") else { return };
    let job = env.job().with_image("no-such-image");
    let before = tree(&env.store_dir);
    job.config().assert_ok();
    let out = job.prepare();
    out.assert_system_failure(2);
    assert!(out.stderr.contains("no-such-image"), "the error should name the image\n{}", out.describe());
    assert_same_tree("a prepare of a missing image", &before, &tree(&env.store_dir));
    // gitlab-runner calls cleanup after every failed prepare attempt
    job.cleanup().assert_ok();
    assert_same_tree("cleanup after a failed prepare", &before, &tree(&env.store_dir));
    assert_nothing_left(&env, &job.id);
}

fn job_images_map_like_the_python_runner(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "imagenames") else { return };
    // The tag of the last path component names the image, registry ports and digests aside.
    let job = env.job().with_image("registry.example.com:5000/ci/debian:bookworm@sha256:0123abcd");
    job.run_whole_job("hostname");
    // A missing one: one line naming the job image, the name tried and the images there are.
    let before = tree(&env.store_dir);
    let job = env.job().with_image("registry.example.com/ci/debian:nosuch");
    job.config().assert_ok();
    let out = job.prepare();
    out.assert_system_failure(2);
    for needle in ["registry.example.com/ci/debian:nosuch", "nosuch (its tag)", "available: bookworm"] {
        assert!(out.stderr.contains(needle), "the error should say {needle:?}\n{}", out.describe());
    }
    job.cleanup().assert_ok();
    // Hostile tags are refused (or name a plain missing image) before anything is written.
    for hostile in ["debian:.hidden", "debian:../../etc", "x:a b", "debian:bookworm/"] {
        env.job().with_image(hostile).prepare().assert_system_failure(2);
    }
    assert_same_tree("prepares of bad image names", &before, &tree(&env.store_dir));
    // The admin's alias table and allowed globs.
    env.set("NSPAWN_RUNNER_IMAGE_ALIASES", "**/ubuntu:*=bookworm");
    env.set("NSPAWN_RUNNER_ALLOWED_IMAGES", "docker.io/**");
    env.job().with_image("docker.io/library/ubuntu:24.04").run_whole_job("true");
    let out = env.job().with_image("evil.example/ubuntu:24.04").prepare();
    out.assert_system_failure(2);
    assert!(out.stderr.contains("not allowed"), "{}", out.describe());
    assert_same_tree("a prepare of a forbidden image", &before, &tree(&env.store_dir));
}

fn step_runner_is_bound_read_only(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "steprunner") else { return };
    let binary = env.work.join("step-runner");
    fs::write(&binary, "#!/bin/sh\necho step-runner says $*\n").unwrap();
    fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.set("NSPAWN_RUNNER_STEP_RUNNER", binary.to_str().unwrap());
    // gitlab-runner runs `run:` jobs with the step-runner in the PATH; a job cannot change it.
    let out = env.job().run_whole_job(
        "command -v step-runner; step-runner proxy; if echo x >> /usr/local/bin/step-runner; then echo WRITABLE; fi",
    );
    assert!(out.stdout.contains("/usr/local/bin/step-runner\nstep-runner says proxy"), "{}", out.describe());
    assert!(!out.stdout.contains("WRITABLE"), "{}", out.describe());
    assert_eq!(fs::read_to_string(&binary).unwrap(), "#!/bin/sh\necho step-runner says $*\n");
    // A setting naming nothing binds nothing.
    env.set("NSPAWN_RUNNER_STEP_RUNNER", env.work.join("missing").to_str().unwrap());
    let out = env.job().run_whole_job("command -v step-runner || echo no step-runner");
    assert!(out.stdout.contains("no step-runner"), "{}", out.describe());
}

fn sigterm_during_build_script(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "sigterm") else { return };
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    let mark = format!("NR_TEST_MARK={}", job.id);
    let mut running = job.spawn_run(
        "build_script",
        &job.user_body(&["echo sleeping-now", &format!("env {mark} sleep 1000"), "echo not-reached"]),
    );
    running.wait_for_stdout("sleeping-now", Duration::from_secs(60));
    // the sleep must really run (on the host's /proc: container processes are visible there)
    assert!(
        wait_until(Duration::from_secs(20), || !marked_processes(&["sleep", "1000"], &mark).is_empty()),
        "the job's sleep 1000 never showed up in /proc"
    );
    // gitlab-runner cancels a job by SIGTERM to the stage's process group
    let t = Instant::now();
    running.kill_group(libc::SIGTERM);
    let out = running.wait(Duration::from_secs(60));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "the run stage took {took:?} to exit after SIGTERM\n{}", out.describe());
    assert!(
        out.code.is_some() && out.code != Some(0),
        "the canceled stage must exit with a failure code (not 0, not killed by the signal)\n{}",
        out.describe()
    );
    assert!(!out.stdout.contains("not-reached\n"), "{}", out.describe());
    assert!(
        wait_until(Duration::from_secs(3), || marked_processes(&["sleep", "1000"], &mark).is_empty()),
        "`sleep 1000` of the canceled script still runs: {:?}",
        marked_processes(&["sleep", "1000"], &mark)
    );
    // after a cancel gitlab-runner still runs after_script in the same machine
    let out = job.run("after_script", &job.user_body(&["echo after-cancel"]));
    out.assert_ok();
    assert!(out.stdout.contains("after-cancel"), "{}", out.describe());
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn two_jobs_at_once(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "twojobs") else { return };
    let a = env.job();
    let b = env.job();
    let (ra, rb) = (&a, &b);
    for j in [ra, rb] {
        j.config().assert_ok();
    }
    thread::scope(|s| {
        let ha = s.spawn(|| a.prepare());
        let hb = s.spawn(|| b.prepare());
        ha.join().unwrap().assert_ok();
        hb.join().unwrap().assert_ok();
    });
    thread::scope(|s| {
        for j in [ra, rb] {
            s.spawn(move || {
                j.run(
                    "get_sources",
                    &j.get_sources_body("echo \"mine=$CI_JOB_ID\" > owner.txt\necho \"$CI_JOB_ID\" > /root/owner"),
                )
                .assert_ok();
            });
        }
    });
    thread::scope(|s| {
        for j in [ra, rb] {
            s.spawn(move || {
                let out = j.run(
                    "build_script",
                    &j.user_body(&[
                        "cat owner.txt",
                        "cat /root/owner",
                        "sleep 1",
                        "test \"$(cat owner.txt)\" = \"mine=$CI_JOB_ID\"",
                    ]),
                );
                out.assert_ok();
                assert!(out.stdout.contains(&format!("mine={}", j.id)), "{}", out.describe());
                let other = if j.id == ra.id { &rb.id } else { &ra.id };
                assert!(!out.stdout.contains(&format!("mine={other}")), "jobs share files\n{}", out.describe());
            });
        }
    });
    thread::scope(|s| {
        let ha = s.spawn(|| a.cleanup());
        let hb = s.spawn(|| b.cleanup());
        ha.join().unwrap().assert_ok();
        hb.join().unwrap().assert_ok();
    });
    assert_nothing_left(&env, &a.id);
    assert_nothing_left(&env, &b.id);
}

fn prepare_retry_after_failed_prepare(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "retry") else { return };
    let first = env.job().with_image("not-there-yet");
    let id = first.id.clone();
    first.config().assert_ok();
    first.prepare().assert_system_failure(2);
    first.cleanup().assert_ok();
    assert_nothing_left(&env, &id);
    // the next attempt: a fresh temp dir, config again, same job id, an image that exists
    let out = Job::new(&env, &id).with_image(IMAGE).run_whole_job("echo retried-ok");
    assert!(out.stdout.contains("retried-ok"), "{}", out.describe());
}

fn prepare_twice_without_cleanup(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "prep2") else { return };
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("get_sources", &job.get_sources_body("true")).assert_ok();
    // a second prepare for the same job id (gitlab-runner retried, the first cleanup got lost)
    let again = Job::new(&env, &job.id);
    again.config().assert_ok();
    again.prepare().assert_ok();
    assert!(nspawn_pids(&job.machine()).len() <= 1, "two machines for one job: {:?}", nspawn_pids(&job.machine()));
    let out = again.run("build_script", &again.get_sources_body("echo usable"));
    out.assert_ok();
    assert!(out.stdout.contains("usable"), "{}", out.describe());
    again.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

fn cleanup_is_idempotent_and_quiet(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "cleanup") else { return };
    // a job that never started
    let never = env.job();
    let before = tree(&env.store_dir);
    let out = never.cleanup();
    out.assert_ok();
    out.assert_quiet();
    assert_same_tree("cleanup of a job that never started", &before, &tree(&env.store_dir));
    assert_nothing_left(&env, &never.id);
    // a started job, cleaned up twice
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    job.run("build_script", &job.get_sources_body("true")).assert_ok();
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    let out = job.cleanup();
    out.assert_ok();
    out.assert_quiet();
    assert_nothing_left(&env, &job.id);
}
