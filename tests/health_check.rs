//! The health check before a commit (issue 9): a maintenance whose tree does not boot, lacks git or fails
//! the image's smoke script is refused and changes nothing; `check=false` and NSPAWN_RUNNER_CHECK=false
//! commit such a tree. On real machines on a btrfs store and a plain store. Needs root (see tests/common).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};

both_stores! {
    broken_trees_are_not_committed;
    smoke_script_and_opting_out;
}

/// The log of the image's last failed check, beside its directory.
fn check_log(env: &TestEnv) -> PathBuf {
    env.root.join(format!(".check-{IMAGE}.log"))
}

/// Replaces systemd with a program that exits at once: the tree cannot boot.
const BREAK_INIT: &str = "printf '#!/bin/sh\\nexit 1\\n' > /usr/lib/systemd/systemd";

fn maintain(env: &TestEnv, shell: &str) -> Out {
    admin_checked(env, &["image", "maintain", IMAGE, "--", "sh", "-c", shell], &[])
}

/// A refused commit: exit 1, a last stderr line that names the check's log and `what` failed, the log
/// there, `current` still `snap`, the image dir as before.
#[track_caller]
fn assert_refused(env: &TestEnv, out: &Out, snap: &str, entries: &[String], what: &str) {
    out.assert_code(1);
    let log = check_log(env);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("nspawn-runner: ") && last.contains(&format!("log: {}", log.display())) && last.contains(what),
        "expected one error line naming {} and {what:?}\n{}",
        log.display(),
        out.describe()
    );
    assert!(log.is_file(), "the check's log {} is missing", log.display());
    assert_eq!(env.current(IMAGE).as_deref(), Some(snap), "a refused commit moved current");
    let after = env.entries(IMAGE);
    assert_eq!(after, entries, "the refused transaction left something in the image dir");
}

/// `nspawn-runner ARGS` with `vars`, after which nothing of its health check is left: no machine, no
/// cgroup (both named after the maintain's pid), and nothing in the store or state dir.
fn admin_checked(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> Out {
    let mut command = env.admin_cmd(args);
    command.env("NSPAWN_RUNNER_LOG", "warn");
    for (k, v) in vars {
        command.env(k, v);
    }
    let running = spawn(&format!("nspawn-runner {}", args.join(" ")), &mut command);
    let suffix = format!("-{}", running.pid());
    let out = running.wait(CMD_TIMEOUT);
    let machines: Vec<_> = processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a.starts_with("--machine=run-check-") && a.ends_with(&suffix)))
        .collect();
    assert!(machines.is_empty(), "the check machine still runs: {machines:?}\n{}", out.describe());
    let cgroups: Vec<PathBuf> = check_cgroups(Path::new("/sys/fs/cgroup"), 0)
        .into_iter()
        .filter(|c| c.to_string_lossy().ends_with(&suffix))
        .collect();
    assert!(cgroups.is_empty(), "check machine cgroups left: {cgroups:?}\n{}", out.describe());
    assert_store_idle(env);
    out
}

/// cgroups of check machines (`nspawn-runner-run-check-*`) below `dir`.
fn check_cgroups(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name().to_string_lossy().starts_with("nspawn-runner-run-check-") {
            found.push(entry.path());
        } else if depth < 8 {
            found.extend(check_cgroups(&entry.path(), depth + 1));
        }
    }
    found
}

fn broken_trees_are_not_committed(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hcbroken") else { return };
    let s1 = env.current(IMAGE).unwrap();
    let entries = env.entries(IMAGE);
    // The tree's systemd does not start at all.
    let out = maintain(&env, BREAK_INIT);
    assert_refused(&env, &out, &s1, &entries, "before the machine was ready");
    // systemd starts, but into rescue mode: `maintenance`, neither running nor degraded.
    let out = maintain(&env, "systemctl set-default rescue.target");
    assert_refused(&env, &out, &s1, &entries, "systemd is maintenance, not running or degraded");
    let log = fs::read_to_string(check_log(&env)).unwrap();
    assert!(log.contains("systemd is maintenance"), "the log lacks the check's output:\n{log}");
    // Jobs need git.
    let out = maintain(&env, "rm /usr/bin/git");
    assert_refused(&env, &out, &s1, &entries, "git is missing");
    // A harmless maintenance commits, and the log of the failures goes.
    maintain(&env, "echo v2 > /etc/marker").assert_ok();
    assert_ne!(env.current(IMAGE).unwrap(), s1);
    assert!(!check_log(&env).exists(), "a passing check left the log of a failed one");
    let out = env.job().run_whole_job("cat /etc/marker; git --version");
    assert!(out.stdout.contains("v2"), "{}", out.describe());
}

fn smoke_script_and_opting_out(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "hcsmoke") else { return };
    // The bootable snapshot must survive the commits after it, for the rollback at the end.
    env.set("NSPAWN_RUNNER_KEEP", "5");
    let s1 = env.current(IMAGE).unwrap();
    let entries = env.entries(IMAGE);
    // The admin's smoke script runs inside the booted machine; its exit code decides.
    let smoke = env.config_dir.join(format!("{IMAGE}.check"));
    fs::write(&smoke, "echo smoke on $(hostname)\ntest -e /etc/marker || exit 7\nsystemctl is-active dbus.socket\n")
        .unwrap();
    let out = maintain(&env, "true");
    assert_refused(&env, &out, &s1, &entries, &format!("{} exited with 7", smoke.display()));
    let log = fs::read_to_string(check_log(&env)).unwrap();
    assert!(log.contains("smoke on run-check-"), "the smoke script's output is not in the log:\n{log}");
    maintain(&env, "echo v2 > /etc/marker").assert_ok();
    let s2 = env.current(IMAGE).unwrap();
    assert_ne!(s2, s1);
    fs::remove_file(&smoke).unwrap();

    // An image that is not meant to boot opts out: the broken tree commits.
    let conf = env.config_dir.join(format!("{IMAGE}.conf"));
    fs::write(&conf, "check=false\n").unwrap();
    maintain(&env, BREAK_INIT).assert_ok();
    let s3 = env.current(IMAGE).unwrap();
    assert_ne!(s3, s2, "check=false did not commit");
    let list = env.admin(&["image", "list", IMAGE]);
    list.assert_ok();
    assert!(list.stdout.contains("check=false"), "{}", list.describe());
    fs::remove_file(&conf).unwrap();
    // Checked again, the unbootable current refuses every commit, until the global switch is off.
    let entries = env.entries(IMAGE);
    let out = maintain(&env, "true");
    assert_refused(&env, &out, &s3, &entries, "before the machine was ready");
    admin_checked(&env, &["image", "maintain", IMAGE, "--", "true"], &[("NSPAWN_RUNNER_CHECK", "false")]).assert_ok();
    let settings = env.admin_env(&["settings"], &[("NSPAWN_RUNNER_CHECK", "false")]);
    assert!(settings.stdout.contains("NSPAWN_RUNNER_CHECK=false"), "{}", settings.describe());
    // Back to the bootable snapshot: jobs run, nothing is left.
    env.admin(&["image", "rollback", IMAGE, &s2]).assert_ok();
    let out = env.job().run_whole_job("cat /etc/marker");
    assert!(out.stdout.contains("v2"), "{}", out.describe());
    // The log of the last failed check goes with the image.
    assert!(check_log(&env).is_file());
    env.admin(&["image", "remove", IMAGE]).assert_ok();
    assert!(!check_log(&env).exists(), "image remove left {}", check_log(&env).display());
}
