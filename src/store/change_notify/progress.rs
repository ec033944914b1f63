//! What a replica knows about its notifications' progress: its own batches
//! heard back, the other listening replicas and what they acknowledged, and
//! the writes waiting for their batch to be done.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::wire::Parsed;
use crate::store::cache::validation_cache::ValidationCache;

/// A replica not heard saying hello for this long is not waited for.
pub const PEER_TTL: Duration = Duration::from_millis(3_500);

/// What this replica knows about its notifications' progress.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The highest own batch number heard back by the listener.
    pub(super) echo: u64,
    /// The other listening replicas.
    pub(super) peers: HashMap<u64, Peer>,
    /// Writes waiting for their batch to be done, by batch (each woken
    /// once, not at every acknowledgement).
    pub(super) waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    /// The validation cache this replica marks and acknowledges for, once
    /// switched on.
    pub(super) cache: Option<Weak<ValidationCache>>,
    /// Joined on this listener connection and not heard back yet: the
    /// cache answers only after it is.
    pub(super) joining: bool,
    /// When the listener was last lost.
    pub(super) lost_at: Option<Instant>,
}

impl Progress {
    pub(super) fn cache(&self) -> Option<Arc<ValidationCache>> {
        self.cache.as_ref().and_then(Weak::upgrade)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    /// When its last hello was heard.
    pub(super) seen: Instant,
    /// Our echo when its first hello was heard: it was listening for every
    /// later batch, not necessarily for these.
    pub(super) since: u64,
    /// Our highest batch it has acknowledged.
    pub(super) acked: u64,
    /// It did not acknowledge this batch in time: not waited for until it
    /// acknowledges it (0: waited for).
    pub(super) late: u64,
}

impl Peer {
    /// Heard saying hello within [`PEER_TTL`].
    pub(super) fn listening(&self, now: Instant) -> bool {
        now.duration_since(self.seen) < PEER_TTL
    }

    /// Listening and not late: a write waits for it.
    pub(super) fn waited_for(&self, now: Instant) -> bool {
        self.listening(now) && self.acked >= self.late
    }
}

impl Progress {
    /// The listening replicas that have not acknowledged `batch` yet.
    pub(super) fn waiting_for(&self, batch: u64, now: Instant) -> impl Iterator<Item = u64> + '_ {
        self.peers.iter().filter_map(move |(&id, p)| {
            let waited = p.waited_for(now) && batch > p.since && p.acked < batch;
            waited.then_some(id)
        })
    }

    /// The highest batch that is done: heard back, and acknowledged by
    /// every replica waited for. (A replica is waited for a batch only if
    /// it said hello before it, so it imposes `max(acked, since)`.)
    pub(super) fn done_up_to(&self, now: Instant) -> u64 {
        self.peers
            .values()
            .filter(|p| p.waited_for(now))
            .map(|p| p.acked.max(p.since))
            .fold(self.echo, u64::min)
    }

    pub(super) fn done(&self, batch: u64, now: Instant) -> bool {
        batch <= self.done_up_to(now)
    }

    /// Wakes the writes whose batch is done.
    pub(super) fn release(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        let up_to = self.done_up_to(now);
        let waiting = self.waiters.split_off(&(up_to + 1));
        for done in std::mem::replace(&mut self.waiters, waiting).into_values() {
            for w in done {
                let _ = w.send(());
            }
        }
    }
}

impl Progress {
    /// What another replica's notification says about it: its hello, join
    /// or goodbye, and `ours`, the highest of our batches it acknowledges.
    /// Whether to say hello to it.
    pub(super) fn heard(
        &mut self,
        from: u64,
        parsed: &Parsed,
        ours: Option<u64>,
        now: Instant,
    ) -> bool {
        let mut answer_hello = parsed.probe;
        if parsed.goodbye {
            self.peers.remove(&from);
        } else if parsed.hello {
            let echo = self.echo;
            let known = self
                .peers
                .get(&from)
                .is_some_and(|peer| peer.listening(now));
            // A replica new to us: let it know us at once.
            answer_hello |= !known;
            match self.peers.get_mut(&from) {
                Some(peer) if known && !parsed.joined => peer.seen = now,
                // New, or joined again: waited for from our next batch on
                // (its poll reads what went before), even if it was late.
                _ => {
                    self.peers.insert(
                        from,
                        Peer {
                            seen: now,
                            since: echo,
                            acked: echo,
                            late: 0,
                        },
                    );
                }
            }
        }
        if let (Some(batch), Some(peer)) = (ours, self.peers.get_mut(&from))
            && batch > peer.acked
        {
            peer.acked = batch;
            if peer.acked >= peer.late {
                peer.late = 0;
            }
        }
        // Also when nothing changed: a replica silent for longer than the
        // TTL is no longer waited for.
        self.release(now);
        answer_hello
    }
}
