//! What nspawn-runner adds to a CI job, against the floor: the same machine work done with raw
//! systemd-nspawn / nsenter commands.
//!
//! Per store (loop-mounted btrfs, plain ext4 under target/bench/), one image imported from the
//! bookworm tarball; then BENCH_JOBS (default 5) jobs of 8 trivial stages, run through the stage
//! symlinks exactly as gitlab-runner does (config, prepare, 8 x run, cleanup), interleaved with the
//! same jobs done by hand (nspawn started detached + READY=1 on our own notify socket, nsenter per
//! stage, SIGTERM + wait at cleanup). Run with `cargo bench --bench job_overhead` as root.

mod common;

use common::*;
use nspawn_runner::jobs::script::bash_wrapper;
use nspawn_runner::machine::nspawn::{Bind, BootRoot, Nspawn};
use nspawn_runner::machine::spawn::{overlay_root, SpawnPlan};
use nspawn_runner::machine::{cgroup, idmap};
use std::fs;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// gitlab-runner's stages of a job with a build script and after_script (8 `run` calls).
const STAGES: [&str; 8] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "cleanup_file_variables",
];

const IMAGE: &str = "bench";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

struct Store {
    kind: &'static str,
    /// NSPAWN_RUNNER_ROOT.
    root: PathBuf,
    /// The image's current snapshot (what both sides boot).
    snapshot: PathBuf,
    /// Where the floor's overlay upper dirs go (same file system as the store).
    floor_jobs: PathBuf,
    btrfs: bool,
}

struct Env {
    work: PathBuf,
    links: PathBuf,
    state: PathBuf,
    cache: PathBuf,
    scripts: Vec<PathBuf>,
}

/// Durations of one job.
#[derive(Default, Clone)]
struct Job {
    config: Duration,
    prepare: Duration,
    stages: Vec<Duration>,
    cleanup: Duration,
    whole: Duration,
}

#[derive(Default)]
struct Results {
    ours: Vec<Job>,
    floor: Vec<Job>,
}

fn main() {
    require_root("job_overhead");
    let jobs: usize = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let started = Instant::now();
    let work = work_dir("job_overhead");
    let work_for_teardown = work.clone();
    // Floor machines still running if a panic interrupts a floor job.
    let floor_children: std::sync::Arc<std::sync::Mutex<Vec<u32>>> = Default::default();
    let floor_for_teardown = floor_children.clone();
    let ours_started: std::sync::Arc<std::sync::Mutex<Vec<(String, PathBuf)>>> = Default::default();
    let ours_for_teardown = ours_started.clone();
    let env_cell: std::sync::Arc<std::sync::Mutex<Option<(PathBuf, PathBuf, PathBuf)>>> = Default::default();
    let env_for_teardown = env_cell.clone();

    run_with_teardown(
        std::panic::AssertUnwindSafe(move || {
            print_context();
            let tar = bookworm_tar();
            let env = setup_env(&work);
            *env_cell.lock().unwrap() = Some((env.links.clone(), env.state.clone(), env.cache.clone()));
            let (stores, setup_time) =
                timed(|| vec![setup_store(&env, &work, true, &tar), setup_store(&env, &work, false, &tar)]);
            println!(
                "setup: imported {} into a btrfs and a plain store in {} ({} jobs per store, {} stages each)",
                tar.display(),
                fmt(setup_time),
                jobs,
                STAGES.len()
            );
            let mut results: Vec<Results> = stores.iter().map(|_| Results::default()).collect();
            // One warm-up job of each kind per store (page cache, first-boot effects), not counted.
            for (s, store) in stores.iter().enumerate() {
                let id = format!("bench{}-{}-warm", std::process::id(), store.kind);
                ours_started.lock().unwrap().push((id.clone(), store.root.clone()));
                our_job(&env, store, &id);
                floor_job(&env, store, &format!("floor{}-{}-warm", std::process::id(), s), &floor_children);
            }
            for i in 0..jobs {
                for (s, store) in stores.iter().enumerate() {
                    let id = format!("bench{}-{}-{i}", std::process::id(), store.kind);
                    let floor_name = format!("floor{}-{}-{i}", std::process::id(), s);
                    ours_started.lock().unwrap().push((id.clone(), store.root.clone()));
                    // Alternate the order so slow drift in the host's load hits both sides alike.
                    if i % 2 == 0 {
                        results[s].ours.push(our_job(&env, store, &id));
                        results[s].floor.push(floor_job(&env, store, &floor_name, &floor_children));
                    } else {
                        results[s].floor.push(floor_job(&env, store, &floor_name, &floor_children));
                        results[s].ours.push(our_job(&env, store, &id));
                    }
                }
            }
            for (store, r) in stores.iter().zip(&results) {
                report(store, r);
            }
            println!(
                "\njob_overhead: {} jobs x {} stores, bench took {} in all",
                jobs,
                stores.len(),
                fmt(started.elapsed())
            );
        }),
        move || teardown(&work_for_teardown, &floor_for_teardown, &ours_for_teardown, &env_for_teardown),
    );
}

fn setup_env(work: &Path) -> Env {
    let links = work.join("links");
    fs::create_dir_all(&links).unwrap();
    sh(&[BIN, "install-links", links.to_str().unwrap()]);
    // The state dir is on tmpfs, as the default /run/nspawn-runner is.
    let state = work.join("run");
    mount_tmpfs(&state);
    let state = state.join("nspawn-runner");
    let cache = work.join("cache");
    fs::create_dir_all(&cache).unwrap();
    let mut scripts = Vec::new();
    for stage in STAGES {
        let dir = work.join("scripts").join(stage);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("script");
        fs::write(&path, bash_wrapper("true")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        scripts.push(path);
    }
    Env { work: work.to_path_buf(), links, state, cache, scripts }
}

fn setup_store(env: &Env, work: &Path, btrfs: bool, tar: &Path) -> Store {
    let kind = if btrfs { "btrfs" } else { "plain" };
    let base = if btrfs {
        let mnt = work.join("btrfs");
        mount_btrfs(&work.join("btrfs.img"), &mnt, "8G");
        mnt
    } else {
        let dir = work.join("plain");
        fs::create_dir_all(&dir).unwrap();
        dir
    };
    let root = base.join("store");
    let out = Command::new(BIN)
        .args(["image", "import", IMAGE])
        .arg(tar)
        .env_clear()
        .env("PATH", PATH)
        .env("NSPAWN_RUNNER_ROOT", &root)
        .env("NSPAWN_RUNNER_STATE_DIR", &env.state)
        .output()
        .unwrap();
    assert!(out.status.success(), "image import on {kind}: {}", String::from_utf8_lossy(&out.stderr));
    let current = fs::read_link(root.join(IMAGE).join("current")).unwrap();
    let snapshot = root.join(IMAGE).join(current);
    let floor_jobs = base.join("floor-jobs");
    fs::create_dir_all(&floor_jobs).unwrap();
    // The backend is chosen by statfs: make sure each store is what its label says.
    let fstype = mounts()
        .into_iter()
        .filter(|(m, _)| root.starts_with(m))
        .max_by_key(|(m, _)| m.components().count())
        .map(|(_, t)| t)
        .unwrap_or_default();
    println!("store {kind}: {} on {fstype}", root.display());
    Store { kind, root, snapshot, floor_jobs, btrfs }
}

/// One stage call as gitlab-runner makes it: argv[0] is the stage symlink, a clean env plus the
/// job's variables, stdout/stderr piped and read to EOF.
fn stage(env: &Env, store: &Store, id: &str, name: &str, args: &[&Path], what: &str) -> Duration {
    let mut command = Command::new(env.links.join(name));
    command
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("CUSTOM_ENV_CI_JOB_ID", id)
        .env("CUSTOM_ENV_CI_JOB_IMAGE", IMAGE)
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .env("NSPAWN_RUNNER_ROOT", &store.root)
        .env("NSPAWN_RUNNER_STATE_DIR", &env.state)
        .env("NSPAWN_RUNNER_CACHE_DIR", &env.cache)
        .stdin(Stdio::null());
    let (out, elapsed) = timed(|| command.output().unwrap());
    assert!(
        out.status.success(),
        "{what} of job {id} on {} failed ({}): {}{}",
        store.kind,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn our_job(env: &Env, store: &Store, id: &str) -> Job {
    let start = Instant::now();
    let mut job = Job { config: stage(env, store, id, "config", &[], "config"), ..Job::default() };
    job.prepare = stage(env, store, id, "prepare", &[], "prepare");
    for (script, name) in env.scripts.iter().zip(STAGES) {
        job.stages.push(stage(env, store, id, "run", &[script, Path::new(name)], name));
    }
    job.cleanup = stage(env, store, id, "cleanup", &[], "cleanup");
    job.whole = start.elapsed();
    job
}

/// The floor: the same machine, booted, entered and stopped with raw commands.
fn floor_job(env: &Env, store: &Store, name: &str, children: &std::sync::Mutex<Vec<u32>>) -> Job {
    let start = Instant::now();
    let mut job = Job::default();
    let job_dir = store.floor_jobs.join(name);
    let ((mut nspawn, leader, cgroups), prepare) = timed(|| {
        // Like a job: a user namespace of its own range (the top slot, which no test job gets).
        let base = idmap::FIRST_BASE + 4095 * idmap::RANGE;
        let upper = job_dir.join("upper");
        let cache = Bind::read_write(&env.cache, "/cache").idmapped(true);
        // The production command line, with the same cache bind nspawn-runner gives every machine,
        // started like the plain host starts it: through the spawn wrapper, in a cgroup of its own
        // (a user-namespaced systemd needs one it may write), and on plain stores on the idmapped
        // overlay the wrapper mounts.
        let cgroups = cgroup::create(name, &cgroup::Limits::default(), |_| Ok(())).unwrap();
        let (args, overlay) = if store.btrfs {
            let args = Nspawn::boot(name, &store.snapshot, BootRoot::Ephemeral, false).bind(&cache);
            (args.private_users(base, true).into_args(), None)
        } else {
            fs::create_dir_all(&upper).unwrap();
            let args = Nspawn::boot(name, &overlay_root(&job_dir), BootRoot::Directory, false).bind(&cache);
            (args.private_users(base, false).into_args(), Some((store.snapshot.clone(), job_dir.clone(), base)))
        };
        let plan = SpawnPlan { gated: false, cgroups: cgroups.dirs.clone(), overlay };
        let (program, args) = (PathBuf::from(BIN), plan.argv("systemd-nspawn", &args));
        let socket_name = format!("nspawn-runner-bench/{}/{name}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(socket_name.as_bytes()).unwrap()).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let log = fs::File::create(env.work.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new(program);
        command
            .args(&args)
            .env_clear()
            .env("PATH", PATH)
            .env("NOTIFY_SOCKET", format!("@{socket_name}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        children.lock().unwrap().push(child.id());
        let leader = wait_ready(&socket, &mut child, name, &env.work);
        (child, leader, cgroups)
    });
    job.prepare = prepare;
    for script in &env.scripts {
        let script_file = fs::File::open(script).unwrap();
        let (out, elapsed) = timed(|| {
            Command::new("nsenter")
                .arg(format!("--target={leader}"))
                .args(["--user", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "/bin/bash", "-s"])
                .env_clear()
                .env("PATH", PATH)
                .env("HOME", "/root")
                .env("LANG", "C.UTF-8")
                .stdin(Stdio::from(script_file))
                .output()
                .unwrap()
        });
        assert!(out.status.success(), "floor stage in {name}: {}", String::from_utf8_lossy(&out.stderr));
        job.stages.push(elapsed);
    }
    let ((), cleanup) = timed(|| {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(nspawn.id() as i32, libc::SIGTERM) };
        nspawn.wait().unwrap();
        if !store.btrfs {
            fs::remove_dir_all(&job_dir).unwrap();
        }
        cgroup::remove(&cgroups.dirs).unwrap();
    });
    children.lock().unwrap().retain(|p| *p != nspawn.id());
    job.cleanup = cleanup;
    job.whole = start.elapsed();
    job
}

/// Reads sd_notify datagrams until READY=1; the machine's init pid.
fn wait_ready(socket: &UnixDatagram, child: &mut Child, name: &str, work: &Path) -> i32 {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut leader = None;
    let mut buffer = [0u8; 4096];
    loop {
        if let Ok(len) = socket.recv(&mut buffer) {
            let text = String::from_utf8_lossy(&buffer[..len]);
            let mut ready = false;
            for line in text.lines() {
                if line == "READY=1" {
                    ready = true;
                } else if let Some(pid) = line.strip_prefix("X_NSPAWN_LEADER_PID=") {
                    leader = pid.parse().ok();
                }
            }
            if ready {
                let leader = leader.or_else(|| {
                    let pid = child.id();
                    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                        .ok()?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
                return leader.unwrap_or_else(|| panic!("floor machine {name}: no leader pid"));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read_to_string(work.join(format!("{name}.log"))).unwrap_or_default();
            panic!("floor machine {name}: nspawn exited ({status}) before READY=1:\n{log}");
        }
        if Instant::now() >= deadline {
            panic!("floor machine {name}: not ready after {READY_TIMEOUT:?}");
        }
    }
}

fn report(store: &Store, r: &Results) {
    let col = |jobs: &[Job], f: &dyn Fn(&Job) -> Vec<Duration>| median(&jobs.iter().flat_map(f).collect::<Vec<_>>());
    let prepare = (col(&r.ours, &|j| vec![j.prepare]), col(&r.floor, &|j| vec![j.prepare]));
    let stage = (col(&r.ours, &|j| j.stages.clone()), col(&r.floor, &|j| j.stages.clone()));
    let cleanup = (col(&r.ours, &|j| vec![j.cleanup]), col(&r.floor, &|j| vec![j.cleanup]));
    let whole = (col(&r.ours, &|j| vec![j.whole]), col(&r.floor, &|j| vec![j.whole]));
    let config = col(&r.ours, &|j| vec![j.config]);
    let spread = |jobs: &[Job], f: &dyn Fn(&Job) -> Duration| {
        let v: Vec<Duration> = jobs.iter().map(f).collect();
        format!("{}..{}", fmt(*v.iter().min().unwrap()), fmt(*v.iter().max().unwrap()))
    };
    let stage_overhead_ms = ms(stage.0) - ms(stage.1);
    println!(
        "\n== {} store: {} jobs, medians (stage: median of {} calls) ==",
        store.kind,
        r.ours.len(),
        r.ours.len() * STAGES.len()
    );
    println!("{:<22} {:>12} {:>12} {:>12} {:>8}", "", "nspawn-runner", "floor", "ours-floor", "ratio");
    let row = |label: &str, (a, b): (Duration, Duration)| {
        println!("{:<22} {:>12} {:>12} {:>+9.1} ms {:>7.2}x", label, fmt(a), fmt(b), ms(a) - ms(b), ratio(a, b));
    };
    println!("{:<22} {:>12} {:>12}", "config", fmt(config), "-");
    row("prepare", prepare);
    row("run (per stage)", stage);
    row("cleanup", cleanup);
    row("whole job", whole);
    println!("  whole job range: ours {}, floor {}", spread(&r.ours, &|j| j.whole), spread(&r.floor, &|j| j.whole));
    let whole_ratio = ratio(whole.0, whole.1);
    println!(
        "  target whole job <= 1.1x floor: {:.2}x {}   target per-stage overhead < 15 ms: {:+.1} ms {}",
        whole_ratio,
        verdict(whole_ratio <= 1.1),
        stage_overhead_ms,
        verdict(stage_overhead_ms < 15.0)
    );
}

fn teardown(
    work: &Path,
    floor: &std::sync::Mutex<Vec<u32>>,
    ours: &std::sync::Mutex<Vec<(String, PathBuf)>>,
    env: &std::sync::Mutex<Option<(PathBuf, PathBuf, PathBuf)>>,
) {
    let floor = floor.lock().map(|v| v.clone()).unwrap_or_default();
    for pid in floor {
        // SAFETY: kill(2) on a child of ours that a panic left running.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    // Our jobs: cleanup is idempotent, so call it for every job that was started.
    if let Some((links, state, cache)) = env.lock().ok().and_then(|e| e.clone()) {
        for (id, root) in ours.lock().map(|v| v.clone()).unwrap_or_default() {
            if !state.join(format!("{id}.json")).exists() {
                continue;
            }
            let _ = Command::new(links.join("cleanup"))
                .env_clear()
                .env("PATH", PATH)
                .env("CUSTOM_ENV_CI_JOB_ID", &id)
                .env("NSPAWN_RUNNER_ROOT", &root)
                .env("NSPAWN_RUNNER_STATE_DIR", &state)
                .env("NSPAWN_RUNNER_CACHE_DIR", &cache)
                .status();
        }
    }
    unmount_below(work);
    if let Err(e) = fs::remove_dir_all(work) {
        eprintln!("could not remove {}: {e}", work.display());
    }
}
