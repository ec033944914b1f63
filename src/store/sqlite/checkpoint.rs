//! Checkpoints on a thread of their own.
//!
//! By default SQLite checkpoints on the connection whose commit left the
//! WAL over 1,000 pages: the writer's thread would copy the WAL's pages
//! into the database file and sync it while every queued write waits (with
//! renewals, that is every few dozen writes). Here the writer leaves that
//! to this thread: after a commit the writer rings it ([`Doorbell`]), and
//! it runs a PASSIVE checkpoint on a connection of its own, beside the
//! writes (a passive checkpoint takes no lock a writer needs, and copies
//! only frames no reader still needs), at most one per [`PERIOD`]. An idle
//! store wakes nothing.
//!
//! Why often and small: a checkpoint ends with a sync of the database
//! file, and a commit's sync of the WAL waits behind it on the same disk.
//! With a checkpoint every 100 ms, batches of commits took up to 50 ms
//! (`licensd_sqlite_commit_seconds`, against 4 ms on average), and those
//! batches were the write p99. Same run, `licensd bench --licenses 100000
//! --duration 8 --workload activate,redeem,issue`, a checkpoint every
//! 100 ms against at most every 10 ms after a commit, alternated twice:
//! p99 Activate 19.3 / 16.8 → 16.6 / 16.1 ms, RedeemRenewalCode 42.4 /
//! 40.3 → 29.2 / 31.5 ms, IssueLicense 23.5 / 21.2 → 18.4 / 18.7 ms;
//! throughput and server CPU per write within the noise. Every second made
//! the tail longer (RedeemRenewalCode p99 48–50 ms), every 20 ms was in
//! between (27–32 ms). A page written many times within a period is still
//! copied once.
//!
//! The writer keeps SQLite's own checkpoint as a backstop at
//! [`BACKSTOP_PAGES`]. Readers (Validate's, the cache's polls) often hold a
//! snapshot, and the WAL starts over from its beginning only once every
//! frame is copied and no reader needs one; under a steady write load that
//! happens every second or so, and the WAL file reaches up to ~80 MB (the
//! backstop's pages) before it does. A backstop of 4,000 pages kept it
//! smaller but cost renewals 10 % of their throughput. `journal_size_limit`
//! trims the file back to [`WAL_SIZE_LIMIT`] when it starts over: half as
//! much again as the backstop's pages, so a steady load writes over the
//! same file every time. At 64 MiB, below the ~80 MB a steady load
//! reaches, every restart cut the file (`walLimitSize`, an ext4 truncate
//! on the writer's thread) and the next second grew it again, each commit
//! past the cut also syncing the file's new size. Same binary, 64 MiB
//! against 256 MiB, `--licenses 100000 --duration 8 --workload
//! activate,redeem,issue` alternated six times: server CPU per renewal 211
//! / 238 / 203 / 247 / 237 / 244 → 265 / 204 / 192 / 239 / 213 / 240 µs,
//! its p99 24.2 / 27.3 / 22.8 / 30.3 / 26.2 / 29.1 → 31.9 / 21.5 / 21.1 /
//! 27.1 / 23.2 / 26.1 ms; per IssueLicense 126 / 136 / 115 / 133 / 141 /
//! 143 → 138 / 111 / 104 / 127 / 114 / 133 µs (the first round against,
//! the five after for); Activate within the noise.
//!
//! Same-run, `licensd bench --licenses 20000 --duration 5 --workload
//! validate,activate,redeem,issue,mixed` alternated twice against the writer
//! checkpointing itself (the default 1,000 pages): churn 5,643 / 6,050 →
//! 6,101 / 6,492 writes/s, RedeemRenewalCode 6,106 / 6,317 → 6,843 / 7,006
//! calls/s, IssueLicense 9,386 / 9,589 → 10,758 / 11,281; server CPU per
//! write 5 % lower; p99 and mixed within the noise.

use std::path::Path;
use std::sync::mpsc::{self, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{Durability, open_native};
use crate::store::{StoreError, StoreResult};

/// The shortest time between two checkpoints.
pub(super) const PERIOD: Duration = Duration::from_millis(10);

/// The writer's own `wal_autocheckpoint` (pages): only if this thread
/// fell this far behind.
pub(super) const BACKSTOP_PAGES: u32 = 20_000;

/// The bytes of the backstop's pages in the WAL: a frame is a page (4 KiB,
/// SQLite's default page size) and its 24-byte header.
const BACKSTOP_WAL_BYTES: u64 = BACKSTOP_PAGES as u64 * (4096 + 24);

/// The WAL file's size once reset (`journal_size_limit`, bytes): one and
/// a half times the backstop's frames, ~124 MB.
pub(super) const WAL_SIZE_LIMIT: u64 = BACKSTOP_WAL_BYTES * 3 / 2;
const _: () = assert!(WAL_SIZE_LIMIT > BACKSTOP_WAL_BYTES);

/// What the checkpointing thread is told.
enum Signal {
    /// The writer committed.
    Committed,
    /// End the thread.
    Stop,
}

/// The writer's side: rung after each commit.
pub(super) struct Doorbell(mpsc::SyncSender<Signal>);

impl Doorbell {
    /// Something was committed: a checkpoint is due (within [`PERIOD`]).
    pub(super) fn ring(&self) {
        // Full: a ring is already waiting, and it covers this commit too.
        let _ = self.0.try_send(Signal::Committed);
    }
}

/// The checkpointing thread; [`Checkpointer::stop`] ends it.
pub(super) struct Checkpointer {
    signals: mpsc::SyncSender<Signal>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens a connection to the database at `path` and starts the
    /// thread, which checkpoints when the [`Doorbell`] rings.
    pub(super) fn start(
        path: &Path,
        busy_timeout: Duration,
        synchronous: Durability,
    ) -> StoreResult<(Self, Doorbell)> {
        // The sync of the database file a checkpoint ends with follows
        // the store's durability, as the writer's commits do.
        let pragmas = format!(
            "PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0;",
            synchronous.pragma()
        );
        let conn = open_native(path, busy_timeout, &pragmas, false)?;
        let (signals, received) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(super::CHECKPOINT_THREAD.into())
            .spawn(move || run(conn, received))
            .map_err(|e| StoreError::Internal(format!("starting the SQLite checkpointer: {e}")))?;
        let doorbell = Doorbell(signals.clone());
        Ok((Checkpointer { signals, thread }, doorbell))
    }

    /// Ends the thread and closes its connection.
    pub(super) fn stop(self) {
        let _ = self.signals.send(Signal::Stop);
        let _ = self.thread.join();
    }
}

fn run(conn: Connection, signals: mpsc::Receiver<Signal>) {
    let seconds = metrics::histogram!("licensd_sqlite_checkpoint_seconds");
    let mut last: Option<Instant> = None;
    // Each ring is answered by a checkpoint that starts after it.
    while let Ok(Signal::Committed) = signals.recv() {
        // At most one per period: the rest of it is slept out, without
        // waking for the rings meanwhile (one waits in the channel, and
        // the checkpoint below covers it).
        if let Some(due) = last.map(|at| at + PERIOD) {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let stop = matches!(
            signals.try_recv(),
            Ok(Signal::Stop) | Err(TryRecvError::Disconnected)
        );
        let started = Instant::now();
        last = Some(started);
        // (busy, frames in the WAL, frames checkpointed). Busy means
        // another connection (another process on this file) was
        // checkpointing: the next commit's ring tries again.
        let ran = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match ran {
            Ok((frames, copied)) if frames > 0 => {
                seconds.record(started.elapsed().as_secs_f64());
                tracing::trace!(frames, copied, "checkpoint");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "checkpoint failed; the next commit tries again"),
        }
        if stop {
            return;
        }
    }
}
