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
use std::time::Duration;

use sqlx::AnyPool;
use tokio::sync::{Mutex, Notify, broadcast, mpsc, oneshot, watch};

pub use query::EventFilter;
use query::read;
pub(super) use query::read_license_events;

use super::rows::Dialect;
use super::{LicenseEvent, StoreError, StoreResult};

mod horizon;
mod query;
mod watches;

/// Stretches of events the broadcast keeps for watches that lag behind.
const BROADCAST_STRETCHES: usize = 64;

/// Shortest pause between two polls.
const MIN_GAP: Duration = Duration::from_millis(5);

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
        tokio::spawn(Self::follow(Arc::downgrade(&feed)));
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
}

#[cfg(test)]
mod tests;
