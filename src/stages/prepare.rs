//! The prepare stage: pin the image's current snapshot and boot the job's machine on it.

use super::cleanup::clean_job;
use crate::error::{Context, Error, Result};
use crate::jobs::state::{JobState, Phase};
use crate::jobs::JobContext;
use crate::lock::Mode;
use crate::machine::nspawn::Bind;
use crate::machine::{self, cgroup, idmap, Host, MachineSpec};
use crate::names::ImageName;
use crate::settings::{ImageSettings, RootKind, Settings, CACHE_DIR_IN_MACHINE};
use crate::store::backend::JobRoot;
use crate::store::{Image, Store};
use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

/// Where the host's gitlab-runner binary appears in machines (first in their PATH).
const GITLAB_RUNNER_IN_MACHINE: &str = "/usr/local/bin/gitlab-runner";
/// Where the host's step-runner appears: gitlab-runner runs CI Steps (`run:`) with the
/// `step-runner` it finds in the PATH of the job's environment.
const STEP_RUNNER_IN_MACHINE: &str = "/usr/local/bin/step-runner";

pub fn prepare(ctx: &JobContext, image_override: Option<&str>) -> Result<()> {
    let choice = crate::jobs::image::choose(image_override, ctx.env.job_image.as_deref(), &ctx.settings)?;
    // Everything that can be checked without writing is checked first: bad input changes nothing.
    let response = std::env::var_os("JOB_RESPONSE_FILE").map(PathBuf::from);
    let project = crate::jobs::env::project_id(response.as_deref())?;
    let store = Store::open(&ctx.settings)?;
    store.image(&choice.name).and_then(|image| image.current()).map_err(|e| e.context(&choice.how))?;
    let host = machine::host(&ctx.settings);
    prepare_job(ctx, &store, host.as_ref(), &choice.name, project)
}

/// prepare of `image_name` from `store` on `host` for a job of GitLab project `project`, step
/// by step; a failed step undoes the steps before it.
pub fn prepare_job(
    ctx: &JobContext,
    store: &Store,
    host: &dyn Host,
    image_name: &ImageName,
    project: Option<u64>,
) -> Result<()> {
    let image = store.image(image_name)?;
    image.current()?;
    let plan = JobPlan::new(&ctx.settings, store, image_name, project)?;
    // A SIGTERM (prepare timeout, cancel) must not leave a machine booting with nobody to stop it.
    let _deferred = crate::signals::Deferred::block();
    ctx.settings.ensure_state_dir()?;
    let _job_lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
    clean_earlier_attempt(ctx, store, host)?;
    let state = boot_pinned_machine(ctx, store, host, &image, plan)
        .map_err(|e| e.context(format!("preparing job {}", ctx.job)))?;
    println!(
        "nspawn-runner: machine {} is up: image {image_name}, snapshot {} ({} store)",
        state.machine.name,
        state.snapshot,
        store.backend().name()
    );
    Ok(())
}

/// A retry (gitlab-runner tries prepare up to 3 times) or a repeated prepare starts afresh.
fn clean_earlier_attempt(ctx: &JobContext, store: &Store, host: &dyn Host) -> Result<()> {
    match ctx.states.load(&ctx.job)? {
        Some(previous) => {
            log::info!("job {}: cleaning up an earlier attempt", ctx.job);
            clean_job(ctx, host, store, previous)
        }
        None => Ok(()),
    }
}

/// How the job's machine (or a health check's, which must be the same) is made, from the
/// settings and the image's settings, decided before anything is written.
pub(crate) struct JobPlan {
    pub root: JobRoot,
    /// The image's own read-only binds.
    pub image_binds: Vec<Bind>,
    pub properties: Vec<String>,
    pub limits: cgroup::Limits,
    /// No user namespace (the image's `privileged=true`).
    pub privileged: bool,
    /// The GitLab project, whose cache the job sees at /cache.
    project: Option<u64>,
}

impl JobPlan {
    pub(crate) fn new(
        settings: &Settings,
        store: &Store,
        image_name: &ImageName,
        project: Option<u64>,
    ) -> Result<JobPlan> {
        let image = ImageSettings::load(&settings.config_dir, image_name)?;
        let image_binds = image.bind_list()?.into_iter().map(|(host, inside)| Bind::read_only(host, inside)).collect();
        let over = |own: &Option<String>, global: &Option<String>| own.clone().or_else(|| global.clone());
        let root = job_root(store, &image)?;
        if root == JobRoot::Volatile && !image.privileged {
            // nspawn (252) cannot idmap the tmpfs overlay of --volatile for a user namespace.
            return Err(Error::new(format!(
                "image {image_name}: root=volatile needs privileged=true (no user namespace), or use root=overlay"
            )));
        }
        Ok(JobPlan {
            root,
            image_binds,
            properties: settings.unit_properties(&image),
            limits: cgroup::Limits {
                memory_max: over(&image.memory_max, &settings.memory_max),
                tasks_max: over(&image.tasks_max, &settings.tasks_max),
                cpu_weight: over(&image.cpu_weight, &settings.cpu_weight),
            },
            privileged: image.privileged,
            project,
        })
    }
}

/// The job root the image asks for (`root=` in its settings), else the store's own.
fn job_root(store: &Store, image: &ImageSettings) -> Result<JobRoot> {
    let default = store.backend().job_root();
    match image.root {
        None => Ok(default),
        Some(RootKind::Snapshot) if default == JobRoot::EphemeralSnapshot => Ok(default),
        Some(RootKind::Snapshot) => Err(Error::new(format!(
            "root=snapshot needs a btrfs store, and {} is {}",
            store.root().display(),
            store.backend().name()
        ))),
        Some(RootKind::Overlay) => Ok(JobRoot::Overlay),
        Some(RootKind::Volatile) => Ok(JobRoot::Volatile),
    }
}

/// The steps that leave something behind, each undone by `Attempt` if a later one fails.
fn boot_pinned_machine(
    ctx: &JobContext,
    store: &Store,
    host: &dyn Host,
    image: &Image,
    plan: JobPlan,
) -> Result<JobState> {
    let mut attempt = Attempt::pin(ctx, store, host, image, plan.privileged)?;
    attempt.make_job_dir(image, plan.root)?;
    let cache = plan.project.map(|project| make_project_cache(&ctx.settings, project)).transpose()?;
    attempt.start_machine(image, plan, cache)?;
    if crate::signals::stop_requested() {
        return Err(Error::new("interrupted"));
    }
    Ok(attempt.keep())
}

/// A prepare in progress, with the job's record saved after every step. Dropped before `keep`,
/// it rolls the job back: stops its machine, deletes what it left, its state and lock files.
/// gitlab-runner calls cleanup after a failed prepare too, which then finds nothing.
struct Attempt<'a> {
    ctx: &'a JobContext,
    store: &'a Store,
    host: &'a dyn Host,
    /// The record as far as the steps got (also when saving it failed).
    state: JobState,
    kept: bool,
}

impl<'a> Attempt<'a> {
    /// Resolves `current` and records the lease before gc can look again, with the job's uid
    /// range unless it is `privileged`.
    fn pin(
        ctx: &'a JobContext,
        store: &'a Store,
        host: &'a dyn Host,
        image: &Image,
        privileged: bool,
    ) -> Result<Attempt<'a>> {
        let forget_job = |e: Error| {
            let _ = ctx.states.remove(&ctx.job).and_then(|()| ctx.states.remove_lock(&ctx.job));
            e
        };
        let _pins = image.lock_pins(Mode::Shared).map_err(forget_job)?;
        let snapshot = image.current().map_err(forget_job)?;
        let mut state = JobState::pinned(ctx.job.clone(), store.root().to_path_buf(), image.name().clone(), snapshot);
        let _ranges = pick_uid_range(ctx, &mut state, privileged).map_err(forget_job)?;
        let attempt = Attempt { ctx, store, host, state, kept: false };
        ctx.states.save(&attempt.state)?;
        Ok(attempt)
    }

    /// The job's private writable layer, on stores whose jobs boot an overlay; recorded before
    /// it is made.
    fn make_job_dir(&mut self, image: &Image, root: JobRoot) -> Result<()> {
        self.state.phase = Phase::Booting;
        let name = &self.state.machine.name;
        self.state.job_dir = (root == JobRoot::Overlay).then(|| self.store.job_dir(name));
        self.ctx.states.save(&self.state)?;
        if root == JobRoot::Overlay {
            self.store.create_job_dir(name, &image.snapshot_path(&self.state.snapshot))?;
        }
        Ok(())
    }

    /// Boots the machine, with the project cache dir `cache` at /cache, and records its processes.
    fn start_machine(&mut self, image: &Image, plan: JobPlan, cache: Option<PathBuf>) -> Result<()> {
        let (settings, state) = (&self.ctx.settings, &self.state);
        let idmap = state.machine.uid_base.is_some();
        let spec = MachineSpec {
            machine: state.machine.name.clone(),
            tree: image.snapshot_path(&state.snapshot),
            root: plan.root,
            uid_base: state.machine.uid_base,
            job_dir: state.job_dir.clone(),
            leftovers: self.store.job_leftovers(&state.image, &state.snapshot, &state.job_id),
            binds: job_binds(settings, cache, plan.image_binds, idmap),
            properties: plan.properties,
            limits: plan.limits,
            log: self.ctx.states.log_path(&self.ctx.job),
            ready_timeout: settings.prepare_timeout(),
            stop_timeout: settings.stop_timeout(),
            dies_with_caller: false,
        };
        start_recorded(self.ctx, self.host, &mut self.state, &spec)
    }

    /// Every step succeeded: the job keeps its machine.
    fn keep(mut self) -> JobState {
        self.kept = true;
        self.state.clone()
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let (ctx, store, host) = (self.ctx, self.store, self.host);
        let rolled_back =
            clean_job(ctx, host, store, self.state.clone()).and_then(|()| ctx.states.remove_lock(&ctx.job));
        if let Err(e) = rolled_back {
            log::warn!("cleaning up after the failed prepare: {e}");
        }
    }
}

/// Boots `spec` on `host`, saving `state` whenever the host has recorded more of the machine (the
/// write-ahead) and once it runs, then captures its init's seccomp filters. Also after a failure
/// `state` names whatever the host got to start, so that a rollback stops it.
pub(crate) fn start_recorded(
    ctx: &JobContext,
    host: &dyn Host,
    state: &mut JobState,
    spec: &MachineSpec,
) -> Result<()> {
    let mut machine = state.machine.clone();
    let started = host.start(spec, &mut machine, &mut |machine| {
        state.machine = machine.clone();
        ctx.states.save(state)
    });
    state.machine = machine;
    started?;
    state.phase = Phase::Running;
    ctx.states.save(state)?;
    let running = state.machine.running.as_ref().ok_or_else(|| Error::new("the host reported no machine"))?;
    host.capture_seccomp(running, &ctx.states.seccomp_path(&ctx.job))
}

/// Gives `state` a uid range no job on record holds, unless `privileged`; the returned lock,
/// held until the record is saved, keeps any other job from picking the same range meanwhile.
pub(crate) fn pick_uid_range(
    ctx: &JobContext,
    state: &mut JobState,
    privileged: bool,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    if privileged {
        return Ok(None);
    }
    let ranges = ctx.states.lock_all()?;
    state.machine.uid_base = Some(free_uid_base(ctx)?);
    Ok(Some(ranges))
}

/// The lowest uid range no job on record holds (crashed jobs keep theirs until gc reaps them).
fn free_uid_base(ctx: &JobContext) -> Result<u32> {
    let used: HashSet<u32> = ctx.states.all()?.iter().filter_map(|(state, _)| state.machine.uid_base).collect();
    idmap::pick_base(&used)
}

/// What every job machine gets mounted: its project's cache dir, the host's gitlab-runner and
/// step-runner where there are, and the image's own read-only binds; `idmap` (a machine in a
/// user namespace) shows them with the host's ownership.
pub(crate) fn job_binds(settings: &Settings, cache: Option<PathBuf>, image_binds: Vec<Bind>, idmap: bool) -> Vec<Bind> {
    let cache = cache.map(|dir| Bind::read_write(dir, CACHE_DIR_IN_MACHINE));
    let gitlab_runner = settings.gitlab_runner_binary().map(|binary| Bind::read_only(binary, GITLAB_RUNNER_IN_MACHINE));
    let step_runner = settings.step_runner_binary().map(|binary| Bind::read_only(binary, STEP_RUNNER_IN_MACHINE));
    cache
        .into_iter()
        .chain(gitlab_runner)
        .chain(step_runner)
        .chain(image_binds)
        .map(|bind| bind.idmapped(idmap))
        .collect()
}

/// `<cache_dir>/projects/<project>`, made if missing. `projects` is root-only: a job's root owns
/// files there as host root (the bind is idmapped), and no host user may reach them.
fn make_project_cache(settings: &Settings, project: u64) -> Result<PathBuf> {
    let projects = settings.cache_dir.join("projects");
    let dir = projects.join(project.to_string());
    for (path, mode) in [(&settings.cache_dir, 0o755), (&projects, 0o700), (&dir, 0o755)] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .with_context(|| format!("creating cache dir {}", path.display()))?;
    }
    Ok(dir)
}
