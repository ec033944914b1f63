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

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hashbrown::HashTable;
use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher13 as SipHasher13x128};
use smallvec::SmallVec;

use crate::domain::{Edition, LicenseKey, LicenseKind, LicenseStatus, Standing, Version};
use crate::store::ValidationView;

/// By default the cache answers only if its last successful poll started
/// less than this long ago; changes must reach every replica within 1 s.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_millis(800);

/// Entries per storage chunk: the store grows a chunk at a time, never by
/// copying what it holds.
const CHUNK: usize = 1 << 16;

/// A license key as the cache knows it: 128-bit SipHash of its normalised
/// text under a per-process random key.
type KeyHash = [u64; 2];

/// One license: 56 bytes.
#[derive(Debug, Clone)]
struct Entry {
    key: KeyHash,
    expires_at: i64,
    /// Keyed 64-bit hashes of the bound fingerprints, sorted. The count is
    /// `seats_used` (the refresh checks they agree).
    fingerprints: SmallVec<[u64; 2]>,
    seats: u32,
    product: u16,
    bits: Bits,
}

/// Status, kind, edition and the stale mark in one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits(u8);

impl Bits {
    const STALE: u8 = 0x80;

    fn new(status: LicenseStatus, kind: LicenseKind, edition: Edition) -> Bits {
        let s = match status {
            LicenseStatus::Active => 0,
            LicenseStatus::Suspended => 1,
            LicenseStatus::Revoked => 2,
        };
        let k = match kind {
            LicenseKind::Standard => 0,
            LicenseKind::Promo => 1,
            LicenseKind::Nfr => 2,
        };
        let e = match edition {
            Edition::Personal => 0,
            Edition::Business => 1,
        };
        Bits(s | (k << 2) | (e << 4))
    }

    fn status(self) -> LicenseStatus {
        match self.0 & 3 {
            0 => LicenseStatus::Active,
            1 => LicenseStatus::Suspended,
            _ => LicenseStatus::Revoked,
        }
    }

    fn kind(self) -> LicenseKind {
        match (self.0 >> 2) & 3 {
            0 => LicenseKind::Standard,
            1 => LicenseKind::Promo,
            _ => LicenseKind::Nfr,
        }
    }

    fn edition(self) -> Edition {
        if (self.0 >> 4) & 1 == 0 {
            Edition::Personal
        } else {
            Edition::Business
        }
    }

    fn stale(self) -> bool {
        self.0 & Self::STALE != 0
    }

    fn with_stale(self, stale: bool) -> Bits {
        if stale {
            Bits(self.0 | Self::STALE)
        } else {
            Bits(self.0 & !Self::STALE)
        }
    }
}

/// A product's policy as Validate needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductPolicy {
    /// Product code.
    pub code: String,
    /// Grace period in months (R3).
    pub grace_period_months: u32,
    /// Latest version, if set.
    pub latest_version: Option<Arc<Version>>,
    /// Offline certificate lifetime in days (0: none).
    pub offline_lease_days: u32,
}

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

#[derive(Default)]
struct Mirror {
    index: HashTable<u32>,
    chunks: Vec<Vec<Entry>>,
    len: usize,
    products: Vec<ProductPolicy>,
    product_slots: HashMap<String, u16>,
    /// Epoch of the last local product change not yet re-read, if any.
    products_stale_since: Option<u64>,
    /// Licenses written here and not re-read since: key hash -> (key, epoch
    /// when marked).
    pending: HashMap<KeyHash, (String, u64)>,
    epoch: u64,
}

impl Mirror {
    fn entry(&self, slot: u32) -> &Entry {
        let s = slot as usize;
        &self.chunks[s / CHUNK][s % CHUNK]
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        let s = slot as usize;
        &mut self.chunks[s / CHUNK][s % CHUNK]
    }

    fn find(&self, key: &KeyHash) -> Option<u32> {
        self.index
            .find(key[0], |&slot| self.entry(slot).key == *key)
            .copied()
    }

    /// Stores `entry` under its key, replacing what was there; returns its slot.
    fn put(&mut self, entry: Entry) -> u32 {
        if let Some(slot) = self.find(&entry.key) {
            *self.entry_mut(slot) = entry;
            return slot;
        }
        let slot = self.len as u32;
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let hash = entry.key[0];
        self.chunks.last_mut().expect("pushed").push(entry);
        self.len += 1;
        let Mirror { index, chunks, .. } = self;
        index.insert_unique(hash, slot, |&s| {
            chunks[s as usize / CHUNK][s as usize % CHUNK].key[0]
        });
        slot
    }
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

    /// Starts a poll: its epoch, and the keys marked before it started (to
    /// re-read along with the licenses the events name).
    pub fn begin_poll(&self) -> Poll {
        let mut m = self.write();
        m.epoch += 1;
        Poll {
            epoch: m.epoch,
            started: Instant::now(),
            pending: m.pending.values().map(|(k, _)| k.clone()).collect(),
        }
    }

    /// Applies licenses read during `poll` (any order, any subset). The
    /// products they name must have been applied first.
    pub fn apply(&self, poll: &Poll, rows: &[LicenseRow]) {
        let entries: Vec<(Entry, &LicenseRow)> =
            rows.iter().map(|r| (self.entry_from(r), r)).collect();
        let mut m = self.write();
        for (mut entry, row) in entries {
            let product = m.product_slots.get(&row.product).copied();
            let marked_since = m.pending.get(&entry.key).map(|(_, e)| *e);
            let fresh = !entry.bits.stale()
                && product.is_some()
                && marked_since.is_none_or(|e| e < poll.epoch);
            if fresh {
                if marked_since.is_some() {
                    m.pending.remove(&entry.key);
                }
            } else if product.is_none() {
                // Cannot happen when products are read after licenses; if it
                // does, the database answers until the next poll re-reads it.
                m.pending.insert(entry.key, (row.key.clone(), poll.epoch));
            }
            entry.product = product.unwrap_or(0);
            entry.bits = entry.bits.with_stale(!fresh);
            m.put(entry);
        }
    }

    fn entry_from(&self, r: &LicenseRow) -> Entry {
        let mut fingerprints: SmallVec<[u64; 2]> = r
            .fingerprints
            .iter()
            .map(|f| self.fingerprint_hash(f))
            .collect();
        fingerprints.sort_unstable();
        fingerprints.dedup();
        // `seats_used` mirrors the count of activations; should they ever
        // disagree, the database answers (as it would without a cache).
        let consistent = fingerprints.len() == r.seats_used as usize
            && DateTime::<Utc>::from_timestamp_micros(r.expires_at).is_some();
        Entry {
            key: self.key_hash(&r.key),
            expires_at: r.expires_at,
            fingerprints,
            seats: r.seats,
            product: 0,
            bits: Bits::new(r.status, r.kind, r.edition).with_stale(!consistent),
        }
    }

    /// Replaces the product policies with those read during `poll` (every
    /// product).
    pub fn apply_products(&self, poll: &Poll, products: Vec<ProductPolicy>) {
        let mut m = self.write();
        for p in products {
            match m.product_slots.get(&p.code) {
                Some(&slot) => m.products[usize::from(slot)] = p,
                None => {
                    let Ok(slot) = u16::try_from(m.products.len()) else {
                        tracing::warn!(
                            "more than 65,536 products: the validation cache is off, Validate reads the database"
                        );
                        self.disabled.store(true, Ordering::Relaxed);
                        return;
                    };
                    m.product_slots.insert(p.code.clone(), slot);
                    m.products.push(p);
                }
            }
        }
        if m.products_stale_since.is_some_and(|e| e < poll.epoch) {
            m.products_stale_since = None;
        }
    }

    /// Licenses re-read for pending marks that do not exist (a write that
    /// never committed, a notification naming an unknown key): forget the
    /// mark. Nothing is held for such a key, so the database answers for it.
    pub fn drop_pending_missing(&self, poll: &Poll, missing: &[String]) {
        let mut m = self.write();
        for key in missing {
            let hash = self.key_hash(key);
            if m.pending.get(&hash).is_some_and(|(_, e)| *e < poll.epoch) {
                m.pending.remove(&hash);
            }
        }
    }

    /// `poll` has applied everything it read: the cache may answer until
    /// the staleness bound after the poll started.
    pub fn finish_poll(&self, poll: &Poll) {
        let until = self.nanos(poll.started + self.max_staleness);
        self.fresh_until.fetch_max(until, Ordering::AcqRel);
        self.finished_epoch.fetch_max(poll.epoch, Ordering::AcqRel);
    }

    /// The first full load is complete.
    pub fn finish_load(&self) {
        self.loaded.store(true, Ordering::Release);
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
