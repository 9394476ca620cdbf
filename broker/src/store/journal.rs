//! The start journal: a small append-only file that makes a start durable
//! with one short sync, instead of a sync of the SQLite WAL.
//!
//! A start's transaction writes a dozen pages into the WAL (the row, its
//! index entries, the pages their splits touch): about 50 KiB for a batch of
//! a dozen starts, and syncing that took 3–4 times as long on this project's
//! disks as syncing the 2 KiB the same starts take as rows in this file. So a
//! transaction whose callers waiting for durability are all starting jobs
//! (plain or guarded inserts) commits to SQLite without a sync, as every
//! transaction does here, and also appends the rows it inserted to this file;
//! the syncer syncs this file, not the WAL, before those callers are
//! answered. Everything else (results, cancels, retries...) is still answered
//! after a sync of the WAL.
//!
//! Most starts go further (`Writer::defer_batch`, `store/unflushed.rs`): an
//! urgent batch of plain starts is appended here and answered after the sync
//! with no SQLite transaction on the way, and the rows go into SQLite with the
//! writer's next transaction, which stores the record's number.
//!
//! **Sequence numbers.** Each record carries the next number of a sequence
//! that never restarts, and the transaction that puts its rows into SQLite
//! sets `journal_state.seq` to it. SQLite's durable state is always a prefix of its commits, so after
//! a crash every record numbered above the stored `seq` is a start whose
//! transaction was lost (or never synced): [`Journal::open`] inserts its rows
//! again (`INSERT OR IGNORE`, so a row that is there stays as it is) before
//! anything else runs. A record at or below it is in SQLite already, together
//! with whatever happened to its jobs since (a prune included), and is skipped.
//!
//! **Space.** The file is preallocated and written through once, so appends
//! overwrite allocated blocks and a sync writes data only, no file-system
//! metadata. Past half its size, writing starts over at the front as
//! soon as a sync of the WAL has covered every record in the file; until then
//! transactions are answered through the WAL as before. A reader finds the end
//! of the current records where the chain of consecutive numbers and valid
//! checksums breaks: a torn last record, or an older record left from before
//! the last start-over (its number is lower).
//!
//! **Format.** A 16-byte header (`JOBZJNL1` and 8 zero bytes), then records:
//! `len: u32`, `crc32(seq ‖ payload): u32`, `seq: u64`, `payload` (all little
//! endian). A payload is a row count (`u32`), then rows: a table tag (`u8`:
//! 1 jobs, 2 idempotency keys), a value count (`u8`) and the values bound to
//! that table's insert, each a tag (`u8`: 0 null, 1 integer, 2 real, 3 text,
//! 4 blob) and its bytes (8 for numbers; `u32` length and bytes for text and
//! blobs). Decoding is pure and checks every length against what is left.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};

use super::writer::{INSERT_IDEMPOTENCY_KEY, INSERT_JOB};
use super::StoreError;

/// The journal's file in the data directory.
pub(super) const JOURNAL_FILE_NAME: &str = "starts.journal";
const MAGIC: [u8; 8] = *b"JOBZJNL1";
const HEADER_BYTES: u64 = 16;
/// A larger record (an enormous batch) is not journaled; its callers wait
/// for a WAL sync. A reader takes a longer one for garbage.
const RECORD_MAX_BYTES: usize = 4 << 20;
/// `len`, `crc` and `seq`.
const RECORD_HEAD_BYTES: usize = 16;
/// The smallest journal [`Journal::open`] makes.
const JOURNAL_BYTES_MIN: u64 = 4096;

/// How many values a jobs row has (those of the writer's `INSERT_JOB`).
pub(super) const JOB_VALUES: usize = 27;
/// How many values an idempotency key row has: key, job_id, job_name, params, created_at.
pub(super) const KEY_VALUES: usize = 5;

const TABLE_JOBS: u8 = 1;
const TABLE_KEYS: u8 = 2;

/// One row a journaled transaction inserted, as the values bound to its insert.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Row {
    Job(Vec<Value>),
    IdempotencyKey(Vec<Value>),
}

/// Appends one row's encoding to `out`.
pub(super) fn encode_row(out: &mut Vec<u8>, table: RowTable, values: &[ValueRef<'_>]) {
    out.push(match table {
        RowTable::Jobs => TABLE_JOBS,
        RowTable::IdempotencyKeys => TABLE_KEYS,
    });
    // At most JOB_VALUES (27) values: they fit a byte.
    out.push(values.len() as u8);
    for value in values {
        match value {
            ValueRef::Null => out.push(0),
            ValueRef::Integer(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            ValueRef::Real(f) => {
                out.push(2);
                out.extend_from_slice(&f.to_le_bytes());
            }
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                out.push(if matches!(value, ValueRef::Text(_)) { 3 } else { 4 });
                // A value of the store is far below 4 GiB (params are capped at a few KiB,
                // output tails at 64 KiB); a record over RECORD_MAX_BYTES is not journaled.
                out.extend_from_slice(&(bytes.len().min(u32::MAX as usize) as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// Which table a row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowTable {
    Jobs,
    IdempotencyKeys,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("the payload ends inside a row")]
    Truncated,
    #[error("unknown table tag {0}")]
    UnknownTable(u8),
    #[error("a row of table {table} has {found} values, not {expected}")]
    WrongWidth { table: u8, found: usize, expected: usize },
    #[error("unknown value tag {0}")]
    UnknownValue(u8),
    #[error("{0} bytes follow the last row")]
    Trailing(usize),
}

/// Decodes a record's payload into its rows.
pub(super) fn decode_payload(payload: &[u8]) -> Result<Vec<Row>, DecodeError> {
    let mut input = Input(payload);
    let count = u32::from_le_bytes(input.take_array()?);
    let mut rows = Vec::with_capacity((count as usize).min(payload.len() / 2));
    for _ in 0..count {
        let table = input.take_array::<1>()?[0];
        let width = usize::from(input.take_array::<1>()?[0]);
        let expected = match table {
            TABLE_JOBS => JOB_VALUES,
            TABLE_KEYS => KEY_VALUES,
            other => return Err(DecodeError::UnknownTable(other)),
        };
        if width != expected {
            return Err(DecodeError::WrongWidth { table, found: width, expected });
        }
        let mut values = Vec::with_capacity(width);
        for _ in 0..width {
            values.push(match input.take_array::<1>()?[0] {
                0 => Value::Null,
                1 => Value::Integer(i64::from_le_bytes(input.take_array()?)),
                2 => Value::Real(f64::from_le_bytes(input.take_array()?)),
                tag @ (3 | 4) => {
                    let len = u32::from_le_bytes(input.take_array()?) as usize;
                    let bytes = input.take(len)?;
                    if tag == 3 {
                        Value::Text(String::from_utf8_lossy(bytes).into_owned())
                    } else {
                        Value::Blob(bytes.to_vec())
                    }
                }
                other => return Err(DecodeError::UnknownValue(other)),
            });
        }
        rows.push(if table == TABLE_JOBS { Row::Job(values) } else { Row::IdempotencyKey(values) });
    }
    match input.0.len() {
        0 => Ok(rows),
        left => Err(DecodeError::Trailing(left)),
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }
}

/// A record's bytes: head and payload.
pub(super) fn encode_record(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEAD_BYTES + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    record.extend_from_slice(&seq.to_le_bytes());
    record.extend_from_slice(payload);
    record
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The chain of records at the front of `bytes` (the file after its header):
/// each `(seq, payload)` in order, as long as each record is whole, its
/// checksum holds and its number follows the one before.
pub(super) fn read_chain(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut previous: Option<u64> = None;
    while let Some(head) = bytes.get(at..at + RECORD_HEAD_BYTES) {
        let field = |range: std::ops::Range<usize>| &head[range];
        let len = u32::from_le_bytes(field(0..4).try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(field(4..8).try_into().unwrap_or([0; 4]));
        let seq = u64::from_le_bytes(field(8..16).try_into().unwrap_or([0; 8]));
        if len == 0 || len > RECORD_MAX_BYTES || previous.is_some_and(|p| p.checked_add(1) != Some(seq)) {
            break;
        }
        let Some(payload) = bytes.get(at + RECORD_HEAD_BYTES..at + RECORD_HEAD_BYTES + len) else { break };
        if checksum(seq, payload) != crc {
            break;
        }
        records.push((seq, payload));
        previous = Some(seq);
        at += RECORD_HEAD_BYTES + len;
    }
    records
}

/// Makes what was written to the journal `file` (at `path`) durable.
pub(super) fn sync_file(file: &File, path: &Path) -> Result<(), StoreError> {
    file.sync_data().map_err(|error| StoreError::Io {
        context: "sync the start journal",
        path: path.to_path_buf(),
        error: Arc::new(error),
    })
}

/// The journal as the writer holds it.
pub(super) struct Journal {
    file: Arc<File>,
    path: PathBuf,
    /// The preallocated size; writing starts over once past half of it.
    capacity: u64,
    /// Where the next record goes.
    offset: u64,
    /// The number of the next record.
    next_seq: u64,
    /// The number of the last record written since writing last started at the front.
    last_written: Option<u64>,
    /// No record may be written until a WAL sync covers `last_written` (the
    /// file is past its start-over point, or a write failed).
    paused: bool,
}

impl Journal {
    /// Opens `dir`'s journal (creating and preallocating it if needed), puts
    /// back into `conn` the rows of every record SQLite lost, makes them
    /// durable, and returns the journal ready to write at its front.
    ///
    /// The file is locked (`flock`) for as long as the store has it open: a
    /// second store on the same directory, in this process or another, waits
    /// up to `wait_for_lock` for it (a broker restarting while the last one
    /// exits) and is then refused, rather than both writing over each other.
    pub(super) fn open(
        conn: &mut Connection,
        dir: &Path,
        capacity: u64,
        wait_for_lock: std::time::Duration,
    ) -> Result<Journal, StoreError> {
        let capacity = capacity.max(JOURNAL_BYTES_MIN);
        let path = dir.join(JOURNAL_FILE_NAME);
        let io = |context: &'static str| {
            let path = path.clone();
            move |error: io::Error| StoreError::Io { context, path, error: Arc::new(error) }
        };
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io("open"))?;
        lock(&file, dir, wait_for_lock)?;
        let len = file.metadata().map_err(io("read the size of"))?.len();
        // Read whole: a file written with a larger capacity may hold records past this one's.
        let mut contents = vec![0u8; len as usize];
        file.read_exact_at(&mut contents, 0).map_err(io("read"))?;
        let fresh = len == 0;
        if !fresh && (contents.len() < HEADER_BYTES as usize || contents[..8] != MAGIC) {
            return Err(StoreError::JournalUnreadable {
                path,
                reason: "it does not start as a jobz start journal; move it away if it is not one".into(),
            });
        }
        let chain = contents.get(HEADER_BYTES as usize..).map(read_chain).unwrap_or_default();
        let stored = stored_seq(conn)?;
        let last_in_file = chain.last().map(|(seq, _)| *seq);
        let lost: Vec<_> = chain.iter().filter(|(seq, _)| *seq > stored).collect();
        if !lost.is_empty() {
            let mut rows = Vec::new();
            for (seq, payload) in &lost {
                rows.extend(decode_payload(payload).map_err(|e| StoreError::JournalUnreadable {
                    path: path.clone(),
                    reason: format!("record {seq} is unreadable: {e}"),
                })?);
            }
            let last = lost.last().map_or(stored, |(seq, _)| *seq);
            replay(conn, &rows, last)?;
            tracing::warn!(
                path = %path.display(),
                records = lost.len(),
                rows = rows.len(),
                "restored starts the database had lost from the start journal"
            );
        }
        // Written through once: appends then overwrite allocated blocks, and
        // their syncs carry no metadata. An existing file is extended if short.
        if len < capacity {
            let mut header = [0u8; HEADER_BYTES as usize];
            header[..8].copy_from_slice(&MAGIC);
            file.write_all_at(&header, 0).map_err(io("write the header of"))?;
            let zeros = vec![0u8; 1 << 20];
            let mut at = len.max(HEADER_BYTES);
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at).map_err(io("preallocate"))?;
                at += n as u64;
            }
            file.sync_all().map_err(io("sync"))?;
            if fresh {
                sync_parent(dir).map_err(io("sync the directory of"))?;
            }
        }
        let next_seq = stored.max(last_in_file.unwrap_or(0)) + 1;
        Ok(Journal {
            file: Arc::new(file),
            path,
            capacity,
            offset: HEADER_BYTES,
            next_seq,
            last_written: None,
            paused: false,
        })
    }

    /// The file, for the syncer.
    pub(super) fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Makes every record appended so far durable.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        sync_file(&self.file, &self.path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the next transaction may be journaled, given that a WAL sync
    /// has covered every record up to `covered`. Starts writing over at the
    /// front when the file is past its start-over point (or a write failed)
    /// and everything in it is covered; until then, says no.
    pub(super) fn ready(&mut self, covered: u64) -> bool {
        if self.paused || self.offset >= self.capacity / 2 {
            if self.last_written.is_some_and(|last| covered < last) {
                self.paused = true;
                return false;
            }
            self.offset = HEADER_BYTES;
            self.last_written = None;
            self.paused = false;
        }
        true
    }

    /// Whether a record of `payload_len` bytes fits where the next one goes.
    /// If it does not, no record is written until the journal starts over.
    pub(super) fn fits(&mut self, payload_len: usize) -> bool {
        let fits =
            payload_len <= RECORD_MAX_BYTES && self.offset + (RECORD_HEAD_BYTES + payload_len) as u64 <= self.capacity;
        if !fits && self.offset > HEADER_BYTES {
            self.paused = true;
        }
        fits
    }

    /// The number the next record will carry (its transaction stores it).
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes the record numbered [`Journal::next_seq`] (not synced). Its
    /// number is used up either way; after a failure no record is written
    /// until a start-over, so the chain never has a gap.
    pub(super) fn append(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = encode_record(seq, payload);
        let written = self.file.write_all_at(&record, self.offset);
        match written {
            Ok(()) => {
                self.offset += record.len() as u64;
                self.last_written = Some(seq);
                Ok(())
            }
            Err(error) => {
                self.paused = true;
                Err(StoreError::Io { context: "append to", path: self.path.clone(), error: Arc::new(error) })
            }
        }
    }
}

/// Takes the exclusive lock on `dir`'s journal, waiting up to `wait` for another holder to let go.
fn lock(file: &File, dir: &Path, wait: std::time::Duration) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                if !said {
                    // Otherwise a second broker on the directory would say nothing until it gives up.
                    tracing::warn!(
                        dir = %dir.display(),
                        wait = ?wait,
                        "the data directory is in use by another jobz broker; waiting for it to stop"
                    );
                    said = true;
                }
                std::thread::sleep(LOCK_RETRY)
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::InUse { path: dir.to_owned() }),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(StoreError::Io {
                    context: "lock the start journal in",
                    path: dir.to_owned(),
                    error: Arc::new(error),
                })
            }
        }
    }
}

/// How often a store waiting for the journal's lock tries again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// The number of the last journaled transaction SQLite holds.
fn stored_seq(conn: &Connection) -> Result<u64, StoreError> {
    let seq: Option<i64> = conn
        .query_row("SELECT seq FROM journal_state WHERE id = 1", [], |row| row.get(0))
        .optional()
        .map_err(StoreError::sqlite("read the journal's number"))?;
    Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
}

/// Inserts `rows` where missing and records `last` as journaled, in one
/// transaction, then checkpoints so that all of it is on the disk.
fn replay(conn: &mut Connection, rows: &[Row], last: u64) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("begin replaying the start journal"))?;
    {
        // The writer's own insert, keeping a row that is there.
        let insert_job = INSERT_JOB.replacen("INSERT INTO", "INSERT OR IGNORE INTO", 1);
        let mut jobs = tx.prepare(&insert_job).map_err(StoreError::sqlite("prepare the journal's job insert"))?;
        let mut keys =
            tx.prepare(INSERT_IDEMPOTENCY_KEY).map_err(StoreError::sqlite("prepare the journal's key insert"))?;
        for row in rows {
            match row {
                Row::Job(values) => jobs.execute(params_from_iter(values.iter())),
                Row::IdempotencyKey(values) => keys.execute(params_from_iter(values.iter())),
            }
            .map_err(StoreError::sqlite("replay a row of the start journal"))?;
        }
    }
    tx.execute("UPDATE journal_state SET seq = ?1 WHERE id = 1", params![i64::try_from(last).unwrap_or(i64::MAX)])
        .map_err(StoreError::sqlite("record the journal's number"))?;
    tx.commit().map_err(StoreError::sqlite("commit the replay of the start journal"))?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(StoreError::sqlite("checkpoint after replaying the start journal"))?;
    Ok(())
}

fn sync_parent(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(rows: &[(RowTable, Vec<ValueRef<'_>>)]) -> Vec<u8> {
        let mut out = (rows.len() as u32).to_le_bytes().to_vec();
        for (table, values) in rows {
            encode_row(&mut out, *table, values);
        }
        out
    }

    fn key_row() -> Vec<ValueRef<'static>> {
        vec![
            ValueRef::Text(b"k"),
            ValueRef::Text(b"j1"),
            ValueRef::Text(b"noop"),
            ValueRef::Text(b"{}"),
            ValueRef::Integer(-5),
        ]
    }

    #[test]
    fn rows_round_trip() {
        let mut job: Vec<ValueRef<'_>> = vec![ValueRef::Null; JOB_VALUES];
        job[0] = ValueRef::Text("é1".as_bytes());
        job[4] = ValueRef::Integer(i64::MIN);
        job[23] = ValueRef::Real(12.5);
        job[24] = ValueRef::Blob(&[0, 255]);
        let bytes = payload(&[(RowTable::Jobs, job.clone()), (RowTable::IdempotencyKeys, key_row())]);
        let rows = decode_payload(&bytes).unwrap();
        let owned = |values: &[ValueRef<'_>]| {
            values
                .iter()
                .map(|v| match *v {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Integer(i),
                    ValueRef::Real(f) => Value::Real(f),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(rows, vec![Row::Job(owned(&job)), Row::IdempotencyKey(owned(&key_row()))]);
    }

    #[test]
    fn every_cut_of_a_payload_is_an_error_not_a_panic() {
        let bytes = payload(&[(RowTable::IdempotencyKeys, key_row())]);
        for cut in 0..bytes.len() {
            assert!(decode_payload(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_payload(&longer), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn a_wrong_width_or_tag_is_refused() {
        let mut bytes = payload(&[(RowTable::IdempotencyKeys, key_row())]);
        bytes[5] = 4;
        assert!(matches!(decode_payload(&bytes), Err(DecodeError::WrongWidth { .. })));
        bytes[5] = KEY_VALUES as u8;
        bytes[4] = 9;
        assert_eq!(decode_payload(&bytes), Err(DecodeError::UnknownTable(9)));
    }

    #[test]
    fn the_chain_stops_at_a_torn_record_a_gap_or_an_older_record() {
        let mut file = Vec::new();
        for seq in 7..10 {
            file.extend(encode_record(seq, &[seq as u8; 5]));
        }
        let whole = file.len();
        // An older record left behind from before a start-over: its number is lower.
        file.extend(encode_record(3, b"old"));
        let chain = read_chain(&file);
        assert_eq!(chain.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![7, 8, 9]);
        // Torn: the last record cut short, or one byte of it changed.
        assert_eq!(read_chain(&file[..whole - 1]).len(), 2);
        let mut flipped = file.clone();
        flipped[whole - 1] ^= 1;
        assert_eq!(read_chain(&flipped).len(), 2);
        // A gap in the numbers ends the chain.
        let mut gap = encode_record(1, b"a");
        gap.extend(encode_record(3, b"b"));
        assert_eq!(read_chain(&gap).len(), 1);
        // Zeros (a fresh file) hold no record; neither does garbage.
        assert!(read_chain(&[0u8; 64]).is_empty());
        assert!(read_chain(&[0xffu8; 64]).is_empty());
    }
}
