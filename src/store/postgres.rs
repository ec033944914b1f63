//! The PostgreSQL backend: many `licensd serve` replicas share one database.
//! Every rule holds across replicas because each write transaction locks the
//! rows its decision depends on (see [`super::sql`]).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor};

use super::sql::Writer;
use super::{Dialect, SqlStore, StoreError, StoreResult};

pub(super) mod writer;
use writer::PgWriter;

/// Tuning of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections per replica: half for the writes, half for the reads
    /// (at least one each).
    pub max_connections: u32,
    /// How long a call waits for a connection (a free one, or a new one:
    /// connecting is retried until then) before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Longest a statement waits for a row lock (server-side
    /// `lock_timeout`): a write queued behind a stalled one gives up, and
    /// releases the locks it holds, when its caller would.
    pub lock_timeout: Duration,
    /// Longest a single statement may run (server-side `statement_timeout`;
    /// longer than the lock timeout: the validation cache's full load is one
    /// statement).
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            acquire_timeout: crate::store::DEFAULT_DATABASE_TIMEOUT,
            lock_timeout: crate::store::DEFAULT_DATABASE_TIMEOUT,
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// A pooled connection idle this long is pinged before it is used.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Applies `migrations/postgres` (sqlx takes an advisory lock, so replicas
/// starting together migrate once).
pub async fn migrate(url: &str) -> StoreResult<()> {
    let options =
        PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    sqlx::migrate!("migrations/postgres").run(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Connects to (and migrates) the database at `url`: `max_connections`
/// split between the writes and the reads, half each (at least one each).
pub async fn open(url: &str, opts: PostgresOptions) -> StoreResult<SqlStore> {
    sqlx::any::install_default_drivers();
    migrate(url).await?;
    let statement_timeout = opts.statement_timeout.as_millis();
    let lock_timeout = opts.lock_timeout.as_millis().max(1);
    let max = opts.max_connections.max(1);
    let (writes, reads) = (max - max / 2, (max / 2).max(1));
    let readers = AnyPoolOptions::new()
        .max_connections(reads)
        .min_connections(1)
        .acquire_timeout(opts.acquire_timeout)
        // A ping before every checkout is a network round trip per call.
        // Only connections that sat idle for a while are pinged, so a pool
        // left idle across a database restart hands out no dead connection.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                let sql = format!(
                    "SET statement_timeout = {statement_timeout}; SET lock_timeout = {lock_timeout}"
                );
                conn.execute(sqlx::AssertSqlSafe(sql)).await?;
                Ok(())
            })
        })
        .connect_with(
            AnyConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(e.to_string()))?,
        )
        .await?;
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
    config
        .options(format!(
            "-c statement_timeout={statement_timeout} -c lock_timeout={lock_timeout}"
        ))
        .connect_timeout(opts.acquire_timeout);
    let writer = PgWriter::new(config, writes as usize, opts.acquire_timeout)?;
    let changes = super::change_notify::Changes::new(url, opts.statement_timeout)?;
    Ok(
        SqlStore::new(Writer::Postgres(writer.into()), readers, Dialect::Postgres)
            .await?
            .with_changes(changes),
    )
}
