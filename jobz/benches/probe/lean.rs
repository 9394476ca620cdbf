//! The lean probe of part (2): a model of the leanest durable design, run in
//! the same loop as the mesh as a yardstick. It is not jobz's code.
//!
//! - Starts come over HTTP: hyper on one runtime thread, like the front door.
//!   Each is answered 202 only after it is durable. With [`Durable::Logs`],
//!   its record is appended to a start journal and `fdatasync`ed, and starts
//!   that wait together share one sync. With [`Durable::Store`], it is jobz's
//!   own store (`SqliteStore`): the front door's `Insert`.
//! - The queue is in memory.
//! - `slots` threads each take the next job and run it the runner's way: its
//!   own process group, stdin `/dev/null`, stdout and stderr in one pipe read
//!   to end-of-file, then the wait. So each blocks in `read` and `waitpid`,
//!   which the kernel wakes on the CPU of the child that just ended. A slot
//!   takes its next job straight from the queue, or, with `round_trip`, asks a
//!   task on the runtime thread for it and waits for the answer, as a worker
//!   of concurrency 1 gets its next job only after the broker hears it is free.
//! - Finishes are durable without holding up the slot. With [`Durable::Logs`]
//!   they are appended to a finish log, synced at most every [`FINISH_GROUP`].
//!   With [`Durable::Store`] each is the loop's `Dispatch` and `Finish`,
//!   committed with `commit_grouped`.
//! - With [`Durable::LogsAndBulk`], the logs make starts and finishes durable
//!   as with [`Durable::Logs`], and a thread of its own writes each finished
//!   job's row (and its attempt) into a database with jobz's schema once, in
//!   transactions of up to [`BULK_EVERY`], without a sync of its own: a
//!   job's row is written once instead of inserted and then updated.
//!
//! The probe has no statuses to read (but what the store keeps), and no leases,
//! worker protocol, retries or follow-ups. It shows what the machine allows a
//! design with jobz's durability, and what its parts cost.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use broker::model::{Change, JobRecord};
use broker::store::{SqliteStore, Store};
use bytes::Bytes;
use chrono::Utc;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jobz_core::job::Status;
use jobz_core::pipeline::{NewJob, Origin};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

type ProbeResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long a logged finish may wait for company before its sync, like the loop's grouped commits.
const FINISH_GROUP: Duration = Duration::from_millis(5);

/// How long the bulk writer gathers finished jobs before it writes their rows.
const BULK_EVERY: Duration = Duration::from_millis(20);

/// Where starts and finishes are made durable.
pub enum Durable {
    /// A start journal and a finish log, appended and synced.
    Logs,
    /// jobz's store: a row per job, inserted at the start and updated at the finish, with its attempt.
    Store(SqliteStore),
    /// The logs, and each finished job's row written once, in bulk, into the database at this path (jobz's schema).
    LogsAndBulk(std::path::PathBuf),
}

/// A finished job: its id, whether it succeeded, when it started and ended.
struct Finished {
    id: String,
    succeeded: bool,
    started: chrono::DateTime<Utc>,
    ended: chrono::DateTime<Utc>,
}

/// A start waiting for its sync: its id and who to answer.
type Start = (String, tokio::sync::oneshot::Sender<()>);

/// The jobs to run, and whether more can come.
#[derive(Default)]
struct Queue {
    state: Mutex<(VecDeque<String>, bool)>,
    ready: Condvar,
    /// Wakes the round trip's dispatcher, when there is one.
    pushed: tokio::sync::Notify,
}

impl Queue {
    fn push(&self, ids: impl Iterator<Item = String>) {
        if let Ok(mut state) = self.state.lock() {
            state.0.extend(ids);
        }
        self.ready.notify_all();
        self.pushed.notify_one();
    }

    fn try_pop(&self) -> Option<String> {
        self.state.lock().ok()?.0.pop_front()
    }

    /// The next job, or `None` once the queue is closed and empty.
    fn pop(&self) -> Option<String> {
        let mut state = self.state.lock().ok()?;
        loop {
            if let Some(id) = state.0.pop_front() {
                return Some(id);
            }
            if state.1 {
                return None;
            }
            state = self.ready.wait(state).ok()?;
        }
    }

    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.1 = true;
        }
        self.ready.notify_all();
    }
}

/// A running probe: its address, and when the expected finishes are in.
pub struct Probe {
    pub addr: SocketAddr,
    runtime: Runtime,
    queue: Arc<Queue>,
    store: Option<SqliteStore>,
    threads: Vec<JoinHandle<ProbeResult<()>>>,
    /// The time of the finish that completed the expected count, or what went wrong.
    done: mpsc::Receiver<Result<SystemTime, String>>,
}

impl Probe {
    /// Starts the probe with its logs under `dir`, expecting `jobs` finishes, with `slots` job slots.
    pub fn start(dir: &Path, durable: Durable, round_trip: bool, jobs: usize, slots: usize) -> ProbeResult<Probe> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("probe-http")
            .build()?;
        let queue = Arc::new(Queue::default());
        let store = match &durable {
            Durable::Store(store) => Some(store.clone()),
            Durable::Logs | Durable::LogsAndBulk(_) => None,
        };
        let mut threads = Vec::new();
        let (done_tx, done) = mpsc::channel();

        // Finishes, from the slots.
        let (finish_tx, finish_rx) = tokio::sync::mpsc::unbounded_channel::<Finished>();
        match &durable {
            Durable::Logs | Durable::LogsAndBulk(_) => {
                let finishes = File::options().create(true).append(true).open(dir.join("finishes"))?;
                // With bulk rows, the run ends when the rows are in: the bulk writer says so.
                let (bulk, done_tx) = match &durable {
                    Durable::LogsAndBulk(database) => {
                        let (bulk_tx, bulk_rx) = mpsc::channel::<Finished>();
                        let connection = rusqlite::Connection::open(database)?;
                        threads.push(
                            std::thread::Builder::new()
                                .name("probe-bulk".into())
                                .spawn(move || write_rows(connection, bulk_rx, jobs, done_tx))?,
                        );
                        (Some(bulk_tx), None)
                    }
                    _ => (None, Some(done_tx)),
                };
                threads.push(
                    std::thread::Builder::new()
                        .name("probe-finish".into())
                        .spawn(move || log_finishes(finishes, finish_rx, jobs, done_tx, bulk))?,
                );
            }
            Durable::Store(store) => {
                runtime.spawn(store_finishes(store.clone(), finish_rx, jobs, done_tx));
            }
        }

        // The slots, and with `round_trip` the task that hands each its next job.
        let (free_tx, free_rx) = tokio::sync::mpsc::unbounded_channel::<mpsc::Sender<String>>();
        if round_trip {
            runtime.spawn(dispatch(queue.clone(), free_rx));
        }
        for _ in 0..slots {
            let (queue, finish_tx) = (queue.clone(), finish_tx.clone());
            let free_tx = round_trip.then(|| free_tx.clone());
            let null = File::open("/dev/null")?;
            threads.push(
                std::thread::Builder::new()
                    .name("probe-slot".into())
                    .spawn(move || run_slot(&queue, free_tx, &finish_tx, &null))?,
            );
        }
        drop((finish_tx, free_tx));

        // Starts.
        let starts = match durable {
            Durable::Logs | Durable::LogsAndBulk(_) => {
                let (start_tx, start_rx) = mpsc::channel::<Start>();
                let journal = File::options().create(true).append(true).open(dir.join("starts"))?;
                let journal_queue = queue.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name("probe-journal".into())
                        .spawn(move || log_starts(journal, start_rx, &journal_queue))?,
                );
                Starts::Logs(start_tx)
            }
            Durable::Store(store) => Starts::Store(store),
        };
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        runtime.spawn(serve(listener, starts, queue.clone()));
        Ok(Probe { addr, runtime, queue, store, threads, done })
    }

    /// Waits up to `deadline` for the expected finishes; the time of the last one.
    pub fn wait_done(&self, deadline: Duration) -> ProbeResult<SystemTime> {
        match self.done.recv_timeout(deadline) {
            Ok(Ok(at)) => Ok(at),
            Ok(Err(failure)) => Err(format!("the lean probe failed: {failure}").into()),
            Err(_) => Err(format!("the lean probe did not finish within {deadline:?}").into()),
        }
    }

    /// Stops the HTTP side, lets the slots end, closes the store, and joins every thread.
    pub fn stop(self, deadline: Duration) -> ProbeResult<()> {
        self.queue.close();
        if let Some(store) = &self.store {
            self.runtime.block_on(store.close());
        }
        // Dropping the runtime's tasks drops every sender of starts: the journal thread ends.
        self.runtime.shutdown_timeout(deadline);
        for thread in self.threads {
            thread.join().map_err(|_| "a probe thread panicked")??;
        }
        Ok(())
    }
}

/// How the front door makes a start durable.
#[derive(Clone)]
enum Starts {
    Logs(mpsc::Sender<Start>),
    Store(SqliteStore),
}

impl Starts {
    /// Makes one start durable and queues it; its id, or why it could not be stored.
    async fn start(&self, queue: &Queue) -> Result<String, String> {
        let id = jobz_core::ids::new_id();
        match self {
            Starts::Logs(journal) => {
                let (answer, stored) = tokio::sync::oneshot::channel();
                journal.send((id.clone(), answer)).map_err(|_| "the journal stopped")?;
                stored.await.map_err(|_| "the journal stopped")?;
            }
            Starts::Store(store) => {
                let new = NewJob {
                    job_name: "noop".into(),
                    params: BTreeMap::new(),
                    run_id: None,
                    parent_id: None,
                    origin: Origin::Start,
                };
                let record = JobRecord::queued(id.clone(), &new, 0, broker::store::to_store_precision(Utc::now()));
                store.commit(vec![Change::Insert(record)]).await.map_err(|e| e.to_string())?;
                queue.push(std::iter::once(id.clone()));
            }
        }
        Ok(id)
    }
}

/// The front door: every request is a start of `noop`.
async fn serve(listener: TcpListener, starts: Starts, queue: Arc<Queue>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (starts, queue) = (starts.clone(), queue.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                let (starts, queue) = (starts.clone(), queue.clone());
                async move {
                    let (status, body) = match starts.start(&queue).await {
                        Ok(id) => (
                            StatusCode::ACCEPTED,
                            format!(r#"{{"id":"{id}","job_name":"noop","status":"queued","run_id":"{id}"}}"#),
                        ),
                        Err(failure) => (StatusCode::SERVICE_UNAVAILABLE, format!(r#"{{"error":{failure:?}}}"#)),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The start journal: appends what is waiting, syncs once, queues it, answers it.
fn log_starts(mut journal: File, starts: mpsc::Receiver<Start>, queue: &Queue) -> ProbeResult<()> {
    let mut record = Vec::new();
    while let Ok(first) = starts.recv() {
        let batch: Vec<Start> = std::iter::once(first).chain(starts.try_iter()).collect();
        record.clear();
        for (id, _) in &batch {
            writeln!(record, "{id} noop {{}}")?;
        }
        journal.write_all(&record)?;
        journal.sync_data()?;
        let (ids, answers): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
        queue.push(ids.into_iter());
        for answer in answers {
            let _ = answer.send(());
        }
    }
    Ok(())
}

/// The finish log: appends what came, synced at most every [`FINISH_GROUP`];
/// then says the run is done, or hands the finished jobs to the bulk writer.
fn log_finishes(
    mut log: File,
    mut finishes: tokio::sync::mpsc::UnboundedReceiver<Finished>,
    jobs: usize,
    done: Option<mpsc::Sender<Result<SystemTime, String>>>,
    bulk: Option<mpsc::Sender<Finished>>,
) -> ProbeResult<()> {
    let (mut count, mut last_sync, mut record, mut synced) = (0usize, Instant::now(), Vec::new(), Vec::new());
    while let Some(first) = finishes.blocking_recv() {
        std::thread::sleep((last_sync + FINISH_GROUP).saturating_duration_since(Instant::now()));
        record.clear();
        let mut next = Some(first);
        while let Some(finished) = next.take().or_else(|| finishes.try_recv().ok()) {
            if !finished.succeeded {
                if let Some(done) = &done {
                    let _ = done.send(Err("/bin/true did not succeed".into()));
                }
                // Without `done`, the bulk writer tells the wait, once this thread's sender is gone.
                return Err("/bin/true did not succeed".into());
            }
            writeln!(record, "{} succeeded {} {}", finished.id, finished.started, finished.ended)?;
            if bulk.is_some() {
                synced.push(finished);
            }
            count += 1;
        }
        log.write_all(&record)?;
        log.sync_data()?;
        last_sync = Instant::now();
        if let Some(bulk) = &bulk {
            for finished in synced.drain(..) {
                let _ = bulk.send(finished);
            }
        }
        if let (Some(done), true) = (&done, count == jobs) {
            let _ = done.send(Ok(SystemTime::now()));
        }
    }
    Ok(())
}

/// The bulk writer: every [`BULK_EVERY`], one transaction that writes the rows
/// of the jobs finished meanwhile, each once with its end (and its attempt).
fn write_rows(
    mut connection: rusqlite::Connection,
    finished: mpsc::Receiver<Finished>,
    jobs: usize,
    done: mpsc::Sender<Result<SystemTime, String>>,
) -> ProbeResult<()> {
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    let micros = |at: &chrono::DateTime<Utc>| at.timestamp_micros();
    let mut written = 0;
    while let Ok(first) = finished.recv() {
        std::thread::sleep(BULK_EVERY);
        let batch: Vec<Finished> = std::iter::once(first).chain(finished.try_iter()).collect();
        let transaction = connection.transaction()?;
        {
            let mut job = transaction.prepare_cached(
                "INSERT INTO jobs (id, job_name, params, status, attempts, run_id, origin_kind, priority, worker,
                     lease, exit_code, created_at, queued_at, started_at, finished_at, output_tail)
                 VALUES (?1, 'noop', '{}', 'succeeded', 1, ?1, 'start', 0, 'probe', ?2, 0, ?3, ?3, ?3, ?4, '')",
            )?;
            let mut attempt = transaction.prepare_cached(
                "INSERT INTO attempts (job_id, lease, attempt, worker, started_at, finished_at, status, exit_code)
                 VALUES (?1, ?2, 1, 'probe', ?3, ?4, 'succeeded', 0)",
            )?;
            for (lease, f) in (written as i64..).zip(&batch) {
                job.execute(rusqlite::params![f.id, lease, micros(&f.started), micros(&f.ended)])?;
                attempt.execute(rusqlite::params![f.id, lease, micros(&f.started), micros(&f.ended)])?;
            }
        }
        transaction.commit()?;
        written += batch.len();
        if written == jobs {
            let _ = done.send(Ok(SystemTime::now()));
        }
    }
    if written < jobs {
        let _ = done.send(Err(format!("the finish log stopped after {written} of {jobs} rows")));
    }
    Ok(())
}

/// Finishes into jobz's store, as the loop writes them: the dispatch and the finish, grouped.
async fn store_finishes(
    store: SqliteStore,
    mut finishes: tokio::sync::mpsc::UnboundedReceiver<Finished>,
    jobs: usize,
    done: mpsc::Sender<Result<SystemTime, String>>,
) {
    let committed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut lease = 0;
    while let Some(finished) = finishes.recv().await {
        lease += 1;
        let status = if finished.succeeded { Status::Succeeded } else { Status::Failed };
        let changes = vec![
            Change::Dispatch {
                id: finished.id.clone(),
                job_name: "noop".into(),
                attempt: 1,
                worker: "probe".into(),
                lease,
                at: finished.started,
            },
            Change::Finish {
                id: finished.id,
                job_name: "noop".into(),
                lease,
                status,
                exit_code: Some(if finished.succeeded { 0 } else { 1 }),
                signal: None,
                at: finished.ended,
                output_tail: String::new(),
                error: None,
            },
        ];
        let (store, committed, done) = (store.clone(), committed.clone(), done.clone());
        tokio::spawn(async move {
            match store.commit_grouped(changes).await {
                Ok(_) if finished.succeeded => {
                    if committed.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1 == jobs {
                        let _ = done.send(Ok(SystemTime::now()));
                    }
                }
                Ok(_) => {
                    let _ = done.send(Err("/bin/true did not succeed".into()));
                }
                Err(e) => {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        });
    }
}

/// The round trip: a slot says it is free, and gets its next job once there is one.
async fn dispatch(queue: Arc<Queue>, mut free: tokio::sync::mpsc::UnboundedReceiver<mpsc::Sender<String>>) {
    let mut waiting: VecDeque<mpsc::Sender<String>> = VecDeque::new();
    loop {
        tokio::select! {
            slot = free.recv() => match slot {
                Some(slot) => waiting.push_back(slot),
                None => return,
            },
            () = queue.pushed.notified() => {}
        }
        while !waiting.is_empty() {
            let Some(id) = queue.try_pop() else { break };
            if let Some(slot) = waiting.pop_front() {
                let _ = slot.send(id);
            }
        }
    }
}

/// One job slot: takes jobs until the queue is closed, runs each, reports it.
fn run_slot(
    queue: &Queue,
    free: Option<tokio::sync::mpsc::UnboundedSender<mpsc::Sender<String>>>,
    finishes: &tokio::sync::mpsc::UnboundedSender<Finished>,
    null: &File,
) -> ProbeResult<()> {
    let mut output = Vec::with_capacity(16 * 1024);
    loop {
        let id = match &free {
            None => queue.pop(),
            Some(free) => {
                let (next_tx, next) = mpsc::channel();
                if free.send(next_tx).is_err() {
                    return Ok(());
                }
                // Ends when the dispatcher is dropped with the runtime.
                next.recv().ok()
            }
        };
        let Some(id) = id else { return Ok(()) };
        let started = Utc::now();
        let (mut reader, writer) = std::io::pipe()?;
        let mut child = Command::new("/bin/true")
            .process_group(0)
            .env("JOBZ_JOB_ID", &id)
            .stdin(null.try_clone()?)
            .stdout(Stdio::from(writer.try_clone()?))
            .stderr(Stdio::from(writer))
            .spawn()?;
        output.clear();
        reader.read_to_end(&mut output)?;
        let status = child.wait()?;
        let finished = Finished { id, succeeded: status.success(), started, ended: Utc::now() };
        if finishes.send(finished).is_err() {
            return Ok(());
        }
    }
}
