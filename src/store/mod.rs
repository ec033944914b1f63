//! Persistence. [`Store`] is the one interface the gRPC layer uses; each
//! backend implements every write rule as **one transaction** that loads the
//! rows it needs, asks [`crate::domain::rules`] for a decision, writes it and
//! appends to the license's history.
//!
//! SQL lives only below this module.

pub mod bounded;
pub mod bulk;
mod cache;
pub mod change_notify;
mod error;
pub mod event_feed;
pub mod metered;
pub mod postgres;
mod rows;
pub mod sql;
pub mod sqlite;

pub use cache::validation_cache;
pub use error::{StoreError, sqlite_unavailable};
pub use event_feed::{EventFilter, FeedEnd, FeedItem, FeedPage, FeedWatch};
pub use rows::Dialect;
pub use sql::{PoolStats, SqlStore};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::domain::auth::{Role, Token};
use crate::domain::product::ProductSpec;
use crate::domain::rules::StatusAction;
use crate::domain::{
    Activation, Edition, License, LicenseKey, LicenseKind, Product, ProductCode, RenewalCode,
    RenewalCodeRecord, Standing, Version,
};
use std::sync::Arc;

/// How long a call waits for the database by default before it is answered
/// UNAVAILABLE (`--database-timeout-ms`; see [`bounded`]).
pub const DEFAULT_DATABASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the data lives, parsed from `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite file: `sqlite:PATH`, `sqlite://PATH` or a bare path.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database: `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a database URL; any other scheme is refused.
    pub fn parse(url: &str) -> Result<Self, String> {
        if postgres::is_postgres_url(url) {
            Ok(DatabaseUrl::Postgres(url.to_string()))
        } else if url.starts_with("sqlite:") || !url.contains("://") {
            Ok(DatabaseUrl::Sqlite(sqlite::sqlite_path(url)))
        } else {
            Err(format!(
                "unsupported database URL {url:?}: use sqlite:PATH or postgres://USER@HOST/DB"
            ))
        }
    }

    /// Opens the store (migrating the schema first).
    pub async fn open(&self, pg: postgres::PostgresOptions) -> StoreResult<SqlStore> {
        self.open_tuned(pg, sqlite::SqliteOptions::default()).await
    }

    /// Opens the store with the given tuning for whichever backend it is.
    pub async fn open_tuned(
        &self,
        pg: postgres::PostgresOptions,
        lite: sqlite::SqliteOptions,
    ) -> StoreResult<SqlStore> {
        match self {
            DatabaseUrl::Postgres(url) => postgres::open(url, pg).await,
            DatabaseUrl::Sqlite(path) => sqlite::open(path, lite).await,
        }
    }

    /// Applies the migrations, then returns.
    pub async fn migrate(&self) -> StoreResult<()> {
        match self {
            DatabaseUrl::Postgres(url) => postgres::migrate(url).await,
            DatabaseUrl::Sqlite(path) => sqlite::migrate(path).await,
        }
    }
}

/// How UpdateProduct changes a product's settings (applied to the current
/// ones inside the write's transaction).
pub type ProductUpdate = Arc<dyn Fn(ProductSpec) -> ProductSpec + Send + Sync>;

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Who performed an operation, recorded on every history event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// IssueLicense, parsed.
#[derive(Debug, Clone)]
pub struct IssueLicense {
    /// Idempotency key.
    pub request_id: String,
    /// Product.
    pub product: ProductCode,
    /// Edition.
    pub edition: Edition,
    /// Kind.
    pub kind: LicenseKind,
    /// Seats.
    pub seats: u32,
    /// Term in years.
    pub term_years: u32,
    /// Start; `None` is now.
    pub starts_at: Option<DateTime<Utc>>,
    /// Order reference.
    pub order_ref: String,
    /// Customer reference.
    pub customer_ref: String,
    /// Reseller.
    pub reseller: String,
}

/// IssueRenewalCode, parsed.
#[derive(Debug, Clone)]
pub struct IssueRenewalCode {
    /// Idempotency key.
    pub request_id: String,
    /// Product.
    pub product: ProductCode,
    /// Edition.
    pub edition: Edition,
    /// Seats.
    pub seats: u32,
    /// Years it adds.
    pub term_years: u32,
    /// Order reference.
    pub order_ref: String,
    /// Reseller.
    pub reseller: String,
}

/// RedeemRenewalCode, parsed.
#[derive(Debug, Clone)]
pub struct Redeem {
    /// License to renew.
    pub license_key: LicenseKey,
    /// Code to redeem.
    pub code: RenewalCode,
    /// Workstation entering the code.
    pub fingerprint: String,
    /// Its version.
    pub client_version: Version,
}

/// Filters of ListLicenses; all optional.
#[derive(Debug, Clone, Default)]
pub struct LicenseFilter {
    /// Product.
    pub product: Option<ProductCode>,
    /// Customer reference.
    pub customer_ref: Option<String>,
    /// Order reference.
    pub order_ref: Option<String>,
    /// `expires_at >= this`.
    pub expires_after: Option<DateTime<Utc>>,
    /// `expires_at < this`.
    pub expires_before: Option<DateTime<Utc>>,
}

/// A position in the license listing (ordered by expiry, then insertion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LicenseCursor {
    /// Expiry of the last license returned, in microseconds.
    pub expires_at_micros: i64,
    /// Its row id.
    pub id: i64,
}

/// One entry of a license's history.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseEvent {
    /// Sequence number.
    pub id: i64,
    /// `issued`, `activated`, … (see the proto).
    pub event_type: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: String,
    /// Workstation involved.
    pub fingerprint: String,
    /// Expiry before a renewal.
    pub old_expires_at: Option<DateTime<Utc>>,
    /// Expiry after a renewal.
    pub new_expires_at: Option<DateTime<Utc>>,
    /// Renewal code id.
    pub renewal_code_id: Option<String>,
    /// Refusal reason.
    pub refusal_reason: String,
    /// Free text.
    pub detail: String,
    /// The license's key.
    pub license_key: LicenseKey,
    /// The license's product.
    pub product: String,
}

/// What Validate needs about one license, whether read from the database or
/// from the validation cache.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationView {
    /// Status, kind, expiry and the product's grace period.
    pub standing: Standing,
    /// Edition.
    pub edition: Edition,
    /// Seats bought.
    pub seats: u32,
    /// Seats taken now.
    pub seats_used: u32,
    /// Whether the asked-for fingerprint is bound; `None` if none was asked.
    pub fingerprint_bound: Option<bool>,
    /// The product's latest version.
    pub latest_version: Option<Arc<Version>>,
    /// The product's offline certificate lifetime in days (0: none).
    pub offline_lease_days: u32,
}

impl ValidationView {
    /// What Validate would answer about `license` as a write just left it
    /// (its product's policy read in the same transaction).
    pub fn of_license(license: &License, fingerprint: Option<&str>) -> Self {
        ValidationView {
            standing: license.standing(),
            edition: license.edition,
            seats: license.seats,
            seats_used: license.seats_used,
            fingerprint_bound: fingerprint
                .map(|fp| license.activations.iter().any(|a| a.fingerprint == fp)),
            latest_version: license.latest_version.clone(),
            offline_lease_days: license.offline_lease_days,
        }
    }
}

/// An API token as stored (its secret only as a hash).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// Name, e.g. `billing-eu`; the actor of the history events it causes.
    pub name: String,
    /// Role.
    pub role: Role,
    /// SHA-256 of the secret.
    pub secret_hash: Vec<u8>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Revoked at.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The storage interface, one implementation per backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a product (PRODUCT_ALREADY_EXISTS if the code is taken).
    async fn create_product(&self, product: &Product, now: DateTime<Utc>) -> StoreResult<Product>;
    /// Reads a product.
    async fn get_product(&self, code: &ProductCode) -> StoreResult<Product>;
    /// Lists products ordered by code, after `after`.
    async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>>;
    /// Applies `update` to the product's current values and validates the
    /// result, in one transaction.
    async fn update_product(
        &self,
        code: &ProductCode,
        update: ProductUpdate,
        now: DateTime<Utc>,
    ) -> StoreResult<Product>;

    /// Issues a license (idempotent per request id).
    async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License>;
    /// Reads a license with its activations.
    async fn get_license(&self, key: &LicenseKey) -> StoreResult<License>;
    /// Lists licenses (without activations) after `after`.
    async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>>;
    /// Suspends, reinstates or revokes.
    async fn change_status(
        &self,
        key: &LicenseKey,
        action: StatusAction,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License>;
    /// Reads a license's history after event `after`.
    async fn list_events(
        &self,
        key: &LicenseKey,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LicenseEvent>>;
    /// A page of the event feed (every license's history in one order)
    /// after event `after`, up to the last event certainly final.
    async fn list_feed(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<FeedPage>;
    /// Follows the event feed after event `after`.
    fn watch_feed(&self, after: i64, filter: EventFilter) -> FeedWatch;

    /// Issues a renewal code; returns its record and the code itself (also on
    /// an idempotent retry).
    async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)>;
    /// Reads a renewal code's record.
    async fn get_renewal_code(&self, code: &RenewalCode) -> StoreResult<RenewalCodeRecord>;
    /// Voids an unredeemed code.
    async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord>;

    /// Binds a workstation (R2, R7, R11).
    async fn activate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        hostname: &str,
        client_version: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, Activation)>;
    /// Frees a workstation's seat.
    async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License>;
    /// Reads what Validate needs; `None` if no license has the key.
    async fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>>;
    /// Redeems a renewal code (R3–R11); returns the license and its previous expiry.
    async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)>;

    /// Stores a new API token (INVALID_FIELD `name` if a live token has it).
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Every token, live and revoked, by name.
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    /// Revokes the live token `name`; `false` if there is none.
    async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool>;
    /// The token with public id `id`, if any.
    async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>>;

    /// Whether the database answers (for the health service).
    async fn ping(&self) -> StoreResult<()>;
}

/// SHA-256 over length-prefixed fields, so that no two payloads collide by
/// moving text between fields.
pub fn digest_fields(fields: &[&str]) -> Vec<u8> {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f.as_bytes());
    }
    h.finalize().to_vec()
}

/// How a renewal code is stored: SHA-256 of its normalised form. A code has
/// 109 random bits, so a fast hash is not brute-forceable.
pub fn code_hash(code: &RenewalCode) -> Vec<u8> {
    Sha256::digest(code.expose_normalized().as_bytes()).to_vec()
}

/// Derives the renewal code of an IssueRenewalCode request from the
/// installation's secret and the request id.
///
/// Why derive rather than store: docs/rules.md §2 allows the full code to be shown
/// again on an idempotent retry, yet only its hash may be stored. Deriving the
/// code with HMAC-SHA256(secret, request_id) gives the same code on every
/// retry without any plaintext or reversible copy in the code table; without
/// the secret the stored hashes and request ids reveal nothing.
pub fn derive_renewal_code(secret: &[u8], request_id: &str) -> RenewalCode {
    let mut counter = 0u32;
    RenewalCode::generate_with(|buf: &mut [u8]| {
        for chunk in buf.chunks_mut(32) {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
                .expect("HMAC takes any key length");
            mac.update(b"licensd renewal code v1\0");
            mac.update(request_id.as_bytes());
            mac.update(&counter.to_be_bytes());
            counter += 1;
            let block = mac.finalize().into_bytes();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    })
}

/// A new public id for a renewal code: `RCID` and 12 random symbols.
pub fn new_code_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let alphabet = crate::domain::keys::ALPHABET;
    let mut id = String::from("RCID");
    while id.len() < 16 {
        let b = (rng.next_u32() & 0xff) as u8;
        if b < 248 {
            id.push(alphabet[usize::from(b % 31)] as char);
        }
    }
    id
}

/// Microseconds since the epoch, the stored form of an instant.
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// `t` as the database keeps it (to the microsecond): what a write
/// answers without reading back what it wrote.
pub fn stored(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros(t)).unwrap_or(t)
}

/// Inverse of [`micros`].
pub fn from_micros(us: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Internal(format!("bad timestamp {us}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_codes_are_stable_per_request_and_differ_across_requests_and_secrets() {
        let a = derive_renewal_code(b"secret-1", "order-1");
        assert_eq!(a, derive_renewal_code(b"secret-1", "order-1"));
        assert_ne!(a, derive_renewal_code(b"secret-1", "order-2"));
        assert_ne!(a, derive_renewal_code(b"secret-2", "order-1"));
        assert!(RenewalCode::parse(&a.expose_display()).is_ok());
    }

    #[test]
    fn payload_digest_separates_fields() {
        assert_ne!(digest_fields(&["ab", "c"]), digest_fields(&["a", "bc"]));
    }
}
