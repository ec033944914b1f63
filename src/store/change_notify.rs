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
//! replica ([`Notifier`]) sends what has queued up meanwhile in one short
//! transaction of its own, with `synchronous_commit = off`: it has nothing
//! to make durable (a notification lost in a crash is caught by the poll),
//! so it holds that lock for microseconds, not for a flush. Writes that
//! commit together share one notification.
//!
//! **Receiving.** Each replica with a validation cache keeps one listening
//! connection ([`listen`]). A notification from another replica marks the
//! licenses it names as a local write would (Validate reads them from the
//! database until a poll has re-read them) and asks the feed to poll now.
//! A replica also hears its own notifications: the writer waits (briefly)
//! for that echo before answering, so by then PostgreSQL has delivered the
//! notification to every listening replica.
//!
//! **What the poll still does.** It stays, every refresh interval, as the
//! backstop for a notification that never came: a writer that died between
//! its commit and its notification, a dropped listening connection. While
//! the listener is disconnected the cache does not answer, and after it has
//! reconnected it answers again only once a poll that started after the
//! reconnection has caught up.
//!
//! **Payload.** `"<replica>:<batch> <key> <key> …"`: the sender's random id
//! in hex and its batch number, then normalised license keys (A–Z, 0–9) and
//! `*` for "the products changed". Anything else in a payload is ignored: a
//! notification can only make Validate read the database, never answer
//! from memory something it would not have answered anyway.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::validation_cache::ValidationCache;
use super::{StoreError, StoreResult};
use crate::domain::LicenseKey;

/// The notification channel.
pub const CHANNEL: &str = "licensd_changes";

/// PostgreSQL refuses payloads of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_000;

/// Changes sent in one transaction at most.
const MAX_BATCH: usize = 2_000;

/// Longest a write waits for its notification to be sent and echoed before
/// it answers anyway (the poll is the backstop).
const ANNOUNCE_WAIT: Duration = Duration::from_millis(500);

/// Pause before reconnecting a lost listener.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// What a write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// One license.
    License(LicenseKey),
    /// A product (Validate reads latest version and grace period).
    Products,
}

/// One replica's sending and listening ends.
pub struct Changes {
    /// This replica's id in payloads (random per process).
    replica: u64,
    queue: mpsc::UnboundedSender<(Change, oneshot::Sender<Option<u64>>)>,
    /// The notifier's and the listener's connections (closed with the store).
    send_pool: PgPool,
    listen_pool: PgPool,
    /// The highest own batch number heard back by the listener.
    echo: watch::Sender<u64>,
    /// Whether a listener is connected (only then is an echo awaited).
    listening: AtomicBool,
}

impl Changes {
    /// Sets up both ends for the database at `url` (connections are made
    /// on first use). Must be called inside a Tokio runtime.
    pub fn new(url: &str, statement_timeout: Duration) -> StoreResult<Arc<Changes>> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let ms = statement_timeout.as_millis().to_string();
        let send_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ANNOUNCE_WAIT)
            .connect_lazy_with(
                options
                    .clone()
                    .options([("statement_timeout", ms.as_str())]),
            );
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        let (queue, rx) = mpsc::unbounded_channel();
        let changes = Arc::new(Changes {
            replica: rand::random(),
            queue,
            send_pool,
            listen_pool,
            echo: watch::Sender::new(0),
            listening: AtomicBool::new(false),
        });
        tokio::spawn(send_loop(Arc::downgrade(&changes), rx));
        Ok(changes)
    }

    /// Announces `change` (committed) to every replica; returns once it has
    /// been sent and, if this replica listens, heard back, or after
    /// [`ANNOUNCE_WAIT`].
    pub async fn announce(&self, change: Change) {
        let (done, sent) = oneshot::channel();
        if self.queue.send((change, done)).is_err() {
            return;
        }
        let _ = tokio::time::timeout(ANNOUNCE_WAIT, async {
            let Ok(Some(batch)) = sent.await else {
                return;
            };
            if self.listening.load(Ordering::Acquire) {
                let mut echo = self.echo.subscribe();
                let _ = echo.wait_for(|heard| *heard >= batch).await;
            }
        })
        .await;
    }

    /// Closes both connections; the tasks end.
    pub async fn close(&self) {
        self.listen_pool.close().await;
        self.send_pool.close().await;
    }
}

/// Sends what has queued up, one transaction per batch, until every
/// [`Changes`] handle is gone.
async fn send_loop(
    changes: Weak<Changes>,
    mut rx: mpsc::UnboundedReceiver<(Change, oneshot::Sender<Option<u64>>)>,
) {
    let mut batch_no = 0u64;
    let mut failing = false;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
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
        let sql = notify_sql(c.replica, batch_no, batch.iter().map(|(change, _)| change));
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
            let _ = done.send(reply);
        }
    }
}

/// The statements that announce `changes` as batch `batch_no` of `replica`.
fn notify_sql<'a>(
    replica: u64,
    batch_no: u64,
    changes: impl Iterator<Item = &'a Change>,
) -> String {
    let header = format!("{replica:x}:{batch_no}");
    let mut payloads = vec![header.clone()];
    let mut products = false;
    for change in changes {
        let token = match change {
            Change::License(key) => key.normalized(),
            Change::Products if products => continue,
            Change::Products => {
                products = true;
                "*"
            }
        };
        let last = payloads.last_mut().expect("one payload at least");
        if last.len() + 1 + token.len() > MAX_PAYLOAD {
            payloads.push(header.clone());
        }
        let last = payloads.last_mut().expect("one payload at least");
        last.push(' ');
        last.push_str(token);
    }
    let mut sql = String::from("BEGIN; SET LOCAL synchronous_commit = off; ");
    for p in &payloads {
        // A payload holds only [0-9a-f:], A-Z, 0-9, '*' and spaces: no quote
        // can end the literal.
        debug_assert!(
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || " :*".contains(c))
        );
        sql.push_str(&format!("NOTIFY {CHANNEL}, '{p}'; "));
    }
    sql.push_str("COMMIT");
    sql
}

/// What one notification says.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    replica: Option<u64>,
    batch_no: u64,
    keys: Vec<LicenseKey>,
    products: bool,
}

fn parse_payload(payload: &str) -> Parsed {
    let mut tokens = payload.split_ascii_whitespace();
    let mut parsed = Parsed::default();
    if let Some((replica, batch)) = tokens.next().and_then(|h| h.split_once(':')) {
        parsed.replica = u64::from_str_radix(replica, 16).ok();
        parsed.batch_no = batch.parse().unwrap_or(0);
    }
    for token in tokens {
        if token == "*" {
            parsed.products = true;
        } else if let Ok(key) = LicenseKey::parse(token) {
            parsed.keys.push(key);
        }
    }
    parsed
}

/// Keeps one listening connection for `cache` until the store closes:
/// marks what other replicas announce, and records this replica's echoes.
pub async fn listen(changes: Arc<Changes>, cache: Weak<ValidationCache>) {
    let mut lost_before = false;
    loop {
        if let Some(c) = cache.upgrade() {
            c.listener_lost();
        }
        changes.listening.store(false, Ordering::Release);
        if changes.listen_pool.is_closed() {
            return;
        }
        let mut listener = match connect(&changes.listen_pool).await {
            Ok(l) => l,
            Err(e) => {
                if changes.listen_pool.is_closed() {
                    return;
                }
                if !lost_before {
                    lost_before = true;
                    tracing::warn!(error = %e, "change listener: cannot listen; Validate reads the database until it can");
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let Some(c) = cache.upgrade() else {
            return;
        };
        changes.listening.store(true, Ordering::Release);
        c.listener_ready();
        drop(c);
        if lost_before {
            tracing::info!("change listener: listening again");
        }
        let error = loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Some(c) = cache.upgrade() else {
                        return;
                    };
                    receive(&changes, &c, n.payload());
                }
                Ok(None) => break "connection lost".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        if changes.listen_pool.is_closed() {
            return;
        }
        lost_before = true;
        tracing::warn!(error = %error, "change listener: connection lost; Validate reads the database until it has caught up");
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnection is ours: the cache must know it happened.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

fn receive(changes: &Changes, cache: &ValidationCache, payload: &str) {
    let parsed = parse_payload(payload);
    if parsed.replica == Some(changes.replica) {
        // Our own: this replica marked the change before sending it.
        changes.echo.send_if_modified(|heard| {
            let newer = parsed.batch_no > *heard;
            if newer {
                *heard = parsed.batch_no;
            }
            newer
        });
        return;
    }
    if !parsed.keys.is_empty() {
        cache.mark_all_changed(&parsed.keys);
    }
    if parsed.products {
        cache.mark_products_changed();
    }
    if !parsed.keys.is_empty() || parsed.products {
        cache.nudge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LicenseKind, ProductCode};

    fn key() -> LicenseKey {
        LicenseKey::generate(&ProductCode::parse("ACME").unwrap(), LicenseKind::Standard)
    }

    #[test]
    fn a_batch_round_trips_through_its_payload() {
        let (a, b) = (key(), key());
        let changes = [
            Change::License(a.clone()),
            Change::Products,
            Change::License(b.clone()),
            Change::Products,
        ];
        let sql = notify_sql(0xabc, 7, changes.iter());
        assert!(
            sql.starts_with("BEGIN; SET LOCAL synchronous_commit = off; NOTIFY licensd_changes, '")
        );
        assert!(sql.ends_with("COMMIT"));
        assert_eq!(sql.matches("NOTIFY").count(), 1);
        let payload = sql.split('\'').nth(1).unwrap();
        assert_eq!(
            parse_payload(payload),
            Parsed {
                replica: Some(0xabc),
                batch_no: 7,
                keys: vec![a, b],
                products: true,
            }
        );
    }

    #[test]
    fn a_large_batch_is_split_into_payloads_postgresql_accepts() {
        let keys: Vec<Change> = (0..1_000).map(|_| Change::License(key())).collect();
        let sql = notify_sql(1, 2, keys.iter());
        let payloads: Vec<&str> = sql.split('\'').skip(1).step_by(2).collect();
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() < 8_000);
            let parsed = parse_payload(p);
            assert_eq!((parsed.replica, parsed.batch_no), (Some(1), 2));
            seen += parsed.keys.len();
        }
        assert_eq!(seen, 1_000);
    }

    #[test]
    fn anything_else_in_a_payload_is_ignored() {
        let k = key();
        let parsed = parse_payload(&format!("zz:q NOT-A-KEY {} ' ; DROP", k.normalized()));
        assert_eq!(parsed.replica, None);
        assert_eq!(parsed.keys, vec![k]);
        assert!(!parsed.products);
        assert_eq!(parse_payload(""), Parsed::default());
    }
}
