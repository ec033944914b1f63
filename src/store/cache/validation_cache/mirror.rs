//! What the cache holds: one compact record per license, found by the hash
//! of its key, and the products' policies the records point to.

use std::collections::HashMap;
use std::sync::Arc;

use hashbrown::HashTable;
use smallvec::SmallVec;

use crate::domain::{Edition, LicenseKind, LicenseStatus, Version};

/// Entries per storage chunk: the store grows a chunk at a time, never by
/// copying what it holds.
pub(super) const CHUNK: usize = 1 << 16;

/// A license key as the cache knows it: 128-bit SipHash of its normalised
/// text under a per-process random key.
pub(super) type KeyHash = [u64; 2];

/// One license: 56 bytes.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) key: KeyHash,
    pub(super) expires_at: i64,
    /// Keyed 64-bit hashes of the bound fingerprints, sorted. The count is
    /// `seats_used` (the refresh checks they agree).
    pub(super) fingerprints: SmallVec<[u64; 2]>,
    pub(super) seats: u32,
    pub(super) product: u16,
    pub(super) bits: Bits,
}

/// Status, kind, edition and the stale mark in one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bits(u8);

impl Bits {
    const STALE: u8 = 0x80;

    pub(super) fn new(status: LicenseStatus, kind: LicenseKind, edition: Edition) -> Bits {
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

    pub(super) fn status(self) -> LicenseStatus {
        match self.0 & 3 {
            0 => LicenseStatus::Active,
            1 => LicenseStatus::Suspended,
            _ => LicenseStatus::Revoked,
        }
    }

    pub(super) fn kind(self) -> LicenseKind {
        match (self.0 >> 2) & 3 {
            0 => LicenseKind::Standard,
            1 => LicenseKind::Promo,
            _ => LicenseKind::Nfr,
        }
    }

    pub(super) fn edition(self) -> Edition {
        if (self.0 >> 4) & 1 == 0 {
            Edition::Personal
        } else {
            Edition::Business
        }
    }

    pub(super) fn stale(self) -> bool {
        self.0 & Self::STALE != 0
    }

    pub(super) fn with_stale(self, stale: bool) -> Bits {
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

#[derive(Default)]
pub(super) struct Mirror {
    index: HashTable<u32>,
    chunks: Vec<Vec<Entry>>,
    pub(super) len: usize,
    pub(super) products: Vec<ProductPolicy>,
    pub(super) product_slots: HashMap<String, u16>,
    /// Epoch of the last local product change not yet re-read, if any.
    pub(super) products_stale_since: Option<u64>,
    /// Licenses written here and not re-read since: key hash -> (key, epoch
    /// when marked).
    pub(super) pending: HashMap<KeyHash, (String, u64)>,
    pub(super) epoch: u64,
}

impl Mirror {
    pub(super) fn entry(&self, slot: u32) -> &Entry {
        let s = slot as usize;
        &self.chunks[s / CHUNK][s % CHUNK]
    }

    pub(super) fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        let s = slot as usize;
        &mut self.chunks[s / CHUNK][s % CHUNK]
    }

    pub(super) fn find(&self, key: &KeyHash) -> Option<u32> {
        self.index
            .find(key[0], |&slot| self.entry(slot).key == *key)
            .copied()
    }

    /// Stores `entry` under its key, replacing what was there; returns its slot.
    pub(super) fn put(&mut self, entry: Entry) -> u32 {
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
