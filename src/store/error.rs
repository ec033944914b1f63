//! Why a store call failed, and which database errors mean "unavailable,
//! retry" rather than a bug.

use crate::domain::Refusal;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A rule refused the operation; nothing was changed (a refused renewal
    /// may have appended one history event).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The database cannot be reached or is overloaded; the call may be retried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A deadlock or serialisation failure: the transaction is retried.
    #[error("transaction conflict: {0}")]
    Retryable(String),
    /// Anything else: a bug or a broken database. Logged, never shown to callers.
    #[error("internal store error: {0}")]
    Internal(String),
}

/// Whether PostgreSQL's SQLSTATE `code` says the session itself is gone: a
/// connection exception (class 08), or the server terminated it (57P01
/// admin_shutdown, 57P02 crash_shutdown).
pub(super) fn session_ended(code: &str) -> bool {
    code.starts_with("08") || code == "57P01" || code == "57P02"
}

/// Whether an SQLite result code (primary or extended) says the database
/// cannot serve the call now, rather than that the call or the data is
/// wrong: busy or locked past the busy timeout (5, 6), a read-only file or
/// file system (8), an I/O error such as a failed write (10), a full disk
/// (13), a file that cannot be opened (14). Such a call may be retried
/// once the operator has made room or remounted the disk; nothing it did
/// was kept, since SQLite rolls the transaction back.
pub fn sqlite_unavailable(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14)
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if let Some(kind) = of_sqlstate(&code) {
                    return kind(e.to_string());
                }
                // SQLite reports its (extended) result code in decimal.
                if db
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .is_some_and(|_| code.parse().is_ok_and(sqlite_unavailable))
                {
                    return StoreError::Unavailable(e.to_string());
                }
                StoreError::Internal(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

/// What PostgreSQL's SQLSTATE `code` makes of an error, when it is not a
/// bug: a conflict to retry, or the database unable to serve the call now.
fn of_sqlstate(code: &str) -> Option<fn(String) -> StoreError> {
    match code {
        // serialization_failure, deadlock_detected.
        "40001" | "40P01" => Some(StoreError::Retryable),
        // too_many_connections, cannot_connect_now, statement or lock
        // timeout / cancelled (57014, 55P03: the server gave up waiting
        // within `--database-timeout-ms`), or the session is gone.
        "53300" | "57P03" | "57014" | "55P03" => Some(StoreError::Unavailable),
        c if session_ended(c) => Some(StoreError::Unavailable),
        _ => None,
    }
}

/// PostgreSQL's own write path (tokio-postgres): the same SQLSTATEs as
/// through sqlx; without one, a connection that failed or closed is
/// unavailable, and anything else (a value that did not convert) a bug.
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(kind) = e.code().and_then(|c| of_sqlstate(c.code())) {
            return kind(e.to_string());
        }
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.code().is_none() && (e.is_closed() || io || connecting(&e.to_string())) {
            return StoreError::Unavailable(e.to_string());
        }
        StoreError::Internal(e.to_string())
    }
}

/// tokio-postgres's words for failing to connect, or to hear back in time.
fn connecting(message: &str) -> bool {
    message.starts_with("error connecting") || message.starts_with("timeout")
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(format!("no PostgreSQL connection: {other}")),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Internal(format!("migration failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error SQLite gives for `sql` on a fresh database in a temporary
    /// directory opened with `mode`, through sqlx's Any driver as the store
    /// uses it.
    async fn sqlite_error(setup: &[&str], mode: &str, sql: &str) -> StoreError {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let url = format!("sqlite://{}", path.display());
        let mut rw = sqlx::AnyConnection::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        for s in setup {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*s))
                .execute(&mut rw)
                .await
                .unwrap();
        }
        let mut conn = if mode == "rwc" {
            rw
        } else {
            sqlx::AnyConnection::connect(&format!("{url}?mode={mode}"))
                .await
                .unwrap()
        };
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect_err("the statement fails");
        StoreError::from(err)
    }

    #[tokio::test]
    async fn a_write_to_a_read_only_sqlite_database_is_unavailable_not_internal() {
        let e = sqlite_error(
            &["CREATE TABLE t (x INTEGER)"],
            "ro",
            "INSERT INTO t VALUES (1)",
        )
        .await;
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_full_sqlite_database_is_unavailable_not_internal() {
        // max_page_count is SQLite's own "disk full": SQLITE_FULL.
        let e = sqlite_error(
            &["CREATE TABLE t (x BLOB)", "PRAGMA max_page_count = 8"],
            "rwc",
            "INSERT INTO t VALUES (zeroblob(100000))",
        )
        .await;
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }

    #[tokio::test]
    async fn an_sqlite_file_that_cannot_be_opened_is_unavailable_not_internal() {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}/no/such/dir/t.db?mode=rwc",
            dir.path().display()
        );
        let err = sqlx::AnyConnection::connect(&url)
            .await
            .expect_err("cannot open");
        let e = StoreError::from(err);
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_broken_statement_on_sqlite_is_still_internal() {
        let e = sqlite_error(&[], "rwc", "SELECT * FROM no_such_table").await;
        assert!(matches!(e, StoreError::Internal(_)), "{e:?}");
    }

    #[test]
    fn sqlite_result_codes_that_mean_the_disk_or_file_cannot_serve_now() {
        // Primary codes, and extended ones built on them: IOERR_READ (266),
        // IOERR_WRITE (778), IOERR_FSYNC (1034), READONLY_DBMOVED (1032),
        // CANTOPEN_ISDIR (526), BUSY_SNAPSHOT (517).
        for code in [5, 6, 8, 10, 13, 14, 266, 778, 1034, 1032, 526, 517] {
            assert!(sqlite_unavailable(code), "{code}");
        }
        // ERROR, CORRUPT, CONSTRAINT, CONSTRAINT_UNIQUE, MISMATCH, NOTADB:
        // a bug or a broken database, not an outage.
        for code in [1, 11, 19, 2067, 20, 26] {
            assert!(!sqlite_unavailable(code), "{code}");
        }
    }
}
