//! The one systemd-nspawn command-line builder: job machines, maintenance, the benchmark's floor.

use std::path::{Path, PathBuf};

/// Whether the machine may write through a bind mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A host path bind-mounted into a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    /// The path inside the machine.
    pub inside: String,
    pub access: Access,
    /// Shown to a machine in a user namespace with the host's ownership (host root as its root).
    pub idmap: bool,
}

impl Bind {
    pub fn read_only(host: impl Into<PathBuf>, inside: impl Into<String>) -> Bind {
        Bind { host: host.into(), inside: inside.into(), access: Access::ReadOnly, idmap: false }
    }

    pub fn read_write(host: impl Into<PathBuf>, inside: impl Into<String>) -> Bind {
        Bind { host: host.into(), inside: inside.into(), access: Access::ReadWrite, idmap: false }
    }

    /// The same bind, idmapped (`:idmap`, nspawn ≥ 250).
    pub fn idmapped(self, idmap: bool) -> Bind {
        Bind { idmap, ..self }
    }

    /// `--bind=HOST:INSIDE[:idmap]` or `--bind-ro=HOST:INSIDE[:idmap]`, both paths escaped.
    fn arg(&self) -> String {
        let option = match self.access {
            Access::ReadOnly => "--bind-ro",
            Access::ReadWrite => "--bind",
        };
        let options = if self.idmap { ":idmap" } else { "" };
        format!("{option}={}:{}{options}", escape(&self.host), escape(Path::new(&self.inside)))
    }
}

/// How a booted job machine gets its root: never by writing to the snapshot itself.
#[derive(Debug, Clone, Copy)]
pub enum BootRoot<'a> {
    /// `--ephemeral`: nspawn makes (and removes) a CoW copy of the tree.
    Ephemeral,
    /// `--overlay=TREE:UPPER:/`: the job's writes go to `upper`.
    Overlay { upper: &'a Path },
    /// `--volatile=overlay`: the job's writes go to a tmpfs.
    Volatile,
    /// The tree itself, which somebody else made a throw-away root (the idmapped overlay).
    Directory,
}

/// systemd-nspawn's arguments, built option by option. Every option is `--name` or
/// `--name=value`; paths in values go through `escape` where nspawn splits at ':'.
#[derive(Debug, Clone)]
pub struct Nspawn {
    args: Vec<String>,
}

impl Nspawn {
    /// `--quiet --directory=TREE --suppress-sync=yes`: what every use starts from. Syncs are
    /// suppressed everywhere: job machines are thrown away, and a maintained tree is synced as
    /// a whole (syncfs) before a transaction commits it. Every supported host has systemd >= 250,
    /// which has the option (Debian 12: 252, Debian 13: 257).
    pub fn new(tree: &Path) -> Nspawn {
        let directory = format!("--directory={}", tree.display());
        Nspawn { args: vec!["--quiet".to_owned(), directory, "--suppress-sync=yes".to_owned()] }
    }

    /// A booted job machine `machine` on `tree`, thrown away when it stops.
    pub fn boot(machine: &str, tree: &Path, root: BootRoot, register: bool) -> Nspawn {
        let nspawn = Nspawn::new(tree)
            .flag("--boot")
            .option("--notify-ready", "yes")
            // Job machines are thrown away: power off at once instead of stopping every service.
            .option("--kill-signal", "SIGRTMIN+14")
            .option("--link-journal", "no")
            .flag("--keep-unit")
            .register(register)
            .option("--machine", machine);
        match root {
            BootRoot::Ephemeral => nspawn.flag("--ephemeral"),
            BootRoot::Overlay { upper } => {
                let value = format!("{}:{}:/", escape(tree), escape(upper));
                nspawn.option("--overlay", &value)
            }
            BootRoot::Volatile => nspawn.option("--volatile", "overlay"),
            BootRoot::Directory => nspawn,
        }
    }

    /// SIGKILL instead of the poweroff signal when nspawn is told to stop: an init still booting
    /// has no handler for the poweroff signal and would ignore it, which a machine that must die
    /// with the process that started it (a health check's) cannot afford.
    pub fn killed_at_stop(mut self) -> Nspawn {
        for arg in self.args.iter_mut().filter(|a| a.starts_with("--kill-signal=")) {
            *arg = "--kill-signal=SIGKILL".to_owned();
        }
        self
    }

    /// Root of the machine is uid `base` of the host, in a user namespace of 65536 ids.
    /// `map`: nspawn idmaps the root tree itself (ephemeral btrfs copies); otherwise the tree
    /// already shows the range's ownership (the spawn wrapper's idmapped overlay).
    pub fn private_users(self, base: u32, map: bool) -> Nspawn {
        self.option("--private-users", &format!("{base}:{}", super::idmap::RANGE))
            .option("--private-users-ownership", if map { "map" } else { "off" })
    }

    /// `suppress == false` lets the machine's syncs through (`--suppress-sync=no`). Nothing in
    /// production does: the real_job benchmark does, to measure what suppressing them saves.
    pub fn suppress_sync(mut self, suppress: bool) -> Nspawn {
        let value = format!("--suppress-sync={}", if suppress { "yes" } else { "no" });
        for arg in self.args.iter_mut().filter(|arg| arg.starts_with("--suppress-sync=")) {
            arg.clone_from(&value);
        }
        self
    }

    /// `--name`.
    pub fn flag(mut self, name: &str) -> Nspawn {
        self.args.push(name.to_owned());
        self
    }

    /// `--name=value`.
    pub fn option(mut self, name: &str, value: &str) -> Nspawn {
        self.args.push(format!("{name}={value}"));
        self
    }

    /// `--register=yes|no`: whether machined is there to register with.
    pub fn register(self, register: bool) -> Nspawn {
        self.option("--register", if register { "yes" } else { "no" })
    }

    pub fn bind(mut self, bind: &Bind) -> Nspawn {
        self.args.push(bind.arg());
        self
    }

    pub fn binds<'b>(self, binds: impl IntoIterator<Item = &'b Bind>) -> Nspawn {
        binds.into_iter().fold(self, Nspawn::bind)
    }

    /// The arguments, for a booted machine (nspawn runs the tree's init).
    pub fn into_args(self) -> Vec<String> {
        self.args
    }

    /// The arguments, running `command` in the tree instead of booting it.
    pub fn with_command(self, command: &[String]) -> Vec<String> {
        let mut args = self.args;
        args.push("--".to_owned());
        args.extend(command.iter().cloned());
        args
    }
}

/// nspawn splits --bind/--overlay values at ':'; a backslash keeps one in a path.
fn escape(path: &Path) -> String {
    path.display().to_string().replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_escape_colons_and_backslashes_on_both_sides() {
        assert_eq!(Bind::read_write("/var/cache/a:b", "/cache").arg(), "--bind=/var/cache/a\\:b:/cache");
        assert_eq!(Bind::read_only("/h\\x", "/in:side").arg(), "--bind-ro=/h\\\\x:/in\\:side");
        assert_eq!(Bind::read_write("/c", "/cache").idmapped(true).arg(), "--bind=/c:/cache:idmap");
    }

    #[test]
    fn a_command_follows_a_double_dash() {
        let command = ["true".to_owned()];
        let args = Nspawn::new(Path::new("/t")).flag("--x").with_command(&command);
        assert_eq!(args, ["--quiet", "--directory=/t", "--suppress-sync=yes", "--x", "--", "true"]);
    }

    #[test]
    fn syncs_can_be_let_through_without_a_second_option() {
        let args = Nspawn::boot("run-1", Path::new("/t"), BootRoot::Ephemeral, false).suppress_sync(false).into_args();
        let syncs: Vec<&String> = args.iter().filter(|a| a.starts_with("--suppress-sync")).collect();
        assert_eq!(syncs, ["--suppress-sync=no"]);
        let args = Nspawn::new(Path::new("/t")).suppress_sync(false).suppress_sync(true).into_args();
        assert_eq!(args, ["--quiet", "--directory=/t", "--suppress-sync=yes"]);
    }

    #[test]
    fn overlay_paths_are_escaped() {
        let upper = Path::new("/jobs/a:b/upper");
        let args = Nspawn::boot("run-1", Path::new("/s/1_2"), BootRoot::Overlay { upper }, false).into_args();
        assert!(args.contains(&"--overlay=/s/1_2:/jobs/a\\:b/upper:/".to_owned()), "{args:?}");
        assert!(!args.contains(&"--ephemeral".to_owned()));
    }

    #[test]
    fn machines_that_die_with_their_caller_are_killed_not_powered_off() {
        let boot = || Nspawn::boot("run-1", Path::new("/s/1_2"), BootRoot::Ephemeral, false);
        assert!(boot().into_args().contains(&"--kill-signal=SIGRTMIN+14".to_owned()));
        let args = boot().killed_at_stop().into_args();
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--kill-signal=")).collect::<Vec<_>>(),
            ["--kill-signal=SIGKILL"]
        );
    }
}
