//! [`Bounded`]: any [`Store`] whose every operation is given at most a
//! fixed time (`--database-timeout-ms`), after which it is abandoned and
//! answered [`StoreError::Unavailable`] (`UNAVAILABLE`,
//! `DATABASE_UNAVAILABLE`).
//!
//! Why a bound on the whole operation, on top of the pools' acquire
//! timeouts and PostgreSQL's `lock_timeout`: a database that is gone can
//! hold a call in many places (connecting, which sqlx retries until its
//! deadline; a query on a connection whose peer vanished without a reset; a
//! lock held by a stalled session), and a caller must hear back in bounded
//! time from all of them. Abandoning a write is safe: a transaction that did
//! not commit rolls back, and one dropped after its commit still tells the
//! validation cache and the other replicas (the store's cancel guard).
//!
//! Validate answered from memory returns before the bound matters.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Actor, EventFilter, FeedPage, FeedWatch, IssueLicense, IssueRenewalCode, LicenseCursor,
    LicenseEvent, LicenseFilter, ProductUpdate, Redeem, Store, StoreError, StoreResult,
    TokenRecord, ValidationView,
};
use crate::domain::auth::{Role, Token};
use crate::domain::rules::StatusAction;
use crate::domain::{
    Activation, License, LicenseKey, Product, ProductCode, RenewalCode, RenewalCodeRecord,
};

/// A store whose operations each take at most `limit`.
pub struct Bounded<S> {
    inner: S,
    limit: Duration,
}

impl<S> Bounded<S> {
    /// `inner`, each operation bounded by `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Bounded { inner, limit }
    }
}

/// Runs `$call` for at most `$self.limit`.
macro_rules! bounded {
    ($self:ident, $call:expr) => {{
        match tokio::time::timeout($self.limit, $call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "the database did not answer within {} ms",
                $self.limit.as_millis()
            ))),
        }
    }};
}

#[async_trait]
impl<S: Store> Store for Bounded<S> {
    async fn create_product(&self, product: &Product, now: DateTime<Utc>) -> StoreResult<Product> {
        bounded!(self, self.inner.create_product(product, now))
    }
    async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        bounded!(self, self.inner.get_product(code))
    }
    async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        bounded!(self, self.inner.list_products(after, limit))
    }
    async fn update_product(
        &self,
        code: &ProductCode,
        update: ProductUpdate,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        bounded!(self, self.inner.update_product(code, update, now))
    }
    async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        bounded!(self, self.inner.issue_license(cmd, actor, now))
    }
    async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        bounded!(self, self.inner.get_license(key))
    }
    async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>> {
        bounded!(self, self.inner.list_licenses(filter, after, limit))
    }
    async fn change_status(
        &self,
        key: &LicenseKey,
        action: StatusAction,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        bounded!(
            self,
            self.inner
                .change_status(key, action, reason, request_id, actor, now)
        )
    }
    async fn list_events(
        &self,
        key: &LicenseKey,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LicenseEvent>> {
        bounded!(self, self.inner.list_events(key, after, limit))
    }
    async fn list_feed(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<FeedPage> {
        bounded!(self, self.inner.list_feed(after, filter, limit))
    }
    /// Not bounded: a watch lives as long as its consumer reads, and ends
    /// `DATABASE_UNAVAILABLE` on its own when the database fails.
    fn watch_feed(&self, after: i64, filter: EventFilter) -> FeedWatch {
        self.inner.watch_feed(after, filter)
    }
    async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)> {
        bounded!(self, self.inner.issue_renewal_code(cmd, actor, now))
    }
    async fn get_renewal_code(&self, code: &RenewalCode) -> StoreResult<RenewalCodeRecord> {
        bounded!(self, self.inner.get_renewal_code(code))
    }
    async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord> {
        bounded!(
            self,
            self.inner
                .void_renewal_code(code, reason, request_id, actor, now)
        )
    }
    async fn activate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        hostname: &str,
        client_version: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, Activation)> {
        bounded!(
            self,
            self.inner
                .activate(key, fingerprint, hostname, client_version, actor, now)
        )
    }
    async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        bounded!(self, self.inner.deactivate(key, fingerprint, actor, now))
    }
    async fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>> {
        bounded!(self, self.inner.validation_view(key, fingerprint))
    }
    async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        bounded!(self, self.inner.redeem(cmd, actor, now))
    }
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        bounded!(self, self.inner.create_token(name, role, token, now))
    }
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        bounded!(self, self.inner.list_tokens())
    }
    async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        bounded!(self, self.inner.revoke_token(name, now))
    }
    async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        bounded!(self, self.inner.find_token(id))
    }
    async fn ping(&self) -> StoreResult<()> {
        bounded!(self, self.inner.ping())
    }
}
