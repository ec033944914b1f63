//! The validation cache: what Validate needs about every license, in memory.
//!
//! Validate is the hot path. Answering it from the database costs three
//! B-tree descents and a read transaction per call (see the README's
//! Performance section); answering it from memory costs one hash lookup. The
//! cache holds, per license, only the fields [`ValidationView`] is made of,
//! in a compact record (56 bytes, fingerprints as 64-bit keyed hashes), so
//! a million licenses take about 70 MB.
//!
//! Fingerprints are kept as 64-bit SipHash values under a key drawn at
//! random per process. A fingerprint that is not bound would be answered as
//! bound only if its hash equalled one of that license's bound fingerprints'
//! hashes: a chance of (bound fingerprints) × 2⁻⁶⁴ per call, which nobody can
//! aim for without the process's key. Only Validate's answer could be
//! affected; Activate, Deactivate and redemption compare the stored
//! fingerprints themselves. Keys are kept as 128-bit SipHash values.
//!
//! **It serves Validate only.** Every write still decides on rows it locked
//! in the database, so no write rule ever reads the cache.
//!
//! **How it stays fresh** (fed by [`super::feed`]):
//! * Every change to a license writes a `license_events` row in the same
//!   transaction. Every replica polls those rows (every
//!   `--validate-cache-refresh-ms`) and re-reads the licenses they name.
//!   Products (latest version, grace period) are re-read on every poll.
//! * **The staleness bound.** The cache answers only while its last
//!   successful poll *started* less than the bound ago
//!   (`--validate-cache-max-staleness-ms`, default
//!   [`DEFAULT_MAX_STALENESS`], 800 ms, within the 1 s that replicas
//!   promise). A poll reads a snapshot taken after it started, so any change
//!   committed more than the bound before a Validate is already applied; if
//!   polls stop succeeding (database gone, runtime starved) Validate falls
//!   back to the database instead of answering from old data, and while
//!   the database is down too that is `UNAVAILABLE`. So during a database
//!   outage Validate answers from memory for at most the bound after the
//!   last poll; an operator who prefers a longer ride-through to the 1 s
//!   promise raises it.
//! * A write on this replica marks its license stale as soon as it has
//!   committed (before its caller hears back): until a poll that *started*
//!   after the mark has re-read the license, Validate reads it from the
//!   database. So a replica always sees its own writes at once.
//! * Polls are numbered (epochs). A mark remembers the epoch in progress
//!   when it was made, and only a later epoch's re-read clears it.
//!
//! * With several replicas on PostgreSQL, a write on another replica is
//!   announced by `LISTEN/NOTIFY` ([`crate::store::change_notify`]): the moment the
//!   notification arrives, the license is marked as a local write would mark
//!   it. While the listening connection is down a notification may be lost,
//!   so the cache does not answer, until a poll that started after the
//!   listener was back has finished. One exception: when the listener's
//!   own check finds the database down (a fresh connection is refused, by
//!   the host or by PostgreSQL shutting down), nothing can be written by
//!   any replica and Validate could only be answered `UNAVAILABLE`; the
//!   cache then answers on within the staleness bound of its last poll,
//!   until a poll that started after the loss succeeds (the database
//!   answers again: Validate reads it). A connection that merely hangs may
//!   be a replica cut off while others write: no exception then.
//! * **"No such license" is never answered from memory.** A key the cache
//!   does not hold may have been issued a moment ago on another replica, so
//!   Validate asks the database (one indexed read).
//!
//! Until the first full load has finished, and whenever the cache cannot
//! answer, Validate reads the database: the cache is never needed for a
//! right answer, only for a fast one.

use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher13 as SipHasher13x128};

pub use mirror::ProductPolicy;
use mirror::{KeyHash, Mirror};

use crate::domain::{Edition, LicenseKey, LicenseKind, LicenseStatus, Standing};
use crate::store::ValidationView;

mod mirror;
mod poll;

/// By default the cache answers only if its last successful poll started
/// less than this long ago; changes must reach every replica within 1 s.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_millis(800);

/// A license as read from the database by the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseRow {
    /// Normalised key.
    pub key: String,
    /// Product code.
    pub product: String,
    /// Edition.
    pub edition: Edition,
    /// Kind.
    pub kind: LicenseKind,
    /// Status.
    pub status: LicenseStatus,
    /// Expiry, microseconds since the epoch.
    pub expires_at: i64,
    /// Seats bought.
    pub seats: u32,
    /// `seats_used` as stored.
    pub seats_used: u32,
    /// Bound fingerprints.
    pub fingerprints: Vec<String>,
}

/// What the cache says about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The license as of the last poll.
    Found(ValidationView),
    /// The cache cannot answer: read the database. Also for a key it does
    /// not hold: only the database may say that a license does not exist.
    AskDatabase,
}

/// Counters for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Licenses held.
    pub licenses: usize,
    /// Licenses marked stale by local writes, waiting for a re-read.
    pub pending: usize,
    /// Polls started (the current epoch).
    pub epoch: u64,
    /// Whether the first full load has finished.
    pub loaded: bool,
    /// Whether change notifications are being received (always true where
    /// there are none to receive: SQLite).
    pub listening: bool,
    /// Whether Validate is answered from memory now.
    pub answering: bool,
    /// Since the start of the last poll that caught up (`None`: none yet).
    pub last_poll_age: Option<Duration>,
}

/// `gate` while the change listener is down.
const LISTENER_DOWN: u64 = u64::MAX;

/// The shared cache: see the module documentation.
pub struct ValidationCache {
    key_hasher: (u64, u64),
    fingerprint_hasher: (u64, u64),
    started: Instant,
    /// The staleness bound: how long after a poll started the cache may
    /// answer from what it read.
    max_staleness: Duration,
    /// Nanoseconds after `started` until which the cache may answer.
    fresh_until: AtomicU64,
    loaded: AtomicBool,
    disabled: AtomicBool,
    /// The cache answers only once a poll of this epoch or later has
    /// finished ([`LISTENER_DOWN`]: not at all). Set by the change listener.
    gate: AtomicU64,
    /// The latest epoch whose poll finished.
    finished_epoch: AtomicU64,
    /// The epoch in progress when the change listener was lost: while it
    /// is down the cache answers only if no later poll (one that started
    /// after the loss) has finished...
    lost_at_epoch: AtomicU64,
    /// ...and the database has been found down since the loss.
    unreachable: AtomicBool,
    /// Wakes the feed for a poll before its next tick (shared with the
    /// feed, which waits on it without keeping the cache alive).
    nudge: Arc<tokio::sync::Notify>,
    inner: RwLock<Mirror>,
}

impl ValidationCache {
    /// An empty cache that cannot answer until [`finish_load`](Self::finish_load),
    /// with the default staleness bound.
    pub fn new() -> Self {
        Self::with_max_staleness(DEFAULT_MAX_STALENESS)
    }

    /// [`new`](Self::new) with the staleness bound `max_staleness`.
    pub fn with_max_staleness(max_staleness: Duration) -> Self {
        let mut rng = rand::rng();
        use rand::Rng;
        ValidationCache {
            key_hasher: (rng.next_u64(), rng.next_u64()),
            fingerprint_hasher: (rng.next_u64(), rng.next_u64()),
            started: Instant::now(),
            max_staleness,
            fresh_until: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
            gate: AtomicU64::new(0),
            finished_epoch: AtomicU64::new(0),
            lost_at_epoch: AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
            nudge: Arc::new(tokio::sync::Notify::new()),
            inner: RwLock::new(Mirror::default()),
        }
    }

    fn key_hash(&self, normalized: &str) -> KeyHash {
        let mut h = SipHasher13x128::new_with_keys(self.key_hasher.0, self.key_hasher.1);
        h.write(normalized.as_bytes());
        let h = h.finish128();
        [h.h1, h.h2]
    }

    fn fingerprint_hash(&self, fingerprint: &str) -> u64 {
        let mut h =
            SipHasher13::new_with_keys(self.fingerprint_hasher.0, self.fingerprint_hasher.1);
        h.write(fingerprint.as_bytes());
        h.finish()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_nanos() as u64
    }

    /// Whether the cache may answer at `now`: loaded, polled within the
    /// staleness bound, and hearing every change notification, or, with
    /// the listener down, the database found down and no poll
    /// succeeded since (see the module documentation).
    pub fn is_fresh(&self, now: Instant) -> bool {
        if !self.loaded.load(Ordering::Acquire)
            || self.disabled.load(Ordering::Relaxed)
            || self.nanos(now) >= self.fresh_until.load(Ordering::Acquire)
        {
            return false;
        }
        let finished = self.finished_epoch.load(Ordering::Acquire);
        match self.gate.load(Ordering::Acquire) {
            LISTENER_DOWN => {
                self.unreachable.load(Ordering::Acquire)
                    && finished <= self.lost_at_epoch.load(Ordering::Acquire)
            }
            gate => finished >= gate,
        }
    }

    /// The change listener is not connected: notifications may be lost, so
    /// the cache stops answering (unless the database is then found
    /// unreachable: see [`database_unreachable`](Self::database_unreachable)).
    /// Called by the listener's task only; again while it stays down, it
    /// changes nothing.
    pub fn listener_lost(&self) {
        if self.gate.load(Ordering::Acquire) != LISTENER_DOWN {
            self.unreachable.store(false, Ordering::Release);
            // A poll that started before the loss and finishes after it
            // says nothing about the database now; only a later one does.
            let epoch = self.read().epoch;
            self.lost_at_epoch.store(epoch, Ordering::Release);
            self.gate.store(LISTENER_DOWN, Ordering::Release);
        }
    }

    /// With the change listener down, a fresh connection to the database
    /// was refused: nobody can write, so the cache answers
    /// on within its staleness bound, until a poll that started after the
    /// loss succeeds.
    pub fn database_unreachable(&self) {
        self.unreachable.store(true, Ordering::Release);
    }

    /// The change listener is connected (its `LISTEN` has returned): the
    /// cache answers again once a poll that started from now on has
    /// finished, which catches up with whatever was missed meanwhile.
    pub fn listener_ready(&self) {
        let m = self.read();
        self.gate.store(m.epoch + 1, Ordering::Release);
        drop(m);
        self.nudge();
    }

    /// Asks the feed for a poll now rather than at its next tick.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// What [`nudge`](Self::nudge) wakes: one wake-up per call, or one for
    /// several calls made meanwhile.
    pub fn nudges(&self) -> Arc<tokio::sync::Notify> {
        self.nudge.clone()
    }

    /// What Validate needs about `key` (and whether `fingerprint` is bound),
    /// if the cache can say.
    pub fn lookup(&self, key: &LicenseKey, fingerprint: Option<&str>, now: Instant) -> Answer {
        if !self.is_fresh(now) {
            return Answer::AskDatabase;
        }
        let hash = self.key_hash(key.normalized());
        let m = self.read();
        if m.products_stale_since.is_some() {
            return Answer::AskDatabase;
        }
        let Some(slot) = m.find(&hash) else {
            // Perhaps issued a moment ago on another replica.
            return Answer::AskDatabase;
        };
        let e = m.entry(slot);
        if e.bits.stale() {
            return Answer::AskDatabase;
        }
        let Some(expires_at) = DateTime::<Utc>::from_timestamp_micros(e.expires_at) else {
            return Answer::AskDatabase;
        };
        let product = &m.products[usize::from(e.product)];
        Answer::Found(ValidationView {
            standing: Standing {
                status: e.bits.status(),
                kind: e.bits.kind(),
                expires_at,
                grace_period_months: product.grace_period_months,
            },
            edition: e.bits.edition(),
            seats: e.seats,
            seats_used: e.fingerprints.len() as u32,
            fingerprint_bound: fingerprint.map(|f| {
                e.fingerprints
                    .binary_search(&self.fingerprint_hash(f))
                    .is_ok()
            }),
            latest_version: product.latest_version.clone(),
            offline_lease_days: product.offline_lease_days,
        })
    }

    /// A write (on this replica, or announced by another) has committed, or
    /// may have, a change to the license `key`: read it from the database
    /// until a later poll re-reads it.
    pub fn mark_changed(&self, key: &LicenseKey) {
        self.mark_all_changed(std::slice::from_ref(key));
    }

    /// [`mark_changed`](Self::mark_changed) for several keys, under one lock.
    pub fn mark_all_changed(&self, keys: &[LicenseKey]) {
        let hashes: Vec<KeyHash> = keys.iter().map(|k| self.key_hash(k.normalized())).collect();
        let mut m = self.write();
        let epoch = m.epoch;
        for (key, hash) in keys.iter().zip(hashes) {
            m.pending
                .insert(hash, (key.normalized().to_string(), epoch));
            // A key not held needs no mark: Validate asks the database for it.
            if let Some(slot) = m.find(&hash) {
                let e = m.entry_mut(slot);
                e.bits = e.bits.with_stale(true);
            }
        }
    }

    /// A product changed on this replica: Validate reads the database until
    /// a later poll has re-read the products.
    pub fn mark_products_changed(&self) {
        let mut m = self.write();
        let epoch = m.epoch;
        m.products_stale_since = Some(epoch);
    }
    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let now = Instant::now();
        let fresh_until = self.fresh_until.load(Ordering::Acquire);
        let last_poll_age = (fresh_until > 0).then(|| {
            let started = Duration::from_nanos(fresh_until).saturating_sub(self.max_staleness);
            now.saturating_duration_since(self.started + started)
        });
        let m = self.read();
        CacheStats {
            licenses: m.len,
            pending: m.pending.len(),
            epoch: m.epoch,
            loaded: self.loaded.load(Ordering::Acquire),
            listening: self.gate.load(Ordering::Acquire) != LISTENER_DOWN,
            answering: self.is_fresh(now),
            last_poll_age,
        }
    }
}

impl Default for ValidationCache {
    fn default() -> Self {
        Self::new()
    }
}

/// One poll in progress.
#[derive(Debug)]
pub struct Poll {
    epoch: u64,
    started: Instant,
    /// Keys marked by local writes before the poll started.
    pub pending: Vec<String>,
}

#[cfg(test)]
mod tests;
