//! The statements the validation cache and the event feed read with, and
//! their rows (re-exported by [`super`]).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::corrupt;
use crate::domain::LicenseKey;
use crate::store::{LicenseEvent, StoreResult, from_micros};

/// The columns of a license row of the cache, in [`cache_col`]'s order.
macro_rules! cache_columns {
    () => {
        "SELECT l.id, l.license_key, l.product_code, l.edition, l.kind, l.status, l.expires_at, l.seats, \
         l.seats_used, a.fingerprint "
    };
}
pub(in crate::store) use cache_columns;

/// What a license row of the cache is read from: one statement, so
/// `seats_used` and the activations listed come from one snapshot.
macro_rules! cache_select {
    () => {
        concat!(
            $crate::store::rows::cache_columns!(),
            "FROM licenses l LEFT JOIN activations a ON a.license_id = l.id "
        )
    };
}

/// [`cache_select!`] for a poll's few licenses on PostgreSQL (the same
/// columns): each license's activations are read through their index. With
/// a plain join the planner may hash-join an `IN` list of a hundred ids
/// against every activation (a sequential scan per poll: 4–7 ms at 30k
/// activations, several per second under writes). SQLite has no `LATERAL`
/// and always loops over the index.
macro_rules! cache_select_few_pg {
    () => {
        concat!(
            $crate::store::rows::cache_columns!(),
            "FROM licenses l LEFT JOIN LATERAL \
             (SELECT fingerprint FROM activations WHERE license_id = l.id OFFSET 0) a ON true "
        )
    };
}
pub(in crate::store) use cache_select_few_pg;

/// Positions of `cache_select!`'s columns (one row per activation).
pub(in crate::store) mod cache_col {
    pub const ID: usize = 0;
    pub const LICENSE_KEY: usize = 1;
    pub const PRODUCT_CODE: usize = 2;
    pub const EDITION: usize = 3;
    pub const KIND: usize = 4;
    pub const STATUS: usize = 5;
    pub const EXPIRES_AT: usize = 6;
    pub const SEATS: usize = 7;
    pub const SEATS_USED: usize = 8;
    /// NULL on the one row of a license without activations.
    pub const FINGERPRINT: usize = 9;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 10] = [
        "id",
        "license_key",
        "product_code",
        "edition",
        "kind",
        "status",
        "expires_at",
        "seats",
        "seats_used",
        "fingerprint",
    ];
}

/// The full load: every license with its activations, grouped by license.
pub(in crate::store) const LOAD_SQL: &str = concat!(cache_select!(), "ORDER BY l.id");

/// SQLite's poll: the licenses whose id is in the JSON array `?1`. One
/// statement whatever their number, so each connection prepares it once
/// (an `IN (?1, …, ?n)` list is a new statement for every `n`); the plan is
/// the list's (a rowid lookup per id).
pub(in crate::store) const SQLITE_LICENSES_BY_IDS: &str = concat!(
    cache_select!(),
    "WHERE l.id IN (SELECT value FROM json_each(?1)) ORDER BY l.id"
);

/// [`SQLITE_LICENSES_BY_IDS`] for license keys (normalized).
pub(in crate::store) const SQLITE_LICENSES_BY_KEYS: &str = concat!(
    cache_select!(),
    "WHERE l.license_key IN (SELECT value FROM json_each(?1)) ORDER BY l.id"
);

/// Every product's policy.
pub(in crate::store) const PRODUCTS_SQL: &str =
    "SELECT code, grace_period_months, latest_version, offline_lease_days FROM products";

/// Positions of [`PRODUCTS_SQL`]'s columns.
pub(in crate::store) mod policy_col {
    pub const CODE: usize = 0;
    pub const GRACE_PERIOD_MONTHS: usize = 1;
    pub const LATEST_VERSION: usize = 2;
    pub const OFFLINE_LEASE_DAYS: usize = 3;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 4] = [
        "code",
        "grace_period_months",
        "latest_version",
        "offline_lease_days",
    ];
}

/// The newest event (SQLite: the position a load starts from).
pub(in crate::store) const LAST_EVENT_SQL: &str = "SELECT COALESCE(MAX(id), 0) FROM license_events";

/// The columns of an event in the feed, with its license's key and product.
pub(in crate::store) const EVENT_SELECT: &str = "SELECT e.id, e.type, e.at, e.actor, e.fingerprint, e.old_expires_at, \
     e.new_expires_at, e.renewal_code_id, e.refusal_reason, e.detail, l.license_key, l.product_code \
     FROM license_events e JOIN licenses l ON l.id = e.license_id";

/// An event from a row of [`EVENT_SELECT`].
pub(in crate::store) fn event_from_row(row: &AnyRow) -> StoreResult<LicenseEvent> {
    let time = |name: &str| -> StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
        row.try_get::<Option<i64>, _>(name)?
            .map(from_micros)
            .transpose()
    };
    Ok(LicenseEvent {
        id: row.try_get("id")?,
        event_type: row.try_get("type")?,
        at: from_micros(row.try_get("at")?)?,
        actor: row.try_get("actor")?,
        fingerprint: row.try_get("fingerprint")?,
        old_expires_at: time("old_expires_at")?,
        new_expires_at: time("new_expires_at")?,
        renewal_code_id: row.try_get("renewal_code_id")?,
        refusal_reason: row.try_get("refusal_reason")?,
        detail: row.try_get("detail")?,
        license_key: LicenseKey::parse(&row.try_get::<String, _>("license_key")?)
            .map_err(|_| corrupt("license key", "<redacted>"))?,
        product: row.try_get("product_code")?,
    })
}

/// The `xmin` of a fresh snapshot: every transaction below it has finished.
pub(in crate::store) async fn pg_xmin(conn: &mut AnyConnection) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *conn)
            .await?,
    )
}
