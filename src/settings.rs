//! Runner settings: `NSPAWN_RUNNER_*` from the settings file and the environment, and where
//! each came from; per-image settings from `<config dir>/<image>.conf`.

use crate::error::{Context, Error, Result};
use crate::names::ImageName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings file the binary reads (stages, admin CLI and timer alike).
pub const SETTINGS_FILE: &str = "/etc/nspawn-runner/settings";
/// The one `NSPAWN_RUNNER_*` variable that is not a setting: where the settings file is.
pub const SETTINGS_FILE_VAR: &str = "NSPAWN_RUNNER_SETTINGS";
const PREFIX: &str = "NSPAWN_RUNNER_";

/// Which way machines are started and entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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

/// Every setting, with its default: each field is `NSPAWN_RUNNER_<FIELD>`, and the list of
/// known names derives from the fields. Documented in README.md and nspawn-runner(1).
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// `PATTERN=IMAGE,...`: job `image:` globs mapped to images before the Python runner's rule.
    #[serde(default)]
    pub image_aliases: Option<String>,
    /// Globs a job's `image:` must match (none: any image).
    #[serde(default)]
    pub allowed_images: Option<String>,
    /// The host's step-runner binary, bound into machines (default: `step-runner` from PATH).
    #[serde(default)]
    pub step_runner: Option<PathBuf>,
    /// Minutes the machine of a failed job stays up after cleanup, for `shell` (0: none).
    #[serde(default)]
    pub keep_failed: u64,
    /// Seconds after its prepare when gc stops a job's machine, whatever it is doing (0: never):
    /// the reaper of machines whose gitlab-runner crashed before their cleanup.
    #[serde(default = "default_max_job_age")]
    pub max_job_age: u64,
    /// Log filter (`debug`, `info`, `warn`, `error`); unset: warn for stages, info for commands.
    #[serde(default)]
    pub log: Option<String>,
    /// Boot a transaction's tree and check it before it commits (`false`: never; an image's
    /// `check=false` skips only that image).
    #[serde(default = "default_check")]
    pub check: bool,
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
/// 6 h: above gitlab-runner's default job timeout (1 h) and a generous project's.
fn default_max_job_age() -> u64 {
    6 * 3600
}

fn default_check() -> bool {
    true
}

/// Where the cache dir appears inside every machine.
pub const CACHE_DIR_IN_MACHINE: &str = "/cache";

/// Where a setting's value came from, for `nspawn-runner settings` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
    Environment,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Environment => f.write_str("environment"),
        }
    }
}

/// The settings in effect, with the source of every value that is not a default.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    /// The settings file looked at, and whether it existed.
    pub file: (PathBuf, bool),
    sources: BTreeMap<String, Source>,
}

impl Loaded {
    /// Every setting as `(NSPAWN_RUNNER_NAME, value, source)`, in declaration order; an unset
    /// optional value is `None`.
    pub fn entries(&self) -> Result<Vec<(String, Option<String>, Source)>> {
        let values = serde_json::to_value(&self.settings).map_err(|e| Error::new(e.to_string()))?;
        Ok(field_names()
            .iter()
            .map(|field| {
                let name = var_name(field);
                let value = plain_value(&values[*field]);
                let source = self.sources.get(&name).cloned().unwrap_or(Source::Default);
                (name, value, source)
            })
            .collect())
    }
}

/// The process-wide settings, read once: every stage and command sees the same values.
static LOADED: once_cell::sync::OnceCell<std::result::Result<Loaded, String>> = once_cell::sync::OnceCell::new();

impl Settings {
    /// The settings in effect for this process: the settings file, overridden by the
    /// environment (read once, then cached).
    pub fn from_env() -> Result<Self> {
        Self::loaded().map(|l| l.settings)
    }

    /// Like `from_env`, with where each value came from.
    pub fn loaded() -> Result<Loaded> {
        LOADED.get_or_init(|| Self::load(std::env::vars()).map_err(|e| e.to_string())).clone().map_err(Error::new)
    }

    /// Reads the settings file (`NSPAWN_RUNNER_SETTINGS`, else `SETTINGS_FILE`) and lets
    /// `env` override it. A missing default file means defaults; a missing named one is an error.
    pub fn load(env: impl IntoIterator<Item = (String, String)>) -> Result<Loaded> {
        let env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
        let named = env.iter().find(|(k, v)| k == SETTINGS_FILE_VAR && !v.is_empty()).map(|(_, v)| PathBuf::from(v));
        let path = named.clone().unwrap_or_else(|| PathBuf::from(SETTINGS_FILE));
        let text = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => None,
            other => Some(other.with_context(|| format!("reading the settings file {}", path.display()))?),
        };
        let mut values: BTreeMap<String, (String, Source)> = BTreeMap::new();
        if let Some(text) = &text {
            check_file_owner(&path)?;
            for (line, name, value) in parse_file(&path, text)? {
                let source = Source::File { path: path.clone(), line };
                if let Some((_, earlier)) = values.insert(name.clone(), (value, source)) {
                    return Err(Error::new(format!(
                        "{}:{line}: {name} is set twice (also at {earlier})",
                        path.display()
                    )));
                }
            }
        }
        for (name, value) in env {
            if name == SETTINGS_FILE_VAR {
                continue;
            }
            check_known(&name, &Source::Environment)?;
            // An empty value counts as unset: the file's value (or the default) applies.
            if !value.is_empty() {
                values.insert(name, (value, Source::Environment));
            }
        }
        let settings = Self::from_vars(values.iter().map(|(k, (v, _))| (k.clone(), v.clone()))).map_err(|e| {
            // Say where a bad value came from.
            let message = e.to_string();
            let culprit = values.iter().find(|(k, _)| {
                message.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|word| word == k.as_str())
            });
            match culprit {
                Some((_, (_, source))) => e.context(format!("setting from {source}")),
                None => e,
            }
        })?;
        let sources = values.into_iter().map(|(k, (_, source))| (k, source)).collect();
        Ok(Loaded { settings, file: (path, text.is_some()), sources })
    }

    /// The settings given by `vars` alone (no file); empty values count as unset, and an unknown
    /// `NSPAWN_RUNNER_*` name is an error. Other names (`CUSTOM_ENV_NSPAWN_RUNNER_*`, a job's
    /// variables) are ignored.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut known = Vec::new();
        for (name, value) in vars {
            if name.starts_with(PREFIX) && name != SETTINGS_FILE_VAR {
                check_known(&name, &Source::Environment)?;
                if !value.is_empty() {
                    known.push((name, value));
                }
            }
        }
        let settings: Settings = envy::prefixed(PREFIX).from_iter(known).map_err(|e| {
            Error::new(format!(
                "invalid setting: {}",
                e.to_string().replace("provided by ", "provided by NSPAWN_RUNNER_")
            ))
        })?;
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

    /// systemd unit properties for each job machine of an image (systemd-host path): the
    /// image's own limits, else these settings'.
    pub fn unit_properties(&self, image: &ImageSettings) -> Vec<String> {
        [
            ("MemoryMax", image.memory_max.as_ref().or(self.memory_max.as_ref())),
            ("CPUWeight", image.cpu_weight.as_ref().or(self.cpu_weight.as_ref())),
            ("TasksMax", image.tasks_max.as_ref().or(self.tasks_max.as_ref())),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
        .collect()
    }

    /// The host's gitlab-runner binary to bind into machines, if any.
    pub fn gitlab_runner_binary(&self) -> Option<PathBuf> {
        host_binary(&self.gitlab_runner, "gitlab-runner")
    }

    /// The host's step-runner binary (CI Steps, `run:`) to bind into machines, if any.
    pub fn step_runner_binary(&self) -> Option<PathBuf> {
        host_binary(&self.step_runner, "step-runner")
    }

    /// How long cleanup leaves the machine of a failed job up (None: not at all).
    pub fn keep_failed(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.keep_failed * 60)).filter(|d| !d.is_zero())
    }

    /// How old (since its prepare) a job may get before gc stops its machine (None: no limit).
    pub fn max_job_age(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.max_job_age)).filter(|d| !d.is_zero())
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

/// The binary a setting names (if it is a file), or `program` from PATH.
fn host_binary(setting: &Option<PathBuf>, program: &str) -> Option<PathBuf> {
    match setting {
        Some(path) => Some(path.clone()).filter(|p| p.is_file()),
        None => find_in_path(program),
    }
}

/// The root a job machine of an image gets; never the snapshot itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKind {
    /// A CoW copy of the snapshot made by nspawn (`--ephemeral`; btrfs stores only).
    Snapshot,
    /// An overlay with a per-job upper directory in the store.
    Overlay,
    /// An overlay whose upper layer is a tmpfs (`--volatile=overlay`): the job writes to RAM.
    Volatile,
}

/// Per-image settings: `<config dir>/<image>.conf`, next to the image's hooks and playbook,
/// `name=value` lines. Each field is one key; the known keys derive from the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageSettings {
    /// `MemoryMax=` of the image's job machines (overrides NSPAWN_RUNNER_MEMORY_MAX).
    #[serde(default)]
    pub memory_max: Option<String>,
    #[serde(default)]
    pub tasks_max: Option<String>,
    #[serde(default)]
    pub cpu_weight: Option<String>,
    /// The kind of job root (default: snapshot on btrfs stores, overlay elsewhere).
    #[serde(default)]
    pub root: Option<RootKind>,
    /// Host paths bound read-only into the image's job machines: `HOST[:INSIDE]`, space separated.
    #[serde(default)]
    pub binds: Option<String>,
    /// Opts the image out of the job containment (`true`/`false`).
    #[serde(default)]
    pub privileged: bool,
    /// `false`: commits of the image skip the health check (a tree not meant to boot).
    #[serde(default)]
    pub check: Option<bool>,
}

impl ImageSettings {
    /// True unless the image opts out of the health check before commits.
    pub fn checked(&self) -> bool {
        self.check != Some(false)
    }

    /// The settings of `image` from `config_dir`; no file means the defaults.
    pub fn load(config_dir: &Path, image: &ImageName) -> Result<ImageSettings> {
        let path = config_dir.join(format!("{image}.conf"));
        let text = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ImageSettings::default()),
            other => other.with_context(|| format!("reading {}", path.display()))?,
        };
        check_file_owner(&path)?;
        Self::parse(&path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<ImageSettings> {
        let known = struct_fields::<ImageSettings>();
        let mut values = Vec::new();
        for (at, name, value) in parse_lines(path, text)? {
            if !known.contains(&name.as_str()) {
                return Err(Error::new(format!("{at}: unknown image setting {name:?}; known: {}", known.join(" "))));
            }
            if !value.is_empty() {
                values.push((name, value));
            }
        }
        let settings: ImageSettings =
            envy::from_iter(values).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        settings.bind_list().map_err(|e| e.context(path.display()))?;
        Ok(settings)
    }

    /// The read-only binds as `(host, inside)`; both absolute, the host path existing.
    pub fn bind_list(&self) -> Result<Vec<(PathBuf, String)>> {
        split_list(self.binds.as_deref().unwrap_or(""))
            .into_iter()
            .map(|bind| {
                let (host, inside) = bind.split_once(':').unwrap_or((&bind, &bind));
                if !host.starts_with('/') || !inside.starts_with('/') || inside == "/" {
                    return Err(Error::new(format!("bind {bind:?}: use absolute paths HOST[:INSIDE], not /")));
                }
                if !Path::new(host).exists() {
                    return Err(Error::new(format!("bind {bind:?}: {host} does not exist")));
                }
                Ok((PathBuf::from(host), inside.to_owned()))
            })
            .collect()
    }

    /// One line for `image list`: `key=value` for each setting that differs from the default.
    pub fn summary(&self) -> String {
        let values = serde_json::to_value(self).unwrap_or_default();
        let defaults = serde_json::to_value(ImageSettings::default()).unwrap_or_default();
        struct_fields::<ImageSettings>()
            .iter()
            .filter(|field| values[**field] != defaults[**field])
            .filter_map(|field| plain_value(&values[*field]).map(|v| format!("{field}={v}")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A JSON value as a setting's text; null (unset) is None.
fn plain_value(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The field names of the struct `T`, as serde's derive lists them (no second list to keep).
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The field names of `Settings`.
fn field_names() -> &'static [&'static str] {
    struct_fields::<Settings>()
}

/// `root` -> `NSPAWN_RUNNER_ROOT`.
fn var_name(field: &str) -> String {
    format!("{PREFIX}{}", field.to_ascii_uppercase())
}

/// Every setting's variable name, in declaration order.
pub fn known_names() -> Vec<String> {
    field_names().iter().map(|f| var_name(f)).collect()
}

/// An `NSPAWN_RUNNER_*` name that is no setting is an error naming the known ones.
fn check_known(name: &str, source: &Source) -> Result<()> {
    let known = known_names();
    if known.iter().any(|k| k == name) {
        return Ok(());
    }
    let hint = match crate::suggest::nearest(name, known.iter().map(String::as_str)) {
        Some(near) => format!(" (did you mean {near}?)"),
        None => String::new(),
    };
    Err(Error::new(format!("unknown setting {name} in the {source}{hint}; known settings: {}", known.join(" "))))
}

/// `NAME=value` lines of a settings file, with their line numbers. Blank lines and `#`
/// comments are skipped; a value may be quoted with `"` or `'` (no escapes).
fn parse_lines(path: &Path, text: &str) -> Result<Vec<(Source, String, String)>> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = Source::File { path: path.to_path_buf(), line: index + 1 };
        let (name, value) =
            line.split_once('=').ok_or_else(|| Error::new(format!("{at}: expected NAME=value, not {line:?}")))?;
        let value = value.trim();
        let unquoted = ['"', '\''].iter().find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)));
        entries.push((at, name.trim().to_owned(), unquoted.unwrap_or(value).to_owned()));
    }
    Ok(entries)
}

/// The lines of the settings file, each a known `NSPAWN_RUNNER_*` name.
fn parse_file(path: &Path, text: &str) -> Result<Vec<(usize, String, String)>> {
    let mut entries = Vec::new();
    for (at, name, value) in parse_lines(path, text)? {
        if name == SETTINGS_FILE_VAR {
            return Err(Error::new(format!("{at}: {SETTINGS_FILE_VAR} only works in the environment")));
        }
        check_known(&name, &at)?;
        let Source::File { line, .. } = at else { unreachable!("parse_lines gives file sources") };
        entries.push((line, name, value));
    }
    Ok(entries)
}

/// The settings decide what root deletes and boots: a file others could write is refused.
fn check_file_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading the settings file {}", path.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(Error::new(format!(
            "the settings file {} must belong to this user and be writable by nobody else",
            path.display()
        )));
    }
    Ok(())
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
        assert_eq!(s.max_job_age(), Some(Duration::from_secs(21600)));
        assert!(s.check, "commits are health-checked unless told otherwise");
        assert!(!settings(&[("NSPAWN_RUNNER_CHECK", "false")]).unwrap().check);
        assert!(s.unit_properties(&ImageSettings::default()).is_empty());
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
        assert_eq!(s.unit_properties(&ImageSettings::default()), ["MemoryMax=2G", "TasksMax=512"]);
        let image =
            ImageSettings { memory_max: Some("1G".into()), cpu_weight: Some("50".into()), ..Default::default() };
        assert_eq!(s.unit_properties(&image), ["MemoryMax=1G", "CPUWeight=50", "TasksMax=512"]);
        assert_eq!(s.extra_packages(), ["make", "gcc", "build-essential"]);
        assert!(!s.recreates("bookworm"));
        let s = settings(&[("NSPAWN_RUNNER_RECREATE", "trixie,sid")]).unwrap();
        assert!(s.recreates("sid") && !s.recreates("bookworm"));
        assert!(settings(&[("NSPAWN_RUNNER_RECREATE", "all")]).unwrap().recreates("bookworm"));
        assert_eq!(settings(&[("NSPAWN_RUNNER_MAX_JOB_AGE", "0")]).unwrap().max_job_age(), None);
        assert_eq!(
            settings(&[("NSPAWN_RUNNER_MAX_JOB_AGE", "7200")]).unwrap().max_job_age(),
            Some(Duration::from_secs(7200))
        );
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

    /// A settings file with `text` in a fresh temporary directory, and the env naming it.
    fn settings_file(tag: &str, text: &str) -> (PathBuf, Vec<(String, String)>) {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-settings-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("settings");
        std::fs::write(&file, text).unwrap();
        let env = vec![(SETTINGS_FILE_VAR.to_owned(), file.to_string_lossy().into_owned())];
        (file, env)
    }

    #[test]
    fn the_file_is_read_and_the_environment_overrides_it() {
        let (file, mut env) = settings_file(
            "override",
            "# comment\n\nNSPAWN_RUNNER_ROOT=/srv/store\nNSPAWN_RUNNER_KEEP = \"4\"\nNSPAWN_RUNNER_SUITE='bookworm'\n",
        );
        env.push(("NSPAWN_RUNNER_KEEP".into(), "2".into()));
        env.push(("NSPAWN_RUNNER_SUITE".into(), String::new()));
        // A job's variables are never settings, whatever their name.
        env.push(("CUSTOM_ENV_NSPAWN_RUNNER_ROOT".into(), "/evil".into()));
        env.push(("CUSTOM_ENV_NSPAWN_RUNNER_BOGUS".into(), "x".into()));
        let loaded = Settings::load(env).unwrap();
        assert_eq!(loaded.settings.root, PathBuf::from("/srv/store"));
        assert_eq!(loaded.settings.keep, 2);
        assert_eq!(loaded.settings.suite, "bookworm", "an empty variable leaves the file's value");
        let entries = loaded.entries().unwrap();
        let find = |name: &str| entries.iter().find(|(n, _, _)| n == name).unwrap().clone();
        assert_eq!(
            find("NSPAWN_RUNNER_ROOT"),
            ("NSPAWN_RUNNER_ROOT".into(), Some("/srv/store".into()), Source::File { path: file.clone(), line: 3 })
        );
        assert_eq!(find("NSPAWN_RUNNER_KEEP").2, Source::Environment);
        assert_eq!(find("NSPAWN_RUNNER_KEEP").1.as_deref(), Some("2"));
        assert_eq!(find("NSPAWN_RUNNER_MIRROR"), ("NSPAWN_RUNNER_MIRROR".into(), None, Source::Default));
        assert_eq!(entries.len(), known_names().len());
        assert_eq!(entries[0].0, "NSPAWN_RUNNER_ROOT", "declaration order");
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
    }

    #[test]
    fn unknown_names_are_errors_that_list_the_known_ones() {
        let e = settings(&[("NSPAWN_RUNNER_MEMORYMAX", "2G")]).unwrap_err().to_string();
        assert!(e.contains("NSPAWN_RUNNER_MEMORYMAX") && e.contains("did you mean NSPAWN_RUNNER_MEMORY_MAX"), "{e}");
        assert!(e.contains("NSPAWN_RUNNER_ROOT") && e.contains("NSPAWN_RUNNER_LOG"), "{e}");
        let (file, env) = settings_file("unknown", "NSPAWN_RUNNER_ROOT=/srv\nNSPAWN_RUNNER_MEMORYMAX=2G\n");
        let e = Settings::load(env.clone()).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:2", file.display())) && e.contains("MEMORYMAX"), "{e}");
        for bad in
            ["PATH=/bin\n", "CUSTOM_ENV_NSPAWN_RUNNER_ROOT=/x\n", "NSPAWN_RUNNER_ROOT\n", "NSPAWN_RUNNER_SETTINGS=/x\n"]
        {
            std::fs::write(&file, bad).unwrap();
            let e = Settings::load(env.clone()).unwrap_err().to_string();
            assert!(e.contains(&format!("{}:1", file.display())), "{bad:?}: {e}");
        }
        std::fs::write(&file, "NSPAWN_RUNNER_KEEP=1\nNSPAWN_RUNNER_KEEP=2\n").unwrap();
        assert!(Settings::load(env.clone()).unwrap_err().to_string().contains("twice"));
        std::fs::write(&file, "NSPAWN_RUNNER_KEEP=many\n").unwrap();
        let e = Settings::load(env.clone()).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:1", file.display())), "a bad value names its line: {e}");
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_named_file_must_exist_and_be_writable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let missing = vec![(SETTINGS_FILE_VAR.to_owned(), "/nonexistent/nspawn-runner/settings".to_owned())];
        assert!(Settings::load(missing).unwrap_err().to_string().contains("/nonexistent/nspawn-runner/settings"));
        let (file, env) = settings_file("mode", "NSPAWN_RUNNER_ROOT=/srv\n");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(Settings::load(env.clone()).unwrap_err().to_string().contains("writable by nobody else"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Settings::load(env).is_ok());
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
    }

    #[test]
    fn image_settings_parse_and_refuse_unknown_keys() {
        let path = Path::new("/etc/nspawn-runner/img.conf");
        let s = ImageSettings::parse(
            path,
            "memory_max=2G\nroot = volatile\nbinds=/usr/share:/host/share /etc\nprivileged=true\n",
        )
        .unwrap();
        assert_eq!(s.memory_max.as_deref(), Some("2G"));
        assert_eq!(s.root, Some(RootKind::Volatile));
        assert!(s.privileged);
        assert_eq!(
            s.bind_list().unwrap(),
            [(PathBuf::from("/usr/share"), "/host/share".to_owned()), (PathBuf::from("/etc"), "/etc".to_owned())]
        );
        assert_eq!(s.summary(), "memory_max=2G root=volatile binds=/usr/share:/host/share /etc privileged=true");
        assert_eq!(ImageSettings::default().summary(), "");
        assert!(s.checked() && ImageSettings::default().checked());
        let unchecked = ImageSettings::parse(path, "check=false\n").unwrap();
        assert!(!unchecked.checked());
        assert_eq!(unchecked.summary(), "check=false");
        assert!(ImageSettings::parse(path, "check=maybe\n").is_err());
        let e = ImageSettings::parse(path, "memory_max=1G\nmemorymax=2G\n").unwrap_err().to_string();
        assert!(e.contains("img.conf:2") && e.contains("memory_max"), "{e}");
        assert!(ImageSettings::parse(path, "root=tmpfs\n").is_err());
        assert!(ImageSettings::parse(path, "privileged=maybe\n").is_err());
        assert!(ImageSettings::parse(path, "binds=/:/x\n").is_ok());
        assert!(ImageSettings::parse(path, "binds=/etc:/\n").is_err());
        let none = ImageSettings::load(Path::new("/nonexistent"), &ImageName::parse("img").unwrap()).unwrap();
        assert_eq!(none, ImageSettings::default());
    }
}
