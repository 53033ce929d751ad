//! The command line: argh definitions of the admin CLI, which also runs each stage by hand.

use argh::FromArgs;
use std::path::PathBuf;

/// Run GitLab CI jobs in ephemeral systemd-nspawn machines, and maintain their images.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// log what is being done (also NSPAWN_RUNNER_LOG=debug|info|warn)
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
}

impl Command {
    /// True for the four custom-executor stages, whose failures use gitlab-runner's exit codes.
    pub fn is_stage(&self) -> bool {
        matches!(self, Command::Config(_) | Command::Prepare(_) | Command::Run(_) | Command::Cleanup(_))
    }
}

/// config stage: print the JSON gitlab-runner reads (builds_dir, cache_dir, driver)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ConfigStage {}

/// prepare stage: boot the job's machine from its image's current snapshot
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "prepare")]
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
#[argh(subcommand, name = "run")]
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
#[argh(subcommand, name = "cleanup")]
pub struct CleanupStage {
    /// job id (default: $CUSTOM_ENV_CI_JOB_ID)
    #[argh(option)]
    pub job_id: Option<String>,
}

/// make the config, prepare, run and cleanup symlinks to this binary in DIR, for config.toml
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "install-links")]
pub struct InstallLinks {
    /// directory for the four stage symlinks
    #[argh(positional)]
    pub dir: PathBuf,
}

/// list running job machines
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct Status {}

/// root shell in a job's machine (one kept after a failure, NSPAWN_RUNNER_KEEP_FAILED, or a running one)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "shell", example = "nspawn-runner shell 4711\nnspawn-runner shell 4711 -- cat /etc/hostname")]
pub struct Shell {
    /// job id, then optionally `-- CMD ARGS...` to run instead of an interactive login shell
    #[argh(positional, greedy)]
    pub args: Vec<String>,
}

/// print a [[runners]] snippet for gitlab-runner's config.toml
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "toml")]
pub struct Toml {
    /// directory holding the stage symlinks (default: /usr/lib/nspawn-runner)
    #[argh(option, default = "PathBuf::from(\"/usr/lib/nspawn-runner\")")]
    pub links: PathBuf,
}

/// manage images: create, import, list, login, maintain, rollback, gc, remove, adopt
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "image")]
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
#[argh(subcommand, name = "create")]
pub struct ImageCreate {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// debian suite (default: $NSPAWN_RUNNER_SUITE, trixie)
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
#[argh(subcommand, name = "import")]
pub struct ImageImport {
    /// image name
    #[argh(positional)]
    pub name: String,
    /// a directory or a .tar file holding an OS tree
    #[argh(positional)]
    pub source: PathBuf,
}

/// list images and their snapshots (current, kept, leased, orphaned)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct ImageList {
    /// only this image
    #[argh(positional)]
    pub name: Option<String>,
}

/// interactive shell in a new snapshot; committed if the shell exits 0
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "login")]
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
#[argh(subcommand, name = "maintain")]
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
#[argh(subcommand, name = "rollback")]
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
#[argh(subcommand, name = "gc")]
pub struct ImageGc {
    /// only this image
    #[argh(positional)]
    pub name: Option<String>,
}

/// remove an image and all its snapshots
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
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
#[argh(subcommand, name = "adopt")]
pub struct ImageAdopt {
    /// image name
    #[argh(positional)]
    pub name: String,
}
