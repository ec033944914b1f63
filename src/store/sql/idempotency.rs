//! Idempotency keys: a request carrying a key it was sent with before gets
//! the first answer again, without a second write; the same key with another
//! payload is refused. Every payload's digest is computed here: the
//! operation's name, then its fields ([`digest_fields`]).

use super::conn::{Conn, args};
use crate::domain::{LicenseKey, Refusal};
use crate::store::rows::Columns;
use crate::store::{Dialect, IssueLicense, IssueRenewalCode, StoreResult, digest_fields, micros};
use chrono::{DateTime, Utc};

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

    /// The resource this request produced before, if it was made before
    /// (never for a request without a key); refuses a key used before with
    /// another payload.
    pub(super) async fn replayed<C: Conn>(&self, conn: &mut C) -> StoreResult<Option<String>> {
        let Some(request_id) = self.request_id else {
            return Ok(None);
        };
        if conn.dialect() == Dialect::Postgres {
            // Two replicas handling the same request id wait for each other here,
            // so the second one sees the first one's key (released at commit).
            conn.execute(
                "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) AS locked",
                args![request_id],
            )
            .await?;
        }
        let row = conn
            .fetch_optional(
                "SELECT operation, payload_hash, resource FROM idempotency_keys WHERE request_id = $1",
                args![request_id],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                if row.text(0)? == self.operation && row.blob(1)? == self.payload_hash {
                    Ok(Some(row.text(2)?))
                } else {
                    Err(Refusal::IdempotencyKeyReused.into())
                }
            }
        }
    }

    /// Keeps the key (if any), with the `resource` this request produced.
    pub(super) async fn remember<C: Conn>(
        &self,
        conn: &mut C,
        resource: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let Some(request_id) = self.request_id else {
            return Ok(());
        };
        conn.execute(
            "INSERT INTO idempotency_keys (request_id, operation, payload_hash, resource, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            args![request_id, self.operation, &self.payload_hash, resource, micros(now)],
        )
        .await?;
        Ok(())
    }
}
