//! The prepare stage: pin the image's current snapshot and boot the job's machine on it.

use crate::error::{Context, Result};
use crate::jobs::state::JobState;
use crate::jobs::JobContext;
use crate::lock::Mode;
use crate::machine::{self, MachineSpec};
use crate::settings::CACHE_DIR_IN_MACHINE;
use crate::store::backend::JobRoot;
use crate::store::Store;
use std::os::unix::fs::DirBuilderExt;

/// Where the host's gitlab-runner binary appears in machines (first in their PATH).
const GITLAB_RUNNER_IN_MACHINE: &str = "/usr/local/bin/gitlab-runner";

pub fn prepare(ctx: &JobContext, image_override: Option<&str>) -> Result<()> {
    let settings = &ctx.settings;
    let image_name = ctx.env.image(image_override, &settings.default_image)?;
    // Everything that can be checked without writing is checked first: bad input changes nothing.
    let store = Store::open(settings)?;
    let image = store.image(&image_name);
    image.current()?;

    // A SIGTERM (prepare timeout, cancel) must not leave a machine booting with nobody to stop it.
    let _deferred = crate::signals::Deferred::block();
    settings.ensure_state_dir()?;
    let _job_lock = ctx.states.lock_job(&ctx.job, ctx.job_lock_timeout())?;
    let host = machine::host(settings);

    // A retry (gitlab-runner tries prepare up to 3 times) or a repeated prepare starts afresh.
    if let Some(previous) = ctx.states.load(&ctx.job)? {
        log::info!("job {}: cleaning up an earlier attempt", ctx.job);
        super::cleanup::clean_job(ctx, host.as_ref(), &previous)?;
    }

    let machine_name = ctx.job.machine_name();
    let pinned = (|| {
        // Pinning: resolve `current` and record the lease before gc can look again.
        let _pins = image.lock_pins(Mode::Shared)?;
        let snapshot = image.current()?;
        let state = JobState {
            job_id: ctx.job.to_string(),
            machine: machine_name.clone(),
            store: store.root().to_path_buf(),
            image: image_name.to_string(),
            snapshot: snapshot.to_string(),
            job_dir: None,
            unit: None,
            running: None,
        };
        ctx.states.save(&state)?;
        Ok(state)
    })();
    let mut state = match pinned {
        Ok(state) => state,
        Err(e) => {
            let _ = ctx.states.remove(&ctx.job).and_then(|()| ctx.states.remove_lock(&ctx.job));
            return Err(e);
        }
    };

    let result = (|| {
        let root = store.backend().job_root();
        let tree = image.dir().join(&state.snapshot);
        if root == JobRoot::Overlay {
            state.job_dir = Some(store.create_job_dir(&machine_name, &tree)?);
            ctx.states.save(&state)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&settings.cache_dir)
            .with_context(|| format!("creating cache dir {}", settings.cache_dir.display()))?;
        let spec = MachineSpec {
            machine: machine_name.clone(),
            tree,
            root,
            job_dir: state.job_dir.clone(),
            binds: vec![(settings.cache_dir.clone(), CACHE_DIR_IN_MACHINE.to_owned())],
            binds_ro: settings
                .gitlab_runner_binary()
                .map(|binary| (binary, GITLAB_RUNNER_IN_MACHINE.to_owned()))
                .into_iter()
                .collect(),
            properties: settings.unit_properties(),
            log: ctx.states.log_path(&ctx.job),
            ready_timeout: settings.prepare_timeout(),
            stop_timeout: settings.stop_timeout(),
        };
        let (running, unit) = host.start(&spec)?;
        state.running = Some(running);
        state.unit = unit;
        ctx.states.save(&state)?;
        if crate::signals::stop_requested() {
            return Err(crate::error::Error::new("interrupted"));
        }
        Ok(())
    })();

    match result {
        Ok(()) => {
            println!(
                "nspawn-runner: machine {machine_name} is up: image {image_name}, snapshot {} ({} store)",
                state.snapshot,
                store.backend().name()
            );
            Ok(())
        }
        Err(e) => {
            // Leave nothing behind; gitlab-runner calls cleanup too, which then finds nothing.
            let cleaned =
                super::cleanup::clean_job(ctx, host.as_ref(), &state).and_then(|()| ctx.states.remove_lock(&ctx.job));
            if let Err(cleanup_error) = cleaned {
                log::warn!("cleaning up after the failed prepare: {cleanup_error}");
            }
            Err(e.context(format!("preparing job {}", ctx.job)))
        }
    }
}
