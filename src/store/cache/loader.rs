//! Turns the rows of the cache's statements into the cache's values, and
//! applies a full load to the cache in batches; SQLite's full load itself,
//! which reads through the fast reader on a blocking thread.

use super::validation_cache::{LicenseRow, Poll, ProductPolicy, ValidationCache};
use crate::domain::{Edition, LicenseKind, LicenseStatus};
use crate::store::rows::{
    Columns, LAST_EVENT_SQL, LOAD_SQL, PRODUCTS_SQL, SQLITE_LICENSES_BY_IDS,
    SQLITE_LICENSES_BY_KEYS, cache_col, cache_select_few_pg, enum_of, latest_version, policy_col,
};
use crate::store::sqlite::fast::{FastReader, Snapshot};
use crate::store::{StoreError, StoreResult};

/// Licenses applied to the cache per write lock during a load.
const LOAD_BATCH: usize = 10_000;

/// Licenses re-read per statement by a poll.
pub(super) const BATCH: usize = 500;

/// What one SQLite poll read: the licenses to apply, every product's
/// policy, and the newest event id seen.
pub(in crate::store) struct SqlitePoll {
    pub rows: Vec<LicenseRow>,
    pub products: Vec<ProductPolicy>,
    pub last_id: i64,
}

/// SQLite's poll, through rusqlite in one read transaction (blocking: run
/// it on a blocking thread): the licenses named by events after `last_id`,
/// then those of the `pending` keys not read already (a local write marks
/// its key and records an event: each license is read once), then every
/// product.
pub(in crate::store) fn poll_sqlite(
    fast: &FastReader,
    last_id: i64,
    pending: &[String],
) -> StoreResult<SqlitePoll> {
    fast.read(|snapshot| {
        let mut last = last_id;
        let mut ids = std::collections::BTreeSet::new();
        snapshot.for_each_with(
            "SELECT id, license_id FROM license_events WHERE id > ?1 ORDER BY id",
            [last_id],
            |row| {
                last = row.int(0)?;
                ids.insert(row.int(1)?);
                Ok(())
            },
        )?;
        let mut rows = Vec::new();
        let ids: Vec<i64> = ids.into_iter().collect();
        for chunk in ids.chunks(BATCH) {
            read_licenses(snapshot, SQLITE_LICENSES_BY_IDS, chunk, &mut rows)?;
        }
        let mut more = Vec::new();
        for chunk in not_read(pending, &rows).chunks(BATCH) {
            read_licenses(snapshot, SQLITE_LICENSES_BY_KEYS, chunk, &mut more)?;
        }
        rows.extend(more);
        let mut products = Vec::new();
        snapshot.for_each(PRODUCTS_SQL, |row| {
            products.push(product_policy(row)?);
            Ok(())
        })?;
        Ok(SqlitePoll {
            rows,
            products,
            last_id: last,
        })
    })
}

/// SQLite's load, through rusqlite (blocking: run it on a blocking thread):
/// every product, then every license with its activations, from one
/// snapshot; returns the newest event id in that snapshot. Gives up when
/// `cancelled` says so (checked between batches), so that a server shutting
/// down does not wait for it.
pub(super) fn load_sqlite(
    fast: &FastReader,
    cache: &ValidationCache,
    poll: &Poll,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> StoreResult<i64> {
    let snapshot = fast.snapshot()?;
    let last_id = snapshot.int(LAST_EVENT_SQL)?;
    let mut products = Vec::new();
    snapshot.for_each(PRODUCTS_SQL, |row| {
        products.push(product_policy(row)?);
        Ok(())
    })?;
    cache.apply_products(poll, products);
    let mut loader = Loader::new(cache, poll, cancelled);
    snapshot.for_each(LOAD_SQL, |row| loader.push(row))?;
    loader.finish();
    Ok(last_id)
}

/// A product's policy from a row of [`PRODUCTS_SQL`].
pub(super) fn product_policy(row: &impl Columns) -> StoreResult<ProductPolicy> {
    Ok(ProductPolicy {
        code: row.text(policy_col::CODE)?,
        grace_period_months: row.int(policy_col::GRACE_PERIOD_MONTHS)? as u32,
        latest_version: latest_version(&row.text(policy_col::LATEST_VERSION)?)?,
        offline_lease_days: row.int(policy_col::OFFLINE_LEASE_DAYS)? as u32,
    })
}

/// The keys among `pending` that none of `rows` is the license of.
pub(super) fn not_read<'a>(pending: &'a [String], rows: &[LicenseRow]) -> Vec<&'a String> {
    let read: std::collections::HashSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    pending
        .iter()
        .filter(|k| !read.contains(k.as_str()))
        .collect()
}

/// The statement reading the cache's rows of the licenses whose `column`
/// is one of `n` values (`$1`…`$n`), on PostgreSQL (SQLite's polls bind
/// their values as one JSON array: [`SQLITE_LICENSES_BY_IDS`]).
pub(super) fn licenses_in(column: &str, n: usize) -> String {
    let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "{}WHERE {column} IN ({}) ORDER BY l.id",
        cache_select_few_pg!(),
        placeholders.join(", ")
    )
}

/// Appends to `rows` the licenses `sql` ([`SQLITE_LICENSES_BY_IDS`] or
/// [`SQLITE_LICENSES_BY_KEYS`]) selects for `values`, bound as one JSON
/// array.
fn read_licenses(
    snapshot: &Snapshot,
    sql: &str,
    values: &[impl serde::Serialize],
    rows: &mut Vec<LicenseRow>,
) -> StoreResult<()> {
    let values =
        serde_json::to_string(values).map_err(|e| StoreError::Internal(format!("poll: {e}")))?;
    let mut group = Grouper::default();
    snapshot.for_each_with(sql, [values], |row| {
        rows.extend(group.push(row)?);
        Ok(())
    })?;
    rows.extend(group.finish());
    Ok(())
}

/// Applies the rows of [`LOAD_SQL`] to the cache, [`LOAD_BATCH`] licenses
/// per write lock, giving up between batches when `cancelled` says so (a
/// server shutting down does not wait for a load).
pub(super) struct Loader<'a> {
    cache: &'a ValidationCache,
    poll: &'a Poll,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    group: Grouper,
    batch: Vec<LicenseRow>,
}

impl<'a> Loader<'a> {
    pub(super) fn new(
        cache: &'a ValidationCache,
        poll: &'a Poll,
        cancelled: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        Loader {
            cache,
            poll,
            cancelled,
            group: Grouper::default(),
            batch: Vec::with_capacity(LOAD_BATCH),
        }
    }

    /// Adds one row.
    pub(super) fn push(&mut self, row: &impl Columns) -> StoreResult<()> {
        if let Some(done) = self.group.push(row)? {
            self.batch.push(done);
            if self.batch.len() == LOAD_BATCH {
                if (self.cancelled)() {
                    return Err(StoreError::Unavailable("the store is closing".into()));
                }
                self.cache.apply(self.poll, &self.batch);
                self.batch.clear();
            }
        }
        Ok(())
    }

    /// Applies what is left.
    pub(super) fn finish(mut self) {
        self.batch.extend(self.group.finish());
        self.cache.apply(self.poll, &self.batch);
    }
}

/// Folds the rows of `cache_select!` (one per activation, ordered by
/// license) into licenses.
#[derive(Default)]
pub(super) struct Grouper {
    current: Option<(i64, LicenseRow)>,
}

impl Grouper {
    /// Adds a row; returns the previous license once all its rows are in.
    pub(super) fn push(&mut self, row: &impl Columns) -> StoreResult<Option<LicenseRow>> {
        let id = row.int(cache_col::ID)?;
        let fingerprint = row.opt_text(cache_col::FINGERPRINT)?;
        if let Some((cur, license)) = &mut self.current
            && *cur == id
        {
            license.fingerprints.extend(fingerprint);
            return Ok(None);
        }
        let license = LicenseRow {
            key: row.text(cache_col::LICENSE_KEY)?,
            product: row.text(cache_col::PRODUCT_CODE)?,
            edition: enum_of(row, cache_col::EDITION, Edition::from_str_opt)?,
            kind: enum_of(row, cache_col::KIND, LicenseKind::from_str_opt)?,
            status: enum_of(row, cache_col::STATUS, LicenseStatus::from_str_opt)?,
            expires_at: row.int(cache_col::EXPIRES_AT)?,
            seats: row.int(cache_col::SEATS)? as u32,
            seats_used: row.int(cache_col::SEATS_USED)? as u32,
            fingerprints: fingerprint.into_iter().collect(),
        };
        Ok(self.current.replace((id, license)).map(|(_, l)| l))
    }

    /// The last license.
    pub(super) fn finish(self) -> Option<LicenseRow> {
        self.current.map(|(_, l)| l)
    }
}
