//! Validate's database reads on SQLite, without sqlx, and the snapshot the
//! validation cache's full load reads through.
//!
//! Validate is the hot path. It is answered from the validation cache
//! (`super::cache`) when it can be; this is the read it falls back
//! to (cache off, still loading, or a license just written here): one indexed
//! lookup. Through sqlx every query crosses to the connection's worker thread
//! and back and is converted into an `AnyRow`, which costs several times the
//! lookup itself (about 130 µs of CPU per call against ~10 µs for SQLite's
//! work, measured with `licensd bench`). Here the lookup runs on the calling
//! task with a cached prepared statement on a pooled read-only connection. It
//! is short and never waits for a writer (WAL readers read a snapshot), so
//! running it inline on the runtime is cheaper than any hand-off to another
//! thread.
//!
//! Same database file, same SQL (`VALIDATION_SQL`), same row mapping as the
//! sqlx path; only the driver differs.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::domain::LicenseKey;
use crate::store::rows::{
    Columns, VALIDATION_SQL, token_from_row, token_select, validation_from_row,
};
use crate::store::{StoreError, StoreResult, TokenRecord, ValidationView, sqlite_unavailable};

/// Idle connections kept at most.
const MAX_IDLE: usize = 8;

/// A small pool of read-only connections.
pub struct FastReader {
    path: std::path::PathBuf,
    mmap_bytes: u64,
    idle: Mutex<Vec<Connection>>,
}

/// A rusqlite error as the store reports it: UNAVAILABLE when the disk or
/// the file cannot serve now (full, read-only, locked, I/O), else INTERNAL.
pub(super) fn unavailable_or_internal(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error() {
        Some(code) if sqlite_unavailable(code.extended_code) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

impl FastReader {
    /// Read-only access to the (already migrated) database at `path`.
    pub fn open(path: &Path, mmap_bytes: u64) -> StoreResult<Self> {
        let reader = FastReader {
            path: path.to_path_buf(),
            mmap_bytes,
            idle: Mutex::new(Vec::new()),
        };
        // Fail at start, not on the first call, if the file cannot be read.
        let conn = reader.connect()?;
        reader.idle.lock().expect("not poisoned").push(conn);
        Ok(reader)
    }

    /// A read-only connection, waiting up to 5 s for a busy database.
    fn open_read_only(&self) -> StoreResult<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unavailable_or_internal)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(unavailable_or_internal)?;
        Ok(conn)
    }

    fn connect(&self) -> StoreResult<Connection> {
        let conn = self.open_read_only()?;
        conn.set_prepared_statement_cache_capacity(16);
        if self.mmap_bytes > 0 {
            // Pages are read from the mapping instead of copied by a system
            // call each: cheaper per lookup, but every page touched counts in
            // the process's resident set (see `--sqlite-mmap-mib`).
            conn.pragma_update(None, "mmap_size", self.mmap_bytes as i64)
                .map_err(unavailable_or_internal)?;
        }
        Ok(conn)
    }

    /// `read` on a pooled connection (on the calling thread: for one
    /// short, indexed lookup).
    fn pooled<T>(&self, read: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let conn = self.take()?;
        let result = read(&conn);
        self.give_back(conn);
        result
    }

    /// An idle connection, or a new one.
    fn take(&self) -> StoreResult<Connection> {
        let pooled = self.idle.lock().expect("not poisoned").pop();
        match pooled {
            Some(c) => Ok(c),
            None => self.connect(),
        }
    }

    /// Keeps `conn` for the next call, up to [`MAX_IDLE`].
    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// The license with key `key`, its product's latest version, and whether
    /// `fingerprint` is bound to it.
    pub fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>> {
        self.pooled(|conn| {
            let mut stmt = conn
                .prepare_cached(VALIDATION_SQL)
                .map_err(unavailable_or_internal)?;
            let mut rows = stmt
                // `$1`/`$2` are named parameters to SQLite (numbered in order
                // of appearance), so they are bound by name.
                .query(rusqlite::named_params! {"$1": key.normalized(), "$2": fingerprint})
                .map_err(unavailable_or_internal)?;
            let row = rows.next().map_err(unavailable_or_internal)?;
            row.map(|r| validation_from_row(&FastRow(r), fingerprint))
                .transpose()
        })
    }

    /// The API token with id `id`, revoked or not.
    pub(in crate::store) fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        self.pooled(|conn| {
            let mut stmt = conn
                .prepare_cached(concat!(token_select!(), "WHERE id = ?1"))
                .map_err(unavailable_or_internal)?;
            let mut rows = stmt.query([id]).map_err(unavailable_or_internal)?;
            let row = rows.next().map_err(unavailable_or_internal)?;
            row.map(|r| token_from_row(&FastRow(r))).transpose()
        })
    }
}

impl FastReader {
    /// A read transaction on a connection of its own (blocking: run it on a
    /// blocking thread), never memory-mapped: a full scan would map the
    /// whole file into the process. Every statement run through it reads
    /// one snapshot; dropping it ends the transaction.
    pub(in crate::store) fn snapshot(&self) -> StoreResult<Snapshot> {
        let conn = self.open_read_only()?;
        conn.execute_batch("BEGIN")
            .map_err(unavailable_or_internal)?;
        Ok(Snapshot(conn))
    }
}

impl FastReader {
    /// Runs `read` in a read transaction on a pooled connection (blocking:
    /// run it on a blocking thread): one snapshot for every statement. For
    /// short reads; a full scan takes a [`snapshot`](Self::snapshot).
    pub(in crate::store) fn read<T>(
        &self,
        read: impl FnOnce(&Snapshot) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let snapshot = Snapshot(self.take()?);
        snapshot
            .0
            .execute_batch("BEGIN")
            .map_err(unavailable_or_internal)?;
        let result = read(&snapshot);
        if snapshot.0.execute_batch("COMMIT").is_ok() {
            self.give_back(snapshot.0);
        }
        result
    }
}

/// See [`FastReader::snapshot`].
pub(in crate::store) struct Snapshot(Connection);

impl Snapshot {
    /// The one integer `sql` selects.
    pub(in crate::store) fn int(&self, sql: &str) -> StoreResult<i64> {
        self.0
            .query_row(sql, [], |r| r.get(0))
            .map_err(unavailable_or_internal)
    }

    /// Calls `each` on every row `sql` selects, stopping at its first error.
    pub(in crate::store) fn for_each(
        &self,
        sql: &str,
        each: impl FnMut(&FastRow<'_>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        self.for_each_with(sql, [], each)
    }

    /// [`for_each`](Self::for_each) with `params` bound (`?N` placeholders).
    pub(in crate::store) fn for_each_with(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        mut each: impl FnMut(&FastRow<'_>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut stmt = self
            .0
            .prepare_cached(sql)
            .map_err(unavailable_or_internal)?;
        let mut rows = stmt.query(params).map_err(unavailable_or_internal)?;
        while let Some(r) = rows.next().map_err(unavailable_or_internal)? {
            each(&FastRow(r))?;
        }
        Ok(())
    }
}

/// A row read through rusqlite, read by position like an `AnyRow`.
pub(in crate::store) struct FastRow<'a>(&'a rusqlite::Row<'a>);

impl Columns for FastRow<'_> {
    fn text(&self, at: usize) -> StoreResult<String> {
        self.0.get(at).map_err(unavailable_or_internal)
    }
    fn int(&self, at: usize) -> StoreResult<i64> {
        self.0.get(at).map_err(unavailable_or_internal)
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        self.0.get(at).map_err(unavailable_or_internal)
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>> {
        self.0.get(at).map_err(unavailable_or_internal)
    }
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>> {
        self.0.get(at).map_err(unavailable_or_internal)
    }
}
