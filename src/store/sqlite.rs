//! The embedded SQLite backend: a file next to the server, created and
//! migrated on start, one writer connection and a small read-only pool.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor};

use super::{Dialect, SqlStore, StoreError, StoreResult};

/// Tuning of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read-only connections (the writer is always one).
    pub read_connections: u32,
    /// How long a call waits for a free connection, and a statement for
    /// another process's lock on the file (`busy_timeout`), before
    /// UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Bytes of the file Validate's readers map into memory (SQLite's
    /// `mmap_size`); 0 reads with `pread`. See `--sqlite-mmap-mib`.
    pub mmap_bytes: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            read_connections: 4,
            acquire_timeout: crate::store::DEFAULT_DATABASE_TIMEOUT,
            mmap_bytes: 0,
        }
    }
}

/// Turns `sqlite:path`, `sqlite://path` or a bare path into a file path.
pub fn sqlite_path(url: &str) -> PathBuf {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    PathBuf::from(rest.split('?').next().unwrap_or(rest))
}

/// Creates the file if needed, switches it to WAL (a persistent setting) and
/// applies `migrations/sqlite`.
pub async fn migrate(path: &Path) -> StoreResult<()> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    sqlx::migrate!("migrations/sqlite").run(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

fn any_options(path: &Path, mode: &str) -> StoreResult<AnyConnectOptions> {
    let url = format!("sqlite://{}?mode={mode}", path.display());
    AnyConnectOptions::from_str(&url)
        .map_err(|e| StoreError::Internal(format!("bad SQLite path: {e}")))
}

/// Per-connection settings (WAL itself is persistent), with a busy timeout
/// of `busy_ms`.
fn connection_pragmas(busy_ms: u128) -> String {
    format!(
        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms}; \
         PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;"
    )
}

/// Opens (creating and migrating if needed) the database at `path`.
pub async fn open(path: &Path, opts: SqliteOptions) -> StoreResult<SqlStore> {
    sqlx::any::install_default_drivers();
    migrate(path).await?;
    let pragmas = connection_pragmas(opts.acquire_timeout.as_millis());
    let pool = |max: u32| {
        let pragmas = pragmas.clone();
        AnyPoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .acquire_timeout(opts.acquire_timeout)
            // A local file cannot drop the connection under us, so the
            // default ping before every checkout is a wasted round trip to
            // the connection's worker thread (one of six per write).
            .test_before_acquire(false)
            // A COMMIT that fails on a disk error (full, read-only, I/O)
            // makes SQLite roll the transaction back by itself; the ROLLBACK
            // sqlx then sends fails ("no transaction is active"), so sqlx
            // still counts the connection as inside a transaction and every
            // later BEGIN on it fails: the writer would answer INTERNAL until
            // a restart. Such a connection is closed instead of reused (the
            // ping on its release has run any rollback it had queued, so
            // the count is current here).
            .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .after_connect(move |conn, _| {
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    // Per-connection settings (WAL itself is persistent).
                    conn.execute(sqlx::AssertSqlSafe(pragmas)).await?;
                    Ok(())
                })
            })
    };
    let writer = pool(1).connect_with(any_options(path, "rw")?).await?;
    let readers = pool(opts.read_connections.max(1))
        .connect_with(any_options(path, "ro")?)
        .await?;
    let fast = super::sqlite_fast::FastReader::open(path, opts.mmap_bytes)?;
    Ok(SqlStore::new(writer, readers, Dialect::Sqlite)
        .await?
        .with_fast_reads(fast))
}
