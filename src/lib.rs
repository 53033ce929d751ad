//! nspawn-runner as a library: the stages, jobs, machines, image store and settings behind the
//! multi-call binary, for the binary itself, its integration tests and its benchmarks.

pub mod admin;
pub mod cli;
pub mod error;
pub mod jobs;
pub mod lock;
pub mod logging;
pub mod machine;
pub mod names;
pub mod settings;
pub mod signals;
pub mod stages;
pub mod store;
pub mod suggest;
