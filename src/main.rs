//! nspawn-runner: a multi-call binary. Named `config`, `prepare`, `run` or `cleanup` it is that
//! gitlab-runner custom-executor stage; named anything else it is the admin CLI.

use argh::FromArgs;
use cli::{Cli, Command, Conventions};
use error::{Kind, Result};
use log::Level;
use nspawn_runner::settings::{Loaded, Settings};
use nspawn_runner::{admin, cli, error, jobs, logging, stages};
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

/// The log filter: `-v`, else NSPAWN_RUNNER_LOG, else quiet stages (the job log stays clean)
/// and informative commands.
fn log_filter(verbose: bool, stage: bool, settings: Option<&Settings>) -> String {
    match (verbose, settings.and_then(|s| s.log.clone())) {
        (true, _) => "debug".to_owned(),
        (false, Some(filter)) => filter,
        (false, None) if stage => "warn".to_owned(),
        (false, None) => "info".to_owned(),
    }
}

fn dispatch(command: Command, loaded: &Loaded) -> Result<()> {
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
        Command::Status(args) => admin::status(&loaded.settings, args.json),
        Command::Shell(args) => {
            let code = admin::shell(&loaded.settings, &args.args)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Toml(args) => admin::toml(&args.links, &loaded.settings),
        Command::Settings(_) => admin::print_settings(loaded),
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
        logging::init("info");
        return match admin::chroot_exe(&argv[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}", logging::line(Level::Error, e));
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
    let conventions = Conventions::apply(effective_args(argv));
    if conventions.version {
        println!("nspawn-runner {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let strs: Vec<&str> = conventions.args.iter().map(String::as_str).collect();
    let is_stage = strs.get(1).is_some_and(|s| STAGE_NAMES.contains(s));
    let failure = |stage: bool| exit_code(if stage { jobs::env::EXIT_CODES.system_failure } else { 1 });
    let cli = match Cli::from_args(&strs[..1], &strs[1..]) {
        Ok(cli) => cli,
        Err(early_exit) => {
            return match early_exit.status {
                Ok(()) => {
                    println!("{}", early_exit.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    let mut message = early_exit.output.trim_end().replace('\n', " ");
                    if let Some(near) = cli::suggestion(&conventions.args, &early_exit.output) {
                        message.push_str(&format!(" (did you mean `{near}`?)"));
                    }
                    eprintln!("{}", logging::line(Level::Error, message));
                    exit_code(if is_stage { jobs::env::EXIT_CODES.system_failure } else { 2 })
                }
            };
        }
    };
    let is_stage = cli.command.is_stage();
    let verbose = conventions.verbose || cli.verbose;
    let loaded = match Settings::loaded() {
        Ok(loaded) => loaded,
        Err(e) => {
            logging::init(&log_filter(verbose, is_stage, None));
            eprintln!("{}", logging::line(Level::Error, e));
            return failure(is_stage);
        }
    };
    logging::init(&log_filter(verbose, is_stage, Some(&loaded.settings)));
    match dispatch(cli.command, &loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == Kind::Build => {
            log::info!("{e}");
            exit_code(jobs::env::EXIT_CODES.build_failure)
        }
        Err(e) => {
            eprintln!("{}", logging::line(Level::Error, e));
            failure(is_stage)
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
