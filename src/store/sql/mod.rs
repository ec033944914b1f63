//! The SQL store: every rule transaction written once, for SQLite and
//! PostgreSQL alike.
//!
//! Each write is a [`conn::Command`] run through a [`conn::Conn`]: the
//! queries use `$N` placeholders and SQL both dialects accept. What differs
//! lives in a [`Dialect`] and in the backend modules (connecting,
//! migrations, the SQLite writer, pool sizing):
//!
//! * **SQLite** allows one writer at a time. Every write goes through one
//!   writer thread's connection (`super::sqlite::writer`), which runs the
//!   writes queued meanwhile in one `BEGIN IMMEDIATE` transaction (a write
//!   that fails after writing is undone alone: the batch runs again with a
//!   savepoint per write), and commits them together. Reads use separate read-only
//!   connections (WAL mode).
//! * **PostgreSQL** serves many replicas at once. A write transaction locks
//!   the rows its decision depends on (`SELECT … FOR UPDATE`: the license,
//!   then the renewal code), so concurrent activations of one license queue
//!   behind each other and the seat count is exact; a request's idempotency
//!   key is claimed first (a second replica with the same key waits on the
//!   key's unique index); deadlocks and serialisation failures are retried.
//!
//! Whatever the backend, the schema's constraints are the last line of
//! defence: `seats_used <= seats`, one activation per (license, fingerprint),
//! one `renewed` event per code, a code's state moves only once.

mod catalog;
pub(super) mod conn;
mod idempotency;
mod licenses;
mod load;
mod renewal;
mod seats;
pub mod signing_keys;
mod tx;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::AnyPool;

use self::conn::{Command, Conn, Ending, args, fetch_one};
use super::cache::validation_cache::ValidationCache;
use super::change_notify::Changes;
use super::event_feed::{EventFeed, EventFilter, FeedPage, FeedWatch};
use super::rows::{Columns, Dialect};
use super::{
    Actor, IssueLicense, IssueRenewalCode, LicenseCursor, LicenseEvent, LicenseFilter,
    ProductUpdate, Redeem, Store, StoreResult, TokenRecord, ValidationView,
};
use crate::domain::auth::{Role, Token};

use crate::domain::rules::StatusAction;
use crate::domain::{
    Activation, License, LicenseKey, Product, ProductCode, RenewalCode, RenewalCodeRecord,
};

/// A store over SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    /// Where the rules' writes run.
    writer: Writer,
    pub(super) readers: AnyPool,
    code_secret: Vec<u8>,
    dialect: Dialect,
    /// SQLite only: Validate's lookups without sqlx's per-query overhead.
    fast_reads: Option<std::sync::Arc<super::sqlite::fast::FastReader>>,
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

/// Where a backend's writes run: both run the same [`conn::Command`]s.
#[derive(Clone)]
pub(in crate::store) enum Writer {
    /// SQLite: one thread commits the writes in groups.
    Sqlite(Arc<super::sqlite::writer::GroupWriter>),
    /// PostgreSQL: a pool of connections that pipeline.
    Postgres(Arc<super::postgres::writer::PgWriter>),
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

impl SqlStore {
    /// A store over the writer and the read pool the backend module opened
    /// (on a migrated database).
    pub(super) async fn new(
        writer: Writer,
        readers: AnyPool,
        dialect: Dialect,
    ) -> StoreResult<Self> {
        let feed = EventFeed::start(readers.clone(), dialect);
        let mut store = SqlStore {
            feed,
            writer,
            readers,
            code_secret: Vec::new(),
            dialect,
            fast_reads: None,
            cache: None,
            changes: None,
            cache_hits: metrics::Counter::noop(),
            cache_fallbacks: metrics::Counter::noop(),
        };
        store.code_secret = store.write(None, CodeSecret::fresh()).await?;
        Ok(store)
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
        let source = match (&self.fast_reads, self.dialect) {
            (Some(fast), _) => super::cache::Source::Sqlite(fast.clone()),
            (None, Dialect::Postgres) => super::cache::Source::Postgres,
            // Every SQLite store opens with its fast reader (`sqlite::open`);
            // without one Validate would still answer, from the database.
            (None, Dialect::Sqlite) => {
                tracing::error!("validation cache off: this SQLite store has no fast reader");
                return self;
            }
        };
        let feed = super::cache::Feed::new(&cache, self.readers.clone(), source, refresh);
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
        let writer = match &self.writer {
            // SQLite: the writer thread's one connection.
            Writer::Sqlite(native) => PoolStats {
                name: "writer",
                size: 1,
                idle: usize::from(!native.busy()),
                max: 1,
            },
            Writer::Postgres(pool) => {
                let (size, idle, max) = pool.stats();
                PoolStats {
                    name: "writer",
                    size,
                    idle,
                    max,
                }
            }
        };
        [writer, stats("readers", &self.readers)]
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

    /// Serves Validate's lookups through `reader` (SQLite).
    pub(super) fn with_fast_reads(mut self, reader: super::sqlite::fast::FastReader) -> Self {
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

    /// When a write reaches the disk, as the writer's connection says:
    /// SQLite `synchronous=full` (or `normal`, …), PostgreSQL
    /// `synchronous_commit=on` (or `off`, …).
    pub async fn durability(&self) -> StoreResult<String> {
        Ok(match self.dialect {
            Dialect::Sqlite => {
                // Asked of the connection the rule writes commit on.
                let level = self.write(None, ReadSynchronous).await?;
                let name = match level {
                    0 => "off",
                    1 => "normal",
                    2 => "full",
                    3 => "extra",
                    _ => "unknown",
                };
                format!("synchronous={name}")
            }
            Dialect::Postgres => {
                let on: String = sqlx::query_scalar("SHOW synchronous_commit")
                    .fetch_one(&self.readers)
                    .await?;
                format!("synchronous_commit={on}")
            }
        })
    }

    /// Closes the pools (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        self.feed.close();
        match &self.writer {
            Writer::Sqlite(native) => native.close().await,
            Writer::Postgres(pool) => pool.close(),
        }
        if let Some(changes) = &self.changes {
            changes.close().await;
        }
        self.readers.close().await;
    }
}

/// SQLite's `PRAGMA synchronous` of the connection it runs on.
struct ReadSynchronous;

impl conn::Command for ReadSynchronous {
    type Output = i64;

    async fn run<C: conn::Conn>(&self, conn: &mut C) -> StoreResult<conn::Ending<i64>> {
        let row = conn::fetch_one(conn, "PRAGMA synchronous", &[]).await?;
        Ok(conn::Ending::Commit(row.int(0)?))
    }
}

/// The secret renewal codes are derived from (see [`derive_renewal_code`]),
/// created once per database: this one, if the database has none yet.
struct CodeSecret([u8; 32]);

impl CodeSecret {
    fn fresh() -> Self {
        use rand::Rng;
        let mut fresh = [0u8; 32];
        rand::rng().fill_bytes(&mut fresh);
        CodeSecret(fresh)
    }
}

impl Command for CodeSecret {
    type Output = Vec<u8>;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Vec<u8>>> {
        conn.execute(
            "INSERT INTO settings (name, value) VALUES ('code_secret', $1) \
             ON CONFLICT (name) DO NOTHING",
            args![&self.0[..]],
        )
        .await?;
        let row = fetch_one(
            conn,
            "SELECT value FROM settings WHERE name = 'code_secret'",
            args![],
        )
        .await?;
        Ok(Ending::Commit(row.blob(0)?))
    }
}

/// Each call is answered in the file of its concern (`catalog`, `licenses`,
/// `renewal`, `seats`), by the inherent method of the same name, which Rust
/// picks before the trait's.
#[async_trait]
impl Store for SqlStore {
    async fn create_product(&self, product: &Product, now: DateTime<Utc>) -> StoreResult<Product> {
        self.create_product(product, now).await
    }

    async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        self.get_product(code).await
    }

    async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        self.list_products(after, limit).await
    }

    async fn update_product(
        &self,
        code: &ProductCode,
        update: ProductUpdate,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        self.update_product(code, update, now).await
    }

    async fn issue_license(
        &self,
        cmd: &IssueLicense,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        self.issue_license(cmd, actor, now).await
    }

    async fn get_license(&self, key: &LicenseKey) -> StoreResult<License> {
        self.get_license(key).await
    }

    async fn list_licenses(
        &self,
        filter: &LicenseFilter,
        after: Option<LicenseCursor>,
        limit: u32,
    ) -> StoreResult<Vec<(License, LicenseCursor)>> {
        self.list_licenses(filter, after, limit).await
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
        self.change_status(key, action, reason, request_id, actor, now)
            .await
    }

    async fn list_events(
        &self,
        key: &LicenseKey,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LicenseEvent>> {
        self.list_events(key, after, limit).await
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
        self.issue_renewal_code(cmd, _actor, now).await
    }

    async fn get_renewal_code(&self, code: &RenewalCode) -> StoreResult<RenewalCodeRecord> {
        self.get_renewal_code(code).await
    }

    async fn void_renewal_code(
        &self,
        code: &RenewalCode,
        reason: &str,
        request_id: Option<&str>,
        _actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<RenewalCodeRecord> {
        self.void_renewal_code(code, reason, request_id, _actor, now)
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
        self.activate(key, fingerprint, hostname, client_version, actor, now)
            .await
    }

    async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        self.deactivate(key, fingerprint, actor, now).await
    }

    async fn validation_view(
        &self,
        key: &LicenseKey,
        fingerprint: Option<&str>,
    ) -> StoreResult<Option<ValidationView>> {
        self.validation_view(key, fingerprint).await
    }

    async fn redeem(
        &self,
        cmd: &Redeem,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, DateTime<Utc>)> {
        self.redeem(cmd, actor, now).await
    }

    async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.create_token(name, role, token, now).await
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        self.list_tokens().await
    }

    async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        self.revoke_token(name, now).await
    }

    async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        self.find_token(id).await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}
