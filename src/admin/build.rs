//! Making image trees: new image directories, bootstrapping Debian, gc after a commit.

use crate::error::{Context, Error, Result};
use crate::jobs::state::StateDir;
use crate::settings::Settings;
use crate::store::gc;
use crate::store::{is_old_layout, Image};
use std::path::Path;
use std::process::Command;

/// Packages every image gets: what a booted job machine and gitlab-runner's scripts need, and
/// python3 for ansible's modules (as the Python nspawn-runner always included it).
const BASE_PACKAGES: [&str; 5] = ["systemd", "dbus", "git", "ca-certificates", "python3"];

/// Debian codenames and suite names: an image called like one is made of that release.
const DEBIAN_RELEASES: [&str; 12] = [
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "unstable",
    "testing",
    "stable",
    "oldstable",
    "experimental",
];

/// The Debian suite a new image `name` is made of: its own name when that is a Debian
/// release, else NSPAWN_RUNNER_SUITE.
pub fn suite_for(name: &str, settings: &Settings) -> String {
    match DEBIAN_RELEASES.iter().find(|r| **r == name) {
        Some(release) => (*release).to_owned(),
        None => settings.suite.clone(),
    }
}

/// Creates the image directory for a new image; an existing image is an error.
pub fn new_image_dir(image: &Image) -> Result<()> {
    if image.exists() {
        return Err(Error::new(format!("image {} exists already (use `image maintain`)", image.name())));
    }
    if is_old_layout(image.dir()) {
        return Err(Error::new(format!("image {} is in the old layout: use `image adopt`", image.name())));
    }
    std::fs::create_dir_all(image.dir()).with_context(|| format!("creating {}", image.dir().display()))
}

/// Bootstraps a Debian tree into `tree` with mmdebstrap, or debootstrap where it is missing.
pub fn bootstrap(tree: &Path, suite: &str, mirror: Option<&str>, extra: &[String]) -> Result<()> {
    let include =
        BASE_PACKAGES.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect::<Vec<_>>().join(",");
    let tool = if crate::settings::find_in_path("mmdebstrap").is_some() { "mmdebstrap" } else { "debootstrap" };
    let mut command = Command::new(tool);
    command.arg("--variant=minbase").arg(format!("--include={include}")).arg(suite).arg(tree);
    if let Some(mirror) = mirror {
        command.arg(mirror);
    }
    crate::signals::terminate_with_parent(&mut command);
    log::info!("bootstrapping {suite} into {} with {tool}", tree.display());
    let status = command.status().with_context(|| format!("running {tool} (install mmdebstrap or debootstrap)"))?;
    if !status.success() {
        return Err(Error::new(format!("{tool} failed ({status})")));
    }
    make_bootable(tree)
}

/// Leaves what nspawn must supply per machine to nspawn: the hostname (so every job machine is
/// called `run-<job id>`), and the host's resolver configuration.
pub fn make_bootable(tree: &Path) -> Result<()> {
    for file in ["etc/hostname", "etc/resolv.conf"] {
        crate::store::remove_if_present(&tree.join(file))?;
    }
    if !tree.join("usr/lib/systemd/systemd").exists() && !tree.join("lib/systemd/systemd").exists() {
        return Err(Error::new(format!("{} has no systemd: it could not boot", tree.display())));
    }
    Ok(())
}

/// gc of one image after a commit.
pub fn collect(settings: &Settings, image: &Image) -> Result<()> {
    let deleted = gc::collect_image(image, &StateDir::new(settings), settings.keep)?;
    for name in deleted {
        println!("image {}: deleted {name}", image.name());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_named_after_a_release_is_that_release() {
        let settings = Settings::from_vars([("NSPAWN_RUNNER_SUITE".to_owned(), "trixie".to_owned())]).unwrap();
        assert_eq!(suite_for("bookworm", &settings), "bookworm");
        assert_eq!(suite_for("sid", &settings), "sid");
        assert_eq!(suite_for("default", &settings), "trixie");
        assert_eq!(suite_for("bookworm-ci", &settings), "trixie");
    }
}
