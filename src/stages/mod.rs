//! The four custom-executor stages gitlab-runner calls: config, prepare, run, cleanup.

pub mod cleanup;
pub mod config;
pub mod prepare;
pub mod run;
#[cfg(test)]
mod sequencing_tests;
