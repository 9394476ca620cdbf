//! Group-commit throughput of the durable store: `cargo bench -p broker --bench store`.
//!
//! Concurrent committers each insert jobs one at a time and await each commit,
//! as the HTTP front door does (every 202 waits for its job's commit and the
//! sync of the WAL after it). For each batch limit it prints the median of several
//! runs in durable inserts per second, its ratio to a batch limit of 1 (one
//! fsync per job), and the commit latency a caller sees.
//!
//! The database lives under Cargo's target tmp dir, so it sits on the same
//! file system as the build (a real disk, not tmpfs); set `JOBZ_BENCH_DIR` to
//! measure another disk.

use std::collections::BTreeMap;
use std::error::Error;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use broker::model::{Change, JobRecord};
use broker::store::{SqliteStore, Store, StoreOptions};
use chrono::Utc;
use jobz_core::pipeline::{NewJob, Origin};

/// Runs per configuration; the median is reported.
const RUNS: usize = 5;
/// Jobs inserted per run when commits are batched.
const JOBS_PER_RUN: usize = 20_000;
/// Jobs per run with a batch limit of 1: one fsync each makes it slow, and the
/// rate is per second either way.
const JOBS_PER_RUN_UNBATCHED: usize = 2_000;
/// Batch limits measured; 1 is the baseline of the ratio.
const BATCH_LIMITS: [usize; 4] = [1, 64, 256, 1024];
/// Concurrent committers: the front door's realistic load, then a burst big
/// enough for batches to reach the larger limits.
const COMMITTERS: [usize; 2] = [16, 256];

/// What one run measured.
struct Run {
    inserts_per_second: f64,
    latencies: Vec<Duration>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let base =
        std::env::var_os("JOBZ_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    std::fs::create_dir_all(&base)?;
    println!("store group commit, each commit answered after its WAL sync, database under {}", base.display());
    println!("each committer awaits its own commit of one Insert; medians of {RUNS} runs");
    // The disk's own floor: no committer can finish more than one commit per fsync.
    let fsync = fsync_latency(&base)?;
    println!(
        "raw fsync of a 4 KiB overwrite on this disk: median {} (at most {:.0} fsyncs/s)\n",
        format_duration(fsync),
        1.0 / fsync.as_secs_f64()
    );
    for committers in COMMITTERS {
        // Rounds run every batch limit once, so a disk whose speed drifts
        // (a shared VM) slows all of them alike rather than one.
        let mut runs: Vec<Vec<Run>> = BATCH_LIMITS.iter().map(|_| Vec::with_capacity(RUNS)).collect();
        let mut jobs_per_fsync: Vec<Vec<f64>> = BATCH_LIMITS.iter().map(|_| Vec::with_capacity(RUNS)).collect();
        for _ in 0..RUNS {
            for (i, batch_limit) in BATCH_LIMITS.into_iter().enumerate() {
                let jobs = if batch_limit == 1 { JOBS_PER_RUN_UNBATCHED } else { JOBS_PER_RUN };
                let dir = tempfile::tempdir_in(&base)?;
                let options = StoreOptions { batch_changes_max: batch_limit, ..StoreOptions::default() };
                let store = SqliteStore::open(dir.path(), options)?;
                runs[i].push(runtime.block_on(run(&store, committers, jobs))?);
                let stats = store.stats();
                jobs_per_fsync[i].push(stats.changes as f64 / stats.commits.max(1) as f64);
                runtime.block_on(store.close());
            }
        }
        println!("{committers} concurrent committers");
        println!(
            "{:>11} {:>7} {:>12} {:>9} {:>10} {:>10} {:>11}",
            "batch limit", "jobs", "inserts/s", "vs 1", "p50 commit", "p99 commit", "jobs/fsync"
        );
        let mut baseline = None;
        for ((batch_limit, runs), jobs_per_fsync) in BATCH_LIMITS.into_iter().zip(runs).zip(jobs_per_fsync) {
            let jobs = if batch_limit == 1 { JOBS_PER_RUN_UNBATCHED } else { JOBS_PER_RUN };
            let rate = median(runs.iter().map(|r| r.inserts_per_second).collect());
            let baseline = *baseline.get_or_insert(rate);
            let mut latencies: Vec<Duration> = runs.into_iter().flat_map(|r| r.latencies).collect();
            latencies.sort_unstable();
            println!(
                "{batch_limit:>11} {jobs:>7} {rate:>12.0} {:>8.1}x {:>10} {:>10} {:>11.1}",
                rate / baseline,
                format_duration(percentile(&latencies, 50)),
                format_duration(percentile(&latencies, 99)),
                median(jobs_per_fsync),
            );
        }
        println!();
    }
    Ok(())
}

/// The median time to overwrite 4 KiB of a file and `fdatasync` it.
fn fsync_latency(base: &Path) -> Result<Duration, Box<dyn Error>> {
    const SAMPLES: usize = 200;
    let mut file = tempfile::tempfile_in(base)?;
    let block = [0u8; 4096];
    file.write_all(&block)?;
    file.sync_all()?;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    samples.sort_unstable();
    Ok(percentile(&samples, 50))
}

/// Inserts `jobs` jobs from `committers` tasks, each awaiting its commit.
async fn run(store: &SqliteStore, committers: usize, jobs: usize) -> Result<Run, Box<dyn Error>> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..committers)
        .map(|committer| {
            let store = store.clone();
            let share = jobs / committers + usize::from(committer < jobs % committers);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(share);
                for _ in 0..share {
                    let job = job(&uuid::Uuid::now_v7().to_string());
                    let sent = Instant::now();
                    store.commit(vec![Change::Insert(job)]).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, broker::store::StoreError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    Ok(Run { inserts_per_second: jobs as f64 / elapsed.as_secs_f64(), latencies })
}

/// A job as the front door would insert it: a time-ordered id, a few params, queued now.
fn job(id: &str) -> JobRecord {
    let new = NewJob {
        job_name: "import_category_dump".into(),
        params: BTreeMap::from([("date".into(), "2024_01_31".into()), ("category".into(), "books".into())]),
        run_id: None,
        parent_id: None,
        origin: Origin::Start,
    };
    JobRecord::queued(id.to_owned(), &new, 0, Utc::now())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `p`th percentile of sorted `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values[(values.len() - 1) * p / 100]
}

fn format_duration(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}
