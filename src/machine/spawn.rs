//! The hidden `__spawn-machine` entry of the binary: what a job machine's nspawn runs in, set up
//! by the process that then execs systemd-nspawn (started the same way by systemd-run and by the
//! plain host path, so both host kinds get the same machine).

use super::idmap::IdmappedOverlay;
use crate::error::{Error, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The argv[1] that selects this entry (not an argh subcommand: nobody types it).
pub const SPAWN_ARG: &str = "__spawn-machine";

/// What the wrapper does before it execs the program.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpawnPlan {
    /// cgroups to move into (plain hosts; systemd places the unit itself).
    pub cgroups: Vec<PathBuf>,
    /// The idmapped overlay root to mount (plain stores in a user namespace): tree, job dir, base.
    pub overlay: Option<(PathBuf, PathBuf, u32)>,
}

impl SpawnPlan {
    /// The wrapper's command line for running `program args` (after the binary's own path).
    pub fn argv(&self, program: &str, args: &[String]) -> Vec<String> {
        let mut argv = vec![SPAWN_ARG.to_owned()];
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
                "usage: nspawn-runner {SPAWN_ARG} [--cgroup DIR]... [--overlay TREE JOB-DIR BASE] -- PROGRAM ARGS..."
            ))
        };
        let mut plan = SpawnPlan::default();
        let mut rest = args;
        loop {
            match rest {
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
    super::cgroup::join(&plan.cgroups)?;
    if let Some((tree, job_dir, base)) = &plan.overlay {
        IdmappedOverlay { tree, job_dir, base: *base }.mount()?;
    }
    let error = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    Err(Error::from(error).context(format!("executing {}", command[0])))
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
