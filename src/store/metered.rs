//! [`Metered`]: any [`Store`] with each operation timed
//! (`licensd_store_operation_duration_seconds{operation}`) and its failures
//! counted (`licensd_store_operation_errors_total{operation, kind}`; a
//! refusal is an answer, not a failure). The server wraps its store in it
//! only when metrics are on. Validate's lookup is left out here: it is
//! counted inside the store, as cache hits and database fallbacks.

use std::time::Instant;

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

/// A store whose operations are measured.
pub struct Metered<S>(pub S);

pub(super) fn record<T>(operation: &'static str, started: Instant, result: &StoreResult<T>) {
    metrics::histogram!("licensd_store_operation_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    let kind = match result {
        Ok(_) | Err(StoreError::Refused(_)) => return,
        Err(StoreError::Unavailable(_) | StoreError::Retryable(_)) => "unavailable",
        Err(StoreError::Internal(_)) => "internal",
    };
    metrics::counter!("licensd_store_operation_errors_total", "operation" => operation, "kind" => kind)
        .increment(1);
}

/// Times `$call` as `$name`.
macro_rules! timed {
    ($name:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        record($name, started, &result);
        result
    }};
}

#[async_trait]
impl<S: Store> Store for Metered<S> {
    async fn create_product(&self, product: &Product, now: DateTime<Utc>) -> StoreResult<Product> {
        timed!("create_product", self.0.create_product(product, now))
    }
    async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        timed!("get_product", self.0.get_product(code))
    }
    async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        timed!("list_products", self.0.list_products(after, limit))
    }
    async fn update_product(
        &self,
        code: &ProductCode,
        update: ProductUpdate,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        timed!("update_product", self.0.update_product(code, update, now))
    }
    async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        timed!("issue_license", self.0.issue_license(cmd, actor, now))
    }
    async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        timed!("get_license", self.0.get_license(key))
    }
    async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>> {
        timed!("list_licenses", self.0.list_licenses(filter, after, limit))
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
        timed!(
            "change_status",
            self.0
                .change_status(key, action, reason, request_id, actor, now)
        )
    }
    async fn list_events(
        &self,
        key: &LicenseKey,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LicenseEvent>> {
        timed!("list_events", self.0.list_events(key, after, limit))
    }
    async fn list_feed(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<FeedPage> {
        timed!("list_feed", self.0.list_feed(after, filter, limit))
    }
    fn watch_feed(&self, after: i64, filter: EventFilter) -> FeedWatch {
        self.0.watch_feed(after, filter)
    }
    async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)> {
        timed!(
            "issue_renewal_code",
            self.0.issue_renewal_code(cmd, actor, now)
        )
    }
    async fn get_renewal_code(&self, code: &RenewalCode) -> StoreResult<RenewalCodeRecord> {
        timed!("get_renewal_code", self.0.get_renewal_code(code))
    }
    async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord> {
        timed!(
            "void_renewal_code",
            self.0
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
        timed!(
            "activate",
            self.0
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
        timed!(
            "deactivate",
            self.0.deactivate(key, fingerprint, actor, now)
        )
    }
    async fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>> {
        self.0.validation_view(key, fingerprint).await
    }
    async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        timed!("redeem", self.0.redeem(cmd, actor, now))
    }
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        timed!("create_token", self.0.create_token(name, role, token, now))
    }
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        timed!("list_tokens", self.0.list_tokens())
    }
    async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        timed!("revoke_token", self.0.revoke_token(name, now))
    }
    async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        timed!("find_token", self.0.find_token(id))
    }
    async fn ping(&self) -> StoreResult<()> {
        timed!("ping", self.0.ping())
    }
}
