//! The sending end: one task that sends what has queued up, a batch per
//! transaction, and one that says hello while the listener is connected.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::wire::{Token, notify_sql};
use super::{Changes, HELLO_EVERY, Outgoing};

/// Changes sent in one transaction at most.
const MAX_BATCH: usize = 2_000;

/// Longest the next batch of changes gathers while the previous one is
/// being acknowledged.
const GATHER_MAX: Duration = Duration::from_millis(5);

impl Changes {
    /// Says hello every [`HELLO_EVERY`] while the listener is connected.
    pub(super) async fn say_hello(changes: Weak<Changes>) {
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
    pub(super) async fn send_loop(
        changes: Weak<Changes>,
        mut rx: mpsc::UnboundedReceiver<Outgoing>,
    ) {
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
}
