//! Following the horizon: the task that polls while anyone watches, the
//! poll that moves the horizon and broadcasts the new stretch, and the
//! PostgreSQL bound on what is final.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::query::{EventFilter, PAGE, read};
use super::{EventFeed, MIN_GAP, Stretch};
use crate::store::StoreResult;
use crate::store::rows::{Dialect, pg_xmin};

/// Pairs `(v, bound)` kept at most (PostgreSQL); dropping one only delays
/// the horizon.
pub(super) const MAX_PENDING: usize = 64;

/// A poll while nobody asks for one sooner.
const TICK: Duration = Duration::from_millis(250);

impl EventFeed {
    /// Follows the horizon while anyone watches: a poll per wake-up or per
    /// [`TICK`], again soon while it trails; under a stream of wake-ups, at most
    /// one poll per [`MIN_GAP`] (a lone write is followed at once).
    pub(super) async fn follow(feed: std::sync::Weak<EventFeed>) {
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

    /// Moves the horizon as far as the database allows; broadcasts the new
    /// stretch. Returns the horizon.
    pub(super) async fn advance(&self) -> StoreResult<i64> {
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
pub(super) fn passed(
    pending: &mut VecDeque<(i64, i64)>,
    read: (i64, i64),
    xmin: i64,
    reached: i64,
) -> i64 {
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
