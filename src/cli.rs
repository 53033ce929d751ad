//! The command line: argh definitions of the admin CLI, which also runs each stage by hand.

use argh::FromArgs;
use std::path::PathBuf;

/// Run GitLab CI jobs in ephemeral systemd-nspawn machines, and maintain their images.
#[derive(FromArgs, Debug)]
#[argh(
    example = "{command_name} image create bookworm\n{command_name} image list --json\n{command_name} settings",
    note = "-v, -h and -V (--version) work with every command. Settings: nspawn-runner(1), `{command_name} settings`."
)]
pub struct Cli {
    /// log what is being done (also NSPAWN_RUNNER_LOG=debug|info|warn); anywhere on the line
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Config(ConfigStage),
    Prepare(PrepareStage),
    Run(RunStage),
    Cleanup(CleanupStage),
    InstallLinks(InstallLinks),
    Image(ImageCommand),
    Status(Status),
    Shell(Shell),
    Toml(Toml),
    Settings(SettingsCommand),
}

impl Command {
    /// True for the four custom-executor stages, whose failures use gitlab-runner's exit codes.
    pub fn is_stage(&self) -> bool {
        matches!(self, Command::Config(_) | Command::Prepare(_) | Command::Run(_) | Command::Cleanup(_))
    }
}

/// config stage: print the JSON gitlab-runner reads (builds_dir, cache_dir, driver)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config", example = "{command_name}")]
pub struct ConfigStage {}

/// prepare stage: boot the job's machine from its image's current snapshot
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "prepare", example = "{command_name} --job-id debug1 --image bookworm")]
pub struct PrepareStage {
    /// job id (default: $CUSTOM_ENV_CI_JOB_ID)
    #[argh(option)]
    pub job_id: Option<String>,
    /// image name (default: mapped from $CUSTOM_ENV_CI_JOB_IMAGE)
    #[argh(option)]
    pub image: Option<String>,
}

/// run stage: run a gitlab-runner script inside the job's machine
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run", example = "{command_name} /tmp/script build_script --job-id debug1")]
pub struct RunStage {
    /// the script file gitlab-runner wrote
    #[argh(positional)]
    pub script: PathBuf,
    /// the stage name (prepare_script, build_script, ...)
    #[argh(positional)]
    pub stage: String,
    /// job id (default: $CUSTOM_ENV_CI_JOB_ID)
    #[argh(option)]
    pub job_id: Option<String>,
}

/// cleanup stage: stop the job's machine and remove all it left
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cleanup", example = "{command_name} --job-id debug1")]
pub struct CleanupStage {
    /// job id (default: $CUSTOM_ENV_CI_JOB_ID)
    #[argh(option)]
    pub job_id: Option<String>,
}

/// make the config, prepare, run and cleanup symlinks to this binary in DIR, for config.toml
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "install-links", example = "{command_name} /usr/lib/nspawn-runner")]
pub struct InstallLinks {
    /// directory for the four stage symlinks
    #[argh(positional)]
    pub dir: PathBuf,
}

/// list job machines: job, machine, image, snapshot, state, age, unit
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status", example = "{command_name}\n{command_name} --json")]
pub struct Status {
    /// print a JSON array instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// root shell in a job's machine (one kept after a failure, NSPAWN_RUNNER_KEEP_FAILED, or a running one)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "shell", example = "nspawn-runner shell 4711\nnspawn-runner shell 4711 -- cat /etc/hostname")]
pub struct Shell {
    /// job id, then optionally `-- CMD ARGS...` to run instead of an interactive login shell
    #[argh(positional, greedy)]
    pub args: Vec<String>,
}

/// print a [[runners]] snippet for gitlab-runner's config.toml
/// print every setting in effect and where it comes from (default, file:line, environment)
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "settings",
    example = "{command_name}\nNSPAWN_RUNNER_SETTINGS=/tmp/test-settings {command_name}"
)]
pub struct SettingsCommand {}

/// print a complete [[runners]] entry for gitlab-runner's config.toml, and the register command
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "toml", example = "{command_name}\n{command_name} --links /opt/nspawn-runner/links")]
pub struct Toml {
    /// directory holding the stage symlinks (default: /usr/lib/nspawn-runner)
    #[argh(option, default = "PathBuf::from(\"/usr/lib/nspawn-runner\")")]
    pub links: PathBuf,
}

/// manage images: create, import, list, login, maintain, rollback, gc, remove, adopt
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "image", example = "{command_name} create bookworm\n{command_name} maintain --all")]
pub struct ImageCommand {
    #[argh(subcommand)]
    pub command: ImageSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ImageSub {
    Create(ImageCreate),
    Import(ImageImport),
    List(ImageList),
    Login(ImageLogin),
    Maintain(ImageMaintain),
    Rollback(ImageRollback),
    Gc(ImageGc),
    Remove(ImageRemove),
    Adopt(ImageAdopt),
}

/// create an image with mmdebstrap (or debootstrap), as one transaction
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "create",
    example = "{command_name} bookworm\n{command_name} default --suite trixie --include make,gcc"
)]
pub struct ImageCreate {
    /// image name; a Debian codename (bookworm, trixie, sid, ...) also picks the suite
    #[argh(positional)]
    pub name: String,
    /// debian suite (default: NAME if it is a Debian codename, else $NSPAWN_RUNNER_SUITE)
    #[argh(option)]
    pub suite: Option<String>,
    /// archive mirror URL (default: $NSPAWN_RUNNER_MIRROR, Debian's)
    #[argh(option)]
    pub mirror: Option<String>,
    /// extra packages, comma-separated (added to $NSPAWN_RUNNER_INCLUDE)
    #[argh(option)]
    pub include: Option<String>,
}

/// make a new snapshot of an image from a directory tree or a tar archive
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "import", example = "{command_name} bookworm /srv/bookworm.tar")]
pub struct ImageImport {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// a directory or a .tar file holding an OS tree
    #[argh(positional)]
    pub source: PathBuf,
}

/// list images, their settings and their snapshots (current, kept, leased, orphaned)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list", example = "{command_name}\n{command_name} bookworm --json")]
pub struct ImageList {
    /// only this image
    #[argh(positional)]
    pub name: Option<String>,
    /// print JSON (the store, its images, their settings and snapshots) instead of text
    #[argh(switch)]
    pub json: bool,
}

/// interactive shell in a new snapshot; committed if the shell exits 0
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "login", example = "{command_name} bookworm\n{command_name} bookworm --discard")]
pub struct ImageLogin {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// throw the changes away whatever the shell's exit status
    #[argh(switch)]
    pub discard: bool,
}

/// maintain images in a new snapshot (hooks, playbook, a script or a command), then switch
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "maintain",
    example = "{command_name} bookworm\n{command_name} bookworm --script upgrade.sh\n{command_name} bookworm -- apt-get -y install make\n{command_name} --all"
)]
pub struct ImageMaintain {
    /// every image (in the store or with hooks/playbook in the config dir)
    #[argh(switch)]
    pub all: bool,
    /// a script to run inside the snapshot instead of the hooks
    #[argh(option)]
    pub script: Option<PathBuf>,
    /// image name, then optionally `-- CMD ARGS...` to run instead of the hooks (a bare `--`: no work)
    #[argh(positional, greedy)]
    pub args: Vec<String>,
}

/// switch current back to the previous (or the named) snapshot
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rollback", example = "{command_name} bookworm\n{command_name} bookworm 1764000000_4100")]
pub struct ImageRollback {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// snapshot to make current (default: the newest one older than current)
    #[argh(positional)]
    pub snapshot: Option<String>,
}

/// delete snapshots no job needs and leftovers of crashed work
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "gc", example = "{command_name}\n{command_name} bookworm")]
pub struct ImageGc {
    /// only this image
    #[argh(positional)]
    pub name: Option<String>,
}

/// remove an image and all its snapshots
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove", example = "{command_name} bookworm")]
pub struct ImageRemove {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// remove even while jobs use it
    #[argh(switch)]
    pub force: bool,
}

/// adopt an image in the Python nspawn-runner's layout (ROOT/NAME is the OS tree)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "adopt", example = "{command_name} bookworm")]
pub struct ImageAdopt {
    /// image name
    #[argh(positional)]
    pub name: String,
}

/// The command line after the conventions argh lacks are taken out: `-v` and `-V`/`--version`
/// anywhere, `-h` for `--help` (all only before a `--`).
#[derive(Debug, PartialEq, Eq)]
pub struct Conventions {
    pub args: Vec<String>,
    pub verbose: bool,
    pub version: bool,
}

impl Conventions {
    pub fn apply(argv: Vec<String>) -> Conventions {
        let (mut args, mut verbose, mut version, mut options) = (Vec::new(), false, false, true);
        for (i, arg) in argv.into_iter().enumerate() {
            match arg.as_str() {
                _ if i == 0 || !options => args.push(arg),
                "--" => {
                    options = false;
                    args.push(arg);
                }
                "-v" | "--verbose" => verbose = true,
                "-V" | "--version" => version = true,
                "-h" => args.push("--help".to_owned()),
                _ => args.push(arg),
            }
        }
        Conventions { args, verbose, version }
    }
}

/// For argh's "Unrecognized argument: X", the nearest command name at that level, if any.
pub fn suggestion(args: &[String], error: &str) -> Option<&'static str> {
    use argh::SubCommands;
    let unknown = error.lines().find_map(|l| l.strip_prefix("Unrecognized argument: "))?;
    let position = args.iter().position(|a| a == unknown)?;
    let commands = if args[..position].iter().any(|a| a == "image") { ImageSub::COMMANDS } else { Command::COMMANDS };
    crate::suggest::nearest(unknown, commands.iter().map(|c| c.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn conventions_stop_at_a_double_dash() {
        let c =
            Conventions::apply(strings(&["nr", "image", "-v", "maintain", "-h", "x", "--", "ls", "-v", "-V", "-h"]));
        assert_eq!(c.args, strings(&["nr", "image", "maintain", "--help", "x", "--", "ls", "-v", "-V", "-h"]));
        assert!(c.verbose && !c.version);
        let c = Conventions::apply(strings(&["nr", "status", "-V"]));
        assert!(c.version && !c.verbose);
        assert_eq!(c.args, strings(&["nr", "status"]));
    }

    #[test]
    fn unknown_commands_get_the_nearest_one() {
        let args = strings(&["nr", "stauts"]);
        assert_eq!(suggestion(&args, "Unrecognized argument: stauts\n"), Some("status"));
        let args = strings(&["nr", "image", "lsit"]);
        assert_eq!(suggestion(&args, "Unrecognized argument: lsit\n"), Some("list"));
        let args = strings(&["nr", "image", "xyzzy"]);
        assert_eq!(suggestion(&args, "Unrecognized argument: xyzzy\n"), None);
    }
}
