use rusqlite::{Connection, OpenFlags};

use super::{MAX_WRITE, NAME, register, wal_writes};

/// A database in WAL mode at `path`, opened through the VFS with
/// `synchronous = FULL` and a page cache of `cache_pages`.
fn through_vfs(path: &std::path::Path, cache_pages: u32) -> Connection {
    register().unwrap();
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        NAME,
    )
    .unwrap();
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = {cache_pages}; \
         PRAGMA wal_autocheckpoint = 0;"
    ))
    .unwrap();
    conn
}

#[test]
fn a_commits_frames_reach_the_wal_in_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let conn = through_vfs(&dir.path().join("one.db"), 2000);
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .unwrap();
    let before = wal_writes();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..200 {
        tx.execute("INSERT INTO t (id, body) VALUES (?1, zeroblob(3000))", [i])
            .unwrap();
    }
    tx.commit().unwrap();
    let frames: i64 = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap();
    // ~200 pages: ~400 writes without the VFS (a header and a page each),
    // here as few as the default VFS's largest write allows.
    assert!(frames >= 200, "{frames} frames");
    let bytes = frames as usize * (24 + 4096);
    let writes = wal_writes() - before;
    assert!(
        writes as usize <= bytes.div_ceil(MAX_WRITE) + 1,
        "{writes} writes for {frames} frames"
    );
}

/// Many commits, large and small, some spilling the page cache into the
/// WAL mid-transaction and changing those pages again: after each, a
/// connection through the default VFS reads exactly what was committed.
#[test]
fn every_commit_is_in_the_file_for_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.db");
    let conn = through_vfs(&path, 16);
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, body BLOB NOT NULL); \
         CREATE INDEX t_n ON t (n);",
    )
    .unwrap();
    let other = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut expected_rows = 0i64;
    let mut expected_sum = 0i64;
    for round in 0i64..60 {
        let tx = conn.unchecked_transaction().unwrap();
        // Every seventh round is large enough to spill 16 pages of cache.
        let inserts = if round % 7 == 0 { 400 } else { 1 + round % 5 };
        for i in 0..inserts {
            let id = round * 1000 + i;
            tx.execute(
                "INSERT INTO t (id, n, body) VALUES (?1, ?2, randomblob(500))",
                [id, id % 97],
            )
            .unwrap();
            expected_rows += 1;
            expected_sum += id % 97;
        }
        // Pages already spilled this transaction change again.
        let changed = tx
            .execute("UPDATE t SET n = n + 1 WHERE id >= ?1", [round * 1000])
            .unwrap() as i64;
        expected_sum += changed;
        tx.commit().unwrap();
        let (rows, sum): (i64, i64) = other
            .query_row("SELECT count(*), coalesce(sum(n), 0) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((rows, sum), (expected_rows, expected_sum), "round {round}");
        if round % 20 == 19 {
            // The WAL starts over from its beginning after a full checkpoint.
            conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .unwrap();
        }
    }
    let check: String = other
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    drop(other);
    let reopened = Connection::open(&path).unwrap();
    let rows: i64 = reopened
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, expected_rows);
}
