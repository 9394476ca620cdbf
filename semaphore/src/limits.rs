//! Named limits of the semaphore: every wait, resend and buffer of its session
//! with the broker has its bound here.

use std::time::Duration;

/// How often the semaphore sends a heartbeat when it has sent nothing else; the broker's Welcome overrides it.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeats the broker may miss before the semaphore reconnects (Paranoid Pirate's liveness).
pub const HEARTBEAT_LIVENESS: u32 = 3;
/// How long the broker may stay silent before the semaphore reconnects, until Welcome says otherwise.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(3);
/// The broker timeout never drops below this, however short the heartbeat.
pub const BROKER_TIMEOUT_MIN: Duration = Duration::from_millis(500);
/// The first wait before reconnecting to a lost broker; it doubles up to the maximum.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// An unanswered Hello is sent again this often.
pub const HELLO_RESEND: Duration = Duration::from_secs(1);

/// How often the session's loop looks at its timers.
pub const TICK: Duration = Duration::from_millis(50);
/// Once caught up (an empty page), the semaphore asks for new events this often.
pub const EVENTS_POLL: Duration = Duration::from_millis(100);
/// An unanswered Subscribe is sent again after this long.
pub const SUBSCRIBE_RESEND: Duration = Duration::from_secs(2);
/// How often keys past their gate's timeout are given up (when caught up).
pub const EXPIRE_INTERVAL: Duration = Duration::from_millis(250);
/// Keys are given up as of this long before the semaphore last knew it had
/// every event: an event recorded just before a deadline but committed (and
/// visible) just after it still counts.
pub const EXPIRE_LAG: Duration = Duration::from_secs(1);
/// A fire the broker has not answered is sent again after this long.
pub const FIRE_RESEND: Duration = Duration::from_secs(3);
/// Fires sent and not yet answered, at most: the rest wait their turn, so a
/// rebuild that re-fires thousands of keys never overflows the send queue
/// (its high-water mark is 1000 messages).
pub const FIRES_IN_FLIGHT_MAX: usize = 256;
/// The semaphore reads no further events while this many fires wait for an
/// answer: one page adds at most a page's events times the gates per job, so
/// memory stays bounded while a broker is slow to answer.
pub const UNACKED_FIRES_PULL_MAX: usize = 1000;
/// On shutdown, how long the semaphore waits for answers to the fires it sent.
pub const FIRE_ACK_WAIT: Duration = Duration::from_secs(2);

/// Warnings about keys that cannot be counted (a key template that cannot be
/// filled, a fire the broker refuses): at most this many per window, the rest
/// counted and reported with the next one.
pub const KEY_WARNINGS_PER_WINDOW: u32 = 10;
pub const KEY_WARNINGS_WINDOW: Duration = Duration::from_secs(60);
