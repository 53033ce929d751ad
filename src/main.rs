//! nspawn-runner: a multi-call binary. Named `config`, `prepare`, `run` or `cleanup` it is that
//! gitlab-runner custom-executor stage; named anything else it is the admin CLI.

use argh::FromArgs;
use cli::{Cli, Command};
use error::{Kind, Result};
use nspawn_runner::{admin, cli, error, jobs, stages};
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// The multi-call table: program names that are stages. Each maps to the CLI subcommand of
/// the same name, so a stage behaves the same through its symlink and by hand.
const STAGE_NAMES: [&str; 4] = ["config", "prepare", "run", "cleanup"];

/// Rewrites argv so that a stage symlink runs as `nspawn-runner <stage> <args...>`.
fn effective_args(argv: Vec<String>) -> Vec<String> {
    let program = argv.first().map(|a| Path::new(a).file_name().and_then(|n| n.to_str()).unwrap_or(""));
    match program {
        Some(name) if STAGE_NAMES.contains(&name) => {
            let mut args = vec!["nspawn-runner".to_owned(), name.to_owned()];
            args.extend(argv.into_iter().skip(1));
            args
        }
        _ => argv,
    }
}

fn init_logging(verbose: bool, stage: bool) {
    // Stages keep the job log clean: only warnings unless asked otherwise.
    let default = if verbose {
        "debug"
    } else if stage {
        "warn"
    } else {
        "info"
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("NSPAWN_RUNNER_LOG", default))
        .format(|out, record| {
            use std::io::Write;
            writeln!(out, "nspawn-runner: {}", record.args())
        })
        .init();
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Config(_) => stages::config::config(),
        Command::Prepare(args) => {
            let ctx = jobs::JobContext::from_env(args.job_id.as_deref())?;
            stages::prepare::prepare(&ctx, args.image.as_deref())
        }
        Command::Run(args) => {
            let ctx = jobs::JobContext::from_env(args.job_id.as_deref())?;
            stages::run::run(&ctx, &args.script, &args.stage)
        }
        Command::Cleanup(args) => {
            let ctx = jobs::JobContext::from_env(args.job_id.as_deref())?;
            stages::cleanup::cleanup(&ctx)
        }
        Command::InstallLinks(args) => admin::install_links(&args.dir, &STAGE_NAMES),
        Command::Status(_) => admin::status(),
        Command::Toml(args) => admin::toml(&args.links),
        Command::Image(args) => admin::image::dispatch(args.command),
    }
}

fn main() -> ExitCode {
    // Like any Unix tool: output into a closed pipe (`| head`) ends the process quietly instead
    // of a panic. The run stage is unaffected: job scripts write to gitlab-runner directly.
    // SAFETY: resetting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let argv: Vec<String> = std::env::args_os().map(|a: OsString| a.to_string_lossy().into_owned()).collect();
    if argv.first().is_some_and(|a| a.ends_with(admin::CHROOT_EXE_NAME)) {
        init_logging(false, false);
        return match admin::chroot_exe(&argv[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nspawn-runner: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if argv.get(1).is_some_and(|a| a == nspawn_runner::machine::spawn::SPAWN_ARG) {
        // systemd-nspawn's wrapper: its errors go to the machine's log.
        let error = nspawn_runner::machine::spawn::spawn_exe(&argv[2..]).err();
        eprintln!("nspawn-runner: {}", error.map_or_else(String::new, |e| e.to_string()));
        return ExitCode::FAILURE;
    }
    let args = effective_args(argv);
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let cli = match Cli::from_args(&strs[..1], &strs[1..]) {
        Ok(cli) => cli,
        Err(early_exit) => {
            let is_stage = strs.get(1).is_some_and(|s| STAGE_NAMES.contains(s));
            return match early_exit.status {
                Ok(()) => {
                    println!("{}", early_exit.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("nspawn-runner: {}", early_exit.output.trim_end().replace('\n', " "));
                    exit_code(if is_stage { jobs::env::EXIT_CODES.system_failure } else { 2 })
                }
            };
        }
    };
    let is_stage = cli.command.is_stage();
    init_logging(cli.verbose, is_stage);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == Kind::Build => {
            log::info!("{e}");
            exit_code(jobs::env::EXIT_CODES.build_failure)
        }
        Err(e) => {
            eprintln!("nspawn-runner: {e}");
            exit_code(if is_stage { jobs::env::EXIT_CODES.system_failure } else { 1 })
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stage_symlinks_become_subcommands() {
        assert_eq!(
            effective_args(args(&["/usr/lib/nspawn-runner/run", "/tmp/s", "build_script"])),
            args(&["nspawn-runner", "run", "/tmp/s", "build_script"])
        );
        assert_eq!(effective_args(args(&["prepare"])), args(&["nspawn-runner", "prepare"]));
        assert_eq!(
            effective_args(args(&["./cleanup", "--job-id", "5"])),
            args(&["nspawn-runner", "cleanup", "--job-id", "5"])
        );
    }

    #[test]
    fn other_names_are_the_admin_cli() {
        let argv = args(&["/usr/bin/nspawn-runner", "image", "list"]);
        assert_eq!(effective_args(argv.clone()), argv);
        let argv = args(&["/usr/bin/runner-config", "toml"]);
        assert_eq!(effective_args(argv.clone()), argv);
    }

    #[test]
    fn stage_arguments_parse_like_gitlab_runner_passes_them() {
        let argv = effective_args(args(&["run", "/tmp/custom-executor1/script2/script", "step_release"]));
        let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let cli = Cli::from_args(&strs[..1], &strs[1..]).unwrap();
        assert!(cli.command.is_stage());
        match cli.command {
            Command::Run(run) => {
                assert_eq!(run.script, Path::new("/tmp/custom-executor1/script2/script"));
                assert_eq!(run.stage, "step_release");
            }
            other => panic!("parsed as {other:?}"),
        }
        let strs = ["nspawn-runner", "image", "status"];
        assert!(Cli::from_args(&strs[..1], &strs[1..]).is_err());
    }
}
