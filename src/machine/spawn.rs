//! The hidden `__spawn-machine` entry of the binary: what a job machine's nspawn runs in, set up
//! by the process that then execs systemd-nspawn (started the same way by systemd-run and by the
//! plain host path, so both host kinds get the same machine).

use super::idmap::IdmappedOverlay;
use crate::error::{Error, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The argv[1] that selects this entry (not an argh subcommand: nobody types it).
pub const SPAWN_ARG: &str = "__spawn-machine";

/// What the starting stage writes to a gated wrapper's stdin once its record names the wrapper.
pub const GO: &[u8] = b"go";

/// What the wrapper does before it execs the program.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpawnPlan {
    /// Wait for `GO` on stdin before anything else; EOF instead (the stage that started it died
    /// before its record named it) ends the wrapper (plain hosts: write-ahead without a window).
    pub gated: bool,
    /// cgroups to move into (plain hosts; systemd places the unit itself).
    pub cgroups: Vec<PathBuf>,
    /// The idmapped overlay root to mount (plain stores in a user namespace): tree, job dir, base.
    pub overlay: Option<(PathBuf, PathBuf, u32)>,
}

impl SpawnPlan {
    /// The wrapper's command line for running `program args` (after the binary's own path).
    pub fn argv(&self, program: &str, args: &[String]) -> Vec<String> {
        let mut argv = vec![SPAWN_ARG.to_owned()];
        if self.gated {
            argv.push("--gated".to_owned());
        }
        for dir in &self.cgroups {
            argv.push("--cgroup".to_owned());
            argv.push(dir.display().to_string());
        }
        if let Some((tree, job_dir, base)) = &self.overlay {
            argv.extend(["--overlay".to_owned(), tree.display().to_string(), job_dir.display().to_string()]);
            argv.push(base.to_string());
        }
        argv.push("--".to_owned());
        argv.push(program.to_owned());
        argv.extend(args.iter().cloned());
        argv
    }

    /// Parses what `argv` made (everything after SPAWN_ARG), returning the plan and the command.
    fn parse(args: &[String]) -> Result<(SpawnPlan, &[String])> {
        let bad = || {
            Error::new(format!(
                "usage: nspawn-runner {SPAWN_ARG} [--gated] [--cgroup DIR]... [--overlay TREE JOB-DIR BASE] -- PROGRAM ARGS..."
            ))
        };
        let mut plan = SpawnPlan::default();
        let mut rest = args;
        loop {
            match rest {
                [flag, tail @ ..] if flag == "--gated" => {
                    plan.gated = true;
                    rest = tail;
                }
                [flag, dir, tail @ ..] if flag == "--cgroup" => {
                    plan.cgroups.push(PathBuf::from(dir));
                    rest = tail;
                }
                [flag, tree, job_dir, base, tail @ ..] if flag == "--overlay" => {
                    let base = base.parse().map_err(|_| bad())?;
                    plan.overlay = Some((PathBuf::from(tree), PathBuf::from(job_dir), base));
                    rest = tail;
                }
                [dashes, command @ ..] if dashes == "--" && !command.is_empty() => return Ok((plan, command)),
                _ => return Err(bad()),
            }
        }
    }
}

/// Entry point: set up, then exec the command; returns only on failure.
pub fn spawn_exe(args: &[String]) -> Result<std::convert::Infallible> {
    let (plan, command) = SpawnPlan::parse(args)?;
    if plan.gated {
        wait_for_go()?;
    }
    super::cgroup::join(&plan.cgroups)?;
    if let Some((tree, job_dir, base)) = &plan.overlay {
        IdmappedOverlay { tree, job_dir, base: *base }.mount()?;
    }
    let error = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    Err(Error::from(error).context(format!("executing {}", command[0])))
}

/// Reads the go from stdin, then points stdin at /dev/null for nspawn.
fn wait_for_go() -> Result<()> {
    use std::io::Read;
    let mut go = Vec::new();
    std::io::stdin().take(GO.len() as u64).read_to_end(&mut go)?;
    if go != GO {
        return Err(Error::new("the stage starting this machine went away before recording it; not starting"));
    }
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0)?;
    Ok(())
}

/// The root directory nspawn boots for a job with an idmapped overlay in `job_dir`.
pub fn overlay_root(job_dir: &Path) -> PathBuf {
    IdmappedOverlay::root(job_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_command_line_round_trips() {
        let plan = SpawnPlan {
            gated: true,
            cgroups: vec!["/sys/fs/cgroup/a".into(), "/sys/fs/cgroup/unified/a".into()],
            overlay: Some(("/s/img/1_2".into(), "/s/.jobs/run-7".into(), 0x7000_0000)),
        };
        let argv = plan.argv("systemd-nspawn", &["--boot".to_owned(), "--".to_owned()]);
        assert_eq!(argv[0], SPAWN_ARG);
        let (parsed, command) = SpawnPlan::parse(&argv[1..]).unwrap();
        assert_eq!(parsed, plan);
        assert_eq!(command, ["systemd-nspawn", "--boot", "--"]);
        assert!(SpawnPlan::parse(&["--overlay".to_owned(), "x".to_owned()]).is_err());
        assert!(SpawnPlan::parse(&["--".to_owned()]).is_err());
    }
}
