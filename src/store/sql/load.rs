//! The rows a write (or a read) loads, with the lock the write needs:
//! shared by the files of every concern.

use sqlx::AnyConnection;

use super::tx::Tx;
use crate::domain::{
    Activation, License, LicenseKey, Product, ProductCode, Refusal, RenewalCodeRecord,
};
use crate::store::rows::{
    Columns, Dialect, LICENSE_WITH_ACTIVATIONS, code_from_row, code_select, col, license_from_row,
    product_from_row,
};
use crate::store::{StoreError, StoreResult, from_micros};

/// Whether a read inside a write transaction locks the rows it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    /// A plain read.
    No,
    /// Lock for the rest of the transaction: `FOR UPDATE` on PostgreSQL;
    /// SQLite's writer already holds the database lock.
    ForUpdate(Dialect),
}

impl Lock {
    fn rows(self) -> bool {
        self == Lock::ForUpdate(Dialect::Postgres)
    }
}

async fn load_license(
    conn: &mut AnyConnection,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<Option<(i64, License)>> {
    if lock.rows() {
        // Lock first, then read in a second statement: under READ COMMITTED
        // a statement that waited for the lock re-reads the locked row but
        // not the rows it joined, so one statement could pair a fresh
        // seats_used with a stale list of activations.
        let locked = sqlx::query("SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE")
            .bind(key.normalized())
            .fetch_optional(&mut *conn)
            .await?;
        if locked.is_none() {
            return Ok(None);
        }
    }
    let rows = sqlx::query(LICENSE_WITH_ACTIVATIONS)
        .bind(key.normalized())
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let (id, mut license) = license_from_row(first)?;
    for row in &rows {
        if let Some(fingerprint) = row.opt_text(col::EXTRA)? {
            license.activations.push(Activation {
                fingerprint,
                hostname: row.opt_text(col::EXTRA + 1)?.unwrap_or_default(),
                activated_at: from_micros(row.int(col::EXTRA + 2)?)?,
            });
        }
    }
    Ok(Some((id, license)))
}

pub(super) async fn require_license(
    conn: &mut AnyConnection,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<(i64, License)> {
    load_license(conn, key, lock)
        .await?
        .ok_or(StoreError::Refused(Refusal::LicenseNotFound))
}

pub(super) async fn require_product(
    conn: &mut AnyConnection,
    code: &ProductCode,
    lock: Lock,
) -> StoreResult<Product> {
    let sql = if lock.rows() {
        "SELECT * FROM products WHERE code = $1 FOR UPDATE"
    } else {
        "SELECT * FROM products WHERE code = $1"
    };
    let row = sqlx::query(sql)
        .bind(code.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => product_from_row(&row),
        None => Err(Refusal::ProductNotFound(code.to_string()).into()),
    }
}

pub(super) async fn load_code_by_hash(
    conn: &mut AnyConnection,
    hash: &[u8],
    lock: Lock,
) -> StoreResult<Option<RenewalCodeRecord>> {
    let sql = if lock.rows() {
        concat!(code_select!(), "WHERE c.code_hash = $1 FOR UPDATE OF c")
    } else {
        concat!(code_select!(), "WHERE c.code_hash = $1")
    };
    let row = sqlx::query(sql)
        .bind(hash)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(code_from_row).transpose()
}

pub(super) async fn load_code_by_id(
    conn: &mut AnyConnection,
    id: &str,
) -> StoreResult<RenewalCodeRecord> {
    let row = sqlx::query(concat!(code_select!(), "WHERE c.id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    code_from_row(&row)
}

/// Reads the license as the transaction leaves it (its row is already
/// locked), then commits: the answer shows exactly what was written.
pub(super) async fn commit_with_license(mut tx: Tx, key: &LicenseKey) -> StoreResult<License> {
    let license = require_license(&mut tx, key, Lock::No).await?.1;
    tx.commit().await?;
    Ok(license)
}
