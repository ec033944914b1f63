//! Renewal codes: issuing and voiding them, and redeeming one against a
//! license (RedeemRenewalCode), the rule that extends a license's term.

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::conn::{Command, Conn, Ending, Step, args};
use super::idempotency::Request;
use super::load::{
    Lock, load_code_by_hash, load_code_by_id, product_from_rows, product_load,
    require_license_and_code,
};
use super::tx::{NewEvent, event_args, record_event, with_event};
use crate::domain::error::RefusalClass;
use crate::domain::rules;
use crate::domain::{License, Refusal, RenewalCode, RenewalCodeRecord};
use crate::store::change_notify::Change;
use crate::store::{
    Actor, IssueRenewalCode, Redeem, StoreError, StoreResult, code_hash, derive_renewal_code,
    micros, new_code_id, stored,
};

/// IssueRenewalCode.
struct IssueCode {
    cmd: IssueRenewalCode,
    code: RenewalCode,
    now: DateTime<Utc>,
}

impl Command for IssueCode {
    type Output = (RenewalCodeRecord, RenewalCode);

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Self::Output>> {
        let (cmd, code, now) = (&self.cmd, &self.code, self.now);
        let request = Request::issue_renewal_code(cmd);
        let id = new_code_id();
        // The product goes with the claim; a replay does not need it.
        let load: Step = (product_load(conn, Lock::No), args![cmd.product.as_str()]);
        let (replay, product) = request.claim_with(conn, &id, now, Some(load)).await?;
        if let Some(first) = replay {
            let record = load_code_by_id(conn, &first).await?;
            return Ok(Ending::Commit((record, code.clone())));
        }
        let product = product_from_rows(&product, &cmd.product)?;
        rules::issue_code(&product, cmd.edition, cmd.seats, cmd.term_years)?;
        conn.execute(
            "INSERT INTO renewal_codes (id, code_hash, product_code, edition, seats, term_years, state, issued_at, \
             order_ref, reseller) VALUES ($1, $2, $3, $4, $5, $6, 'UNREDEEMED', $7, $8, $9)",
            args![
                &id,
                &code_hash(code),
                cmd.product.as_str(),
                cmd.edition.as_str(),
                i64::from(cmd.seats),
                i64::from(cmd.term_years),
                micros(now),
                &cmd.order_ref,
                &cmd.reseller,
            ],
        )
        .await?;
        let record = load_code_by_id(conn, &id).await?;
        Ok(Ending::Commit((record, code.clone())))
    }
}

/// VoidRenewalCode.
struct VoidCode {
    code_hash: Vec<u8>,
    reason: String,
    request_id: Option<String>,
    now: DateTime<Utc>,
}

impl Command for VoidCode {
    type Output = RenewalCodeRecord;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<RenewalCodeRecord>> {
        let request =
            Request::void_renewal_code(self.request_id.as_deref(), &self.code_hash, &self.reason);
        let record = load_code_by_hash(conn, &self.code_hash, Lock::ForUpdate)
            .await?
            .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))?;
        if request.claim(conn, &record.id, self.now).await?.is_some() {
            return Ok(Ending::Commit(record));
        }
        if rules::void_code(&record)? {
            conn.execute(
                "UPDATE renewal_codes SET state = 'VOID', voided_at = $1, void_reason = $2 \
                 WHERE id = $3 AND state = 'UNREDEEMED'",
                args![micros(self.now), &self.reason, &record.id],
            )
            .await?;
        }
        Ok(Ending::Commit(load_code_by_id(conn, &record.id).await?))
    }
}

/// RedeemRenewalCode.
pub(super) struct RedeemCode {
    pub cmd: Redeem,
    pub actor: Actor,
    pub now: DateTime<Utc>,
}

impl Command for RedeemCode {
    type Output = (License, DateTime<Utc>);

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Self::Output>> {
        let (cmd, actor, now) = (&self.cmd, &self.actor, self.now);
        // The code's product: the rule uses it only once it found the code
        // of the license's product.
        let ((license_id, mut license), code) =
            require_license_and_code(conn, &cmd.license_key, &code_hash(&cmd.code)).await?;
        let (code, product) = code.ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))?;
        let decided = rules::redeem(
            &license,
            &code,
            &product,
            &cmd.fingerprint,
            &cmd.client_version,
            now,
        );
        let decision = match decided {
            Ok(d) => d,
            // A business-rule refusal against an existing license is kept
            // in its history (and changes nothing else).
            Err(refusal) if refusal.class() == RefusalClass::FailedPrecondition => {
                let event = NewEvent {
                    event_type: "renewal_refused",
                    fingerprint: &cmd.fingerprint,
                    renewal_code_id: Some(&code.id),
                    refusal_reason: refusal.reason(),
                    detail: &refusal.to_string(),
                    ..Default::default()
                };
                record_event(conn, license_id, actor, now, event).await?;
                return Ok(Ending::CommitRefusal(refusal));
            }
            Err(refusal) => return Err(refusal.into()),
        };
        // Conditional update: the code moves from UNREDEEMED exactly once.
        // It goes with the extension, the event and COMMIT (one round trip
        // on PostgreSQL); should it change no row, none of the three
        // changes anything.
        let redeem: Step = (
            "UPDATE renewal_codes SET state = 'REDEEMED', redeemed_at = $1, redeemed_license_id = $2 \
             WHERE id = $3 AND state = 'UNREDEEMED'",
            args![micros(now), license_id, &code.id],
        );
        let extend: Step = (
            "UPDATE licenses SET expires_at = $1, renewal_count = renewal_count + 1 WHERE id = $2",
            args![micros(decision.new_expires_at), license_id],
        );
        let event = NewEvent {
            event_type: "renewed",
            fingerprint: &cmd.fingerprint,
            old_expires_at: Some(decision.previous_expires_at),
            new_expires_at: Some(decision.new_expires_at),
            renewal_code_id: Some(&code.id),
            ..Default::default()
        };
        // As loaded (the row is locked) with what is written.
        license.expires_at = stored(decision.new_expires_at);
        license.renewal_count += 1;
        let ending = Ending::Commit((license, decision.previous_expires_at));
        let event = event_args(license_id, actor, now, &event);
        conn.finish_chain_if_claimed(&with_event(&[redeem, extend], &event), ending)
            .await?
            .ok_or_else(|| Refusal::RenewalCodeAlreadyRedeemed { redeemed_at: None }.into())
    }
}

impl SqlStore {
    pub(super) async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)> {
        let code = derive_renewal_code(&self.code_secret, &cmd.request_id);
        let issue = IssueCode {
            cmd: cmd.clone(),
            code,
            now,
        };
        self.write(None, issue).await
    }

    pub(super) async fn get_renewal_code(
        &self,
        code: &RenewalCode,
    ) -> StoreResult<RenewalCodeRecord> {
        let mut conn = self.readers.acquire().await?;
        load_code_by_hash(&mut *conn, &code_hash(code), Lock::No)
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
        let void = VoidCode {
            code_hash: code_hash(code),
            reason: reason.to_string(),
            request_id: request_id.map(str::to_string),
            now,
        };
        self.write(None, void).await
    }

    pub(super) async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        let redeem = RedeemCode {
            cmd: cmd.clone(),
            actor: actor.clone(),
            now,
        };
        self.write(Some(Change::License(cmd.license_key.clone())), redeem)
            .await
    }
}
