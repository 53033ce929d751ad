//! Admin commands besides images: stage symlinks, job status, the config.toml snippet.

mod build;
mod check;
pub mod image;
mod maintain;

pub use maintain::{chroot_exe, CHROOT_EXE_NAME};

use crate::error::{Context, Error, Result};
use crate::jobs::state::{unix_now, StateDir};
use crate::names::JobId;
use crate::settings::{Loaded, Settings};
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

/// A duration in seconds as `image list` and `status` show it: 5s, 10m, 2h, 11d.
pub(crate) fn format_age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints every job machine with its image, snapshot, state and age (since its prepare); JSON
/// with `json`.
pub fn status(settings: &Settings, json: bool) -> Result<()> {
    let states = StateDir::new(settings).all()?;
    let now = unix_now();
    let rows: Vec<serde_json::Value> = states
        .iter()
        .map(|(state, busy)| {
            serde_json::json!({
                "job": state.job_id.as_str(),
                "machine": state.machine.name,
                "image": state.image.as_str(),
                "snapshot": state.snapshot.to_string(),
                "state": match (state.condition(*busy), state.kept_until) {
                    ("kept", Some(until)) => format!("kept, {}m left", until.saturating_sub(now).div_ceil(60)),
                    (condition, _) => condition.to_owned(),
                },
                "kept_until": state.kept_until,
                "phase": state.phase.as_str(),
                "age_seconds": state.age(now),
                "unit": state.machine.unit,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no job machines");
        return Ok(());
    }
    println!("{:<12} {:<16} {:<20} {:<24} {:<8} {:>6}  unit", "job", "machine", "image", "snapshot", "state", "age");
    for row in rows {
        let text = |key: &str| row[key].as_str().unwrap_or("-").to_owned();
        let age = row["age_seconds"].as_u64().map(format_age).unwrap_or_else(|| "-".to_owned());
        println!(
            "{:<12} {:<16} {:<20} {:<24} {:<8} {:>6}  {}",
            text("job"),
            text("machine"),
            text("image"),
            text("snapshot"),
            text("state"),
            age,
            text("unit")
        );
    }
    Ok(())
}

/// `shell JOB [-- CMD...]`: a root shell (or CMD) in the job's machine; returns its exit code.
pub fn shell(settings: &Settings, args: &[String]) -> Result<i32> {
    let (job, command) = args.split_first().ok_or_else(|| Error::new("give a job id"))?;
    let job = JobId::parse(job)?;
    // argh keeps the `--` that separates the command from the job id.
    let command = match command.split_first() {
        None => command,
        Some((dashes, rest)) if dashes == "--" => rest,
        Some((stray, _)) => return Err(Error::new(format!("unexpected {stray:?}: put a command after `--`"))),
    };
    let state = StateDir::new(settings)
        .load(&job)?
        .ok_or_else(|| Error::new(format!("job {job} has no machine (not running, not kept)")))?;
    let running = state
        .machine
        .running
        .as_ref()
        .filter(|r| r.leader_alive())
        .ok_or_else(|| Error::new(format!("job {job}: machine {} is not running", state.machine.name)))?;
    crate::machine::open_shell(running, &StateDir::new(settings).seccomp_path(&job), command)
}

/// Prints each setting in effect and where it came from.
pub fn print_settings(loaded: &Loaded) -> Result<()> {
    let (file, exists) = &loaded.file;
    println!("# settings file: {}{}", file.display(), if *exists { "" } else { " (absent: defaults apply)" });
    let lines: Vec<(String, String)> = loaded
        .entries()?
        .into_iter()
        .map(|(name, value, source)| (format!("{name}={}", value.unwrap_or_default()), source.to_string()))
        .collect();
    let width = lines.iter().map(|(setting, _)| setting.len()).max().unwrap_or(0);
    for (setting, source) in lines {
        println!("{setting:<width$}  # {source}");
    }
    Ok(())
}

/// Timeouts of the `[runners.custom]` entry, in seconds, sized from the settings so that
/// gitlab-runner never kills a stage that is still within nspawn-runner's own limits.
struct Timeouts {
    prepare: u64,
    cleanup: u64,
    graceful_kill: u64,
    force_kill: u64,
}

/// Slack for the work around the waits (state files, deleting a job's copy).
const TIMEOUT_MARGIN: u64 = 60;

impl Timeouts {
    fn new(settings: &Settings) -> Timeouts {
        let (boot, stop, lock) = (settings.prepare_timeout, settings.stop_timeout, settings.lock_timeout);
        // prepare may wait for the job's lock (a cleanup: boot + stop), clean an earlier attempt
        // (stop), wait for the image's pin lock (gc: the lock timeout), then boot.
        let job_lock = boot + stop;
        Timeouts {
            prepare: job_lock + stop + lock + boot + TIMEOUT_MARGIN,
            // cleanup may wait for the job's lock, then a poweroff and a kill.
            cleanup: job_lock + 2 * stop + TIMEOUT_MARGIN,
            // A cancelled run stage SIGKILLs its script after the stop timeout, then exits.
            graceful_kill: stop + 20,
            force_kill: 10,
        }
    }
}

/// The complete `[[runners]]` entry for config.toml, pointing at the stage links in `links`,
/// and the `gitlab-runner register` command that makes the same entry.
pub fn toml_snippet(links: &Path, settings: &Settings) -> Result<String> {
    let links = links.to_str().ok_or_else(|| Error::new("the links directory is not UTF-8"))?;
    let t = Timeouts::new(settings);
    let builds = &settings.builds_dir;
    let cache = crate::settings::CACHE_DIR_IN_MACHINE;
    Ok(format!(
        r#"# /etc/gitlab-runner/config.toml entry for nspawn-runner ("nspawn-runner toml" prints
# it for the settings in effect; the timeouts follow NSPAWN_RUNNER_PREPARE_TIMEOUT,
# NSPAWN_RUNNER_STOP_TIMEOUT and NSPAWN_RUNNER_LOCK_TIMEOUT). url and token come
# from your GitLab. Or let gitlab-runner write it:
#
#   gitlab-runner register --non-interactive --url https://gitlab.example.com/ \
#     --token REPLACE-WITH-THE-RUNNER-TOKEN --name nspawn-runner --executor custom \
#     --shell bash --builds-dir {builds} --cache-dir {cache} \
#     --env DEBIAN_FRONTEND=noninteractive \
#     --custom-config-exec {links}/config --custom-prepare-exec {links}/prepare \
#     --custom-run-exec {links}/run --custom-cleanup-exec {links}/cleanup \
#     --custom-prepare-exec-timeout {prepare} --custom-cleanup-exec-timeout {cleanup} \
#     --custom-graceful-kill-timeout {graceful} --custom-force-kill-timeout {force}
#
# nspawn-runner's own settings go to /etc/nspawn-runner/settings, not to
# environment = [...] below: gitlab-runner hands those to the executor as
# CUSTOM_ENV_*, where jobs could override them.

[[runners]]
  name = "nspawn-runner"
  url = "https://gitlab.example.com/"
  token = "REPLACE-WITH-THE-RUNNER-TOKEN"
  executor = "custom"
  shell = "bash"
  builds_dir = "{builds}"
  cache_dir = "{cache}"
  # Variables for every job (inside the machine), not for nspawn-runner.
  environment = ["DEBIAN_FRONTEND=noninteractive"]
  [runners.custom]
    config_exec = "{links}/config"
    prepare_exec = "{links}/prepare"
    run_exec = "{links}/run"
    cleanup_exec = "{links}/cleanup"
    prepare_exec_timeout = {prepare}
    cleanup_exec_timeout = {cleanup}
    graceful_kill_timeout = {graceful}
    force_kill_timeout = {force}
"#,
        prepare = t.prepare,
        cleanup = t.cleanup,
        graceful = t.graceful_kill,
        force = t.force_kill,
    ))
}

pub fn toml(links: &Path, settings: &Settings) -> Result<()> {
    print!("{}", toml_snippet(links, settings)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings::from_vars(Vec::new()).unwrap()
    }

    #[test]
    fn toml_points_at_the_stage_links() {
        let text = toml_snippet(Path::new("/opt/nr"), &defaults()).unwrap();
        for stage in ["config", "prepare", "run", "cleanup"] {
            assert!(text.contains(&format!("{stage}_exec = \"/opt/nr/{stage}\"")), "{stage} missing in {text}");
            assert!(text.contains(&format!("--custom-{stage}-exec /opt/nr/{stage}")), "{stage} missing in {text}");
        }
        assert!(text.contains("executor = \"custom\"") && text.contains("shell = \"bash\""));
        assert!(text.contains("gitlab-runner register --non-interactive"));
    }

    #[test]
    fn toml_timeouts_cover_the_waits_of_the_settings() {
        let settings = Settings::from_vars([
            ("NSPAWN_RUNNER_PREPARE_TIMEOUT".to_owned(), "300".to_owned()),
            ("NSPAWN_RUNNER_LOCK_TIMEOUT".to_owned(), "1000".to_owned()),
        ])
        .unwrap();
        let t = Timeouts::new(&settings);
        assert!(t.prepare >= 300 + 1000, "{}", t.prepare);
        assert!(t.cleanup > settings.prepare_timeout + settings.stop_timeout);
        assert!(t.graceful_kill > settings.stop_timeout);
        let text = toml_snippet(Path::new("/l"), &settings).unwrap();
        assert!(text.contains(&format!("prepare_exec_timeout = {}\n", t.prepare)));
        assert!(text.contains(&format!("--custom-prepare-exec-timeout {} ", t.prepare)));
    }

    #[test]
    fn the_shipped_example_is_what_toml_prints_by_default() {
        let example = include_str!("../../contrib/config.toml.example");
        assert_eq!(example, toml_snippet(Path::new("/usr/lib/nspawn-runner"), &defaults()).unwrap());
    }
}
