//! The settings file as the binary reads it: the admin CLI sees the same settings as the
//! stages, the environment wins, typos are errors, and a job's variables are never settings.

mod common;

use common::BIN;
use std::path::PathBuf;
use std::process::Command;

fn settings_dir(tag: &str) -> PathBuf {
    let dir = common::test_base().join("work").join(format!("settings-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nspawn_runner(settings: &PathBuf, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.env_clear().env("PATH", "/usr/bin:/bin").env("NSPAWN_RUNNER_SETTINGS", settings).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn commands_and_stages_read_the_file_and_the_environment_wins() {
    let dir = settings_dir("file");
    let file = dir.join("settings");
    let state = dir.join("state");
    std::fs::write(
        &file,
        format!("NSPAWN_RUNNER_STATE_DIR={}\nNSPAWN_RUNNER_BUILDS_DIR=/srv/builds\n", state.display()),
    )
    .unwrap();
    let (rc, out, err) = nspawn_runner(&file, &[("NSPAWN_RUNNER_KEEP", "7")], &["settings"]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("NSPAWN_RUNNER_BUILDS_DIR=/srv/builds") && out.contains(&format!("{}:2", file.display())),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("NSPAWN_RUNNER_KEEP=7 ") && l.ends_with("# environment")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("NSPAWN_RUNNER_SUITE=trixie ") && l.ends_with("# default")), "{out}");
    // The config stage (through its own name) sees the file's builds dir.
    let (rc, out, err) = nspawn_runner(&file, &[], &["config"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("\"builds_dir\":\"/srv/builds\""), "{out}");
    // A job's variables never become settings, whatever their name.
    let (rc, out, _) = nspawn_runner(
        &file,
        &[("CUSTOM_ENV_NSPAWN_RUNNER_BUILDS_DIR", "/evil"), ("CUSTOM_ENV_NSPAWN_RUNNER_BOGUS", "1")],
        &["config"],
    );
    assert_eq!(rc, 0);
    assert!(out.contains("/srv/builds") && !out.contains("/evil"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_typo_in_the_file_or_the_environment_is_an_error_listing_the_known_names() {
    let dir = settings_dir("typo");
    let file = dir.join("settings");
    std::fs::write(&file, "NSPAWN_RUNNER_MEMORYMAX=2G\n").unwrap();
    let (rc, _, err) = nspawn_runner(&file, &[], &["status"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains(&format!("{}:1", file.display())) && err.contains("NSPAWN_RUNNER_MEMORY_MAX"), "{err}");
    // A stage fails as a system failure, before doing anything.
    let (rc, _, err) = nspawn_runner(&file, &[("SYSTEM_FAILURE_EXIT_CODE", "2")], &["config"]);
    assert_eq!(rc, 2, "{err}");
    std::fs::write(&file, "").unwrap();
    let (rc, _, err) = nspawn_runner(&file, &[("NSPAWN_RUNNER_ROOTT", "/x")], &["status"]);
    assert_eq!(rc, 1);
    assert!(err.contains("NSPAWN_RUNNER_ROOTT") && err.contains("did you mean NSPAWN_RUNNER_ROOT?"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
