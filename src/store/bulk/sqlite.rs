//! Seeding SQLite: one connection, one transaction, multi-row `INSERT`s,
//! the secondary indexes and count triggers rebuilt at the end.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, SqliteConnection};

use super::plan::{SEED_VERSION, SeedPlan, Seeded, license_row, refuse_unless_empty, sorted_keys};
use crate::domain::RenewalCode;
use crate::store::{StoreResult, code_hash, micros, new_code_id};

/// Rows per multi-row `INSERT` on SQLite (at most 11 parameters a row, well
/// below SQLite's limit of 32,766 parameters a statement).
pub const SQLITE_ROWS: usize = 500;

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

pub(super) async fn seed_sqlite(path: &std::path::Path, plan: &SeedPlan) -> StoreResult<Seeded> {
    crate::store::sqlite::migrate(path).await?;
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
