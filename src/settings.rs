//! Runner settings: `NSPAWN_RUNNER_*` environment variables (config.toml `environment = [...]`).

use crate::error::{Context, Error, Result};
use crate::names::ImageName;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Which way machines are started and entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SystemdMode {
    /// Use systemd-run/machined when PID 1 is systemd, plain nspawn otherwise.
    #[default]
    Auto,
    /// Always use the systemd-host path.
    Yes,
    /// Never use systemd-run/machined, even on a systemd host.
    No,
}

/// Every setting, with its default. Documented in README.md and nspawn-runner(1).
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    #[serde(default = "default_root")]
    pub root: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_config_dir")]
    pub config_dir: PathBuf,
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    #[serde(default = "default_builds_dir")]
    pub builds_dir: String,
    #[serde(default = "default_image")]
    pub default_image: String,
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default)]
    pub mirror: Option<String>,
    #[serde(default)]
    pub include: Option<String>,
    #[serde(default = "default_prepare_timeout")]
    pub prepare_timeout: u64,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: u64,
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: u64,
    #[serde(default = "default_keep")]
    pub keep: usize,
    #[serde(default)]
    pub systemd: SystemdMode,
    #[serde(default)]
    pub memory_max: Option<String>,
    #[serde(default)]
    pub cpu_weight: Option<String>,
    #[serde(default)]
    pub tasks_max: Option<String>,
    #[serde(default)]
    pub gitlab_runner: Option<PathBuf>,
    /// Images whose maintenance rebuilds them from scratch instead of changing a copy.
    #[serde(default)]
    pub recreate: Option<String>,
}

fn default_root() -> PathBuf {
    PathBuf::from("/var/lib/nspawn-runner")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/nspawn-runner")
}
fn default_config_dir() -> PathBuf {
    PathBuf::from("/etc/nspawn-runner")
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("/var/cache/nspawn-runner")
}
fn default_builds_dir() -> String {
    "/builds".to_owned()
}
fn default_image() -> String {
    "default".to_owned()
}
fn default_suite() -> String {
    "trixie".to_owned()
}
fn default_prepare_timeout() -> u64 {
    120
}
fn default_stop_timeout() -> u64 {
    10
}
fn default_lock_timeout() -> u64 {
    600
}
fn default_keep() -> usize {
    1
}

/// Where the cache dir appears inside every machine.
pub const CACHE_DIR_IN_MACHINE: &str = "/cache";

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the settings from `vars`; empty values count as unset.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let vars = vars.into_iter().filter(|(_, v)| !v.is_empty());
        let settings: Settings = envy::prefixed("NSPAWN_RUNNER_")
            .from_iter(vars)
            .map_err(|e| Error::new(format!("invalid NSPAWN_RUNNER_* setting: {e}")))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<()> {
        for (name, path) in [
            ("NSPAWN_RUNNER_ROOT", &self.root),
            ("NSPAWN_RUNNER_STATE_DIR", &self.state_dir),
            ("NSPAWN_RUNNER_CONFIG_DIR", &self.config_dir),
            ("NSPAWN_RUNNER_CACHE_DIR", &self.cache_dir),
        ] {
            if !path.is_absolute() || path == std::path::Path::new("/") {
                return Err(Error::new(format!("{name} must be an absolute path other than /, not {path:?}")));
            }
        }
        if !self.builds_dir.starts_with('/') || self.builds_dir.len() < 2 {
            return Err(Error::new(format!(
                "NSPAWN_RUNNER_BUILDS_DIR must be an absolute path inside the machine, not {:?}",
                self.builds_dir
            )));
        }
        Ok(())
    }

    pub fn prepare_timeout(&self) -> Duration {
        Duration::from_secs(self.prepare_timeout)
    }
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout)
    }
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs(self.lock_timeout)
    }

    /// Packages to add to a new image besides the defaults.
    pub fn extra_packages(&self) -> Vec<String> {
        split_list(self.include.as_deref().unwrap_or(""))
    }

    /// True when maintenance of `image` rebuilds it from scratch (NSPAWN_RUNNER_RECREATE lists
    /// it, or says `all`).
    pub fn recreates(&self, image: &str) -> bool {
        split_list(self.recreate.as_deref().unwrap_or("")).iter().any(|n| n == image || n == "all")
    }

    /// systemd unit properties for each job machine (systemd-host path).
    pub fn unit_properties(&self) -> Vec<String> {
        [("MemoryMax", &self.memory_max), ("CPUWeight", &self.cpu_weight), ("TasksMax", &self.tasks_max)]
            .into_iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v}")))
            .collect()
    }

    /// The host's gitlab-runner binary to bind into machines, if any.
    pub fn gitlab_runner_binary(&self) -> Option<PathBuf> {
        match &self.gitlab_runner {
            Some(path) => Some(path.clone()).filter(|p| p.is_file()),
            None => find_in_path("gitlab-runner"),
        }
    }

    /// Creates the state dir (root-only) if needed.
    pub fn ensure_state_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)
            .with_context(|| format!("creating state dir {}", self.state_dir.display()))
    }
}

/// Whether machines of `image` run privileged (no user namespace: root in the job is host root):
/// `NSPAWN_RUNNER_PRIVILEGED=yes` in `<config_dir>/<image>.conf`. Off without the file.
pub fn image_privileged(settings: &Settings, image: &ImageName) -> Result<bool> {
    let path = settings.config_dir.join(format!("{image}.conf"));
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        other => other.with_context(|| format!("reading {}", path.display()))?,
    };
    let mut privileged = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.split_once('=') {
            Some(("NSPAWN_RUNNER_PRIVILEGED", "yes")) => privileged = true,
            Some(("NSPAWN_RUNNER_PRIVILEGED", "no")) => privileged = false,
            Some(("NSPAWN_RUNNER_PRIVILEGED", other)) => {
                return Err(Error::new(format!(
                    "{}: NSPAWN_RUNNER_PRIVILEGED must be yes or no, not {other:?}",
                    path.display()
                )))
            }
            _ => {}
        }
    }
    Ok(privileged)
}

/// Splits a comma- or space-separated list.
pub fn split_list(list: &str) -> Vec<String> {
    list.split([',', ' ']).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Looks `program` up in `$PATH` (and the usual sbin dirs, which a service PATH may lack).
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/bin", "/usr/bin", "/usr/sbin", "/bin", "/sbin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|candidate| candidate.is_file());
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s = settings(&[("PATH", "/bin")]).unwrap();
        assert_eq!(s.root, PathBuf::from("/var/lib/nspawn-runner"));
        assert_eq!(s.state_dir, PathBuf::from("/run/nspawn-runner"));
        assert_eq!(s.builds_dir, "/builds");
        assert_eq!(s.keep, 1);
        assert_eq!(s.systemd, SystemdMode::Auto);
        assert!(s.unit_properties().is_empty());
    }

    #[test]
    fn values_are_parsed_and_empty_ones_ignored() {
        let s = settings(&[
            ("NSPAWN_RUNNER_ROOT", "/srv/images"),
            ("NSPAWN_RUNNER_KEEP", "3"),
            ("NSPAWN_RUNNER_SYSTEMD", "no"),
            ("NSPAWN_RUNNER_MEMORY_MAX", "2G"),
            ("NSPAWN_RUNNER_TASKS_MAX", "512"),
            ("NSPAWN_RUNNER_MIRROR", ""),
            ("NSPAWN_RUNNER_INCLUDE", "make, gcc build-essential"),
        ])
        .unwrap();
        assert_eq!(s.root, PathBuf::from("/srv/images"));
        assert_eq!(s.keep, 3);
        assert_eq!(s.systemd, SystemdMode::No);
        assert_eq!(s.mirror, None);
        assert_eq!(s.unit_properties(), ["MemoryMax=2G", "TasksMax=512"]);
        assert_eq!(s.extra_packages(), ["make", "gcc", "build-essential"]);
        assert!(!s.recreates("bookworm"));
        let s = settings(&[("NSPAWN_RUNNER_RECREATE", "trixie,sid")]).unwrap();
        assert!(s.recreates("sid") && !s.recreates("bookworm"));
        assert!(settings(&[("NSPAWN_RUNNER_RECREATE", "all")]).unwrap().recreates("bookworm"));
    }

    #[test]
    fn privileged_is_per_image_and_off_by_default() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = settings(&[("NSPAWN_RUNNER_CONFIG_DIR", dir.to_str().unwrap())]).unwrap();
        let image = |n| ImageName::parse(n).unwrap();
        std::fs::write(dir.join("builder.conf"), "# image builders need loop devices\nNSPAWN_RUNNER_PRIVILEGED=yes\n")
            .unwrap();
        std::fs::write(dir.join("odd.conf"), "NSPAWN_RUNNER_PRIVILEGED=sure\n").unwrap();
        std::fs::write(dir.join("plain.conf"), "NSPAWN_RUNNER_PRIVILEGED=no\n").unwrap();
        assert!(image_privileged(&s, &image("builder")).unwrap());
        assert!(!image_privileged(&s, &image("plain")).unwrap());
        assert!(!image_privileged(&s, &image("other")).unwrap());
        let e = image_privileged(&s, &image("odd")).unwrap_err().to_string();
        assert!(e.contains("yes or no"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = settings(&[("NSPAWN_RUNNER_KEEP", "many")]).unwrap_err();
        assert!(e.to_string().contains("NSPAWN_RUNNER_"), "{e}");
        assert!(settings(&[("NSPAWN_RUNNER_SYSTEMD", "maybe")]).is_err());
        assert!(settings(&[("NSPAWN_RUNNER_ROOT", "relative/dir")]).is_err());
        assert!(settings(&[("NSPAWN_RUNNER_ROOT", "/")]).is_err());
        assert!(settings(&[("NSPAWN_RUNNER_BUILDS_DIR", "builds")]).is_err());
    }
}
