//! Running commands in an image tree being maintained: systemd-nspawn without --boot or --ephemeral.

use super::{systemd_is_pid1, SAFE_PATH};
use crate::error::{Context, Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// A command to run inside a tree.
pub struct TreeCommand<'a> {
    pub tree: &'a Path,
    pub command: &'a [String],
    /// Host file -> path inside, read-only.
    pub binds_ro: Vec<(PathBuf, String)>,
    /// A terminal session (image login) rather than a pipe.
    pub interactive: bool,
}

/// systemd-nspawn's arguments for `cmd` (pure, for tests).
pub fn tree_args(cmd: &TreeCommand, register: bool) -> Vec<String> {
    let mut args = vec![
        "--quiet".to_owned(),
        format!("--directory={}", cmd.tree.display()),
        format!("--register={}", if register { "yes" } else { "no" }),
        // The host's resolver, bind-mounted, so nothing of the host is copied into the image.
        "--resolv-conf=bind-host".to_owned(),
        "--timezone=off".to_owned(),
        "--link-journal=no".to_owned(),
        format!("--console={}", if cmd.interactive { "interactive" } else { "pipe" }),
    ];
    if !register {
        args.push("--keep-unit".to_owned());
    }
    if !cmd.interactive {
        args.push("--setenv=DEBIAN_FRONTEND=noninteractive".to_owned());
    }
    for (host, inside) in &cmd.binds_ro {
        args.push(format!("--bind-ro={}:{inside}", host.display()));
    }
    args.push("--".to_owned());
    args.extend(cmd.command.iter().cloned());
    args
}

/// Runs the command, with our stdio, and returns how it ended.
pub fn run_in_tree(cmd: &TreeCommand) -> Result<ExitStatus> {
    let register = systemd_is_pid1();
    let mut command = Command::new("systemd-nspawn");
    command.args(tree_args(cmd, register)).env("PATH", SAFE_PATH).env_remove("NOTIFY_SOCKET");
    crate::signals::terminate_with_parent(&mut command);
    command.status().context("running systemd-nspawn")
}

/// Runs the command and fails unless it exits 0.
pub fn run_in_tree_checked(cmd: &TreeCommand) -> Result<()> {
    let status = run_in_tree(cmd)?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(format!("{} failed in {} ({status})", cmd.command.join(" "), cmd.tree.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_commands_run_without_boot_or_ephemeral() {
        let command = vec!["apt-get".to_owned(), "update".to_owned()];
        let cmd = TreeCommand {
            tree: Path::new("/s/img/.tx-1_2"),
            command: &command,
            binds_ro: vec![("/etc/hook".into(), "/run/hook".into())],
            interactive: false,
        };
        let args = tree_args(&cmd, false);
        assert!(!args.iter().any(|a| a == "--boot" || a == "--ephemeral"));
        assert!(args.contains(&"--directory=/s/img/.tx-1_2".to_owned()));
        assert!(args.contains(&"--keep-unit".to_owned()));
        assert!(args.contains(&"--console=pipe".to_owned()));
        assert!(args.contains(&"--bind-ro=/etc/hook:/run/hook".to_owned()));
        assert_eq!(&args[args.len() - 3..], ["--", "apt-get", "update"]);
    }
}
