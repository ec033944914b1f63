//! Turns the rows of the cache's statements into the cache's values, and
//! applies a full load to the cache in batches; SQLite's full load itself,
//! which reads through the fast reader on a blocking thread.

use super::validation_cache::{LicenseRow, Poll, ProductPolicy, ValidationCache};
use crate::domain::{Edition, LicenseKind, LicenseStatus};
use crate::store::rows::{
    Columns, LAST_EVENT_SQL, LOAD_SQL, PRODUCTS_SQL, cache_col, enum_of, latest_version, policy_col,
};
use crate::store::sqlite::fast::FastReader;
use crate::store::{StoreError, StoreResult};

/// Licenses applied to the cache per write lock during a load.
const LOAD_BATCH: usize = 10_000;

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

/// Folds the rows of [`cache_select!`] (one per activation, ordered by
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
