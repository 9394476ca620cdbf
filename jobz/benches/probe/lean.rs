//! The lean probe of part (2): a model of the leanest durable design, run in
//! the same loop as the mesh as a yardstick. It is not jobz's code.
//!
//! - Starts come over HTTP: hyper on one runtime thread, like the front door.
//!   Each is answered 202 only after its record is appended to a start journal
//!   and `fdatasync`ed. Starts that wait together share one sync.
//! - The queue is in memory.
//! - `slots` threads each take the next job from the queue and run it the
//!   runner's way: its own process group, stdin `/dev/null`, stdout and stderr
//!   in one pipe read to end-of-file, then the wait. So each blocks in `read`
//!   and `waitpid`, which the kernel wakes on the CPU of the child that just
//!   ended, and no job waits for a round trip before it starts.
//! - Finishes are appended to a finish log, synced at most every
//!   [`FINISH_GROUP`].
//!
//! The probe has no SQLite and no statuses to read, and no leases, worker
//! protocol, retries or follow-ups. It only shows what the machine allows a
//! design with jobz's durability for starts.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

type ProbeResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long a finish may wait for company before its sync, like the loop's grouped commits.
const FINISH_GROUP: Duration = Duration::from_millis(5);

/// A start waiting for its sync: its id and who to answer.
type Start = (u64, tokio::sync::oneshot::Sender<()>);

/// The jobs to run, and whether more can come.
#[derive(Default)]
struct Queue {
    state: Mutex<(VecDeque<u64>, bool)>,
    ready: Condvar,
}

impl Queue {
    fn push(&self, ids: impl Iterator<Item = u64>) {
        if let Ok(mut state) = self.state.lock() {
            state.0.extend(ids);
        }
        self.ready.notify_all();
    }

    /// The next job, or `None` once the queue is closed and empty.
    fn pop(&self) -> Option<u64> {
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

/// A running probe: its address, and when `jobs` finishes are in.
pub struct Probe {
    pub addr: SocketAddr,
    runtime: Runtime,
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<ProbeResult<()>>>,
    /// The time of the finish that completed the expected count.
    done: mpsc::Receiver<SystemTime>,
}

impl Probe {
    /// Starts the probe with its files under `dir`, expecting `jobs` finishes, with `slots` job slots.
    pub fn start(dir: &Path, jobs: usize, slots: usize) -> ProbeResult<Probe> {
        let queue = Arc::new(Queue::default());
        let mut threads = Vec::new();

        let (finish_tx, finish_rx) = mpsc::channel::<bool>();
        let (done_tx, done) = mpsc::channel();
        let mut finishes = File::options().create(true).append(true).open(dir.join("finishes"))?;
        threads.push(std::thread::Builder::new().name("probe-finish".into()).spawn(move || {
            let (mut count, mut last_sync, mut record) = (0usize, Instant::now(), Vec::new());
            while let Ok(first) = finish_rx.recv() {
                std::thread::sleep((last_sync + FINISH_GROUP).saturating_duration_since(Instant::now()));
                record.clear();
                for succeeded in std::iter::once(first).chain(finish_rx.try_iter()) {
                    if !succeeded {
                        return Err("/bin/true did not succeed in the probe".into());
                    }
                    writeln!(record, "{count} succeeded")?;
                    count += 1;
                }
                finishes.write_all(&record)?;
                finishes.sync_data()?;
                last_sync = Instant::now();
                if count == jobs {
                    let _ = done_tx.send(SystemTime::now());
                }
            }
            Ok(())
        })?);

        for _ in 0..slots {
            let (queue, finish_tx) = (queue.clone(), finish_tx.clone());
            let null = File::open("/dev/null")?;
            threads.push(std::thread::Builder::new().name("probe-slot".into()).spawn(move || {
                let mut output = Vec::with_capacity(16 * 1024);
                while let Some(id) = queue.pop() {
                    let (mut reader, writer) = std::io::pipe()?;
                    let mut child = Command::new("/bin/true")
                        .process_group(0)
                        .env("JOBZ_JOB_ID", id.to_string())
                        .stdin(null.try_clone()?)
                        .stdout(Stdio::from(writer.try_clone()?))
                        .stderr(Stdio::from(writer))
                        .spawn()?;
                    output.clear();
                    reader.read_to_end(&mut output)?;
                    let status = child.wait()?;
                    if finish_tx.send(status.success()).is_err() {
                        break;
                    }
                }
                Ok(())
            })?);
        }
        drop(finish_tx);

        let (start_tx, start_rx) = mpsc::channel::<Start>();
        let mut journal = File::options().create(true).append(true).open(dir.join("starts"))?;
        let journal_queue = queue.clone();
        threads.push(std::thread::Builder::new().name("probe-journal".into()).spawn(move || {
            let mut record = Vec::new();
            while let Ok(first) = start_rx.recv() {
                let batch: Vec<Start> = std::iter::once(first).chain(start_rx.try_iter()).collect();
                record.clear();
                for (id, _) in &batch {
                    writeln!(record, "{id} noop {{}}")?;
                }
                journal.write_all(&record)?;
                journal.sync_data()?;
                journal_queue.push(batch.iter().map(|(id, _)| *id));
                for (_, answer) in batch {
                    let _ = answer.send(());
                }
            }
            Ok(())
        })?);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("probe-http")
            .build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let ids = Arc::new(AtomicU64::new(1));
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let (start_tx, ids) = (start_tx.clone(), ids.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let (start_tx, id) = (start_tx.clone(), ids.fetch_add(1, Ordering::Relaxed));
                        async move {
                            let (answer, stored) = tokio::sync::oneshot::channel();
                            let stored = start_tx.send((id, answer)).is_ok() && stored.await.is_ok();
                            let (status, body) = if stored {
                                (
                                    StatusCode::ACCEPTED,
                                    format!(r#"{{"id":"{id}","job_name":"noop","status":"queued","run_id":"{id}"}}"#),
                                )
                            } else {
                                (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"the probe's journal stopped"}"#.into())
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
        });
        Ok(Probe { addr, runtime, queue, threads, done })
    }

    /// Waits up to `deadline` for the expected finishes; the time of the last one.
    pub fn wait_done(&self, deadline: Duration) -> ProbeResult<SystemTime> {
        self.done
            .recv_timeout(deadline)
            .map_err(|_| format!("the lean probe did not finish within {deadline:?}").into())
    }

    /// Stops the HTTP side, lets the slots end, and joins every thread.
    pub fn stop(self, deadline: Duration) -> ProbeResult<()> {
        // Dropping the runtime's tasks drops every sender of starts: the journal thread ends.
        self.runtime.shutdown_timeout(deadline);
        self.queue.close();
        for thread in self.threads {
            thread.join().map_err(|_| "a probe thread panicked")??;
        }
        Ok(())
    }
}
