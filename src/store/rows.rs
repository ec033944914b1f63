//! The SQL text and the row mapping the rest of the store shares: every
//! statement more than one file runs, the positions of the columns read by
//! position (each list checked against its statement's text by a test
//! below), and the functions that turn a row into a domain value.
//!
//! This file imports no other file of the store but the store's types
//! (`super`), so every other one may import it.
//!
//! Rows are read by position where a row is read often (Validate, loading a
//! license, the validation cache): looking a column up by name costs a string
//! search per column. The rarer rows (products, tokens, renewal codes,
//! events) are read by name, where `SELECT *` or a long column list makes a
//! position easy to get wrong.

use std::sync::Arc;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{StoreError, StoreResult, ValidationView, from_micros};
use crate::domain::product::ProductSpec;
use crate::domain::{
    Edition, License, LicenseKey, LicenseKind, LicenseStatus, Product, ProductCode, RenewalBasis,
    Standing, Version,
};

/// The SQL a backend speaks differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite: one writer, `BEGIN IMMEDIATE`, no row locks.
    Sqlite,
    /// PostgreSQL: row locks.
    Postgres,
}

impl Dialect {
    /// A read-only transaction that sees one snapshot for all its statements.
    pub(super) fn begin_read(self) -> &'static str {
        match self {
            // A deferred transaction on a WAL database reads one snapshot.
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }
}

pub(super) fn corrupt(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("unexpected {what} in database: {value}"))
}

pub(super) fn terms_to_text(terms: &[u32]) -> String {
    terms
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn terms_from_text(s: &str) -> StoreResult<Vec<u32>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|_| corrupt("terms", s)))
        .collect()
}

/// A product's columns, in the order [`product_col`] reads them (a macro,
/// so `concat!` can build `'static` query strings from it).
/// The columns [`product_from_row`] reads, of products `p`.
macro_rules! product_columns {
    () => {
        "p.code, p.display_name, p.latest_version, p.personal_terms, p.business_terms, \
         p.grace_period_months, p.renewal_basis, p.offline_lease_days"
    };
}
pub(super) use product_columns;

macro_rules! product_select {
    () => {
        concat!(
            "SELECT ",
            $crate::store::rows::product_columns!(),
            " FROM products p "
        )
    };
}
pub(super) use product_select;

/// Positions of `product_select!`'s columns.
pub(super) mod product_col {
    pub const CODE: usize = 0;
    pub const DISPLAY_NAME: usize = 1;
    pub const LATEST_VERSION: usize = 2;
    pub const PERSONAL_TERMS: usize = 3;
    pub const BUSINESS_TERMS: usize = 4;
    pub const GRACE_PERIOD_MONTHS: usize = 5;
    pub const RENEWAL_BASIS: usize = 6;
    pub const OFFLINE_LEASE_DAYS: usize = 7;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 8] = [
        "code",
        "display_name",
        "latest_version",
        "personal_terms",
        "business_terms",
        "grace_period_months",
        "renewal_basis",
        "offline_lease_days",
    ];
}

/// A product from the columns of `product_select!` (any backend).
pub(super) fn product_from_row(row: &impl Columns) -> StoreResult<Product> {
    use product_col as c;
    let code = row.text(c::CODE)?;
    Product::new(
        ProductCode::parse(&code).map_err(|_| corrupt("product code", &code))?,
        ProductSpec {
            display_name: row.text(c::DISPLAY_NAME)?,
            latest_version: row.text(c::LATEST_VERSION)?,
            personal_terms: terms_from_text(&row.text(c::PERSONAL_TERMS)?)?,
            business_terms: terms_from_text(&row.text(c::BUSINESS_TERMS)?)?,
            grace_period_months: Some(row.int(c::GRACE_PERIOD_MONTHS)? as u32),
            renewal_basis: Some(enum_of(row, c::RENEWAL_BASIS, RenewalBasis::from_str_opt)?),
            offline_lease_days: Some(row.int(c::OFFLINE_LEASE_DAYS)? as u32),
        },
    )
    .map_err(|v| corrupt("product", v.description))
}

/// The columns [`license_from_row`] reads, with the product's policy; every
/// license query starts with these (a macro, so `concat!` can build `'static`
/// query strings from it).
macro_rules! license_select {
    () => {
        "SELECT l.id, l.license_key, l.product_code, l.edition, l.kind, l.seats, l.seats_used, l.term_years, \
         l.status, l.starts_at, l.expires_at, l.renewal_count, l.order_ref, l.customer_ref, l.reseller, \
         l.created_at, p.grace_period_months, p.latest_version, p.offline_lease_days"
    };
}
pub(super) use license_select;

/// `FROM` the license and its product.
macro_rules! license_from {
    () => {
        " FROM licenses l JOIN products p ON p.code = l.product_code "
    };
}
pub(super) use license_from;

/// Positions of the columns of `license_select!` (and of the extra columns
/// the queries built on it append). Rows are read by position: looking a
/// column up by name costs a string search per column, which on Validate's
/// hot path cost more than SQLite's own work on the row.
pub(super) mod col {
    pub const ID: usize = 0;
    pub const LICENSE_KEY: usize = 1;
    pub const PRODUCT_CODE: usize = 2;
    pub const EDITION: usize = 3;
    pub const KIND: usize = 4;
    pub const SEATS: usize = 5;
    pub const SEATS_USED: usize = 6;
    pub const TERM_YEARS: usize = 7;
    pub const STATUS: usize = 8;
    pub const STARTS_AT: usize = 9;
    pub const EXPIRES_AT: usize = 10;
    pub const RENEWAL_COUNT: usize = 11;
    pub const ORDER_REF: usize = 12;
    pub const CUSTOMER_REF: usize = 13;
    pub const RESELLER: usize = 14;
    pub const CREATED_AT: usize = 15;
    pub const GRACE_PERIOD_MONTHS: usize = 16;
    pub const LATEST_VERSION: usize = 17;
    pub const OFFLINE_LEASE_DAYS: usize = 18;
    /// The first column after `license_select!`'s.
    pub const EXTRA: usize = 19;

    /// Every column's name, by position (for the test that keeps the
    /// positions in step with the query text).
    #[cfg(test)]
    pub const NAMES: [&str; EXTRA] = [
        "id",
        "license_key",
        "product_code",
        "edition",
        "kind",
        "seats",
        "seats_used",
        "term_years",
        "status",
        "starts_at",
        "expires_at",
        "renewal_count",
        "order_ref",
        "customer_ref",
        "reseller",
        "created_at",
        "grace_period_months",
        "latest_version",
        "offline_lease_days",
    ];
}

/// Column access by position, shared by the sqlx rows and the SQLite fast
/// path's rows, so that a license is mapped from its columns in one place.
pub(super) trait Columns {
    /// A TEXT column.
    fn text(&self, at: usize) -> StoreResult<String>;
    /// An INTEGER/BIGINT column.
    fn int(&self, at: usize) -> StoreResult<i64>;
    /// A nullable INTEGER/BIGINT column.
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>>;
    /// A nullable TEXT column.
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>>;
    /// A BLOB/BYTEA column.
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>>;
}

impl Columns for AnyRow {
    fn text(&self, at: usize) -> StoreResult<String> {
        Ok(self.try_get(at)?)
    }
    fn int(&self, at: usize) -> StoreResult<i64> {
        Ok(self.try_get(at)?)
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        Ok(self.try_get(at)?)
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>> {
        Ok(self.try_get(at)?)
    }
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>> {
        Ok(self.try_get(at)?)
    }
}

/// PostgreSQL's own write path (tokio-postgres), which decodes a column
/// only as its exact type: an INTEGER column is read as an `i32`.
impl Columns for tokio_postgres::Row {
    fn text(&self, at: usize) -> StoreResult<String> {
        self.try_get(at).map_err(decode)
    }
    fn int(&self, at: usize) -> StoreResult<i64> {
        self.opt_int(at)?
            .ok_or_else(|| StoreError::Internal(format!("column {at} is NULL")))
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        use tokio_postgres::types::Type;
        let column = self
            .columns()
            .get(at)
            .ok_or_else(|| StoreError::Internal(format!("no column {at}")))?;
        Ok(match *column.type_() {
            Type::INT2 => self
                .try_get::<_, Option<i16>>(at)
                .map_err(decode)?
                .map(i64::from),
            Type::INT4 => self
                .try_get::<_, Option<i32>>(at)
                .map_err(decode)?
                .map(i64::from),
            _ => self.try_get(at).map_err(decode)?,
        })
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>> {
        self.try_get(at).map_err(decode)
    }
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>> {
        self.try_get(at).map_err(decode)
    }
}

fn decode(e: tokio_postgres::Error) -> StoreError {
    StoreError::Internal(format!("reading a column: {e}"))
}

/// The columns of a row from a position on, as a row of their own (the
/// second record of a row that holds two).
pub(super) struct After<'r, R>(pub &'r R, pub usize);

impl<R: Columns> Columns for After<'_, R> {
    fn text(&self, at: usize) -> StoreResult<String> {
        self.0.text(self.1 + at)
    }
    fn int(&self, at: usize) -> StoreResult<i64> {
        self.0.int(self.1 + at)
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        self.0.opt_int(self.1 + at)
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<String>> {
        self.0.opt_text(self.1 + at)
    }
    fn blob(&self, at: usize) -> StoreResult<Vec<u8>> {
        self.0.blob(self.1 + at)
    }
}

pub(super) fn enum_of<T>(
    row: &impl Columns,
    at: usize,
    f: fn(&str) -> Option<T>,
) -> StoreResult<T> {
    let s = row.text(at)?;
    f(&s).ok_or_else(|| corrupt(std::any::type_name::<T>(), &s))
}

/// A license (without activations) and its row id, from the columns of
/// `license_select!` (any backend).
pub(super) fn license_from_row(row: &impl Columns) -> StoreResult<(i64, License)> {
    let key = row.text(col::LICENSE_KEY)?;
    let product = row.text(col::PRODUCT_CODE)?;
    let license = License {
        key: LicenseKey::parse(&key).map_err(|_| corrupt("license key", "<redacted>"))?,
        product: ProductCode::parse(&product).map_err(|_| corrupt("product code", &product))?,
        edition: enum_of(row, col::EDITION, Edition::from_str_opt)?,
        kind: enum_of(row, col::KIND, LicenseKind::from_str_opt)?,
        seats: row.int(col::SEATS)? as u32,
        seats_used: row.int(col::SEATS_USED)? as u32,
        term_years: row.int(col::TERM_YEARS)? as u32,
        status: enum_of(row, col::STATUS, LicenseStatus::from_str_opt)?,
        starts_at: from_micros(row.int(col::STARTS_AT)?)?,
        expires_at: from_micros(row.int(col::EXPIRES_AT)?)?,
        renewal_count: row.int(col::RENEWAL_COUNT)? as u32,
        order_ref: row.text(col::ORDER_REF)?,
        customer_ref: row.text(col::CUSTOMER_REF)?,
        reseller: row.text(col::RESELLER)?,
        created_at: from_micros(row.int(col::CREATED_AT)?)?,
        grace_period_months: row.int(col::GRACE_PERIOD_MONTHS)? as u32,
        latest_version: latest_version(&row.text(col::LATEST_VERSION)?)?,
        offline_lease_days: row.int(col::OFFLINE_LEASE_DAYS)? as u32,
        activations: Vec::new(),
    };
    Ok((row.int(col::ID)?, license))
}

/// What Validate needs from one row of [`VALIDATION_SQL`].
pub(super) fn validation_from_row(
    row: &impl Columns,
    fingerprint: Option<&str>,
) -> StoreResult<ValidationView> {
    Ok(ValidationView {
        standing: Standing {
            status: enum_of(row, vcol::STATUS, LicenseStatus::from_str_opt)?,
            kind: enum_of(row, vcol::KIND, LicenseKind::from_str_opt)?,
            expires_at: from_micros(row.int(vcol::EXPIRES_AT)?)?,
            grace_period_months: row.int(vcol::GRACE_PERIOD_MONTHS)? as u32,
        },
        edition: enum_of(row, vcol::EDITION, Edition::from_str_opt)?,
        seats: row.int(vcol::SEATS)? as u32,
        seats_used: row.int(vcol::SEATS_USED)? as u32,
        fingerprint_bound: fingerprint
            .map(|_| row.opt_int(vcol::BOUND).map(|b| b.is_some()))
            .transpose()?,
        latest_version: latest_version(&row.text(vcol::LATEST_VERSION)?)?,
        offline_lease_days: row.int(vcol::OFFLINE_LEASE_DAYS)? as u32,
    })
}

/// A product's stored `latest_version` ('' when unset).
pub(super) fn latest_version(text: &str) -> StoreResult<Option<Arc<Version>>> {
    if text.is_empty() {
        return Ok(None);
    }
    Version::parse(text)
        .map(|v| Some(Arc::new(v)))
        .map_err(|_| corrupt("version", text))
}

/// Validate's one query: the license's standing, its product's policy, and
/// whether the given fingerprint is bound.
pub(super) const VALIDATION_SQL: &str = "SELECT l.status, l.kind, l.edition, l.expires_at, l.seats, l.seats_used, \
     p.grace_period_months, p.latest_version, a.activated_at, p.offline_lease_days \
     FROM licenses l JOIN products p ON p.code = l.product_code \
     LEFT JOIN activations a ON a.license_id = l.id AND a.fingerprint = $2 WHERE l.license_key = $1";

/// Positions of [`VALIDATION_SQL`]'s columns.
pub(super) mod vcol {
    pub const STATUS: usize = 0;
    pub const KIND: usize = 1;
    pub const EDITION: usize = 2;
    pub const EXPIRES_AT: usize = 3;
    pub const SEATS: usize = 4;
    pub const SEATS_USED: usize = 5;
    pub const GRACE_PERIOD_MONTHS: usize = 6;
    pub const LATEST_VERSION: usize = 7;
    /// Not NULL iff the fingerprint is bound.
    pub const BOUND: usize = 8;
    pub const OFFLINE_LEASE_DAYS: usize = 9;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 10] = [
        "status",
        "kind",
        "edition",
        "expires_at",
        "seats",
        "seats_used",
        "grace_period_months",
        "latest_version",
        "activated_at",
        "offline_lease_days",
    ];
}

/// The license with its product's policy and its activations, in one
/// statement (one row per activation, or one row without): one snapshot, so
/// seats_used always matches the activations listed.
pub(super) const LICENSE_WITH_ACTIVATIONS: &str = concat!(
    license_select!(),
    ", a.fingerprint AS a_fingerprint, a.hostname AS a_hostname, a.activated_at AS a_activated_at",
    license_from!(),
    "LEFT JOIN activations a ON a.license_id = l.id \
     WHERE l.license_key = $1 ORDER BY a.activated_at, a.fingerprint"
);

mod codes;
#[cfg(test)]
use codes::code_col;
pub(super) use codes::{
    CODE_PRODUCT_AT, code_and_product_select, code_columns, code_from, code_from_row, code_select,
};
mod credentials;
#[cfg(test)]
use credentials::token_col;
pub(super) use credentials::{
    key_col, signing_key_from_row, signing_key_select, token_from_row, token_select,
};
mod feeds;
pub(super) use feeds::{
    EVENT_SELECT, LAST_EVENT_SQL, LOAD_SQL, PRODUCTS_SQL, SQLITE_LICENSES_BY_IDS,
    SQLITE_LICENSES_BY_KEYS, cache_col, cache_columns, cache_select_few_pg, event_from_row,
    pg_xmin, policy_col,
};

#[cfg(test)]
mod tests;
