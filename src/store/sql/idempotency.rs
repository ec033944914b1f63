//! Idempotency keys: a request carrying a key it was sent with before gets
//! the first answer again, without a second write; the same key with another
//! payload is refused. Every payload's digest is computed here: the
//! operation's name, then its fields ([`digest_fields`]).

use chrono::{DateTime, Utc};

use super::conn::{Conn, Step, args, fetch_one};
use crate::domain::{LicenseKey, Refusal};
use crate::store::rows::Columns;
use crate::store::{IssueLicense, IssueRenewalCode, StoreResult, digest_fields, micros};

/// One request's idempotency key (if it has one) and what it asks for.
pub(super) struct Request<'a> {
    request_id: Option<&'a str>,
    operation: &'a str,
    payload_hash: Vec<u8>,
}

impl<'a> Request<'a> {
    /// IssueLicense.
    pub(super) fn issue_license(cmd: &'a IssueLicense) -> Self {
        Request {
            request_id: Some(&cmd.request_id),
            operation: "IssueLicense",
            payload_hash: digest_fields(&[
                "IssueLicense",
                cmd.product.as_str(),
                cmd.edition.as_str(),
                cmd.kind.as_str(),
                &cmd.seats.to_string(),
                &cmd.term_years.to_string(),
                &cmd.starts_at
                    .map(|t| t.timestamp_micros().to_string())
                    .unwrap_or_default(),
                &cmd.order_ref,
                &cmd.customer_ref,
                &cmd.reseller,
            ]),
        }
    }

    /// IssueRenewalCode.
    pub(super) fn issue_renewal_code(cmd: &'a IssueRenewalCode) -> Self {
        Request {
            request_id: Some(&cmd.request_id),
            operation: "IssueRenewalCode",
            payload_hash: digest_fields(&[
                "IssueRenewalCode",
                cmd.product.as_str(),
                cmd.edition.as_str(),
                &cmd.seats.to_string(),
                &cmd.term_years.to_string(),
                &cmd.order_ref,
                &cmd.reseller,
            ]),
        }
    }

    /// A status change (`operation` is its event type) of the license `key`.
    pub(super) fn change_status(
        request_id: Option<&'a str>,
        operation: &'a str,
        key: &LicenseKey,
        reason: &str,
    ) -> Self {
        Request {
            request_id,
            operation,
            payload_hash: digest_fields(&[operation, key.normalized(), reason]),
        }
    }

    /// VoidRenewalCode of the code whose hash is `code_hash`.
    pub(super) fn void_renewal_code(
        request_id: Option<&'a str>,
        code_hash: &[u8],
        reason: &str,
    ) -> Self {
        Request {
            request_id,
            operation: "VoidRenewalCode",
            payload_hash: digest_fields(&["VoidRenewalCode", &hex::encode(code_hash), reason]),
        }
    }

    /// Claims the request's key (if it has one) for `resource`, the
    /// resource this request will produce, at the start of its
    /// transaction: `None` if it is new (the claim rolls back with the
    /// transaction if the write is refused), or the resource its first
    /// sending produced; a key sent before with another payload is refused.
    ///
    /// One statement when the key is new, on both backends. On PostgreSQL
    /// two replicas handling the same key at once queue on the key's unique
    /// index: the second waits for the first to end, then finds its row
    /// (or claims the key itself if the first rolled back).
    pub(super) async fn claim<C: Conn>(
        &self,
        conn: &mut C,
        resource: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<String>> {
        Ok(self.claim_with(conn, resource, now, None).await?.0)
    }

    /// [`claim`](Self::claim), and the rows of `also`, a read the claim
    /// does not change, sent with the claim (one round trip on
    /// PostgreSQL's write path).
    pub(super) async fn claim_with<C: Conn>(
        &self,
        conn: &mut C,
        resource: &str,
        now: DateTime<Utc>,
        also: Option<Step<'_, '_>>,
    ) -> StoreResult<(Option<String>, Vec<C::Row>)> {
        let Some(request_id) = self.request_id else {
            let rows = match also {
                Some((sql, args)) => conn.fetch_all(sql, args).await?,
                None => Vec::new(),
            };
            return Ok((None, rows));
        };
        let claim: Step = (
            "INSERT INTO idempotency_keys (request_id, operation, payload_hash, resource, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING RETURNING 1",
            args![
                request_id,
                self.operation,
                &self.payload_hash,
                resource,
                micros(now)
            ],
        );
        let mut answers = conn
            .fetch_batch(&[claim].into_iter().chain(also).collect::<Vec<_>>())
            .await?
            .into_iter();
        let claimed = answers.next().unwrap_or_default();
        let also = answers.next().unwrap_or_default();
        if !claimed.is_empty() {
            return Ok((None, also));
        }
        let row = fetch_one(
            conn,
            "SELECT operation, payload_hash, resource FROM idempotency_keys WHERE request_id = $1",
            args![request_id],
        )
        .await?;
        if row.text(0)? == self.operation && row.blob(1)? == self.payload_hash {
            Ok((Some(row.text(2)?), also))
        } else {
            Err(Refusal::IdempotencyKeyReused.into())
        }
    }
}
