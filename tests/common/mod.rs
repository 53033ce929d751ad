//! Shared fixtures of the integration tests: real stores (a loop-mounted btrfs file system and a plain
//! directory on the root file system), a real base image, and a `Job` driver that calls the four stages
//! exactly as gitlab-runner's custom executor does (see docs/gitlab-custom-executor-protocol.md in shared/).
//!
//! Nothing here is mocked: every test boots real systemd-nspawn machines. Tests need root, a loop device,
//! mkfs.btrfs, systemd-nspawn and mmdebstrap (network access to the Debian archive the first time). When
//! one of those is missing a test prints `SKIP: ...` and returns, unless `CI=true`, where it fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_nspawn-runner");
/// The name of the image imported into every test store; also NSPAWN_RUNNER_DEFAULT_IMAGE.
pub const IMAGE: &str = "bookworm";
/// Upper bound for any one stage or admin command; a hang is a test failure, not a hung test run.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(240);
/// PATH given to every process we start (gitlab-runner under systemd has a bare environment).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn next_n() -> usize {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// target/nspawn-runner-test: everything the tests create lives below it.
pub fn test_base() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("nspawn-runner-test");
    fs::create_dir_all(&p).unwrap();
    p
}

pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// A missing prerequisite: skip with a visible message, or fail under CI=true.
fn missing(what: &str) -> Option<TestEnv> {
    if in_ci() {
        panic!("CI=true but this test needs {what}");
    }
    // written to fd 2 directly, so that libtest's output capture does not hide it
    let _ = writeln!(std::io::stderr(), "SKIP: this test needs {what}");
    None
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn have_cmd(name: &str) -> bool {
    PATH.split(':').any(|d| Path::new(d).join(name).exists())
}

// ---------------------------------------------------------------------------------------------------
// file locks (several test binaries may run at once)

mod flock;
pub use flock::FileLock;

// ---------------------------------------------------------------------------------------------------
// processes we start

/// The result of one finished process.
#[derive(Debug, Clone)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// (time since start, text) of every chunk read from stdout, to prove output is streamed.
    pub stdout_chunks: Vec<(Duration, String)>,
}

impl Out {
    pub fn describe(&self) -> String {
        format!(
            "{}: exit {:?} signal {:?} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}\n------",
            self.what,
            self.code,
            self.signal,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "expected exit {code}\n{}", self.describe());
        self
    }
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        self.assert_code(0)
    }
    /// A system failure as the contract wants it: SYSTEM_FAILURE_EXIT_CODE and exactly one line on stderr
    /// (`nspawn-runner: <reason>`).
    #[track_caller]
    pub fn assert_system_failure(&self, code: i32) -> &Self {
        self.assert_code(code);
        self.assert_one_line_stderr();
        self
    }
    #[track_caller]
    pub fn assert_one_line_stderr(&self) -> &Self {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{}", self.describe());
        assert!(
            lines[0].starts_with("nspawn-runner: ") && lines[0].len() > "nspawn-runner: ".len() + 3,
            "stderr line should be `nspawn-runner: <reason>`\n{}",
            self.describe()
        );
        assert!(self.stderr.ends_with('\n'), "stderr line not terminated\n{}", self.describe());
        self
    }
    #[track_caller]
    pub fn assert_quiet(&self) -> &Self {
        assert!(
            self.stdout.trim().is_empty() && self.stderr.trim().is_empty(),
            "expected no output\n{}",
            self.describe()
        );
        self
    }
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A started process (always in its own process group, as gitlab-runner starts executables).
pub struct Running {
    pub what: String,
    pub child: Child,
    start: Instant,
    rx: mpsc::Receiver<(bool, Duration, Vec<u8>)>,
    readers: Vec<thread::JoinHandle<()>>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    chunks: Vec<(Duration, String)>,
}

pub fn spawn(what: &str, cmd: &mut Command) -> Running {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    for (is_out, stream) in [
        (true, Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>),
        (false, Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>),
    ] {
        let tx = tx.clone();
        let mut stream = stream;
        readers.push(thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((is_out, start.elapsed(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    Running {
        what: what.to_string(),
        child,
        start,
        rx,
        readers,
        stdout: Vec::new(),
        stderr: Vec::new(),
        chunks: Vec::new(),
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn drain(&mut self) {
        while let Ok((is_out, t, data)) = self.rx.try_recv() {
            if is_out {
                self.chunks.push((t, String::from_utf8_lossy(&data).into_owned()));
                self.stdout.extend_from_slice(&data);
            } else {
                self.stderr.extend_from_slice(&data);
            }
        }
    }
    /// stdout read so far.
    pub fn stdout_so_far(&mut self) -> String {
        self.drain();
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Wait until stdout contains `needle`; panics after `timeout` or if the process exits first.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout_so_far().contains(needle) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(200));
                self.drain();
                panic!(
                    "{} exited ({st:?}) before printing {needle:?}\nstdout: {}\nstderr: {}",
                    self.what,
                    String::from_utf8_lossy(&self.stdout),
                    String::from_utf8_lossy(&self.stderr)
                );
            }
            if Instant::now() > deadline {
                self.kill_group(libc::SIGKILL);
                panic!("{}: {needle:?} not printed within {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    pub fn kill_group(&self, sig: i32) {
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }
    pub fn kill_pid(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
    /// Wait like Go's cmd.Wait: the process must exit AND its stdout/stderr must reach EOF. A daemon left
    /// holding the pipes would hang gitlab-runner: that is a failure here too.
    pub fn wait(self, timeout: Duration) -> Out {
        self.try_wait_out(timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `wait`, but reports a hang as Err instead of panicking (usable inside Drop).
    pub fn try_wait_out(mut self, timeout: Duration) -> Result<Out, String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            self.drain();
            match self.child.try_wait().unwrap() {
                Some(st) => break st,
                None if Instant::now() > deadline => {
                    self.kill_group(libc::SIGKILL);
                    let _ = self.child.wait();
                    thread::sleep(Duration::from_millis(300));
                    self.drain();
                    return Err(format!(
                        "{} did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
                        self.what,
                        String::from_utf8_lossy(&self.stdout),
                        String::from_utf8_lossy(&self.stderr)
                    ));
                }
                None => thread::sleep(Duration::from_millis(20)),
            }
        };
        let elapsed = self.start.elapsed();
        // The pipes must reach EOF soon after the exit.
        let eof_deadline = Instant::now() + Duration::from_secs(10);
        while self.readers.iter().any(|r| !r.is_finished()) {
            if Instant::now() > eof_deadline {
                self.drain();
                return Err(format!(
                    "{} exited ({status:?}) but something still holds its stdout/stderr open 10 s later: \
                     gitlab-runner would wait for EOF forever\nstdout: {}\nstderr: {}",
                    self.what,
                    String::from_utf8_lossy(&self.stdout),
                    String::from_utf8_lossy(&self.stderr)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        self.drain();
        Ok(Out {
            what: self.what.clone(),
            code: status.code(),
            signal: status.signal(),
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            elapsed,
            stdout_chunks: std::mem::take(&mut self.chunks),
        })
    }
}

pub fn run_cmd(what: &str, cmd: &mut Command) -> Out {
    spawn(what, cmd).wait(CMD_TIMEOUT)
}

/// A plain helper command (mount, btrfs, ...) that must succeed.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------------
// the base image

/// target/nspawn-runner-test/bookworm-git.tar, built once (mmdebstrap, ~30 s) and reused by later runs:
/// minbase with systemd, dbus and git, what the health check before every commit wants of a tree (the
/// name changed when git joined, so that an older cached tarball is not taken for it).
pub fn base_tarball() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let base = test_base();
        let tar = base.join("bookworm-git.tar");
        let _lock = FileLock::exclusive(&base.join(".bookworm-git.tar.lock"));
        if tar.is_file() {
            return tar;
        }
        let tmp = base.join(format!(".bookworm-git-{}.tmp.tar", std::process::id()));
        eprintln!("building the base image {} with mmdebstrap (once)...", tar.display());
        let out = Command::new("mmdebstrap")
            .args(["--quiet", "--format=tar", "--variant=minbase", "--include=systemd,dbus,git", "bookworm"])
            .arg(&tmp)
            .stdin(Stdio::null())
            .output()
            .expect("mmdebstrap");
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            panic!("mmdebstrap failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        fs::rename(&tmp, &tar).unwrap();
        tar
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------------
// stores

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A subdirectory of a loop-mounted btrfs file system.
    Btrfs,
    /// A plain directory on the (ext4) root file system: overlayfs path.
    Plain,
}

/// Mount points (decoded) of /proc/self/mountinfo with their fs type.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mp = unescape_mountinfo(f.get(4)?);
            let dash = f.iter().position(|x| *x == "-")?;
            Some((PathBuf::from(mp), f.get(dash + 1)?.to_string()))
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap(), 8).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The loop-mounted btrfs file system of this test binary: mounted on first use (or reused when another
/// test binary running at the same time, or a crashed earlier run, left it mounted; an unusable image is
/// recreated) and unmounted when the binary exits, unless another test binary still uses it.
fn btrfs_mount() -> Result<PathBuf, String> {
    static MNT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    MNT.get_or_init(|| {
        let base = test_base();
        let img = base.join("btrfs.img");
        let mnt = base.join("btrfs");
        let _lock = FileLock::exclusive(&base.join(".btrfs.lock"));
        fs::create_dir_all(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let mounted = |m: &Path| mounts().iter().any(|(p, t)| p == m && t == "btrfs");
        let try_mount = || sh_ok(&["mount", "-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()]);
        if !(mounted(&mnt) || img.exists() && try_mount() && mounted(&mnt)) {
            // No image, or an unusable one: make a fresh file system.
            let _ = fs::remove_file(&img);
            // Sparse; roomy because btrfs frees deleted subvolumes lazily (its cleaner thread),
            // and tests that delete many of them while others import ran out of 4 GiB.
            sh(&["truncate", "-s", "16G", img.to_str().unwrap()]);
            sh(&["mkfs.btrfs", "-q", "-f", img.to_str().unwrap()]);
            if !try_mount() || !mounted(&mnt) {
                return Err(format!("cannot loop-mount {} on {}", img.display(), mnt.display()));
            }
        }
        // Register as a user (shared lock, held until exit), taken under the mount lock.
        let users =
            fs::OpenOptions::new().create(true).write(true).truncate(false).open(base.join(".btrfs.users")).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(unsafe { libc::flock(users.as_raw_fd(), libc::LOCK_SH) }, 0);
        if BTRFS_USERS.set((users, mnt.clone())).is_ok() {
            unsafe { libc::atexit(unmount_btrfs_at_exit) };
        }
        Ok(mnt)
    })
    .clone()
}

static BTRFS_USERS: OnceLock<(fs::File, PathBuf)> = OnceLock::new();

/// atexit: unmount the btrfs (which frees its loop device) if no other test binary holds it. Must not
/// panic.
extern "C" fn unmount_btrfs_at_exit() {
    use std::os::fd::AsRawFd;
    let Some((users, mnt)) = BTRFS_USERS.get() else { return };
    let Some(base) = mnt.parent() else { return };
    let Ok(lock) = fs::OpenOptions::new().create(true).write(true).truncate(false).open(base.join(".btrfs.lock"))
    else {
        return;
    };
    unsafe {
        if libc::flock(lock.as_raw_fd(), libc::LOCK_EX) != 0 {
            return;
        }
        // exclusive only if no other binary holds its shared lock
        if libc::flock(users.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 {
            return;
        }
    }
    let ok =
        Command::new("umount").arg(mnt).stdin(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        let _ = writeln!(std::io::stderr(), "note: {} stays mounted (still in use)", mnt.display());
    }
}

fn plain_base() -> PathBuf {
    let p = test_base().join("plain");
    fs::create_dir_all(&p).unwrap();
    p.canonicalize().unwrap()
}

/// Removes what crashed earlier runs (dead pids) left in the store bases, once per test binary.
fn sweep_leftovers() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut bases = vec![plain_base(), test_base().join("work")];
        if let Ok(m) = btrfs_mount() {
            bases.push(m);
        }
        for base in bases {
            let Ok(rd) = fs::read_dir(&base) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // names are <tag>-p<pid>-<n>
                let Some(pid) =
                    name.rsplit('-').nth(1).and_then(|p| p.strip_prefix('p')).and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                eprintln!("removing leftover {}", e.path().display());
                if let Err(err) = remove_tree(&e.path()) {
                    eprintln!("warning: cannot remove leftover {}: {err}", e.path().display());
                }
            }
        }
    });
}

/// rm -rf that also copes with btrfs subvolumes (nested ones first) and refuses to cross mounts.
pub fn remove_tree(p: &Path) -> Result<(), String> {
    if !p.exists() && fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    // Unmount anything still mounted below (a machine of a crashed test), deepest first.
    let mut below: Vec<PathBuf> = mounts().into_iter().map(|m| m.0).filter(|m| m.starts_with(p)).collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in below {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    if sh_ok(&["rm", "-rf", "--one-file-system", p.to_str().unwrap()]) && !p.exists() {
        return Ok(());
    }
    // Subvolumes that rm could not remove: delete them bottom-up.
    let mut subvols = Vec::new();
    collect_subvols(p, &mut subvols);
    subvols.sort_by_key(|s| std::cmp::Reverse(s.as_os_str().len()));
    for s in subvols {
        let _ = Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(&s).stdout(Stdio::null()).status();
    }
    if sh_ok(&["rm", "-rf", "--one-file-system", p.to_str().unwrap()]) && !p.exists() {
        Ok(())
    } else {
        Err(format!("{} still exists", p.display()))
    }
}

fn collect_subvols(p: &Path, out: &mut Vec<PathBuf>) {
    let Ok(md) = fs::symlink_metadata(p) else { return };
    if !md.is_dir() {
        return;
    }
    if md.ino() == 256 {
        out.push(p.to_path_buf());
    }
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            collect_subvols(&e.path(), out);
        }
    }
}

/// Whether `p` is the root of a btrfs subvolume.
pub fn is_subvolume(p: &Path) -> bool {
    fs::symlink_metadata(p).map(|m| m.is_dir() && m.ino() == 256).unwrap_or(false)
        && sh_ok(&["btrfs", "subvolume", "show", p.to_str().unwrap()])
}

// ---------------------------------------------------------------------------------------------------
// one test's world

/// One test's private store root, state dir, cache dir and stage links.
pub struct TestEnv {
    pub kind: StoreKind,
    pub tag: String,
    /// <store base>/<tag>: everything of this test on the store; hostile names must not escape it.
    pub store_dir: PathBuf,
    /// NSPAWN_RUNNER_ROOT = <store_dir>/s/root (two levels down so `../../x` stays inside store_dir).
    pub root: PathBuf,
    /// target/nspawn-runner-test/work/<tag>: state, cache, config, links, job temp dirs.
    pub work: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub config_dir: PathBuf,
    pub links: PathBuf,
    /// Extra NSPAWN_RUNNER_* (or other) settings for every command of this test.
    pub settings: Mutex<Vec<(String, String)>>,
}

impl TestEnv {
    /// A fresh test world with the base image imported as `bookworm`; None (after a SKIP line) when the
    /// host lacks what the test needs.
    pub fn new(kind: StoreKind, tag: &str) -> Option<TestEnv> {
        let env = Self::empty(kind, tag)?;
        env.import(IMAGE);
        Some(env)
    }

    /// A fresh test world with an empty store.
    pub fn empty(kind: StoreKind, tag: &str) -> Option<TestEnv> {
        if !is_root() {
            return missing("root (systemd-nspawn, mount, btrfs)");
        }
        for c in ["systemd-nspawn", "mmdebstrap"] {
            if !have_cmd(c) {
                return missing(c);
            }
        }
        if kind == StoreKind::Btrfs {
            if !have_cmd("mkfs.btrfs") || !have_cmd("btrfs") {
                return missing("btrfs-progs");
            }
            if !Path::new("/dev/loop-control").exists() {
                return missing("a loop device (/dev/loop-control)");
            }
        }
        let base = match kind {
            StoreKind::Btrfs => match btrfs_mount() {
                Ok(m) => m,
                Err(e) => return missing(&format!("a loop-mounted btrfs: {e}")),
            },
            StoreKind::Plain => plain_base(),
        };
        sweep_leftovers();
        let tag = format!("{tag}-{kind:?}-p{}-{}", std::process::id(), next_n()).to_lowercase();
        let store_dir = base.join(&tag);
        let root = store_dir.join("s").join("root");
        fs::create_dir_all(&root).unwrap();
        let work = test_base().join("work").join(&tag);
        let env = TestEnv {
            kind,
            store_dir,
            root,
            state_dir: work.join("state"),
            cache_dir: work.join("cache"),
            config_dir: work.join("config"),
            links: work.join("links"),
            work,
            tag,
            settings: Mutex::new(Vec::new()),
        };
        for d in [&env.state_dir, &env.cache_dir, &env.config_dir, &env.links, &env.work.join("tmp")] {
            fs::create_dir_all(d).unwrap();
        }
        // The test's own (empty) settings file: the host's /etc/nspawn-runner/settings never applies.
        fs::write(env.work.join("settings"), "").unwrap();
        // Stage links exactly as packaged: config/prepare/run/cleanup -> the binary.
        env.admin(&["install-links", env.links.to_str().unwrap()]).assert_ok();
        for s in ["config", "prepare", "run", "cleanup"] {
            let l = env.links.join(s);
            let t = fs::read_link(&l).unwrap_or_else(|e| panic!("install-links made no symlink {}: {e}", l.display()));
            assert_eq!(
                fs::canonicalize(&l).unwrap(),
                fs::canonicalize(BIN).unwrap(),
                "{} -> {} is not the binary",
                l.display(),
                t.display()
            );
        }
        Some(env)
    }

    pub fn set(&self, k: &str, v: &str) {
        let mut s = self.settings.lock().unwrap();
        s.retain(|(kk, _)| kk != k);
        s.push((k.to_string(), v.to_string()));
    }

    /// Base environment of every process: minimal PATH and this test's NSPAWN_RUNNER_* settings.
    pub fn base_cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", PATH)
            .env("NSPAWN_RUNNER_ROOT", &self.root)
            .env("NSPAWN_RUNNER_STATE_DIR", &self.state_dir)
            .env("NSPAWN_RUNNER_CACHE_DIR", &self.cache_dir)
            .env("NSPAWN_RUNNER_CONFIG_DIR", &self.config_dir)
            .env("NSPAWN_RUNNER_DEFAULT_IMAGE", IMAGE)
            .env("NSPAWN_RUNNER_LOCK_TIMEOUT", "120")
            .env("NSPAWN_RUNNER_SETTINGS", self.work.join("settings"))
            .current_dir(&self.work);
        for (k, v) in self.settings.lock().unwrap().iter() {
            c.env(k, v);
        }
        c
    }

    /// `nspawn-runner ARGS...` (admin CLI).
    pub fn admin(&self, args: &[&str]) -> Out {
        self.admin_env(args, &[])
    }

    pub fn admin_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.admin_cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&format!("nspawn-runner {}", args.join(" ")), &mut c)
    }

    pub fn admin_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.base_cmd(Path::new(BIN));
        c.args(args);
        c
    }

    /// `nspawn-runner image import NAME TARBALL` and checks the resulting layout.
    pub fn import(&self, name: &str) {
        let tar = base_tarball();
        self.admin(&["image", "import", name, tar.to_str().unwrap()]).assert_ok();
        let snap = self.current(name).unwrap_or_else(|| panic!("image import {name} left no valid `current`"));
        let dir = self.root.join(name).join(&snap);
        assert!(dir.join("usr/lib/systemd/systemd").exists(), "imported tree {} incomplete", dir.display());
        if self.kind == StoreKind::Btrfs {
            assert!(is_subvolume(&dir), "on btrfs the snapshot {} must be a subvolume", dir.display());
        }
    }

    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The target of ROOT/NAME/current if it is a relative `<digits>_<digits>` link to an existing dir.
    pub fn current(&self, name: &str) -> Option<String> {
        let t = fs::read_link(self.root.join(name).join("current")).ok()?;
        let t = t.to_str()?.to_string();
        assert!(is_snapshot_name(&t), "current -> {t:?} is not a relative <time>_<pid> name");
        assert!(self.root.join(name).join(&t).is_dir(), "current -> {t} does not exist");
        Some(t)
    }

    /// The `<time>_<pid>` entries of ROOT/NAME, sorted.
    pub fn snapshots(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join(name))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_snapshot_name(n))
            .collect();
        v.sort();
        v
    }

    /// All entry names of ROOT/NAME, sorted.
    pub fn entries(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join(name))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    pub fn job(&self) -> Job<'_> {
        Job::new(self, &format!("{}{:02}", std::process::id(), next_n()))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::env::var_os("NSPAWN_RUNNER_TEST_KEEP").is_some() {
            eprintln!("keeping {} and {}", self.store_dir.display(), self.work.display());
            return;
        }
        if thread::panicking() {
            // stop whatever machines this test left behind so they don't pile up
            if let Ok(rd) = fs::read_dir(&self.state_dir) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if let Some(id) = n.strip_suffix(".json") {
                        // a Job dropped while panicking runs cleanup (see Drop for Job)
                        drop(Job::new(self, id));
                    }
                }
            }
        }
        for p in [&self.store_dir, &self.work] {
            if let Err(e) = remove_tree(p) {
                eprintln!("warning: {e}");
            }
        }
    }
}

pub fn is_snapshot_name(s: &str) -> bool {
    match s.split_once('_') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------------
// the gitlab-runner side

/// One CI job, driven exactly like gitlab-runner's custom executor drives config/prepare/run/cleanup.
pub struct Job<'a> {
    pub env: &'a TestEnv,
    pub id: String,
    /// CUSTOM_ENV_CI_JOB_IMAGE; None = the variable is not set at all.
    pub image: Option<String>,
    /// The per-attempt temp dir (<tmp>/custom-executorNNN): cwd, TMPDIR, response.json, scripts.
    pub tmp: PathBuf,
    /// Extra environment of the stage processes (overrides the defaults).
    pub vars: Vec<(String, String)>,
    pub builds_dir: Mutex<String>,
    /// job_info.project_id of the job payload (JOB_RESPONSE_FILE).
    pub project_id: u64,
    scripts: AtomicUsize,
}

pub const PROJECT_PATH: &str = "group/project";
/// job_info.project_id of a test job unless it says otherwise.
pub const DEFAULT_PROJECT_ID: u64 = 1000;
pub const JOB_TOKEN: &str = "glcbt-64_SecretJobTokenValue";

impl<'a> Job<'a> {
    pub fn new(env: &'a TestEnv, id: &str) -> Job<'a> {
        let j = Job {
            env,
            id: id.to_string(),
            image: None,
            tmp: PathBuf::new(),
            vars: Vec::new(),
            builds_dir: Mutex::new("/builds".into()),
            project_id: DEFAULT_PROJECT_ID,
            scripts: AtomicUsize::new(0),
        };
        j.new_attempt()
    }

    /// The same job in GitLab project `project` (a new attempt, so its payload says so).
    pub fn in_project(mut self, project: u64) -> Self {
        self.project_id = project;
        self.new_attempt()
    }

    /// The host directory the job's /cache is.
    pub fn cache_dir(&self) -> PathBuf {
        self.env.cache_dir.join("projects").join(self.project_id.to_string())
    }

    /// gitlab-runner makes a new temp dir (and response.json) for every prepare attempt.
    pub fn new_attempt(mut self) -> Job<'a> {
        self.tmp = self.env.work.join("tmp").join(format!("custom-executor{}", next_n()));
        fs::create_dir_all(&self.tmp).unwrap();
        let resp = self.tmp.join("response.json");
        let mut f = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(resp).unwrap();
        write!(
            f,
            r#"{{"id":{},"token":"{JOB_TOKEN}","job_info":{{"name":"test","stage":"test","project_id":{},"project_name":"project"}},"variables":[{{"key":"CI_JOB_TOKEN","value":"{JOB_TOKEN}","public":false,"masked":true}}]}}"#,
            self.id.parse::<u64>().unwrap_or(1),
            self.project_id
        )
        .unwrap();
        self
    }

    pub fn with_image(mut self, image: &str) -> Self {
        self.image = Some(image.to_string());
        self
    }

    pub fn with_var(mut self, k: &str, v: &str) -> Self {
        self.vars.retain(|(kk, _)| kk != k);
        self.vars.push((k.to_string(), v.to_string()));
        self
    }

    pub fn machine(&self) -> String {
        format!("run-{}", self.id)
    }

    pub fn project_dir(&self) -> String {
        format!("{}/{}", self.builds_dir.lock().unwrap().trim_end_matches('/'), PROJECT_PATH)
    }

    /// The command for one stage: exec'd through its symlink (argv[0] dispatch), cwd = tmp,
    /// stdin = /dev/null, own process group, gitlab-runner's environment.
    pub fn stage_cmd(&self, stage: &str, configured: bool) -> Command {
        let mut c = self.env.base_cmd(&self.env.links.join(stage));
        let (bd, pd) = if configured {
            let bd = self.builds_dir.lock().unwrap().clone();
            (bd, self.project_dir())
        } else {
            (String::new(), String::new())
        };
        c.current_dir(&self.tmp)
            .env("TMPDIR", &self.tmp)
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .env("BUILD_EXIT_CODE_FILE", self.tmp.join("build_exit_code"))
            .env("JOB_RESPONSE_FILE", self.tmp.join("response.json"))
            .env("CUSTOM_ENV_FF_USE_LEGACY_BASH_EVAL", "false")
            .env("CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN", "t3stT0k")
            .env("CUSTOM_ENV_CI_BUILDS_DIR", &bd)
            .env("CUSTOM_ENV_CI_PROJECT_DIR", &pd)
            .env("CUSTOM_ENV_RUNNER_TEMP_PROJECT_DIR", format!("{pd}.tmp"))
            .env("CUSTOM_ENV_CI_CONCURRENT_ID", "0")
            .env("CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID", "0")
            .env("CUSTOM_ENV_CI_SERVER", "yes")
            .env("CUSTOM_ENV_CI_JOB_STATUS", "running")
            .env("CUSTOM_ENV_CI_JOB_TIMEOUT", "3600")
            .env("CUSTOM_ENV_CI_JOB_ID", &self.id)
            .env("CUSTOM_ENV_CI_JOB_TOKEN", JOB_TOKEN)
            .env("CUSTOM_ENV_CI_PROJECT_PATH", PROJECT_PATH)
            .env("CUSTOM_ENV_CI_PROJECT_PATH_SLUG", "group-project")
            .env(
                "CUSTOM_ENV_CI_REPOSITORY_URL",
                format!("https://gitlab-ci-token:{JOB_TOKEN}@gitlab.invalid/{PROJECT_PATH}.git"),
            )
            .env("CUSTOM_ENV_CI_SHARED_ENVIRONMENT", "true")
            .env("CUSTOM_ENV_CI_JOB_SERVICES", "");
        if let Some(img) = &self.image {
            c.env("CUSTOM_ENV_CI_JOB_IMAGE", img);
        }
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    fn stage(&self, stage: &str, configured: bool) -> Out {
        run_cmd(&format!("{stage} (job {})", self.id), &mut self.stage_cmd(stage, configured))
    }

    /// config_exec; remembers builds_dir for CI_PROJECT_DIR of later stages.
    pub fn config(&self) -> Out {
        let out = self.stage("config", false);
        if out.code == Some(0) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
                if let Some(bd) = v.get("builds_dir").and_then(|b| b.as_str()) {
                    *self.builds_dir.lock().unwrap() = bd.to_string();
                }
            }
        }
        out
    }

    pub fn prepare(&self) -> Out {
        self.stage("prepare", true)
    }

    pub fn cleanup(&self) -> Out {
        self.stage("cleanup", true)
    }

    /// Writes `<tmp>/scriptNNN/script` (0700) with the v19.1+ bash wrapper around `body`.
    pub fn write_script(&self, body: &str) -> PathBuf {
        let dir = self.tmp.join(format!("script{:03}", self.scripts.fetch_add(1, Ordering::SeqCst) + 100));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("script");
        fs::write(&path, bash_wrapper(body)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        path
    }

    pub fn run_cmd(&self, stage: &str, body: &str) -> Command {
        let script = self.write_script(body);
        let mut c = self.stage_cmd("run", true);
        c.arg(&script).arg(stage);
        c
    }

    /// `run <script> <stage>` with `body` as the stage body (use the *_body helpers for realistic bodies).
    pub fn run(&self, stage: &str, body: &str) -> Out {
        run_cmd(&format!("run {stage} (job {})", self.id), &mut self.run_cmd(stage, body))
    }

    pub fn spawn_run(&self, stage: &str, body: &str) -> Running {
        spawn(&format!("run {stage} (job {})", self.id), &mut self.run_cmd(stage, body))
    }

    /// Body of prepare_script as gitlab-runner writes it.
    pub fn prepare_script_body(&self) -> String {
        let p = self.project_dir();
        format!(
            "echo \"Running on $(hostname) via test-host...\"\nrm \"-f\" \"{p}.tmp/gitlab_runner_env\"\nrm \"-f\" \"{p}.tmp/masking.db\"\n"
        )
    }

    fn exports(&self) -> String {
        let p = self.project_dir();
        let bd = self.builds_dir.lock().unwrap().clone();
        let mut s = String::new();
        for (k, v) in [
            ("CI_JOB_ID", self.id.as_str()),
            ("CI_JOB_TOKEN", JOB_TOKEN),
            ("CI_BUILDS_DIR", bd.as_str()),
            ("CI_PROJECT_DIR", p.as_str()),
            ("CI_PROJECT_PATH", PROJECT_PATH),
            ("CI_SERVER", "yes"),
            ("CI_JOB_STATUS", "running"),
        ] {
            s += &format!("export {k}={}\n", ansi_c_quote(v));
        }
        s += &format!(
            "export GITLAB_ENV=\"{p}.tmp/gitlab_runner_env\"\nmkdir -p \"{p}.tmp\"\ntouch \"$GITLAB_ENV\"\n\
             while read -r line; do export \"$line\"; done < \"$GITLAB_ENV\"\n"
        );
        s
    }

    /// get_sources body (GIT_STRATEGY none style: creates the project dir), then `cmds` inside it.
    pub fn get_sources_body(&self, cmds: &str) -> String {
        let p = self.project_dir();
        format!("{}mkdir -p \"{p}\"\ncd \"{p}\"\n{cmds}\n", self.exports())
    }

    /// build_script / after_script / step_* body: exports, cd project dir, echo + run each command.
    pub fn user_body(&self, cmds: &[&str]) -> String {
        let p = self.project_dir();
        let mut s = format!("{}cd \"{p}\"\n", self.exports());
        for c in cmds {
            s += &format!("echo {}\n{c}\n", ansi_c_quote(&format!("\x1b[32;1m$ {c}\x1b[0;m")));
        }
        s
    }

    /// cleanup_file_variables body.
    pub fn cleanup_file_variables_body(&self) -> String {
        let p = self.project_dir();
        format!("{}rm \"-f\" \"{p}.tmp/gitlab_runner_env\"\nrm \"-f\" \"{p}.tmp/masking.db\"\n", self.exports())
    }
}

impl Job<'_> {
    /// A whole short job: config, prepare, one build_script running `cmds` in a fresh project dir,
    /// cleanup, then assert_nothing_left. Returns the build_script's output (which succeeded).
    #[track_caller]
    pub fn run_whole_job(&self, cmds: &str) -> Out {
        self.config().assert_ok();
        self.prepare().assert_ok();
        let out = self.run("build_script", &self.get_sources_body(cmds));
        out.assert_ok();
        self.cleanup().assert_ok();
        assert_nothing_left(self.env, &self.id);
        out
    }

    /// Best-effort cleanup while a test panics (must not panic itself, or the test binary aborts).
    fn cleanup_after_panic(&self) {
        let r = spawn(&format!("cleanup after panic (job {})", self.id), &mut self.stage_cmd("cleanup", true))
            .try_wait_out(Duration::from_secs(60));
        if let Err(e) = r {
            eprintln!("{e}");
        }
    }
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.cleanup_after_panic();
        }
    }
}

pub use nspawn_runner::jobs::script::{ansi_c_quote, bash_wrapper};

// ---------------------------------------------------------------------------------------------------
// host inspection

/// (pid, argv) of every process on the host (container processes are visible here too).
pub fn processes() -> Vec<(i32, Vec<String>)> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(raw) = fs::read(e.path().join("cmdline")) else { continue };
        if raw.is_empty() {
            continue;
        }
        let argv = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>();
        let mut argv = argv;
        if argv.last().is_some_and(|a| a.is_empty()) {
            argv.pop();
        }
        v.push((pid, argv));
    }
    v
}

/// systemd-nspawn processes of machine `name`.
pub fn nspawn_pids(name: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, argv)| {
            let is_nspawn =
                argv.first().map(|a| Path::new(a).file_name() == Some(OsStr::new("systemd-nspawn"))).unwrap_or(false);
            is_nspawn
                && argv.iter().enumerate().any(|(i, a)| {
                    a == &format!("--machine={name}")
                        || a == &format!("-M{name}")
                        || ((a == "--machine" || a == "-M") && argv.get(i + 1) == Some(&name.to_string()))
                })
        })
        .map(|(p, _)| p)
        .collect()
}

/// Processes whose argv is exactly `argv` and whose environment contains `marker` (e.g. "MARK=123").
pub fn marked_processes(argv: &[&str], marker: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(pid, a)| {
            a.iter().map(String::as_str).eq(argv.iter().copied())
                && fs::read(format!("/proc/{pid}/environ"))
                    .map(|e| e.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
                    .unwrap_or(false)
        })
        .map(|(p, _)| p)
        .collect()
}

/// Mount points at or below `p`.
pub fn mounts_below(p: &Path) -> Vec<PathBuf> {
    mounts().into_iter().map(|m| m.0).filter(|m| m.starts_with(p)).collect()
}

/// Processes with an argument that names a path at or below `p` (nspawn -D, cp, btrfs, ...).
pub fn processes_using(p: &Path) -> Vec<(i32, Vec<String>)> {
    let p = p.to_string_lossy().into_owned();
    processes().into_iter().filter(|(_, argv)| argv.iter().any(|a| a.contains(&p))).collect()
}

/// Every test ends with this: nothing of job `id` is left on the host (its machine process, mounts,
/// ephemeral copies, per-job dir, state file), and nothing of this test's store is still in use at all
/// (no process naming a path in it, no mount in it, no other state file, no other per-job dir).
#[track_caller]
pub fn assert_nothing_left(env: &TestEnv, id: &str) {
    let machine = format!("run-{id}");
    let procs = nspawn_pids(&machine);
    assert!(procs.is_empty(), "systemd-nspawn of {machine} still running: pids {procs:?}");
    let jobdir = env.root.join(".jobs").join(&machine);
    assert!(fs::symlink_metadata(&jobdir).is_err(), "per-job dir left: {}", jobdir.display());
    let state = env.state_dir.join(format!("{id}.json"));
    assert!(fs::symlink_metadata(&state).is_err(), "state file left: {}", state.display());
    assert_store_idle(env);
}

/// Nothing of this test's store is in use: no process names a path in it, nothing is mounted in it, no
/// machine copy, no per-job dir, no state file.
#[track_caller]
pub fn assert_store_idle(env: &TestEnv) {
    let procs = processes_using(&env.store_dir);
    assert!(procs.is_empty(), "processes still use the store {}: {procs:?}", env.store_dir.display());
    for base in [&env.store_dir, &env.state_dir, &env.cache_dir] {
        let m = mounts_below(base);
        assert!(m.is_empty(), "mounts left below {}: {m:?}", base.display());
    }
    if let Ok(rd) = fs::read_dir(&env.root) {
        for img in rd.flatten() {
            if let Ok(rd2) = fs::read_dir(img.path()) {
                for e in rd2.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    assert!(!n.starts_with(".#machine."), "ephemeral machine copy left: {}", e.path().display());
                }
            }
        }
    }
    let jobs: Vec<_> =
        fs::read_dir(env.root.join(".jobs")).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(jobs.is_empty(), "per-job dirs left: {jobs:?}");
    let states: Vec<_> =
        fs::read_dir(&env.state_dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(states.is_empty(), "state files left: {states:?}");
}

/// A listing of a tree (path -> kind / link target / size) for before/after comparisons. Does not descend
/// into image snapshots (`<time>_<pid>` dirs below an image dir) to stay cheap.
pub fn tree(p: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    fn walk(base: &Path, p: &Path, m: &mut BTreeMap<String, String>, depth: usize) {
        let Ok(rd) = fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let Ok(md) = fs::symlink_metadata(&path) else { continue };
            let ft = md.file_type();
            let desc = if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default())
            } else if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_file() {
                format!("file {} bytes", md.len())
            } else if ft.is_socket() {
                "socket".into()
            } else {
                "other".into()
            };
            m.insert(rel, desc);
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() && !(is_snapshot_name(&name) && depth >= 1) && depth < 12 {
                walk(base, &path, m, depth + 1);
            }
        }
    }
    walk(p, p, &mut m, 0);
    m
}

#[track_caller]
pub fn assert_same_tree(what: &str, before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    if before != after {
        let added: Vec<_> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).collect();
        let removed: Vec<_> = before.iter().filter(|(k, v)| after.get(*k) != Some(v)).collect();
        panic!("{what}: the tree changed\nadded/changed: {added:#?}\nremoved/changed: {removed:#?}");
    }
}

/// A small xorshift PRNG (no extra dependency); the seed is printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::env::var("NSPAWN_RUNNER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 ^ std::process::id() as u64
        });
        eprintln!("random seed: NSPAWN_RUNNER_TEST_SEED={seed}");
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `both_stores! { NAME; ... }` generates `mod NAME { #[test] fn btrfs(); #[test] fn plain() }` calling
/// the test body `fn NAME(StoreKind)`, so every test runs on both kinds of store.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident;)+) => {
        $(
            mod $name {
                #[test]
                fn btrfs() {
                    super::$name($crate::common::StoreKind::Btrfs)
                }
                #[test]
                fn plain() {
                    super::$name($crate::common::StoreKind::Plain)
                }
            }
        )+
    };
}
