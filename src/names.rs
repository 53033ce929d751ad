//! Validated names: images, job ids, snapshots and the machine names built from them.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest image name accepted; keeps paths and unit names well inside system limits.
const MAX_IMAGE_NAME: usize = 64;
/// Longest job id accepted: `run-<id>` must stay a valid hostname (at most 64 bytes).
const MAX_JOB_ID: usize = 48;

/// The name of an image: one path component of `[A-Za-z0-9._+-]`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

impl ImageName {
    pub fn parse(name: &str) -> Result<Self> {
        let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
        if name.is_empty() || name.len() > MAX_IMAGE_NAME || name.starts_with('.') || !valid_chars {
            return Err(Error::new(format!(
                "invalid image name {name:?}: use 1 to {MAX_IMAGE_NAME} characters of A-Z a-z 0-9 . _ + -, not starting with '.'"
            )));
        }
        Ok(ImageName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A CI job id, as used in machine, unit and state file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    pub fn parse(id: &str) -> Result<Self> {
        let valid = !id.is_empty()
            && id.len() <= MAX_JOB_ID
            && !id.starts_with('-')
            && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid {
            return Err(Error::new(format!(
                "invalid job id {id:?}: use 1 to {MAX_JOB_ID} characters of A-Z a-z 0-9 -, not starting with -"
            )));
        }
        Ok(JobId(id.to_owned()))
    }

    /// The nspawn machine (and container hostname) of this job.
    pub fn machine_name(&self) -> String {
        format!("run-{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A committed snapshot of an image: `<unix-time>_<pid>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotName {
    // Field order matters: the derived ordering sorts by creation time first.
    time: u64,
    pid: u32,
}

impl SnapshotName {
    pub fn new(time: u64, pid: u32) -> Self {
        SnapshotName { time, pid }
    }

    /// A name for a snapshot made now by this process.
    pub fn now() -> Self {
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        SnapshotName::new(time, std::process::id())
    }

    pub fn parse(name: &str) -> Result<Self> {
        let invalid = || Error::new(format!("invalid snapshot name {name:?}: expected <unix-time>_<pid>"));
        let (time, pid) = name.split_once('_').ok_or_else(invalid)?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(time) || !digits(pid) {
            return Err(invalid());
        }
        Ok(SnapshotName { time: time.parse().map_err(|_| invalid())?, pid: pid.parse().map_err(|_| invalid())? })
    }

    /// Seconds since the epoch when the snapshot was started.
    pub fn time(&self) -> u64 {
        self.time
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.time, self.pid)
    }
}

/// State files store names as strings; reading one back validates it like any other input.
macro_rules! string_conversions {
    ($($name:ident),+) => {
        $(
            impl TryFrom<String> for $name {
                type Error = Error;
                fn try_from(name: String) -> Result<Self> {
                    $name::parse(&name)
                }
            }

            impl From<$name> for String {
                fn from(name: $name) -> String {
                    name.to_string()
                }
            }
        )+
    };
}

string_conversions!(ImageName, JobId, SnapshotName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_accept_one_safe_component() {
        for ok in ["bookworm", "debian-12", "a.b_c+d", "X"] {
            assert_eq!(ImageName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", ".hidden", "..", "../../etc", "a/b", "a b", "a:b", "ü", &"x".repeat(65)] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn job_ids_are_hostname_safe() {
        assert_eq!(JobId::parse("12345").unwrap().machine_name(), "run-12345");
        assert!(JobId::parse("manual-1").is_ok());
        for bad in ["", "1/2", "../x", "a b", "-x", "a.b", &"1".repeat(49)] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn snapshot_names_round_trip_and_sort_by_time() {
        let a = SnapshotName::parse("1700000000_42").unwrap();
        assert_eq!(a.to_string(), "1700000000_42");
        let b = SnapshotName::parse("1700000001_7").unwrap();
        assert!(a < b);
        for bad in ["", "current", "1_", "_1", "1_2_3", "a_1", "1-2", ".tx-1_2", "1_2/x"] {
            assert!(SnapshotName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_read_back_from_json_are_validated() {
        let job: JobId = serde_json::from_str("\"42\"").unwrap();
        assert_eq!(serde_json::to_string(&job).unwrap(), "\"42\"");
        assert!(serde_json::from_str::<JobId>("\"../x\"").is_err());
        assert!(serde_json::from_str::<ImageName>("\"a/b\"").is_err());
        assert_eq!(serde_json::from_str::<SnapshotName>("\"1_2\"").unwrap(), SnapshotName::new(1, 2));
    }
}
