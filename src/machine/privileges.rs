//! The privileges of a machine's init (capability sets, NoNewPrivs, rlimits, cgroups), read on the
//! host and given to an entered script before exec.

use crate::error::{Context, Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The capability sets and NoNewPrivs flag of a process, from /proc/PID/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl Capabilities {
    /// Those of process `pid`.
    pub fn of(pid: i32) -> Result<Capabilities> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading the status of machine process {pid}"))?;
        Capabilities::parse(&status)
    }

    fn parse(status: &str) -> Result<Capabilities> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| Error::new(format!("no {name} in the machine init's status")))
        };
        let hex = |name: &str| {
            field(name).and_then(|v| {
                u64::from_str_radix(v, 16).map_err(|_| Error::new(format!("bad {name} in the machine init's status")))
            })
        };
        Ok(Capabilities {
            inheritable: hex("CapInh")?,
            permitted: hex("CapPrm")?,
            effective: hex("CapEff")?,
            bounding: hex("CapBnd")?,
            ambient: hex("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }

    /// Makes them ours (in the forked child; async-signal-safe system calls only): the bounding
    /// set first (dropping needs CAP_SETPCAP), then the three sets, ambient, NoNewPrivs.
    pub fn apply(&self) -> std::io::Result<()> {
        for cap in 0..64u64 {
            if self.bounding & (1 << cap) == 0 {
                // EINVAL for capabilities this kernel does not know: nothing to drop.
                // SAFETY: prctl with integer arguments only.
                let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let low = |set: u64| set as u32;
        let high = |set: u64| (set >> 32) as u32;
        let data = [
            CapData {
                effective: low(self.effective),
                permitted: low(self.permitted),
                inheritable: low(self.inheritable),
            },
            CapData {
                effective: high(self.effective),
                permitted: high(self.permitted),
                inheritable: high(self.inheritable),
            },
        ];
        // SAFETY: capset with a valid header and two data structs (version 3).
        if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ambient = |op: libc::c_int, cap: u64| {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, op as libc::c_ulong, cap as libc::c_ulong, 0, 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        ambient(libc::PR_CAP_AMBIENT_CLEAR_ALL, 0)?;
        for cap in (0..64u64).filter(|c| self.ambient & (1 << c) != 0) {
            ambient(libc::PR_CAP_AMBIENT_RAISE, cap)?;
        }
        if self.no_new_privs {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Every resource limit (soft and hard) of a process.
#[derive(Debug, Clone)]
pub struct Limits(Vec<(u32, libc::rlimit64)>);

/// RLIMIT_CPU .. RLIMIT_RTTIME: the resources Linux knows.
const RESOURCES: u32 = 16;

impl Limits {
    /// Those of process `pid` (prlimit64 without a new value).
    pub fn of(pid: i32) -> Result<Limits> {
        let mut limits = Vec::new();
        for resource in 0..RESOURCES {
            let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: prlimit64 only reads the limit into `old`.
            if unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) } != 0 {
                return Err(Error::from(std::io::Error::last_os_error())
                    .context(format!("reading resource limit {resource} of machine process {pid}")));
            }
            limits.push((resource, old));
        }
        Ok(Limits(limits))
    }

    /// Makes them ours (in the forked child, before privileges are dropped).
    pub fn apply(&self) -> std::io::Result<()> {
        for (resource, limit) in &self.0 {
            // SAFETY: prlimit64 on ourselves with a valid new value.
            if unsafe { libc::prlimit64(0, *resource as _, limit, std::ptr::null_mut()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The directories of the cgroups process `pid` is in, one per hierarchy mounted here (cgroup
/// v2, and on a v1 or hybrid host each v1 hierarchy and the named systemd one).
pub fn cgroups_of(pid: i32) -> Result<Vec<PathBuf>> {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading the cgroups of machine process {pid}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounts = cgroup_mounts(&mountinfo);
    let mut dirs = Vec::new();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        match hierarchy_dir(&mounts, controllers, path) {
            Some(dir) => dirs.push(dir),
            None => log::debug!("cgroup hierarchy {controllers:?} is not mounted here"),
        }
    }
    Ok(dirs)
}

/// The `cgroup.procs` files of the cgroups `dirs`, opened for writing: writing "0" to each
/// moves the writer into that cgroup.
pub fn open_procs(dirs: &[PathBuf]) -> Result<Vec<File>> {
    dirs.iter()
        .map(|dir| {
            let procs = dir.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .with_context(|| format!("opening {} to join the machine's cgroup", procs.display()))
        })
        .collect()
}

/// A mounted cgroup hierarchy: its super options (v1, controllers among them; none for v2), the
/// hierarchy path of its root, and where it is mounted.
struct CgroupMount {
    v2: bool,
    options: Vec<String>,
    root: String,
    mount_point: PathBuf,
}

fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) = (left.get(3), left.get(4), right.first()) else {
            continue;
        };
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let options = right.get(2).map(|o| o.split(',').map(str::to_owned).collect()).unwrap_or_default();
        mounts.push(CgroupMount {
            v2,
            options,
            root: unescape(root),
            mount_point: PathBuf::from(unescape(mount_point)),
        });
    }
    mounts
}

/// The directory of hierarchy path `path` of the hierarchy with `controllers` ("" for v2).
fn hierarchy_dir(mounts: &[CgroupMount], controllers: &str, path: &str) -> Option<PathBuf> {
    let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
    // A v1 controller (or name=) is in one hierarchy only: the one whose options list it.
    let mount = mounts.iter().find(|m| {
        if wanted.is_empty() {
            m.v2
        } else {
            !m.v2 && wanted.iter().all(|c| m.options.iter().any(|o| o == c))
        }
    })?;
    let below = Path::new(path).strip_prefix(&mount.root).ok()?;
    Some(mount.mount_point.join(below))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_of_this_process_are_read_from_proc() {
        let me = std::process::id() as i32;
        let caps = Capabilities::of(me).unwrap();
        assert_eq!(caps.effective & !caps.permitted, 0);
        assert!(Capabilities::of(i32::MAX).is_err());
        assert!(Capabilities::parse("CapInh:\t0\n").is_err());
    }

    #[test]
    fn limits_of_this_process_are_read() {
        let limits = Limits::of(std::process::id() as i32).unwrap();
        assert_eq!(limits.0.len(), RESOURCES as usize);
    }

    #[test]
    fn hybrid_and_unified_hierarchies_are_found() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n\
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
33 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
34 25 0:30 /sub /mnt/with\\040space rw - cgroup cgroup rw,pids\n";
        let mounts = cgroup_mounts(mountinfo);
        let dir = |c: &str, p: &str| hierarchy_dir(&mounts, c, p);
        assert_eq!(dir("", "/m/init.scope"), Some("/sys/fs/cgroup/unified/m/init.scope".into()));
        assert_eq!(dir("memory", "/m"), Some("/sys/fs/cgroup/memory/m".into()));
        assert_eq!(dir("cpuacct,cpu", "/m"), Some("/sys/fs/cgroup/cpu,cpuacct/m".into()));
        assert_eq!(dir("name=systemd", "/m"), Some("/sys/fs/cgroup/systemd/m".into()));
        assert_eq!(dir("pids", "/sub/m"), Some("/mnt/with space/m".into()));
        assert_eq!(dir("pids", "/other"), None);
        assert_eq!(dir("devices", "/m"), None);
    }
}
