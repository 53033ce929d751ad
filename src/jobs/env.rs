//! What gitlab-runner tells a stage about the job: `CUSTOM_ENV_*` and the exit-code variables.

use crate::error::{Error, Result};
use crate::names::JobId;
use once_cell::sync::Lazy;
use serde::Deserialize;

/// The job variables a stage needs (gitlab-runner prefixes them with `CUSTOM_ENV_`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobEnv {
    #[serde(default, rename = "ci_job_id")]
    pub job_id: Option<String>,
    #[serde(default, rename = "ci_job_image")]
    pub job_image: Option<String>,
}

impl JobEnv {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        envy::prefixed("CUSTOM_ENV_")
            .from_iter(vars)
            .map_err(|e| Error::new(format!("invalid CUSTOM_ENV_* variable: {e}")))
    }

    /// The job id: `override_id` (from the command line) or CUSTOM_ENV_CI_JOB_ID.
    pub fn job_id(&self, override_id: Option<&str>) -> Result<JobId> {
        match override_id.or(self.job_id.as_deref()) {
            Some(id) => JobId::parse(id),
            None => Err(Error::new("no job id: CUSTOM_ENV_CI_JOB_ID is not set (use --job-id by hand)")),
        }
    }
}

/// The GitLab project of the job, from the job payload gitlab-runner wrote (`JOB_RESPONSE_FILE`,
/// `job_info.project_id`): unlike `CUSTOM_ENV_*`, nothing a project sets can change it. None
/// when there is no payload (a stage run by hand) or it names no project (a hand-written one):
/// such a job gets no /cache rather than a cache shared with other projects.
pub fn project_id(response_file: Option<&std::path::Path>) -> Result<Option<u64>> {
    #[derive(Deserialize)]
    struct Response {
        job_info: Option<JobInfo>,
    }
    #[derive(Deserialize)]
    struct JobInfo {
        project_id: Option<serde_json::Value>,
    }
    let Some(path) = response_file else { return Ok(None) };
    let bad = |why: &str| Error::new(format!("JOB_RESPONSE_FILE {}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(&e.to_string()))?;
    let response: Response = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
    match response.job_info.and_then(|info| info.project_id) {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(Some).ok_or_else(|| bad("job_info.project_id is not a project id"))
        }
        Some(_) => Err(bad("job_info.project_id is not a number")),
        None => {
            log::warn!("JOB_RESPONSE_FILE {}: no job_info.project_id, so the job gets no /cache", path.display());
            Ok(None)
        }
    }
}

/// The exit codes gitlab-runner asks for.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ExitCodes {
    #[serde(default = "default_build_failure", rename = "build_failure_exit_code")]
    pub build_failure: i32,
    #[serde(default = "default_system_failure", rename = "system_failure_exit_code")]
    pub system_failure: i32,
}

fn default_build_failure() -> i32 {
    1
}
fn default_system_failure() -> i32 {
    2
}

impl ExitCodes {
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        // A malformed value must not hide the real error: fall back to gitlab-runner's defaults.
        envy::from_iter(vars)
            .unwrap_or(ExitCodes { build_failure: default_build_failure(), system_failure: default_system_failure() })
    }
}

/// The exit codes of this process, read once.
pub static EXIT_CODES: Lazy<ExitCodes> = Lazy::new(|| ExitCodes::from_vars(std::env::vars()));

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn job_env_reads_prefixed_variables() {
        let env = JobEnv::from_vars(vars(&[
            ("CUSTOM_ENV_CI_JOB_ID", "4711"),
            ("CUSTOM_ENV_CI_JOB_IMAGE", "debian:trixie"),
            ("CI_JOB_ID", "999"),
        ]))
        .unwrap();
        assert_eq!(env.job_id(None).unwrap().as_str(), "4711");
        assert_eq!(env.job_id(Some("5")).unwrap().as_str(), "5");
        assert_eq!(env.job_image.as_deref(), Some("debian:trixie"));
    }

    #[test]
    fn missing_or_hostile_job_ids_are_errors() {
        let env = JobEnv::from_vars(vars(&[])).unwrap();
        assert!(env.job_id(None).is_err());
        let env = JobEnv::from_vars(vars(&[("CUSTOM_ENV_CI_JOB_ID", "1/2")])).unwrap();
        assert!(env.job_id(None).is_err());
    }

    #[test]
    fn the_project_comes_from_the_job_payload_and_is_a_number_when_named() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("response.json");
        let project = |json: &str| {
            std::fs::write(&file, json).unwrap();
            project_id(Some(&file))
        };
        assert_eq!(project(r#"{"id":1,"job_info":{"name":"a","project_id":42}}"#).unwrap(), Some(42));
        assert_eq!(project(r#"{"id":1}"#).unwrap(), None, "no project named: no cache");
        for bad in [r#"{"job_info":{"project_id":"../1"}}"#, r#"{"job_info":{"project_id":-1}}"#, "{"] {
            assert!(project(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(project_id(None).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_codes_come_from_the_environment() {
        let codes = ExitCodes::from_vars(vars(&[("BUILD_FAILURE_EXIT_CODE", "7"), ("SYSTEM_FAILURE_EXIT_CODE", "9")]));
        assert_eq!((codes.build_failure, codes.system_failure), (7, 9));
        let codes = ExitCodes::from_vars(vars(&[]));
        assert_eq!((codes.build_failure, codes.system_failure), (1, 2));
        let codes = ExitCodes::from_vars(vars(&[("BUILD_FAILURE_EXIT_CODE", "x")]));
        assert_eq!((codes.build_failure, codes.system_failure), (1, 2));
    }
}
