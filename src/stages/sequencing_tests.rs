//! Unit tests of the order of prepare's, cleanup's and gc's steps and of their rollback, without
//! root: a fake Host and a fake snapshot Backend record what they are asked and fail where told.

use super::cleanup::{cleanup_job, stop_over_age};
use super::prepare::prepare_job;
use crate::error::{Error, Result};
use crate::jobs::env::JobEnv;
use crate::jobs::leases::reap_crashed;
use crate::jobs::state::{unix_now, Phase, StateDir};
use crate::jobs::JobContext;
use crate::machine::{process_start_time, Booting, Host, Machine, MachineSpec, Running, Save};
use crate::names::{ImageName, JobId};
use crate::settings::Settings;
use crate::store::backend::{Backend, JobRoot};
use crate::store::{gc, Store};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// What the fakes were asked, in order, and the one call that is to fail.
#[derive(Default)]
struct Script {
    calls: Vec<String>,
    fail: Option<String>,
    /// The job's state file as it was right after the host's write-ahead, before the machine
    /// was ready: what a prepare SIGKILLed at that instant leaves.
    written_ahead: Option<Vec<u8>>,
}

type Shared = Rc<RefCell<Script>>;

/// Records `call`; fails if it is the call told to fail (once).
fn record(script: &Shared, call: String) -> Result<()> {
    let mut script = script.borrow_mut();
    script.calls.push(call.clone());
    if script.fail.as_deref() == Some(call.as_str()) {
        script.fail = None;
        return Err(Error::new(format!("injected failure of {call}")));
    }
    Ok(())
}

struct FakeBackend {
    script: Shared,
    root: JobRoot,
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn create_empty(&self, path: &Path) -> Result<()> {
        Ok(std::fs::create_dir(path)?)
    }
    fn snapshot(&self, _source: &Path, _dest: &Path) -> Result<()> {
        Err(Error::new("jobs never snapshot"))
    }
    fn delete(&self, path: &Path) -> Result<()> {
        record(&self.script, format!("delete {}", path.file_name().unwrap_or_default().to_string_lossy()))?;
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
    fn job_root(&self) -> JobRoot {
        self.root
    }
    fn make_durable(&self, dir: &Path) -> Result<()> {
        record(&self.script, format!("durable {}", dir.file_name().unwrap_or_default().to_string_lossy()))
    }
}

/// A host whose "machines" are this test process; on ephemeral stores it makes the copy nspawn
/// would make, so cleanup has something to delete. Like the real ones it records its nspawn
/// (here: this process) before the machine is ready.
struct FakeHost {
    script: Shared,
    /// The job's state file.
    record: PathBuf,
}

impl Host for FakeHost {
    fn start(&self, spec: &MachineSpec, machine: &mut Machine, save: &mut Save) -> Result<()> {
        record(&self.script, format!("start {}", spec.machine))?;
        let me = std::process::id() as i32;
        let start = process_start_time(me).ok_or_else(|| Error::new("no start time"))?;
        machine.booting = Some(Booting { nspawn: Some((me, start)), cgroups: Vec::new() });
        save(machine)?;
        self.script.borrow_mut().written_ahead = std::fs::read(&self.record).ok();
        record(&self.script, format!("ready {}", spec.machine))?;
        let ephemeral = match spec.root {
            JobRoot::EphemeralSnapshot => {
                let tree_name = spec.tree.file_name().unwrap_or_default().to_string_lossy();
                let n = self.script.borrow().calls.len();
                let copy = spec.tree.with_file_name(format!(".#machine.{tree_name}{n}"));
                std::fs::create_dir(&copy)?;
                Some(copy)
            }
            JobRoot::Overlay | JobRoot::Volatile => None,
        };
        machine.running = Some(Running {
            nspawn_pid: me,
            nspawn_start_time: start,
            leader_pid: me,
            leader_start_time: start,
            ephemeral,
            cgroup: None,
            cgroups: Vec::new(),
        });
        machine.booting = None;
        Ok(())
    }
    fn stop(&self, machine: &Machine, _timeout: std::time::Duration) -> Result<()> {
        let booting = machine.running.is_none() && machine.is_booting();
        record(&self.script, format!("stop {}{}", machine.name, if booting { " (booting)" } else { "" }))
    }
    /// This process has no filter to read (and may not ptrace itself): only recorded.
    fn capture_seccomp(&self, _running: &Running, path: &Path) -> Result<()> {
        record(&self.script, format!("capture {}", path.file_name().unwrap_or_default().to_string_lossy()))
    }
}

/// A store with one image `img` (snapshot 1_2 is current), a state dir and a cache dir in a
/// temporary directory of its own.
struct World {
    dir: PathBuf,
    ctx: JobContext,
    script: Shared,
    root: JobRoot,
}

impl World {
    fn new(name: &str, root: JobRoot) -> World {
        let dir = std::env::temp_dir().join(format!("nspawn-runner-seq-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/img/1_2")).unwrap();
        std::os::unix::fs::symlink("1_2", dir.join("root/img/current")).unwrap();
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let vars = [
            ("NSPAWN_RUNNER_ROOT", path("root")),
            ("NSPAWN_RUNNER_STATE_DIR", path("state")),
            ("NSPAWN_RUNNER_CACHE_DIR", path("cache")),
            ("NSPAWN_RUNNER_CONFIG_DIR", path("config")),
            ("NSPAWN_RUNNER_GITLAB_RUNNER", path("no-gitlab-runner")),
        ];
        let settings = Settings::from_vars(vars.map(|(k, v)| (k.to_owned(), v))).unwrap();
        let states = StateDir::new(&settings);
        let ctx = JobContext { settings, env: JobEnv::default(), job: JobId::parse("1").unwrap(), states };
        World { dir, ctx, script: Shared::default(), root }
    }

    fn store(&self) -> Store {
        let backend = FakeBackend { script: self.script.clone(), root: self.root };
        Store::with_backend(&self.ctx.settings, Box::new(backend))
    }

    fn fail(&self, call: &str) {
        self.script.borrow_mut().fail = Some(call.to_owned());
    }

    /// The calls so far, forgotten.
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut self.script.borrow_mut().calls)
    }

    fn host(&self) -> FakeHost {
        FakeHost { script: self.script.clone(), record: self.ctx.states.path(&self.ctx.job) }
    }

    fn prepare(&self) -> Result<()> {
        let host = self.host();
        prepare_job(&self.ctx, &self.store(), &host, &ImageName::parse("img").unwrap(), Some(7))
    }

    fn cleanup(&self) -> Result<()> {
        let host = self.host();
        cleanup_job(&self.ctx, &host, |_| Ok(self.store()))
    }

    fn names(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join(dir))
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[track_caller]
    fn assert_nothing_left(&self) {
        assert_eq!(self.names("state"), Vec::<String>::new(), "state files left");
        assert_eq!(self.names("root/.jobs"), Vec::<String>::new(), "job directories left");
        assert_eq!(self.names("root/img"), [".pin.lock", "1_2", "current"], "leftovers in the image");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BOTH: [JobRoot; 2] = [JobRoot::EphemeralSnapshot, JobRoot::Overlay];

#[test]
fn a_job_boots_then_cleanup_stops_it_and_deletes_what_it_left() {
    for root in BOTH {
        let world = World::new(&format!("ok-{root:?}"), root);
        world.prepare().unwrap();
        let state = world.ctx.states.load(&world.ctx.job).unwrap().unwrap();
        assert_eq!(state.phase, Phase::Running);
        let job_dir = match root {
            JobRoot::Overlay => vec!["delete run-1", "start run-1", "ready run-1", "capture 1.seccomp"],
            JobRoot::EphemeralSnapshot | JobRoot::Volatile => vec!["start run-1", "ready run-1", "capture 1.seccomp"],
        };
        assert_eq!(world.calls(), job_dir);
        world.cleanup().unwrap();
        let copy = state.machine.running.and_then(|r| r.ephemeral);
        let mut expected = vec!["stop run-1".to_owned()];
        expected.extend(copy.and_then(|c| c.file_name().map(|n| format!("delete {}", n.to_string_lossy()))));
        expected.push("delete run-1".to_owned());
        assert_eq!(world.calls(), expected);
        world.assert_nothing_left();
        world.cleanup().unwrap();
        world.assert_nothing_left();
    }
}

#[test]
fn a_failure_at_each_step_of_prepare_leaves_nothing_behind() {
    for root in BOTH {
        for step in ["delete run-1", "start run-1", "ready run-1", "capture 1.seccomp", "cache dir"] {
            if root == JobRoot::EphemeralSnapshot && step == "delete run-1" {
                continue; // no job directory on such stores
            }
            let world = World::new(&format!("fail-{root:?}-{}", step.replace(' ', "-")), root);
            if step == "cache dir" {
                std::fs::write(world.dir.join("cache"), "a file where the cache dir goes").unwrap();
            } else {
                world.fail(step);
            }
            let err = world.prepare().unwrap_err();
            assert!(err.to_string().starts_with("preparing job 1: "), "{err}");
            let calls = world.calls();
            assert!(calls.iter().any(|c| c.starts_with("stop run-1")), "no rollback after {step} failed: {calls:?}");
            if step == "ready run-1" {
                assert!(calls.contains(&"stop run-1 (booting)".to_owned()), "{calls:?}");
            }
            assert_eq!(calls.last().map(String::as_str), Some("delete run-1"), "{calls:?}");
            world.assert_nothing_left();
        }
    }
}

#[test]
fn a_cleanup_whose_stop_fails_keeps_the_record_and_the_next_one_finishes() {
    for root in BOTH {
        let world = World::new(&format!("stop-fails-{root:?}"), root);
        world.prepare().unwrap();
        world.calls();
        world.fail("stop run-1");
        assert!(world.cleanup().is_err());
        assert_eq!(world.calls(), ["stop run-1"], "deleted what a machine that may still run uses");
        let state =
            world.ctx.states.load(&world.ctx.job).unwrap().expect("the record is gone: nothing can stop it now");
        assert_eq!(state.phase, Phase::Stopping);
        world.cleanup().unwrap();
        assert_eq!(world.calls().first().map(String::as_str), Some("stop run-1"));
        world.assert_nothing_left();
    }
}

#[test]
fn an_image_without_current_changes_nothing() {
    let world = World::new("no-current", JobRoot::Overlay);
    std::fs::remove_file(world.dir.join("root/img/current")).unwrap();
    assert!(world.prepare().is_err());
    assert!(world.calls().is_empty());
    assert!(!world.dir.join("state").exists());
}

#[test]
fn a_retry_cleans_up_the_earlier_attempt_first() {
    for root in BOTH {
        let world = World::new(&format!("retry-{root:?}"), root);
        world.prepare().unwrap();
        let first = world.ctx.states.load(&world.ctx.job).unwrap().unwrap();
        world.calls();
        world.prepare().unwrap();
        let calls = world.calls();
        assert_eq!(calls.first().map(String::as_str), Some("stop run-1"), "{calls:?}");
        assert_eq!(calls.last().map(String::as_str), Some("capture 1.seccomp"), "{calls:?}");
        if let Some(copy) = first.machine.running.and_then(|r| r.ephemeral) {
            assert!(!copy.exists(), "the first attempt's copy {} is left", copy.display());
        }
        world.cleanup().unwrap();
        world.assert_nothing_left();
    }
}

#[test]
fn a_recorded_copy_outside_the_store_is_never_deleted() {
    let world = World::new("hostile", JobRoot::EphemeralSnapshot);
    world.prepare().unwrap();
    let decoy = world.dir.join("decoy/.#machine.1_2x");
    std::fs::create_dir_all(&decoy).unwrap();
    let mut state = world.ctx.states.load(&world.ctx.job).unwrap().unwrap();
    let real = state.machine.running.as_mut().unwrap().ephemeral.replace(decoy.clone()).unwrap();
    world.ctx.states.save(&state).unwrap();
    let err = world.cleanup().unwrap_err();
    assert!(err.to_string().contains("refusing state file"), "{err}");
    assert!(decoy.is_dir(), "the decoy outside the store was deleted");
    std::fs::remove_dir_all(real).unwrap();
}

#[test]
fn image_settings_choose_the_job_root_and_bad_ones_change_nothing() {
    let world = World::new("image-conf", JobRoot::EphemeralSnapshot);
    std::fs::create_dir_all(world.dir.join("config")).unwrap();
    let conf = world.dir.join("config/img.conf");
    std::fs::write(&conf, "root=overlay\nmemory_max=1G\n").unwrap();
    world.prepare().unwrap();
    assert_eq!(
        world.calls(),
        ["delete run-1", "start run-1", "ready run-1", "capture 1.seccomp"],
        "root=overlay makes a job dir on btrfs too"
    );
    let state = world.ctx.states.load(&world.ctx.job).unwrap().unwrap();
    assert!(state.job_dir.is_some());
    world.cleanup().unwrap();
    world.calls();
    world.assert_nothing_left();
    for bad in ["memorymax=1G\n", "root=tmpfs\n", "binds=relative/path\n", "binds=/nonexistent-nspawn-runner\n"] {
        std::fs::write(&conf, bad).unwrap();
        let e = world.prepare().unwrap_err();
        assert!(e.to_string().contains("img.conf"), "{bad:?}: {e}");
        assert!(world.calls().is_empty(), "{bad:?} started something");
        world.assert_nothing_left();
    }
    // A volatile root cannot have a user namespace: only privileged images get one.
    std::fs::write(&conf, "root=volatile\n").unwrap();
    let e = world.prepare().unwrap_err();
    assert!(e.to_string().contains("privileged=true"), "{e}");
    assert!(world.calls().is_empty(), "root=volatile without privileged started something");
    world.assert_nothing_left();
}

#[test]
fn gc_makes_its_renames_durable_before_deleting_and_its_deletions_before_reporting_them() {
    let world = World::new("gc", JobRoot::EphemeralSnapshot);
    let collect = || {
        let store = world.store();
        gc::collect_image(&store.image(&ImageName::parse("img").unwrap())?, &world.ctx.states, 0)
    };
    let old_ones = ["root/img/1_0", "root/img/1_1", "root/img/.tx-9_9"];
    for dir in old_ones {
        std::fs::create_dir(world.dir.join(dir)).unwrap();
    }
    assert_eq!(collect().unwrap(), ["1_0", "1_1", ".tx-9_9"]);
    // Once per image and run, not per entry.
    assert_eq!(
        world.calls(),
        ["durable img", "delete .tx-gc-1_0", "delete .tx-gc-1_1", "delete .tx-9_9", "durable img"]
    );
    assert_eq!(world.names("root/img"), [".lock", ".pin.lock", "1_2", "current"]);
    assert!(collect().unwrap().is_empty());
    assert!(world.calls().is_empty(), "nothing to delete costs no commit");

    // Renames that cannot be made durable: nothing is deleted, nothing reported.
    for dir in old_ones {
        std::fs::create_dir(world.dir.join(dir)).unwrap();
    }
    world.fail("durable img");
    assert!(collect().is_err());
    assert_eq!(world.calls(), ["durable img"]);
    assert_eq!(
        world.names("root/img"),
        [".lock", ".pin.lock", ".tx-9_9", ".tx-gc-1_0", ".tx-gc-1_1", "1_2", "current"]
    );
    // The next run deletes what was moved aside.
    let mut deleted = collect().unwrap();
    deleted.sort();
    assert_eq!(deleted, [".tx-9_9", ".tx-gc-1_0", ".tx-gc-1_1"]);
    assert_eq!(world.calls().last().map(String::as_str), Some("durable img"));
}

#[test]
fn reaping_crashed_jobs_makes_its_deletions_durable_before_reporting_them() {
    let world = World::new("reap", JobRoot::Overlay);
    std::fs::create_dir_all(world.dir.join("root/.jobs/run-9/upper")).unwrap();
    world.ctx.settings.ensure_state_dir().unwrap();
    let store = world.store();
    assert_eq!(reap_crashed(&store, &world.ctx.states).unwrap(), ["run-9"]);
    assert_eq!(world.calls(), ["delete run-9", "durable .jobs"]);
    assert!(reap_crashed(&store, &world.ctx.states).unwrap().is_empty());
    assert!(world.calls().is_empty(), "nothing to reap costs no commit");
}

#[test]
fn gc_cleans_every_job_over_the_max_age_even_when_one_cannot_be_stopped() {
    let world = World::new("over-age", JobRoot::Overlay);
    let host = world.host();
    let job = |id: &str| JobContext {
        settings: world.ctx.settings.clone(),
        env: JobEnv::default(),
        job: JobId::parse(id).unwrap(),
        states: StateDir::new(&world.ctx.settings),
    };
    let image = ImageName::parse("img").unwrap();
    for id in ["1", "2", "3"] {
        prepare_job(&job(id), &world.store(), &host, &image, Some(7)).unwrap();
    }
    // jobs 1 and 2 were prepared 7 h ago (the default limit is 6 h), job 3 just now
    for id in ["1", "2"] {
        let ctx = job(id);
        let mut state = ctx.states.load(&ctx.job).unwrap().unwrap();
        state.pinned_at = Some(unix_now() - 7 * 3600);
        ctx.states.save(&state).unwrap();
    }
    world.calls();
    let mut off = world.ctx.settings.clone();
    off.max_job_age = 0;
    assert!(stop_over_age(&off, &host, &world.store()).unwrap().is_empty());
    assert!(world.calls().is_empty(), "NSPAWN_RUNNER_MAX_JOB_AGE=0 stopped something");
    // job 1's machine cannot be stopped: a warning, and job 2 is still cleaned
    world.fail("stop run-1");
    let cleaned = stop_over_age(&world.ctx.settings, &host, &world.store()).unwrap();
    let cleaned: Vec<&str> = cleaned.iter().map(|state| state.job_id.as_str()).collect();
    assert_eq!(cleaned, ["2"]);
    assert_eq!(world.calls(), ["stop run-1", "stop run-2", "delete run-2"]);
    let on_record = |id: &str| job(id).states.load(&JobId::parse(id).unwrap()).unwrap().is_some();
    assert!(on_record("1") && !on_record("2") && on_record("3"));
    // the next gc tries job 1 again
    let cleaned = stop_over_age(&world.ctx.settings, &host, &world.store()).unwrap();
    assert_eq!(cleaned.len(), 1);
    cleanup_job(&job("3"), &host, |_| Ok(world.store())).unwrap();
    world.calls();
    world.assert_nothing_left();
}

#[test]
fn the_record_names_nspawn_before_the_machine_is_ready_so_a_killed_prepare_is_cleaned_up() {
    for root in BOTH {
        let world = World::new(&format!("write-ahead-{root:?}"), root);
        world.prepare().unwrap();
        let ahead = world.script.borrow_mut().written_ahead.take().expect("the host saved no record before ready");
        let state: crate::jobs::state::JobState = serde_json::from_slice(&ahead).unwrap();
        assert_eq!(state.phase, Phase::Booting);
        assert!(state.machine.running.is_none(), "written before the machine was ready");
        assert!(state.machine.is_booting(), "the record does not name the live nspawn: {state:?}");
        assert_eq!(state.job_dir.is_some(), root == JobRoot::Overlay);
        world.cleanup().unwrap();
        world.calls();
        // A prepare SIGKILLed right after the write-ahead leaves that record (and no lock
        // holder): cleanup stops the booting machine and deletes the rest.
        std::fs::create_dir_all(world.dir.join("root/.jobs/run-1/upper")).unwrap();
        std::fs::write(world.ctx.states.path(&world.ctx.job), &ahead).unwrap();
        std::fs::write(world.ctx.states.log_path(&world.ctx.job), "console output").unwrap();
        // Killed while saving a record or the seccomp filters: their temporary files.
        std::fs::write(world.dir.join("state/.1.json.tmp"), "{half a rec").unwrap();
        std::fs::write(world.dir.join("state/1.seccomp.tmp"), "half a filter").unwrap();
        world.cleanup().unwrap();
        assert_eq!(world.calls(), ["stop run-1 (booting)", "delete run-1"]);
        world.assert_nothing_left();
    }
}
