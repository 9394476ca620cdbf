//! The SQLite schema, its migrations (tracked in `PRAGMA user_version`) and
//! the settings every connection gets.
//!
//! The CHECK constraints state the invariants of a job row, so a change that
//! would break one is refused by SQLite itself, whatever code sent it:
//! `finished_at` is set exactly when the status is final, a running job holds a
//! lease, a worker and a start time, and only gate-started jobs have gate
//! columns. Tables are STRICT, so a value of the wrong type is refused too.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{StoreError, StoreOptions, JOURNAL_SIZE_LIMIT_BYTES, STATEMENT_CACHE_CAPACITY, WAL_AUTOCHECKPOINT_PAGES};

/// Migration `i` takes the schema from version `i` to version `i + 1`. Append
/// only: a released migration never changes.
const MIGRATIONS: &[Migration] = &[
    // Version 1.
    Migration::Sql(
        "
    CREATE TABLE jobs (
        -- Insertion order: the first-in, first-out tie-break of the queue.
        seq              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        job_name         TEXT NOT NULL,
        -- A JSON object of strings.
        params           TEXT NOT NULL,
        status           TEXT NOT NULL
            CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')),
        attempts         INTEGER NOT NULL CHECK (attempts >= 0),
        run_id           TEXT NOT NULL,
        parent_id        TEXT,
        origin_kind      TEXT NOT NULL
            CHECK (origin_kind IN ('start', 'on_success', 'on_failure', 'gate', 'schedule')),
        origin_gate      TEXT,
        origin_key       TEXT,
        origin_reason    TEXT CHECK (origin_reason IN ('then', 'timeout', 'failure')),
        priority         INTEGER NOT NULL,
        worker           TEXT,
        -- A u64 fencing token stored bit for bit.
        lease            INTEGER,
        exit_code        INTEGER,
        signal           INTEGER,
        -- Times: Unix microseconds, UTC.
        created_at       INTEGER NOT NULL,
        queued_at        INTEGER,
        started_at       INTEGER,
        finished_at      INTEGER,
        cancelled_at     INTEGER,
        not_before       INTEGER,
        output_tail      TEXT NOT NULL,
        progress_percent REAL,
        progress_message TEXT,
        error            TEXT,
        CHECK (CASE WHEN origin_kind = 'gate'
                    THEN origin_gate IS NOT NULL AND origin_key IS NOT NULL AND origin_reason IS NOT NULL
                    ELSE origin_gate IS NULL AND origin_key IS NULL AND origin_reason IS NULL END),
        CHECK ((status IN ('queued', 'running')) = (finished_at IS NULL)),
        CHECK (status <> 'running' OR (lease IS NOT NULL AND worker IS NOT NULL AND started_at IS NOT NULL)),
        CHECK (progress_message IS NULL OR progress_percent IS NOT NULL)
    ) STRICT;

    -- Recovery and dispatch: the unfinished jobs in queue order. Partial, so
    -- it holds only the few open jobs, not the finished history.
    CREATE INDEX jobs_queue ON jobs (priority DESC, queued_at, seq)
        WHERE status IN ('queued', 'running');
    -- Listings, newest first (scanned backwards), unfiltered and per filter.
    CREATE INDEX jobs_newest ON jobs (created_at, id);
    CREATE INDEX jobs_by_name ON jobs (job_name, created_at, id);
    CREATE INDEX jobs_by_run ON jobs (run_id, created_at, id);
    CREATE INDEX jobs_by_status ON jobs (status, created_at, id);
    -- Pruning, oldest finished first.
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    -- Metrics: counts by name and status from the index alone.
    CREATE INDEX jobs_counts ON jobs (job_name, status);

    CREATE TABLE attempts (
        job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        -- Each dispatch has its own lease, and results name their lease.
        lease       INTEGER NOT NULL,
        attempt     INTEGER NOT NULL CHECK (attempt >= 1),
        worker      TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        finished_at INTEGER,
        -- NULL while it runs, or when it ended without a result (lease lost).
        status      TEXT CHECK (status IN ('succeeded', 'failed', 'timed_out', 'cancelled')),
        exit_code   INTEGER,
        stale       INTEGER NOT NULL DEFAULT 0 CHECK (stale IN (0, 1)),
        PRIMARY KEY (job_id, lease)
    ) STRICT, WITHOUT ROWID;
    ",
    ),
    // Version 2: gates. Events of upstream jobs, numbered for semaphores to
    // read in order; and one fire per (gate, key, reason), whoever asks.
    Migration::Sql(
        "
    CREATE TABLE gate_events (
        seq      INTEGER PRIMARY KEY,
        kind     TEXT NOT NULL CHECK (kind IN ('succeeded', 'failed_for_good')),
        job_id   TEXT NOT NULL,
        job_name TEXT NOT NULL,
        params   TEXT NOT NULL,
        run_id   TEXT NOT NULL,
        attempt  INTEGER NOT NULL CHECK (attempt >= 0),
        at       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX gate_events_at ON gate_events (at);

    CREATE TABLE gate_fires (
        gate   TEXT NOT NULL,
        key    TEXT NOT NULL,
        reason TEXT NOT NULL CHECK (reason IN ('then', 'timeout', 'failure')),
        job_id TEXT,
        error  TEXT,
        at     INTEGER NOT NULL,
        PRIMARY KEY (gate, key, reason)
    ) STRICT, WITHOUT ROWID;
    ",
    ),
    // Version 3: the listing indexes end at `created_at`. Their `id` tie-break
    // put a 36-byte key in every entry, written on every insert; the few jobs
    // sharing a `created_at` are now put in `id` order after the index walk
    // (SQLite sorts only the right part of the ORDER BY, and stops at the
    // LIMIT), so listings keep their order.
    Migration::Sql(
        "
    DROP INDEX jobs_newest;
    DROP INDEX jobs_by_name;
    DROP INDEX jobs_by_run;
    DROP INDEX jobs_by_status;
    CREATE INDEX jobs_newest ON jobs (created_at);
    CREATE INDEX jobs_by_name ON jobs (job_name, created_at);
    CREATE INDEX jobs_by_run ON jobs (run_id, created_at);
    CREATE INDEX jobs_by_status ON jobs (status, created_at);
    ",
    ),
    // Version 4: unique jobs and idempotency keys. A job's filled `unique` key,
    // with a partial index (only jobs that have a key pay for it) that finds the
    // holders of one key of one job name, newest first. And each
    // `Idempotency-Key` with the start it was first given with and the job
    // that stands for it.
    Migration::Sql(
        "
    ALTER TABLE jobs ADD COLUMN unique_key TEXT;
    CREATE INDEX jobs_unique ON jobs (job_name, unique_key, created_at) WHERE unique_key IS NOT NULL;

    CREATE TABLE idempotency_keys (
        key        TEXT PRIMARY KEY,
        job_id     TEXT NOT NULL,
        -- The start that first gave the key: a repeat must be the same start.
        job_name   TEXT NOT NULL,
        params     TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
    ",
    ),
    // Version 5: schedules. Each schedule the broker ran with, by its identity (job,
    // cron, time zone, params), with when it was first seen; and one fire per
    // (schedule, instant): a second one is refused, so an instant never starts two jobs.
    Migration::Sql(
        "
    CREATE TABLE schedules (
        id         TEXT PRIMARY KEY,
        first_seen INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE schedule_fires (
        schedule TEXT NOT NULL,
        -- The scheduled instant, Unix microseconds (whole seconds).
        instant  INTEGER NOT NULL,
        job_id   TEXT,
        error    TEXT,
        at       INTEGER NOT NULL,
        -- A fire started a job or says why it could not.
        CHECK ((job_id IS NULL) <> (error IS NULL)),
        PRIMARY KEY (schedule, instant)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX schedule_fires_at ON schedule_fires (at);
    ",
    ),
    // Version 6: two indexes fewer on the jobs table, which every insert and
    // every status change wrote (and every commit's WAL carried). Counts by name
    // and status are kept in memory by the writer (`store/counts.rs`); recovery
    // finds the unfinished jobs through jobs_by_status and sorts them itself.
    Migration::Sql(
        "
    DROP INDEX jobs_queue;
    DROP INDEX jobs_counts;
    ",
    ),
    // Version 7: the number of the last start-journal record whose transaction
    // this database holds (`store/journal.rs`): records above it are put back at open.
    Migration::Sql(
        "
    CREATE TABLE journal_state (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL CHECK (seq >= 0)
    ) STRICT;
    INSERT INTO journal_state (id, seq) VALUES (1, 0);
    ",
    ),
    // Version 8: CHECK constraints without IN lists. SQLite checks `x IN (...)`
    // by filling a temporary table with the list on every insert or update that
    // checks it (three per job insert); `x = a OR x = b ...` is compared in
    // place. The same rules, so the tables' text is rewritten in place.
    Migration::Code(checks_without_in_lists),
];

/// One step of the schema: SQL, or code for what SQL alone cannot say.
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>),
}

/// The schema version this build writes and understands.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens the one read-write connection, sets it up for durable group commits
/// and brings the schema up to date.
pub(super) fn open_writer(path: &Path, options: &StoreOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(StoreError::sqlite("open the database"))?;
    conn.busy_timeout(options.busy_timeout).map_err(StoreError::sqlite("set busy_timeout"))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(StoreError::sqlite("set journal_mode=WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unsupported(format!(
            "{}: SQLite refused WAL mode (got {mode:?}); is it on a network file system?",
            path.display()
        )));
    }
    // NORMAL: a commit writes the WAL without waiting for the disk, and SQLite
    // still syncs the WAL before each checkpoint and the database after it, so
    // the file stays consistent across a power loss. The sync each commit
    // needs to be durable is done by the syncer thread (`store/syncer.rs`)
    // before the commit is answered, so a job answered 202 survives a power
    // loss as under FULL, while the writer goes on with the next batch.
    set_and_check(&conn, "synchronous", 1, "synchronous=NORMAL")?;
    set_and_check(&conn, "foreign_keys", 1, "foreign_keys=ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
        .map_err(StoreError::sqlite("set wal_autocheckpoint"))?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)
        .map_err(StoreError::sqlite("set journal_size_limit"))?;
    // Savepoints spill their undo records to a temp file otherwise.
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(StoreError::sqlite("set temp_store"))?;
    if let Some(pages) = options.max_page_count {
        conn.pragma_update(None, "max_page_count", pages).map_err(StoreError::sqlite("set max_page_count"))?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens a read-only connection; WAL lets it read beside the writer.
pub(super) fn open_reader(path: &Path, options: &StoreOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(StoreError::sqlite("open a read connection"))?;
    conn.busy_timeout(options.busy_timeout).map_err(StoreError::sqlite("set busy_timeout"))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    let version = user_version(&conn)?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::Unsupported(format!(
            "{}: a read connection sees schema version {version}, expected {SCHEMA_VERSION}",
            path.display()
        )));
    }
    Ok(conn)
}

fn set_and_check(conn: &Connection, pragma: &'static str, value: i64, context: &'static str) -> Result<(), StoreError> {
    conn.pragma_update(None, pragma, value).map_err(StoreError::sqlite(context))?;
    let now: i64 = conn.pragma_query_value(None, pragma, |row| row.get(0)).map_err(StoreError::sqlite(context))?;
    if now != value {
        return Err(StoreError::Unsupported(format!("SQLite kept {pragma}={now} when asked for {value}")));
    }
    Ok(())
}

fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(StoreError::sqlite("read user_version"))
}

/// Applies the missing migrations, each in its own transaction together with
/// its version bump. The version is read inside the transaction, so two
/// processes opening one new file at once cannot both migrate it.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::sqlite("begin a migration"))?;
        let version = user_version(&tx)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
        }
        let Some(migration) = usize::try_from(version).ok().and_then(|v| MIGRATIONS.get(v)) else {
            // Up to date (a negative version would have no migration either; it
            // is caught by the equality check below).
            if version != SCHEMA_VERSION {
                return Err(StoreError::Unsupported(format!("{}: unknown schema version {version}", path.display())));
            }
            return Ok(());
        };
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql).map_err(StoreError::sqlite("migrate the schema"))?,
            Migration::Code(migrate) => migrate(&tx)?,
        }
        tx.pragma_update(None, "user_version", version + 1).map_err(StoreError::sqlite("bump user_version"))?;
        tx.commit().map_err(StoreError::sqlite("commit a migration"))?;
        tracing::info!(path = %path.display(), version = version + 1, "store schema migrated");
    }
}

/// Migration 8: every table's CHECK constraints of the form `col IN (literals)`
/// become `(col = literal OR ...)`, by SQLite's documented procedure for
/// schema changes that leave the stored rows as they are (the text in
/// `sqlite_schema` is replaced and the schema version bumped, in one
/// transaction). Each rewritten table is read back before the commit, so SQL
/// that does not parse rolls the whole migration back.
fn checks_without_in_lists(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let version: i64 = tx
        .query_row("PRAGMA schema_version", [], |row| row.get(0))
        .map_err(StoreError::sqlite("read the schema version"))?;
    let tables: Vec<(String, String)> = tx
        .prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND sql LIKE '%CHECK%'")
        .and_then(|mut statement| {
            statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<Vec<_>, _>>()
        })
        .map_err(StoreError::sqlite("read the tables' schema"))?;
    let rewritten: Vec<(String, String)> =
        tables.into_iter().filter_map(|(name, sql)| or_chains(&sql).map(|new| (name, new))).collect();
    if rewritten.is_empty() {
        return Ok(());
    }
    tx.execute_batch("PRAGMA writable_schema = ON").map_err(StoreError::sqlite("allow a schema rewrite"))?;
    for (name, sql) in &rewritten {
        tx.execute("UPDATE sqlite_schema SET sql = ?1 WHERE type = 'table' AND name = ?2", [sql, name])
            .map_err(StoreError::sqlite("rewrite a table's CHECK constraints"))?;
    }
    tx.pragma_update(None, "schema_version", version + 1).map_err(StoreError::sqlite("bump the schema version"))?;
    tx.execute_batch("PRAGMA writable_schema = OFF").map_err(StoreError::sqlite("end the schema rewrite"))?;
    for (name, _) in &rewritten {
        tx.prepare(&format!("SELECT * FROM \"{name}\" LIMIT 0"))
            .map_err(StoreError::sqlite("read a rewritten table back"))?;
    }
    Ok(())
}

/// `sql` with each `name IN (literal, ...)` as `(name = literal OR ...)`,
/// where the literals are quoted strings without quotes inside or integers;
/// `None` if there is none. Anything else is left as it is.
fn or_chains(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    let mut changed = false;
    while let Some(at) = rest.find(" IN (") {
        let (before, after) = rest.split_at(at);
        let name_start = before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let name = &before[name_start..];
        let list_start = " IN (".len();
        let replaced = after[list_start..].find(')').and_then(|close| {
            let items: Vec<&str> = after[list_start..list_start + close].split(',').map(str::trim).collect();
            let literal = |item: &&str| {
                (item.len() >= 2
                    && item.starts_with('\'')
                    && item.ends_with('\'')
                    && !item[1..item.len() - 1].contains('\''))
                    || (!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()))
            };
            (!name.is_empty() && items.iter().all(literal)).then(|| {
                let chain: Vec<String> = items.iter().map(|item| format!("{name} = {item}")).collect();
                (format!("({})", chain.join(" OR ")), list_start + close + 1)
            })
        });
        match replaced {
            Some((chain, consumed)) => {
                out.push_str(&before[..name_start]);
                out.push_str(&chain);
                rest = &after[consumed..];
                changed = true;
            }
            None => {
                out.push_str(before);
                out.push_str(" IN (");
                rest = &after[list_start..];
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::or_chains;

    #[test]
    fn in_lists_of_literals_become_or_chains() {
        assert_eq!(
            or_chains("status TEXT CHECK (status IN ('a', 'b_c', 'd')), x CHECK (stale IN (0, 1))").as_deref(),
            Some("status TEXT CHECK ((status = 'a' OR status = 'b_c' OR status = 'd')), x CHECK ((stale = 0 OR stale = 1))")
        );
        assert_eq!(
            or_chains("CHECK ((status IN ('queued', 'running')) = (finished_at IS NULL))").as_deref(),
            Some("CHECK (((status = 'queued' OR status = 'running')) = (finished_at IS NULL))")
        );
    }

    #[test]
    fn anything_else_is_left_alone() {
        assert_eq!(or_chains("CHECK (a >= 0)"), None);
        assert_eq!(or_chains("CHECK (a IN (SELECT b FROM t))"), None);
        assert_eq!(or_chains("CHECK (a IN ('it''s'))"), None);
        assert_eq!(or_chains("CHECK (a IN (x, 'y'))"), None);
    }
}
