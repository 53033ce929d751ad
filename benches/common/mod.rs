//! Shared helpers of the benchmarks (harness = false): work dirs under target/bench/, loop-mounted
//! btrfs, the bookworm tarball, running the built binary, medians and table printing.
#![allow(dead_code)]

pub mod jobs;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this bench (release profile).
pub const BIN: &str = env!("CARGO_BIN_EXE_nspawn-runner");

/// The PATH every program we start gets (the same as the binary's SAFE_PATH).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exits 0 with a message when not root: the benchmarks mount file systems and boot machines.
pub fn require_root(bench: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("bench {bench}: skipped: needs root (mounts a loop btrfs and boots systemd-nspawn machines)");
        std::process::exit(0);
    }
    for cmd in ["systemd-nspawn", "mkfs.btrfs", "nsenter", "tar"] {
        if !PATH.split(':').any(|d| Path::new(d).join(cmd).exists()) {
            println!("bench {bench}: skipped: {cmd} is not installed");
            std::process::exit(0);
        }
    }
}

/// target/ (the directory holding release/nspawn-runner).
pub fn target_dir() -> PathBuf {
    Path::new(BIN).parent().and_then(|p| p.parent()).expect("binary inside target/<profile>/").to_path_buf()
}

/// target/bench/, where every work dir of every bench lives.
pub fn bench_base() -> PathBuf {
    let base = target_dir().join("bench");
    fs::create_dir_all(&base).unwrap();
    base.canonicalize().unwrap()
}

/// Mount points (decoded) from /proc/self/mounts, with their fs type.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let _src = f.next()?;
            let mnt =
                f.next()?.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\");
            let fstype = f.next()?.to_owned();
            Some((PathBuf::from(mnt), fstype))
        })
        .collect()
}

/// Runs a command, panicking with its output on failure.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("PATH", PATH)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    if !out.status.success() {
        panic!(
            "{:?} failed ({}):\n{}{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command, ignoring failure; true if it succeeded.
pub fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .env("PATH", PATH)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The same lock protocol as tests/common, for target/nspawn-runner-test/.
#[path = "../../tests/common/flock.rs"]
mod flock;
pub use flock::FileLock;

/// The bookworm minbase(+systemd,dbus,git: what the health check of a commit wants) tarball: the tests' one if present, else made once with
/// mmdebstrap under target/bench/.
pub fn bookworm_tar() -> PathBuf {
    let shared = target_dir().join("nspawn-runner-test");
    let tar = shared.join("bookworm-git.tar");
    if shared.is_dir() {
        // Wait for a test binary that may be making it right now.
        let _lock = FileLock::exclusive(&shared.join(".bookworm-git.tar.lock"));
        if tar.is_file() && fs::metadata(&tar).map(|m| m.len() > 10 << 20).unwrap_or(false) {
            return tar;
        }
    }
    let base = bench_base();
    let tar = base.join("bookworm-git.tar");
    let _lock = FileLock::exclusive(&base.join(".bookworm-git.tar.lock"));
    if !tar.is_file() {
        eprintln!("making {} with mmdebstrap (once)...", tar.display());
        let tmp = base.join(format!(".bookworm-git.tar.{}", std::process::id()));
        sh(&["mmdebstrap", "--variant=minbase", "--include=systemd,dbus,git", "bookworm", tmp.to_str().unwrap()]);
        fs::rename(&tmp, &tar).unwrap();
    }
    tar
}

/// The work dir of this bench run: target/bench/<name>-<pid>. Leftovers of crashed runs of the
/// same bench (dead pid) are unmounted and removed first.
pub fn work_dir(name: &str) -> PathBuf {
    let base = bench_base();
    for entry in fs::read_dir(&base).unwrap().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&format!("{name}-")).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing the leftovers of a crashed run: {}", entry.path().display());
        unmount_below(&entry.path());
        let _ = fs::remove_dir_all(entry.path());
    }
    let dir = base.join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Unmounts everything mounted at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let mut below: Vec<PathBuf> = mounts().into_iter().map(|(m, _)| m).filter(|m| m.starts_with(dir)).collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    below.dedup();
    for m in below {
        if !sh_quiet(&["umount", m.to_str().unwrap()]) {
            eprintln!("umount {} failed; detaching lazily", m.display());
            sh_quiet(&["umount", "--lazy", m.to_str().unwrap()]);
        }
    }
}

/// Makes a sparse file of `size`, a btrfs on it, and loop-mounts it at `mnt`.
pub fn mount_btrfs(img: &Path, mnt: &Path, size: &str) {
    fs::create_dir_all(mnt).unwrap();
    sh(&["truncate", "-s", size, img.to_str().unwrap()]);
    sh(&["mkfs.btrfs", "-q", "-f", img.to_str().unwrap()]);
    sh(&["mount", "-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()]);
}

pub fn mount_tmpfs(mnt: &Path) {
    fs::create_dir_all(mnt).unwrap();
    sh(&["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", mnt.to_str().unwrap()]);
}

/// Times `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

pub fn median(values: &[Duration]) -> Duration {
    assert!(!values.is_empty());
    let mut v = values.to_vec();
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "12.3 ms" or "1.23 s".
pub fn fmt(d: Duration) -> String {
    let m = ms(d);
    if m >= 10_000.0 {
        format!("{:.2} s", m / 1000.0)
    } else {
        format!("{m:.1} ms")
    }
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::INFINITY
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

/// Runs the body, then the teardown whatever happened (panic included); exits non-zero on panic.
pub fn run_with_teardown(body: impl FnOnce() + std::panic::UnwindSafe, teardown: impl FnOnce()) {
    let result = std::panic::catch_unwind(body);
    teardown();
    if result.is_err() {
        eprintln!("bench failed (see above); everything it made was removed");
        std::process::exit(1);
    }
}

/// Kernel, CPU count and load: context for noisy numbers.
pub fn print_context() {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "host: kernel {}, {cpus} cpu(s), loadavg {}",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}
