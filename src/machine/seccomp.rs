//! The seccomp filters of a machine's init: read once at prepare with ptrace, kept in the state
//! dir, and loaded into every entered script as the last step before exec.

use crate::error::{Context, Error, Result};
use std::path::{Path, PathBuf};

/// PTRACE_SECCOMP_GET_FILTER (linux/ptrace.h); not in the libc crate.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// The kernel's limit on instructions per filter (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// One instruction in the file: code (u16), jt, jf (u8), k (u32), little or native endian.
const INSN_BYTES: usize = 8;

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// The classic BPF programs of a process's seccomp filters, oldest first (the order they were
/// loaded in, so loading them again gives the same stack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters(Vec<Vec<Insn>>);

impl Filters {
    /// Reads the filters of `pid` (which must not be our child): PTRACE_SEIZE, PTRACE_INTERRUPT,
    /// one PTRACE_SECCOMP_GET_FILTER per filter, detach. Needs CAP_SYS_ADMIN.
    pub fn capture(pid: i32) -> Result<Filters> {
        let context = || format!("reading the seccomp filter of machine process {pid}");
        // SAFETY: ptrace requests with integer arguments; the buffers below are sized by the kernel's answer.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) != 0 {
                return Err(Error::from(std::io::Error::last_os_error()).context(context()));
            }
        }
        let filters = Self::read_stopped(pid).map_err(|e| e.context(context()));
        // SAFETY: as above; detaching resumes the process.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
        filters
    }

    fn read_stopped(pid: i32) -> Result<Filters> {
        // SAFETY: ptrace and waitpid with integer arguments and a valid status pointer.
        unsafe {
            if libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut status = 0;
            if libc::waitpid(pid, &mut status, libc::__WALL) != pid {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let mut filters = Vec::new();
        for index in 0.. {
            // SAFETY: a null buffer asks for the length of filter `index`.
            let len = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as libc::c_long, 0) };
            if len < 0 {
                let e = std::io::Error::last_os_error();
                // ENOENT past the last filter; EINVAL when the process has none at all.
                match e.raw_os_error() {
                    Some(libc::ENOENT) => break,
                    Some(libc::EINVAL) if index == 0 => break,
                    _ => return Err(e.into()),
                }
            }
            let mut program = vec![Insn { code: 0, jt: 0, jf: 0, k: 0 }; len as usize];
            // SAFETY: the buffer holds `len` instructions, as the kernel said.
            let got =
                unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as libc::c_long, program.as_mut_ptr()) };
            if got != len {
                return Err(Error::new(format!("filter {index} changed while being read")));
            }
            filters.push(program);
        }
        // Index 0 is the most recently installed filter.
        filters.reverse();
        Ok(Filters(filters))
    }

    /// Writes them to `path` (mode 0600, replaced atomically; a failed write leaves nothing).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        for program in &self.0 {
            bytes.extend_from_slice(&(program.len() as u32).to_ne_bytes());
            for insn in program {
                bytes.extend_from_slice(&insn.code.to_ne_bytes());
                bytes.extend_from_slice(&[insn.jt, insn.jf]);
                bytes.extend_from_slice(&insn.k.to_ne_bytes());
            }
        }
        crate::store::write_atomically(path, &temp_path(path), &bytes)
    }

    /// Reads what `save` wrote.
    pub fn load(path: &Path) -> Result<Filters> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading the machine's seccomp filter {}", path.display()))?;
        Filters::parse(&bytes).ok_or_else(|| Error::new(format!("corrupt seccomp filter file {}", path.display())))
    }

    fn parse(mut bytes: &[u8]) -> Option<Filters> {
        let mut filters = Vec::new();
        while !bytes.is_empty() {
            let (len, rest) = bytes.split_first_chunk::<4>()?;
            let len = u32::from_ne_bytes(*len) as usize;
            if len == 0 || len > MAX_INSNS || rest.len() < len * INSN_BYTES {
                return None;
            }
            let (program, rest) = rest.split_at(len * INSN_BYTES);
            let program = program
                .chunks_exact(INSN_BYTES)
                .map(|i| Insn {
                    code: u16::from_ne_bytes([i[0], i[1]]),
                    jt: i[2],
                    jf: i[3],
                    k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
                })
                .collect();
            filters.push(program);
            bytes = rest;
        }
        Some(Filters(filters))
    }

    /// Installs them on the calling thread, oldest first (in the forked child, as the last step
    /// before exec: needs NoNewPrivs or CAP_SYS_ADMIN).
    pub fn apply(&self) -> std::io::Result<()> {
        for program in &self.0 {
            let fprog =
                libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
            // SAFETY: seccomp(2) with a valid program that outlives the call.
            let r = unsafe {
                libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog as *const libc::sock_fprog)
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Where `Filters::save` writes before it renames into `path` (a stage killed meanwhile leaves it).
pub fn temp_path(path: &Path) -> PathBuf {
    path.with_extension("seccomp.tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_round_trip_through_their_file() {
        let insn = |code, k| Insn { code, jt: 1, jf: 2, k };
        let filters = Filters(vec![vec![insn(0x20, 4), insn(0x06, 0x7fff_0000)], vec![insn(0x06, 0)]]);
        let dir = std::env::temp_dir().join(format!("seccomp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("7.seccomp");
        filters.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Filters::load(&path).unwrap(), filters);
        std::fs::write(&path, [1, 0, 0, 0, 9]).unwrap();
        assert!(Filters::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
