//! The config stage: tells gitlab-runner where builds and caches live inside the machine.

use crate::error::{Error, Result};
use crate::settings::{Settings, CACHE_DIR_IN_MACHINE};
use serde::Serialize;

/// gitlab-runner's `ConfigExecOutput` (only the fields we set).
#[derive(Debug, Serialize)]
pub struct ConfigOutput {
    pub builds_dir: String,
    pub cache_dir: String,
    pub builds_dir_is_shared: bool,
    pub hostname: String,
    pub driver: Driver,
}

#[derive(Debug, Serialize)]
pub struct Driver {
    pub name: String,
    pub version: String,
}

impl ConfigOutput {
    pub fn new(settings: &Settings, hostname: String) -> Self {
        ConfigOutput {
            builds_dir: settings.builds_dir.clone(),
            cache_dir: CACHE_DIR_IN_MACHINE.to_owned(),
            // Every job has its own machine, so nothing under builds_dir is shared.
            builds_dir_is_shared: false,
            hostname,
            driver: Driver { name: "nspawn-runner".to_owned(), version: env!("CARGO_PKG_VERSION").to_owned() },
        }
    }
}

/// Prints the JSON object, and nothing else, on stdout. Deliberately independent of
/// CI_BUILDS_DIR/CI_PROJECT_DIR: gitlab-runner has not computed them yet.
pub fn config() -> Result<()> {
    let settings = Settings::from_env()?;
    let hostname =
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".to_owned());
    let json = serde_json::to_string(&ConfigOutput::new(&settings, hostname)).map_err(|e| Error::new(e.to_string()))?;
    println!("{json}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_has_the_fields_gitlab_runner_reads() {
        let settings = Settings::from_vars(Vec::new()).unwrap();
        let json = serde_json::to_value(ConfigOutput::new(&settings, "host1".into())).unwrap();
        assert_eq!(json["builds_dir"], "/builds");
        assert_eq!(json["cache_dir"], "/cache");
        assert_eq!(json["builds_dir_is_shared"], false);
        assert_eq!(json["hostname"], "host1");
        assert_eq!(json["driver"]["name"], "nspawn-runner");
        assert!(json["driver"]["version"].as_str().unwrap().starts_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(json.as_object().unwrap().len(), 5);
    }
}
