//! Confinement of job machines, on real machines on both stores: root in a job is an unprivileged
//! uid range of the host, each machine has a cgroup of its own with the configured limits, /cache
//! is the job's own project's, and only an image configured privileged gets host root.
//! Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

both_stores! {
    job_root_is_an_unprivileged_range_of_the_host;
    the_cache_is_per_project;
    a_bad_project_id_changes_nothing;
    limits_apply_to_the_machine_cgroup;
    one_job_cannot_kill_another;
    a_privileged_image_gets_host_root;
}

/// The job's record, as prepare left it.
fn state(env: &TestEnv, job: &Job) -> serde_json::Value {
    let text = fs::read_to_string(env.state_dir.join(format!("{}.json", job.id))).expect("state file");
    serde_json::from_str(&text).expect("state JSON")
}

fn leader_pid(state: &serde_json::Value) -> i32 {
    state["running"]["leader_pid"].as_i64().expect("leader pid") as i32
}

/// `0 <base> 65536` from inside, a shifted range from the host, `/` owned by 0 inside, root
/// and an unprivileged user can both build, apt installs a package, and git commits and clones as
/// root and as a user. The snapshot keeps its real ownership.
fn job_root_is_an_unprivileged_range_of_the_host(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "userns") else { return };
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    let st = state(&env, &job);
    let base = st["uid_base"].as_u64().expect("no uid_base in the job record") as u32;
    assert!(base >= 0x7000_0000 && base % 65536 == 0, "odd uid base {base:#x}");
    let host_map = fs::read_to_string(format!("/proc/{}/uid_map", leader_pid(&st))).unwrap();
    assert_eq!(host_map.split_whitespace().collect::<Vec<_>>(), ["0", &base.to_string(), "65536"], "{host_map}");

    let out = job.run(
        "build_script",
        &job.get_sources_body(
            "cat /proc/self/uid_map\n\
             echo owner=$(stat -c %u:%g / /usr /etc/passwd | sort -u | tr '\\n' ' ')\n\
             echo root-build > built-by-root && chown 0:0 built-by-root\n\
             mkdir -p /root/x && touch /usr/local/bin/tool && echo root-writes-ok\n\
             useradd -m builder\n\
             chown builder \"$PWD\"\n\
             runuser -u builder -- sh -c 'echo user-build > built-by-user && id -u && touch /usr/x 2>/dev/null || echo user-cannot-write-usr'\n\
             mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/share/nr-demo && echo demo > /tmp/pkg/usr/share/nr-demo/file\n\
             printf 'Package: nr-demo\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@example.org>\\nDescription: d\\n' > /tmp/pkg/DEBIAN/control\n\
             dpkg-deb --build --root-owner-group /tmp/pkg /tmp/nr-demo.deb >/dev/null\n\
             apt-get install -y -q /tmp/nr-demo.deb >/tmp/apt.log 2>&1 || cat /tmp/apt.log\n\
             dpkg -s nr-demo | grep -qx 'Status: install ok installed' && echo apt-install-ok\n\
             (git init -q /tmp/repo && cd /tmp/repo && git -c user.name=t -c user.email=t@example.org commit -q --allow-empty -m one)\n\
             git clone -q /tmp/repo /tmp/clone && git -C /tmp/clone log --oneline | grep -q one && echo git-root-ok\n\
             runuser -u builder -- sh -c 'cd && git init -q r && git -C r -c user.name=b -c user.email=b@example.org commit -q --allow-empty -m two && git clone -q r c && git -C c log --oneline | grep -q two && echo git-user-ok'",
        ),
    );
    out.assert_ok();
    let inside_map: Vec<&str> =
        out.stdout.lines().find(|l| l.trim_start().starts_with('0')).unwrap().split_whitespace().collect();
    assert_eq!(inside_map, ["0", &base.to_string(), "65536"], "{}", out.describe());
    assert_ne!(inside_map[1], "0", "job root is host root\n{}", out.describe());
    assert!(out.stdout.contains("owner=0:0\n"), "files in / are not owned by root inside\n{}", out.describe());
    assert!(out.stdout.contains("root-writes-ok"), "{}", out.describe());
    assert!(out.stdout.contains("\n1000\n"), "the unprivileged user did not run as 1000\n{}", out.describe());
    assert!(out.stdout.contains("user-cannot-write-usr"), "{}", out.describe());
    // dpkg's chowns and apt's _apt sandbox work within the range.
    assert!(out.stdout.contains("apt-install-ok"), "apt-get install failed in the job\n{}", out.describe());
    assert!(out.stdout.contains("git-root-ok"), "git clone as root failed in the job\n{}", out.describe());
    assert!(out.stdout.contains("git-user-ok"), "git clone as a user failed in the job\n{}", out.describe());

    // The job's writes are the range's on the host, never host root's (plain: the overlay's upper dir).
    if kind == StoreKind::Plain {
        let upper = env.root.join(".jobs").join(job.machine()).join("upper");
        let tool = fs::metadata(upper.join("usr/local/bin/tool")).expect("the job's write is not in its upper dir");
        assert_eq!((tool.uid(), tool.gid()), (base, base), "a file of job root is not owned by the range");
        let user = fs::metadata(upper.join(job.project_dir().trim_start_matches('/')).join("built-by-user")).unwrap();
        assert_eq!(user.uid(), base + 1000);
    }
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    let snapshot = env.root.join(IMAGE).join(env.current(IMAGE).unwrap());
    for path in ["", "etc/passwd", "usr"] {
        assert_eq!(fs::metadata(snapshot.join(path)).unwrap().uid(), 0, "the snapshot's /{path} changed owner");
    }
    assert!(!snapshot.join("usr/local/bin/tool").exists(), "the job wrote to the snapshot");
    assert!(!fs::read_to_string(snapshot.join("etc/passwd")).unwrap().contains("builder"));
}

/// Jobs of one project share /cache across jobs; another project's job sees none of it.
fn the_cache_is_per_project(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "cache") else { return };
    let write = env.job().in_project(11);
    let out = write.run_whole_job(
        "mkdir -p /cache/group/project && echo kept > /cache/group/project/file && ls -ln /cache/group/project/file",
    );
    assert!(out.stdout.contains(" 0 0 "), "/cache files are not root's inside\n{}", out.describe());
    let host_file = write.cache_dir().join("group/project/file");
    assert_eq!(fs::read_to_string(&host_file).unwrap(), "kept\n");
    assert_eq!(fs::metadata(&host_file).unwrap().uid(), 0, "the idmapped cache stores job root as host root");
    let projects = env.cache_dir.join("projects");
    assert_eq!(fs::metadata(&projects).unwrap().permissions().mode() & 0o777, 0o700, "projects/ is not root-only");

    let same = env.job().in_project(11);
    let out = same.run_whole_job("cat /cache/group/project/file");
    assert!(out.stdout.contains("kept"), "the cache did not persist between jobs of a project\n{}", out.describe());

    let other = env.job().in_project(12);
    let out = other.run_whole_job(
        "ls -A /cache | wc -l; test ! -e /cache/group/project/file && echo invisible; ls -A /cache/.. >/dev/null",
    );
    assert!(out.stdout.contains("0\ninvisible"), "another project sees the cache\n{}", out.describe());
    assert!(fs::read_to_string(&host_file).is_ok(), "another project's job removed the cache");
}

/// A payload whose project id is not a number fails prepare with one line, and writes nothing.
fn a_bad_project_id_changes_nothing(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "badproject") else { return };
    let job = env.job();
    fs::write(job.tmp.join("response.json"), r#"{"id":1,"job_info":{"project_id":"../../etc"}}"#).unwrap();
    job.config().assert_ok();
    job.prepare().assert_system_failure(2);
    assert!(!env.cache_dir.join("projects").exists(), "the cache was touched");
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

/// The machine's own cgroup gets MemoryMax and TasksMax (plain hosts: this test host), and a limit
/// the host cannot apply fails prepare with one line.
fn limits_apply_to_the_machine_cgroup(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "limits") else { return };
    if std::path::Path::new("/run/systemd/system").is_dir() {
        eprintln!("SKIP: systemd is PID 1 here; the VM suite checks the unit's limits");
        return;
    }
    env.set("NSPAWN_RUNNER_MEMORY_MAX", "512M");
    env.set("NSPAWN_RUNNER_TASKS_MAX", "300");
    let job = env.job();
    job.config().assert_ok();
    job.prepare().assert_ok();
    let st = state(&env, &job);
    let dirs: Vec<PathBuf> = st["running"]["cgroups"]
        .as_array()
        .expect("no cgroups recorded")
        .iter()
        .map(|d| d.as_str().unwrap().into())
        .collect();
    let read =
        |file: &str| dirs.iter().find_map(|d| fs::read_to_string(d.join(file)).ok()).map(|s| s.trim().to_owned());
    let memory = read("memory.max").or_else(|| read("memory.limit_in_bytes"));
    assert_eq!(memory.as_deref(), Some("536870912"), "MemoryMax not applied in {dirs:?}");
    assert_eq!(read("pids.max").as_deref(), Some("300"), "TasksMax not applied in {dirs:?}");
    // The machine's init is in them.
    let leader_cgroups = fs::read_to_string(format!("/proc/{}/cgroup", leader_pid(&st))).unwrap();
    let name = format!("nspawn-runner-{}", job.machine());
    assert!(leader_cgroups.contains(&name), "the machine is not in its cgroup:\n{leader_cgroups}");
    job.run("build_script", &job.get_sources_body("true")).assert_ok();
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    for dir in &dirs {
        assert!(!dir.exists(), "cgroup {} left after cleanup", dir.display());
    }

    env.set("NSPAWN_RUNNER_MEMORY_MAX", "50%");
    let job = env.job();
    job.config().assert_ok();
    let out = job.prepare();
    out.assert_system_failure(2);
    assert!(out.stderr.contains("NSPAWN_RUNNER_MEMORY_MAX"), "{}", out.describe());
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
}

/// What killed every machine before: `cgroup.kill` at the top of the cgroup tree a job sees, and
/// signals to every process it can name. The other job's machine survives.
fn one_job_cannot_kill_another(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "kill") else { return };
    let victim = env.job();
    victim.config().assert_ok();
    victim.prepare().assert_ok();
    let attacker = env.job();
    attacker.config().assert_ok();
    attacker.prepare().assert_ok();
    let out = attacker.run(
        "build_script",
        &attacker.get_sources_body(&format!(
            "find /sys/fs/cgroup -name '*{}*' | grep . && echo SEES-VICTIM\n\
             kill -9 -1\n\
             for k in /sys/fs/cgroup/cgroup.kill /sys/fs/cgroup/unified/cgroup.kill /sys/fs/cgroup/systemd/cgroup.kill; do\n\
               [ -e $k ] && echo 1 > $k\n\
             done\n\
             true",
            victim.machine()
        )),
    );
    assert!(!out.stdout.contains("SEES-VICTIM"), "a job sees another job's cgroup\n{}", out.describe());
    let st = state(&env, &victim);
    assert!(fs::metadata(format!("/proc/{}", leader_pid(&st))).is_ok(), "the other job's machine was killed");
    let alive = victim.run("build_script", &victim.get_sources_body("systemctl is-system-running --wait; echo alive"));
    alive.assert_ok();
    assert!(alive.stdout.contains("alive"), "{}", alive.describe());
    let bases: Vec<_> = [&attacker, &victim].iter().map(|job| state(&env, job)["uid_base"].clone()).collect();
    assert_ne!(bases[0], bases[1], "two jobs share a uid range");
    attacker.cleanup().assert_ok();
    victim.cleanup().assert_ok();
    assert_nothing_left(&env, &attacker.id);
    assert_nothing_left(&env, &victim.id);
}

/// `privileged=true` in `<config_dir>/<image>.conf` opts an image out: root in its
/// jobs is host root, as before user namespaces.
fn a_privileged_image_gets_host_root(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "privileged") else { return };
    fs::write(env.config_dir.join(format!("{IMAGE}.conf")), "privileged=true\n").unwrap();
    let job = env.job();
    let out = job.run_whole_job("cat /proc/self/uid_map; echo cached > /cache/p");
    let map: Vec<&str> =
        out.stdout.lines().find(|l| l.trim_start().starts_with('0')).unwrap().split_whitespace().collect();
    assert_eq!(map[..2], ["0", "0"], "a privileged image's job is not host root\n{}", out.describe());
    assert_eq!(fs::read_to_string(job.cache_dir().join("p")).unwrap(), "cached\n");
}
