//! The rows a write (or a read) loads, with the lock the write needs:
//! shared by the files of every concern, on any [`Conn`].

use super::conn::{Conn, Step, args, fetch_one};
use crate::domain::{
    Activation, License, LicenseKey, Product, ProductCode, Refusal, RenewalCodeRecord,
};
use crate::store::rows::{
    After, CODE_PRODUCT_AT, Columns, Dialect, LICENSE_WITH_ACTIVATIONS, code_and_product_select,
    code_from_row, code_select, col, license_from_row, product_from_row, product_select,
};
use crate::store::{StoreError, StoreResult, from_micros};

/// Whether a read inside a write transaction locks the rows it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    /// A plain read.
    No,
    /// Lock for the rest of the transaction: `FOR UPDATE` on PostgreSQL;
    /// SQLite's writer already holds the database lock.
    ForUpdate,
}

impl Lock {
    fn rows(self, conn: &impl Conn) -> bool {
        self == Lock::ForUpdate && conn.dialect() == Dialect::Postgres
    }
}

async fn load_license<C: Conn>(
    conn: &mut C,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<Option<(i64, License)>> {
    let load: Step = (LICENSE_WITH_ACTIVATIONS, args![key.normalized()]);
    let rows = if lock.rows(conn) {
        // Lock first, then read in a second statement: under READ COMMITTED
        // a statement that waited for the lock re-reads the locked row but
        // not the rows it joined, so one statement could pair a fresh
        // seats_used with a stale list of activations.
        let lock: Step = (
            "SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE",
            args![key.normalized()],
        );
        match conn.fetch_all_locked(lock, load).await? {
            Some(rows) => rows,
            None => return Ok(None),
        }
    } else {
        conn.fetch_all(load.0, load.1).await?
    };
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

pub(super) async fn require_license<C: Conn>(
    conn: &mut C,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<(i64, License)> {
    load_license(conn, key, lock)
        .await?
        .ok_or(StoreError::Refused(Refusal::LicenseNotFound))
}

pub(super) async fn require_product<C: Conn>(
    conn: &mut C,
    code: &ProductCode,
    lock: Lock,
) -> StoreResult<Product> {
    let sql = if lock.rows(conn) {
        concat!(product_select!(), "WHERE code = $1 FOR UPDATE")
    } else {
        concat!(product_select!(), "WHERE code = $1")
    };
    match conn.fetch_optional(sql, args![code.as_str()]).await? {
        Some(row) => product_from_row(&row),
        None => Err(Refusal::ProductNotFound(code.to_string()).into()),
    }
}

pub(super) async fn load_code_by_hash<C: Conn>(
    conn: &mut C,
    hash: &[u8],
    lock: Lock,
) -> StoreResult<Option<RenewalCodeRecord>> {
    let sql = if lock.rows(conn) {
        concat!(code_select!(), "WHERE c.code_hash = $1 FOR UPDATE OF c")
    } else {
        concat!(code_select!(), "WHERE c.code_hash = $1")
    };
    let row = conn.fetch_optional(sql, args![hash]).await?;
    row.as_ref().map(code_from_row).transpose()
}

/// The code with hash `hash` and its product, in one statement.
pub(super) async fn load_code_and_product_by_hash<C: Conn>(
    conn: &mut C,
    hash: &[u8],
    lock: Lock,
) -> StoreResult<Option<(RenewalCodeRecord, Product)>> {
    let sql = if lock.rows(conn) {
        concat!(
            code_and_product_select!(),
            "WHERE c.code_hash = $1 FOR UPDATE OF c"
        )
    } else {
        concat!(code_and_product_select!(), "WHERE c.code_hash = $1")
    };
    let Some(row) = conn.fetch_optional(sql, args![hash]).await? else {
        return Ok(None);
    };
    let product = product_from_row(&After(&row, CODE_PRODUCT_AT))?;
    Ok(Some((code_from_row(&row)?, product)))
}

pub(super) async fn load_code_by_id<C: Conn>(
    conn: &mut C,
    id: &str,
) -> StoreResult<RenewalCodeRecord> {
    let row = fetch_one(conn, concat!(code_select!(), "WHERE c.id = $1"), args![id]).await?;
    code_from_row(&row)
}
