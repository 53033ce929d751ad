//! What real runner hosts do to jobs: gitlab-runner crashes and never calls cleanup (gc reaps
//! machines older than NSPAWN_RUNNER_MAX_JOB_AGE), and kills a run stage with SIGKILL (its
//! script's processes must not live on in the machine). Real machines on a btrfs store and a
//! plain store. Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

both_stores! {
    gc_reaps_jobs_over_the_max_age;
    scripts_die_with_their_stage;
    cgroup_games_of_a_job_touch_only_the_job;
}

fn state_path(env: &TestEnv, id: &str) -> PathBuf {
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

/// A build_script that leaves `sleep N` running every way a script can (in the background, in a
/// session of its own, double-forked to the machine's init), each process marked with `mark`
/// in its environment, then sleeps in the foreground (`sleep N+3`).
fn leaving_script(job: &Job, mark: &str, n: u32) -> String {
    let commands = [
        format!("env {mark} sleep {n} &"),
        format!("setsid env {mark} sleep {} &", n + 1),
        format!("( env {mark} sleep {} & )", n + 2),
        "echo started-all".to_owned(),
        format!("env {mark} sleep {}", n + 3),
    ];
    job.user_body(&commands.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The marked `sleep N..N+3` processes alive on the host.
fn left(mark: &str, n: u32) -> Vec<i32> {
    (n..n + 4).flat_map(|k| marked_processes(&["sleep", &k.to_string()], mark)).collect()
}

/// Every cgroup below `dir` named like a script's.
fn script_cgroups(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if entry.file_name().to_string_lossy().starts_with("nspawn-runner-script-") {
                found.push(entry.path());
            }
            found.extend(script_cgroups(&entry.path()));
        }
    }
    found
}

/// The host cgroup directories of the job's machine (its init's, in every hierarchy).
fn machine_cgroup_dirs(env: &TestEnv, id: &str) -> Vec<PathBuf> {
    let leader = state_json(env, id)["running"]["leader_pid"].as_i64().unwrap();
    let membership = fs::read_to_string(format!("/proc/{leader}/cgroup")).unwrap();
    let mut dirs = Vec::new();
    for line in membership.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap().trim_start_matches('/');
        // its tree: the parent of init.scope, in the hierarchies the machine's systemd manages
        let Some(tree) = path.strip_suffix("/init.scope") else { continue };
        for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"] {
            let dir = Path::new(mount).join(tree);
            if dir.join("init.scope").is_dir() {
                dirs.push(dir);
            }
        }
    }
    assert!(!dirs.is_empty(), "the machine's init is in no init.scope:\n{membership}");
    dirs
}

/// Lists, from inside the machine, every process whose command line starts with `sleep`.
const SLEEPS_INSIDE: &str = "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); \
                             case \"$c\" in sleep*) echo \"inside: $c\";; esac; done";

/// The pid of the other process running the same command line as `pid` (the run stage's
/// guard: a fork of it).
fn guard_of(pid: i32) -> i32 {
    let argv = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let guards: Vec<i32> = processes()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| *p != pid && fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|a| a == argv))
        .collect();
    assert_eq!(guards.len(), 1, "expected one guard of run stage {pid}: {guards:?}");
    guards[0]
}

/// The script's bash: the child of the run stage `pid` running `/bin/bash -s`.
fn bash_of(pid: i32) -> i32 {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let bash: Vec<i32> = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .filter(|c| fs::read(format!("/proc/{c}/cmdline")).is_ok_and(|a| a == b"/bin/bash\0-s\0"))
        .collect();
    assert_eq!(bash.len(), 1, "expected one bash below run stage {pid}: {children}");
    bash[0]
}

fn scripts_die_with_their_stage(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "scriptsdie") else { return };
    let job = prepared(&env);
    let mark = format!("NR_TEST_MARK={}", job.id);
    let cgroups = machine_cgroup_dirs(&env, &job.id);

    // A daemon the job starts with the machine's systemd is no script leftover: it lives on.
    let daemon = format!("systemd-run --quiet --unit=job-daemon env {mark} sleep 2000");
    job.run("build_script", &job.user_body(&[&daemon])).assert_ok();
    let daemon_alive = || marked_processes(&["sleep", "2000"], &mark).len() == 1;
    assert!(wait_until(Duration::from_secs(20), daemon_alive), "the job's daemon did not start");

    // A script that ends leaves nothing running, and its stage ends at once (what it left
    // held the stage's stdout: gitlab-runner would wait for it forever).
    let out = job.run("build_script", &job.user_body(&[&format!("env {mark} sleep 900 &"), "echo done"]));
    out.assert_ok();
    assert!(out.stderr.contains("ended 1 process that the script left running"), "{}", out.describe());
    assert_eq!(marked_processes(&["sleep", "900"], &mark), Vec::<i32>::new());

    // gitlab-runner's force kill: SIGKILL to the run stage's process group. Its guard ends the
    // script's processes, in whatever group, session or parent they are.
    let mut running = job.spawn_run("build_script", &leaving_script(&job, &mark, 1000));
    running.wait_for_stdout("started-all", Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(20), || left(&mark, 1000).len() == 4), "{:?}", left(&mark, 1000));
    running.kill_group(libc::SIGKILL);
    let out = running.wait(Duration::from_secs(60));
    assert_eq!(out.signal, Some(libc::SIGKILL), "{}", out.describe());
    assert!(
        wait_until(Duration::from_secs(20), || left(&mark, 1000).is_empty()),
        "the script's processes outlive its SIGKILLed stage: {:?}",
        left(&mark, 1000)
    );

    // The guard SIGKILLed too: the next stage ends what is left before its script runs.
    let mut running = job.spawn_run("build_script", &leaving_script(&job, &mark, 1100));
    running.wait_for_stdout("started-all", Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(20), || left(&mark, 1100).len() == 4), "{:?}", left(&mark, 1100));
    let guard = guard_of(running.pid());
    let bash = bash_of(running.pid());
    // SAFETY: kill(2) of a process of this test.
    unsafe { libc::kill(guard, libc::SIGKILL) };
    running.kill_group(libc::SIGKILL);
    // what is left holds the stage's stdout: gitlab-runner gives up waiting for EOF after its
    // force_kill_timeout; this waits for the exit alone
    running.child.wait().unwrap();
    assert!(wait_until(Duration::from_secs(20), || processes().iter().all(|(p, _)| *p != guard)));
    // bash died with its stage (PR_SET_PDEATHSIG; it was waiting for its command), what it
    // started waits for the next stage
    assert!(
        wait_until(Duration::from_secs(20), || fs::read(format!("/proc/{bash}/cmdline")).is_ok_and(|c| c.is_empty())
            || !Path::new(&format!("/proc/{bash}")).exists()),
        "the script's bash outlives its SIGKILLed stage"
    );
    assert!(!left(&mark, 1100).is_empty(), "nothing was left for the next stage to end");
    let out = job.run("after_script", &job.user_body(&[SLEEPS_INSIDE, "systemctl is-active job-daemon"]));
    out.assert_ok();
    // the four sleeps, and the subshell gitlab-runner's wrapper runs the commands in
    let ended = out.stderr.lines().find_map(|l| {
        l.strip_prefix("nspawn-runner: ended ")?
            .strip_suffix(" processes that the scripts of earlier stages left running")
    });
    assert!(ended.and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n >= 4), "{}", out.describe());
    let inside: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("inside: ")).collect();
    assert_eq!(inside, ["inside: sleep 2000 "], "{}", out.describe());
    assert!(out.stdout.contains("\nactive\n"), "{}", out.describe());
    assert_eq!(left(&mark, 1100), Vec::<i32>::new(), "seen from the host");
    assert!(daemon_alive(), "the job's daemon did not survive its stages");
    let leaves: Vec<PathBuf> = cgroups.iter().flat_map(|dir| script_cgroups(dir)).collect();
    assert_eq!(leaves, Vec::<PathBuf>::new(), "script cgroups left after their stages");

    // cleanup, even right after a SIGKILLed stage, leaves nothing (the daemon included)
    let mut running = job.spawn_run("build_script", &leaving_script(&job, &mark, 1200));
    running.wait_for_stdout("started-all", Duration::from_secs(60));
    let guard = guard_of(running.pid());
    // SAFETY: kill(2) of a process of this test.
    unsafe { libc::kill(guard, libc::SIGKILL) };
    running.kill_group(libc::SIGKILL);
    running.child.wait().unwrap();
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    for n in [1000, 1100, 1200] {
        assert_eq!(left(&mark, n), Vec::<i32>::new());
    }
    assert!(!daemon_alive());
}

/// A hostile job plays with its cgroups: it makes a cgroup named like a script's, and moves a
/// process out of its script's cgroup (as `systemd-run` would: a job's own processes are not
/// held in it by force). Only the job's own processes are touched, its stages keep working,
/// and cleanup ends it all.
fn cgroup_games_of_a_job_touch_only_the_job(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "cgroupgames") else { return };
    let job = prepared(&env);
    let mark = format!("NR_TEST_MARK={}", job.id);
    let games = [
        // the machine's hierarchies: unified, or the hybrid layout's two
        "if [ -e /sys/fs/cgroup/cgroup.controllers ]; then set -- /sys/fs/cgroup; \
         else set -- /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; fi",
        &format!("env {mark} sleep 1300 >/dev/null 2>&1 & fake=$!"),
        &format!("env {mark} sleep 1301 >/dev/null 2>&1 & escaped=$!"),
        "for cg; do mkdir $cg/nspawn-runner-script-1 $cg/escape; echo $fake > $cg/nspawn-runner-script-1/cgroup.procs; \
         echo $escaped > $cg/escape/cgroup.procs; done",
        "grep -q /escape /proc/$escaped/cgroup && echo moved-out",
    ];
    let out = job.run("build_script", &job.user_body(&games));
    out.assert_ok();
    assert!(out.stdout.contains("moved-out"), "{}", out.describe());
    let alive = |n: &str| marked_processes(&["sleep", n], &mark).len() == 1;
    assert!(alive("1300") && alive("1301"), "neither is in the script's cgroup any more");
    // the next stage ends what sits in a cgroup named like a script's (the job's own process)
    let out = job.run("after_script", &job.user_body(&["echo after"]));
    out.assert_ok();
    assert!(
        out.stderr.contains("ended 1 process that the scripts of earlier stages left running"),
        "{}",
        out.describe()
    );
    assert!(!alive("1300"));
    // what the job moved to a cgroup of its own lives on, like a daemon, until cleanup
    assert!(alive("1301"));
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    assert!(!alive("1301"));
}
