//! Renewal codes: issuing and voiding them, and redeeming one against a
//! license (RedeemRenewalCode), the rule that extends a license's term.

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::idempotency::Request;
use super::load::{
    Lock, commit_with_license, load_code_by_hash, load_code_by_id, require_license, require_product,
};
use super::tx::{NewEvent, record_event};
use crate::domain::error::RefusalClass;
use crate::domain::rules;
use crate::domain::{License, Refusal, RenewalCode, RenewalCodeRecord};
use crate::store::change_notify::Change;
use crate::store::{
    Actor, IssueRenewalCode, Redeem, StoreError, StoreResult, code_hash, derive_renewal_code,
    micros, new_code_id,
};

impl SqlStore {
    pub(super) async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)> {
        self.write(None, move |mut tx| async move {
            let request = Request::issue_renewal_code(cmd);
            let code = derive_renewal_code(&self.code_secret, &cmd.request_id);
            if let Some(id) = request.replayed(&mut tx, self.dialect).await? {
                return Ok((load_code_by_id(&mut tx, &id).await?, code));
            }
            let product = require_product(&mut tx, &cmd.product, Lock::No).await?;
            rules::issue_code(&product, cmd.edition, cmd.seats, cmd.term_years)?;
            let id = new_code_id();
            sqlx::query(
                "INSERT INTO renewal_codes (id, code_hash, product_code, edition, seats, term_years, state, issued_at, \
                 order_ref, reseller) VALUES ($1, $2, $3, $4, $5, $6, 'UNREDEEMED', $7, $8, $9)",
            )
            .bind(&id)
            .bind(code_hash(&code))
            .bind(cmd.product.as_str())
            .bind(cmd.edition.as_str())
            .bind(i64::from(cmd.seats))
            .bind(i64::from(cmd.term_years))
            .bind(micros(now))
            .bind(&cmd.order_ref)
            .bind(&cmd.reseller)
            .execute(&mut *tx)
            .await?;
            request.remember(&mut tx, &id, now).await?;
            let record = load_code_by_id(&mut tx, &id).await?;
            tx.commit().await?;
            Ok((record, code))
        })
        .await
    }

    pub(super) async fn get_renewal_code(
        &self,
        code: &RenewalCode,
    ) -> StoreResult<RenewalCodeRecord> {
        let mut conn = self.readers.acquire().await?;
        load_code_by_hash(&mut conn, &code_hash(code), Lock::No)
            .await?
            .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))
    }

    pub(super) async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord> {
        self.write(None, move |mut tx| async move {
            let code_hash = code_hash(code);
            let request = Request::void_renewal_code(request_id, &code_hash, reason);
            let record = load_code_by_hash(&mut tx, &code_hash, Lock::ForUpdate(self.dialect))
                .await?
                .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))?;
            if request.replayed(&mut tx, self.dialect).await?.is_some() {
                return Ok(record);
            }
            if rules::void_code(&record)? {
                sqlx::query(
                    "UPDATE renewal_codes SET state = 'VOID', voided_at = $1, void_reason = $2 \
                     WHERE id = $3 AND state = 'UNREDEEMED'",
                )
                .bind(micros(now))
                .bind(reason)
                .bind(&record.id)
                .execute(&mut *tx)
                .await?;
            }
            request.remember(&mut tx, &record.id, now).await?;
            let record = load_code_by_id(&mut tx, &record.id).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    pub(super) async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        self.write(Some(Change::License(cmd.license_key.clone())), move |mut tx| async move {
            let (license_id, license) = require_license(&mut tx, &cmd.license_key, Lock::ForUpdate(self.dialect)).await?;
            let code = load_code_by_hash(&mut tx, &code_hash(&cmd.code), Lock::ForUpdate(self.dialect))
                .await?
                .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))?;
            let product = require_product(&mut tx, &license.product, Lock::No).await?;
            let decision = match rules::redeem(
                &license,
                &code,
                &product,
                &cmd.fingerprint,
                &cmd.client_version,
                now,
            ) {
                Ok(d) => d,
                Err(refusal) => {
                    // A business-rule refusal against an existing license is kept
                    // in its history (and changes nothing else).
                    if refusal.class() == RefusalClass::FailedPrecondition {
                        record_event(
                            &mut tx,
                            license_id,
                            actor,
                            now,
                            NewEvent {
                                event_type: "renewal_refused",
                                fingerprint: &cmd.fingerprint,
                                renewal_code_id: Some(&code.id),
                                refusal_reason: refusal.reason(),
                                detail: &refusal.to_string(),
                                ..Default::default()
                            },
                        )
                        .await?;
                        tx.commit().await?;
                    }
                    return Err(refusal.into());
                }
            };
            // Conditional update: the code moves from UNREDEEMED exactly once.
            let updated = sqlx::query(
                "UPDATE renewal_codes SET state = 'REDEEMED', redeemed_at = $1, redeemed_license_id = $2 \
                 WHERE id = $3 AND state = 'UNREDEEMED'",
            )
            .bind(micros(now))
            .bind(license_id)
            .bind(&code.id)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() != 1 {
                return Err(Refusal::RenewalCodeAlreadyRedeemed { redeemed_at: None }.into());
            }
            sqlx::query(
                "UPDATE licenses SET expires_at = $1, renewal_count = renewal_count + 1 WHERE id = $2",
            )
            .bind(micros(decision.new_expires_at))
            .bind(license_id)
            .execute(&mut *tx)
            .await?;
            record_event(
                &mut tx,
                license_id,
                actor,
                now,
                NewEvent {
                    event_type: "renewed",
                    fingerprint: &cmd.fingerprint,
                    old_expires_at: Some(decision.previous_expires_at),
                    new_expires_at: Some(decision.new_expires_at),
                    renewal_code_id: Some(&code.id),
                    ..Default::default()
                },
            )
            .await?;
            let license = commit_with_license(tx, &cmd.license_key).await?;
            Ok((license, decision.previous_expires_at))
        })
        .await
    }
}
