//! The writer's connection as a [`Conn`]: rusqlite, each statement
//! prepared once (with SQLite's numbered placeholders) and run as a plain
//! call; rows read into [`OwnedRow`]s.

use std::collections::HashMap;
use std::ops::Range;

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use crate::store::rows::{Columns, Dialect, corrupt};
use crate::store::sql::conn::{Arg, Conn, Ending};
use crate::store::sqlite::fast::unavailable_or_internal;
use crate::store::{StoreError, StoreResult};

/// The write connection, as a [`Conn`] the commands run on.
pub(in crate::store) struct NativeConn {
    pub(super) conn: Connection,
    /// Each statement's text with SQLite's numbered placeholders (`?N`
    /// for `$N`: SQLite reads `$1` as a name, numbered by first appearance),
    /// found by where the statement's text is: every statement is a
    /// `&'static str`, so its address and length name it, and hashing two
    /// words costs less than hashing a few hundred bytes of SQL (rusqlite's
    /// own cache hashes the numbered text again).
    numbered: HashMap<StaticText, String>,
}

/// A `&'static str` compared and hashed by address and length.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct StaticText(usize, usize);

impl StaticText {
    fn of(sql: &'static str) -> Self {
        StaticText(sql.as_ptr() as usize, sql.len())
    }
}

impl NativeConn {
    pub(super) fn new(conn: Connection) -> Self {
        NativeConn {
            conn,
            numbered: HashMap::new(),
        }
    }

    pub(super) fn plain(&self, sql: &str) -> StoreResult<()> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.raw_execute())
            .map(drop)
            .map_err(unavailable_or_internal)
    }

    /// `f`'s statements, kept if it succeeds and undone if it fails.
    pub(super) fn in_savepoint<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> StoreResult<Ending<T>>,
    ) -> StoreResult<Ending<T>> {
        self.plain("SAVEPOINT write")?;
        let outcome = f(self);
        let end = match outcome {
            Ok(_) => self.plain("RELEASE write"),
            Err(_) => self
                .plain("ROLLBACK TO write")
                .and_then(|()| self.plain("RELEASE write")),
        };
        end?;
        outcome
    }

    fn prepared(&mut self, sql: &'static str) -> StoreResult<rusqlite::CachedStatement<'_>> {
        let text = self
            .numbered
            .entry(StaticText::of(sql))
            .or_insert_with(|| numbered(sql));
        self.conn
            .prepare_cached(text)
            .map_err(unavailable_or_internal)
    }

    fn bound(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<rusqlite::CachedStatement<'_>> {
        let mut stmt = self.prepared(sql)?;
        if stmt.parameter_count() != args.len() {
            return Err(StoreError::Internal(format!(
                "{} arguments for {} placeholders: {sql}",
                args.len(),
                stmt.parameter_count()
            )));
        }
        for (i, arg) in args.iter().enumerate() {
            let bound = match *arg {
                Arg::Int(v) => stmt.raw_bind_parameter(i + 1, v),
                Arg::Text(v) => stmt.raw_bind_parameter(i + 1, v),
                Arg::Blob(v) => stmt.raw_bind_parameter(i + 1, v),
            };
            bound.map_err(unavailable_or_internal)?;
        }
        Ok(stmt)
    }

    fn rows(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
        limit: usize,
    ) -> StoreResult<Vec<OwnedRow>> {
        let mut stmt = self.bound(sql, args)?;
        let width = stmt.column_count();
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(row) = rows.next().map_err(unavailable_or_internal)? else {
                break;
            };
            let mut read = OwnedRow {
                cells: Vec::with_capacity(width),
                bytes: Vec::new(),
            };
            for i in 0..width {
                let value = row.get_ref(i).map_err(unavailable_or_internal)?;
                read.push(value);
            }
            out.push(read);
        }
        Ok(out)
    }
}

impl Conn for NativeConn {
    type Row = OwnedRow;

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn execute(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        let mut stmt = self.bound(sql, args)?;
        let changed = stmt.raw_execute().map_err(unavailable_or_internal)?;
        Ok(changed as u64)
    }

    async fn fetch_all(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Vec<OwnedRow>> {
        self.rows(sql, args, usize::MAX)
    }

    async fn fetch_optional(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<OwnedRow>> {
        Ok(self.rows(sql, args, 1)?.pop())
    }
}

/// `sql` with `?N` for each `$N`.
pub(super) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// A row read off the writer's connection: each column's value, the
/// bytes of its text and blobs in one buffer (two allocations a row, not
/// one per text column and again per copy handed out).
pub(in crate::store) struct OwnedRow {
    cells: Vec<Cell>,
    bytes: Vec<u8>,
}

/// One column of an [`OwnedRow`].
enum Cell {
    Null,
    Int(i64),
    Real,
    /// Where in the row's bytes.
    Text(Range<usize>),
    Blob(Range<usize>),
}

impl OwnedRow {
    fn push(&mut self, value: ValueRef<'_>) {
        let cell = match value {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(v) => Cell::Int(v),
            ValueRef::Real(_) => Cell::Real,
            ValueRef::Text(bytes) => Cell::Text(self.keep(bytes)),
            ValueRef::Blob(bytes) => Cell::Blob(self.keep(bytes)),
        };
        self.cells.push(cell);
    }

    fn keep(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// A column whose type is not what its mapping expects, for the error.
    fn unexpected(&self, what: &str, at: usize) -> StoreError {
        let kind = match self.cells.get(at) {
            Some(Cell::Null) => "NULL",
            Some(Cell::Int(_)) => "INTEGER",
            Some(Cell::Real) => "REAL",
            Some(Cell::Text(_)) => "TEXT",
            Some(Cell::Blob(_)) => "BLOB",
            None => "nothing",
        };
        corrupt(what, format_args!("{kind} in column {at}"))
    }

    fn at(&self, at: usize) -> StoreResult<&Cell> {
        self.cells
            .get(at)
            .ok_or_else(|| StoreError::Internal(format!("no column {at}")))
    }
}

impl Columns for OwnedRow {
    fn text(&self, at: usize) -> StoreResult<String> {
        self.opt_text(at)?
            .ok_or_else(|| corrupt("NULL in column", at))
    }
    fn int(&self, at: usize) -> StoreResult<i64> {
        self.opt_int(at)?
            .ok_or_else(|| corrupt("NULL in column", at))
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        match self.at(at)? {
            Cell::Int(v) => Ok(Some(*v)),
            Cell::Null => Ok(None),
            _ => Err(self.unexpected("type in integer column", at)),
        }
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>> {
        match self.at(at)? {
            Cell::Text(range) => std::str::from_utf8(&self.bytes[range.clone()])
                .map(|text| Some(text.to_owned()))
                .map_err(|e| corrupt("text that is not UTF-8", e)),
            Cell::Null => Ok(None),
            _ => Err(self.unexpected("type in text column", at)),
        }
    }
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>> {
        match self.at(at)? {
            Cell::Blob(range) => Ok(self.bytes[range.clone()].to_vec()),
            _ => Err(self.unexpected("type in blob column", at)),
        }
    }
}
