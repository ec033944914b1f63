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

use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, PgConnection, SqliteConnection};

use super::{DatabaseUrl, StoreError, StoreResult, code_hash, micros, new_code_id};
use crate::domain::time::add_years;
use crate::domain::{Edition, LicenseKey, LicenseKind, ProductCode, RenewalCode};

/// Licenses written per transaction (PostgreSQL).
pub const TX_LICENSES: usize = 50_000;
/// Rows per multi-row `INSERT` on SQLite (at most 11 parameters a row, well
/// below SQLite's limit of 32,766 parameters a statement).
pub const SQLITE_ROWS: usize = 500;
/// The client version seeded activations report, and the product's latest.
pub const SEED_VERSION: &str = "1.0.0";

/// What to seed. The product must exist already (with latest version
/// [`SEED_VERSION`] and the default terms) and the database must hold no
/// license yet.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// The product every license and code is for.
    pub product: ProductCode,
    /// How many licenses.
    pub licenses: usize,
    /// How many unredeemed renewal codes.
    pub codes: usize,
    /// The instant the data is seeded "at": every license is valid then.
    pub now: DateTime<Utc>,
}

/// The shape of one seeded license, from its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LicenseShape {
    /// Its class: licenses and codes of one class fit each other.
    pub class: usize,
    /// Edition.
    pub edition: Edition,
    /// Seats: always at least one more than [`activations`](Self::activations),
    /// so activation churn always finds a free seat.
    pub seats: u32,
    /// Term in years (1 or 2, allowed for both editions).
    pub term_years: u32,
    /// Bound workstations: 1 or 2.
    pub activations: u32,
    /// Days before `now` the license started (under a year: all are valid).
    pub started_days_ago: i64,
}

impl SeedPlan {
    /// Number of classes of (edition, seats). License `i` and code `j` are of
    /// class `i % CLASSES` and `j % CLASSES`.
    pub const CLASSES: usize = 6;

    /// Edition and seats of a class.
    pub fn class(class: usize) -> (Edition, u32) {
        let edition = if class.is_multiple_of(2) {
            Edition::Business
        } else {
            Edition::Personal
        };
        (edition, 3 + (class % Self::CLASSES / 2) as u32)
    }

    /// The shape of license `i`.
    pub fn shape(i: usize) -> LicenseShape {
        let class = i % Self::CLASSES;
        let (edition, seats) = Self::class(class);
        let turn = (i / Self::CLASSES) % 2;
        LicenseShape {
            class,
            edition,
            seats,
            term_years: 1 + turn as u32,
            activations: 1 + ((i / (2 * Self::CLASSES)) % 2) as u32,
            started_days_ago: (i.wrapping_mul(7919) % 300) as i64,
        }
    }

    /// Fingerprint of the `j`-th workstation bound to license `i`.
    pub fn fingerprint(i: usize, j: u32) -> String {
        format!("seed-{i}-{j}")
    }

    /// Edition and seats of renewal code `j` (a one-year code).
    pub fn code_class(j: usize) -> usize {
        j % Self::CLASSES
    }
}

/// What was seeded.
pub struct Seeded {
    /// The license keys, by index.
    pub keys: Vec<LicenseKey>,
    /// The renewal codes, by index (code `j` fits the licenses of class
    /// [`SeedPlan::code_class`]`(j)`).
    pub codes: Vec<RenewalCode>,
    /// Activations written.
    pub activations: u64,
}

/// Seeds the (migrated, empty but for products and tokens) database at `url`.
pub async fn seed(url: &DatabaseUrl, plan: &SeedPlan) -> StoreResult<Seeded> {
    match url {
        DatabaseUrl::Sqlite(path) => seed_sqlite(path, plan).await,
        DatabaseUrl::Postgres(url) => seed_postgres(url, plan).await,
    }
}

/// One license's column values (but its key).
struct Row {
    shape: LicenseShape,
    starts_at: i64,
    expires_at: i64,
}

fn license_row(plan: &SeedPlan, i: usize) -> StoreResult<Row> {
    let shape = SeedPlan::shape(i);
    let starts = plan.now - Duration::days(shape.started_days_ago);
    let expires = add_years(starts, shape.term_years)
        .ok_or_else(|| StoreError::Internal("seed date out of range".into()))?;
    Ok(Row {
        shape,
        starts_at: micros(starts),
        expires_at: micros(expires),
    })
}

/// The plan's keys, sorted: license i gets the i-th smallest key, so the
/// unique index on license_key grows at its end instead of splitting random
/// pages (the keys stay random; only their numbering is sorted).
fn sorted_keys(plan: &SeedPlan) -> Vec<LicenseKey> {
    let mut keys = (0..plan.licenses)
        .map(|_| LicenseKey::generate(&plan.product, LicenseKind::Standard))
        .collect::<Vec<_>>();
    keys.sort_unstable_by(|a, b| a.normalized().cmp(b.normalized()));
    keys
}

fn refuse_unless_empty(licenses: i64) -> StoreResult<()> {
    if licenses > 0 {
        return Err(StoreError::Internal(format!(
            "bench seeding needs a fresh database; this one holds {licenses} licenses"
        )));
    }
    Ok(())
}

/// `head` followed by `rows` copies of `row`, comma-separated.
fn multi_row(head: &str, row: &str, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + rows * (row.len() + 1));
    sql.push_str(head);
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(row);
    }
    sql
}

async fn seed_sqlite(path: &std::path::Path, plan: &SeedPlan) -> StoreResult<Seeded> {
    super::sqlite::migrate(path).await?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Off)
        .foreign_keys(true)
        .pragma("cache_size", "-262144")
        .pragma("temp_store", "MEMORY");
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM licenses")
        .fetch_one(&mut conn)
        .await?;
    refuse_unless_empty(count)?;

    // The product code is a validated `A–Z0–9` value: safe to inline.
    let product = plan.product.as_str();
    let license_head = "INSERT INTO licenses (id, license_key, product_code, edition, kind, seats, \
                        seats_used, term_years, status, starts_at, expires_at, order_ref, customer_ref, created_at) VALUES ";
    let license_row_sql =
        format!("(?, ?, '{product}', ?, 'STANDARD', ?, ?, ?, 'ACTIVE', ?, ?, ?, ?, ?)");
    let activation_head = "INSERT INTO activations (license_id, fingerprint, hostname, client_version, \
                           activated_at) VALUES ";
    let activation_row_sql = format!("(?, ?, ?, '{SEED_VERSION}', ?)");
    let created = micros(plan.now);

    let keys = sorted_keys(plan);

    // One transaction: a failed seed leaves the database as it was. The
    // secondary indexes of `licenses` are dropped and built again from their
    // own definitions at the end (sorting once beats a million random
    // inserts); the unique key index is part of the table and stays. The
    // triggers on `activations` (the seats_used count) are dropped and
    // recreated the same way, the licenses arriving with seats_used set.
    let mut tx = conn.begin().await?;
    let schema: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND \
         ((type = 'index' AND tbl_name = 'licenses') OR (type = 'trigger' AND tbl_name = 'activations'))",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (kind, name, _) in &schema {
        let kind = if kind == "index" { "INDEX" } else { "TRIGGER" };
        let drop = format!("DROP {kind} \"{}\"", name.replace('"', "\"\""));
        tx.execute(sqlx::AssertSqlSafe(drop)).await?;
    }
    let full_license_sql = multi_row(license_head, &license_row_sql, SQLITE_ROWS);
    let full_activation_sql = multi_row(activation_head, &activation_row_sql, SQLITE_ROWS);
    let sql_for = |full: &str, head: &str, row: &str, rows: usize| {
        if rows == SQLITE_ROWS {
            full.to_string()
        } else {
            multi_row(head, row, rows)
        }
    };
    let mut activations = 0u64;
    for (n, chunk) in keys.chunks(SQLITE_ROWS).enumerate() {
        let first = n * SQLITE_ROWS;
        let rows = (first..first + chunk.len())
            .map(|i| license_row(plan, i))
            .collect::<StoreResult<Vec<_>>>()?;
        let sql = sql_for(
            &full_license_sql,
            license_head,
            &license_row_sql,
            chunk.len(),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (k, (r, key)) in rows.iter().zip(chunk).enumerate() {
            let i = first + k;
            q = q
                .bind((i + 1) as i64)
                .bind(key.normalized().to_string())
                .bind(r.shape.edition.as_str())
                .bind(i64::from(r.shape.seats))
                .bind(i64::from(r.shape.activations))
                .bind(i64::from(r.shape.term_years))
                .bind(r.starts_at)
                .bind(r.expires_at)
                .bind(format!("order-{i}"))
                .bind(format!("cust-{}", i / 3))
                .bind(created);
        }
        q.execute(&mut *tx).await?;

        // Their activations: (row id, fingerprint, host, at).
        let acts: Vec<(i64, String, String, i64)> = rows
            .iter()
            .enumerate()
            .flat_map(|(k, r)| {
                let i = first + k;
                (0..r.shape.activations).map(move |j| {
                    (
                        (i + 1) as i64,
                        SeedPlan::fingerprint(i, j),
                        format!("host-{i}-{j}"),
                        r.starts_at,
                    )
                })
            })
            .collect();
        for part in acts.chunks(SQLITE_ROWS) {
            let sql = sql_for(
                &full_activation_sql,
                activation_head,
                &activation_row_sql,
                part.len(),
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (id, fp, host, at) in part {
                q = q.bind(*id).bind(fp.as_str()).bind(host.as_str()).bind(*at);
            }
            q.execute(&mut *tx).await?;
        }
        activations += acts.len() as u64;
    }
    for (_, _, sql) in schema {
        tx.execute(sqlx::AssertSqlSafe(sql)).await?;
    }

    let codes = (0..plan.codes)
        .map(|_| RenewalCode::generate())
        .collect::<Vec<_>>();
    let code_head = "INSERT INTO renewal_codes (id, code_hash, product_code, edition, seats, \
                     term_years, state, issued_at, order_ref) VALUES ";
    let code_row_sql = format!("(?, ?, '{product}', ?, ?, 1, 'UNREDEEMED', ?, 'bench')");
    for (n, chunk) in codes.chunks(SQLITE_ROWS).enumerate() {
        let sql = multi_row(code_head, &code_row_sql, chunk.len());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (k, code) in chunk.iter().enumerate() {
            let (edition, seats) = SeedPlan::class(SeedPlan::code_class(n * SQLITE_ROWS + k));
            q = q
                .bind(new_code_id())
                .bind(code_hash(code))
                .bind(edition.as_str())
                .bind(i64::from(seats))
                .bind(created);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    // Leave the file as the service expects it: a checkpointed WAL.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
    conn.close().await?;
    Ok(Seeded {
        keys,
        codes,
        activations,
    })
}

async fn seed_postgres(url: &str, plan: &SeedPlan) -> StoreResult<Seeded> {
    super::postgres::migrate(url).await?;
    let options =
        PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut conn = PgConnection::connect_with(&options).await?;
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM licenses")
        .fetch_one(&mut conn)
        .await?;
    refuse_unless_empty(count)?;
    conn.execute("SET synchronous_commit = off").await?;
    let created = micros(plan.now);

    let keys = sorted_keys(plan);
    let mut activations = 0u64;
    let mut start = 0;
    while start < plan.licenses {
        let end = (start + TX_LICENSES).min(plan.licenses);
        let batch = &keys[start..end];
        let rows = (start..end)
            .map(|i| license_row(plan, i))
            .collect::<StoreResult<Vec<_>>>()?;
        let col = |f: &dyn Fn(usize, &Row) -> i64| -> Vec<i64> {
            rows.iter()
                .enumerate()
                .map(|(k, r)| f(start + k, r))
                .collect()
        };
        let mut tx = conn.begin().await?;
        // The count trigger would update each license row once per
        // activation, a new row version each time; instead the licenses
        // arrive with seats_used set. Off only inside this transaction: no
        // other session ever sees it off.
        tx.execute("ALTER TABLE activations DISABLE TRIGGER USER")
            .await?;
        sqlx::query(
            "INSERT INTO licenses (license_key, product_code, edition, kind, seats, seats_used, term_years, \
             status, starts_at, expires_at, order_ref, customer_ref, created_at) \
             SELECT k, $1, e, 'STANDARD', s, su, t, 'ACTIVE', st, ex, o, c, $2 \
             FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::int8[], \
             $9::int8[], $10::text[], $11::text[]) AS u(k, e, s, su, t, st, ex, o, c)",
        )
        .bind(plan.product.as_str())
        .bind(created)
        .bind(batch.iter().map(|k| k.normalized()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.shape.edition.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(col(&|_, r| i64::from(r.shape.seats)))
        .bind(col(&|_, r| i64::from(r.shape.activations)))
        .bind(col(&|_, r| i64::from(r.shape.term_years)))
        .bind(col(&|_, r| r.starts_at))
        .bind(col(&|_, r| r.expires_at))
        .bind((start..end).map(|i| format!("order-{i}")).collect::<Vec<_>>())
        .bind((start..end).map(|i| format!("cust-{}", i / 3)).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;

        let (mut akeys, mut fps, mut hosts, mut ats) = (vec![], vec![], vec![], vec![]);
        for (k, (r, key)) in rows.iter().zip(batch).enumerate() {
            let i = start + k;
            for j in 0..r.shape.activations {
                akeys.push(key.normalized());
                fps.push(SeedPlan::fingerprint(i, j));
                hosts.push(format!("host-{i}-{j}"));
                ats.push(r.starts_at);
            }
        }
        activations += fps.len() as u64;
        sqlx::query(
            "INSERT INTO activations (license_id, fingerprint, hostname, client_version, activated_at) \
             SELECT l.id, u.fp, u.h, $1, u.at \
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int8[]) AS u(k, fp, h, at) \
             JOIN licenses l ON l.license_key = u.k",
        )
        .bind(SEED_VERSION)
        .bind(akeys)
        .bind(fps)
        .bind(hosts)
        .bind(ats)
        .execute(&mut *tx)
        .await?;
        tx.execute("ALTER TABLE activations ENABLE TRIGGER USER")
            .await?;
        tx.commit().await?;
        start = end;
    }

    let codes = (0..plan.codes)
        .map(|_| RenewalCode::generate())
        .collect::<Vec<_>>();
    for (n, chunk) in codes.chunks(TX_LICENSES).enumerate() {
        let (mut ids, mut hashes, mut editions, mut seats) = (vec![], vec![], vec![], vec![]);
        for (k, code) in chunk.iter().enumerate() {
            let (edition, s) = SeedPlan::class(SeedPlan::code_class(n * TX_LICENSES + k));
            ids.push(new_code_id());
            hashes.push(code_hash(code));
            editions.push(edition.as_str());
            seats.push(i64::from(s));
        }
        sqlx::query(
            "INSERT INTO renewal_codes (id, code_hash, product_code, edition, seats, term_years, state, \
             issued_at, order_ref) \
             SELECT i, h, $1, e, s, 1, 'UNREDEEMED', $2, 'bench' \
             FROM UNNEST($3::text[], $4::bytea[], $5::text[], $6::int8[]) AS u(i, h, e, s)",
        )
        .bind(plan.product.as_str())
        .bind(created)
        .bind(ids)
        .bind(hashes)
        .bind(editions)
        .bind(seats)
        .execute(&mut conn)
        .await?;
    }
    conn.execute("ANALYZE").await?;
    conn.close().await?;
    Ok(Seeded {
        keys,
        codes,
        activations,
    })
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
