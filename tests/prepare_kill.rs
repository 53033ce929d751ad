//! A prepare SIGKILLed at any instant, with its whole process group as gitlab-runner's force kill
//! does (`kill(-pgid, SIGKILL)`), never leaks a machine: the cleanup gitlab-runner then calls leaves
//! nothing behind, and an `image gc` between the kill and the cleanup never touches a machine that
//! is still up, whatever its record says. The kills land at moments spread from the start of
//! prepare to past its end. `NSPAWN_RUNNER_SOAK_KILLS=N` kills N times per store instead of 6.
//! Needs root (see tests/common/mod.rs).

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

both_stores! {
    prepare_killed_at_any_instant;
}

/// The kills per store in CI.
const CI_KILLS: u64 = 6;

/// The start time of a live (not zombie) process, to tell it from a reused pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    (!matches!(fields.first(), Some(&"Z") | Some(&"X"))).then(|| fields.get(19)?.parse().ok()).flatten()
}

/// The children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The machine's nspawn (or the spawn wrapper that becomes it) and its children (the machine's
/// init, once there), each with its start time.
fn machine_processes(machine: &str) -> Vec<(i32, u64)> {
    let option = format!("--machine={machine}");
    let nspawns: Vec<i32> =
        processes().into_iter().filter(|(_, argv)| argv.contains(&option)).map(|(pid, _)| pid).collect();
    let mut all: Vec<i32> = nspawns.iter().copied().chain(nspawns.iter().flat_map(|p| children(*p))).collect();
    all.sort();
    all.dedup();
    all.into_iter().filter_map(|pid| Some((pid, start_time(pid)?))).collect()
}

/// The machine cgroup dirs a plain-host prepare of `machine` makes below the cgroups of this
/// process (the stages inherit them), in every hierarchy.
fn machine_cgroups(machine: &str) -> Vec<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    own.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let mount = match controllers {
                "" if unified => "/sys/fs/cgroup".to_owned(),
                "" => "/sys/fs/cgroup/unified".to_owned(),
                c => format!("/sys/fs/cgroup/{}", c.strip_prefix("name=").unwrap_or(c)),
            };
            Some(Path::new(&mount).join(path.trim_start_matches('/')).join(format!("nspawn-runner-{machine}")))
        })
        .collect()
}

/// The live ones of `processes` whose root (an ephemeral copy, an overlay: anything but the
/// host's) no longer has the image's systemd: something deleted it under them.
fn lost_roots(processes: &[(i32, u64)]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let id = |path: &str| fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let host = id("/");
    processes
        .iter()
        .filter(|(pid, start)| start_time(*pid) == Some(*start) && id(&format!("/proc/{pid}/root")) != host)
        .filter(|(pid, _)| !Path::new(&format!("/proc/{pid}/root/usr/lib/systemd/systemd")).exists())
        .map(|(pid, _)| format!("process {pid} lost its root"))
        .collect()
}

fn prepare_killed_at_any_instant(kind: StoreKind) {
    let Some(env) = TestEnv::new(kind, "pkill") else { return };
    let kills = std::env::var("NSPAWN_RUNNER_SOAK_KILLS").ok().and_then(|n| n.parse().ok()).unwrap_or(CI_KILLS);
    // How long an undisturbed prepare takes here: the kills land from 0 to 20 % past its end.
    let job = env.job();
    job.config().assert_ok();
    let t = Instant::now();
    job.prepare().assert_ok();
    let span = t.elapsed() * 12 / 10;
    job.cleanup().assert_ok();
    assert_nothing_left(&env, &job.id);
    eprintln!("one prepare takes {:?}; {kills} kills spread over {span:?}", t.elapsed());
    let mut rng = Rng::new();
    let mut killed_with_machine = 0;
    for i in 0..kills {
        // Evenly spread, each at a random moment of its slice.
        let slice = span.as_micros() as u64 / kills;
        let delay = Duration::from_micros(slice * i + rng.below(slice.max(1)));
        let job = env.job();
        job.config().assert_ok();
        let prepare = spawn(&format!("prepare #{i}"), &mut job.stage_cmd("prepare", true));
        thread::sleep(delay);
        prepare.kill_group(libc::SIGKILL);
        // gitlab-runner then waits for the stage's pipes to reach EOF: nothing may hold them.
        let out = prepare.wait(Duration::from_secs(30));
        let machine = job.machine();
        let processes = machine_processes(&machine);
        eprintln!(
            "kill #{i} after {delay:?}: prepare {}; machine processes {processes:?}",
            if out.signal == Some(libc::SIGKILL) { "killed" } else { "had finished" }
        );
        if !processes.is_empty() {
            killed_with_machine += 1;
        }
        if i % 2 == 1 {
            // gc between the kill and the cleanup: what is up stays up, on its root. Every other
            // time with the job's record hidden from it: gc then has only the kernel's word.
            let copies: Vec<String> = env.entries(IMAGE).into_iter().filter(|n| n.starts_with(".#machine.")).collect();
            let job_dir = env.root.join(".jobs").join(&machine);
            let had_job_dir = job_dir.exists();
            let record = env.state_dir.join(format!("{}.json", job.id));
            let hidden = (i % 4 == 1).then(|| fs::read(&record).ok()).flatten();
            if hidden.is_some() {
                fs::remove_file(&record).unwrap();
            }
            env.admin(&["image", "gc", IMAGE]).assert_ok();
            if let Some(bytes) = &hidden {
                fs::write(&record, bytes).unwrap();
            }
            let alive: Vec<(i32, u64)> =
                processes.iter().copied().filter(|(pid, start)| start_time(*pid) == Some(*start)).collect();
            if !alive.is_empty() {
                let lost = lost_roots(&alive);
                assert!(lost.is_empty(), "kill #{i}: gc deleted what a live machine uses: {lost:?}");
                let after = env.entries(IMAGE);
                for copy in &copies {
                    assert!(after.contains(copy), "kill #{i}: gc deleted {copy} under a live machine");
                }
                if had_job_dir {
                    assert!(job_dir.exists(), "kill #{i}: gc deleted {} under a live machine", job_dir.display());
                }
            }
        }
        job.cleanup().assert_ok();
        let survivors: Vec<(i32, u64)> =
            processes.iter().copied().filter(|(pid, start)| start_time(*pid) == Some(*start)).collect();
        assert!(survivors.is_empty(), "kill #{i}: machine processes survive cleanup: {survivors:?}");
        assert!(machine_processes(&machine).is_empty(), "kill #{i}: an nspawn of {machine} runs after cleanup");
        let cgroups: Vec<PathBuf> = machine_cgroups(&machine).into_iter().filter(|c| c.exists()).collect();
        assert!(cgroups.is_empty(), "kill #{i}: cgroups left: {cgroups:?}");
        assert_nothing_left(&env, &job.id);
    }
    eprintln!("{killed_with_machine} of {kills} kills left a machine (booting or up) for cleanup to stop");
}
