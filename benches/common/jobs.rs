//! What the job benches share: a store per kind with one image, jobs run through the stage
//! symlinks as gitlab-runner runs them, the same jobs on the raw nspawn floor, and the teardown.

use super::*;
use nspawn_runner::jobs::script::bash_wrapper;
use nspawn_runner::machine::nspawn::{Bind, BootRoot, Nspawn};
use nspawn_runner::machine::seccomp::Filters;
use nspawn_runner::machine::spawn::{overlay_root, SpawnPlan};
use nspawn_runner::machine::{cgroup, idmap};
use std::fs;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "bench";
/// job_info.project_id of every bench job: its /cache is `<cache>/projects/<this>`.
pub const PROJECT_ID: u64 = 1;
const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Store {
    pub kind: &'static str,
    /// NSPAWN_RUNNER_ROOT.
    pub root: PathBuf,
    /// The image's current snapshot (what both sides boot).
    pub snapshot: PathBuf,
    /// Where the floor's overlay upper dirs go (same file system as the store).
    floor_jobs: PathBuf,
    btrfs: bool,
}

/// gitlab-runner's stages of a job with a build script and after_script (8 `run` calls); the
/// benches' jobs run these.
pub const STAGES: [&str; 8] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "cleanup_file_variables",
];

/// The stage symlinks and the runner's directories, shared by every job of a bench run.
#[derive(Clone)]
pub struct Env {
    pub work: PathBuf,
    links: PathBuf,
    state: PathBuf,
    cache: PathBuf,
    /// The job payload gitlab-runner writes (JOB_RESPONSE_FILE), naming PROJECT_ID.
    response: PathBuf,
}

/// Durations of one job.
#[derive(Default, Clone)]
pub struct Job {
    pub config: Duration,
    pub prepare: Duration,
    pub stages: Vec<Duration>,
    pub cleanup: Duration,
    pub whole: Duration,
}

/// Whether a floor machine's syncs reach the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Syncs {
    /// As nspawn-runner's machines run (`--suppress-sync=yes`).
    Suppressed,
    /// As machines ran before nspawn-runner suppressed them.
    Kept,
}

/// What a panic may leave running, for the teardown: floor nspawn pids and our jobs.
#[derive(Default, Clone)]
pub struct Started {
    floor: Arc<Mutex<Vec<u32>>>,
    ours: Arc<Mutex<Vec<(String, PathBuf)>>>,
    env: Arc<Mutex<Option<Env>>>,
}

impl Env {
    pub fn new(work: &Path, started: &Started) -> Env {
        let links = work.join("links");
        fs::create_dir_all(&links).unwrap();
        sh(&[BIN, "install-links", links.to_str().unwrap()]);
        // The state dir is on tmpfs, as the default /run/nspawn-runner is.
        let state = work.join("run");
        mount_tmpfs(&state);
        let state = state.join("nspawn-runner");
        let cache = work.join("cache");
        fs::create_dir_all(&cache).unwrap();
        let response = work.join("response.json");
        let payload = format!(r#"{{"id":1,"job_info":{{"name":"bench","stage":"test","project_id":{PROJECT_ID}}}}}"#);
        fs::write(&response, payload).unwrap();
        let env = Env { work: work.to_path_buf(), links, state, cache, response };
        *started.env.lock().unwrap() = Some(env.clone());
        env
    }

    /// The project's cache dir, which jobs see at /cache (made by our prepare, or here first).
    pub fn project_cache(&self) -> PathBuf {
        let projects = self.cache.join("projects");
        let dir = projects.join(PROJECT_ID.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&projects, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    /// A stage script file as gitlab-runner writes it: `body` in its bash wrapper.
    pub fn script(&self, stage: &str, body: &str) -> PathBuf {
        let dir = self.work.join("scripts").join(stage);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("script");
        fs::write(&path, bash_wrapper(body)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        path
    }
}

pub fn setup_store(env: &Env, work: &Path, btrfs: bool, tar: &Path) -> Store {
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
        .env("JOB_RESPONSE_FILE", &env.response)
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

/// A job through the stage symlinks: config, prepare, one `run` per (script, stage name), cleanup.
pub fn our_job(env: &Env, store: &Store, id: &str, scripts: &[(PathBuf, &str)], started: &Started) -> Job {
    started.ours.lock().unwrap().push((id.to_owned(), store.root.clone()));
    let start = Instant::now();
    let mut job = Job { config: stage(env, store, id, "config", &[], "config"), ..Job::default() };
    job.prepare = stage(env, store, id, "prepare", &[], "prepare");
    for (script, name) in scripts {
        job.stages.push(stage(env, store, id, "run", &[script, Path::new(name)], name));
    }
    job.cleanup = stage(env, store, id, "cleanup", &[], "cleanup");
    job.whole = start.elapsed();
    job
}

/// The floor: the same machine, booted, entered and stopped with raw commands (nspawn started
/// detached + READY=1 on our own notify socket, nsenter per stage under the machine's seccomp
/// filters, SIGTERM + wait at cleanup).
pub fn floor_job(
    env: &Env,
    store: &Store,
    name: &str,
    scripts: &[(PathBuf, &str)],
    syncs: Syncs,
    started: &Started,
) -> Job {
    let start = Instant::now();
    let mut job = Job::default();
    let job_dir = store.floor_jobs.join(name);
    let ((mut nspawn, leader, cgroups, filters), prepare) = timed(|| {
        // Like a job: a user namespace of its own range (the top slot, which no test job gets).
        let base = idmap::FIRST_BASE + 4095 * idmap::RANGE;
        let upper = job_dir.join("upper");
        let cache = Bind::read_write(env.project_cache(), "/cache").idmapped(true);
        // The production command line, with the same cache bind nspawn-runner gives the job's
        // machine, started like the plain host starts it: through the spawn wrapper, in a cgroup
        // of its own (a user-namespaced systemd needs one it may write), and on plain stores on
        // the idmapped overlay the wrapper mounts.
        let cgroups = cgroup::create(name, &cgroup::Limits::default(), |_| Ok(())).unwrap();
        let (nspawn, overlay) = if store.btrfs {
            let args = Nspawn::boot(name, &store.snapshot, BootRoot::Ephemeral, false).bind(&cache);
            (args.private_users(base, true), None)
        } else {
            fs::create_dir_all(&upper).unwrap();
            let args = Nspawn::boot(name, &overlay_root(&job_dir), BootRoot::Directory, false).bind(&cache);
            (args.private_users(base, false), Some((store.snapshot.clone(), job_dir.clone(), base)))
        };
        let args = nspawn.suppress_sync(syncs == Syncs::Suppressed).into_args();
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
        started.floor.lock().unwrap().push(child.id());
        let leader = wait_ready(&socket, &mut child, name, &env.work);
        // What every process of the machine has from its init, --suppress-sync's rules
        // included: without them, a stage entered with nsenter would sync for real.
        let filters = Filters::capture(leader).unwrap_or_else(|e| panic!("{e}"));
        (child, leader, cgroups, filters)
    });
    job.prepare = prepare;
    for (script, stage) in scripts {
        let script_file = fs::File::open(script).unwrap();
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={leader}"))
            .args(["--user", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "/bin/bash", "-s"])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::from(script_file));
        let stage_filters = filters.clone();
        // SAFETY: seccomp(2) on a program built before the fork: async-signal-safe.
        unsafe {
            command.pre_exec(move || stage_filters.apply());
        }
        let (out, elapsed) = timed(|| command.output().unwrap());
        assert!(
            out.status.success(),
            "floor {stage} in {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
    started.floor.lock().unwrap().retain(|p| *p != nspawn.id());
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

/// What a job bench's body gets: its work dir, the image tarball, the environment of its jobs,
/// the machines it starts (for the teardown) and how many rounds to run.
pub struct Bench<'a> {
    pub work: &'a Path,
    pub tar: PathBuf,
    pub env: Env,
    pub running: &'a Started,
    pub rounds: usize,
}

/// A job bench's main: as root, `BENCH_JOBS` rounds (default `default_rounds`), the host's
/// context and an environment in a work dir of its own, torn down (machines and all) however
/// `body` ends.
pub fn bench_main(name: &str, default_rounds: usize, body: impl FnOnce(Bench)) {
    require_root(name);
    let rounds = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_rounds).max(1);
    let work = work_dir(name);
    let running = Started::default();
    let (work_for_teardown, running_for_teardown) = (work.clone(), running.clone());
    run_with_teardown(
        std::panic::AssertUnwindSafe(move || {
            print_context();
            let tar = bookworm_tar();
            let env = Env::new(&work, &running);
            body(Bench { work: &work, tar, env, running: &running, rounds })
        }),
        move || teardown(&work_for_teardown, &running_for_teardown),
    );
}

/// Stops whatever a panic left running, cleans up every job of ours that was started (cleanup
/// is idempotent), then unmounts and removes the work dir.
pub fn teardown(work: &Path, started: &Started) {
    let floor = started.floor.lock().map(|v| v.clone()).unwrap_or_default();
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
    if let Some(env) = started.env.lock().ok().and_then(|e| e.clone()) {
        for (id, root) in started.ours.lock().map(|v| v.clone()).unwrap_or_default() {
            if !env.state.join(format!("{id}.json")).exists() {
                continue;
            }
            let _ = Command::new(env.links.join("cleanup"))
                .env_clear()
                .env("PATH", PATH)
                .env("CUSTOM_ENV_CI_JOB_ID", &id)
                .env("NSPAWN_RUNNER_ROOT", &root)
                .env("NSPAWN_RUNNER_STATE_DIR", &env.state)
                .env("NSPAWN_RUNNER_CACHE_DIR", &env.cache)
                .status();
        }
    }
    unmount_below(work);
    if let Err(e) = fs::remove_dir_all(work) {
        eprintln!("could not remove {}: {e}", work.display());
    }
}
