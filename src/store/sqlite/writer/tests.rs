use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::native::numbered;
use super::{Committed, GroupWriter};
use crate::domain::Refusal;
use crate::store::rows::Columns;
use crate::store::sql::conn::{Command, Conn, Ending, args, fetch_one};
use crate::store::sqlite::{DEFAULT_WRITER_MMAP_MIB, Durability, migrate};
use crate::store::{StoreError, StoreResult};

#[test]
fn placeholders_are_numbered_for_sqlite() {
    assert_eq!(
        numbered("UPDATE t SET a = $2 WHERE b = $10 AND c = '$'"),
        "UPDATE t SET a = ?2 WHERE b = ?10 AND c = '$'"
    );
}

/// How a test write ends.
#[derive(Clone, Copy)]
enum End {
    Commit,
    /// Refused after writing: its statements roll back.
    Refuse,
    /// Refused before writing anything.
    RefuseFirst,
    /// Refused, keeping what it wrote (as a refused renewal keeps its event).
    RefuseKeeping,
    Panic,
}

/// Writes the setting `name`, holding the writer `hold` first.
struct Put {
    name: &'static str,
    hold: Duration,
    end: End,
}

impl Command for Put {
    type Output = ();

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<()>> {
        std::thread::sleep(self.hold);
        if let End::RefuseFirst = self.end {
            return Err(Refusal::LicenseNotFound.into());
        }
        conn.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2)",
            args![self.name, &b"v".to_vec()],
        )
        .await?;
        match self.end {
            End::Commit => Ok(Ending::Commit(())),
            End::Refuse => Err(Refusal::LicenseNotFound.into()),
            End::RefuseFirst => unreachable!("refused before writing"),
            End::RefuseKeeping => Ok(Ending::CommitRefusal(Refusal::LicenseNotFound)),
            End::Panic => panic!("a write that panics"),
        }
    }
}

/// Whether the setting `name` is stored.
struct Has(&'static str);

impl Command for Has {
    type Output = bool;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<bool>> {
        let row = fetch_one(
            conn,
            "SELECT COUNT(*) FROM settings WHERE name = $1",
            args![self.0],
        )
        .await?;
        Ok(Ending::Commit(row.int(0)? == 1))
    }
}

/// Reads one row of every storage class back through the writer's
/// connection, each column as each accessor reads it.
struct ReadBack;

/// What an accessor of column `at` gave, as text (`Err` as "error: …").
fn shown<T: std::fmt::Debug>(read: StoreResult<T>) -> String {
    match read {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error: {e}"),
    }
}

impl Command for ReadBack {
    type Output = Vec<[String; 5]>;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Self::Output>> {
        let row = fetch_one(
            conn,
            "SELECT NULL, 42, $1, x'00ff', CAST(x'ff' AS TEXT), 1.5, ''",
            args!["héllo ✓"],
        )
        .await?;
        let columns = (0..8)
            .map(|at| {
                [
                    shown(row.opt_int(at)),
                    shown(row.int(at)),
                    shown(row.opt_text(at)),
                    shown(row.text(at)),
                    shown(row.blob(at)),
                ]
            })
            .collect();
        Ok(Ending::Commit(columns))
    }
}

/// Rows come off the writer's connection as values with their bytes in
/// one buffer: each accessor gives back what was stored, and a column of
/// another type, a NULL where a value must be, text that is not UTF-8 or
/// a column past the row's end is an error, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_read_back_as_stored_and_mismatches_are_errors() {
    let (_dir, w) = writer().await;
    let columns = w.run(ReadBack, ignored()).await.unwrap();
    let ok = |s: &str| !s.starts_with("error");
    let [opt_int, int, opt_text, text, blob] = &columns[0];
    assert_eq!(opt_int, "None");
    assert!(!ok(int) && int.contains("NULL"), "{int}");
    assert_eq!(opt_text, "None");
    assert!(!ok(text) && text.contains("NULL"), "{text}");
    assert!(!ok(blob) && blob.contains("NULL"), "{blob}");
    let [opt_int, int, opt_text, _, _] = &columns[1];
    assert_eq!((opt_int.as_str(), int.as_str()), ("Some(42)", "42"));
    assert!(
        !ok(opt_text) && opt_text.contains("INTEGER in column 1"),
        "{opt_text}"
    );
    let [opt_int, _, opt_text, text, blob] = &columns[2];
    assert!(
        !ok(opt_int) && opt_int.contains("TEXT in column 2"),
        "{opt_int}"
    );
    assert_eq!(opt_text, "Some(\"héllo ✓\")");
    assert_eq!(text, "\"héllo ✓\"");
    assert!(!ok(blob), "{blob}");
    let [_, _, opt_text, _, blob] = &columns[3];
    assert_eq!(blob, "[0, 255]");
    assert!(!ok(opt_text) && opt_text.contains("BLOB"), "{opt_text}");
    let [_, _, opt_text, text, _] = &columns[4];
    assert!(!ok(opt_text) && opt_text.contains("UTF-8"), "{opt_text}");
    assert!(!ok(text) && text.contains("UTF-8"), "{text}");
    assert!(
        columns[5].iter().all(|s| !ok(s) && s.contains("REAL")),
        "{:?}",
        columns[5]
    );
    let [_, _, opt_text, text, _] = &columns[6];
    assert_eq!((opt_text.as_str(), text.as_str()), ("Some(\"\")", "\"\""));
    assert!(
        columns[7].iter().all(|s| s.contains("no column 7")),
        "{:?}",
        columns[7]
    );
    w.close().await;
}

async fn writer() -> (tempfile::TempDir, GroupWriter) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    migrate(&path).await.unwrap();
    let w = GroupWriter::start(&path, Duration::from_secs(2), Durability::Full, 64 << 20).unwrap();
    (dir, w)
}

/// A write that holds the writer's thread for a while, so that the writes
/// queued meanwhile share the next batch.
fn hold() -> Put {
    Put {
        name: "hold",
        hold: Duration::from_millis(300),
        end: End::Commit,
    }
}

fn put(name: &'static str, end: End) -> Put {
    Put {
        name,
        hold: Duration::ZERO,
        end,
    }
}

fn ignored() -> Committed {
    Box::new(|_| {})
}

async fn has(w: &GroupWriter, name: &'static str) -> bool {
    w.run(Has(name), ignored()).await.unwrap()
}

/// Runs one batch of three writes (queued while [`hold`] holds the
/// writer): "a" commits, "b" is refused as `b_end` says, "c" is refused
/// keeping its write. Checks every answer and what is stored; returns how
/// many writes the cache was told of.
async fn refusals_in_a_batch(w: &GroupWriter, b_end: End) -> usize {
    let told = Arc::new(AtomicUsize::new(0));
    let counted = || {
        let told = told.clone();
        Box::new(move |_refused: bool| {
            told.fetch_add(1, Ordering::SeqCst);
        }) as Committed
    };
    let later = || tokio::time::sleep(Duration::from_millis(50));
    let (first, a, b, c) = tokio::join!(
        w.run(hold(), counted()),
        async {
            later().await;
            w.run(put("a", End::Commit), counted()).await
        },
        async {
            later().await;
            w.run(put("b", b_end), counted()).await
        },
        async {
            later().await;
            w.run(put("c", End::RefuseKeeping), counted()).await
        },
    );
    first.unwrap();
    a.unwrap();
    assert!(matches!(b, Err(StoreError::Refused(_))), "{b:?}");
    assert!(matches!(c, Err(StoreError::Refused(_))), "{c:?}");
    assert_eq!(
        (has(w, "a").await, has(w, "b").await, has(w, "c").await),
        (true, false, true)
    );
    told.load(Ordering::SeqCst)
}

/// Each refusal in a batch undoes only its own statements, a refusal that
/// keeps its writes commits them, and the others commit; the cache is told
/// of each write that committed something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_a_batch_undoes_only_its_own_writes() {
    let (_dir, w) = writer().await;
    let told = refusals_in_a_batch(&w, End::Refuse).await;
    assert_eq!(told, 3, "hold, a and c committed");
    // b wrote before it failed: its batch ran again, a savepoint each.
    assert_eq!(w.reruns(), 1);
    w.close().await;
}

/// A refusal decided before its command wrote anything leaves nothing to
/// undo: the batch commits the others without running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_writing_needs_no_second_run() {
    let (_dir, w) = writer().await;
    let told = refusals_in_a_batch(&w, End::RefuseFirst).await;
    assert_eq!(told, 3, "hold, a and c committed");
    assert_eq!(w.reruns(), 0);
    w.close().await;
}

/// A write whose caller gave up before its batch began is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_left_before_its_batch_is_not_written() {
    let (_dir, w) = writer().await;
    let (first, gone) = tokio::join!(w.run(hold(), ignored()), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let write = w.run(put("gone", End::Commit), ignored());
        tokio::time::timeout(Duration::from_millis(20), write).await
    });
    first.unwrap();
    assert!(gone.is_err(), "the caller gave up");
    assert!(!has(&w, "gone").await);
    w.close().await;
}

/// A write that panics fails its batch (nothing of it is kept) and the
/// writer goes on with the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_write_fails_its_batch_and_the_writer_goes_on() {
    let (_dir, w) = writer().await;
    let (first, before, boom) = tokio::join!(
        w.run(hold(), ignored()),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.run(put("before", End::Commit), ignored()).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            w.run(put("boom", End::Panic), ignored()).await
        },
    );
    first.unwrap();
    assert!(matches!(before, Err(StoreError::Internal(_))), "{before:?}");
    assert!(matches!(boom, Err(StoreError::Internal(_))), "{boom:?}");
    assert!(!has(&w, "before").await && !has(&w, "boom").await);
    w.run(put("after", End::Commit), ignored()).await.unwrap();
    assert!(has(&w, "after").await);
    w.close().await;
}

/// The WAL is copied into the database file by the checkpointing thread,
/// not by the writer (whose own checkpoint waits for 20,000 pages), soon
/// after a commit: a copy of the database file alone, without its WAL,
/// holds what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_committed_writes_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    migrate(&path).await.unwrap();
    let w = GroupWriter::start(
        &path,
        Duration::from_secs(2),
        Durability::Full,
        DEFAULT_WRITER_MMAP_MIB << 20,
    )
    .unwrap();
    let in_file_alone = || {
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        let alone = rusqlite::Connection::open(&copy).unwrap();
        let stored: i64 = alone
            .query_row(
                "SELECT COUNT(*) FROM settings WHERE name = 'checkpointed'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        stored == 1
    };
    assert!(!in_file_alone(), "nothing written yet");
    w.run(put("checkpointed", End::Commit), ignored())
        .await
        .unwrap();
    // A checkpoint follows the commit within a period; a busy machine may
    // take longer, but not seconds.
    let waited = Instant::now();
    while !in_file_alone() {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the write reached the database file itself"
        );
        tokio::time::sleep(super::checkpoint::PERIOD).await;
    }
    w.close().await;
}

/// The bundled SQLite is compiled with the repository's flags
/// (`.cargo/config.toml`, `LIBSQLITE3_FLAGS`): `DEFAULT_MEMSTATUS=0` is the
/// one of them SQLite reports; `HAVE_FDATASYNC=1`, which it does not,
/// comes in the same line.
#[test]
fn sqlite_is_compiled_with_the_repositorys_flags() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let options: Vec<String> = conn
        .prepare("PRAGMA compile_options")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "{options:?}"
    );
}
