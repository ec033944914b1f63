//! The event feed (SPEC §7): every license's history in one global order,
//! resumable from any event, on any replica.
//!
//! **The order is the event id**, and an event is delivered only once no
//! event with a smaller id can still appear: the feed's *horizon*. Below
//! it, every id is final (committed or never will be), so a consumer that
//! resumes after id `n` misses nothing, and a license's events stay in the
//! order they happened (a write takes its event id while it holds the
//! license's row lock, so a later write on the license takes a larger one).
//!
//! * **SQLite** has one writer, and an id is allocated inside its write
//!   transaction: ids become visible in increasing order, and the horizon is
//!   the largest visible id.
//! * **PostgreSQL** takes ids from a sequence: a transaction can take id 99,
//!   commit after the one that took 100, and a reader that delivered 100
//!   would never deliver 99. Every transaction has its transaction id before
//!   it takes an event id (migration 0005). So a poll reads the sequence's
//!   last value `v`, then takes a transaction id `x` of its own (one
//!   statement, `licensd_event_bound()`): every transaction that took an id
//!   up to `v` has a transaction id below `x`. Once a later snapshot's
//!   `xmin` passes `x` (every transaction below `xmin` has finished; the
//!   validation cache's feed relies on the same bound), every id up to `v`
//!   is final. The feed keeps the pairs `(v, x + 1)` it has read until
//!   `xmin` passes them. A write holds the horizon back only while it is in
//!   flight: the horizon trails the newest commit by about one write's
//!   duration. (A snapshot's `xmax` is no bound here: a transaction that
//!   started after the last one to finish lies above it and is not listed
//!   as running.) Taking a transaction id costs a commit record per poll;
//!   polls run only while someone watches, at most one per [`MIN_GAP`].
//!
//! One task per store follows the horizon while anyone watches, woken by
//! this replica's writes and by the change notifications of the others,
//! reads each new stretch of events once, and broadcasts it. A watch first
//! reads from the database what it asked for up to the horizon, then takes
//! the broadcast stretches, filtering them in memory; one that missed a
//! stretch (it was too slow to keep up with the broadcast, or a read failed)
//! reads it from the database instead. A consumer that stops reading holds
//! at most its channel's worth of events: past its stall time ([`EventFeed::set_stall`])
//! without taking one, its watch ends ([`FeedEnd::TooSlow`]) and it resumes
//! from its cursor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool};
use tokio::sync::{Mutex, Notify, broadcast, mpsc, oneshot, watch};

use super::rows::{Dialect, EVENT_SELECT, event_from_row, pg_xmin};
use super::{LicenseEvent, StoreError, StoreResult};

/// Events read per statement.
const PAGE: usize = 500;

/// Stretches of events the broadcast keeps for watches that lag behind.
const BROADCAST_STRETCHES: usize = 64;

/// Events a watch holds for its consumer.
const WATCH_BUFFER: usize = 64;

/// Pairs `(v, bound)` kept at most (PostgreSQL); dropping one only delays
/// the horizon.
const MAX_PENDING: usize = 64;

/// A poll while nobody asks for one sooner.
const TICK: Duration = Duration::from_millis(250);

/// Shortest pause between two polls.
const MIN_GAP: Duration = Duration::from_millis(5);

/// A checkpoint is sent after this long without a message, when the
/// position moved past events the filters left out.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What a consumer asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this product's licenses.
    pub product: Option<String>,
    /// Only these types (empty: every type).
    pub types: Vec<String>,
}

impl EventFilter {
    /// Whether `event` passes.
    pub fn matches(&self, event: &LicenseEvent) -> bool {
        self.product.as_ref().is_none_or(|p| *p == event.product)
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }
}

/// A page of the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedPage {
    /// The events, in feed order.
    pub events: Vec<LicenseEvent>,
    /// Where the next page starts (after this id); past the last event when
    /// the page reached the horizon.
    pub next: i64,
}

/// One message of a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedItem {
    /// An event (shared by every watch that delivers it).
    Event(Arc<LicenseEvent>),
    /// The position moved past events the filters left out.
    Checkpoint(i64),
}

/// Why a watch ended.
#[derive(Debug)]
pub enum FeedEnd {
    /// The consumer took nothing for the stall time.
    TooSlow,
    /// The server is shutting down.
    Closing,
    /// The database failed.
    Failed(StoreError),
}

/// A watch: its messages, then why it ended (when `items` ends).
pub struct FeedWatch {
    /// The messages, in feed order.
    pub items: mpsc::Receiver<FeedItem>,
    /// Set before `items` closes, unless the consumer went away first.
    pub end: oneshot::Receiver<FeedEnd>,
}

/// How long a watch waits for its consumer to take a message, unless set
/// otherwise ([`EventFeed::set_stall`]).
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);

/// A stretch of the feed: every event with `from < id <= to`, or `None`
/// when the feed could not read them (each watch reads them itself).
#[derive(Debug)]
struct Stretch {
    from: i64,
    to: i64,
    events: Option<Vec<Arc<LicenseEvent>>>,
}

/// How far the feed is final.
#[derive(Default)]
struct Horizon {
    /// Every id up to here is final.
    reached: i64,
    /// PostgreSQL: `(v, bound)` pairs not yet passed by `xmin`, oldest first.
    pending: VecDeque<(i64, i64)>,
}

/// The feed of one store.
pub struct EventFeed {
    readers: AnyPool,
    dialect: Dialect,
    /// The stall time, in milliseconds.
    stall_ms: AtomicU64,
    /// Held while the horizon moves (and its stretch is broadcast), so that
    /// stretches go out in order.
    horizon: Mutex<Horizon>,
    reached: watch::Sender<i64>,
    stretches: broadcast::Sender<Arc<Stretch>>,
    /// A write committed here or elsewhere, or a watch began.
    wake: Arc<Notify>,
    closing: watch::Sender<bool>,
    watches: metrics::Gauge,
}

impl EventFeed {
    /// The feed over `readers`; its task runs until the feed is dropped.
    pub(super) fn start(readers: AnyPool, dialect: Dialect) -> Arc<Self> {
        let feed = Arc::new(EventFeed {
            readers,
            dialect,
            stall_ms: AtomicU64::new(DEFAULT_STALL.as_millis() as u64),
            horizon: Mutex::new(Horizon::default()),
            reached: watch::channel(0).0,
            stretches: broadcast::channel(BROADCAST_STRETCHES).0,
            wake: Arc::new(Notify::new()),
            closing: watch::channel(false).0,
            watches: metrics::gauge!("licensd_event_watches"),
        });
        tokio::spawn(follow(Arc::downgrade(&feed)));
        feed
    }

    /// Something may have committed: follow it soon.
    pub(super) fn nudge(&self) {
        self.wake.notify_one();
    }

    /// What [`nudge`](Self::nudge) wakes (the change listener holds it).
    pub(super) fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// How long a watch waits for its consumer to take a message before it
    /// ends ([`FeedEnd::TooSlow`]).
    pub fn set_stall(&self, stall: Duration) {
        self.stall_ms
            .store(stall.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Ends every watch ([`FeedEnd::Closing`]); new ones end at once.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A page of the feed after `after`, up to the horizon.
    pub(super) async fn list(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<FeedPage> {
        let horizon = self.advance().await?;
        let mut conn = self.readers.acquire().await?;
        let events = read(&mut conn, after, horizon, filter, limit as usize).await?;
        let next = if events.len() < limit as usize {
            horizon.max(after)
        } else {
            events.last().map_or(after, |e| e.id)
        };
        Ok(FeedPage { events, next })
    }

    /// Follows the feed after `after`.
    pub(super) fn watch(self: &Arc<Self>, after: i64, filter: EventFilter) -> FeedWatch {
        let (items, items_rx) = mpsc::channel(WATCH_BUFFER);
        let (end, end_rx) = oneshot::channel();
        // Subscribed before the task reads the horizon: see `Watch::run`.
        let stretches = self.stretches.subscribe();
        self.wake.notify_one();
        let watch = Watch {
            feed: self.clone(),
            filter,
            pos: after,
            items,
            stretches,
            closing: self.closing.subscribe(),
            last_sent: Instant::now(),
            sent_pos: after,
        };
        tokio::spawn(async move {
            let feed = watch.feed.clone();
            feed.watches.increment(1.0);
            let ended = watch.run().await;
            feed.watches.decrement(1.0);
            if let Some(why) = ended {
                let _ = end.send(why);
            }
        });
        FeedWatch {
            items: items_rx,
            end: end_rx,
        }
    }

    /// Moves the horizon as far as the database allows; broadcasts the new
    /// stretch. Returns the horizon.
    async fn advance(&self) -> StoreResult<i64> {
        let mut h = self.horizon.lock().await;
        let mut conn = self.readers.acquire().await?;
        let fresh = match self.dialect {
            Dialect::Sqlite => {
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(id), 0) FROM license_events")
                    .fetch_one(&mut *conn)
                    .await?
            }
            Dialect::Postgres => {
                // The bound first, then (a later transaction) the snapshot.
                let bound: (i64, i64) =
                    sqlx::query_as("SELECT last_id, xid_bound FROM licensd_event_bound()")
                        .fetch_one(&mut *conn)
                        .await?;
                let xmin = pg_xmin(&mut conn).await?;
                let reached = h.reached;
                passed(&mut h.pending, bound, xmin, reached)
            }
        };
        if fresh <= h.reached {
            return Ok(h.reached);
        }
        let from = h.reached;
        h.reached = fresh;
        // The horizon before the stretch: a watch that subscribed too late
        // for the stretch reads the horizon after it, and so the stretch
        // from the database (see `Watch::run`).
        self.reached.send_replace(fresh);
        if self.stretches.receiver_count() > 0 {
            let mut pos = from;
            while pos < fresh {
                let stretch = match read(&mut conn, pos, fresh, &EventFilter::default(), PAGE).await
                {
                    Ok(events) => Stretch {
                        from: pos,
                        to: if events.len() < PAGE {
                            fresh
                        } else {
                            events.last().map_or(fresh, |e| e.id)
                        },
                        events: Some(events.into_iter().map(Arc::new).collect()),
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "event feed: a stretch could not be read; watches read it themselves");
                        Stretch {
                            from: pos,
                            to: fresh,
                            events: None,
                        }
                    }
                };
                pos = stretch.to;
                let _ = self.stretches.send(Arc::new(stretch));
            }
        }
        Ok(fresh)
    }

    /// Whether the horizon trails what has been read (PostgreSQL: writes
    /// were in flight at the last poll).
    async fn behind(&self) -> bool {
        !self.horizon.lock().await.pending.is_empty()
    }
}

/// PostgreSQL: records the pair `(v, bound)` read just now and returns the
/// horizon `xmin` allows: the largest `v` of the pairs whose transaction id
/// bound it has reached.
fn passed(pending: &mut VecDeque<(i64, i64)>, read: (i64, i64), xmin: i64, reached: i64) -> i64 {
    if pending.back().is_none_or(|last| *last != read) {
        pending.push_back(read);
    }
    if pending.len() > MAX_PENDING {
        // The newest pair covers the one before it: dropping it only
        // delays the horizon until the newest passes.
        let drop_at = pending.len() - 2;
        pending.remove(drop_at);
    }
    let mut horizon = reached;
    while let Some(&(v, bound)) = pending.front() {
        if bound > xmin {
            break;
        }
        horizon = horizon.max(v);
        pending.pop_front();
    }
    horizon
}

/// Follows the horizon while anyone watches: a poll per wake-up or per
/// [`TICK`], again soon while it trails; under a stream of wake-ups, at most
/// one poll per [`MIN_GAP`] (a lone write is followed at once).
async fn follow(feed: std::sync::Weak<EventFeed>) {
    let mut failing = false;
    let mut last_poll = Instant::now();
    loop {
        let Some(f) = feed.upgrade() else { return };
        if f.readers.is_closed() {
            return;
        }
        let watched = f.stretches.receiver_count() > 0;
        let soon = watched && f.behind().await;
        let waited = Instant::now();
        if !soon {
            // A weak wait: the feed may be dropped meanwhile.
            let wait = async {
                if watched {
                    let _ = tokio::time::timeout(TICK, f.wake.notified()).await;
                } else {
                    f.wake.notified().await;
                }
            };
            tokio::select! {
                () = wait => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        if f.stretches.receiver_count() == 0 {
            continue;
        }
        // Woken at once: pace the polls.
        if waited.elapsed() < Duration::from_millis(1) {
            let next = last_poll
                + if failing {
                    Duration::from_millis(500)
                } else {
                    MIN_GAP
                };
            tokio::time::sleep_until(next.into()).await;
        }
        last_poll = Instant::now();
        match f.advance().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("event feed: following again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "event feed: cannot read the database; watches wait");
            }
            Err(_) => {}
        }
    }
}

/// Reads the events with `after < id <= up_to` that pass `filter`, at most
/// `limit`, in id order.
async fn read(
    conn: &mut AnyConnection,
    after: i64,
    up_to: i64,
    filter: &EventFilter,
    limit: usize,
) -> StoreResult<Vec<LicenseEvent>> {
    if up_to <= after || limit == 0 {
        return Ok(Vec::new());
    }
    let mut sql = format!("{EVENT_SELECT} WHERE e.id > $1 AND e.id <= $2");
    let mut n = 2;
    if filter.product.is_some() {
        n += 1;
        sql.push_str(&format!(" AND l.product_code = ${n}"));
    }
    if !filter.types.is_empty() {
        let marks: Vec<String> = (0..filter.types.len())
            .map(|i| format!("${}", n + 1 + i))
            .collect();
        n += filter.types.len();
        sql.push_str(&format!(" AND e.type IN ({})", marks.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY e.id LIMIT ${}", n + 1));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(up_to);
    if let Some(product) = &filter.product {
        query = query.bind(product.clone());
    }
    for t in &filter.types {
        query = query.bind(t.clone());
    }
    let rows = query.bind(limit as i64).fetch_all(&mut *conn).await?;
    rows.iter().map(event_from_row).collect()
}

/// The per-license history: the events of license `license_id` after
/// `after`, at most `limit`.
pub(super) async fn read_license_events(
    conn: &mut AnyConnection,
    license_id: i64,
    after: i64,
    limit: u32,
) -> StoreResult<Vec<LicenseEvent>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{EVENT_SELECT} WHERE e.license_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3"
    )))
    .bind(license_id)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// One watch's task.
struct Watch {
    feed: Arc<EventFeed>,
    filter: EventFilter,
    /// Every event up to here has been delivered or filtered out.
    pos: i64,
    items: mpsc::Sender<FeedItem>,
    stretches: broadcast::Receiver<Arc<Stretch>>,
    closing: watch::Receiver<bool>,
    last_sent: Instant,
    /// The position the consumer last heard of.
    sent_pos: i64,
}

/// Why a watch stopped early: `None` when the consumer went away.
type Stop = Option<FeedEnd>;

impl Watch {
    /// Runs until the consumer goes away (`None`) or the watch ends.
    ///
    /// No stretch is missed: the watch subscribed to the broadcast before
    /// it reads the horizon, and the feed moves the horizon before it
    /// broadcasts. A stretch broadcast before the subscription therefore
    /// ends at or below the horizon read here, which the database read
    /// covers; every later one arrives.
    async fn run(mut self) -> Option<FeedEnd> {
        if *self.closing.borrow() {
            return Some(FeedEnd::Closing);
        }
        let horizon = *self.feed.reached.borrow();
        if let Err(stop) = self.catch_up(horizon).await {
            return stop;
        }
        loop {
            let next = tokio::select! {
                next = self.stretches.recv() => next,
                _ = self.closing.changed() => return Some(FeedEnd::Closing),
                () = self.items.closed() => return None,
            };
            let step = match next {
                Ok(stretch) => self.take(&stretch).await,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let horizon = *self.feed.reached.borrow();
                    self.catch_up(horizon).await
                }
                Err(broadcast::error::RecvError::Closed) => return Some(FeedEnd::Closing),
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Delivers a broadcast stretch.
    async fn take(&mut self, stretch: &Stretch) -> Result<(), Stop> {
        if stretch.to <= self.pos {
            return Ok(());
        }
        match &stretch.events {
            Some(events) if stretch.from <= self.pos => {
                for e in events {
                    if e.id > self.pos && self.filter.matches(e) {
                        self.send(FeedItem::Event(Arc::clone(e))).await?;
                        self.sent_pos = e.id;
                    }
                }
                self.pos = stretch.to;
                self.checkpoint();
                Ok(())
            }
            // A gap before the stretch, or a stretch the feed could not read.
            _ => self.catch_up(stretch.to).await,
        }
    }

    /// Delivers from the database up to `up_to`.
    async fn catch_up(&mut self, up_to: i64) -> Result<(), Stop> {
        while self.pos < up_to {
            let page = async {
                let mut conn = self.feed.readers.acquire().await?;
                read(&mut conn, self.pos, up_to, &self.filter, PAGE).await
            }
            .await
            .map_err(|e| Some(FeedEnd::Failed(e)))?;
            let full = page.len() == PAGE;
            for e in page {
                let id = e.id;
                self.send(FeedItem::Event(Arc::new(e))).await?;
                self.pos = id;
                self.sent_pos = id;
            }
            if !full {
                self.pos = up_to;
            }
        }
        self.checkpoint();
        Ok(())
    }

    /// Waits for room for `item`, at most the stall time.
    async fn send(&mut self, item: FeedItem) -> Result<(), Stop> {
        let stall = Duration::from_millis(self.feed.stall_ms.load(Ordering::Relaxed));
        tokio::select! {
            sent = tokio::time::timeout(stall, self.items.send(item)) => match sent {
                Ok(Ok(())) => {
                    self.last_sent = Instant::now();
                    Ok(())
                }
                Ok(Err(_)) => Err(None),
                Err(_) => Err(Some(FeedEnd::TooSlow)),
            },
            _ = self.closing.changed() => Err(Some(FeedEnd::Closing)),
        }
    }

    /// Tells the consumer of a position the filters moved it to, now and
    /// then (without waiting: a full channel has news enough).
    fn checkpoint(&mut self) {
        if self.pos > self.sent_pos
            && self.last_sent.elapsed() >= CHECKPOINT_EVERY
            && self.items.try_send(FeedItem::Checkpoint(self.pos)).is_ok()
        {
            self.last_sent = Instant::now();
            self.sent_pos = self.pos;
        }
    }
}

#[cfg(test)]
mod tests;
