//! SQLite's writes: one thread owns the one write connection (rusqlite,
//! no async driver between) and commits the writes queued meanwhile
//! together — group commit.
//!
//! A caller queues its [`Command`] and waits for the answer. The thread
//! takes every command queued (up to [`MAX_BATCH`]), opens one
//! `BEGIN IMMEDIATE` transaction, runs the commands one after the other,
//! commits once, and only then answers every caller. A refusal or an error
//! undoes that command's statements only (a refusal that keeps a history
//! event commits it): almost every refusal is decided before its command
//! writes anything, so there is nothing to undo, and the commands run
//! straight in the transaction; when a command did write before it failed,
//! the batch is rolled back and run again with each command in a SAVEPOINT
//! of its own (see [`Isolation`]). With `synchronous = FULL` the commit
//! syncs the WAL once for the whole batch: while one batch's sync runs,
//! the next batch queues, so the syncs are shared by more writes the more
//! writes arrive.
//!
//! Why a thread and not sqlx: through sqlx each statement crosses from a
//! Tokio worker to the connection's thread and back (4–6 hand-offs per
//! write, more CPU than SQLite's own work); here a write is one hand-off to
//! this thread and one back, and its statements run as plain calls with
//! cached prepared statements.
//!
//! What a commit failure means: every command of the batch that would
//! have committed is answered with the error (UNAVAILABLE for a full or
//! read-only disk); none of them is in the database.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::checkpoint::{self, Checkpointer, Doorbell};
use super::{Durability, open_native};
use crate::store::sql::conn::{Command, Ending};
use crate::store::{StoreError, StoreResult};

/// The most commands one transaction commits.
pub const MAX_BATCH: usize = 256;

/// The write connection's page cache (SQLite's default is 2 MiB): the
/// pages a write reads and changes stay in memory instead of being read
/// again from the file (one `pread` each).
///
/// What a larger cache costs besides memory: when a b-tree page splits,
/// SQLite (3.51) puts the new pages in ascending order by giving one of
/// them, for a moment, the number of the page past 1 GiB (the lock-byte
/// page) in the cache, and the commit after it, which drops cached pages
/// past the end of the file, then walks the whole cache's hash table to
/// find it (`pcache1TruncateUnsafe`): with renewals, ~5 % of this
/// thread's time with 16 MiB (`perf`; gdb on `pcache1Fetch` showed the
/// key and its caller, `balance_nonroot`). The walk grows with the cache;
/// the `pread`s a smaller cache adds cost as much: 4 MiB measured the
/// same within the noise.
const WRITER_CACHE_KIB: u32 = 16 * 1024;

/// Called on the writer's thread once a command's transaction committed,
/// before its caller hears (whether or not the caller still waits): `true`
/// when what committed is a refusal's history event only.
pub(in crate::store) type Committed = Box<dyn FnOnce(bool) + Send>;

/// The queue to the writer's thread.
pub(in crate::store) struct GroupWriter {
    queue: mpsc::Sender<Msg>,
    /// Batches run a second time (see [`Isolation`]).
    #[cfg_attr(not(test), allow(dead_code))]
    rerun_count: Arc<AtomicU64>,
    /// Whether the thread is running a batch now (the `writer` pool's one
    /// connection in use, for the pool metrics).
    busy: Arc<AtomicBool>,
    /// The WAL's checkpoints, beside the writes; stopped by `close`.
    checkpointer: Mutex<Option<Checkpointer>>,
}

enum Msg {
    Job(Box<dyn Job>),
    /// Finish what is queued before, close the connection, then say so.
    Close(oneshot::Sender<()>),
}

impl GroupWriter {
    /// Opens the write connection to the (migrated) database at `path`,
    /// mapping up to `mmap_bytes` of it (see
    /// [`DEFAULT_WRITER_MMAP_MIB`](super::DEFAULT_WRITER_MMAP_MIB)), and
    /// starts its thread.
    pub(in crate::store) fn start(
        path: &Path,
        busy_timeout: Duration,
        synchronous: Durability,
        mmap_bytes: u64,
    ) -> StoreResult<Self> {
        let pragmas = format!(
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = {}; PRAGMA temp_store = MEMORY; \
             PRAGMA cache_size = -{WRITER_CACHE_KIB}; PRAGMA wal_autocheckpoint = {}; \
             PRAGMA journal_size_limit = {}; PRAGMA mmap_size = {mmap_bytes};",
            synchronous.pragma(),
            checkpoint::BACKSTOP_PAGES,
            checkpoint::WAL_SIZE_LIMIT,
        );
        // Each commit's WAL frames in one write: safe when every commit
        // syncs the WAL (see `wal_vfs`).
        let gathered = synchronous == Durability::Full;
        let conn = open_native(path, busy_timeout, &pragmas, gathered)?;
        conn.set_prepared_statement_cache_capacity(64);
        let (queue, jobs) = mpsc::channel();
        let rerun_count = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            conn: NativeConn::new(conn),
            waited: metrics::Histogram::noop(),
            reruns: metrics::Counter::noop(),
            rerun_count: rerun_count.clone(),
        };
        let (checkpointer, doorbell) = Checkpointer::start(path, busy_timeout, synchronous)?;
        std::thread::Builder::new()
            .name(super::WRITER_THREAD.into())
            .spawn({
                let busy = busy.clone();
                move || serve(writer, jobs, &busy, &doorbell)
            })
            .map_err(|e| StoreError::Internal(format!("starting the SQLite writer: {e}")))?;
        Ok(GroupWriter {
            queue,
            rerun_count,
            busy,
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Runs `cmd` in the next batch; `committed` is called once it
    /// committed. A caller that goes away before its batch begins takes
    /// its command back; once begun it runs, and `committed` still tells
    /// the cache.
    pub(in crate::store) async fn run<K: Command>(
        &self,
        cmd: K,
        committed: Committed,
    ) -> StoreResult<K::Output> {
        let (reply, answer) = oneshot::channel();
        let job = Queued {
            queued_at: Instant::now(),
            cmd,
            outcome: None,
            reply,
            committed: Some(committed),
        };
        self.queue
            .send(Msg::Job(Box::new(job)))
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Whether a batch is running now.
    pub(in crate::store) fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// How many batches ran a second time, with savepoints.
    #[cfg(test)]
    fn reruns(&self) -> u64 {
        self.rerun_count.load(Ordering::Relaxed)
    }

    /// Lets the queued writes finish, then closes the connection (the last
    /// connection to close checkpoints the WAL).
    pub(in crate::store) async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.queue.send(Msg::Close(ack)).is_ok() {
            let _ = done.await;
        }
        let taken = match self.checkpointer.lock() {
            Ok(mut c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(checkpointer) = taken {
            // Joins its thread (at most one checkpoint long).
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// How a batch runs its commands in its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// One after the other, straight in the transaction. A savepoint per
    /// command costs a copy of every page the command changes (SQLite's
    /// sub-journal, kept in case of a rollback to it) plus two statements:
    /// about 6 % of a renewal's server CPU. Kept only while no command
    /// fails after writing.
    Shared,
    /// Each command in a SAVEPOINT of its own, undone alone if it fails.
    Savepoints,
}

/// What running a command left in the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// What it changed (if anything) is to commit.
    Kept,
    /// It failed after changing rows, with no savepoint to undo just
    /// those: the batch must run again with [`Isolation::Savepoints`].
    Tangled,
}

/// A queued command, type-erased for the queue.
trait Job: Send {
    /// Runs the command in the open transaction.
    fn run(&mut self, writer: &mut Writer, isolation: Isolation) -> Ran;
    /// Answers the caller once the batch ended (`commit`: how).
    fn finish(self: Box<Self>, commit: &Result<(), StoreError>);
}

struct Queued<K: Command> {
    queued_at: Instant,
    cmd: K,
    outcome: Option<StoreResult<Ending<K::Output>>>,
    reply: oneshot::Sender<StoreResult<K::Output>>,
    committed: Option<Committed>,
}

impl<K: Command> Job for Queued<K> {
    fn run(&mut self, writer: &mut Writer, isolation: Isolation) -> Ran {
        if self.reply.is_closed() {
            // Its caller gave up (a deadline, a client gone) before the
            // write began: it is not written, as the caller was told.
            self.outcome = Some(Err(closed()));
            self.committed = None;
            return Ran::Kept;
        }
        if self.outcome.is_none() {
            writer.waited.record(self.queued_at.elapsed().as_secs_f64());
        }
        let (cmd, conn) = (&self.cmd, &mut writer.conn);
        // Every row a statement inserts, updates or deletes (a trigger's
        // too) counts; a statement that failed was undone by SQLite and
        // counts nothing.
        let before = conn.conn.total_changes();
        let outcome = match isolation {
            Isolation::Savepoints => conn.in_savepoint(|conn| now_or_never(cmd.run(conn))),
            Isolation::Shared => now_or_never(cmd.run(conn)),
        };
        let tangled = isolation == Isolation::Shared
            && outcome.is_err()
            && conn.conn.total_changes() != before;
        self.outcome = Some(outcome);
        if tangled { Ran::Tangled } else { Ran::Kept }
    }

    fn finish(self: Box<Self>, commit: &Result<(), StoreError>) {
        let Queued {
            outcome,
            reply,
            committed,
            ..
        } = *self;
        let answer = match (outcome, commit) {
            // Rolled back to its savepoint: its own answer, whatever the batch did.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(ending)), Ok(())) => {
                if let Some(committed) = committed {
                    committed(matches!(ending, Ending::CommitRefusal(_)));
                }
                ending.answer()
            }
            (_, Err(e)) => Err(same(e)),
            (None, Ok(())) => Err(StoreError::Internal("a queued write did not run".into())),
        };
        let _ = reply.send(answer);
    }
}

/// Another error saying what `e` says (each caller of a failed batch gets one).
fn same(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Retryable(m) => StoreError::Retryable(m.clone()),
        StoreError::Refused(r) => StoreError::Internal(format!("batch refused: {r}")),
        StoreError::Internal(m) => StoreError::Internal(m.clone()),
    }
}

/// A command's future on this connection never waits (every statement is
/// a plain call): polled once, it is ready.
fn now_or_never<T>(f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(StoreError::Internal(
            "a write on the SQLite writer waited".into(),
        )),
    }
}

/// The writer thread: a batch at a time until the store closes.
fn serve(mut writer: Writer, queue: mpsc::Receiver<Msg>, busy: &AtomicBool, doorbell: &Doorbell) {
    writer.waited = metrics::histogram!("licensd_db_acquire_seconds");
    writer.reruns = metrics::counter!("licensd_sqlite_batch_reruns_total");
    let batch_sizes = metrics::histogram!("licensd_sqlite_batch_writes");
    let commit_seconds = metrics::histogram!("licensd_sqlite_commit_seconds");
    let mut closing = None;
    while closing.is_none() {
        let Ok(first) = queue.recv() else { break };
        let mut jobs: Vec<Box<dyn Job>> = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Job(job) => jobs.push(job),
                Msg::Close(ack) => closing = Some(ack),
            }
            if closing.is_none() && jobs.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        if jobs.is_empty() {
            continue;
        }
        batch_sizes.record(jobs.len() as f64);
        busy.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let commit = writer.batch(&mut jobs);
        commit_seconds.record(started.elapsed().as_secs_f64());
        busy.store(false, Ordering::Relaxed);
        if commit.is_ok() {
            doorbell.ring();
        }
        for job in jobs {
            job.finish(&commit);
        }
    }
    drop(writer);
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

/// The writer thread's state: its connection and what it counts.
struct Writer {
    conn: NativeConn,
    /// How long each write waited for its batch (`licensd_db_acquire_seconds`).
    waited: metrics::Histogram,
    /// Batches run again with savepoints (a command failed after
    /// writing): `licensd_sqlite_batch_reruns_total`, and a count tests read.
    reruns: metrics::Counter,
    rerun_count: Arc<AtomicU64>,
}

impl Writer {
    /// One transaction for `jobs`; how it ended. The commands run
    /// straight in it; if one of them failed after writing, the
    /// transaction is rolled back and the batch runs again, each command in
    /// its savepoint (every command's answer is then the second run's).
    fn batch(&mut self, jobs: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
        if self.attempt(jobs, Isolation::Shared)? == Ran::Kept {
            return Ok(());
        }
        self.reruns.increment(1);
        self.rerun_count.fetch_add(1, Ordering::Relaxed);
        self.attempt(jobs, Isolation::Savepoints).map(drop)
    }

    /// `jobs` in one transaction, committed unless a command is
    /// [`Ran::Tangled`] (then rolled back).
    fn attempt(
        &mut self,
        jobs: &mut [Box<dyn Job>],
        isolation: Isolation,
    ) -> Result<Ran, StoreError> {
        let result = self.conn.plain("BEGIN IMMEDIATE").and_then(|()| {
            for job in jobs.iter_mut() {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    job.run(self, isolation)
                }));
                match ran {
                    Err(_) => return Err(StoreError::Internal("a write panicked".into())),
                    Ok(Ran::Tangled) => return Ok(Ran::Tangled),
                    Ok(Ran::Kept) => {}
                }
                if self.conn.conn.is_autocommit() {
                    // SQLite rolled the whole transaction back itself (a
                    // disk error): the commands before this one are gone too.
                    return Err(StoreError::Unavailable(
                        "SQLite rolled the batch back after an error".into(),
                    ));
                }
            }
            self.conn.plain("COMMIT").map(|()| Ran::Kept)
        });
        if !matches!(result, Ok(Ran::Kept)) && !self.conn.conn.is_autocommit() {
            let _ = self.conn.plain("ROLLBACK");
        }
        result
    }
}

#[cfg(test)]
mod tests;

mod native;
use native::NativeConn;
