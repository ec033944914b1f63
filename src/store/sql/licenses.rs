//! Licenses: issuing, reading, listing, status changes, their history, and
//! Validate's read (from the validation cache when it can answer).

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::idempotency::Request;
use super::load::{Lock, commit_with_license, require_license, require_product};
use super::tx::{NewEvent, record_event};
use crate::domain::rules::{self, StatusAction};
use crate::domain::{License, LicenseKey, Refusal};
use crate::store::change_notify::Change;
use crate::store::rows::{
    VALIDATION_SQL, corrupt, license_from, license_from_row, license_select, validation_from_row,
};
use crate::store::validation_cache::Answer;
use crate::store::{
    Actor, IssueLicense, LicenseCursor, LicenseEvent, LicenseFilter, StoreError, StoreResult,
    ValidationView, micros,
};

impl SqlStore {
    pub(super) async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let result = self.write(None, move |mut tx| async move {
            let request = Request::issue_license(cmd);
            if let Some(key) = request.replayed(&mut tx, self.dialect).await? {
                let key = LicenseKey::parse(&key).map_err(|_| corrupt("license key", "<redacted>"))?;
                return Ok(require_license(&mut tx, &key, Lock::ForUpdate(self.dialect)).await?.1);
            }
            let product = require_product(&mut tx, &cmd.product, Lock::No).await?;
            let plan = rules::issue(
                &product,
                cmd.edition,
                cmd.seats,
                cmd.term_years,
                cmd.starts_at,
                now,
            )?;
            let key = LicenseKey::generate(&cmd.product, cmd.kind);
            let license_id: i64 = sqlx::query_scalar(
                "INSERT INTO licenses (license_key, product_code, edition, kind, seats, term_years, status, starts_at, \
                 expires_at, order_ref, customer_ref, reseller, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $8, $9, $10, $11, $12) RETURNING id",
            )
            .bind(key.normalized())
            .bind(cmd.product.as_str())
            .bind(cmd.edition.as_str())
            .bind(cmd.kind.as_str())
            .bind(i64::from(cmd.seats))
            .bind(i64::from(cmd.term_years))
            .bind(micros(plan.starts_at))
            .bind(micros(plan.expires_at))
            .bind(&cmd.order_ref)
            .bind(&cmd.customer_ref)
            .bind(&cmd.reseller)
            .bind(micros(now))
            .fetch_one(&mut *tx)
            .await?;
            record_event(
                &mut tx,
                license_id,
                actor,
                now,
                NewEvent {
                    event_type: "issued",
                    new_expires_at: Some(plan.expires_at),
                    ..Default::default()
                },
            )
            .await?;
            request.remember(&mut tx, key.normalized(), now).await?;
            let license = commit_with_license(tx, &key).await?;
            Ok(license)
        })
        .await;
        if let Ok(license) = &result {
            self.announce(Change::License(license.key.clone()), &result)
                .await;
        }
        result
    }

    pub(super) async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        // The license row and its activations come from one snapshot, so
        // seats_used always matches the activations listed.
        let mut tx = self.readers.begin_with(self.dialect.begin_read()).await?;
        let license = require_license(&mut tx, key, Lock::No).await?.1;
        tx.commit().await?;
        Ok(license)
    }

    pub(super) async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>> {
        let (after_exp, after_id) = after
            .map(|c| (c.expires_at_micros, c.id))
            .unwrap_or((i64::MIN, i64::MIN));
        let rows = sqlx::query(concat!(
            license_select!(),
            license_from!(),
            "WHERE ($1 IS NULL OR l.product_code = $1) AND ($2 IS NULL OR l.customer_ref = $2) \
             AND ($3 IS NULL OR l.order_ref = $3) AND ($4 IS NULL OR l.expires_at >= $4) \
             AND ($5 IS NULL OR l.expires_at < $5) AND (l.expires_at, l.id) > ($6, $7) \
             ORDER BY l.expires_at, l.id LIMIT $8"
        ))
        .bind(filter.product.as_ref().map(|p| p.as_str()))
        .bind(filter.customer_ref.as_deref())
        .bind(filter.order_ref.as_deref())
        .bind(filter.expires_after.map(micros))
        .bind(filter.expires_before.map(micros))
        .bind(after_exp)
        .bind(after_id)
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
        self.write(
            Some(Change::License(key.clone())),
            move |mut tx| async move {
                let op = action.event_type();
                let request = Request::change_status(request_id, op, key, reason);
                if request.replayed(&mut tx, self.dialect).await?.is_some() {
                    return Ok(require_license(&mut tx, key, Lock::ForUpdate(self.dialect))
                        .await?
                        .1);
                }
                let (id, license) =
                    require_license(&mut tx, key, Lock::ForUpdate(self.dialect)).await?;
                if let Some(status) = rules::change_status(&license, action)? {
                    sqlx::query("UPDATE licenses SET status = $1 WHERE id = $2")
                        .bind(status.as_str())
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    record_event(
                        &mut tx,
                        id,
                        actor,
                        now,
                        NewEvent {
                            event_type: op,
                            detail: reason,
                            ..Default::default()
                        },
                    )
                    .await?;
                }
                request.remember(&mut tx, key.normalized(), now).await?;
                let license = commit_with_license(tx, key).await?;
                Ok(license)
            },
        )
        .await
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
