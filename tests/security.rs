//! The security suite: from a job script, through the stage links, on both stores, a small
//! attack program (tests/attack/attack.c, built here with gcc) tries every attack class of
//! issue 8 and compares what the entered script got with the machine's init. Needs root and
//! gcc (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

both_stores! {
    attacks_from_a_job_are_refused;
}

/// The attack program, built once per test binary (static, so any image runs it).
fn attack_binary() -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/attack/attack.c");
    let out = test_base().join(format!("attack-{}", std::process::id()));
    if !out.exists() {
        let built = Command::new("gcc").args(["-O1", "-static", "-o"]).arg(&out).arg(&source).status();
        if !built.is_ok_and(|s| s.success()) {
            assert!(!in_ci(), "CI=true but gcc cannot build {}", source.display());
            eprintln!("SKIP: this test needs gcc with static glibc");
            return None;
        }
    }
    Some(out)
}

/// A btrfs subvolume of the test's own store dir for SNAP_DESTROY_V2 to aim at; its id.
fn decoy_subvolume(env: &TestEnv) -> (PathBuf, u64) {
    let decoy = env.store_dir.join("decoy");
    sh(&["btrfs", "-q", "subvolume", "create", decoy.to_str().unwrap()]);
    let id = sh(&["btrfs", "inspect-internal", "rootid", decoy.to_str().unwrap()]);
    (decoy, id.trim().parse().unwrap())
}

fn attacks_from_a_job_are_refused(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "security") else { return };
    let Some(attack) = attack_binary() else { return };
    let decoy = (kind == StoreKind::Btrfs).then(|| decoy_subvolume(&env));

    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    // The job's /cache is its project's cache dir, which prepare made.
    let in_cache = job.cache_dir().join("attack");
    fs::copy(&attack, &in_cache).unwrap();
    fs::set_permissions(&in_cache, fs::Permissions::from_mode(0o755)).unwrap();
    let filters = env.state_dir.join(format!("{}.seccomp", job.id));
    let mode = fs::metadata(&filters).unwrap_or_else(|e| panic!("{}: {e}", filters.display())).permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{} must be private", filters.display());

    let decoy_id = decoy.as_ref().map_or(0, |d| d.1);
    let out = job.run("build_script", &job.get_sources_body(&format!("/cache/attack {decoy_id}")));
    out.assert_ok();
    // The program judges itself (tests/attack/attack.c), for this suite and the VM suite alike.
    assert!(
        out.stdout.contains("done: attack program, 0 failed"),
        "the job got more than the machine's init (see the SUCCEEDED and MISMATCH lines):\n{}",
        out.describe()
    );

    // Builds still work as root and as an unprivileged user.
    let out = job.run(
        "build_script",
        &job.user_body(&[
            "apt-get check",
            "test \"$(setpriv --reuid=65534 --regid=65534 --clear-groups id -u)\" = 65534",
            "runuser -u nobody -- sh -c 'echo unprivileged-ok > /tmp/unprivileged && cat /tmp/unprivileged'",
        ]),
    );
    out.assert_ok();
    assert!(out.stdout.contains("unprivileged-ok"), "{}", out.describe());

    job.cleanup().assert_ok();
    assert!(!filters.exists(), "cleanup left {}", filters.display());
    if let Some((decoy, _)) = decoy {
        assert!(is_subvolume(&decoy), "the job destroyed the decoy subvolume");
        let _ = Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(&decoy).status();
    }
    assert_nothing_left(&env, &job.id);
}
