//! The broker's Prometheus metrics: counters and histograms kept in memory,
//! rendered in the text exposition format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobz_core::zap::Refusals;
use jobz_core::Status;

/// Histogram bucket bounds in seconds, from sub-millisecond dispatch to hour-long jobs.
const BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0];

#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    bad_frames: AtomicU64,
    stale_results: AtomicU64,
    /// Time from queued to handed to a worker.
    dispatch: Histogram,
    /// Time from queued to the process start, as the worker reports it.
    start_latency: Histogram,
    /// Time from handing changes to the store to their commit (queue, transaction, fsync).
    store_commit: Histogram,
    /// Run time of finished attempts, by job name.
    run_time: Mutex<BTreeMap<String, Histogram>>,
    /// Finished attempts by job name and status.
    finished: Mutex<BTreeMap<(String, Status), u64>>,
    /// Peers the ZeroMQ socket refused (kept by its ZAP handler); zeros for a plain-text socket.
    refusals: Arc<Refusals>,
}

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 16],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

impl Metrics {
    /// Metrics that also show the refusals counted by the broker's socket.
    pub fn with_refusals(refusals: Arc<Refusals>) -> Metrics {
        Metrics { refusals, ..Metrics::default() }
    }

    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bad_frame(&self) {
        self.bad_frames.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stale(&self) {
        self.stale_results.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dispatched(&self, _job_name: &str, queued_for: Duration) {
        self.dispatch.observe(queued_for);
    }

    pub fn committed(&self, took: Duration) {
        self.store_commit.observe(took);
    }

    pub fn started(&self, latency: Duration) {
        self.start_latency.observe(latency);
    }

    pub fn finished(&self, job_name: &str, status: Status, run_time: Duration) {
        if let Ok(mut map) = self.run_time.lock() {
            map.entry(job_name.to_string()).or_default().observe(run_time);
        }
        if let Ok(mut map) = self.finished.lock() {
            *map.entry((job_name.to_string(), status)).or_default() += 1;
        }
    }

    /// The whole exposition: `counts` are jobs in the store by name and status,
    /// `depth` queued and running jobs per name from the loop.
    pub fn render(
        &self,
        counts: &[(String, Status, u64)],
        depth: &BTreeMap<String, (u64, u64)>,
        workers: usize,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP jobz_jobs Jobs in the store by job name and status.\n# TYPE jobz_jobs gauge");
        for (name, status, n) in counts {
            let _ = writeln!(out, "jobz_jobs{{job_name=\"{}\",status=\"{}\"}} {n}", escape(name), status);
        }
        let _ = writeln!(
            out,
            "# HELP jobz_queue_depth Jobs waiting to be dispatched, by job name.\n# TYPE jobz_queue_depth gauge"
        );
        for (name, (queued, _)) in depth {
            let _ = writeln!(out, "jobz_queue_depth{{job_name=\"{}\"}} {queued}", escape(name));
        }
        let _ = writeln!(out, "# HELP jobz_running Jobs running on workers, by job name.\n# TYPE jobz_running gauge");
        for (name, (_, running)) in depth {
            let _ = writeln!(out, "jobz_running{{job_name=\"{}\"}} {running}", escape(name));
        }
        let _ =
            writeln!(out, "# HELP jobz_workers Connected workers.\n# TYPE jobz_workers gauge\njobz_workers {workers}");
        let _ = writeln!(
            out,
            "# HELP jobz_jobs_accepted_total Jobs accepted over HTTP.\n# TYPE jobz_jobs_accepted_total counter\njobz_jobs_accepted_total {}",
            self.accepted.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP jobz_attempts_finished_total Finished attempts by job name and status.\n# TYPE jobz_attempts_finished_total counter");
        if let Ok(map) = self.finished.lock() {
            for ((name, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "jobz_attempts_finished_total{{job_name=\"{}\",status=\"{status}\"}} {n}",
                    escape(name)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP jobz_bad_frames_total Malformed messages dropped on the ZeroMQ port.\n# TYPE jobz_bad_frames_total counter\njobz_bad_frames_total {}",
            self.bad_frames.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP jobz_mesh_refused_total Peers refused on the ZeroMQ port: reason=\"key\" a CURVE key not in --allowed-keys, reason=\"handshake\" a failed handshake (plain text, bad CURVE, stalled).\n# TYPE jobz_mesh_refused_total counter\njobz_mesh_refused_total{{reason=\"key\"}} {}\njobz_mesh_refused_total{{reason=\"handshake\"}} {}",
            self.refusals.keys(),
            self.refusals.handshakes()
        );
        let _ = writeln!(
            out,
            "# HELP jobz_stale_results_total Results for superseded attempts, recorded and ignored.\n# TYPE jobz_stale_results_total counter\njobz_stale_results_total {}",
            self.stale_results.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP jobz_dispatch_latency_seconds Time from queued to handed to a worker.\n# TYPE jobz_dispatch_latency_seconds histogram");
        self.dispatch.render(&mut out, "jobz_dispatch_latency_seconds", "");
        let _ = writeln!(out, "# HELP jobz_start_latency_seconds Time from queued to the worker starting the process (reported just before the spawn).\n# TYPE jobz_start_latency_seconds histogram");
        self.start_latency.render(&mut out, "jobz_start_latency_seconds", "");
        let _ = writeln!(out, "# HELP jobz_store_commit_seconds Time from handing changes to the store to their commit: its queue, the transaction and the fsync.\n# TYPE jobz_store_commit_seconds histogram");
        self.store_commit.render(&mut out, "jobz_store_commit_seconds", "");
        let _ = writeln!(out, "# HELP jobz_run_time_seconds Run time of finished attempts, by job name.\n# TYPE jobz_run_time_seconds histogram");
        if let Ok(map) = self.run_time.lock() {
            for (name, h) in map.iter() {
                h.render(&mut out, "jobz_run_time_seconds", &format!("job_name=\"{}\"", escape(name)));
            }
        }
        out
    }
}

/// Label values escape backslash, quote and newline (job names cannot hold them, but be exact).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
