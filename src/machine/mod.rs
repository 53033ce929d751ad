//! Machine lifecycle: start a job's nspawn machine, run scripts in it, stop it.

pub mod cgroup;
pub mod chroot;
mod enter;
pub mod idmap;
mod notify;
pub mod nspawn;
mod plain;
mod privileges;
mod running;
mod script_cgroup;
pub mod seccomp;
pub mod spawn;
mod systemd;

use crate::error::{Context, Error, Result};
use crate::settings::{Settings, SystemdMode};
use crate::store::backend::JobRoot;
use crate::store::JobLeftovers;
use nspawn::{Bind, BootRoot, Nspawn};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use enter::{open_shell, run_script, ScriptOutcome};
pub use running::{process_start_time, Booting, Machine, Running};
pub use script_cgroup::end_leftover_scripts;
pub use seccomp::temp_path as seccomp_temp_path;

/// Everything needed to boot one job's machine.
pub struct MachineSpec<'s> {
    pub machine: String,
    /// The snapshot to boot (never written to).
    pub tree: PathBuf,
    pub root: JobRoot,
    /// The base of the job's uid range (root in the machine), or None for a privileged machine.
    pub uid_base: Option<u32>,
    /// Private directory for the job's writes (overlay upper dir lives in it).
    pub job_dir: Option<PathBuf>,
    /// What an aborted boot may leave in the store, for the host to delete.
    pub leftovers: JobLeftovers<'s>,
    pub binds: Vec<Bind>,
    /// systemd unit properties (systemd-host path only).
    pub properties: Vec<String>,
    /// The limits of the machine's own cgroup (plain host path only).
    pub limits: cgroup::Limits,
    /// Where the machine's console output goes (plain path).
    pub log: PathBuf,
    pub ready_timeout: Duration,
    /// How long a poweroff may take before the machine is killed.
    pub stop_timeout: Duration,
    /// The machine must not outlive the process that starts it (a health check's machine; a
    /// job's outlives its prepare stage). Plain hosts give nspawn SIGTERM when that process
    /// dies; a systemd unit cannot be tied to a process, so such a caller also gives it a
    /// `RuntimeMaxSec=` property. Either way nspawn then SIGKILLs the machine rather than
    /// powering it off, which a machine still booting would ignore.
    pub dies_with_caller: bool,
}

/// Saves the job's record with the machine as far as it is known.
pub type Save<'a> = dyn FnMut(&Machine) -> Result<()> + 'a;

/// The two worlds a runner host can be: systemd as PID 1 or not.
pub trait Host {
    /// Boots the machine and returns once it is ready, with `machine.running` set. Write-ahead:
    /// whatever it is about to start (the unit, nspawn, cgroups) goes into `machine` and through
    /// `save` before it may run, so that a stage killed at any instant (gitlab-runner's SIGKILL
    /// of the stage's process group) leaves a record that cleanup can stop.
    fn start(&self, spec: &MachineSpec, machine: &mut Machine, save: &mut Save) -> Result<()>;
    /// Stops the machine (gracefully, then by force after `timeout`); fine if it is gone.
    fn stop(&self, machine: &Machine, timeout: Duration) -> Result<()>;
    /// Saves the seccomp filters of the ready machine's init at `path`, for `run_script`; the
    /// same on both kinds of host.
    fn capture_seccomp(&self, running: &Running, path: &Path) -> Result<()> {
        enter::capture_seccomp(running, path)
    }
}

/// True when PID 1 is systemd (the same test as sd_booted(3)).
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Chooses the host path from the settings and what PID 1 is.
pub fn host(settings: &Settings) -> Box<dyn Host> {
    let use_systemd = match settings.systemd {
        SystemdMode::Yes => true,
        SystemdMode::No => false,
        SystemdMode::Auto => systemd_is_pid1(),
    };
    if use_systemd {
        Box::new(systemd::SystemdHost)
    } else {
        Box::new(plain::PlainHost)
    }
}

/// The unit a job machine runs in on a systemd host.
pub fn unit_name(machine: &str) -> String {
    format!("nspawn-runner-{machine}.service")
}

/// A PATH for programs we start: gitlab-runner's service environment may have almost none.
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// systemd-nspawn's command line for `spec`. `register` says whether machined is there.
fn nspawn_args(spec: &MachineSpec, register: bool) -> Vec<String> {
    let job_dir = spec.job_dir.clone().unwrap_or_default();
    let upper = job_dir.join("upper");
    let (tree, root) = match (spec.root, spec.uid_base) {
        (JobRoot::EphemeralSnapshot, _) => (spec.tree.clone(), BootRoot::Ephemeral),
        (JobRoot::Overlay, None) => (spec.tree.clone(), BootRoot::Overlay { upper: &upper }),
        // The spawn wrapper mounts the overlay itself: nspawn cannot idmap its own --overlay.
        (JobRoot::Overlay, Some(_)) => (spawn::overlay_root(&job_dir), BootRoot::Directory),
        (JobRoot::Volatile, _) => (spec.tree.clone(), BootRoot::Volatile),
    };
    let mut nspawn = Nspawn::boot(&spec.machine, &tree, root, register).binds(&spec.binds);
    if spec.dies_with_caller {
        nspawn = nspawn.killed_at_stop();
    }
    match spec.uid_base {
        Some(base) => nspawn.private_users(base, matches!(root, BootRoot::Ephemeral | BootRoot::Volatile)).into_args(),
        None => nspawn.into_args(),
    }
}

/// The command that starts `spec`'s nspawn: this binary's spawn wrapper (which waits for the go
/// on its stdin if `gated`, joins `cgroups` and mounts the idmapped overlay root if the job
/// needs one) exec'ing systemd-nspawn.
fn launch_command(
    spec: &MachineSpec,
    register: bool,
    cgroups: Vec<PathBuf>,
    gated: bool,
) -> Result<(PathBuf, Vec<String>)> {
    let overlay = match (spec.root, spec.uid_base, &spec.job_dir) {
        (JobRoot::Overlay, Some(base), Some(job_dir)) => Some((spec.tree.clone(), job_dir.clone(), base)),
        (JobRoot::Overlay, Some(_), None) => return Err(Error::new("an overlay job needs a job directory")),
        _ => None,
    };
    let exe = std::env::current_exe().context("locating this binary")?;
    let plan = spawn::SpawnPlan { gated, cgroups, overlay };
    Ok((exe, plan.argv("systemd-nspawn", &nspawn_args(spec, register))))
}

/// Waits until `done` is true, polling, for at most `timeout`; true if it became true.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Short: a machine usually goes within milliseconds, and cleanup's time is the job's.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The machines some process on the host runs right now, whatever any record says: the
/// `--machine=NAME` of every systemd-nspawn (and of the spawn wrapper about to become one).
/// Processes inside machines do not count: a job could name any machine in its arguments.
pub fn machines_running() -> HashSet<String> {
    use std::os::unix::fs::MetadataExt;
    let root_of = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let host_root = root_of(Path::new("/"));
    let mut names = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return names };
    for entry in entries.filter_map(|e| e.ok()) {
        let is_pid = entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit());
        if !is_pid || root_of(&entry.path().join("root")) != host_root {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let nspawn = args.first().is_some_and(|a| a.ends_with(b"systemd-nspawn"))
            || args.get(1).is_some_and(|a| *a == spawn::SPAWN_ARG.as_bytes());
        if nspawn {
            let named = args.iter().filter_map(|a| a.strip_prefix(b"--machine="));
            names.extend(named.map(|n| String::from_utf8_lossy(n).into_owned()));
        }
    }
    names
}

/// The first child of `pid` (nspawn's only child is the machine's init).
fn first_child(pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Describes the machine's processes, finding nspawn's ephemeral copy of the snapshot if any.
fn describe_running(nspawn_pid: i32, leader_pid: i32, spec: &MachineSpec) -> Result<Running> {
    let start = |pid| {
        process_start_time(pid).ok_or_else(|| Error::new(format!("machine {} died while starting", spec.machine)))
    };
    let ephemeral = match spec.root {
        JobRoot::EphemeralSnapshot => find_ephemeral_copy(leader_pid, &spec.tree)?,
        JobRoot::Overlay | JobRoot::Volatile => None,
    };
    Ok(Running {
        nspawn_pid,
        nspawn_start_time: start(nspawn_pid)?,
        leader_pid,
        leader_start_time: start(leader_pid)?,
        ephemeral,
        cgroup: None,
        cgroups: Vec::new(),
    })
}

/// nspawn names its copy `.#machine.<tree name><random>` beside the tree; the one whose root
/// is the machine's root directory (same device and inode) is ours.
fn find_ephemeral_copy(leader_pid: i32, tree: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata(format!("/proc/{leader_pid}/root"))
        .with_context(|| format!("looking at the root of machine process {leader_pid}"))?;
    let Some(parent) = tree.parent() else { return Ok(None) };
    let entries = std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?;
    for entry in entries.filter_map(|e| e.ok()) {
        if !entry.file_name().to_string_lossy().starts_with(crate::store::EPHEMERAL_PREFIX) {
            continue;
        }
        if let Ok(meta) = std::fs::symlink_metadata(entry.path()) {
            if meta.dev() == root.dev() && meta.ino() == root.ino() {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::names::{ImageName, JobId, SnapshotName};
    use crate::store::{backend, Store};

    fn args(root: JobRoot, uid_base: Option<u32>, register: bool) -> Vec<String> {
        let settings = Settings::from_vars([("NSPAWN_RUNNER_ROOT".to_owned(), "/store".to_owned())]).unwrap();
        let store = Store::with_backend(&settings, Box::new(backend::Plain));
        let (image, job) = (ImageName::parse("img").unwrap(), JobId::parse("7").unwrap());
        let spec = MachineSpec {
            machine: "run-7".into(),
            tree: "/store/img/1_2".into(),
            root,
            uid_base,
            job_dir: Some("/store/.jobs/run-7".into()),
            leftovers: store.job_leftovers(&image, &SnapshotName::new(1, 2), &job),
            binds: vec![
                Bind::read_write("/var/cache/a:b", "/cache"),
                Bind::read_only("/usr/bin/gitlab-runner", "/usr/local/bin/gitlab-runner"),
            ],
            properties: vec![],
            limits: cgroup::Limits::default(),
            log: "/run/x.log".into(),
            ready_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            dies_with_caller: false,
        };
        nspawn_args(&spec, register)
    }

    #[test]
    fn btrfs_jobs_boot_an_ephemeral_snapshot_of_the_target_tree() {
        let args = args(JobRoot::EphemeralSnapshot, None, false);
        assert!(args.contains(&"--ephemeral".to_owned()));
        assert!(args.contains(&"--directory=/store/img/1_2".to_owned()));
        assert!(args.contains(&"--register=no".to_owned()));
        assert!(args.contains(&"--machine=run-7".to_owned()));
        assert!(args.contains(&"--notify-ready=yes".to_owned()));
        assert!(args.contains(&"--suppress-sync=yes".to_owned()));
        assert!(!args.iter().any(|a| a.starts_with("--overlay")));
    }

    #[test]
    fn plain_jobs_boot_an_overlay_with_escaped_paths() {
        let args = args(JobRoot::Overlay, None, true);
        assert!(args.contains(&"--overlay=/store/img/1_2:/store/.jobs/run-7/upper:/".to_owned()));
        assert!(args.contains(&"--bind=/var/cache/a\\:b:/cache".to_owned()));
        assert!(args.contains(&"--bind-ro=/usr/bin/gitlab-runner:/usr/local/bin/gitlab-runner".to_owned()));
        assert!(args.contains(&"--register=yes".to_owned()));
        assert!(!args.contains(&"--ephemeral".to_owned()));
    }

    #[test]
    fn jobs_in_a_user_namespace_get_their_range_and_idmapped_binds() {
        let btrfs = args(JobRoot::EphemeralSnapshot, Some(0x7001_0000), false);
        assert!(btrfs.contains(&"--private-users=1879113728:65536".to_owned()), "{btrfs:?}");
        assert!(btrfs.contains(&"--private-users-ownership=map".to_owned()));
        let plain = args(JobRoot::Overlay, Some(0x7000_0000), false);
        assert!(plain.contains(&"--directory=/store/.jobs/run-7/root".to_owned()), "{plain:?}");
        assert!(plain.contains(&"--private-users-ownership=off".to_owned()));
        assert!(!plain.iter().any(|a| a.starts_with("--overlay") || a == "--ephemeral"));
    }

    #[test]
    fn unit_names_follow_the_machine() {
        assert_eq!(unit_name("run-7"), "nspawn-runner-run-7.service");
    }
}
