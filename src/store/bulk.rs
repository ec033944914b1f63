//! Bulk loading for `licensd bench`: fills a fresh database with many
//! licenses, their activations and unredeemed renewal codes, far faster than
//! the one-transaction-per-rule path the service uses.
//!
//! The rows are the ones the service would have written (real keys from
//! [`LicenseKey::generate`], codes stored as [`code_hash`]), but without
//! history events or idempotency keys: the workloads never read those, and
//! appending to a larger history table costs the same.
//!
//! `seats_used` mirrors the count of activations (the schema's triggers keep
//! it so). Firing a trigger per seeded activation would rewrite each license
//! row once or twice, which on PostgreSQL means new row versions and index
//! entries; so the licenses arrive with `seats_used` already set, inside a
//! transaction that switches the count triggers off (PostgreSQL: `DISABLE
//! TRIGGER USER`; SQLite: dropped and recreated from their own definitions)
//! and on again before it commits, so no other session ever sees them off.
//! [`audit`] checks the counts afterwards.
//!
//! Keys are numbered in sorted order (license `i` gets the `i`-th smallest
//! of the random keys), so the unique index on `license_key` grows at its end
//! instead of splitting random pages.
//!
//! * **SQLite**: one connection with `synchronous = OFF` and a large page
//!   cache, one transaction (a failed seed leaves the database as it was),
//!   multi-row `INSERT`s of [`SQLITE_ROWS`] rows reusing one prepared
//!   statement. Row ids are given explicitly (the database is empty), so
//!   activations need no look-up. The secondary indexes of `licenses` are
//!   dropped first and built again from their own definitions (read from
//!   `sqlite_master`) at the end: sorting once beats a million random index
//!   inserts. About 11 s for 1M licenses on 2 cores.
//! * **PostgreSQL**: `INSERT … SELECT FROM UNNEST($1::text[], …)` with one
//!   array per column, a transaction per [`TX_LICENSES`] licenses (about 3 s
//!   per 100k licenses on 2 cores),
//!   `synchronous_commit = off`; activations find their license by key in
//!   the same statement; `ANALYZE` at the end so the planner sees the loaded
//!   tables as a long-running installation's autovacuum would have left them.
//!
//! What every seeded license looks like is a pure function of its index (see
//! [`SeedPlan::shape`] and [`SeedPlan::fingerprint`]), so the benchmark knows
//! which fingerprints are bound and which codes fit which licenses without
//! reading anything back.
//!
//! [`LicenseKey::generate`]: crate::domain::LicenseKey::generate
//! [`code_hash`]: super::code_hash

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, PgConnection, SqliteConnection};

pub use plan::{LicenseShape, SEED_VERSION, SeedPlan, Seeded};
pub use postgres::TX_LICENSES;
pub use sqlite::SQLITE_ROWS;

use super::{DatabaseUrl, StoreError, StoreResult};

mod plan;
mod postgres;
mod sqlite;

/// Seeds the (migrated, empty but for products and tokens) database at `url`.
pub async fn seed(url: &DatabaseUrl, plan: &SeedPlan) -> StoreResult<Seeded> {
    match url {
        DatabaseUrl::Sqlite(path) => sqlite::seed_sqlite(path, plan).await,
        DatabaseUrl::Postgres(url) => postgres::seed_postgres(url, plan).await,
    }
}

/// Counts that show whether the seat rule held through a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Licenses.
    pub licenses: u64,
    /// Activations.
    pub activations: u64,
    /// Licenses whose `seats_used` differs from their count of activations.
    pub seat_count_mismatches: u64,
    /// Licenses with more activations than seats.
    pub over_seat_limit: u64,
}

const AUDIT_SQL: &str = "SELECT \
     (SELECT COUNT(*) FROM licenses), \
     (SELECT COUNT(*) FROM activations), \
     COALESCE(SUM(CASE WHEN l.seats_used <> COALESCE(c.n, 0) THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN COALESCE(c.n, 0) > l.seats THEN 1 ELSE 0 END), 0) \
     FROM licenses l LEFT JOIN \
     (SELECT license_id, COUNT(*) AS n FROM activations GROUP BY license_id) c ON c.license_id = l.id";

/// Counts licenses, activations and seat-rule violations (read-only).
pub async fn audit(url: &DatabaseUrl) -> StoreResult<Audit> {
    let (licenses, activations, mismatches, over): (i64, i64, i64, i64) = match url {
        DatabaseUrl::Sqlite(path) => {
            let options = SqliteConnectOptions::new().filename(path).read_only(true);
            let mut conn = SqliteConnection::connect_with(&options).await?;
            let row = sqlx::query_as(AUDIT_SQL).fetch_one(&mut conn).await?;
            conn.close().await?;
            row
        }
        DatabaseUrl::Postgres(url) => {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let mut conn = PgConnection::connect_with(&options).await?;
            let row = sqlx::query_as(AUDIT_SQL).fetch_one(&mut conn).await?;
            conn.close().await?;
            row
        }
    };
    Ok(Audit {
        licenses: licenses as u64,
        activations: activations as u64,
        seat_count_mismatches: mismatches as u64,
        over_seat_limit: over as u64,
    })
}

#[cfg(test)]
mod tests;
