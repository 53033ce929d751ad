//! Admin commands besides images: stage symlinks, job status, the config.toml snippet.

mod build;
pub mod image;
mod maintain;

pub use maintain::{chroot_exe, CHROOT_EXE_NAME};

use crate::error::{Context, Error, Result};
use crate::jobs::state::{unix_now, StateDir};
use crate::names::JobId;
use crate::settings::Settings;
use std::path::Path;

/// Makes `dir/<stage>` symlinks to this binary, replacing old ones atomically.
pub fn install_links(dir: &Path, stages: &[&str]) -> Result<()> {
    let binary = std::env::current_exe().context("locating this binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for stage in stages {
        let link = dir.join(stage);
        let temp = dir.join(format!(".{stage}.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(&binary, &temp).with_context(|| format!("creating {}", temp.display()))?;
        std::fs::rename(&temp, &link).with_context(|| format!("creating {}", link.display()))?;
        println!("{} -> {}", link.display(), binary.display());
    }
    Ok(())
}

/// Prints every job machine with its image, snapshot and whether it still runs.
pub fn status() -> Result<()> {
    let settings = Settings::from_env()?;
    let states = StateDir::new(&settings).all()?;
    if states.is_empty() {
        println!("no job machines");
        return Ok(());
    }
    println!("{:<12} {:<16} {:<20} {:<24} {:<8} unit", "job", "machine", "image", "snapshot", "state");
    let now = unix_now();
    for (state, busy) in states {
        let condition = match (state.condition(busy), state.kept_until) {
            ("kept", Some(until)) => format!("kept, {}m left", until.saturating_sub(now).div_ceil(60)),
            (condition, _) => condition.to_owned(),
        };
        println!(
            "{:<12} {:<16} {:<20} {:<24} {:<8} {}",
            state.job_id,
            state.machine.name,
            state.image,
            state.snapshot,
            condition,
            state.machine.unit.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// `shell JOB [-- CMD...]`: a root shell (or CMD) in the job's machine; returns its exit code.
pub fn shell(args: &[String]) -> Result<i32> {
    let (job, command) = args.split_first().ok_or_else(|| Error::new("give a job id"))?;
    let job = JobId::parse(job)?;
    // argh keeps the `--` that separates the command from the job id.
    let command = match command.split_first() {
        None => command,
        Some((dashes, rest)) if dashes == "--" => rest,
        Some((stray, _)) => return Err(Error::new(format!("unexpected {stray:?}: put a command after `--`"))),
    };
    let settings = Settings::from_env()?;
    let state = StateDir::new(&settings)
        .load(&job)?
        .ok_or_else(|| Error::new(format!("job {job} has no machine (not running, not kept)")))?;
    let running = state
        .machine
        .running
        .as_ref()
        .filter(|r| r.leader_alive())
        .ok_or_else(|| Error::new(format!("job {job}: machine {} is not running", state.machine.name)))?;
    crate::machine::open_shell(running, &StateDir::new(&settings).seccomp_path(&job), command)
}

/// The `[[runners]]` snippet for config.toml, pointing at the stage symlinks in `links`.
pub fn toml_snippet(links: &Path) -> Result<String> {
    let links = links.to_str().ok_or_else(|| Error::new("the links directory is not UTF-8"))?;
    Ok(TOML_TEMPLATE.replace("/usr/lib/nspawn-runner", links))
}

/// The example shipped in contrib/ is the very text `nspawn-runner toml` prints.
const TOML_TEMPLATE: &str = include_str!("../../contrib/config.toml.example");

pub fn toml(links: &Path) -> Result<()> {
    print!("{}", toml_snippet(links)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_points_at_the_stage_links() {
        let text = toml_snippet(Path::new("/opt/nr")).unwrap();
        for stage in ["config", "prepare", "run", "cleanup"] {
            assert!(text.contains(&format!("{stage}_exec = \"/opt/nr/{stage}\"")), "{stage} missing in {text}");
        }
        assert!(text.contains("executor = \"custom\""));
    }
}
