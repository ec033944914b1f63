//! Keeps a [`ValidationCache`] in step with the database: a full load, then a
//! poll every refresh interval of the licenses that `license_events` says
//! changed, plus the licenses this replica marked, plus every product.
//!
//! Which events a poll must look at:
//! * **SQLite** has one writer at a time, and an event's id is allocated
//!   inside its write transaction, so ids become visible in increasing
//!   order: every event newer than the last one seen has a larger id.
//! * **PostgreSQL** allocates ids from a sequence: a transaction can take id
//!   100, commit after the one that took 101, and a reader that moved past
//!   101 would never see 100. So each event also records the id of the
//!   transaction that wrote it (`txid`, migration 0003). Every transaction
//!   older than a snapshot's `xmin` has finished, so a poll asks for the
//!   events of transactions from the previous poll's `xmin` on (events of
//!   earlier ones were visible to the previous poll) and skips the event
//!   ids it has applied already.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool};
use tokio_stream::StreamExt;

use super::loader::{
    BATCH, Grouper, Loader, licenses_in, load_sqlite, not_read, poll_sqlite, product_policy,
};
use super::validation_cache::{LicenseRow, Poll, ProductPolicy, ValidationCache};
use crate::store::rows::{LOAD_SQL, PRODUCTS_SQL, pg_xmin};
use crate::store::sqlite::fast::FastReader;
use crate::store::{StoreError, StoreResult};

/// Events read per statement.
const EVENT_PAGE: i64 = 10_000;

/// Shortest pause between a change notification and the poll it asks for,
/// so that a flood of notifications costs at most one poll per pause.
const NUDGE_GAP: Duration = Duration::from_millis(20);

/// Where the feed is in the event log.
enum Cursor {
    /// The largest event id applied.
    Sqlite { last_id: i64 },
    /// The `xmin` of the last poll, and the events applied since (id -> txid).
    Postgres { xmin: i64, seen: HashMap<i64, i64> },
}

/// Where a feed reads the database.
pub(in crate::store) enum Source {
    /// SQLite: the load and every poll run on a blocking thread through
    /// rusqlite (the load about five times faster than through sqlx for a
    /// million rows, a poll without sqlx's hand-offs).
    Sqlite(Arc<FastReader>),
    /// PostgreSQL: through sqlx, on the store's readers.
    Postgres,
}

/// The task that feeds one cache.
pub(in crate::store) struct Feed {
    cache: Weak<ValidationCache>,
    /// The store's readers: PostgreSQL reads through them; on both
    /// backends, their closing ends the feed.
    readers: AnyPool,
    source: Source,
    refresh: Duration,
}

impl Feed {
    pub(in crate::store) fn new(
        cache: &Arc<ValidationCache>,
        readers: AnyPool,
        source: Source,
        refresh: Duration,
    ) -> Self {
        Feed {
            cache: Arc::downgrade(cache),
            readers,
            source,
            refresh,
        }
    }

    /// Loads, then polls until the store is closed or dropped.
    pub(in crate::store) async fn run(self) {
        let mut cursor = loop {
            let Some(cache) = self.cache.upgrade() else {
                return;
            };
            let started = Instant::now();
            match self.load(&cache).await {
                Ok(cursor) => {
                    cache.finish_load();
                    tracing::info!(
                        licenses = cache.stats().licenses,
                        seconds = started.elapsed().as_secs_f64(),
                        "validation cache loaded"
                    );
                    break cursor;
                }
                Err(e) if self.readers.is_closed() => {
                    tracing::debug!(error = %e, "validation cache: store closed while loading");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "validation cache: load failed; Validate reads the database; retrying");
                    drop(cache);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let Some(nudges) = self.cache.upgrade().map(|c| c.nudges()) else {
            return;
        };
        loop {
            // A tick, or sooner when a change notification asks for it (at
            // most one poll per NUDGE_GAP then, however many arrive).
            tokio::select! {
                _ = tick.tick() => {}
                _ = nudges.notified() => {
                    tokio::time::sleep(NUDGE_GAP).await;
                    tick.reset();
                }
            }
            let Some(cache) = self.cache.upgrade() else {
                return;
            };
            if self.readers.is_closed() {
                return;
            }
            match self.poll(&cache, &mut cursor).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("validation cache: polling again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "validation cache: poll failed; Validate reads the database until a poll succeeds");
                }
                Err(_) => {}
            }
        }
    }

    /// The full load: every product and license, as of one snapshot taken
    /// after the returned cursor's position.
    async fn load(&self, cache: &Arc<ValidationCache>) -> StoreResult<Cursor> {
        match &self.source {
            Source::Sqlite(fast) => {
                let (fast, cache, readers) = (fast.clone(), cache.clone(), self.readers.clone());
                tokio::task::spawn_blocking(move || {
                    let poll = cache.begin_poll();
                    let last_id = load_sqlite(&fast, &cache, &poll, &|| readers.is_closed())?;
                    cache.finish_poll(&poll);
                    Ok(Cursor::Sqlite { last_id })
                })
                .await
                .map_err(|e| StoreError::Internal(format!("cache load: {e}")))?
            }
            Source::Postgres => self.load_postgres(cache).await,
        }
    }

    /// PostgreSQL's load, through sqlx: `xmin` first, then one snapshot.
    async fn load_postgres(&self, cache: &ValidationCache) -> StoreResult<Cursor> {
        let poll = cache.begin_poll();
        let mut conn = self.readers.acquire().await?;
        let cursor = Cursor::Postgres {
            xmin: pg_xmin(&mut conn).await?,
            seen: HashMap::new(),
        };
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *conn)
            .await?;
        let result = async {
            cache.apply_products(&poll, read_products(&mut conn).await?);
            let mut rows = sqlx::query(LOAD_SQL).fetch(&mut *conn);
            let cancelled = || self.readers.is_closed();
            let mut loader = Loader::new(cache, &poll, &cancelled);
            while let Some(row) = rows.next().await.transpose()? {
                loader.push(&row)?;
            }
            loader.finish();
            Ok::<_, StoreError>(())
        }
        .await;
        let end = sqlx::query("COMMIT").execute(&mut *conn).await;
        result?;
        end?;
        cache.finish_poll(&poll);
        Ok(cursor)
    }

    /// One poll: re-read what changed, apply it, move the cursor.
    async fn poll(&self, cache: &ValidationCache, cursor: &mut Cursor) -> StoreResult<()> {
        let poll = cache.begin_poll();
        match (&self.source, &*cursor) {
            (Source::Sqlite(fast), Cursor::Sqlite { last_id }) => {
                // One snapshot through rusqlite, on a blocking thread.
                let (fast, last_id, pending) = (fast.clone(), *last_id, poll.pending.clone());
                let read =
                    tokio::task::spawn_blocking(move || poll_sqlite(&fast, last_id, &pending))
                        .await
                        .map_err(|e| StoreError::Internal(format!("poll task: {e}")))??;
                apply_poll(cache, &poll, read.products, &read.rows);
                *cursor = Cursor::Sqlite {
                    last_id: read.last_id,
                };
                Ok(())
            }
            (Source::Postgres, Cursor::Postgres { xmin, seen }) => {
                let (products, rows, next) = self.read_postgres(&poll, *xmin, seen).await?;
                apply_poll(cache, &poll, products, &rows);
                *cursor = next;
                Ok(())
            }
            _ => Err(StoreError::Internal(
                "validation cache: a cursor of the other backend".into(),
            )),
        }
    }

    /// PostgreSQL's poll: the licenses named by the events of transactions
    /// from `xmin` on that it has not `seen`, and the pending keys, read
    /// after those events (a page of events at a time: a poll after a long
    /// outage may find many); then every product.
    async fn read_postgres(
        &self,
        poll: &Poll,
        xmin: i64,
        seen: &HashMap<i64, i64>,
    ) -> StoreResult<(Vec<ProductPolicy>, Vec<LicenseRow>, Cursor)> {
        let mut conn = self.readers.acquire().await?;
        let mut licenses = std::collections::BTreeSet::new();
        let now_xmin = pg_xmin(&mut conn).await?;
        let mut seen = seen.clone();
        let mut after = i64::MIN;
        loop {
            let page: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT id, license_id, txid::text::bigint FROM license_events \
                 WHERE txid >= $1::bigint::text::xid8 AND id > $2 ORDER BY id LIMIT $3",
            )
            .bind(xmin)
            .bind(after)
            .bind(EVENT_PAGE)
            .fetch_all(&mut *conn)
            .await?;
            after = page.last().map_or(after, |e| e.0);
            for &(id, license, txid) in &page {
                if seen.insert(id, txid).is_none() {
                    licenses.insert(license);
                }
            }
            if page.len() < EVENT_PAGE as usize {
                break;
            }
        }
        // Later polls ask from `now_xmin` on: forget what they cannot return.
        seen.retain(|_, txid| *txid >= now_xmin);
        let next = Cursor::Postgres {
            xmin: now_xmin,
            seen,
        };
        let licenses: Vec<i64> = licenses.into_iter().collect();
        let mut rows = Vec::new();
        for ids in licenses.chunks(BATCH) {
            rows.extend(
                read_licenses(&mut conn, "l.id", ids.iter().map(|id| Bind::Int(*id))).await?,
            );
        }
        // The pending keys not read already: a local write marks its key
        // and records an event, and what was read by id was read after the
        // poll began, so after that write committed (each license once).
        let mut more = Vec::new();
        for keys in not_read(&poll.pending, &rows).chunks(BATCH) {
            more.extend(
                read_licenses(
                    &mut conn,
                    "l.license_key",
                    keys.iter().map(|k| Bind::Text(k)),
                )
                .await?,
            );
        }
        rows.extend(more);
        // Products after licenses: every product a license row names is in.
        let products = read_products(&mut conn).await?;
        Ok((products, rows, next))
    }
}

/// Applies what a poll read and ends it: the pending keys it did not find
/// are no longer in the database.
fn apply_poll(
    cache: &ValidationCache,
    poll: &Poll,
    products: Vec<ProductPolicy>,
    rows: &[LicenseRow],
) {
    cache.apply_products(poll, products);
    cache.apply(poll, rows);
    let missing: Vec<String> = not_read(&poll.pending, rows).into_iter().cloned().collect();
    cache.drop_pending_missing(poll, &missing);
    cache.finish_poll(poll);
}

enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

/// The licenses whose `column` is one of `values`, with their activations
/// (PostgreSQL).
async fn read_licenses<'a>(
    conn: &mut AnyConnection,
    column: &str,
    values: impl ExactSizeIterator<Item = Bind<'a>>,
) -> StoreResult<Vec<LicenseRow>> {
    let n = values.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let sql = licenses_in(column, n);
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for v in values {
        query = match v {
            Bind::Int(i) => query.bind(i),
            Bind::Text(s) => query.bind(s.to_string()),
        };
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut group = Grouper::default();
    let mut out = Vec::new();
    for row in &rows {
        out.extend(group.push(row)?);
    }
    out.extend(group.finish());
    Ok(out)
}

async fn read_products(conn: &mut AnyConnection) -> StoreResult<Vec<ProductPolicy>> {
    let rows = sqlx::query(PRODUCTS_SQL).fetch_all(&mut *conn).await?;
    rows.iter().map(product_policy).collect()
}
