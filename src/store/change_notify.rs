//! Change notifications between replicas on one PostgreSQL database
//! (`LISTEN/NOTIFY`), so that a write acknowledged on one replica is what
//! every replica's Validate answers.
//!
//! **Sending.** After a write has committed, its replica announces the
//! license it changed (or "the products") on the channel [`CHANNEL`], and
//! only then answers its caller. Not inside the write transaction: a
//! transaction that notifies takes a database-wide lock at commit and holds
//! it through its WAL flush, so notifying inside every write would
//! serialize all commits of the PostgreSQL instance. Instead one task per
//! replica sends what has queued up meanwhile in one short transaction of
//! its own (one simple query of `NOTIFY` statements, on a connection with
//! `synchronous_commit = off`): it has nothing to make durable
//! (a notification lost in a crash is caught by the poll), so it holds that
//! lock for microseconds, not for a flush. Writes that commit together share
//! one notification.
//!
//! **Receiving and acknowledging.** Each replica with a validation cache
//! keeps one listening connection ([`listen`]). A notification from another
//! replica marks the licenses it names as a local write would (Validate
//! reads them from the database until a poll has re-read them), asks the
//! feed to poll now, and is then acknowledged on the writer's own channel
//! (`licensd_changes_acks_<replica>`, which only the writer listens to). The
//! writer answers its caller once it has heard its own notification back
//! and an acknowledgement from every replica it knows to be listening (or
//! after [`ANNOUNCE_WAIT`]): by then no replica answers the old state from
//! memory.
//!
//! **Every replica listens.** Also one without a validation cache: it has
//! nothing to mark and acknowledges nothing, but it hears its own
//! notifications back and the others' acknowledgements, so its writes wait
//! for the replicas that cache (and its event feed wakes at their writes).
//!
//! **Knowing the others.** A replica with a cache joins when its listener
//! connects (or when its cache is switched on): it says hello and "joined"
//! (`+ ^`), and says hello again every [`HELLO_EVERY`] while it listens; one
//! that hears a hello from a replica it did not know answers with its own,
//! so replicas find each other at once. A replica without a cache asks
//! instead (`?`), and every caching replica that hears it says hello. A
//! replica that loses its listener or shuts down says goodbye. A writer
//! waits only for replicas heard from within [`PEER_TTL`], and only for
//! notifications sent after it heard them join or first heard their hello
//! (earlier ones reached them before they listened, and the poll they make
//! after joining covers those). One that does not acknowledge in time (a
//! crash, a stall) is not waited for again until it acknowledges that batch
//! or a later one, or joins again, so a dead replica costs one wait, not one
//! per write.
//!
//! **Joining, exactly.** A joining replica's cache answers again only once
//! a poll that started after its own join was heard back has finished. A
//! write whose notification committed before the join committed before
//! that poll started, so the poll reads it; one whose notification
//! committed after the join reaches the listener, and its writer heard the
//! join before its own notification came back (a channel delivers in commit
//! order), so it waits for this replica's acknowledgement. No write is
//! answered while a replica that missed it answers from memory. A replica
//! whose listener reconnects keeps the others it knew (their acknowledgements
//! reach it again at once); they say hello again within [`PEER_TTL`] or are
//! no longer waited for.
//!
//! **What the poll still does.** It stays, every refresh interval, as the
//! backstop for a notification that never came: a writer that died between
//! its commit and its notification, a dropped listening connection. While
//! the listener is disconnected the cache does not answer, and after it has
//! reconnected it answers again only once a poll that started after it
//! joined again has caught up.
//!
//! **Payload.** `"<replica>:<batch> <token> …"`: the sender's random id in
//! hex and its batch number, then tokens: normalised license keys (A–Z,
//! 0–9), `*` for "the products changed", `+` hello, `^` joined, `?` "who
//! acknowledges?" and `-` goodbye; on an
//! acknowledgement channel, `<replica>:<batch>` acknowledging that
//! replica's batches up to that one.
//! Anything else in a payload is ignored: a notification can only make
//! Validate read the database, never answer from memory something it would
//! not have answered anyway.
//!
//! [`listen`]: Changes::listen

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};

pub use progress::PEER_TTL;
use progress::Progress;
pub use wire::{CHANNEL, Change};
use wire::{Token, listener_name};

use super::cache::validation_cache::ValidationCache;
use super::{StoreError, StoreResult};

mod listener;
mod progress;
mod sender;
mod wire;

/// Longest a write waits for its notification to be sent, echoed and
/// acknowledged before it answers anyway (the poll is the backstop).
const ANNOUNCE_WAIT: Duration = Duration::from_millis(500);

/// How often a listening replica says hello.
pub const HELLO_EVERY: Duration = Duration::from_secs(1);

/// A queued token, and who waits for the number of the batch it went out in
/// (`None`: sending failed).
type Outgoing = (Token, Option<oneshot::Sender<Option<u64>>>);

/// One replica's sending and listening ends.
pub struct Changes {
    /// This replica's id in payloads (random per process).
    replica: u64,
    queue: mpsc::UnboundedSender<Outgoing>,
    /// The notifier's and the listener's connections (closed with the store).
    send_pool: PgPool,
    listen_pool: PgPool,
    /// To check, without a pool's retries, whether the database answers.
    options: PgConnectOptions,
    progress: Mutex<Progress>,
    /// Whether a listener is connected (only then is an echo awaited).
    listening: AtomicBool,
    /// Woken by every change heard from another replica (the event feed).
    on_change: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    /// Dropped with this: the listener's task ends.
    _alive: oneshot::Sender<()>,
}

impl Changes {
    /// Also wakes `wake` on every change heard from another replica.
    pub(super) fn wake_on_change(&self, wake: Arc<tokio::sync::Notify>) {
        let _ = self.on_change.set(wake);
    }

    /// Sets up both ends for the database at `url` and starts listening.
    /// Must be called inside a Tokio runtime.
    pub fn new(url: &str, statement_timeout: Duration) -> StoreResult<Arc<Changes>> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let replica: u64 = rand::random();
        let ms = statement_timeout.as_millis().to_string();
        let send_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ANNOUNCE_WAIT)
            .connect_lazy_with(options.clone().options([
                ("statement_timeout", ms.as_str()),
                // Nothing it sends needs to be durable.
                ("synchronous_commit", "off"),
            ]));
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            // Which replica listens, for whoever reads pg_stat_activity.
            .connect_lazy_with(options.clone().application_name(&listener_name(replica)));
        let (queue, rx) = mpsc::unbounded_channel();
        let (alive, gone) = oneshot::channel();
        let changes = Arc::new(Changes {
            replica,
            queue,
            send_pool,
            listen_pool,
            options,
            progress: Mutex::new(Progress::default()),
            listening: AtomicBool::new(false),
            on_change: std::sync::OnceLock::new(),
            _alive: alive,
        });
        tokio::spawn(Changes::send_loop(Arc::downgrade(&changes), rx));
        tokio::spawn(Changes::say_hello(Arc::downgrade(&changes)));
        tokio::spawn(Changes::listen(Arc::downgrade(&changes), gone));
        Ok(changes)
    }

    /// Whether a validation cache is attached: only then does this replica
    /// acknowledge, say hello and goodbye.
    fn caching(&self) -> bool {
        self.progress().cache.is_some()
    }

    /// The `application_name` of this replica's listening connection.
    pub fn listener_name(&self) -> String {
        listener_name(self.replica)
    }

    /// Marks and acknowledges for `cache` from now on. It answers once this
    /// replica has joined (again) and caught up.
    pub fn attach_cache(&self, cache: &Arc<ValidationCache>) {
        // Not answering until joined (no window in which a notification
        // could be missed unnoticed).
        cache.listener_lost();
        let mut p = self.progress();
        p.cache = Some(Arc::downgrade(cache));
        if self.listening.load(Ordering::Acquire) {
            p.joining = true;
            self.queue(Token::Join);
        }
    }

    /// Announces `change` (committed) to every replica; returns once it has
    /// been sent and, if this replica listens, heard back and acknowledged
    /// by every other listening replica, or after [`ANNOUNCE_WAIT`].
    pub async fn announce(&self, change: Change) {
        let started = Instant::now();
        let (done, sent) = oneshot::channel();
        if self
            .queue
            .send((Token::Change(change), Some(done)))
            .is_err()
        {
            return;
        }
        let mut sent_as = None;
        let waited = tokio::time::timeout(ANNOUNCE_WAIT, async {
            let Ok(Some(batch)) = sent.await else {
                return;
            };
            sent_as = Some(batch);
            if self.listening.load(Ordering::Acquire) {
                let (wake, woken) = oneshot::channel();
                {
                    let mut p = self.progress();
                    if p.done(batch, Instant::now()) {
                        return;
                    }
                    p.waiters.entry(batch).or_default().push(wake);
                }
                let _ = woken.await;
            }
        })
        .await;
        if let (Err(_), Some(batch)) = (waited, sent_as) {
            self.gave_up_on(batch);
        }
        metrics::histogram!("licensd_change_notification_seconds")
            .record(started.elapsed().as_secs_f64());
    }

    /// Announces `change` without waiting for anything (a write whose
    /// caller is gone).
    pub fn announce_detached(&self, change: Change) {
        self.queue(Token::Change(change));
    }

    /// The replicas that did not acknowledge `batch` in time are not waited
    /// for until they do.
    fn gave_up_on(&self, batch: u64) {
        let now = Instant::now();
        let mut p = self.progress();
        let late: Vec<u64> = p.waiting_for(batch, now).collect();
        for id in &late {
            tracing::warn!(replica = %format!("{id:x}"), batch, "change notifications: a replica did not acknowledge in time; not waiting for it until it catches up");
            if let Some(peer) = p.peers.get_mut(id) {
                peer.late = peer.late.max(batch);
            }
        }
        if !late.is_empty() {
            p.release(now);
        }
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Other replicas a write would wait for now (listening, not late).
    pub fn peers_listening(&self) -> usize {
        let now = Instant::now();
        self.progress()
            .peers
            .values()
            .filter(|p| p.waited_for(now))
            .count()
    }

    fn queue(&self, token: Token) {
        let _ = self.queue.send((token, None));
    }

    /// Says goodbye (briefly waiting for it to go out), then closes both
    /// connections; the tasks end.
    pub async fn close(&self) {
        if self.listening.swap(false, Ordering::AcqRel) && self.caching() {
            let (done, sent) = oneshot::channel();
            if self.queue.send((Token::Goodbye, Some(done))).is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(200), sent).await;
            }
        }
        self.listen_pool.close().await;
        self.send_pool.close().await;
    }
}

#[cfg(test)]
mod tests;
