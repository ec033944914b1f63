//! Watches: each follows the feed for one consumer, from the database up
//! to the horizon, then from the broadcast stretches, filtered in memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::query::{EventFilter, PAGE, read};
use super::{EventFeed, FeedEnd, FeedItem, FeedWatch, Stretch};

/// Events a watch holds for its consumer.
const WATCH_BUFFER: usize = 64;

/// A checkpoint is sent after this long without a message, when the
/// position moved past events the filters left out.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

impl EventFeed {
    /// Follows the feed after `after`.
    pub(in crate::store) fn watch(self: &Arc<Self>, after: i64, filter: EventFilter) -> FeedWatch {
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
