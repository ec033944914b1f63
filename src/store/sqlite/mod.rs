//! The embedded SQLite backend: a file next to the server, created and
//! migrated on start; its writes go through one thread's connection that
//! commits them in groups ([`writer`]), Validate's reads through native
//! read-only connections ([`fast`]), the rest through a small sqlx pool.

mod checkpoint;
pub(super) mod fast;
mod wal_vfs;
pub(super) mod writer;

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
    /// When a commit reaches the disk. See `--sqlite-synchronous`.
    pub synchronous: Durability,
    /// Bytes of the file the writer maps into memory (`mmap_size` on its
    /// connection); 0 reads with `pread`. See `--sqlite-writer-mmap-mib`.
    pub writer_mmap_bytes: u64,
}

/// The writer's mapping, MiB (`--sqlite-writer-mmap-mib`), off by
/// default. A write reads the pages it changes, most of them not in its
/// page cache (a renewal touches a random license's pages); through the
/// mapping that is a memory read instead of a `pread` (a system call, a
/// 4 KiB copy and the file's access time). Same run, `licensd bench
/// --licenses 100000 --duration 8 --workload redeem`, one binary with 1 GiB
/// mapped and without, three rounds alternated: server CPU per renewal 164
/// / 158 / 159 → 151 / 135 / 147 µs. But every page the writer touched
/// then counts in the resident set (at 100k licenses, peak RSS 179–189 →
/// 217–233 MiB), and at 1M licenses the file is ~600 MB, all of which
/// could come to count there. They are shared file
/// pages the kernel can drop (a `pread` leaves the same pages in its page
/// cache), so where the resident set is not watched, mapping is the
/// cheaper way to read.
pub const DEFAULT_WRITER_MMAP_MIB: u64 = 0;

/// The names of the writer's and the checkpointer's threads: at most 15
/// bytes, the kernel's limit, so that `top`, `perf` and `licensd bench`
/// (which splits CPU by thread) tell them apart.
pub const WRITER_THREAD: &str = "sqlite-writer";
/// See [`WRITER_THREAD`].
pub const CHECKPOINT_THREAD: &str = "sqlite-checkpt";

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            read_connections: 4,
            acquire_timeout: crate::store::DEFAULT_DATABASE_TIMEOUT,
            mmap_bytes: 0,
            synchronous: Durability::default(),
            writer_mmap_bytes: DEFAULT_WRITER_MMAP_MIB << 20,
        }
    }
}

/// SQLite's `synchronous` setting for the writer (in WAL mode).
///
/// `Full` is the default: the writer commits the writes queued meanwhile
/// together ([`writer`]), so one WAL sync serves a whole batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is flushed to the disk (the WAL file synced) before it
    /// is acknowledged: an acknowledged write survives a power cut or an
    /// operating system crash.
    #[default]
    Full,
    /// Commits are flushed at checkpoints only: a killed process loses
    /// nothing acknowledged, but a power cut or an operating system crash
    /// can lose the last acknowledged writes (never corrupting the file).
    Normal,
}

impl Durability {
    /// The setting's name, as the flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Full => "full",
            Durability::Normal => "normal",
        }
    }

    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            _ => Err(format!("{s:?}: expected full or normal")),
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
        // Migrations are few: always flushed.
        .synchronous(SqliteSynchronous::Full)
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
fn connection_pragmas(busy_ms: u128, synchronous: Durability) -> String {
    format!(
        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms}; \
         PRAGMA synchronous = {}; PRAGMA temp_store = MEMORY;",
        synchronous.pragma()
    )
}

/// A native read-write connection to the (migrated) database at `path`,
/// waiting up to `busy_timeout` for another connection's lock, with the
/// settings in `pragmas`; through [`wal_vfs`] if `gathered` (see there
/// when that is safe).
fn open_native(
    path: &Path,
    busy_timeout: Duration,
    pragmas: &str,
    gathered: bool,
) -> StoreResult<rusqlite::Connection> {
    use rusqlite::{Connection, OpenFlags};
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if gathered {
        wal_vfs::register().map_err(StoreError::Internal)?;
        Connection::open_with_flags_and_vfs(path, flags, wal_vfs::NAME)
    } else {
        Connection::open_with_flags(path, flags)
    }
    .map_err(fast::unavailable_or_internal)?;
    conn.busy_timeout(busy_timeout)
        .map_err(fast::unavailable_or_internal)?;
    conn.execute_batch(pragmas)
        .map_err(fast::unavailable_or_internal)?;
    Ok(conn)
}

/// Opens (creating and migrating if needed) the database at `path`.
pub async fn open(path: &Path, opts: SqliteOptions) -> StoreResult<SqlStore> {
    sqlx::any::install_default_drivers();
    migrate(path).await?;
    let pragmas = connection_pragmas(opts.acquire_timeout.as_millis(), opts.synchronous);
    // The readers' pool; every write runs on the writer thread's own
    // connection.
    let readers = AnyPoolOptions::new()
        .max_connections(opts.read_connections.max(1))
        .min_connections(1)
        .acquire_timeout(opts.acquire_timeout)
        // A local file cannot drop the connection under us, so the default
        // ping before every checkout is a wasted round trip to the
        // connection's worker thread.
        .test_before_acquire(false)
        // A connection sqlx still counts as inside a transaction (a
        // ROLLBACK that failed after SQLite had rolled back by itself) would
        // fail every later BEGIN on it: it is closed instead of reused (the
        // ping on its release has run any rollback it had queued, so the
        // count is current here).
        .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
        .after_connect(move |conn, _| {
            let pragmas = pragmas.clone();
            Box::pin(async move {
                // Per-connection settings (WAL itself is persistent).
                conn.execute(sqlx::AssertSqlSafe(pragmas)).await?;
                Ok(())
            })
        })
        .connect_with(any_options(path, "ro")?)
        .await?;
    let fast = fast::FastReader::open(path, opts.mmap_bytes)?;
    let group = writer::GroupWriter::start(
        path,
        opts.acquire_timeout,
        opts.synchronous,
        opts.writer_mmap_bytes,
    )?;
    let writer = super::sql::Writer::Sqlite(std::sync::Arc::new(group));
    Ok(SqlStore::new(writer, readers, Dialect::Sqlite)
        .await?
        .with_fast_reads(fast))
}
