//! Per-machine cgroups on hosts without systemd as PID 1: one below nspawn-runner's own in every
//! hierarchy that matters (unified v2, or the hybrid v1 layout), with the configured limits.

use crate::error::{Context, Error, Result};
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The limits a machine's cgroup gets (the NSPAWN_RUNNER_* values, systemd's syntax).
#[derive(Debug, Default, Clone)]
pub struct Limits {
    pub memory_max: Option<String>,
    pub tasks_max: Option<String>,
    pub cpu_weight: Option<String>,
}

/// One limit in one hierarchy: the file to write and its value.
#[derive(Debug, PartialEq, Eq)]
struct Setting {
    controller: &'static str,
    file: &'static str,
    value: String,
}

/// How this host's cgroups are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// /sys/fs/cgroup is cgroup2.
    Unified,
    /// v1 controllers, name=systemd at /sys/fs/cgroup/systemd, maybe an empty v2 at .../unified.
    Hybrid,
}

fn layout() -> Layout {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        Layout::Unified
    } else {
        Layout::Hybrid
    }
}

/// The cgroup name of `machine` (below nspawn-runner's own cgroup in each hierarchy).
pub fn leaf_name(machine: &str) -> String {
    format!("nspawn-runner-{machine}")
}

/// `value` with a K/M/G/T suffix (powers of 1024) or `infinity`, in bytes; `None` for infinity.
fn parse_bytes(value: &str) -> Result<Option<u64>> {
    if value == "infinity" {
        return Ok(None);
    }
    let (digits, shift) = match value.char_indices().last() {
        Some((i, 'K')) => (&value[..i], 10),
        Some((i, 'M')) => (&value[..i], 20),
        Some((i, 'G')) => (&value[..i], 30),
        Some((i, 'T')) => (&value[..i], 40),
        _ => (value, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .map(Some)
        .ok_or_else(|| Error::new(format!("NSPAWN_RUNNER_MEMORY_MAX={value}: without systemd only bytes with K, M, G or T, or infinity, can be applied")))
}

/// What the limits are in `layout`'s files.
fn settings(limits: &Limits, layout: Layout) -> Result<Vec<Setting>> {
    let mut out = Vec::new();
    if let Some(memory) = &limits.memory_max {
        let bytes = parse_bytes(memory)?;
        let (file, unlimited) = match layout {
            Layout::Unified => ("memory.max", "max".to_owned()),
            Layout::Hybrid => ("memory.limit_in_bytes", "-1".to_owned()),
        };
        out.push(Setting { controller: "memory", file, value: bytes.map_or(unlimited, |b| b.to_string()) });
    }
    if let Some(tasks) = &limits.tasks_max {
        let value = match tasks.as_str() {
            "infinity" => "max".to_owned(),
            n => n.parse::<u64>().map(|n| n.to_string()).map_err(|_| {
                Error::new(format!(
                    "NSPAWN_RUNNER_TASKS_MAX={n}: without systemd only a number or infinity can be applied"
                ))
            })?,
        };
        out.push(Setting { controller: "pids", file: "pids.max", value });
    }
    if let Some(weight) = &limits.cpu_weight {
        let w = weight.parse::<u64>().ok().filter(|w| (1..=10000).contains(w)).ok_or_else(|| {
            Error::new(format!("NSPAWN_RUNNER_CPU_WEIGHT={weight}: must be a number from 1 to 10000"))
        })?;
        out.push(match layout {
            Layout::Unified => Setting { controller: "cpu", file: "cpu.weight", value: w.to_string() },
            // systemd's mapping of CPUWeight= to cpu.shares: 100 is 1024.
            Layout::Hybrid => {
                Setting { controller: "cpu", file: "cpu.shares", value: (w * 1024 / 100).max(2).to_string() }
            }
        });
    }
    Ok(out)
}

/// The path of this process's cgroup in the hierarchy `wanted` ("" for v2, else a v1
/// controller or `name=systemd`), from /proc/self/cgroup.
fn own_path(wanted: &str) -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|c| c == wanted)
                .then(|| path.to_owned())
                .or_else(|| (wanted.is_empty() && controllers.is_empty()).then(|| path.to_owned()))
        })
        .next()
        .ok_or_else(|| Error::new(format!("this process is in no cgroup of hierarchy {wanted:?}")))
}

/// `mount` + `path`, refusing anything that would leave the mount.
fn below(mount: &Path, path: &str) -> Result<PathBuf> {
    let relative = path.trim_start_matches('/');
    if relative.split('/').any(|c| c == "..") {
        return Err(Error::new(format!("odd cgroup path {path:?}")));
    }
    Ok(if relative.is_empty() { mount.to_path_buf() } else { mount.join(relative) })
}

/// A machine's cgroups, made by `create` and removed by `remove`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineCgroups {
    /// The directories, the one nspawn's payload lives in (the main hierarchy) first.
    pub dirs: Vec<PathBuf>,
    /// The main one's path relative to its hierarchy's root (what /proc/PID/cgroup says).
    pub main: String,
}

/// Makes `machine`'s cgroups and applies `limits`; a limit the host cannot apply is an error
/// (and nothing is left behind). `record` gets their paths before the first one is made
/// (write-ahead: a stage killed meanwhile leaves a record naming them), and may refuse.
pub fn create(
    machine: &str,
    limits: &Limits,
    record: impl FnOnce(&MachineCgroups) -> Result<()>,
) -> Result<MachineCgroups> {
    let layout = layout();
    let wanted = settings(limits, layout)?;
    let leaf = leaf_name(machine);
    let root = Path::new(CGROUP_ROOT);
    // Every directory, and where each limit goes, before anything is made.
    let mut planned = MachineCgroups { dirs: Vec::new(), main: String::new() };
    let mut placed = Vec::new();
    match layout {
        Layout::Unified => {
            planned.main = format!("{}/{leaf}", own_path("")?.trim_end_matches('/'));
            let dir = below(root, &own_path("")?)?.join(&leaf);
            placed.extend(wanted.iter().map(|setting| (dir.clone(), setting)));
            planned.dirs.push(dir);
        }
        Layout::Hybrid => {
            let main = own_path("name=systemd")?;
            planned.main = format!("{}/{leaf}", main.trim_end_matches('/'));
            planned.dirs.push(below(&root.join("systemd"), &main)?.join(&leaf));
            if root.join("unified/cgroup.procs").exists() {
                planned.dirs.push(below(&root.join("unified"), &own_path("")?)?.join(&leaf));
            }
            for setting in &wanted {
                let mount = root.join(setting.controller);
                if !mount.join("cgroup.procs").exists() {
                    return Err(no_controller(setting.controller));
                }
                let dir = below(&mount, &own_path(setting.controller)?)?.join(&leaf);
                if !planned.dirs.contains(&dir) {
                    planned.dirs.push(dir.clone());
                }
                placed.push((dir, setting));
            }
        }
    }
    record(&planned)?;
    let made = (|| {
        for dir in &planned.dirs {
            make_dir(dir)?;
        }
        if layout == Layout::Unified {
            let mut controllers: Vec<&str> = wanted.iter().map(|s| s.controller).collect();
            controllers.dedup();
            let parent = planned.dirs.first().and_then(|d| d.parent()).unwrap_or(root);
            for controller in controllers {
                enable_controller(parent, controller)?;
            }
        }
        placed.iter().try_for_each(|(dir, setting)| write_setting(dir, setting))
    })();
    match made {
        Ok(()) => Ok(planned),
        Err(e) => {
            let _ = remove(&planned.dirs);
            Err(e)
        }
    }
}

fn no_controller(controller: &str) -> Error {
    let variable = match controller {
        "memory" => "NSPAWN_RUNNER_MEMORY_MAX",
        "pids" => "NSPAWN_RUNNER_TASKS_MAX",
        _ => "NSPAWN_RUNNER_CPU_WEIGHT",
    };
    Error::new(format!("{variable} is set, but this host has no {controller} cgroup controller to apply it"))
}

fn make_dir(dir: &Path) -> Result<PathBuf> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(Error::from(e).context(format!("creating cgroup {}", dir.display())))
        }
        _ => Ok(dir.to_path_buf()),
    }
}

/// Makes `controller` available to the children of `parent` (v2).
fn enable_controller(parent: &Path, controller: &str) -> Result<()> {
    let available = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == controller) {
        return Err(no_controller(controller));
    }
    let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    std::fs::write(parent.join("cgroup.subtree_control"), format!("+{controller}")).map_err(|e| {
        Error::new(format!(
            "{} (cannot enable the {controller} controller in {}: {e}; a cgroup with processes cannot delegate controllers)",
            no_controller(controller),
            parent.display()
        ))
    })
}

fn write_setting(dir: &Path, setting: &Setting) -> Result<()> {
    let file = dir.join(setting.file);
    std::fs::write(&file, &setting.value).with_context(|| format!("writing {} to {}", setting.value, file.display()))
}

/// Moves the calling process into every one of `dirs` (the spawn wrapper, before it execs nspawn).
pub fn join(dirs: &[PathBuf]) -> Result<()> {
    for dir in dirs {
        std::fs::write(dir.join("cgroup.procs"), "0").with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// Removes machine cgroups (and what the machine made below them), deepest first, killing
/// what still runs in them: once the machine's nspawn and init are gone, that is only what the
/// machine left (a half-started child of a killed boot). Only directories named like ours on a
/// cgroup file system are touched: the list may come from a state file.
pub fn remove(dirs: &[PathBuf]) -> Result<()> {
    for dir in dirs {
        let ours = dir.starts_with(CGROUP_ROOT)
            && dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nspawn-runner-"))
            && !dir.components().any(|c| c == std::path::Component::ParentDir)
            && is_cgroupfs(dir);
        if !ours {
            if dir.exists() {
                log::warn!("not removing {}: not a machine cgroup", dir.display());
            }
            continue;
        }
        kill_all(dir);
        remove_tree(dir)?;
    }
    Ok(())
}

/// SIGKILLs every process in `dir` and below: `cgroup.kill` (v2, Linux 5.14) does it at once,
/// race-free; elsewhere each listed process is killed.
fn kill_all(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_all(&entry.path());
            }
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

fn is_cgroupfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|fs| {
        fs.filesystem_type() == nix::sys::statfs::CGROUP_SUPER_MAGIC
            || fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC
    })
}

/// rmdir of `dir` after its child cgroups (cgroup files cannot and need not be deleted).
fn remove_tree(dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    // A killed machine's last processes may take a moment to leave: EBUSY until then.
    let mut result = Ok(());
    super::wait_until(std::time::Duration::from_secs(2), || {
        result = match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        result.is_ok()
    });
    result.map_err(|e| Error::from(e).context(format!("removing cgroup {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: Option<&str>, tasks: Option<&str>, cpu: Option<&str>) -> Limits {
        Limits {
            memory_max: memory.map(str::to_owned),
            tasks_max: tasks.map(str::to_owned),
            cpu_weight: cpu.map(str::to_owned),
        }
    }

    #[test]
    fn limits_become_the_files_of_each_layout() {
        let v2 = settings(&limits(Some("2G"), Some("512"), Some("50")), Layout::Unified).unwrap();
        let values: Vec<(&str, &str)> = v2.iter().map(|s| (s.file, s.value.as_str())).collect();
        assert_eq!(values, [("memory.max", "2147483648"), ("pids.max", "512"), ("cpu.weight", "50")]);
        let v1 = settings(&limits(Some("infinity"), Some("infinity"), Some("100")), Layout::Hybrid).unwrap();
        let values: Vec<(&str, &str)> = v1.iter().map(|s| (s.file, s.value.as_str())).collect();
        assert_eq!(values, [("memory.limit_in_bytes", "-1"), ("pids.max", "max"), ("cpu.shares", "1024")]);
        assert!(settings(&Limits::default(), Layout::Unified).unwrap().is_empty());
    }

    #[test]
    fn limits_that_cannot_be_applied_are_one_line_errors() {
        for bad in [limits(Some("50%"), None, None), limits(None, Some("10%"), None), limits(None, None, Some("0"))] {
            let e = settings(&bad, Layout::Unified).unwrap_err().to_string();
            assert!(e.starts_with("NSPAWN_RUNNER_") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn paths_from_proc_never_leave_the_mount() {
        assert_eq!(below(Path::new("/sys/fs/cgroup"), "/").unwrap(), Path::new("/sys/fs/cgroup"));
        assert_eq!(below(Path::new("/sys/fs/cgroup"), "/a/b").unwrap(), Path::new("/sys/fs/cgroup/a/b"));
        assert!(below(Path::new("/sys/fs/cgroup"), "/a/../../etc").is_err());
    }

    #[test]
    fn only_machine_cgroups_are_removed() {
        let decoy = std::env::temp_dir().join(format!("nspawn-runner-decoy-{}", std::process::id()));
        std::fs::create_dir_all(decoy.join("child")).unwrap();
        remove(std::slice::from_ref(&decoy)).unwrap();
        assert!(decoy.join("child").is_dir(), "a directory outside cgroupfs was removed");
        std::fs::remove_dir_all(&decoy).unwrap();
    }
}
