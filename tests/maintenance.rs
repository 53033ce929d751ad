//! Image maintenance transactions (issue 3): snapshots, `current`, job pinning, gc, rollback, locking and
//! crash safety, on real machines on a btrfs store and a plain store. Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::Duration;

both_stores! {
    job_pinning_and_gc;
    failed_maintain_changes_nothing;
    rollback_and_list;
    lock_contention;
    crash_safety_kill9;
    gc_removes_awkward_snapshots;
    cut_short_creation_is_cleaned_up;
    playbook_needs_python3;
}

fn marker(env: &TestEnv, snap: &str) -> Option<String> {
    fs::read_to_string(env.image_dir(IMAGE).join(snap).join("etc/marker")).ok()
}

fn maintain(env: &TestEnv, shell: &str) -> Out {
    env.admin(&["image", "maintain", IMAGE, "--", "sh", "-c", shell])
}

/// The line of `image list` output that names `snap`.
fn list_line(out: &str, snap: &str) -> String {
    out.lines()
        .find(|l| l.contains(snap))
        .unwrap_or_else(|| panic!("`image list` does not mention {snap}:\n{out}"))
        .to_lowercase()
}

/// Subvolumes (paths relative to the btrfs mount) below ROOT/NAME, on the btrfs store.
fn subvolumes_below(env: &TestEnv, dir: &Path) -> Vec<String> {
    let mnt = env.store_dir.parent().unwrap();
    let rel = dir.strip_prefix(mnt).unwrap().to_string_lossy().into_owned();
    let out = sh(&["btrfs", "subvolume", "list", mnt.to_str().unwrap()]);
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(" path ").nth(1))
        .filter(|p| p.starts_with(&format!("{rel}/")))
        .map(|p| p[rel.len() + 1..].to_string())
        .collect();
    v.sort();
    v
}

/// After gc: ROOT/NAME holds `current`, lock files (`.lock`; the binary also keeps a `.pin.lock`), the
/// current snapshot and at most `keep` more snapshots (plus `leased` ones), nothing else (no .tx-*, no
/// orphans; no .#machine.* and their held nspawn locks unless `jobs_running`), and on btrfs no
/// subvolume besides those snapshots.
#[track_caller]
fn assert_no_orphans(env: &TestEnv, keep: usize, leased: &[&str], jobs_running: bool) {
    let cur = env.current(IMAGE).expect("a valid current");
    let entries = env.entries(IMAGE);
    let is_lock = |e: &str| {
        e.starts_with('.')
            && e.ends_with(".lock")
            && fs::symlink_metadata(env.image_dir(IMAGE).join(e)).map(|m| m.is_file()).unwrap_or(false)
    };
    // A running machine's copy, and the lock file beside it that its nspawn holds.
    let is_machine =
        |e: &str| jobs_running && (e.starts_with(".#machine.") || e.starts_with(".#.#machine.") && e.ends_with(".lck"));
    for e in &entries {
        assert!(
            e == "current" || is_lock(e) || is_machine(e) || is_snapshot_name(e),
            "unexpected entry {e:?} in {} after gc: {entries:?}",
            env.image_dir(IMAGE).display()
        );
    }
    let snaps = env.snapshots(IMAGE);
    assert!(snaps.contains(&cur));
    let others = snaps.iter().filter(|s| **s != cur && !leased.contains(&s.as_str())).count();
    assert!(others <= keep, "gc kept {others} old snapshots with KEEP={keep}: {snaps:?} (current {cur})");
    for s in &snaps {
        assert!(env.image_dir(IMAGE).join(s).join("usr/lib/systemd/systemd").exists(), "snapshot {s} is incomplete");
    }
    if env.kind == StoreKind::Btrfs {
        let mut subs = subvolumes_below(env, &env.image_dir(IMAGE));
        subs.retain(|sv| !is_machine(sv.as_str()));
        assert_eq!(subs, snaps, "subvolumes below the image dir are not exactly its snapshots");
    }
    if !jobs_running {
        let m = mounts_below(&env.store_dir);
        assert!(m.is_empty(), "mounts left in the store: {m:?}");
    }
}

/// prepare + run + cleanup of one job; returns what /etc/marker says inside the machine.
fn boot_and_read_marker(env: &TestEnv) -> String {
    let out = env.job().run_whole_job("echo \"marker=$(cat /etc/marker 2>/dev/null || echo none)\"");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("marker="))
        .unwrap_or_else(|| panic!("no marker line\n{}", out.describe()))
        .to_string()
}

fn job_pinning_and_gc(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "pinning") else { return };
    env.set("NSPAWN_RUNNER_KEEP", "0");
    let s1 = env.current(IMAGE).unwrap();
    let a = env.job();
    a.config().assert_ok();
    a.prepare().assert_ok();
    a.run("get_sources", &a.get_sources_body("echo a > mine")).assert_ok();
    let no_marker = a.user_body(&["test ! -e /etc/marker", "echo no-marker-here"]);
    a.run("build_script", &no_marker).assert_ok();

    maintain(&env, "echo v2 > /etc/marker").assert_ok();
    let s2 = env.current(IMAGE).unwrap();
    assert_ne!(s1, s2, "maintain did not commit a new snapshot");
    assert_eq!(marker(&env, &s2).as_deref(), Some("v2\n"));
    assert_eq!(marker(&env, &s1), None, "maintain modified the old snapshot in place");

    // job A keeps running on its snapshot
    let out = a.run("build_script", &no_marker);
    out.assert_ok();
    assert!(out.stdout.contains("no-marker-here"));
    // a new job B gets the new snapshot
    let b = env.job();
    b.config().assert_ok();
    b.prepare().assert_ok();
    let out = b.run("build_script", &b.get_sources_body("cat /etc/marker"));
    out.assert_ok();
    assert!(out.stdout.contains("v2"), "job B does not see the new snapshot\n{}", out.describe());

    // list: s2 is current, s1 is leased by job A
    let list = env.admin(&["image", "list", IMAGE]);
    list.assert_ok();
    assert!(list_line(&list.stdout, &s2).contains("current"), "{}", list.describe());
    assert!(list_line(&list.stdout, &s1).contains("leas"), "s1 should be shown as leased\n{}", list.describe());

    // gc (KEEP=0) must not touch A's snapshot while A runs
    env.admin(&["image", "gc", IMAGE]).assert_ok();
    assert!(env.image_dir(IMAGE).join(&s1).join("usr/lib/systemd/systemd").exists(), "gc deleted a leased snapshot");
    assert_no_orphans(&env, 0, &[&s1], true);
    let out = a.run("build_script", &a.user_body(&["cat mine", "test ! -e /etc/marker"]));
    out.assert_ok();

    b.cleanup().assert_ok();
    a.cleanup().assert_ok();
    assert_nothing_left(&env, &a.id);
    assert_nothing_left(&env, &b.id);
    // after A's cleanup, gc removes s1 (beyond KEEP=0)
    env.admin(&["image", "gc", IMAGE]).assert_ok();
    assert_eq!(env.snapshots(IMAGE), vec![s2.clone()], "gc left old snapshots behind");
    assert_no_orphans(&env, 0, &[], false);
    assert_eq!(boot_and_read_marker(&env), "v2");
}

fn failed_maintain_changes_nothing(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "failmaint") else { return };
    let s1 = env.current(IMAGE).unwrap();
    let entries = env.entries(IMAGE);
    let before = tree(&env.store_dir);
    let script = env.work.join("fail.sh");
    fs::write(&script, "#!/bin/sh\necho from-script > /etc/marker\nexit 5\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let attempts: Vec<Vec<&str>> = vec![
        vec!["image", "maintain", IMAGE, "--", "sh", "-c", "echo broken > /etc/marker; exit 3"],
        vec!["image", "maintain", IMAGE, "--", "/no/such/command"],
        vec!["image", "maintain", IMAGE, "--script", script.to_str().unwrap()],
    ];
    for args in attempts {
        let out = env.admin(&args);
        assert!(out.code.is_some() && out.code != Some(0), "{args:?} must fail\n{}", out.describe());
        assert_eq!(env.current(IMAGE).as_deref(), Some(s1.as_str()), "{args:?} moved current");
        let mut after = env.entries(IMAGE);
        // lock files may be created by the first transaction
        after.retain(|e| !e.ends_with(".lock") || entries.contains(e));
        assert_eq!(after, entries, "{args:?} left something in the image dir");
        let mut t = tree(&env.store_dir);
        t.retain(|k, _| !k.ends_with(".lock"));
        let mut b = before.clone();
        b.retain(|k, _| !k.ends_with(".lock"));
        assert_same_tree(&format!("{args:?}"), &b, &t);
        assert_eq!(marker(&env, &s1), None, "{args:?} modified the current tree in place");
    }
    assert_no_orphans(&env, 0, &[], false);
    assert_eq!(boot_and_read_marker(&env), "none");
}

fn rollback_and_list(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "rollback") else { return };
    let s1 = env.current(IMAGE).unwrap();
    maintain(&env, "echo v2 > /etc/marker").assert_ok();
    let s2 = env.current(IMAGE).unwrap();
    assert_ne!(s1, s2);
    // KEEP=1 (default): s1 is kept
    assert!(env.snapshots(IMAGE).contains(&s1), "the previous snapshot must be kept with KEEP=1");
    let list = env.admin(&["image", "list", IMAGE]);
    list.assert_ok();
    assert!(list_line(&list.stdout, &s2).contains("current"), "{}", list.describe());
    assert!(!list_line(&list.stdout, &s1).contains("current"), "{}", list.describe());
    assert!(
        list_line(&list.stdout, &s1).contains("kept") || list_line(&list.stdout, &s1).contains("keep"),
        "{}",
        list.describe()
    );
    let all = env.admin(&["image", "list"]);
    all.assert_ok();
    assert!(all.stdout.contains(IMAGE), "{}", all.describe());

    // hostile rollback targets: refused, nothing changes
    let img = env.image_dir(IMAGE);
    symlink(img.join(&s1), img.join("77_77")).unwrap(); // a snapshot-looking symlink
    fs::create_dir(img.join(".tx-88_88")).unwrap(); // an unfinished transaction
    let traversal = format!("{s1}/../{s2}");
    let sibling = format!("../{IMAGE}/{s1}");
    let before = tree(&env.store_dir);
    for t in [
        "../../etc",
        "..",
        ".",
        "/",
        "",
        "current",
        ".lock",
        ".tx-88_88",
        "77_77",
        "99_99",
        ".#machine.x",
        "1_1/../..",
        traversal.as_str(),
        sibling.as_str(),
        "x\ny",
    ] {
        let out = env.admin(&["image", "rollback", IMAGE, t]);
        assert!(out.code.is_some() && out.code != Some(0), "rollback to {t:?} must be refused\n{}", out.describe());
        assert!(!out.stderr.trim().is_empty(), "rollback to {t:?}: no error message");
        assert_eq!(env.current(IMAGE).as_deref(), Some(s2.as_str()), "rollback to {t:?} moved current");
        assert_same_tree(&format!("rollback to {t:?}"), &before, &tree(&env.store_dir));
    }
    fs::remove_file(img.join("77_77")).unwrap();
    fs::remove_dir(img.join(".tx-88_88")).unwrap();

    // rollback without a target: back to the previous snapshot
    env.admin(&["image", "rollback", IMAGE]).assert_ok();
    assert_eq!(env.current(IMAGE).as_deref(), Some(s1.as_str()));
    assert_eq!(boot_and_read_marker(&env), "none");
    // and forward again by name
    env.admin(&["image", "rollback", IMAGE, &s2]).assert_ok();
    assert_eq!(env.current(IMAGE).as_deref(), Some(s2.as_str()));
    assert_eq!(boot_and_read_marker(&env), "v2");
    assert!(env.snapshots(IMAGE).contains(&s1));
    env.admin(&["image", "gc", IMAGE]).assert_ok();
    assert_no_orphans(&env, 1, &[], false);
    assert_store_idle(&env);
}

fn lock_contention(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "lock") else { return };
    let img = env.image_dir(IMAGE);
    let s0 = env.current(IMAGE).unwrap();
    let tx_started = || env.entries(IMAGE).iter().any(|e| e.starts_with(".tx-"));

    // Two maintains at once: the second either waits and builds on the first's result, or fails clearly.
    // Never interleaved, never a lost update.
    let m1 = spawn(
        "maintain m1",
        &mut env.admin_cmd(&[
            "image",
            "maintain",
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo m1-start >> /etc/log; sleep 4; echo m1-end >> /etc/log",
        ]),
    );
    assert!(wait_until(Duration::from_secs(60), tx_started), "m1 never started a transaction");
    thread::sleep(Duration::from_millis(500));
    let m2 = spawn(
        "maintain m2",
        &mut env.admin_cmd(&["image", "maintain", IMAGE, "--", "sh", "-c", "echo m2 >> /etc/log"]),
    );
    let o1 = m1.wait(CMD_TIMEOUT);
    let o2 = m2.wait(CMD_TIMEOUT);
    o1.assert_ok();
    let cur = env.current(IMAGE).unwrap();
    assert_ne!(cur, s0);
    let log = fs::read_to_string(img.join(&cur).join("etc/log")).unwrap_or_default();
    if o2.code == Some(0) {
        assert_eq!(log, "m1-start\nm1-end\nm2\n", "the second maintain did not build on the first one's result");
    } else {
        assert!(
            o2.code.is_some() && !o2.stderr.trim().is_empty(),
            "the second maintain failed unclearly\n{}",
            o2.describe()
        );
        assert_eq!(log, "m1-start\nm1-end\n");
    }

    // With a short lock timeout the waiting one gives up clearly and in time.
    let m1 = spawn(
        "maintain m1 (long)",
        &mut env.admin_cmd(&["image", "maintain", IMAGE, "--", "sh", "-c", "echo long >> /etc/log; sleep 6"]),
    );
    assert!(wait_until(Duration::from_secs(60), tx_started), "m1 never started a transaction");
    let o2 = env.admin_env(
        &["image", "maintain", IMAGE, "--", "sh", "-c", "echo short >> /etc/log"],
        &[("NSPAWN_RUNNER_LOCK_TIMEOUT", "1")],
    );
    assert!(
        o2.code.is_some() && o2.code != Some(0),
        "a maintain must not run while another holds the lock\n{}",
        o2.describe()
    );
    assert!(o2.elapsed < Duration::from_secs(5), "NSPAWN_RUNNER_LOCK_TIMEOUT=1 not honoured: {:?}", o2.elapsed);
    assert!(!o2.stderr.trim().is_empty(), "{}", o2.describe());
    m1.wait(CMD_TIMEOUT).assert_ok();
    let cur = env.current(IMAGE).unwrap();
    let log = fs::read_to_string(img.join(&cur).join("etc/log")).unwrap_or_default();
    assert!(log.ends_with("long\n") && !log.contains("short"), "{log:?}");
    env.admin(&["image", "gc", IMAGE]).assert_ok();
    assert_no_orphans(&env, 1, &[], false);
    assert_store_idle(&env);
}

/// Processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    processes().into_iter().map(|(p, _)| p).filter(|p| unsafe { libc::getpgid(*p) } == pgid).collect()
}

fn crash_safety_kill9(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "crash") else { return };
    env.set("NSPAWN_RUNNER_LOCK_TIMEOUT", "60");
    let mut rng = Rng::new();
    // How long one undisturbed transaction takes here: the kills land at random moments over its whole
    // length (plus 10 %, capped at 5 s), so that they hit the copy, the command and the commit, rather
    // than a fixed 0..2 s that on a fast btrfs mostly hits nothing and on a slow copy never the commit.
    let t = std::time::Instant::now();
    maintain(&env, "echo base > /etc/marker").assert_ok();
    let span = (t.elapsed() * 11 / 10).min(Duration::from_secs(5)).as_millis().max(50) as u64;
    eprintln!("one maintain takes {:?}; killing at random moments in 0..{span} ms", t.elapsed());
    let mut killed_midway = 0;
    for i in 0..10 {
        let delay = Duration::from_millis(rng.below(span));
        let before = env.current(IMAGE).unwrap();
        let before_marker = marker(&env, &before);
        let r = spawn(
            &format!("maintain #{i}"),
            &mut env.admin_cmd(&["image", "maintain", IMAGE, "--", "sh", "-c", &format!("echo v{i} > /etc/marker")]),
        );
        let pid = r.pid();
        thread::sleep(delay);
        r.kill_pid(libc::SIGKILL);
        let killed_at = std::time::Instant::now();
        // Then its children (cp, nspawn, ...), as a service manager does when a unit's main process dies
        // (KillMode=control-group). Left alone, an orphaned `cp` of the plain backend goes on filling the
        // dead transaction's directory for many seconds.
        r.kill_group(libc::SIGKILL);
        let gone = wait_until(Duration::from_secs(30), || group_members(pid).iter().all(|p| *p == pid));
        assert!(gone, "iteration {i}: children of the killed maintain survive SIGKILL for 30 s");
        // The health check's machine runs in a session of its own, like a job's, and dies with the
        // maintain that started it: nspawn gets SIGTERM and kills it.
        let machine_gone = wait_until(Duration::from_secs(30), || processes_using(&env.store_dir).is_empty());
        assert!(machine_gone, "iteration {i}: the killed maintain's check machine survives it for 30 s");
        let out = r.wait(Duration::from_secs(30));
        eprintln!(
            "iteration {i}: killed after {delay:?}: {:?} {:?}; its process group was gone {:?} later",
            out.code,
            out.signal,
            killed_at.elapsed()
        );
        if out.signal == Some(libc::SIGKILL) {
            killed_midway += 1;
        }

        // `current` resolves to a complete tree: the old one or the new one, never a half-built one
        let cur = env.current(IMAGE).unwrap_or_else(|| panic!("iteration {i}: no valid current"));
        let dir = env.image_dir(IMAGE).join(&cur);
        assert!(dir.join("usr/lib/systemd/systemd").exists(), "iteration {i}: current tree {cur} is incomplete");
        let m = marker(&env, &cur);
        if cur == before {
            assert_eq!(m, before_marker, "iteration {i}: the current tree was changed in place");
        } else {
            assert_eq!(
                m.as_deref(),
                Some(format!("v{i}\n").as_str()),
                "iteration {i}: new current without the new marker"
            );
        }
        if out.code == Some(0) {
            assert_ne!(cur, before, "iteration {i}: maintain succeeded but current did not move");
        }
        // gc cleans up whatever the killed transaction left (a killed health check's record too).
        // gc leaves a check machine alone while anything of it still lives (its nspawn removes its
        // copy and unmounts after the machine's processes are gone): a later gc reaps it.
        let check_left = || {
            env.admin(&["image", "gc", IMAGE]).assert_ok();
            let records = fs::read_dir(&env.state_dir).map(|d| d.flatten().count()).unwrap_or(0);
            let job_dirs = fs::read_dir(env.root.join(".jobs")).map(|d| d.flatten().count()).unwrap_or(0);
            records + job_dirs > 0
        };
        assert!(wait_until(Duration::from_secs(30), || !check_left()), "iteration {i}: gc never reaped the check");
        assert_no_orphans(&env, 1, &[], false);
        // it boots and the machine sees the same tree
        let seen = boot_and_read_marker(&env);
        assert_eq!(seen, m.as_deref().map(str::trim).unwrap_or("none"), "iteration {i}");
    }
    eprintln!("{killed_midway} of 10 maintains were killed before they finished");
    // the store still takes a transaction (no stale lock)
    let out = env.admin_env(
        &["image", "maintain", IMAGE, "--", "sh", "-c", "echo final > /etc/marker"],
        &[("NSPAWN_RUNNER_LOCK_TIMEOUT", "10")],
    );
    out.assert_ok();
    assert_eq!(boot_and_read_marker(&env), "final");
}

/// gc deletes an old snapshot that is hard to delete: on btrfs one with nested subvolumes inside (as
/// `machinectl`/nspawn create at /var/lib/machines), on a plain store one with unwritable directories.
fn gc_removes_awkward_snapshots(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "gcnested") else { return };
    let s1 = env.current(IMAGE).unwrap();
    maintain(&env, "echo v2 > /etc/marker").assert_ok();
    let s2 = env.current(IMAGE).unwrap();
    let old = env.image_dir(IMAGE).join(&s1);
    assert!(old.exists(), "KEEP=1 must keep {s1}");
    match kind {
        StoreKind::Btrfs => {
            // snapshots may be read-only subvolumes: make the old one writable for the setup
            let ro = sh(&["btrfs", "property", "get", "-ts", old.to_str().unwrap(), "ro"]).contains("true");
            if ro {
                sh(&["btrfs", "property", "set", "-ts", old.to_str().unwrap(), "ro", "false"]);
            }
            let machines = old.join("var/lib/machines");
            if machines.exists() {
                fs::remove_dir(&machines).unwrap();
            }
            sh(&["btrfs", "-q", "subvolume", "create", machines.to_str().unwrap()]);
            sh(&["btrfs", "-q", "subvolume", "create", machines.join("inner").to_str().unwrap()]);
            fs::write(machines.join("inner/file"), "x").unwrap();
            if ro {
                sh(&["btrfs", "property", "set", "-ts", old.to_str().unwrap(), "ro", "true"]);
            }
            let subs = subvolumes_below(&env, &env.image_dir(IMAGE));
            assert!(subs.contains(&format!("{s1}/var/lib/machines/inner")), "{subs:?}");
        }
        StoreKind::Plain => {
            let d = old.join("var/lib/locked/deeper");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("file"), "x").unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o000)).unwrap();
            fs::set_permissions(old.join("var/lib/locked"), fs::Permissions::from_mode(0o500)).unwrap();
        }
    }
    env.admin_env(&["image", "gc", IMAGE], &[("NSPAWN_RUNNER_KEEP", "0")]).assert_ok();
    assert!(fs::symlink_metadata(&old).is_err(), "gc left {}", old.display());
    assert_eq!(env.snapshots(IMAGE), vec![s2]);
    assert_no_orphans(&env, 0, &[], false);
    assert_store_idle(&env);
}

/// A creation killed before its commit (as a power cut during `image import` of a new name does in the VM
/// suite) leaves an image directory with a `.tx-*` tree and no `current`: `image list` and `image gc`
/// still work for every image, and gc deletes the leftover.
fn cut_short_creation_is_cleaned_up(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "cutshort") else { return };
    let source = env.image_dir(IMAGE).join(env.current(IMAGE).unwrap());
    let fresh = env.image_dir("fresh");
    let mut cut = false;
    for attempt in 0..5 {
        let r = spawn("import fresh", &mut env.admin_cmd(&["image", "import", "fresh", source.to_str().unwrap()]));
        let pid = r.pid();
        wait_until(Duration::from_secs(60), || {
            fs::read_dir(&fresh)
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tx-")))
                .unwrap_or(false)
        });
        r.kill_pid(libc::SIGKILL);
        r.kill_group(libc::SIGKILL);
        assert!(wait_until(Duration::from_secs(30), || group_members(pid).iter().all(|p| *p == pid)));
        r.wait(Duration::from_secs(30));
        if env.current("fresh").is_none() {
            cut = true;
            break;
        }
        eprintln!("attempt {attempt}: the import finished before the kill; again");
        env.admin(&["image", "remove", "fresh", "--force"]).assert_ok();
    }
    assert!(cut, "no import was killed before its commit in 5 attempts");
    assert!(env.entries("fresh").iter().any(|e| e.starts_with(".tx-")), "{:?}", env.entries("fresh"));
    let list = env.admin(&["image", "list"]);
    list.assert_ok();
    assert!(list.stdout.contains(IMAGE) && list.stdout.contains("fresh: no current"), "{}", list.describe());
    env.admin(&["image", "gc"]).assert_ok();
    let left: Vec<String> = env.entries("fresh").into_iter().filter(|e| e.starts_with(".tx-")).collect();
    assert!(left.is_empty(), "gc left {left:?} in {}", fresh.display());
    // the name can be created again
    env.admin(&["image", "import", "fresh", source.to_str().unwrap()]).assert_ok();
    assert!(env.current("fresh").is_some());
    assert_store_idle(&env);
}

fn playbook_needs_python3(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "python") else { return };
    let s1 = env.current(IMAGE).unwrap();
    fs::write(env.config_dir.join(format!("{IMAGE}.yaml")), "- hosts: all\n  tasks: []\n").unwrap();
    // ansible itself is a fake that records being run: what is tested is the check before it.
    let bin = env.work.join("fakebin");
    fs::create_dir_all(&bin).unwrap();
    let ran = env.work.join("ansible-ran");
    fs::write(bin.join("ansible-playbook"), format!("#!/bin/sh\ntouch {}\n", ran.display())).unwrap();
    fs::set_permissions(bin.join("ansible-playbook"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{PATH}", bin.display());
    // The test image is minbase without python3 (images made by `image create` have it).
    let out = env.admin_env(&["image", "maintain", IMAGE], &[("PATH", &path), ("NSPAWN_RUNNER_LOG", "warn")]);
    out.assert_code(1).assert_one_line_stderr();
    assert!(out.stderr.contains("has no /usr/bin/python3"), "{}", out.describe());
    assert!(!ran.exists(), "ansible ran without python3 in the image");
    assert_eq!(env.current(IMAGE).as_deref(), Some(s1.as_str()));
    maintain(&env, "ln -s python3.11 /usr/bin/python3").assert_ok();
    env.admin_env(&["image", "maintain", IMAGE], &[("PATH", &path)]).assert_ok();
    assert!(ran.exists(), "the playbook did not run once python3 was there");
}
