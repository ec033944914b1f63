//! Licenses: issuing, reading, listing, status changes, their history, and
//! Validate's read (from the validation cache when it can answer).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::conn::{Command, Conn, Ending, Step, args};
use super::idempotency::Request;
use super::load::{Lock, product_from_rows, product_load, require_license};
use super::tx::{NewEvent, finish_inserted, finish_recorded};
use crate::domain::rules::{self, StatusAction};
use crate::domain::{License, LicenseKey, LicenseStatus, Refusal};
use crate::store::change_notify::Change;
use crate::store::rows::{
    VALIDATION_SQL, corrupt, license_from, license_from_row, license_select, validation_from_row,
};
use crate::store::validation_cache::Answer;
use crate::store::{
    Actor, IssueLicense, LicenseCursor, LicenseEvent, LicenseFilter, StoreError, StoreResult,
    ValidationView, micros, stored,
};

/// IssueLicense, with the key it will have (drawn before the transaction,
/// so that the change is known before it commits).
pub(super) struct Issue {
    pub cmd: IssueLicense,
    pub key: LicenseKey,
    pub actor: Actor,
    pub now: DateTime<Utc>,
}

impl Command for Issue {
    type Output = License;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<License>> {
        let (cmd, now) = (&self.cmd, self.now);
        let request = Request::issue_license(cmd);
        // The product goes with the claim; a replay does not need it.
        let load: Step = (product_load(conn, Lock::No), args![cmd.product.as_str()]);
        let (replay, product) = request
            .claim_with(conn, self.key.normalized(), now, Some(load))
            .await?;
        if let Some(key) = replay {
            let key = LicenseKey::parse(&key).map_err(|_| corrupt("license key", "<redacted>"))?;
            let license = require_license(conn, &key, Lock::ForUpdate).await?.1;
            return Ok(Ending::Commit(license));
        }
        let product = product_from_rows(&product, &cmd.product)?;
        let plan = rules::issue(
            &product,
            cmd.edition,
            cmd.seats,
            cmd.term_years,
            cmd.starts_at,
            now,
        )?;
        let key = &self.key;
        let insert: Step = (
            "INSERT INTO licenses (license_key, product_code, edition, kind, seats, term_years, status, starts_at, \
             expires_at, order_ref, customer_ref, reseller, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $8, $9, $10, $11, $12) RETURNING id",
            args![
                key.normalized(),
                cmd.product.as_str(),
                cmd.edition.as_str(),
                cmd.kind.as_str(),
                i64::from(cmd.seats),
                i64::from(cmd.term_years),
                micros(plan.starts_at),
                micros(plan.expires_at),
                &cmd.order_ref,
                &cmd.customer_ref,
                &cmd.reseller,
                micros(now),
            ],
        );
        let event = NewEvent {
            event_type: "issued",
            new_expires_at: Some(plan.expires_at),
            ..Default::default()
        };
        // Exactly what was written, as a read would return it.
        let ending = Ending::Commit(License {
            key: key.clone(),
            product: cmd.product.clone(),
            edition: cmd.edition,
            kind: cmd.kind,
            seats: cmd.seats,
            seats_used: 0,
            term_years: cmd.term_years,
            status: LicenseStatus::Active,
            starts_at: stored(plan.starts_at),
            expires_at: stored(plan.expires_at),
            renewal_count: 0,
            order_ref: cmd.order_ref.clone(),
            customer_ref: cmd.customer_ref.clone(),
            reseller: cmd.reseller.clone(),
            created_at: stored(now),
            grace_period_months: product.grace_period_months(),
            latest_version: product.latest_version().cloned().map(Arc::new),
            offline_lease_days: product.offline_lease_days(),
            activations: Vec::new(),
        });
        finish_inserted(conn, insert, &self.actor, now, event, ending).await
    }
}

/// Suspend, Reinstate or Revoke.
struct ChangeStatus {
    key: LicenseKey,
    action: StatusAction,
    reason: String,
    request_id: Option<String>,
    actor: Actor,
    now: DateTime<Utc>,
}

impl Command for ChangeStatus {
    type Output = License;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<License>> {
        let (key, now) = (&self.key, self.now);
        let op = self.action.event_type();
        let request = Request::change_status(self.request_id.as_deref(), op, key, &self.reason);
        let replayed = request.claim(conn, key.normalized(), now).await?.is_some();
        let (id, mut license) = require_license(conn, key, Lock::ForUpdate).await?;
        if replayed {
            return Ok(Ending::Commit(license));
        }
        if let Some(status) = rules::change_status(&license, self.action)? {
            let update: Step = (
                "UPDATE licenses SET status = $1 WHERE id = $2",
                args![status.as_str(), id],
            );
            let event = NewEvent {
                event_type: op,
                detail: &self.reason,
                ..Default::default()
            };
            // As loaded (the row is locked) with the new status.
            license.status = status;
            let ending = Ending::Commit(license);
            return finish_recorded(conn, &[update], id, &self.actor, now, event, ending).await;
        }
        Ok(Ending::Commit(license))
    }
}

impl SqlStore {
    pub(super) async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let key = LicenseKey::generate(&cmd.product, cmd.kind);
        let change = Change::License(key.clone());
        let issue = Issue {
            cmd: cmd.clone(),
            key,
            actor: actor.clone(),
            now,
        };
        self.write(Some(change), issue).await
    }

    pub(super) async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        // The license row and its activations come from one snapshot, so
        // seats_used always matches the activations listed.
        let mut tx = self.readers.begin_with(self.dialect.begin_read()).await?;
        let license = require_license(&mut *tx, key, Lock::No).await?.1;
        tx.commit().await?;
        Ok(license)
    }

    pub(super) async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>> {
        // The listing runs from the later of the cursor and `expires_after`
        // (`(expires_at, id) > (t, i64::MIN)` is `expires_at >= t`) up to the
        // last microsecond before `expires_before`: both are ranges of the
        // index the statement walks, so it reads only the rows it returns.
        let after = after.map_or((i64::MIN, i64::MIN), |c| (c.expires_at_micros, c.id));
        let from = filter
            .expires_after
            .map_or(after, |t| after.max((micros(t), i64::MIN)));
        let Some(until) = filter
            .expires_before
            .map_or(Some(i64::MAX), |t| micros(t).checked_sub(1))
        else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(list_sql(filter))
            .bind(filter.product.as_ref().map(|p| p.as_str()))
            .bind(filter.customer_ref.as_deref())
            .bind(filter.order_ref.as_deref())
            .bind(from.0)
            .bind(from.1)
            .bind(until)
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await?;
        rows.iter()
            .map(|row| {
                let (id, license) = license_from_row(row)?;
                let cursor = LicenseCursor {
                    expires_at_micros: micros(license.expires_at),
                    id,
                };
                Ok((license, cursor))
            })
            .collect()
    }

    pub(super) async fn change_status(
        &self,
        key: &LicenseKey,
        action: StatusAction,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let cmd = ChangeStatus {
            key: key.clone(),
            action,
            reason: reason.to_string(),
            request_id: request_id.map(str::to_string),
            actor: actor.clone(),
            now,
        };
        self.write(Some(Change::License(key.clone())), cmd).await
    }

    pub(super) async fn list_events(
        &self,
        key: &LicenseKey,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LicenseEvent>> {
        let mut conn = self.readers.acquire().await?;
        let id: i64 = sqlx::query_scalar("SELECT id FROM licenses WHERE license_key = $1")
            .bind(key.normalized())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StoreError::Refused(Refusal::LicenseNotFound))?;
        crate::store::event_feed::read_license_events(&mut conn, id, after.unwrap_or(0), limit)
            .await
    }

    pub(super) async fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>> {
        if let Some(cache) = &self.cache {
            match cache.lookup(key, fingerprint, std::time::Instant::now()) {
                Answer::Found(view) => {
                    self.cache_hits.increment(1);
                    return Ok(Some(view));
                }
                Answer::AskDatabase => {
                    self.cache_fallbacks.increment(1);
                }
            }
        }
        let started = std::time::Instant::now();
        let view = match &self.fast_reads {
            Some(fast) => fast.validation_view(key, fingerprint),
            None => sqlx::query(VALIDATION_SQL)
                .bind(key.normalized())
                .bind(fingerprint)
                .fetch_optional(&self.readers)
                .await
                .map_err(StoreError::from)
                .and_then(|row| {
                    row.map(|r| validation_from_row(&r, fingerprint))
                        .transpose()
                }),
        };
        crate::store::metered::record("validation_lookup", started, &view);
        view
    }
}

/// ListLicenses' statement, `filter`'s equalities written out: SQLite plans
/// a statement once whatever its parameters, so `($2 IS NULL OR
/// l.customer_ref = $2)` could use no index on customer_ref and walked
/// every license in expiry order to find one customer's few. A filter that
/// is set is a plain equality, one that is not the constant `$n IS NULL`
/// (every parameter is still used). When a customer or an order narrows
/// the listing, the product's equality is written so that no index serves
/// it (`|| ''`) and the narrower index is walked. `$4`–`$7`: the lower
/// bound (expiry, id) exclusive, the last expiry included, the page size.
fn list_sql(filter: &LicenseFilter) -> &'static str {
    macro_rules! list {
        ($product:literal, $customer:literal, $order:literal) => {
            concat!(
                license_select!(),
                license_from!(),
                "WHERE ",
                $product,
                " AND ",
                $customer,
                " AND ",
                $order,
                " AND (l.expires_at, l.id) > ($4, $5) AND l.expires_at <= $6 \
                 ORDER BY l.expires_at, l.id LIMIT $7"
            )
        };
    }
    match (
        filter.product.is_some(),
        filter.customer_ref.is_some(),
        filter.order_ref.is_some(),
    ) {
        (false, false, false) => list!("$1 IS NULL", "$2 IS NULL", "$3 IS NULL"),
        (true, false, false) => list!("l.product_code = $1", "$2 IS NULL", "$3 IS NULL"),
        (false, true, false) => list!("$1 IS NULL", "l.customer_ref = $2", "$3 IS NULL"),
        (false, false, true) => list!("$1 IS NULL", "$2 IS NULL", "l.order_ref = $3"),
        (false, true, true) => list!("$1 IS NULL", "l.customer_ref = $2", "l.order_ref = $3"),
        (true, true, false) => list!(
            "l.product_code || '' = $1",
            "l.customer_ref = $2",
            "$3 IS NULL"
        ),
        (true, false, true) => list!(
            "l.product_code || '' = $1",
            "$2 IS NULL",
            "l.order_ref = $3"
        ),
        (true, true, true) => list!(
            "l.product_code || '' = $1",
            "l.customer_ref = $2",
            "l.order_ref = $3"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::list_sql;
    use crate::domain::ProductCode;
    use crate::store::LicenseFilter;

    /// SQLite's plan of each listing statement walks the index of its
    /// narrowest filter, within the bounds, in the listing's order: no
    /// scan of every license and no sort.
    #[tokio::test]
    async fn each_listing_walks_the_index_of_its_narrowest_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        crate::store::sqlite::migrate(&path).await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        for mask in 0u8..8 {
            let filter = LicenseFilter {
                product: (mask & 1 != 0).then(|| ProductCode::parse("ACME").unwrap()),
                customer_ref: (mask & 2 != 0).then(|| "c".to_string()),
                order_ref: (mask & 4 != 0).then(|| "o".to_string()),
                ..Default::default()
            };
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", list_sql(&filter)))
                .unwrap()
                .query_map([rusqlite::types::Null; 7], |row| row.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let walks = plan
                .iter()
                .find(|step| step.contains(" l USING"))
                .unwrap_or_else(|| panic!("{filter:?}: {plan:?}"));
            // Product and expiry listings may cover most licenses: their
            // indexes hold the expiry, so a page is read in order. A
            // customer's or an order's licenses are few: found by their
            // reference and sorted (their indexes leave the expiry out, so
            // a renewal does not move them).
            let (index, sorted) = match mask {
                0 => ("licenses_expiry (expires_at>? AND expires_at<?)", false),
                1 => (
                    "licenses_product (product_code=? AND expires_at>? AND expires_at<?)",
                    false,
                ),
                2 | 3 => ("licenses_customer (customer_ref=?)", true),
                _ => ("licenses_order (order_ref=?)", true),
            };
            assert!(
                walks.starts_with("SEARCH l USING") && walks.ends_with(index),
                "{filter:?}: {plan:?}"
            );
            assert_eq!(
                plan.iter().any(|s| s.contains("TEMP B-TREE")),
                sorted,
                "{filter:?}: {plan:?}"
            );
        }
    }
}
