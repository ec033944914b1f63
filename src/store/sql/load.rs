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

/// Locks the license `key` for the rest of the transaction (PostgreSQL).
const LOCK_LICENSE: &str = "SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE";

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
        let lock: Step = (LOCK_LICENSE, args![key.normalized()]);
        let [_, rows] = batch(conn, [lock, load]).await?;
        rows
    } else {
        conn.fetch_all(load.0, load.1).await?
    };
    license_from_rows(&rows)
}

/// `steps` as a [`Conn::fetch_batch`], each one's rows.
async fn batch<C: Conn, const N: usize>(
    conn: &mut C,
    steps: [Step<'_, '_>; N],
) -> StoreResult<[Vec<C::Row>; N]> {
    let rows = conn.fetch_batch(&steps).await?;
    rows.try_into()
        .map_err(|_| StoreError::Internal("a batch answered with too few results".into()))
}

/// The license (and its id) that `rows` of [`LICENSE_WITH_ACTIVATIONS`]
/// list, one row per activation; `None` if there are none.
fn license_from_rows<R: Columns>(rows: &[R]) -> StoreResult<Option<(i64, License)>> {
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let (id, mut license) = license_from_row(first)?;
    for row in rows {
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

/// The license `key` and the renewal code with hash `hash` (with its
/// product), both locked for the rest of the transaction, the license
/// first: one round trip on PostgreSQL's write path.
pub(super) async fn require_license_and_code<C: Conn>(
    conn: &mut C,
    key: &LicenseKey,
    hash: &[u8],
) -> StoreResult<((i64, License), Option<(RenewalCodeRecord, Product)>)> {
    let load: Step = (LICENSE_WITH_ACTIVATIONS, args![key.normalized()]);
    let (license, code) = if Lock::ForUpdate.rows(conn) {
        let lock: Step = (LOCK_LICENSE, args![key.normalized()]);
        let code: Step = (
            concat!(
                code_and_product_select!(),
                "WHERE c.code_hash = $1 FOR UPDATE OF c"
            ),
            args![hash],
        );
        let [_, license, code] = batch(conn, [lock, load, code]).await?;
        (license, code)
    } else {
        let code: Step = (
            concat!(code_and_product_select!(), "WHERE c.code_hash = $1"),
            args![hash],
        );
        let [license, code] = batch(conn, [load, code]).await?;
        (license, code)
    };
    let license =
        license_from_rows(&license)?.ok_or(StoreError::Refused(Refusal::LicenseNotFound))?;
    Ok((
        license,
        code.first().map(code_and_product_from_row).transpose()?,
    ))
}

/// The statement that loads the product whose code is `$1` (locked as
/// `lock` says), for [`product_from_rows`].
pub(super) fn product_load(conn: &impl Conn, lock: Lock) -> &'static str {
    if lock.rows(conn) {
        concat!(product_select!(), "WHERE code = $1 FOR UPDATE")
    } else {
        concat!(product_select!(), "WHERE code = $1")
    }
}

/// The product `code` that [`product_load`] returned in `rows`.
pub(super) fn product_from_rows<R: Columns>(
    rows: &[R],
    code: &ProductCode,
) -> StoreResult<Product> {
    match rows.first() {
        Some(row) => product_from_row(row),
        None => Err(Refusal::ProductNotFound(code.to_string()).into()),
    }
}

pub(super) async fn require_product<C: Conn>(
    conn: &mut C,
    code: &ProductCode,
    lock: Lock,
) -> StoreResult<Product> {
    let sql = product_load(conn, lock);
    let row = conn.fetch_optional(sql, args![code.as_str()]).await?;
    product_from_rows(row.as_slice(), code)
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

/// A code and its product, from a row of `code_and_product_select!`.
fn code_and_product_from_row<R: Columns>(row: &R) -> StoreResult<(RenewalCodeRecord, Product)> {
    let product = product_from_row(&After(row, CODE_PRODUCT_AT))?;
    Ok((code_from_row(row)?, product))
}

pub(super) async fn load_code_by_id<C: Conn>(
    conn: &mut C,
    id: &str,
) -> StoreResult<RenewalCodeRecord> {
    let row = fetch_one(conn, concat!(code_select!(), "WHERE c.id = $1"), args![id]).await?;
    code_from_row(&row)
}
