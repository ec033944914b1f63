//! The SQL store: every rule transaction written once, for SQLite and
//! PostgreSQL alike.
//!
//! The two backends share this code through sqlx's `Any` driver: the queries
//! use `$N` placeholders and SQL both dialects accept. What differs lives in a
//! [`Dialect`] and in the backend modules (connecting, migrations, pool
//! sizing):
//!
//! * **SQLite** allows one writer at a time. A deferred transaction that reads
//!   and then writes can fail with "database is locked" under concurrency
//!   whatever the busy timeout, so every write goes through one writer
//!   connection and opens with `BEGIN IMMEDIATE`, taking the write lock before
//!   it reads. Reads use a separate pool of read-only connections (WAL mode).
//! * **PostgreSQL** serves many replicas at once. A write transaction locks
//!   the rows its decision depends on (`SELECT … FOR UPDATE`: the license,
//!   then the renewal code), so concurrent activations of one license queue
//!   behind each other and the seat count is exact; idempotency keys are
//!   serialised with a transaction-scoped advisory lock; deadlocks and
//!   serialisation failures are retried.
//!
//! Whatever the backend, the schema's constraints are the last line of
//! defence: `seats_used <= seats`, one activation per (license, fingerprint),
//! one `renewed` event per code, a code's state moves only once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::{AnyConnection, AnyPool};

use super::cache::validation_cache::{Answer, ValidationCache};
use super::change_notify::{Change, Changes};
use super::event_feed::{EventFeed, EventFilter, FeedPage, FeedWatch};
use super::rows::{
    Columns, Dialect, LICENSE_WITH_ACTIVATIONS, VALIDATION_SQL, code_from_row, code_select, col,
    corrupt, license_from, license_from_row, license_select, product_from_row, terms_to_text,
    token_from_row, validation_from_row,
};
use super::{
    Actor, IssueLicense, IssueRenewalCode, LicenseCursor, LicenseEvent, LicenseFilter, Redeem,
    Store, StoreError, StoreResult, TokenRecord, ValidationView, code_hash, derive_renewal_code,
    from_micros, micros, new_code_id,
};
use crate::domain::auth::{Role, Token};
use crate::domain::error::RefusalClass;
use crate::domain::product::ProductSpec;
use crate::domain::rules::{self, ActivateDecision, StatusAction};
use crate::domain::{
    Activation, License, LicenseKey, Product, ProductCode, Refusal, RenewalCode, RenewalCodeRecord,
};

/// How many times a write is retried after a deadlock or serialisation failure.
const MAX_ATTEMPTS: u32 = 5;

/// A store over SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    pub(super) writer: AnyPool,
    pub(super) readers: AnyPool,
    code_secret: Vec<u8>,
    dialect: Dialect,
    /// SQLite only: Validate's lookups without sqlx's per-query overhead.
    fast_reads: Option<std::sync::Arc<super::sqlite_fast::FastReader>>,
    /// Validate's answers from memory, if switched on.
    cache: Option<Arc<ValidationCache>>,
    /// PostgreSQL: change notifications to and from the other replicas.
    changes: Option<Arc<Changes>>,
    /// The event feed.
    feed: Arc<EventFeed>,
    /// Validate answered from memory, and left to the database (metric
    /// handles, registered with the cache).
    cache_hits: metrics::Counter,
    cache_fallbacks: metrics::Counter,
}

/// One pool's size (metrics).
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    /// `writer` or `readers`.
    pub name: &'static str,
    /// Open connections.
    pub size: u32,
    /// Idle connections.
    pub idle: usize,
    /// Limit.
    pub max: u32,
}

/// Validate reads what `change` names from the database until a poll has
/// re-read it.
fn mark(cache: &ValidationCache, change: &Change) {
    match change {
        Change::License(key) => cache.mark_changed(key),
        Change::Products => cache.mark_products_changed(),
    }
}

/// See [`SqlStore::cancel_guard`].
struct CancelGuard {
    feed: Arc<EventFeed>,
    cache: Option<Arc<ValidationCache>>,
    changes: Option<Arc<Changes>>,
    change: Option<Change>,
}

impl CancelGuard {
    fn disarm(mut self) {
        self.change = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Some(change) = self.change.take() else {
            return;
        };
        self.feed.nudge();
        if let Some(cache) = &self.cache {
            mark(cache, &change);
        }
        if let Some(changes) = &self.changes {
            changes.announce_detached(change);
        }
    }
}

impl SqlStore {
    /// A store over pools the backend module opened and migrated.
    pub(super) async fn new(
        writer: AnyPool,
        readers: AnyPool,
        dialect: Dialect,
    ) -> StoreResult<Self> {
        let code_secret = load_or_create_secret(&writer).await?;
        let feed = EventFeed::start(readers.clone(), dialect);
        Ok(SqlStore {
            feed,
            writer,
            readers,
            code_secret,
            dialect,
            fast_reads: None,
            cache: None,
            changes: None,
            cache_hits: metrics::Counter::noop(),
            cache_fallbacks: metrics::Counter::noop(),
        })
    }

    /// Announces every committed change to the other replicas, and (with a
    /// cache) hears theirs (see [`super::change_notify`]).
    pub(super) fn with_changes(mut self, changes: Arc<Changes>) -> Self {
        changes.wake_on_change(self.feed.waker());
        self.changes = Some(changes);
        self
    }

    /// Answers Validate from a [`ValidationCache`] of every license, loaded
    /// in the background, refreshed every `refresh`, and answering only
    /// within `max_staleness` of its last poll (see
    /// [`super::cache::validation_cache`]). Must be called inside a Tokio runtime.
    pub fn with_validation_cache(mut self, refresh: Duration, max_staleness: Duration) -> Self {
        let cache = Arc::new(ValidationCache::with_max_staleness(max_staleness));
        let feed = super::cache::Feed::new(
            &cache,
            self.readers.clone(),
            self.dialect,
            refresh,
            self.fast_reads.clone(),
        );
        if let Some(changes) = &self.changes {
            changes.attach_cache(&cache);
        }
        tokio::spawn(feed.run());
        self.cache = Some(cache);
        self.cache_hits = metrics::counter!("licensd_validation_cache_hits_total");
        self.cache_fallbacks = metrics::counter!("licensd_validation_cache_fallbacks_total");
        self
    }

    /// The validation cache, if switched on.
    pub fn validation_cache(&self) -> Option<&Arc<ValidationCache>> {
        self.cache.as_ref()
    }

    /// Both pools' sizes (metrics).
    pub fn pool_stats(&self) -> [PoolStats; 2] {
        let stats = |name, pool: &AnyPool| PoolStats {
            name,
            size: pool.size(),
            idle: pool.num_idle(),
            max: pool.options().get_max_connections(),
        };
        [
            stats("writer", &self.writer),
            stats("readers", &self.readers),
        ]
    }

    /// PostgreSQL: how many other replicas a write waits for now.
    pub fn replicas_listening(&self) -> Option<usize> {
        self.changes.as_ref().map(|c| c.peers_listening())
    }

    /// PostgreSQL: the `application_name` of this replica's connection
    /// listening for the others' changes.
    pub fn change_listener_name(&self) -> Option<String> {
        self.changes.as_ref().map(|c| c.listener_name())
    }

    /// After a write with this `result` (any outcome but a refusal may have
    /// committed `change`), before its caller hears back: this replica's
    /// Validate reads the change from the database until a poll re-reads
    /// it, and every other replica is told.
    async fn announce<T>(&self, change: Change, result: &StoreResult<T>) {
        // Some refusals record an event too (renewal_refused).
        self.feed.nudge();
        if matches!(result, Err(StoreError::Refused(_))) {
            return;
        }
        if let Some(cache) = &self.cache {
            mark(cache, &change);
        }
        if let Some(changes) = &self.changes {
            changes.announce(change).await;
        }
    }

    /// Armed before a write of `change`: if the write's future is dropped
    /// before it could announce (its caller's deadline passed, the client
    /// went away), perhaps after its commit, the change is marked and
    /// announced anyway when the guard drops. Disarmed once the write has
    /// an outcome; [`announce`](Self::announce) then does it.
    fn cancel_guard(&self, change: Change) -> CancelGuard {
        CancelGuard {
            feed: self.feed.clone(),
            cache: self.cache.clone(),
            changes: self.changes.clone(),
            change: Some(change),
        }
    }

    /// After a write to the license `key`.
    async fn touched<T>(&self, key: &LicenseKey, result: &StoreResult<T>) {
        self.announce(Change::License(key.clone()), result).await;
    }

    /// After a product write.
    async fn touched_products<T>(&self, result: &StoreResult<T>) {
        self.announce(Change::Products, result).await;
    }

    /// Serves Validate's lookups through `reader` (SQLite).
    pub(super) fn with_fast_reads(mut self, reader: super::sqlite_fast::FastReader) -> Self {
        self.fast_reads = Some(std::sync::Arc::new(reader));
        self
    }

    /// Which backend this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The event feed.
    pub fn event_feed(&self) -> &Arc<EventFeed> {
        &self.feed
    }

    /// Closes the pools (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        self.feed.close();
        if let Some(changes) = &self.changes {
            changes.close().await;
        }
        self.readers.close().await;
        self.writer.close().await;
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        let started = std::time::Instant::now();
        let tx = self.begin_write_untimed().await;
        metrics::histogram!("licensd_db_acquire_seconds").record(started.elapsed().as_secs_f64());
        tx
    }

    async fn begin_write_untimed(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        // Pooled connections are not pinged before use: one that died while
        // idle (the database restarted) fails its BEGIN. Nothing ran, so
        // BEGIN is tried on the next connection; every idle one may be dead,
        // so up to the pool's size, then one fresh connection.
        let mut left = self.writer.options().get_max_connections() + 1;
        loop {
            // Its own task: a caller dropped while BEGIN runs (a deadline, a
            // client gone) would otherwise return the connection to the pool
            // inside a transaction sqlx does not know about, and a later,
            // unrelated write on it would fail. Finished in the task, a
            // dropped transaction rolls back like any other.
            let begin = tokio::spawn({
                let writer = self.writer.clone();
                let statement = self.dialect.begin();
                async move { writer.begin_with(statement).await }
            })
            .await
            .map_err(|e| StoreError::Internal(format!("BEGIN task: {e}")))?;
            match begin {
                Err(e) if is_connection_lost(&e) && left > 1 => {
                    left -= 1;
                    tracing::debug!(error = %e, "a pooled connection was lost; trying another");
                }
                other => return Ok(other?),
            }
        }
    }

    /// Runs a write transaction, again after a deadlock or serialisation
    /// failure (PostgreSQL), with a short randomised pause.
    async fn retrying<T, F, Fut>(&self, attempt: F) -> StoreResult<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Err(StoreError::Retryable(e)) if n < MAX_ATTEMPTS => {
                    metrics::counter!("licensd_db_retries_total").increment(1);
                    tracing::debug!(attempt = n, error = %e, "retrying transaction");
                    let jitter = u64::from(rand::random::<u8>() % 20);
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(n) + jitter)).await;
                }
                Err(StoreError::Retryable(e)) => return Err(StoreError::Unavailable(e)),
                other => return other,
            }
        }
    }
}

/// The secret renewal codes are derived from (see [`derive_renewal_code`]),
/// created once per database.
async fn load_or_create_secret(pool: &AnyPool) -> StoreResult<Vec<u8>> {
    use rand::Rng;
    let mut fresh = [0u8; 32];
    rand::rng().fill_bytes(&mut fresh);
    sqlx::query("INSERT INTO settings (name, value) VALUES ('code_secret', $1) ON CONFLICT (name) DO NOTHING")
        .bind(&fresh[..])
        .execute(pool)
        .await?;
    let row = sqlx::query("SELECT value FROM settings WHERE name = 'code_secret'")
        .fetch_one(pool)
        .await?;
    Ok(row.try_get::<Vec<u8>, _>(0)?)
}

// ---------------------------------------------------------------------------
// Queries shared by several operations (generic over pool or transaction)
// ---------------------------------------------------------------------------

/// Whether a read inside a write transaction locks the rows it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    /// A plain read.
    No,
    /// Lock for the rest of the transaction: `FOR UPDATE` on PostgreSQL;
    /// SQLite's writer already holds the database lock.
    ForUpdate(Dialect),
}

impl Lock {
    fn rows(self) -> bool {
        self == Lock::ForUpdate(Dialect::Postgres)
    }
}

async fn load_license(
    conn: &mut AnyConnection,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<Option<(i64, License)>> {
    if lock.rows() {
        // Lock first, then read in a second statement: under READ COMMITTED
        // a statement that waited for the lock re-reads the locked row but
        // not the rows it joined, so one statement could pair a fresh
        // seats_used with a stale list of activations.
        let locked = sqlx::query("SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE")
            .bind(key.normalized())
            .fetch_optional(&mut *conn)
            .await?;
        if locked.is_none() {
            return Ok(None);
        }
    }
    let rows = sqlx::query(LICENSE_WITH_ACTIVATIONS)
        .bind(key.normalized())
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let (id, mut license) = license_from_row(first)?;
    for row in &rows {
        if let Some(fingerprint) = row.opt_text(col::EXTRA)? {
            license.activations.push(Activation {
                fingerprint,
                hostname: row.opt_text(col::EXTRA + 1)?.unwrap_or_default(),
                activated_at: from_micros(row.int(col::EXTRA + 2)?)?,
            });
        }
    }
    Ok(Some((id, license)))
}

async fn require_license(
    conn: &mut AnyConnection,
    key: &LicenseKey,
    lock: Lock,
) -> StoreResult<(i64, License)> {
    load_license(conn, key, lock)
        .await?
        .ok_or(StoreError::Refused(Refusal::LicenseNotFound))
}

async fn require_product(
    conn: &mut AnyConnection,
    code: &ProductCode,
    lock: Lock,
) -> StoreResult<Product> {
    let sql = if lock.rows() {
        "SELECT * FROM products WHERE code = $1 FOR UPDATE"
    } else {
        "SELECT * FROM products WHERE code = $1"
    };
    let row = sqlx::query(sql)
        .bind(code.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => product_from_row(&row),
        None => Err(Refusal::ProductNotFound(code.to_string()).into()),
    }
}

async fn load_code_by_hash(
    conn: &mut AnyConnection,
    hash: &[u8],
    lock: Lock,
) -> StoreResult<Option<RenewalCodeRecord>> {
    let sql = if lock.rows() {
        concat!(code_select!(), "WHERE c.code_hash = $1 FOR UPDATE OF c")
    } else {
        concat!(code_select!(), "WHERE c.code_hash = $1")
    };
    let row = sqlx::query(sql)
        .bind(hash)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(code_from_row).transpose()
}

async fn load_code_by_id(conn: &mut AnyConnection, id: &str) -> StoreResult<RenewalCodeRecord> {
    let row = sqlx::query(concat!(code_select!(), "WHERE c.id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    code_from_row(&row)
}

/// Reads the license as the transaction leaves it (its row is already
/// locked), then commits: the answer shows exactly what was written.
async fn commit_with_license(
    mut tx: sqlx::Transaction<'static, sqlx::Any>,
    key: &LicenseKey,
) -> StoreResult<License> {
    let license = require_license(&mut tx, key, Lock::No).await?.1;
    tx.commit().await?;
    Ok(license)
}

/// One history event.
#[derive(Default)]
struct NewEvent<'a> {
    event_type: &'a str,
    fingerprint: &'a str,
    old_expires_at: Option<DateTime<Utc>>,
    new_expires_at: Option<DateTime<Utc>>,
    renewal_code_id: Option<&'a str>,
    refusal_reason: &'a str,
    detail: &'a str,
}

async fn record_event(
    conn: &mut AnyConnection,
    license_id: i64,
    actor: &Actor,
    now: DateTime<Utc>,
    e: NewEvent<'_>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO license_events (license_id, type, at, actor, fingerprint, old_expires_at, new_expires_at, \
         renewal_code_id, refusal_reason, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(license_id)
    .bind(e.event_type)
    .bind(micros(now))
    .bind(&actor.0)
    .bind(e.fingerprint)
    .bind(e.old_expires_at.map(micros))
    .bind(e.new_expires_at.map(micros))
    .bind(e.renewal_code_id)
    .bind(e.refusal_reason)
    .bind(e.detail)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Outcome of looking up an idempotency key.
enum Idem {
    /// Unused: go ahead, then [`remember`].
    Fresh,
    /// Used before with the same payload: the resource it produced.
    Replay(String),
}

async fn check_idempotency(
    conn: &mut AnyConnection,
    dialect: Dialect,
    request_id: &str,
    operation: &str,
    payload_hash: &[u8],
) -> StoreResult<Idem> {
    if dialect == Dialect::Postgres {
        // Two replicas handling the same request id wait for each other here,
        // so the second one sees the first one's key (released at commit).
        sqlx::query(
            "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) AS locked",
        )
        .bind(request_id)
        .execute(&mut *conn)
        .await?;
    }
    let row = sqlx::query(
        "SELECT operation, payload_hash, resource FROM idempotency_keys WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok(Idem::Fresh),
        Some(row) => {
            let op: String = row.try_get("operation")?;
            let hash: Vec<u8> = row.try_get("payload_hash")?;
            if op == operation && hash == payload_hash {
                Ok(Idem::Replay(row.try_get("resource")?))
            } else {
                Err(Refusal::IdempotencyKeyReused.into())
            }
        }
    }
}

async fn remember(
    conn: &mut AnyConnection,
    request_id: &str,
    operation: &str,
    payload_hash: &[u8],
    resource: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO idempotency_keys (request_id, operation, payload_hash, resource, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(request_id)
    .bind(operation)
    .bind(payload_hash)
    .bind(resource)
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Whether `e` says the connection itself is gone: an I/O or protocol
/// error, or a PostgreSQL session that ended ([`super::session_ended`]).
fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| super::session_ended(&c)),
        _ => false,
    }
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

// ---------------------------------------------------------------------------
// The Store
// ---------------------------------------------------------------------------

#[async_trait]
impl Store for SqlStore {
    async fn create_product(&self, product: &Product, now: DateTime<Utc>) -> StoreResult<Product> {
        let guard = self.cancel_guard(Change::Products);
        let result = self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let res = sqlx::query(
                "INSERT INTO products (code, display_name, latest_version, personal_terms, business_terms, \
                 grace_period_months, renewal_basis, created_at, updated_at, offline_lease_days) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(product.code().as_str())
            .bind(product.display_name())
            .bind(product.latest_version().map(|v| v.to_string()).unwrap_or_default())
            .bind(terms_to_text(product.personal_terms()))
            .bind(terms_to_text(product.business_terms()))
            .bind(i64::from(product.grace_period_months()))
            .bind(product.renewal_basis().as_str())
            .bind(micros(now))
            .bind(micros(now))
            .bind(i64::from(product.offline_lease_days()))
            .execute(&mut *tx)
            .await;
            match res {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Refusal::ProductAlreadyExists(product.code().to_string()).into());
                }
                other => other?,
            };
            tx.commit().await?;
            Ok(product.clone())
        })
        .await;
        guard.disarm();
        self.touched_products(&result).await;
        result
    }

    async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        let mut conn = self.readers.acquire().await?;
        require_product(&mut conn, code, Lock::No).await
    }

    async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        let rows = sqlx::query("SELECT * FROM products WHERE code > $1 ORDER BY code LIMIT $2")
            .bind(after.map(|c| c.as_str()).unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(product_from_row).collect()
    }

    async fn update_product(
        &self,
        code: &ProductCode,
        update: &(dyn Fn(ProductSpec) -> ProductSpec + Send + Sync),
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        let guard = self.cancel_guard(Change::Products);
        let result = self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let current = require_product(&mut tx, code, Lock::ForUpdate(self.dialect)).await?;
            let updated =
                Product::new(code.clone(), update(current.to_spec())).map_err(Refusal::InvalidField)?;
            sqlx::query(
                "UPDATE products SET display_name = $1, latest_version = $2, personal_terms = $3, business_terms = $4, \
                 grace_period_months = $5, renewal_basis = $6, updated_at = $7, offline_lease_days = $9 WHERE code = $8",
            )
            .bind(updated.display_name())
            .bind(updated.latest_version().map(|v| v.to_string()).unwrap_or_default())
            .bind(terms_to_text(updated.personal_terms()))
            .bind(terms_to_text(updated.business_terms()))
            .bind(i64::from(updated.grace_period_months()))
            .bind(updated.renewal_basis().as_str())
            .bind(micros(now))
            .bind(code.as_str())
            .bind(i64::from(updated.offline_lease_days()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(updated)
        })
        .await;
        guard.disarm();
        self.touched_products(&result).await;
        result
    }

    async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let result = self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let hash = cmd.payload_hash();
            if let Idem::Replay(key) =
                check_idempotency(&mut tx, self.dialect, &cmd.request_id, "IssueLicense", &hash).await?
            {
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
            remember(
                &mut tx,
                &cmd.request_id,
                "IssueLicense",
                &hash,
                key.normalized(),
                now,
            )
            .await?;
            let license = commit_with_license(tx, &key).await?;
            Ok(license)
        })
        .await;
        if let Ok(license) = &result {
            self.touched(&license.key, &result).await;
        }
        result
    }

    async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        // The license row and its activations come from one snapshot, so
        // seats_used always matches the activations listed.
        let mut tx = self.readers.begin_with(self.dialect.begin_read()).await?;
        let license = require_license(&mut tx, key, Lock::No).await?.1;
        tx.commit().await?;
        Ok(license)
    }

    async fn list_licenses(
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

    async fn change_status(
        &self,
        key: &LicenseKey,
        action: StatusAction,
        reason: &str,
        request_id: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let guard = self.cancel_guard(Change::License(key.clone()));
        let result = self
            .retrying(move || async move {
                let mut tx = self.begin_write().await?;
                let op = action.event_type();
                let hash = super::digest_fields(&[op, key.normalized(), reason]);
                if let Some(rid) = request_id
                    && let Idem::Replay(_) =
                        check_idempotency(&mut tx, self.dialect, rid, op, &hash).await?
                {
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
                if let Some(rid) = request_id {
                    remember(&mut tx, rid, op, &hash, key.normalized(), now).await?;
                }
                let license = commit_with_license(tx, key).await?;
                Ok(license)
            })
            .await;
        guard.disarm();
        self.touched(key, &result).await;
        result
    }

    async fn list_events(
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
        super::event_feed::read_license_events(&mut conn, id, after.unwrap_or(0), limit).await
    }

    async fn list_feed(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<FeedPage> {
        self.feed.list(after, filter, limit).await
    }

    fn watch_feed(&self, after: i64, filter: EventFilter) -> FeedWatch {
        self.feed.watch(after, filter)
    }

    async fn issue_renewal_code(
        &self,
        cmd: &IssueRenewalCode,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(RenewalCodeRecord, RenewalCode)> {
        self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let hash = cmd.payload_hash();
            let code = derive_renewal_code(&self.code_secret, &cmd.request_id);
            if let Idem::Replay(id) =
                check_idempotency(&mut tx, self.dialect, &cmd.request_id, "IssueRenewalCode", &hash).await?
            {
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
            remember(
                &mut tx,
                &cmd.request_id,
                "IssueRenewalCode",
                &hash,
                &id,
                now,
            )
            .await?;
            let record = load_code_by_id(&mut tx, &id).await?;
            tx.commit().await?;
            Ok((record, code))
        })
        .await
    }

    async fn get_renewal_code(&self, code: &RenewalCode) -> StoreResult<RenewalCodeRecord> {
        let mut conn = self.readers.acquire().await?;
        load_code_by_hash(&mut conn, &code_hash(code), Lock::No)
            .await?
            .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))
    }

    async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord> {
        self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let code_hash = code_hash(code);
            let hash = super::digest_fields(&["VoidRenewalCode", &hex::encode(&code_hash), reason]);
            let record = load_code_by_hash(&mut tx, &code_hash, Lock::ForUpdate(self.dialect))
                .await?
                .ok_or(StoreError::Refused(Refusal::RenewalCodeNotFound))?;
            if let Some(rid) = request_id
                && let Idem::Replay(_) =
                    check_idempotency(&mut tx, self.dialect, rid, "VoidRenewalCode", &hash).await?
            {
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
            if let Some(rid) = request_id {
                remember(&mut tx, rid, "VoidRenewalCode", &hash, &record.id, now).await?;
            }
            let record = load_code_by_id(&mut tx, &record.id).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
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
        let guard = self.cancel_guard(Change::License(key.clone()));
        let result = self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
            let (id, license) = require_license(&mut tx, key, Lock::ForUpdate(self.dialect)).await?;
            match rules::activate(&license, fingerprint, now)? {
                ActivateDecision::AlreadyActivated => {
                    tx.commit().await?;
                    let activation = license
                        .activations
                        .iter()
                        .find(|a| a.fingerprint == fingerprint)
                        .cloned()
                        .expect("decided on this list");
                    Ok((license, activation))
                }
                ActivateDecision::TakeSeat => {
                    sqlx::query(
                        "INSERT INTO activations (license_id, fingerprint, hostname, client_version, activated_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(id)
                    .bind(fingerprint)
                    .bind(hostname)
                    .bind(client_version)
                    .bind(micros(now))
                    .execute(&mut *tx)
                    .await?;
                    record_event(
                        &mut tx,
                        id,
                        actor,
                        now,
                        NewEvent {
                            event_type: "activated",
                            fingerprint,
                            detail: hostname,
                            ..Default::default()
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    // The answer is the license as loaded plus this seat: the
                    // row was locked, and the trigger counts exactly this insert.
                    let activation = Activation {
                        fingerprint: fingerprint.to_string(),
                        hostname: hostname.to_string(),
                        activated_at: now,
                    };
                    let mut license = license;
                    license.seats_used += 1;
                    license.activations.push(activation.clone());
                    Ok((license, activation))
                }
            }
        })
        .await;
        guard.disarm();
        self.touched(key, &result).await;
        result
    }

    async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let guard = self.cancel_guard(Change::License(key.clone()));
        let result = self
            .retrying(move || async move {
                let mut tx = self.begin_write().await?;
                let (id, license) =
                    require_license(&mut tx, key, Lock::ForUpdate(self.dialect)).await?;
                rules::deactivate(&license, fingerprint)?;
                sqlx::query("DELETE FROM activations WHERE license_id = $1 AND fingerprint = $2")
                    .bind(id)
                    .bind(fingerprint)
                    .execute(&mut *tx)
                    .await?;
                record_event(
                    &mut tx,
                    id,
                    actor,
                    now,
                    NewEvent {
                        event_type: "deactivated",
                        fingerprint,
                        ..Default::default()
                    },
                )
                .await?;
                tx.commit().await?;
                // As loaded (the row was locked) minus this seat.
                let mut license = license;
                license.seats_used -= 1;
                license.activations.retain(|a| a.fingerprint != fingerprint);
                Ok(license)
            })
            .await;
        guard.disarm();
        self.touched(key, &result).await;
        result
    }

    async fn validation_view(
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
        super::metered::record("validation_lookup", started, &view);
        view
    }

    async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        let guard = self.cancel_guard(Change::License(cmd.license_key.clone()));
        let result = self.retrying(move || async move {
            let mut tx = self.begin_write().await?;
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
        .await;
        guard.disarm();
        self.touched(&cmd.license_key, &result).await;
        result
    }

    async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token.id())
        .bind(name)
        .bind(role.as_str())
        .bind(token.secret_hash())
        .bind(micros(now))
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => Err(Refusal::InvalidField(
                crate::domain::FieldViolation::new("name", "a live token already has this name"),
            )
            .into()),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(tx.commit().await?),
        }
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM api_tokens ORDER BY name, created_at",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(micros(now))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM api_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}
