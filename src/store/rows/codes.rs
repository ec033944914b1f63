//! The rows of renewal codes, alone or with their product (re-exported
//! by [`super`]).

use chrono::{DateTime, Utc};

use super::{Columns, corrupt, enum_of};
use crate::domain::{CodeState, Edition, LicenseKey, ProductCode, RenewalCodeRecord};
use crate::store::{StoreResult, from_micros};

/// The columns [`code_from_row`] reads.
macro_rules! code_columns {
    () => {
        "c.id, c.product_code, c.edition, c.seats, c.term_years, c.state, c.issued_at, \
         c.redeemed_at, l.license_key AS redeemed_license_key, c.voided_at, c.void_reason, c.order_ref, \
         c.reseller"
    };
}
pub(in crate::store) use code_columns;

/// `FROM` a code `c` and the license `l` it renewed, if any.
macro_rules! code_from {
    () => {
        " FROM renewal_codes c LEFT JOIN licenses l ON l.id = c.redeemed_license_id "
    };
}
pub(in crate::store) use code_from;

macro_rules! code_select {
    () => {
        concat!(
            "SELECT ",
            $crate::store::rows::code_columns!(),
            $crate::store::rows::code_from!()
        )
    };
}
pub(in crate::store) use code_select;

/// A code and its product in one row: [`code_col`]'s columns, then
/// [`product_col`]'s from [`CODE_PRODUCT_AT`] on.
macro_rules! code_and_product_select {
    () => {
        concat!(
            "SELECT ",
            $crate::store::rows::code_columns!(),
            ", ",
            $crate::store::rows::product_columns!(),
            $crate::store::rows::code_from!(),
            "JOIN products p ON p.code = c.product_code "
        )
    };
}
pub(in crate::store) use code_and_product_select;

/// Where the product's columns start in `code_and_product_select!`.
pub(in crate::store) const CODE_PRODUCT_AT: usize = 13;

/// Positions of `code_select!`'s columns.
pub(in crate::store) mod code_col {
    pub const ID: usize = 0;
    pub const PRODUCT_CODE: usize = 1;
    pub const EDITION: usize = 2;
    pub const SEATS: usize = 3;
    pub const TERM_YEARS: usize = 4;
    pub const STATE: usize = 5;
    pub const ISSUED_AT: usize = 6;
    pub const REDEEMED_AT: usize = 7;
    pub const REDEEMED_LICENSE_KEY: usize = 8;
    pub const VOIDED_AT: usize = 9;
    pub const VOID_REASON: usize = 10;
    pub const ORDER_REF: usize = 11;
    pub const RESELLER: usize = 12;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 13] = [
        "id",
        "product_code",
        "edition",
        "seats",
        "term_years",
        "state",
        "issued_at",
        "redeemed_at",
        "redeemed_license_key",
        "voided_at",
        "void_reason",
        "order_ref",
        "reseller",
    ];
}

/// A renewal code from the columns of `code_select!` (any backend).
pub(in crate::store) fn code_from_row(row: &impl Columns) -> StoreResult<RenewalCodeRecord> {
    use code_col as c;
    let product = row.text(c::PRODUCT_CODE)?;
    let opt_time = |at: usize| -> StoreResult<Option<DateTime<Utc>>> {
        row.opt_int(at)?.map(from_micros).transpose()
    };
    Ok(RenewalCodeRecord {
        id: row.text(c::ID)?,
        product: ProductCode::parse(&product).map_err(|_| corrupt("product code", &product))?,
        edition: enum_of(row, c::EDITION, Edition::from_str_opt)?,
        seats: row.int(c::SEATS)? as u32,
        term_years: row.int(c::TERM_YEARS)? as u32,
        state: enum_of(row, c::STATE, CodeState::from_str_opt)?,
        issued_at: from_micros(row.int(c::ISSUED_AT)?)?,
        redeemed_at: opt_time(c::REDEEMED_AT)?,
        redeemed_license_key: row
            .opt_text(c::REDEEMED_LICENSE_KEY)?
            .map(|k| LicenseKey::parse(&k).map_err(|_| corrupt("license key", "<redacted>")))
            .transpose()?,
        voided_at: opt_time(c::VOIDED_AT)?,
        void_reason: row.text(c::VOID_REASON)?,
        order_ref: row.text(c::ORDER_REF)?,
        reseller: row.text(c::RESELLER)?,
    })
}
