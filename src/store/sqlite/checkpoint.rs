//! Checkpoints on a thread of their own.
//!
//! By default SQLite checkpoints on the connection whose commit left the
//! WAL over 1,000 pages: the writer's thread would copy the WAL's pages
//! into the database file and sync it while every queued write waits (with
//! renewals, that is every few dozen writes). Here the writer leaves that
//! to this thread: a PASSIVE checkpoint every [`PERIOD`] on a connection of
//! its own, beside the writes (a passive checkpoint takes no lock a writer
//! needs, and copies only frames no reader still needs). A page written
//! many times within a period is copied once.
//!
//! The writer keeps SQLite's own checkpoint as a backstop at
//! [`BACKSTOP_PAGES`]. Readers (Validate's, the cache's polls) often hold a
//! snapshot, and the WAL starts over from its beginning only once every
//! frame is copied and no reader needs one; under a steady write load that
//! happens every second or so, and the WAL file reaches up to ~80 MB (the
//! backstop's pages) before it does. A backstop of 4,000 pages kept it
//! smaller but cost renewals 10 % of their throughput. `journal_size_limit`
//! trims the file back to [`WAL_SIZE_LIMIT`] when it starts over.
//!
//! Same-run, `licensd bench --licenses 20000 --duration 5 --workload
//! validate,activate,redeem,issue,mixed` alternated twice against the writer
//! checkpointing itself (the default 1,000 pages): churn 5,643 / 6,050 →
//! 6,101 / 6,492 writes/s, RedeemRenewalCode 6,106 / 6,317 → 6,843 / 7,006
//! calls/s, IssueLicense 9,386 / 9,589 → 10,758 / 11,281; server CPU per
//! write 5 % lower; p99 and mixed within the noise.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{Durability, open_native};
use crate::store::{StoreError, StoreResult};

/// How often the WAL is checkpointed.
pub(super) const PERIOD: Duration = Duration::from_millis(100);

/// The writer's own `wal_autocheckpoint` (pages): only if this thread
/// fell this far behind.
pub(super) const BACKSTOP_PAGES: u32 = 20_000;

/// The WAL file's size once reset (`journal_size_limit`, bytes).
pub(super) const WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// The checkpointing thread; [`Checkpointer::stop`] ends it.
pub(super) struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens a connection to the database at `path` and starts checkpointing.
    pub(super) fn start(
        path: &Path,
        busy_timeout: Duration,
        synchronous: Durability,
    ) -> StoreResult<Self> {
        // The sync of the database file a checkpoint ends with follows
        // the store's durability, as the writer's commits do.
        let pragmas = format!(
            "PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0;",
            synchronous.pragma()
        );
        let conn = open_native(path, busy_timeout, &pragmas)?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("licensd-sqlite-checkpoint".into())
            .spawn(move || run(conn, stopped))
            .map_err(|e| StoreError::Internal(format!("starting the SQLite checkpointer: {e}")))?;
        Ok(Checkpointer { stop, thread })
    }

    /// Ends the thread and closes its connection.
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn run(conn: Connection, stopped: mpsc::Receiver<()>) {
    let seconds = metrics::histogram!("licensd_sqlite_checkpoint_seconds");
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PERIOD) {
        let started = Instant::now();
        // (busy, frames in the WAL, frames checkpointed). Busy means
        // another connection (another process on this file) was
        // checkpointing: the next period tries again.
        let ran = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match ran {
            Ok((frames, copied)) if frames > 0 => {
                seconds.record(started.elapsed().as_secs_f64());
                tracing::trace!(frames, copied, "checkpoint");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "checkpoint failed; the next period tries again"),
        }
    }
}
