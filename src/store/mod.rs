//! The image store: `ROOT/NAME/` with `<unix-time>_<pid>` snapshots and the `current` symlink.

pub mod backend;
pub mod busy;
pub mod gc;
pub mod transaction;

use crate::error::{Context, Error, Result};
use crate::lock::{Lock, Mode};
use crate::names::{ImageName, JobId, SnapshotName};
use crate::settings::Settings;
use backend::Backend;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The symlink naming the snapshot in production.
pub const CURRENT: &str = "current";
/// Prefix of a snapshot a transaction is still working on.
pub const PENDING_PREFIX: &str = ".tx-";
/// Prefix of the temporary link a switch of `current` renames over it.
pub const CURRENT_TEMP_PREFIX: &str = ".current.";
/// Prefix of the ephemeral copies systemd-nspawn makes next to the tree it boots.
pub const EPHEMERAL_PREFIX: &str = ".#machine.";
/// Serialises transactions on one image.
const TRANSACTION_LOCK: &str = ".lock";
/// Taken shared while a job pins a snapshot, exclusive while gc decides what to delete.
const PIN_LOCK: &str = ".pin.lock";
/// Per-job writable layers (overlay upper dirs) live here, beside the images.
const JOBS_DIR: &str = ".jobs";

/// An image store rooted at `NSPAWN_RUNNER_ROOT`.
pub struct Store {
    root: PathBuf,
    backend: Box<dyn Backend>,
    lock_timeout: Duration,
}

impl Store {
    /// Opens the store; it must exist (`image create` or `image import` makes it).
    pub fn open(settings: &Settings) -> Result<Store> {
        let root = settings.root.clone();
        let meta = std::fs::metadata(&root)
            .with_context(|| format!("no image store at {} (create an image first)", root.display()))?;
        if !meta.is_dir() {
            return Err(Error::new(format!("image store {} is not a directory", root.display())));
        }
        let backend = backend::detect(&root)?;
        Ok(Store::with_backend(settings, backend))
    }

    /// The store of `settings` on a backend chosen by the caller (unit tests use a fake one).
    pub fn with_backend(settings: &Settings, backend: Box<dyn Backend>) -> Store {
        Store { root: settings.root.clone(), backend, lock_timeout: settings.lock_timeout() }
    }

    /// Opens the store, creating its root directory (root-only) if it does not exist yet.
    pub fn open_or_create(settings: &Settings) -> Result<Store> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.root)
            .with_context(|| format!("creating image store {}", settings.root.display()))?;
        Store::open(settings)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The image `name`, whose directory need not exist yet; one that is a symlink (or not a
    /// directory at all) is refused: nothing in an image directory outside the store is ever
    /// read as a snapshot, booted, written or deleted.
    pub fn image(&self, name: &ImageName) -> Result<Image<'_>> {
        let dir = self.root.join(name.as_str());
        check_store_dir(&dir).map_err(|e| e.context(format!("image {name}")))?;
        Ok(Image { store: self, dir, name: name.clone() })
    }

    /// Every image in the store, sorted: the entries with a valid name that are directories, and
    /// those that are symlinks, so that commands going through every image name them (`image`
    /// refuses them) instead of passing over them in silence.
    pub fn images(&self) -> Result<Vec<ImageName>> {
        let mut names = Vec::new();
        for entry in read_dir(&self.root)? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(image) = ImageName::parse(name) {
                if entry.file_type().map(|t| t.is_dir() || t.is_symlink()).unwrap_or(false) {
                    names.push(image);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// The directory holding one job's private writable layer.
    pub fn job_dir(&self, machine: &str) -> PathBuf {
        job_dir_in(&self.root, machine)
    }

    /// Deletes the job directory of `machine`, which no job's record claims, unless something
    /// still uses it (see `busy`): then it says what, and nothing is deleted.
    pub fn delete_unclaimed_job_dir(&self, machine: &str, users: &busy::Users) -> Result<Option<String>> {
        match busy::user_of(&self.job_dir(machine), users) {
            Some(user) => Ok(Some(user)),
            None => self.delete_job_dir(machine).map(|()| None),
        }
    }

    /// Deletes the job directory of `machine` (fine if it is gone), only below a `.jobs` that is
    /// the store's own directory.
    fn delete_job_dir(&self, machine: &str) -> Result<()> {
        self.check_jobs_dir()?;
        self.backend.delete(&self.job_dir(machine))
    }

    /// Creates the job's private directory, empty (an earlier attempt's is thrown away), with
    /// an overlay upper dir whose owner and mode are those of `tree`'s root: overlayfs shows
    /// the upper dir's attributes as the machine's `/`, and a 0700 root locks out every
    /// service that does not run as root.
    pub fn create_job_dir(&self, machine: &str, tree: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        self.check_jobs_dir()?;
        let dir = self.job_dir(machine);
        self.backend.delete(&dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let root = std::fs::metadata(tree).with_context(|| format!("stat {}", tree.display()))?;
        let upper = dir.join("upper");
        std::fs::create_dir(&upper).with_context(|| format!("creating {}", upper.display()))?;
        std::os::unix::fs::chown(&upper, Some(root.uid()), Some(root.gid()))
            .with_context(|| format!("chown {}", upper.display()))?;
        std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(root.mode() & 0o7777))
            .with_context(|| format!("chmod {}", upper.display()))
    }

    /// Where job `job` on snapshot `snapshot` of `image` may have left things.
    pub fn job_leftovers(&self, image: &ImageName, snapshot: &SnapshotName, job: &JobId) -> JobLeftovers<'_> {
        JobLeftovers { store: self, image: image.clone(), snapshot: snapshot.clone(), job: job.clone() }
    }

    /// Names of every job directory present (for gc of crashed jobs).
    pub fn job_dirs(&self) -> Result<Vec<String>> {
        self.check_jobs_dir()?;
        let dir = self.root.join(JOBS_DIR);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        Ok(read_dir(&dir)?.filter_map(|e| e.file_name().into_string().ok()).collect())
    }

    /// Makes the deletions of what crashed jobs left survive a crash: their directories in
    /// `.jobs` and, on btrfs (whose commit covers the whole file system), their nspawn copies.
    pub fn make_job_deletions_durable(&self) -> Result<()> {
        let dir = self.root.join(JOBS_DIR);
        self.backend.make_durable(if dir.is_dir() { &dir } else { &self.root })
    }

    /// Refuses a `.jobs` that is a symlink: job directories are made and deleted in it.
    fn check_jobs_dir(&self) -> Result<()> {
        check_store_dir(&self.root.join(JOBS_DIR))
    }
}

/// What one entry of an image directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Snapshot(SnapshotName),
    /// A transaction's work in progress (or the leftover of a crashed one).
    Pending(String),
    /// nspawn's ephemeral copy for a running (or crashed) job.
    Ephemeral(String),
    /// A lock file nspawn keeps beside a tree it uses (`.#NAME.lck`); stale once nobody holds it.
    NspawnLock(String),
    /// The `current` link, lock files.
    Bookkeeping(String),
    /// Anything else; never touched.
    Foreign(String),
}

/// One image of the store.
pub struct Image<'s> {
    store: &'s Store,
    name: ImageName,
    dir: PathBuf,
}

impl Image<'_> {
    pub fn name(&self) -> &ImageName {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn store(&self) -> &Store {
        self.store
    }

    /// True when the image directory uses this layout (has a `current` link, even a broken one).
    pub fn exists(&self) -> bool {
        std::fs::symlink_metadata(self.dir.join(CURRENT)).is_ok()
    }

    /// True when the directory is what a creation cut short (a crash or power cut during `image create`
    /// or a first `import`) leaves: no `current`, not the old layout, only leftovers for gc.
    pub fn unfinished(&self) -> bool {
        self.dir.is_dir() && !self.exists() && !is_old_layout(&self.dir)
    }

    /// Fails with a helpful message when the image does not exist.
    pub fn must_exist(&self) -> Result<()> {
        if self.exists() {
            return Ok(());
        }
        let mut available = self.store.images().unwrap_or_default();
        available.retain(|name| self.store.image(name).is_ok());
        let available: Vec<&str> = available.iter().map(ImageName::as_str).collect();
        if is_old_layout(&self.dir) {
            return Err(Error::new(format!(
                "image {} is in the old single-tree layout; run `nspawn-runner image adopt {}`",
                self.name, self.name
            )));
        }
        Err(Error::new(format!(
            "image {} does not exist in {} (available: {})",
            self.name,
            self.store.root.display(),
            if available.is_empty() { "none".to_owned() } else { available.join(", ") }
        )))
    }

    pub fn snapshot_path(&self, snapshot: &SnapshotName) -> PathBuf {
        self.dir.join(snapshot.to_string())
    }

    /// The snapshot `current` points to, checked to be a snapshot directory of this image:
    /// `current` is a symlink to a bare snapshot name, and that entry is a directory (not a
    /// symlink to one).
    pub fn current(&self) -> Result<SnapshotName> {
        self.must_exist()?;
        let link = self.dir.join(CURRENT);
        if !std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::new(format!("image {}: {} is not a symlink", self.name, link.display())));
        }
        let target = std::fs::read_link(&link).with_context(|| format!("reading {}", link.display()))?;
        let target_str = target.to_str().unwrap_or("");
        let snapshot = SnapshotName::parse(target_str).map_err(|_| {
            Error::new(format!(
                "image {}: {} points to {:?}, which is not a snapshot of this image",
                self.name,
                link.display(),
                target
            ))
        })?;
        let path = self.snapshot_path(&snapshot);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(snapshot),
            Ok(meta) if meta.file_type().is_symlink() => Err(Error::new(format!(
                "image {}: {} points to {snapshot}, which is a symlink, not a snapshot directory",
                self.name,
                link.display()
            ))),
            _ => Err(Error::new(format!(
                "image {}: {} is dangling (snapshot {} is missing)",
                self.name,
                link.display(),
                snapshot
            ))),
        }
    }

    /// Every entry of the image directory, classified.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for entry in read_dir(&self.dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            entries.push(classify(&name, is_dir));
        }
        Ok(entries)
    }

    /// Committed snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotName>> {
        let mut snapshots: Vec<SnapshotName> = self
            .entries()?
            .into_iter()
            .filter_map(|e| match e {
                Entry::Snapshot(s) => Some(s),
                _ => None,
            })
            .collect();
        snapshots.sort();
        Ok(snapshots)
    }

    /// Atomically points `current` at `snapshot`: a new symlink renamed over the old one, then
    /// the directory is fsynced so the switch survives a crash.
    pub fn switch_current(&self, snapshot: &SnapshotName) -> Result<()> {
        let path = self.snapshot_path(snapshot);
        if !std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::new(format!("image {}: no snapshot {}", self.name, snapshot)));
        }
        let temp = self.dir.join(format!("{CURRENT_TEMP_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(snapshot.to_string(), &temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        if let Err(e) = std::fs::rename(&temp, self.dir.join(CURRENT)) {
            let _ = std::fs::remove_file(&temp);
            return Err(Error::from(e).context(format!("switching {}/current", self.dir.display())));
        }
        fsync_dir(&self.dir)
    }

    /// Serialises transactions on this image.
    pub fn lock_transactions(&self) -> Result<Lock> {
        Lock::acquire(
            &self.dir.join(TRANSACTION_LOCK),
            Mode::Exclusive,
            self.store.lock_timeout,
            &format!("image {} (another maintenance is running)", self.name),
        )
    }

    /// Shared by jobs pinning a snapshot; exclusive for gc.
    pub fn lock_pins(&self, mode: Mode) -> Result<Lock> {
        Lock::acquire(&self.dir.join(PIN_LOCK), mode, self.store.lock_timeout, &format!("image {}", self.name))
    }
}

fn classify(name: &str, is_dir: bool) -> Entry {
    if let Ok(snapshot) = SnapshotName::parse(name) {
        if is_dir {
            return Entry::Snapshot(snapshot);
        }
    }
    if name.starts_with(PENDING_PREFIX) {
        Entry::Pending(name.to_owned())
    } else if name.starts_with(EPHEMERAL_PREFIX) {
        Entry::Ephemeral(name.to_owned())
    } else if name.starts_with(".#") && name.ends_with(".lck") && !is_dir {
        Entry::NspawnLock(name.to_owned())
    } else if name == CURRENT || name == TRANSACTION_LOCK || name == PIN_LOCK || name.starts_with(CURRENT_TEMP_PREFIX) {
        Entry::Bookkeeping(name.to_owned())
    } else {
        Entry::Foreign(name.to_owned())
    }
}

fn read_dir(dir: &Path) -> Result<impl Iterator<Item = std::fs::DirEntry>> {
    Ok(std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.filter_map(|e| e.ok()))
}

/// True when `dir` is an image of the Python nspawn-runner: the OS tree itself, no snapshots.
pub fn is_old_layout(dir: &Path) -> bool {
    dir.join("usr").is_dir()
}

/// What a job may leave in the store: nspawn's ephemeral copy of its snapshot (with the lock
/// file nspawn keeps beside it; both stay behind when nspawn is killed) and its overlay job
/// directory. Every path it deletes is derived from the store root of the settings and
/// validated names; a path recorded elsewhere (a state file) is only deleted when it is one
/// of those.
pub struct JobLeftovers<'s> {
    store: &'s Store,
    image: ImageName,
    snapshot: SnapshotName,
    job: JobId,
}

impl JobLeftovers<'_> {
    /// What uses nspawn's copy `ephemeral` or the job's directory, if anything, among `users`
    /// (see `busy`): a live machine whatever its record says.
    fn user_in(&self, ephemeral: Option<&Path>, users: &busy::Users) -> Option<String> {
        let job_dir = self.store.job_dir(&self.job.machine_name());
        let user = ephemeral
            .into_iter()
            .chain([job_dir.as_path()])
            .find_map(|tree| busy::user_of(tree, users).map(|user| format!("{}: {user}", tree.display())));
        user
    }

    /// Deletes the job's overlay directory and nspawn's copy `ephemeral`; what is already gone
    /// is fine. Without a recorded copy (a machine that never came up: its nspawn may have made
    /// one and died without removing it) every copy of the job's snapshot that nothing uses
    /// goes: nspawn locks a copy before it makes it, so a copy nothing uses is a dead machine's.
    /// A copy that is not one of this job's snapshot in its image's directory is refused, and
    /// so is anything still in use; then nothing is deleted.
    pub fn delete(&self, ephemeral: Option<&Path>) -> Result<()> {
        match self.delete_unless_used(ephemeral)? {
            Some(user) => {
                Err(Error::new(format!("refusing to delete what job {} left, still in use: {user}", self.job)))
            }
            None => Ok(()),
        }
    }

    /// `delete`, except that what is still in use is not an error: then nothing is deleted and
    /// what uses it is returned, as the kernel tells right before the deletion.
    pub fn delete_unless_used(&self, ephemeral: Option<&Path>) -> Result<Option<String>> {
        if let Some(copy) = ephemeral {
            if !is_copy_of(copy, &self.store.root, &self.image, &self.snapshot) {
                return Err(Error::new(format!(
                    "refusing to delete {}: not an nspawn copy of image {} in the store",
                    copy.display(),
                    self.image
                )));
            }
        }
        // Copies' paths go through the image directory, which must still be the store's.
        self.store.image(&self.image)?;
        let users = busy::Users::scan();
        if let Some(user) = self.user_in(ephemeral, &users) {
            return Ok(Some(user));
        }
        let copies = match ephemeral {
            Some(copy) => vec![copy.to_path_buf()],
            None => self.unused_copies(&users)?,
        };
        for copy in copies {
            self.store.backend.delete(&copy)?;
            remove_if_present(&busy::nspawn_lock_path(&copy))?;
        }
        self.store.delete_job_dir(&self.job.machine_name()).map(|()| None)
    }

    /// The copies of the job's snapshot in its image's directory that nothing uses.
    fn unused_copies(&self, users: &busy::Users) -> Result<Vec<PathBuf>> {
        let dir = self.store.root.join(self.image.as_str());
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let copies = read_dir(&dir)?
            .map(|entry| entry.path())
            .filter(|path| is_copy_of(path, &self.store.root, &self.image, &self.snapshot))
            .filter(|path| busy::user_of(path, users).is_none());
        Ok(copies.collect())
    }
}

/// Accepts a directory of the store at `path`, or nothing there (yet); refuses a symlink, whose
/// target may lie anywhere, and any other kind of file.
fn check_store_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::from(e).context(format!("stat {}", path.display()))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(path).unwrap_or_default();
            Err(Error::new(format!(
                "{} is a symlink (to {}), not a directory of the store: refusing to follow it",
                path.display(),
                target.display()
            )))
        }
        Ok(_) => Err(Error::new(format!("{} is not a directory", path.display()))),
    }
}

/// The job directory of machine `machine` in the store at `root`.
pub fn job_dir_in(root: &Path, machine: &str) -> PathBuf {
    root.join(JOBS_DIR).join(machine)
}

/// True when `copy` is named like an nspawn copy of `snapshot`, or of the transaction tree that
/// becomes it (a health check boots that: `.#machine.[.tx-]<snapshot><random>`), and lies
/// directly in the directory of `image` in the store at `root`.
pub fn is_copy_of(copy: &Path, root: &Path, image: &ImageName, snapshot: &SnapshotName) -> bool {
    let named = copy.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        [format!("{EPHEMERAL_PREFIX}{snapshot}"), format!("{EPHEMERAL_PREFIX}{PENDING_PREFIX}{snapshot}")]
            .iter()
            .any(|prefix| n.starts_with(prefix.as_str()) && n != prefix)
    });
    named && copy.parent() == Some(root.join(image.as_str()).as_path())
}

/// Removes a file; one that is already gone is fine.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::from(e).context(format!("removing {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` (mode 0600) atomically: into `temp` beside it, fsynced, renamed
/// over `path`. On any error `temp` is removed again: a full file system keeps nothing of a
/// write that failed.
pub fn write_atomically(path: &Path, temp: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(temp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(temp);
        Error::from(e).context(format!("writing {}", path.display()))
    })
}

/// fsyncs a directory, making renames and new entries in it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    file.sync_all().with_context(|| format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_classified_by_name_and_type() {
        assert_eq!(classify("1700000000_12", true), Entry::Snapshot(SnapshotName::new(1700000000, 12)));
        assert_eq!(classify("1700000000_12", false), Entry::Foreign("1700000000_12".into()));
        assert_eq!(classify(".tx-1_2", true), Entry::Pending(".tx-1_2".into()));
        assert_eq!(classify(".#machine.1_2abc", true), Entry::Ephemeral(".#machine.1_2abc".into()));
        assert_eq!(classify(".#1_2.lck", false), Entry::NspawnLock(".#1_2.lck".into()));
        assert_eq!(classify(".#.#machine.1_2abc.lck", false), Entry::NspawnLock(".#.#machine.1_2abc.lck".into()));
        assert_eq!(classify("current", false), Entry::Bookkeeping("current".into()));
        assert_eq!(classify(".current.77", false), Entry::Bookkeeping(".current.77".into()));
        assert_eq!(classify("etc", true), Entry::Foreign("etc".into()));
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-write-test-{}", std::process::id()));
        let (path, temp) = (dir.join("7.json"), dir.join(".7.json.tmp"));
        std::fs::create_dir_all(&dir).unwrap();
        write_atomically(&path, &temp, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        // The rename fails: a directory (not empty) is where the file goes.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("x")).unwrap();
        let e = write_atomically(&path, &temp, b"two").unwrap_err();
        assert!(e.to_string().starts_with(&format!("writing {}: ", path.display())), "{e}");
        assert!(std::fs::symlink_metadata(&temp).is_err(), "{} left behind", temp.display());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_real_directories_are_store_directories() {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-store-dir-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("link")).unwrap();
        std::fs::write(dir.join("file"), "").unwrap();
        assert!(check_store_dir(&dir.join("real")).is_ok());
        assert!(check_store_dir(&dir.join("missing")).is_ok());
        let e = check_store_dir(&dir.join("link")).unwrap_err().to_string();
        assert!(e.contains("is a symlink (to real)"), "{e}");
        assert!(check_store_dir(&dir.join("file")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_nspawn_copies_of_the_jobs_snapshot_in_its_image_dir_are_leftovers() {
        let (image, snapshot) = (ImageName::parse("img").unwrap(), SnapshotName::new(1, 2));
        let root = Path::new("/s/root");
        assert!(is_copy_of(Path::new("/s/root/img/.#machine.1_2abc"), root, &image, &snapshot));
        assert!(is_copy_of(Path::new("/s/root/img/.#machine..tx-1_2abc"), root, &image, &snapshot));
        for bad in [
            "/s/root/img/.#machine.1_2",
            "/s/root/img/.#machine..tx-1_2",
            "/s/root/img/.#machine..tx-3_4abc",
            "/s/root/img/.#machine.3_4abc",
            "/s/root/other/.#machine.1_2abc",
            "/s/root/img/../img/.#machine.1_2abc",
            "/s/root/img/x/.#machine.1_2abc",
            "/etc/.#machine.1_2abc",
            "/s/root/img/1_2",
        ] {
            assert!(!is_copy_of(Path::new(bad), root, &image, &snapshot), "{bad} accepted");
        }
    }
}
