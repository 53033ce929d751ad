//! `image maintain`: hooks, a playbook, a script or a command run in a new snapshot, then commit.

use super::build::{bootstrap, collect, new_image_dir, suite_for};
use super::check::commit_checked;
use crate::cli::ImageMaintain;
use crate::error::{Context, Error, Result};
use crate::machine::chroot::{run_in_tree_checked, TreeCommand};
use crate::machine::nspawn::Bind;
use crate::names::ImageName;
use crate::settings::{find_in_path, Settings};
use crate::store::transaction::{Base, Transaction};
use crate::store::Store;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The maintenance of an image with no hooks: a full, non-interactive upgrade.
const DEFAULT_UPGRADE: &str = "apt-get update && apt-get -y dist-upgrade && apt-get clean";
/// Where a hook or script file appears inside the snapshot while it runs.
const HOOK_IN_TREE: &str = "/run/nspawn-runner-hook";
/// The name under which this binary serves as ansible's `chroot_exe`.
pub const CHROOT_EXE_NAME: &str = "nspawn-runner-chroot";

/// What to do inside the new snapshot.
enum Work {
    Command(Vec<String>),
    Script(PathBuf),
    /// The image's hooks and playbook from the config dir (or the default upgrade).
    Configured,
    /// Commit the snapshot unchanged.
    Nothing,
}

pub fn maintain(settings: &Settings, args: ImageMaintain) -> Result<()> {
    if args.all {
        if !args.args.is_empty() || args.script.is_some() {
            return Err(Error::new("--all runs each image's own hooks: give no image, script or command"));
        }
        return maintain_all(settings);
    }
    let (name, command) = args.args.split_first().ok_or_else(|| Error::new("give an image name, or --all"))?;
    let name = ImageName::parse(name)?;
    // argh keeps the `--` that separates the command from our options.
    let separated = command.first().is_some_and(|a| a == "--");
    if !command.is_empty() && !separated {
        return Err(Error::new(format!(
            "unexpected {:?} after the image name: put a command after `--` (image maintain {name} -- CMD ARGS...)",
            command.join(" ")
        )));
    }
    let command = if separated { &command[1..] } else { command };
    let work = match (command.is_empty(), args.script) {
        (false, Some(_)) => return Err(Error::new("give either --script or a command, not both")),
        (false, None) => Work::Command(command.to_vec()),
        (true, Some(script)) => Work::Script(script),
        // `NAME --` with nothing after it: an unchanged snapshot, i.e. the bare cost of a transaction.
        (true, None) if separated => Work::Nothing,
        (true, None) => Work::Configured,
    };
    maintain_one(settings, &name, &work)
}

/// Every image in the store plus every image configured in the config dir; one failure does
/// not stop the others.
fn maintain_all(settings: &Settings) -> Result<()> {
    let mut names: BTreeSet<ImageName> = configured_images(&settings.config_dir).into_iter().collect();
    if let Ok(store) = Store::open(settings) {
        // A creation cut short is no image to maintain (gc deletes what it left).
        // An image refused by `image` stays in: its maintenance fails, saying why.
        names.extend(store.images()?.into_iter().filter(|name| store.image(name).map_or(true, |i| !i.unfinished())));
    }
    let mut failed = Vec::new();
    for name in &names {
        if let Err(e) = maintain_one(settings, name, &Work::Configured) {
            log::error!("{e}");
            failed.push(name.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::new(format!("maintenance failed for: {}", failed.join(", "))))
    }
}

/// Image names that have hooks (`NAME.d/`) or a playbook (`NAME.yaml`) in the config dir.
fn configured_images(config_dir: &Path) -> Vec<ImageName> {
    let Ok(entries) = std::fs::read_dir(config_dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem =
                name.strip_suffix(".d").or_else(|| name.strip_suffix(".yaml")).or_else(|| name.strip_suffix(".yml"))?;
            ImageName::parse(stem).ok()
        })
        .collect()
}

fn maintain_one(settings: &Settings, name: &ImageName, work: &Work) -> Result<()> {
    let store = Store::open_or_create(settings)?;
    let image = store.image(name)?;
    let created = !image.exists();
    let result = (|| {
        if created {
            let configured = matches!(work, Work::Configured) && configured_images(&settings.config_dir).contains(name);
            if !configured {
                image.must_exist()?;
            }
            // An image that has hooks or a playbook but no tree yet is made first.
            new_image_dir(&image)?;
        }
        // A rebuild keeps the image's Debian release; a new image gets the configured suite.
        let rebuild_suite = match work {
            Work::Configured if !created && settings.recreates(name.as_str()) => {
                Some(debian_codename(&image.snapshot_path(&image.current()?)).unwrap_or_else(|| settings.suite.clone()))
            }
            _ if created => Some(suite_for(name.as_str(), settings)),
            _ => None,
        };
        let tx = Transaction::begin(&image, if rebuild_suite.is_some() { Base::Empty } else { Base::Current })?;
        if let Some(suite) = &rebuild_suite {
            bootstrap(tx.tree(), suite, settings.mirror.as_deref(), &settings.extra_packages())?;
        }
        match work {
            Work::Command(command) => run_in_tree_checked(&tree_command(tx.tree(), command, vec![]))?,
            Work::Script(script) => run_file(tx.tree(), script)?,
            Work::Configured => run_configured_steps(settings, &tx, rebuild_suite.is_none())?,
            Work::Nothing => {}
        }
        commit_checked(settings, tx)
    })();
    match result {
        Ok(snapshot) => {
            println!("image {name}: maintenance committed as snapshot {snapshot}");
            collect(settings, &image)
        }
        Err(e) => {
            if created && !image.exists() {
                let _ = std::fs::remove_dir_all(image.dir());
            }
            Err(e.context(format!("maintaining image {name} (current is unchanged)")))
        }
    }
}

/// VERSION_CODENAME of the Debian tree at `tree`, read from its own files (never the host's:
/// an absolute /etc/os-release symlink is not followed).
fn debian_codename(tree: &Path) -> Option<String> {
    let etc = tree.join("etc/os-release");
    let candidates = [tree.join("usr/lib/os-release"), etc.clone()];
    let text = candidates
        .iter()
        .filter(|p| *p != &etc || std::fs::symlink_metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .find_map(|p| std::fs::read_to_string(p).ok())?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

fn tree_command<'a>(tree: &'a Path, command: &'a [String], binds: Vec<Bind>) -> TreeCommand<'a> {
    TreeCommand { tree, command, binds, interactive: false }
}

/// Runs a host file inside the tree: directly when executable (any interpreter), else with sh.
fn run_file(tree: &Path, file: &Path) -> Result<()> {
    let meta = std::fs::metadata(file).with_context(|| format!("maintenance script {}", file.display()))?;
    let command: Vec<String> = if meta.permissions().mode() & 0o111 != 0 {
        vec![HOOK_IN_TREE.to_owned()]
    } else {
        vec!["/bin/sh".to_owned(), HOOK_IN_TREE.to_owned()]
    };
    log::info!("running {} in {}", file.display(), tree.display());
    run_in_tree_checked(&tree_command(tree, &command, vec![Bind::read_only(file, HOOK_IN_TREE)]))
        .map_err(|e| e.context(format!("hook {}", file.display())))
}

/// The hooks of an image: executable files in `CONFIG_DIR/NAME.d/`, in name order.
fn hooks(config_dir: &Path, name: &ImageName) -> Vec<PathBuf> {
    let dir = config_dir.join(format!("{name}.d"));
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut hooks: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
        .collect();
    hooks.sort();
    hooks
}

/// Runs the image's hooks (or, if it has none and `default_upgrade`, a full upgrade), then its
/// ansible playbook if there is one.
pub fn run_configured_steps(settings: &Settings, tx: &Transaction, default_upgrade: bool) -> Result<()> {
    let name = tx.image().name();
    let hooks = hooks(&settings.config_dir, name);
    for hook in &hooks {
        run_file(tx.tree(), hook)?;
    }
    let playbook =
        ["yaml", "yml"].iter().map(|ext| settings.config_dir.join(format!("{name}.{ext}"))).find(|p| p.is_file());
    if hooks.is_empty() && playbook.is_none() && default_upgrade {
        let command = ["/bin/sh".to_owned(), "-c".to_owned(), DEFAULT_UPGRADE.to_owned()];
        run_in_tree_checked(&tree_command(tx.tree(), &command, vec![]))?;
    }
    if let Some(playbook) = playbook {
        run_playbook(tx.tree(), name, &playbook)?;
    }
    Ok(())
}

/// Where ansible's modules expect the interpreter inside the tree.
const PYTHON_IN_TREE: &str = "usr/bin/python3";

/// Fails when the tree has no python3, before ansible fails somewhere inside with `python: not found`.
fn require_python(tree: &Path, name: &ImageName) -> Result<()> {
    // symlink_metadata: the link itself (python3 -> python3.x) is in the tree; its target need
    // not be resolved against the host.
    if std::fs::symlink_metadata(tree.join(PYTHON_IN_TREE)).is_ok() {
        return Ok(());
    }
    Err(Error::new(format!(
        "image {name} has no /{PYTHON_IN_TREE}, which its ansible playbook needs: install python3 in a hook \
         ({name}.d/) or with `nspawn-runner image maintain {name} -- apt-get install -y python3`"
    )))
}

/// Runs an ansible playbook against the tree through ansible's chroot connection, with this
/// binary (as `nspawn-runner-chroot`) as the chroot executable, so tasks run under nspawn.
fn run_playbook(tree: &Path, name: &ImageName, playbook: &Path) -> Result<()> {
    let Some(ansible) = find_in_path("ansible-playbook") else {
        log::warn!("{} exists but ansible-playbook is not installed: skipped", playbook.display());
        return Ok(());
    };
    require_python(tree, name)?;
    // An unpredictable name, made mode 0700 by mkdtemp: nobody can plant an inventory in it.
    let template = std::env::temp_dir().join("nspawn-runner-ansible-XXXXXX");
    let work = nix::unistd::mkdtemp(&template).with_context(|| format!("creating {}", template.display()))?;
    let result = (|| {
        let chroot_exe = work.join(CHROOT_EXE_NAME);
        std::os::unix::fs::symlink(std::env::current_exe().context("locating this binary")?, &chroot_exe)
            .context("linking the chroot executable")?;
        let inventory = serde_json::json!({"all": {"hosts": {tree.to_string_lossy(): {
            "ansible_connection": "chroot",
            "ansible_chroot_exe": chroot_exe,
        }}}});
        std::fs::write(work.join("hosts.json"), inventory.to_string()).context("writing the inventory")?;
        let status = std::process::Command::new(ansible)
            .arg("--inventory")
            .arg(work.join("hosts.json"))
            .arg(playbook)
            .env("ANSIBLE_NOCOWS", "1")
            .status()
            .context("running ansible-playbook")?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::new(format!("playbook {} failed ({status})", playbook.display())))
        }
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Entry point of `nspawn-runner-chroot TREE CMD...` (ansible's chroot_exe).
pub fn chroot_exe(args: &[String]) -> Result<()> {
    let (tree, command) = args.split_first().ok_or_else(|| Error::new("usage: nspawn-runner-chroot TREE CMD..."))?;
    if command.is_empty() {
        return Err(Error::new("usage: nspawn-runner-chroot TREE CMD..."));
    }
    run_in_tree_checked(&tree_command(Path::new(tree), command, vec![]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_keep_the_release_of_the_tree() {
        let tree = std::env::temp_dir().join(format!("nspawn-runner-codename-{}", std::process::id()));
        std::fs::create_dir_all(tree.join("usr/lib")).unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        assert_eq!(debian_codename(&tree), None);
        std::fs::write(tree.join("usr/lib/os-release"), "NAME=\"Debian\"\nVERSION_CODENAME=bookworm\n").unwrap();
        std::os::unix::fs::symlink("../usr/lib/os-release", tree.join("etc/os-release")).unwrap();
        assert_eq!(debian_codename(&tree).as_deref(), Some("bookworm"));
        std::fs::remove_dir_all(&tree).unwrap();
    }

    #[test]
    fn playbooks_need_python3_in_the_tree() {
        let tree = std::env::temp_dir().join(format!("nspawn-runner-python-{}", std::process::id()));
        let name = ImageName::parse("img").unwrap();
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        let e = require_python(&tree, &name).unwrap_err().to_string();
        assert!(e.contains("image img has no /usr/bin/python3") && !e.contains('\n'), "{e}");
        // a relative link into the tree counts, whatever the host has
        std::os::unix::fs::symlink("python3.11", tree.join("usr/bin/python3")).unwrap();
        assert!(require_python(&tree, &name).is_ok());
        std::fs::remove_dir_all(&tree).unwrap();
    }

    #[test]
    fn hooks_and_playbooks_name_configured_images() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-maint-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("alpha.d")).unwrap();
        std::fs::write(dir.join("beta.yaml"), "- hosts: all\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "").unwrap();
        std::fs::create_dir_all(dir.join(".hidden.d")).unwrap();
        for (file, mode) in [("20-second", 0o755), ("10-first", 0o755), ("30-not-executable", 0o644)] {
            let path = dir.join("alpha.d").join(file);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut names: Vec<String> = configured_images(&dir).iter().map(|n| n.to_string()).collect();
        names.sort();
        assert_eq!(names, ["alpha", "beta"]);
        let found: Vec<String> = hooks(&dir, &ImageName::parse("alpha").unwrap())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(found, ["10-first", "20-second"]);
        assert!(hooks(&dir, &ImageName::parse("beta").unwrap()).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
