//! The listening end: one connection that hears this replica's own
//! notifications back and the others' notifications and acknowledgements,
//! marks what they changed in the cache, and acknowledges it.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::oneshot;

use super::Changes;
use super::wire::{CHANNEL, Token, ack_channel, parse_payload};

/// Pause before reconnecting a lost listener.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// How long the check that the database is reachable, after the listener
/// was lost, waits for a fresh connection.
const REACHABLE_WAIT: Duration = Duration::from_millis(500);

impl Changes {
    /// Keeps one listening connection until the store closes (or `changes` is
    /// dropped: `gone`): records this replica's echoes and the others'
    /// acknowledgements, hellos and goodbyes, and with a cache marks and
    /// acknowledges what other replicas announce.
    pub(super) async fn listen(changes: Weak<Changes>, mut gone: oneshot::Receiver<()>) {
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

    /// Whether the database is down: a fresh connection is turned away by
    /// the database's host within [`REACHABLE_WAIT`] (see
    /// [`refused_by_the_server`]). A pool would retry a refused connection
    /// until its timeout. Anything else (it connects, another error, no
    /// answer in time: perhaps only this replica is cut off while others
    /// write) is not taken as down.
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
            Ok(Err(e)) => {
                let down = refused_by_the_server(&e);
                tracing::debug!(error = %e, down, "change listener: is the database down?");
                down
            }
            Err(_) => false,
        }
    }
}

/// Whether a failed connection attempt was turned away by the database
/// host itself: nothing listens (refused, no socket), the server closed the
/// connection during its start-up (reset, aborted, end of file: a server
/// shutting down or crashing), or it said it is starting, stopping or was
/// terminated (57P03, 57P01, 57P02).
fn refused_by_the_server(e: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::NotFound
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
        ),
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("57P03" | "57P01" | "57P02"))
        }
        _ => false,
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
