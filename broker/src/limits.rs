//! Every bound the broker applies, in one place.

use std::time::Duration;

/// Events waiting for the broker's loop; senders wait when it is full.
pub const EVENT_QUEUE: usize = 4096;
/// Events the loop handles in one turn at most before it dispatches and
/// publishes, so a burst is handled in a few passes but the loop still looks
/// at its other inputs (the network, the tick) between them.
pub const EVENTS_PER_TURN: usize = 64;
/// How often the loop checks leases, retry times and heartbeats.
pub const TICK: Duration = Duration::from_millis(100);
/// How often the broker and workers send heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A worker silent for this long is gone; its attempts are handed to other workers.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished jobs and their logs are kept this long.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// A start's `Idempotency-Key` answers with the job it was first given to for
/// this long (SPEC: kept 24 h); then it is forgotten and starts a job anew.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often finished jobs past their retention are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Jobs pruned in one go, so pruning never holds the store for long.
pub const PRUNE_BATCH: usize = 10_000;
/// Connections replaced by a newer one under the same worker name, remembered
/// so that one that speaks again is told why instead of being asked to
/// register (which would take the name back, and so on, for as long as both run).
pub const SUPERSEDED_PEERS: usize = 1024;
/// Results remembered after their commit, so a resend after a lost ack is acknowledged, not taken as stale.
pub const RECENT_RESULTS: usize = 65_536;
/// Jobs of one run that `POST /runs/{id}/cancel` looks at.
pub const RUN_JOBS_MAX: usize = 10_000;
/// How long a cancel waits for its change to be committed before answering.
pub const CANCEL_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// The range of `priority`.
pub const PRIORITY_MIN: i32 = -1000;
pub const PRIORITY_MAX: i32 = 1000;
/// Gate events read from the store per query when the broker rebuilds its gate progress at start.
pub const GATE_EVENTS_READ: usize = 10_000;
/// Instants of one schedule fired in one check (each is a commit of its own, so this keeps the
/// store's write queue clear); the rest of a longer window follows at the next tick.
pub const SCHEDULE_FIRES_PER_CHECK: usize = 100;
/// A gap this long between two looks at the scheduler's clock (a clock jump, a suspended machine)
/// is treated like downtime: its instants were missed, and the schedule's `catch_up` decides.
pub const SCHEDULE_CLOCK_JUMP: Duration = Duration::from_secs(3600);
/// Recent fires of each schedule kept for `GET /schedules`.
pub const SCHEDULE_RECENT_FIRES: usize = 20;
/// Fires of one schedule whose commit failed, waiting to be tried again; beyond this the oldest is dropped.
pub const SCHEDULE_RETRIES_MAX: usize = 100;
/// The fastest `JOBZ_TEST_CLOCK` may run, as a multiple of real time.
pub const TEST_CLOCK_SPEED_MAX: u32 = 100_000;
