//! A realistic job against the floor: install a C toolchain from a local package cache, compile
//! a small program and run its tests, through nspawn-runner's stages and on raw nspawn machines
//! with and without `--suppress-sync` (the latter: how job machines ran before it).
//!
//! Setup, once per bookworm tarball: apt lists and the .debs of PACKAGES (with everything they
//! need on the image) are downloaded into target/bench/real_job-packages/ in a throw-away
//! unpacked copy of the tarball; that is the only network access. Per run, it is copied into the
//! project's cache dir, which every job sees at /cache like nspawn-runner's jobs do.
//!
//! Per store (loop-mounted btrfs, plain ext4 under target/bench/), BENCH_JOBS (default 3) rounds
//! of three jobs of gitlab-runner's 8 stages, in rotating order: ours (through the stage symlinks,
//! as job_overhead), the floor with syncs suppressed (nspawn-runner's command line through the
//! crate's builder, nsenter per stage) and the same floor with syncs kept. get_sources writes the
//! program; step_script runs `apt-get install --no-download` from /cache, `make` and `make test`.
//! It prints medians per store and judges the targets (ours <= 1.1x the floor, before >= 1.5x
//! ours) on the median of the ratios within each round, whose jobs shared the host's load.
//! Run with `cargo bench --bench real_job` as root.

mod common;

use common::jobs::*;
use common::*;
use nspawn_runner::machine::chroot::{run_in_tree_checked, TreeCommand};
use nspawn_runner::machine::nspawn::Bind;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The toolchain the job installs: what `build-essential` brings for C, without g++ and dpkg-dev.
const PACKAGES: [&str; 3] = ["gcc", "make", "libc6-dev"];
/// The package cache inside the jobs' machines (in the project's /cache).
const CACHE_IN_JOB: &str = "/cache/packages";
const STEP_SCRIPT: usize = 4;

/// get_sources: the program, as a clone would leave it.
const SOURCES: &str = r#"mkdir -p /builds/bench && cd /builds/bench
cat > words.h <<'EOF'
#include <stddef.h>
size_t count_words(const char *text);
char *reverse_words(const char *text);
EOF
cat > words.c <<'EOF'
#include "words.h"
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
size_t count_words(const char *text) {
    size_t n = 0;
    for (int in_word = 0; *text; text++) {
        if (isspace((unsigned char)*text)) in_word = 0;
        else if (!in_word) { in_word = 1; n++; }
    }
    return n;
}
char *reverse_words(const char *text) {
    size_t len = strlen(text);
    char *out = malloc(len + 1), *o = out;
    if (!out) return NULL;
    for (size_t end = len; end > 0;) {
        size_t start = end;
        while (start > 0 && text[start - 1] != ' ') start--;
        memcpy(o, text + start, end - start);
        o += end - start;
        if (start > 0) *o++ = ' ';
        end = start > 0 ? start - 1 : 0;
    }
    *o = '\0';
    return out;
}
EOF
cat > main.c <<'EOF'
#include "words.h"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *r = reverse_words(argv[i]);
        printf("%zu %s\n", count_words(argv[i]), r);
        free(r);
    }
    return 0;
}
EOF
cat > test_words.c <<'EOF'
#include "words.h"
#include <assert.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    assert(count_words("") == 0);
    assert(count_words("  a  bc d ") == 3);
    char *r = reverse_words("one two three");
    assert(strcmp(r, "three two one") == 0);
    free(r);
    return 0;
}
EOF
printf '%s\n' 'CFLAGS = -O2 -Wall -Wextra -Werror' \
  'all: words test_words' \
  'words: main.o words.o' '	$(CC) -o $@ $^' \
  'test_words: test_words.o words.o' '	$(CC) -o $@ $^' \
  '%.o: %.c words.h' '	$(CC) $(CFLAGS) -c $<' \
  'test: all' '	./test_words' '	test "$$(./words "a b c")" = "3 c b a"' \
  '.PHONY: all test' > Makefile
"#;

fn main() {
    let started = Instant::now();
    bench_main("real_job", 3, |bench| {
        let Bench { work, tar, env, running, rounds } = bench;
        let (packages, download_time) = timed(|| package_cache(&tar, work));
        println!("setup: package cache {} ready in {}", packages.display(), fmt(download_time));
        let in_cache = env.project_cache().join("packages");
        sh(&["cp", "-a", "--reflink=auto", packages.to_str().unwrap(), in_cache.to_str().unwrap()]);
        let install = format!(
            "export DEBIAN_FRONTEND=noninteractive\n\
             apt-get -q -o Dir::State::Lists={CACHE_IN_JOB}/lists -o Dir::Cache::Archives={CACHE_IN_JOB}/archives \
             install -y --no-install-recommends --no-download {}\n\
             cd /builds/bench\nmake\nmake test\n",
            PACKAGES.join(" ")
        );
        let scripts: Vec<(PathBuf, &str)> = STAGES
            .iter()
            .map(|&stage| {
                let body = match stage {
                    "get_sources" => SOURCES,
                    "step_script" => &install,
                    _ => "true",
                };
                (env.script(stage, body), stage)
            })
            .collect();
        let (stores, setup_time) =
            timed(|| vec![setup_store(&env, work, true, &tar), setup_store(&env, work, false, &tar)]);
        println!(
            "setup: imported {} into a btrfs and a plain store in {} ({rounds} rounds of 3 jobs per store)",
            tar.display(),
            fmt(setup_time)
        );
        let pid = std::process::id();
        let mut results: Vec<[Vec<Job>; 3]> = stores.iter().map(|_| Default::default()).collect();
        for (s, store) in stores.iter().enumerate() {
            // Warm-up (page cache, first-boot effects), not counted.
            our_job(&env, store, &format!("real{pid}-{}-warm", store.kind), &scripts, running);
            floor_job(&env, store, &format!("floor{pid}-{s}-warm"), &scripts, Syncs::Suppressed, running);
        }
        for i in 0..rounds {
            for (s, store) in stores.iter().enumerate() {
                // Rotate the order so slow drift in the host's load hits all three alike.
                for k in 0..3 {
                    let variant = (i + k) % 3;
                    let job = match variant {
                        0 => our_job(&env, store, &format!("real{pid}-{}-{i}", store.kind), &scripts, running),
                        _ => {
                            let (prefix, syncs) =
                                if variant == 1 { ("floor", Syncs::Suppressed) } else { ("nosync", Syncs::Kept) };
                            floor_job(&env, store, &format!("{prefix}{pid}-{s}-{i}"), &scripts, syncs, running)
                        }
                    };
                    results[s][variant].push(job);
                }
            }
        }
        for (store, [ours, floor, kept]) in stores.iter().zip(&results) {
            report(store, ours, floor, kept);
        }
        println!("\nreal_job: {rounds} rounds x {} stores, bench took {} in all", stores.len(), fmt(started.elapsed()));
    });
}

/// target/bench/real_job-packages/{lists,archives}: what `apt-get install PACKAGES` needs on the
/// image, downloaded once per tarball (a stamp names it) in a throw-away unpacked copy of it.
fn package_cache(tar: &Path, work: &Path) -> PathBuf {
    let base = bench_base();
    let _lock = FileLock::exclusive(&base.join(".real_job-packages.lock"));
    let dir = base.join("real_job-packages");
    let meta = fs::metadata(tar).unwrap();
    let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let stamp = format!("{} {} {mtime} {}\n", tar.display(), meta.len(), PACKAGES.join(" "));
    let stamp_file = base.join("real_job-packages.stamp");
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) && dir.is_dir() {
        return dir;
    }
    let _ = fs::remove_file(&stamp_file);
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap();
    }
    for sub in ["lists/partial", "archives/partial"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    eprintln!("downloading {} for the image into {} (once)...", PACKAGES.join(" "), dir.display());
    let tree = work.join("download-tree");
    fs::create_dir_all(&tree).unwrap();
    sh(&["tar", "-xf", tar.to_str().unwrap(), "-C", tree.to_str().unwrap()]);
    let apt = |args: &[&str]| -> Vec<String> {
        let options = ["-o", "Dir::State::Lists=/packages/lists", "-o", "Dir::Cache::Archives=/packages/archives"];
        ["apt-get", "-q"].iter().chain(&options).chain(args).map(|a| a.to_string()).collect()
    };
    let download = [&["--no-install-recommends", "--download-only", "-y", "install"][..], &PACKAGES[..]].concat();
    for command in [apt(&["update"]), apt(&download)] {
        let binds = vec![Bind::read_write(&dir, "/packages")];
        let cmd = TreeCommand { tree: &tree, command: &command, binds, interactive: false };
        run_in_tree_checked(&cmd).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::remove_dir_all(&tree).unwrap();
    fs::write(&stamp_file, stamp).unwrap();
    dir
}

fn report(store: &Store, ours: &[Job], floor: &[Job], kept: &[Job]) {
    let col = |jobs: &[Job], f: &dyn Fn(&Job) -> Duration| median(&jobs.iter().map(f).collect::<Vec<_>>());
    let step = |j: &Job| j.stages[STEP_SCRIPT];
    let other_stages = |j: &Job| j.stages.iter().sum::<Duration>() - j.stages[STEP_SCRIPT];
    // Every job, not a range: with a few jobs on a busy host, the reader judges the noise.
    let each =
        |jobs: &[Job]| jobs.iter().map(|j| format!("{:.1}", j.whole.as_secs_f64())).collect::<Vec<_>>().join(" ");
    println!("\n== {} store: {} jobs of each kind, medians ==", store.kind, ours.len());
    println!(
        "{:<36} {:>10} {:>11} {:>12} {:>10} {:>10}   each whole job (s, in run order)",
        "", "prepare", "step_script", "other stages", "cleanup", "whole job"
    );
    for (label, jobs) in
        [("nspawn-runner", ours), ("floor, --suppress-sync=yes", floor), ("floor, --suppress-sync=no (before)", kept)]
    {
        println!(
            "{:<36} {:>10} {:>11} {:>12} {:>10} {:>10}   {}",
            label,
            fmt(col(jobs, &|j| j.prepare)),
            fmt(col(jobs, &step)),
            fmt(col(jobs, &other_stages)),
            fmt(col(jobs, &|j| j.cleanup)),
            fmt(col(jobs, &|j| j.whole)),
            each(jobs)
        );
    }
    let whole = |jobs: &[Job]| col(jobs, &|j| j.whole);
    // The three jobs of a round ran back to back, so they shared the host's load of the moment:
    // the ratios within each round, and their median, are what the targets are judged on.
    let paired = |a: &[Job], b: &[Job]| -> (f64, String) {
        let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| ratio(a.whole, b.whole)).collect();
        let each = ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ");
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let median = if n % 2 == 1 { ratios[n / 2] } else { (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0 };
        (median, each)
    };
    let (over_floor, over_floor_each) = paired(ours, floor);
    let (speedup, speedup_each) = paired(kept, ours);
    let (syncs, syncs_each) = paired(kept, floor);
    println!(
        "  ours / floor:   {over_floor:.2}x (target <= 1.1x: {}; per round {over_floor_each}; of the medians {:.2}x)",
        verdict(over_floor <= 1.1),
        ratio(whole(ours), whole(floor))
    );
    println!(
        "  before / ours:  {speedup:.2}x (target >= 1.5x: {}; per round {speedup_each}; of the medians {:.2}x)",
        verdict(speedup >= 1.5),
        ratio(whole(kept), whole(ours))
    );
    println!(
        "  syncs alone, floor without / with suppress-sync: {syncs:.2}x (per round {syncs_each}; of the medians {:.2}x)",
        ratio(whole(kept), whole(floor))
    );
}
