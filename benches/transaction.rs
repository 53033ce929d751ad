//! The bare cost of an image transaction: `nspawn-runner image maintain NAME --` commits an
//! unchanged snapshot (snapshot + syncfs + rename + switch of `current` + gc of the old snapshot
//! with NSPAWN_RUNNER_KEEP=0), for a small image (bookworm minbase) and one about ten times
//! larger, on a loop-mounted btrfs store and a plain (ext4) store, next to `cp -a` of the same
//! trees. Run with `cargo bench --bench transaction` as root. Those transactions skip the health
//! check (NSPAWN_RUNNER_CHECK=false); what the check adds to a commit (booting the new tree as a
//! job machine, its checks, its stop) is measured beside them on the small image, in the same
//! runs: `image maintain small --` with the check, min(BENCH_RUNS, 3) times per store.
//!
//! Run counts (each row prints its n): BENCH_RUNS (default 5) for everything on btrfs but `cp -a`
//! of the large tree; min(BENCH_RUNS, 3) for the small image on the plain store; BENCH_SLOW_RUNS
//! (default 1) for what copies the large tree (`cp -a` of it, and its transaction on the plain
//! store, a full copy too), so the bench stays around 10 minutes on a busy 2-core host.
//! Between measurements (untimed) the store is settled: `btrfs subvolume sync` (the cleaner
//! finishing the deleted snapshot) and `sync -f`; the cleaner's time after a commit is printed.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Copies of the whole small tree added under /opt/ballast/ to make the large image.
const BALLAST_COPIES: usize = 9;

struct Store {
    kind: &'static str,
    root: PathBuf,
    /// Scratch space on the same file system, for the `cp -a` references.
    scratch: PathBuf,
    btrfs: bool,
}

#[derive(Default)]
struct Figures {
    maintain: Vec<Duration>,
    /// The same transaction with the health check (small image only).
    checked: Vec<Duration>,
    cp: Vec<Duration>,
    cp_sync: Vec<Duration>,
    /// btrfs only: `btrfs subvolume snapshot` + `sync -f` + `btrfs subvolume delete` by hand,
    /// in all and each step.
    raw: Vec<Duration>,
    raw_snapshot: Vec<Duration>,
    raw_sync: Vec<Duration>,
    raw_delete: Vec<Duration>,
    /// btrfs only: how long the cleaner kept working after the commit (`btrfs subvolume sync`).
    cleaner: Vec<Duration>,
}

/// How many times each measurement is made.
#[derive(Clone, Copy)]
struct Counts {
    maintain: usize,
    checked: usize,
    cp: usize,
    raw: usize,
}

fn main() {
    require_root("transaction");
    let var =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default).max(1);
    let runs = var("BENCH_RUNS", 5);
    let slow = var("BENCH_SLOW_RUNS", 1);
    // [store][image]: btrfs small, btrfs large, plain small, plain large.
    let checked = runs.min(3);
    let counts = [
        [
            Counts { maintain: runs, checked, cp: runs, raw: runs },
            Counts { maintain: runs, checked: 0, cp: slow, raw: runs },
        ],
        [
            Counts { maintain: runs.min(3), checked, cp: runs.min(3), raw: 0 },
            Counts { maintain: slow, checked: 0, cp: slow, raw: 0 },
        ],
    ];
    let started = Instant::now();
    let work = work_dir("transaction");
    let work_for_teardown = work.clone();
    let mounted = Arc::new(Mutex::new(false));
    run_with_teardown(
        std::panic::AssertUnwindSafe(move || {
            print_context();
            let tar = bookworm_tar();
            let state = work.join("run");
            mount_tmpfs(&state);
            let env = Env { state: state.join("nspawn-runner"), config: work.join("config") };
            fs::create_dir_all(&env.config).unwrap();
            let (stores, setup) = timed(|| {
                let stores = [true, false].map(|btrfs| make_store(&work, btrfs));
                // Made on the btrfs, so importing it there is a reflink copy (it is deleted after).
                let large_src = make_large_tree(&stores[0].scratch, &tar);
                for store in &stores {
                    eprintln!("importing into the {} store...", store.kind);
                    import(&env, store, "small", &tar);
                    import(&env, store, "large", &large_src);
                }
                fs::remove_dir_all(&large_src).unwrap();
                stores
            });
            *mounted.lock().unwrap() = true;
            println!("setup: both images imported into both stores in {}", fmt(setup));
            let images = ["small", "large"];
            for store in &stores {
                for image in images {
                    let tree = current(store, image);
                    let (mib, files) = tree_size(&tree);
                    println!("  {} {image}: {mib} MiB, {files} inodes ({})", store.kind, tree.display());
                }
            }
            let mut figures: Vec<Vec<Figures>> =
                stores.iter().map(|_| images.iter().map(|_| Figures::default()).collect()).collect();
            // A warm-up transaction per btrfs image (first gc, caches), not counted; on the plain
            // store a transaction is a full copy, dominated by I/O: none.
            for store in stores.iter().filter(|s| s.btrfs) {
                for image in images {
                    maintain(&env, store, image, false);
                }
            }
            let most = counts.iter().flatten().map(|c| c.maintain.max(c.checked).max(c.cp).max(c.raw)).max().unwrap();
            for run in 0..most {
                for (s, store) in stores.iter().enumerate() {
                    for (i, image) in images.iter().enumerate() {
                        let (f, n) = (&mut figures[s][i], counts[s][i]);
                        // Alternate the order so drift in the host's load hits both alike.
                        let maintain_first = run % 2 == 0;
                        if run < n.maintain.max(n.checked).max(n.cp).max(n.raw) {
                            eprintln!("run {}: {} {image}", run + 1, store.kind);
                        }
                        let measure = |f: &mut Figures| {
                            let (elapsed, cleaner) = maintain(&env, store, image, false);
                            f.maintain.push(elapsed);
                            f.cleaner.extend(cleaner);
                        };
                        if run < n.maintain && maintain_first {
                            measure(f);
                        }
                        if run < n.cp {
                            copy_reference(store, image, f);
                        }
                        if run < n.maintain && !maintain_first {
                            measure(f);
                        }
                        if run < n.raw {
                            raw_btrfs(store, image, f);
                        }
                        if run < n.checked {
                            f.checked.push(maintain(&env, store, image, true).0);
                        }
                    }
                }
            }
            for (store, figs) in stores.iter().zip(&figures) {
                report(store, figs);
            }
            println!("\ntransaction: bench took {} in all", fmt(started.elapsed()));
        }),
        move || {
            unmount_below(&work_for_teardown);
            if let Err(e) = fs::remove_dir_all(&work_for_teardown) {
                eprintln!("could not remove {}: {e}", work_for_teardown.display());
            }
        },
    );
}

struct Env {
    state: PathBuf,
    config: PathBuf,
}

fn make_store(work: &Path, btrfs: bool) -> Store {
    let (kind, base) = if btrfs {
        let mnt = work.join("btrfs");
        mount_btrfs(&work.join("btrfs.img"), &mnt, "12G");
        ("btrfs", mnt)
    } else {
        let dir = work.join("plain");
        fs::create_dir_all(&dir).unwrap();
        ("plain", dir)
    };
    let scratch = base.join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    Store { kind, root: base.join("store"), scratch, btrfs }
}

/// The small tree plus BALLAST_COPIES more copies of it under /opt/ballast/N, made once in `dir`.
fn make_large_tree(dir: &Path, tar: &Path) -> PathBuf {
    let tree = dir.join("large-src");
    fs::create_dir_all(&tree).unwrap();
    let extract = |dir: &Path| {
        fs::create_dir_all(dir).unwrap();
        sh(&[
            "tar",
            "--extract",
            "--numeric-owner",
            "--file",
            tar.to_str().unwrap(),
            "--directory",
            dir.to_str().unwrap(),
        ]);
    };
    extract(&tree);
    for n in 1..=BALLAST_COPIES {
        extract(&tree.join("opt/ballast").join(n.to_string()));
    }
    tree
}

fn command(env: &Env, store: &Store) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", PATH)
        .env("NSPAWN_RUNNER_ROOT", &store.root)
        .env("NSPAWN_RUNNER_STATE_DIR", &env.state)
        .env("NSPAWN_RUNNER_CONFIG_DIR", &env.config)
        .env("NSPAWN_RUNNER_KEEP", "0")
        .env("NSPAWN_RUNNER_CHECK", "false");
    c
}

fn import(env: &Env, store: &Store, image: &str, source: &Path) {
    let out = command(env, store).args(["image", "import", image]).arg(source).output().unwrap();
    assert!(out.status.success(), "import {image} on {}: {}", store.kind, String::from_utf8_lossy(&out.stderr));
}

fn current(store: &Store, image: &str) -> PathBuf {
    let dir = store.root.join(image);
    dir.join(fs::read_link(dir.join("current")).unwrap())
}

/// Snapshots (`<digits>_<digits>` directories) of an image.
fn snapshots(store: &Store, image: &str) -> Vec<String> {
    fs::read_dir(store.root.join(image))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.split_once('_').is_some_and(|(a, b)| {
                !a.is_empty() && !b.is_empty() && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit())
            })
        })
        .collect()
}

/// One `image maintain NAME --` (with the health check if `checked`), timed from spawn to exit;
/// checks it switched and collected. Also the time the btrfs cleaner needed afterwards (untimed
/// for the transaction).
fn maintain(env: &Env, store: &Store, image: &str, checked: bool) -> (Duration, Option<Duration>) {
    let before = current(store, image);
    let mut c = command(env, store);
    c.args(["image", "maintain", image, "--"]).env("NSPAWN_RUNNER_CHECK", checked.to_string());
    let (out, elapsed) = timed(|| c.output().unwrap());
    assert!(
        out.status.success(),
        "maintain {image} on {}: {}{}",
        store.kind,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = current(store, image);
    assert_ne!(before, after, "maintain {image} on {}: current did not move", store.kind);
    let left = snapshots(store, image);
    assert_eq!(left.len(), 1, "maintain {image} on {} with KEEP=0 left {left:?}", store.kind);
    let (_, cleaner) = timed(|| settle(store));
    (elapsed, store.btrfs.then_some(cleaner))
}

/// Untimed, between measurements: let the previous one's background work finish (btrfs
/// cleaner deleting the collected subvolume, dirty pages) so it is not charged to the next one.
fn settle(store: &Store) {
    if store.btrfs {
        sh_quiet(&["btrfs", "subvolume", "sync", store.root.to_str().unwrap()]);
    }
    sh_quiet(&["sync", "-f", store.root.to_str().unwrap()]);
}

/// `cp -a` of the current tree to the same file system (coreutils >= 9 reflinks by default on
/// btrfs), then `sync -f`, timed separately; the copy is removed untimed.
fn copy_reference(store: &Store, image: &str, f: &mut Figures) {
    let dest = store.scratch.join(format!("{image}-copy"));
    let tree = current(store, image);
    let ((), cp) = timed(|| {
        sh(&["cp", "-a", "--no-target-directory", tree.to_str().unwrap(), dest.to_str().unwrap()]);
    });
    let ((), sync) = timed(|| {
        sh(&["sync", "-f", dest.to_str().unwrap()]);
    });
    f.cp.push(cp);
    f.cp_sync.push(cp + sync);
    fs::remove_dir_all(&dest).unwrap();
    settle(store);
}

/// The same bookkeeping by hand with btrfs-progs: snapshot, syncfs, delete (each a process).
fn raw_btrfs(store: &Store, image: &str, f: &mut Figures) {
    let dest = store.scratch.join(format!("{image}-raw"));
    let tree = current(store, image);
    let (_, snapshot) =
        timed(|| sh(&["btrfs", "-q", "subvolume", "snapshot", tree.to_str().unwrap(), dest.to_str().unwrap()]));
    let (_, sync) = timed(|| sh(&["sync", "-f", dest.to_str().unwrap()]));
    let (_, delete) = timed(|| sh(&["btrfs", "-q", "subvolume", "delete", dest.to_str().unwrap()]));
    f.raw.push(snapshot + sync + delete);
    f.raw_snapshot.push(snapshot);
    f.raw_sync.push(sync);
    f.raw_delete.push(delete);
    settle(store);
}

/// MiB used (as du counts it) and inode count of a tree.
fn tree_size(tree: &Path) -> (u64, u64) {
    let out = sh(&["du", "-sxm", tree.to_str().unwrap()]);
    let mib = String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let out = sh(&["du", "-sx", "--inodes", tree.to_str().unwrap()]);
    let inodes =
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (mib, inodes)
}

fn report(store: &Store, figs: &[Figures]) {
    let (small, large) = (&figs[0], &figs[1]);
    println!("\n== {} store: medians (n = runs: small/large) ==", store.kind);
    println!("{:<44} {:>11} {:>11} {:>12}", "", "small", "large", "large/small");
    let row = |label: &str, a: &[Duration], b: &[Duration]| {
        let label = format!("{label} (n={}/{})", a.len(), b.len());
        let (a, b) = (median(a), median(b));
        println!("{:<44} {:>11} {:>11} {:>11.2}x", label, fmt(a), fmt(b), ratio(b, a));
    };
    row("image maintain NAME --", &small.maintain, &large.maintain);
    row("cp -a of the same tree", &small.cp, &large.cp);
    row("cp -a + sync -f", &small.cp_sync, &large.cp_sync);
    if store.btrfs {
        row("raw: snapshot + sync -f + delete", &small.raw, &large.raw);
        row("  raw: btrfs subvolume snapshot", &small.raw_snapshot, &large.raw_snapshot);
        row("  raw: sync -f", &small.raw_sync, &large.raw_sync);
        row("  raw: btrfs subvolume delete", &small.raw_delete, &large.raw_delete);
    }
    for (name, f) in [("small", small), ("large", large)] {
        let m = median(&f.maintain);
        let v = &f.maintain;
        println!(
            "  {name}: maintain/cp -a {:.3}x, maintain/(cp -a + sync) {:.3}x, maintain range {}..{}",
            ratio(m, median(&f.cp)),
            ratio(m, median(&f.cp_sync)),
            fmt(*v.iter().min().unwrap()),
            fmt(*v.iter().max().unwrap())
        );
    }
    let (plain, checked) = (median(&small.maintain), median(&small.checked));
    println!(
        "  health check: small maintain with it {} (n={}, range {}..{}), without {}: the check costs {:+.0} ms per commit",
        fmt(checked),
        small.checked.len(),
        fmt(*small.checked.iter().min().unwrap()),
        fmt(*small.checked.iter().max().unwrap()),
        fmt(plain),
        ms(checked) - ms(plain)
    );
    if store.btrfs {
        let (s, l) = (median(&small.maintain), median(&large.maintain));
        let worst = s.max(l);
        println!(
            "  target (btrfs) under 50 ms: small {} / large {} {}   target large/small < 1.5: {:.2}x {}",
            fmt(s),
            fmt(l),
            verdict(worst < Duration::from_millis(50)),
            ratio(l, s),
            verdict(ratio(l, s) < 1.5)
        );
        println!(
            "  after each commit, untimed: btrfs cleaner + sync -f took {} (small) / {} (large)",
            fmt(median(&small.cleaner)),
            fmt(median(&large.cleaner))
        );
        let (rs, rl) = (median(&small.raw), median(&large.raw));
        println!(
            "  raw floor large/small: {:.2}x; maintain minus raw floor: small {:+.1} ms, large {:+.1} ms",
            ratio(rl, rs),
            ms(s) - ms(rs),
            ms(l) - ms(rl)
        );
    }
}
