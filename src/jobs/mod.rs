//! A job: gitlab-runner's variables for it, the image it gets, its state record and the state directory, its leases.

pub mod env;
pub mod image;
pub mod leases;
pub mod script;
pub mod state;

use crate::error::Result;
use crate::names::JobId;
use crate::settings::Settings;
use env::JobEnv;
use state::StateDir;
use std::time::Duration;

/// What every job stage starts from: settings, job variables, the job id and its state dir.
pub struct JobContext {
    pub settings: Settings,
    pub env: JobEnv,
    pub job: JobId,
    pub states: StateDir,
}

impl JobContext {
    /// Reads settings and job variables; `job_id` overrides CUSTOM_ENV_CI_JOB_ID.
    pub fn from_env(job_id: Option<&str>) -> Result<JobContext> {
        let settings = Settings::from_env()?;
        let env = JobEnv::from_env()?;
        let job = env.job_id(job_id)?;
        let states = StateDir::new(&settings);
        Ok(JobContext { settings, env, job, states })
    }

    /// How long prepare and cleanup of one job wait for each other.
    pub fn job_lock_timeout(&self) -> Duration {
        self.settings.prepare_timeout() + self.settings.stop_timeout()
    }
}
