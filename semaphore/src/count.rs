//! The semaphore's counting path, pure: recorded gate events and the passing
//! of time in, the gate effects out.
//!
//! [`Counter`] wraps the one [`GateBook`] of `jobz_core::gates` (eager mode
//! counts with the same book) and adds what counting a *recorded* history
//! needs: each event is counted at its own time (`at`, stamped by the broker),
//! and a key whose deadline passed before an event is given up before that
//! event is counted. So a replay of the same events gives the same effects,
//! whichever semaphore replays them and whenever: a semaphore that restarts
//! rebuilds exactly the book it had (see `docs/PROTOCOL.md`, "Gates").
//!
//! The live session and the counting benchmark both call this module; it does
//! no I/O and reads no clock.

use chrono::{DateTime, Utc};
use config::JobFile;
use jobz_core::gates::{GateBook, GateEffect};
use jobz_core::protocol::GateEvent;

/// A gate book fed with recorded events, with the earliest deadline of its
/// open keys kept on the side, so that giving up keys costs nothing until one
/// is due.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    book: GateBook,
    /// No open key of a gate with a timeout is due before this; `None`: none is open.
    /// It may be earlier than the true earliest deadline (then a scan finds
    /// nothing due and moves it), never later.
    next_deadline: Option<DateTime<Utc>>,
}

impl Counter {
    pub fn new() -> Counter {
        Counter::default()
    }

    /// The counts, for inspection (`GET /gates`-like views, tests).
    pub fn book(&self) -> &GateBook {
        &self.book
    }

    /// Counts one recorded event at its own time: first gives up the keys
    /// whose deadline had passed when it was recorded, then counts it.
    pub fn event(&mut self, file: &JobFile, event: &GateEvent) -> Vec<GateEffect> {
        let mut effects = self.expire(file, event.at);
        effects.extend(self.book.observe(file, &event.upstream(), event.at));
        // A key this event opened is due `timeout` after it; a key it did not open is due
        // no later than that, so the minimum stays a lower bound either way.
        for gate in file.gates.values().filter(|g| g.after.contains(&event.job_name)) {
            if let Some(due) = gate.timeout.and_then(|t| chrono::Duration::from_std(t).ok()).map(|t| event.at + t) {
                self.next_deadline = Some(self.next_deadline.map_or(due, |d| d.min(due)));
            }
        }
        effects
    }

    /// Gives up the open keys whose deadline passed at `now` (their `on_timeout` fires).
    pub fn expire(&mut self, file: &JobFile, now: DateTime<Utc>) -> Vec<GateEffect> {
        match self.next_deadline {
            Some(due) if due <= now => {}
            _ => return Vec::new(),
        }
        let effects = self.book.expire(file, now);
        self.next_deadline = earliest_deadline(&self.book, file);
        effects
    }
}

/// The earliest deadline of a key that can still time out: open, not failed,
/// of a gate with a timeout.
fn earliest_deadline(book: &GateBook, file: &JobFile) -> Option<DateTime<Utc>> {
    file.gates
        .values()
        .filter_map(|gate| {
            let timeout = chrono::Duration::from_std(gate.timeout?).ok()?;
            book.keys(&gate.name)?
                .values()
                .filter(|state| state.is_open() && !state.failed)
                .map(|state| state.opened_at + timeout)
                .min()
        })
        .min()
}

/// Counts a whole recorded history from the start, as a semaphore does when
/// it starts: the book it ends with and every effect on the way (the fires
/// the broker already has are answered as repeats).
pub fn rebuild<'a>(file: &JobFile, events: impl IntoIterator<Item = &'a GateEvent>) -> (Counter, Vec<GateEffect>) {
    let mut counter = Counter::new();
    let mut effects = Vec::new();
    for event in events {
        effects.extend(counter.event(file, event));
    }
    (counter, effects)
}
