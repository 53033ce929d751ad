//! What nspawn-runner adds to a CI job, against the floor: the same machine work done with raw
//! systemd-nspawn / nsenter commands.
//!
//! Per store (loop-mounted btrfs, plain ext4 under target/bench/), one image imported from the
//! bookworm tarball; then BENCH_JOBS (default 5) jobs of 8 trivial stages, run through the stage
//! symlinks exactly as gitlab-runner does (config, prepare, 8 x run, cleanup), interleaved with the
//! same jobs done by hand (nspawn started detached + READY=1 on our own notify socket, nsenter per
//! stage under the machine's seccomp filters, SIGTERM + wait at cleanup; common/jobs.rs). Run with
//! `cargo bench --bench job_overhead` as root.

mod common;

use common::jobs::*;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Results {
    ours: Vec<Job>,
    floor: Vec<Job>,
}

fn main() {
    let started = Instant::now();
    bench_main("job_overhead", 5, |bench| {
        let Bench { work, tar, env, running, rounds: jobs } = bench;
        let scripts: Vec<(PathBuf, &str)> = STAGES.iter().map(|&stage| (env.script(stage, "true"), stage)).collect();
        let (stores, setup_time) =
            timed(|| vec![setup_store(&env, work, true, &tar), setup_store(&env, work, false, &tar)]);
        println!(
            "setup: imported {} into a btrfs and a plain store in {} ({} jobs per store, {} stages each)",
            tar.display(),
            fmt(setup_time),
            jobs,
            STAGES.len()
        );
        let mut results: Vec<Results> = stores.iter().map(|_| Results::default()).collect();
        // One warm-up job of each kind per store (page cache, first-boot effects), not counted.
        for (s, store) in stores.iter().enumerate() {
            let id = format!("bench{}-{}-warm", std::process::id(), store.kind);
            our_job(&env, store, &id, &scripts, running);
            let floor_name = format!("floor{}-{}-warm", std::process::id(), s);
            floor_job(&env, store, &floor_name, &scripts, Syncs::Suppressed, running);
        }
        for i in 0..jobs {
            for (s, store) in stores.iter().enumerate() {
                let id = format!("bench{}-{}-{i}", std::process::id(), store.kind);
                let floor_name = format!("floor{}-{}-{i}", std::process::id(), s);
                let ours = || our_job(&env, store, &id, &scripts, running);
                let floor = || floor_job(&env, store, &floor_name, &scripts, Syncs::Suppressed, running);
                // Alternate the order so slow drift in the host's load hits both sides alike.
                if i % 2 == 0 {
                    results[s].ours.push(ours());
                    results[s].floor.push(floor());
                } else {
                    results[s].floor.push(floor());
                    results[s].ours.push(ours());
                }
            }
        }
        for (store, r) in stores.iter().zip(&results) {
            report(store, r);
        }
        println!(
            "\njob_overhead: {} jobs x {} stores, bench took {} in all",
            jobs,
            stores.len(),
            fmt(started.elapsed())
        );
    });
}

fn report(store: &Store, r: &Results) {
    let col = |jobs: &[Job], f: &dyn Fn(&Job) -> Vec<Duration>| median(&jobs.iter().flat_map(f).collect::<Vec<_>>());
    let prepare = (col(&r.ours, &|j| vec![j.prepare]), col(&r.floor, &|j| vec![j.prepare]));
    let stage = (col(&r.ours, &|j| j.stages.clone()), col(&r.floor, &|j| j.stages.clone()));
    let cleanup = (col(&r.ours, &|j| vec![j.cleanup]), col(&r.floor, &|j| vec![j.cleanup]));
    let whole = (col(&r.ours, &|j| vec![j.whole]), col(&r.floor, &|j| vec![j.whole]));
    let config = col(&r.ours, &|j| vec![j.config]);
    let spread = |jobs: &[Job], f: &dyn Fn(&Job) -> Duration| {
        let v: Vec<Duration> = jobs.iter().map(f).collect();
        format!("{}..{}", fmt(*v.iter().min().unwrap()), fmt(*v.iter().max().unwrap()))
    };
    let stage_overhead_ms = ms(stage.0) - ms(stage.1);
    println!(
        "\n== {} store: {} jobs, medians (stage: median of {} calls) ==",
        store.kind,
        r.ours.len(),
        r.ours.len() * STAGES.len()
    );
    println!("{:<22} {:>12} {:>12} {:>12} {:>8}", "", "nspawn-runner", "floor", "ours-floor", "ratio");
    let row = |label: &str, (a, b): (Duration, Duration)| {
        println!("{:<22} {:>12} {:>12} {:>+9.1} ms {:>7.2}x", label, fmt(a), fmt(b), ms(a) - ms(b), ratio(a, b));
    };
    println!("{:<22} {:>12} {:>12}", "config", fmt(config), "-");
    row("prepare", prepare);
    row("run (per stage)", stage);
    row("cleanup", cleanup);
    row("whole job", whole);
    println!("  whole job range: ours {}, floor {}", spread(&r.ours, &|j| j.whole), spread(&r.floor, &|j| j.whole));
    let whole_ratio = ratio(whole.0, whole.1);
    println!(
        "  target whole job <= 1.1x floor: {:.2}x {}   target per-stage overhead < 15 ms: {:+.1} ms {}",
        whole_ratio,
        verdict(whole_ratio <= 1.1),
        stage_overhead_ms,
        verdict(stage_overhead_ms < 15.0)
    );
}
