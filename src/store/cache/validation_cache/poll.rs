//! How the feed fills the cache: a poll begins, applies the products and
//! licenses it read, forgets marks for keys that do not exist, and
//! finishes, after which the cache may answer within the staleness bound.

use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::{DateTime, Utc};
use smallvec::SmallVec;

use super::mirror::{Bits, Entry};
use super::{LicenseRow, Poll, ProductPolicy, ValidationCache};

impl ValidationCache {
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
}
