//! Seeding PostgreSQL: `INSERT … SELECT FROM UNNEST(…)` with one array per
//! column, a transaction per [`TX_LICENSES`] licenses, `ANALYZE` at the end.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection};

use super::plan::{
    Row, SEED_VERSION, SeedPlan, Seeded, license_row, refuse_unless_empty, sorted_keys,
};
use crate::domain::RenewalCode;
use crate::store::{StoreError, StoreResult, code_hash, micros, new_code_id};

/// Licenses written per transaction (PostgreSQL).
pub const TX_LICENSES: usize = 50_000;

pub(super) async fn seed_postgres(url: &str, plan: &SeedPlan) -> StoreResult<Seeded> {
    crate::store::postgres::migrate(url).await?;
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
