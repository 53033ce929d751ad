//! Running commands in an image tree being maintained: systemd-nspawn without --boot or --ephemeral.

use super::nspawn::{Bind, Nspawn};
use super::{systemd_is_pid1, SAFE_PATH};
use crate::error::{Context, Error, Result};
use std::path::Path;
use std::process::{Command, ExitStatus};

/// A command to run inside a tree.
pub struct TreeCommand<'a> {
    pub tree: &'a Path,
    pub command: &'a [String],
    pub binds: Vec<Bind>,
    /// A terminal session (image login) rather than a pipe.
    pub interactive: bool,
}

/// systemd-nspawn's arguments for `cmd` (pure, for tests).
pub fn tree_args(cmd: &TreeCommand, register: bool) -> Vec<String> {
    let mut nspawn = Nspawn::new(cmd.tree)
        .register(register)
        // The host's resolver, bind-mounted, so nothing of the host is copied into the image.
        .option("--resolv-conf", "bind-host")
        .option("--timezone", "off")
        .option("--link-journal", "no")
        .option("--console", if cmd.interactive { "interactive" } else { "pipe" });
    if !register {
        nspawn = nspawn.flag("--keep-unit");
    }
    if !cmd.interactive {
        nspawn = nspawn.option("--setenv", "DEBIAN_FRONTEND=noninteractive");
    }
    nspawn.binds(&cmd.binds).with_command(cmd.command)
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
            binds: vec![Bind::read_only("/etc/ho:ok", "/run/hook")],
            interactive: false,
        };
        let args = tree_args(&cmd, false);
        assert!(!args.iter().any(|a| a == "--boot" || a == "--ephemeral"));
        assert!(args.contains(&"--directory=/s/img/.tx-1_2".to_owned()));
        assert!(args.contains(&"--keep-unit".to_owned()));
        assert!(args.contains(&"--console=pipe".to_owned()));
        assert!(args.contains(&"--bind-ro=/etc/ho\\:ok:/run/hook".to_owned()), "{args:?}");
        assert_eq!(&args[args.len() - 3..], ["--", "apt-get", "update"]);
    }
}
