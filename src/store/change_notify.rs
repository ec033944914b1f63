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

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};

pub use wire::{CHANNEL, Change};
use wire::{Parsed, Token, ack_channel, listener_name, notify_sql, parse_payload};

use super::cache::validation_cache::ValidationCache;
use super::{StoreError, StoreResult};

mod wire;

/// Changes sent in one transaction at most.
const MAX_BATCH: usize = 2_000;

/// Longest a write waits for its notification to be sent, echoed and
/// acknowledged before it answers anyway (the poll is the backstop).
const ANNOUNCE_WAIT: Duration = Duration::from_millis(500);

/// Longest the next batch of changes gathers while the previous one is
/// being acknowledged.
const GATHER_MAX: Duration = Duration::from_millis(5);

/// How often a listening replica says hello.
pub const HELLO_EVERY: Duration = Duration::from_secs(1);

/// A replica not heard saying hello for this long is not waited for.
pub const PEER_TTL: Duration = Duration::from_millis(3_500);

/// Pause before reconnecting a lost listener.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// How long the check that the database is reachable, after the listener
/// was lost, waits for a fresh connection.
const REACHABLE_WAIT: Duration = Duration::from_millis(500);

/// A queued token, and who waits for the number of the batch it went out in
/// (`None`: sending failed).
type Outgoing = (Token, Option<oneshot::Sender<Option<u64>>>);

/// What this replica knows about its notifications' progress.
#[derive(Debug, Default)]
struct Progress {
    /// The highest own batch number heard back by the listener.
    echo: u64,
    /// The other listening replicas.
    peers: HashMap<u64, Peer>,
    /// Writes waiting for their batch to be done, by batch (each woken
    /// once, not at every acknowledgement).
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    /// The validation cache this replica marks and acknowledges for, once
    /// switched on.
    cache: Option<Weak<ValidationCache>>,
    /// Joined on this listener connection and not heard back yet: the
    /// cache answers only after it is.
    joining: bool,
    /// When the listener was last lost.
    lost_at: Option<Instant>,
}

impl Progress {
    fn cache(&self) -> Option<Arc<ValidationCache>> {
        self.cache.as_ref().and_then(Weak::upgrade)
    }
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    /// When its last hello was heard.
    seen: Instant,
    /// Our echo when its first hello was heard: it was listening for every
    /// later batch, not necessarily for these.
    since: u64,
    /// Our highest batch it has acknowledged.
    acked: u64,
    /// It did not acknowledge this batch in time: not waited for until it
    /// acknowledges it (0: waited for).
    late: u64,
}

impl Peer {
    /// Heard saying hello within [`PEER_TTL`].
    fn listening(&self, now: Instant) -> bool {
        now.duration_since(self.seen) < PEER_TTL
    }

    /// Listening and not late: a write waits for it.
    fn waited_for(&self, now: Instant) -> bool {
        self.listening(now) && self.acked >= self.late
    }
}

impl Progress {
    /// The listening replicas that have not acknowledged `batch` yet.
    fn waiting_for(&self, batch: u64, now: Instant) -> impl Iterator<Item = u64> + '_ {
        self.peers.iter().filter_map(move |(&id, p)| {
            let waited = p.waited_for(now) && batch > p.since && p.acked < batch;
            waited.then_some(id)
        })
    }

    /// The highest batch that is done: heard back, and acknowledged by
    /// every replica waited for. (A replica is waited for a batch only if
    /// it said hello before it, so it imposes `max(acked, since)`.)
    fn done_up_to(&self, now: Instant) -> u64 {
        self.peers
            .values()
            .filter(|p| p.waited_for(now))
            .map(|p| p.acked.max(p.since))
            .fold(self.echo, u64::min)
    }

    fn done(&self, batch: u64, now: Instant) -> bool {
        batch <= self.done_up_to(now)
    }

    /// Wakes the writes whose batch is done.
    fn release(&mut self, now: Instant) {
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
        tokio::spawn(send_loop(Arc::downgrade(&changes), rx));
        tokio::spawn(say_hello(Arc::downgrade(&changes)));
        tokio::spawn(listen(Arc::downgrade(&changes), gone));
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

    /// Whether the database is down: a fresh connection is refused (by
    /// the host, or by PostgreSQL shutting down or starting up) within
    /// [`REACHABLE_WAIT`]. A pool would retry a refused connection until
    /// its timeout. Anything else (it connects, another error, no answer in
    /// time: perhaps only this replica is cut off while others write) is
    /// not taken as down.
    async fn database_down(&self) -> bool {
        use sqlx::Connection;
        let attempt = tokio::time::timeout(
            REACHABLE_WAIT,
            sqlx::PgConnection::connect_with(&self.options),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                false
            }
            Ok(Err(sqlx::Error::Io(e))) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ),
            Ok(Err(sqlx::Error::Database(db))) => db.code().as_deref() == Some("57P03"),
            Ok(Err(_)) | Err(_) => false,
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

/// Says hello every [`HELLO_EVERY`] while the listener is connected.
async fn say_hello(changes: Weak<Changes>) {
    let mut tick = tokio::time::interval(HELLO_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(c) = changes.upgrade() else {
            return;
        };
        if c.send_pool.is_closed() {
            return;
        }
        if c.caching() && c.listening.load(Ordering::Acquire) {
            c.queue(Token::Hello);
        }
    }
}

/// Sends what has queued up, one transaction per batch, until every
/// [`Changes`] handle is gone.
///
/// After a batch of changes it lets the next one gather until this one is
/// done (heard back and acknowledged) or [`GATHER_MAX`] has passed, and sends
/// acknowledgements, hellos and goodbyes at once: under load, batches grow
/// with the round trip instead of costing every other replica one
/// acknowledgement each per few writes; when idle, nothing waits.
async fn send_loop(changes: Weak<Changes>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut batch_no = 0u64;
    let mut failing = false;
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(c) = changes.upgrade() else {
            return;
        };
        batch_no += 1;
        let has_changes = batch.iter().any(|(t, _)| matches!(t, Token::Change(_)));
        let sql = notify_sql(c.replica, batch_no, batch.iter().map(|(token, _)| token));
        let sent = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&c.send_pool)
            .await;
        let reply = match sent {
            Ok(_) => {
                if failing {
                    failing = false;
                    tracing::info!("change notifications: sending again");
                }
                Some(batch_no)
            }
            Err(e) => {
                if !failing && !c.send_pool.is_closed() {
                    failing = true;
                    tracing::warn!(error = %e, "change notifications: sending failed; other replicas see these changes by their poll");
                }
                None
            }
        };
        for (_, done) in batch.drain(..) {
            if let Some(done) = done {
                let _ = done.send(reply);
            }
        }
        if let Some(sent) = reply
            && has_changes
            && c.listening.load(Ordering::Acquire)
        {
            let (wake, woken) = oneshot::channel();
            {
                let mut p = c.progress();
                if !p.done(sent, Instant::now()) {
                    p.waiters.entry(sent).or_default().push(wake);
                }
            }
            drop(c);
            let gathering = tokio::time::sleep(GATHER_MAX);
            tokio::pin!(woken, gathering);
            loop {
                tokio::select! {
                    _ = &mut woken => break,
                    () = &mut gathering => break,
                    next = rx.recv() => match next {
                        Some(next) => {
                            let urgent = !matches!(next.0, Token::Change(_));
                            batch.push(next);
                            if urgent || batch.len() >= MAX_BATCH {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        }
    }
}

/// Keeps one listening connection until the store closes (or `changes` is
/// dropped: `gone`): records this replica's echoes and the others'
/// acknowledgements, hellos and goodbyes, and with a cache marks and
/// acknowledges what other replicas announce.
async fn listen(changes: Weak<Changes>, mut gone: oneshot::Receiver<()>) {
    let mut lost_before = false;
    loop {
        let Some(c) = changes.upgrade() else {
            return;
        };
        if c.listen_pool.is_closed() {
            return;
        }
        let cache = {
            let mut p = c.progress();
            p.joining = false;
            if c.listening.swap(false, Ordering::AcqRel) {
                // Lost now (not a failed attempt to listen again).
                p.lost_at = Some(Instant::now());
                if p.cache.is_some() {
                    c.queue(Token::Goodbye);
                }
            }
            p.cache()
        };
        if let Some(cache) = &cache {
            cache.listener_lost();
            // The database itself down (not only this connection): Validate
            // may ride through on the cache within its staleness bound.
            if c.database_down().await {
                cache.database_unreachable();
            }
        }
        drop(cache);
        let mut listener = match connect(&c.listen_pool, c.replica).await {
            Ok(l) => l,
            Err(e) => {
                if c.listen_pool.is_closed() {
                    return;
                }
                if !lost_before {
                    lost_before = true;
                    tracing::warn!(error = %e, "change listener: cannot listen; Validate reads the database until it can");
                }
                drop(c);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        c.joined_listener();
        if lost_before {
            tracing::info!("change listener: listening again");
        }
        drop(c);
        let error = loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = &mut gone => return,
            };
            match received {
                Ok(Some(n)) => {
                    let Some(c) = changes.upgrade() else {
                        return;
                    };
                    receive(&c, n.payload());
                }
                Ok(None) => break "connection lost".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        match changes.upgrade() {
            Some(c) if !c.listen_pool.is_closed() => {}
            _ => return,
        }
        lost_before = true;
        tracing::warn!(error = %error, "change listener: connection lost; Validate reads the database until it has caught up");
    }
}

impl Changes {
    /// The listener is connected (its `LISTEN` has returned).
    fn joined_listener(&self) {
        let mut p = self.progress();
        let now = Instant::now();
        // The replicas that listened when ours was lost still acknowledge
        // our notifications (those reach them, and their acknowledgements
        // us again): keep waiting for them until they fall silent.
        let lost_at = p.lost_at.unwrap_or(now);
        p.peers.retain(|_, peer| peer.listening(lost_at));
        for peer in p.peers.values_mut() {
            peer.seen = peer.seen.max(now);
        }
        self.listening.store(true, Ordering::Release);
        if p.cache.is_some() {
            p.joining = true;
            self.queue(Token::Join);
        } else {
            self.queue(Token::Probe);
        }
        p.release(now);
    }
}

async fn connect(pool: &PgPool, replica: u64) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnection is ours: the cache must know it happened.
    listener.eager_reconnect(false);
    listener
        .listen_all([CHANNEL, ack_channel(replica).as_str()])
        .await?;
    Ok(listener)
}

fn receive(changes: &Changes, payload: &str) {
    let parsed = parse_payload(payload);
    let Some(from) = parsed.replica else {
        return;
    };
    let now = Instant::now();
    let cache = changes.progress().cache();
    if from == changes.replica {
        // Our own: this replica marked the change before sending it.
        let mut p = changes.progress();
        if parsed.batch_no > p.echo {
            p.echo = parsed.batch_no;
            p.release(now);
        }
        if parsed.hello && p.joining {
            // Heard back: every writer that hears its own notification
            // back from now on waits for us. What was sent before, a poll
            // that starts now reads.
            p.joining = false;
            if let Some(cache) = &cache {
                cache.listener_ready();
            }
        }
        return;
    }
    let changed = !parsed.keys.is_empty() || parsed.products;
    if changed && let Some(wake) = changes.on_change.get() {
        wake.notify_one();
    }
    if let Some(cache) = cache.as_ref().filter(|_| changed) {
        if !parsed.keys.is_empty() {
            cache.mark_all_changed(&parsed.keys);
        }
        if parsed.products {
            cache.mark_products_changed();
        }
        cache.nudge();
        // Marked: the writer may answer its caller.
        changes.queue(Token::Ack {
            replica: from,
            batch: parsed.batch_no,
        });
    }
    let ours = parsed
        .acks
        .iter()
        .filter(|(r, _)| *r == changes.replica)
        .map(|&(_, b)| b)
        .max();
    let answer_hello = changes.progress().heard(from, &parsed, ours, now);
    if answer_hello && cache.is_some() && changes.listening.load(Ordering::Acquire) {
        changes.queue(Token::Hello);
    }
}

impl Progress {
    /// What another replica's notification says about it: its hello, join
    /// or goodbye, and `ours`, the highest of our batches it acknowledges.
    /// Whether to say hello to it.
    fn heard(&mut self, from: u64, parsed: &Parsed, ours: Option<u64>, now: Instant) -> bool {
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

#[cfg(test)]
mod tests;
