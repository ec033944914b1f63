//! The one scaffold every rule's write runs in: retried after a deadlock
//! or serialisation failure, begun on the writer, decided and written by
//! the rule's own code, committed, and then told to the validation cache and
//! the other replicas. Also the history every write appends to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::conn::{Arg, Command, Conn, Ending, Step};
use super::{SqlStore, Writer};
use crate::store::change_notify::{Change, Changes};
use crate::store::event_feed::EventFeed;
use crate::store::validation_cache::ValidationCache;
use crate::store::{Actor, StoreError, StoreResult, micros};

/// How many times a write is retried after a deadlock or serialisation failure.
const MAX_ATTEMPTS: u32 = 5;

/// This replica's side of a write that may have committed: the event feed
/// looks for new events (a refusal may have recorded one), and Validate
/// reads what `change` names (`None`: nothing the cache holds) from the
/// database until a poll has re-read it.
fn tell_local(feed: &EventFeed, cache: Option<&ValidationCache>, change: Option<&Change>) {
    feed.nudge();
    match (cache, change) {
        (Some(cache), Some(Change::License(key))) => cache.mark_changed(key),
        (Some(cache), Some(Change::Products)) => cache.mark_products_changed(),
        _ => {}
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
        tell_local(&self.feed, self.cache.as_deref(), Some(&change));
        if let Some(changes) = &self.changes {
            changes.announce_detached(change);
        }
    }
}

impl SqlStore {
    /// Runs a rule's write, `cmd`, in a transaction of its own and commits
    /// it: on SQLite through the group-commit writer
    /// ([`crate::store::sqlite::writer`]), on PostgreSQL on a pooled
    /// connection ([`crate::store::postgres::writer::PgWriter`]), again after a
    /// deadlock or serialisation failure. When the
    /// write may change what the validation cache or the other replicas hold
    /// (`change`; `None` for renewal codes, which neither holds), they are
    /// told once the write has an outcome, or when its caller goes away
    /// before that (see [`cancel_guard`](Self::cancel_guard)).
    pub(super) async fn write<K: Command>(
        &self,
        change: Option<Change>,
        cmd: K,
    ) -> StoreResult<K::Output> {
        let pg = match &self.writer {
            Writer::Postgres(pg) => pg,
            Writer::Sqlite(writer) => {
                // The writer tells this replica's cache and feed itself, right
                // after the commit (whether or not its caller is still there);
                // SQLite has no other replicas.
                let feed = self.feed.clone();
                let cache = self.cache.clone();
                let committed = move |refused: bool| {
                    let change = if refused { None } else { change.as_ref() };
                    tell_local(&feed, cache.as_deref(), change);
                };
                return writer.run(cmd, Box::new(committed)).await;
            }
        };
        let guard = change.clone().map(|change| self.cancel_guard(change));
        let cmd = &cmd;
        let result = self.retrying(move || pg.run(cmd)).await;
        if let Some(guard) = guard {
            guard.disarm();
        }
        if let Some(change) = change {
            self.announce(change, &result).await;
        }
        result
    }

    /// After a write with this `result` (any outcome but a refusal may have
    /// committed `change`), before its caller hears back: this replica's
    /// Validate reads the change from the database until a poll re-reads
    /// it, and every other replica is told.
    async fn announce<T>(&self, change: Change, result: &StoreResult<T>) {
        let refused = matches!(result, Err(StoreError::Refused(_)));
        tell_local(
            &self.feed,
            self.cache.as_deref(),
            (!refused).then_some(&change),
        );
        if refused {
            return;
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

/// One history event.
#[derive(Default)]
pub(super) struct NewEvent<'a> {
    pub event_type: &'a str,
    pub fingerprint: &'a str,
    pub old_expires_at: Option<DateTime<Utc>>,
    pub new_expires_at: Option<DateTime<Utc>>,
    pub renewal_code_id: Option<&'a str>,
    pub refusal_reason: &'a str,
    pub detail: &'a str,
}

/// Appends one history event.
const EVENT_INSERT: &str = "INSERT INTO license_events (license_id, type, at, actor, fingerprint, \
     old_expires_at, new_expires_at, renewal_code_id, refusal_reason, detail) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

pub(super) async fn record_event<C: Conn>(
    conn: &mut C,
    license_id: i64,
    actor: &Actor,
    now: DateTime<Utc>,
    e: NewEvent<'_>,
) -> StoreResult<()> {
    conn.execute(EVENT_INSERT, &event_args(license_id, actor, now, &e))
        .await?;
    Ok(())
}

/// `changes`, then the insert of an event with the arguments `event`
/// (from [`event_args`]).
pub(super) fn with_event<'s, 'a>(
    changes: &[Step<'s, 'a>],
    event: &'s [Arg<'a>],
) -> Vec<Step<'s, 'a>> {
    let mut steps = changes.to_vec();
    steps.push((EVENT_INSERT, event));
    steps
}

/// Runs `changes` and appends the event `e` that records them, as the
/// transaction's last statement (one round trip on PostgreSQL, COMMIT
/// sent with it: see [`Conn::finish_chain`]), ending the command with
/// `ending`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish_recorded<C: Conn, T: Send>(
    conn: &mut C,
    changes: &[Step<'_, '_>],
    license_id: i64,
    actor: &Actor,
    now: DateTime<Utc>,
    e: NewEvent<'_>,
    ending: Ending<T>,
) -> StoreResult<Ending<T>> {
    let event = event_args(license_id, actor, now, &e);
    conn.finish_chain(&with_event(changes, &event), ending)
        .await
}

/// Runs `insert` (a new license, `RETURNING id`) and appends the event `e`
/// that records it, as the transaction's last statement, ending the
/// command with `ending` (see [`Conn::finish_chain`]).
pub(super) async fn finish_inserted<C: Conn, T: Send>(
    conn: &mut C,
    insert: Step<'_, '_>,
    actor: &Actor,
    now: DateTime<Utc>,
    e: NewEvent<'_>,
    ending: Ending<T>,
) -> StoreResult<Ending<T>> {
    // The event's license id (its `$1`) is the one the insert returns.
    let event = event_args(0, actor, now, &e);
    conn.finish_insert(insert, (EVENT_INSERT, &event[1..]), ending)
        .await
}

/// The arguments of the insert of event `e` of license `license_id`.
pub(super) fn event_args<'a>(
    license_id: i64,
    actor: &'a Actor,
    now: DateTime<Utc>,
    e: &NewEvent<'a>,
) -> [Arg<'a>; 10] {
    [
        license_id.into(),
        e.event_type.into(),
        micros(now).into(),
        (&actor.0).into(),
        e.fingerprint.into(),
        e.old_expires_at.map(micros).into(),
        e.new_expires_at.map(micros).into(),
        e.renewal_code_id.into(),
        e.refusal_reason.into(),
        e.detail.into(),
    ]
}
