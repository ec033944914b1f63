//! How many statements each write sends to PostgreSQL inside its
//! transaction, and in how many round trips: a new one should be a
//! decision, not an accident. Needs `LICENSD_TEST_POSTGRES_URL` (set by `.ci/run`);
//! without it the test says so and passes, except in CI.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Connection};

use super::conn::{Arg, Command, Conn, Ending, Step, args};
use super::licenses::Issue;
use super::renewal::RedeemCode;
use super::seats::{Activate, Deactivate};
use super::{SqlStore, Writer};
use crate::domain::product::ProductSpec;
use crate::domain::{Edition, LicenseKey, LicenseKind, Product, ProductCode, RenewalCode, Version};
use crate::store::postgres::{self, PostgresOptions};
use crate::store::rows::Dialect;
use crate::store::{Actor, IssueLicense, IssueRenewalCode, Redeem, StoreResult};

/// A connection that counts the statements sent through it.
struct Counting<'c> {
    inner: &'c mut AnyConnection,
    sent: usize,
}

impl Conn for Counting<'_> {
    type Row = AnyRow;

    fn dialect(&self) -> Dialect {
        self.inner.dialect()
    }

    async fn execute(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        self.sent += 1;
        self.inner.execute(sql, args).await
    }

    async fn fetch_all(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<Vec<AnyRow>> {
        self.sent += 1;
        self.inner.fetch_all(sql, args).await
    }

    async fn fetch_optional(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<AnyRow>> {
        self.sent += 1;
        self.inner.fetch_optional(sql, args).await
    }

    async fn execute_chain(&mut self, steps: &[Step<'_, '_>]) -> StoreResult<u64> {
        self.sent += 1;
        self.inner.execute_chain(steps).await
    }

    async fn finish_chain_if_claimed<T: Send>(
        &mut self,
        steps: &[Step<'_, '_>],
        ending: Ending<T>,
    ) -> StoreResult<Option<Ending<T>>> {
        self.sent += 1;
        self.inner.finish_chain_if_claimed(steps, ending).await
    }

    async fn finish_insert<T: Send>(
        &mut self,
        insert: Step<'_, '_>,
        then: Step<'_, '_>,
        ending: Ending<T>,
    ) -> StoreResult<Ending<T>> {
        self.sent += 1;
        self.inner.finish_insert(insert, then, ending).await
    }
}

/// Claims the setting `claim` (from "free" to "taken"), then stores the
/// setting `then`, as one claimed chain; whether the claim changed its row.
struct ClaimThenStore {
    then: &'static str,
}

impl Command for ClaimThenStore {
    type Output = bool;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<bool>> {
        let claim: Step = (
            "UPDATE settings SET value = $1 WHERE name = 'claim' AND value = $2",
            args![&b"taken"[..], &b"free"[..]],
        );
        let then: Step = (
            "INSERT INTO settings (name, value) VALUES ($1, $2)",
            args![self.then, &b"stored"[..]],
        );
        let claimed = conn
            .finish_chain_if_claimed(&[claim, then], Ending::Commit(true))
            .await?;
        Ok(claimed.unwrap_or(Ending::Commit(false)))
    }
}

/// Whether the setting `name` is stored.
async fn stored_setting(store: &SqlStore, name: &str) -> bool {
    let mut conn = store.readers.acquire().await.unwrap();
    let rows = (*conn)
        .fetch_all("SELECT name FROM settings WHERE name = $1", args![name])
        .await
        .unwrap();
    !rows.is_empty()
}

/// A chain whose claim changes its row runs whole; once the row is
/// claimed, the same chain changes nothing (on PostgreSQL its statement
/// fails inside the transaction whose COMMIT went with it), the command
/// still commits what it decided, and the store goes on.
async fn a_claimed_chain_runs_only_if_its_claim_changes_a_row(store: &SqlStore) {
    // Whether a chain storing `then` claimed the row, and whether `then`
    // is stored.
    let chain = async |then: &'static str| {
        let claimed = store.write(None, ClaimThenStore { then }).await.unwrap();
        (claimed, stored_setting(store, then).await)
    };
    let free = async || {
        store
            .write(None, PutSetting("claim", b"free"))
            .await
            .unwrap()
    };
    free().await;
    assert_eq!(chain("first").await, (true, true));
    assert_eq!(
        chain("second").await,
        (false, false),
        "nothing of an unclaimed chain"
    );
    free().await;
    assert_eq!(chain("third").await, (true, true));
}

/// Stores the setting `.0` with the value `.1` (replacing it).
struct PutSetting(&'static str, &'static [u8]);

impl Command for PutSetting {
    type Output = ();

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<()>> {
        conn.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            args![self.0, self.1],
        )
        .await?;
        Ok(Ending::Commit(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_runs_a_claimed_chain_only_if_its_claim_changes_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::store::DatabaseUrl::Sqlite(dir.path().join("claim.db"));
    let store = url.open(PostgresOptions::default()).await.unwrap();
    a_claimed_chain_runs_only_if_its_claim_changes_a_row(&store).await;
    store.close().await;
}

/// Runs `cmd` in a transaction of its own and commits it; how many
/// statements it sent between BEGIN and COMMIT.
async fn sent_by<K: Command>(store: &SqlStore, cmd: K) -> usize {
    let mut conn = store.readers.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let mut counting = Counting {
        inner: &mut tx,
        sent: 0,
    };
    let ending = cmd.run(&mut counting).await.unwrap();
    let sent = counting.sent;
    assert!(matches!(ending, Ending::Commit(_)), "the write committed");
    tx.commit().await.unwrap();
    sent
}

fn at() -> DateTime<Utc> {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

fn acme() -> ProductCode {
    ProductCode::parse("ACME").unwrap()
}

fn actor() -> Actor {
    Actor("billing".into())
}

fn issue_cmd(request_id: &str) -> IssueLicense {
    IssueLicense {
        request_id: request_id.into(),
        product: acme(),
        edition: Edition::Business,
        kind: LicenseKind::Standard,
        seats: 2,
        term_years: 1,
        starts_at: None,
        order_ref: "o-1".into(),
        customer_ref: "c-1".into(),
        reseller: String::new(),
    }
}

/// SQLite's poll reads the licenses its events name (by id) and the keys
/// marked pending (by key), each with all its fingerprints, through one
/// statement each whatever their number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_polls_read_the_licenses_named_by_events_and_by_pending_keys() {
    use crate::store::cache::loader::poll_sqlite;
    use crate::store::sqlite::fast::FastReader;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poll.db");
    let store = crate::store::DatabaseUrl::Sqlite(path.clone())
        .open(PostgresOptions::default())
        .await
        .unwrap();
    let product = Product::new(acme(), ProductSpec::default()).unwrap();
    store.create_product(&product, at()).await.unwrap();
    let mut keys = Vec::new();
    for i in 0..3 {
        let license = store
            .issue_license(&issue_cmd(&format!("r{i}")), &actor(), at())
            .await
            .unwrap();
        keys.push(license.key.normalized().to_string());
        if i == 1 {
            for fp in ["ws-b", "ws-a"] {
                store
                    .activate(&license.key, fp, "host", "", &actor(), at())
                    .await
                    .unwrap();
            }
        }
    }
    let fast = FastReader::open(&path, 0).unwrap();
    let read = |last_id: i64, pending: Vec<String>| {
        let poll = poll_sqlite(&fast, last_id, &pending).unwrap();
        let mut got: Vec<(String, Vec<String>)> = poll
            .rows
            .into_iter()
            .map(|r| (r.key, r.fingerprints))
            .collect();
        got.sort();
        (got, poll.last_id)
    };
    let mut all: Vec<(String, Vec<String>)> = keys.iter().map(|k| (k.clone(), vec![])).collect();
    all[1].1 = vec!["ws-a".into(), "ws-b".into()];
    all.sort();
    // Every event is new: every license, by id; a pending key already read
    // is not read again.
    let (got, last) = read(0, vec![keys[0].clone()]);
    assert_eq!(got, all);
    assert!(last >= 5, "three issues and two activations: {last}");
    // No new event: only the pending keys (one not in the database).
    let (got, again) = read(last, vec![keys[1].clone(), "ACMENOSUCHKEY".into()]);
    assert_eq!(
        got,
        vec![all.iter().find(|(k, _)| *k == keys[1]).unwrap().clone()]
    );
    assert_eq!(again, last);
    assert_eq!(read(last, vec![]).0, vec![]);
    // One new event: its license only.
    let first = LicenseKey::parse(&keys[0]).unwrap();
    store
        .activate(&first, "ws-c", "host", "", &actor(), at())
        .await
        .unwrap();
    let (got, _) = read(last, vec![]);
    assert_eq!(got, vec![(keys[0].clone(), vec!["ws-c".to_string()])]);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_postgres_write_sends_its_known_number_of_statements() {
    let Some(admin) = std::env::var("LICENSD_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "LICENSD_TEST_POSTGRES_URL must be set in CI"
        );
        // Straight to stderr: libtest would hide an `eprintln!`.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED (PostgreSQL backend): set \
             LICENSD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres to count \
             PostgreSQL's statements per write ***\n"
        );
        return;
    };
    let name = format!(
        "licensd_rt_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut admin_conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin_conn)
        .await
        .unwrap();
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let (server, _) = base.rsplit_once('/').unwrap();
    let url = if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    };
    let store = postgres::open(&url, PostgresOptions::default())
        .await
        .unwrap();

    let product = Product::new(acme(), ProductSpec::default()).unwrap();
    store.create_product(&product, at()).await.unwrap();
    let license = store
        .issue_license(&issue_cmd("seed"), &actor(), at())
        .await
        .unwrap();
    store
        .activate(&license.key, "ws-1", "host", "", &actor(), at())
        .await
        .unwrap();
    let code_cmd = |request_id: &str| IssueRenewalCode {
        request_id: request_id.into(),
        product: acme(),
        edition: Edition::Business,
        seats: 2,
        term_years: 1,
        order_ref: String::new(),
        reseller: String::new(),
    };
    let (_, code) = store
        .issue_renewal_code(&code_cmd("code"), &actor(), at())
        .await
        .unwrap();
    let (_, second_code) = store
        .issue_renewal_code(&code_cmd("second code"), &actor(), at())
        .await
        .unwrap();
    let activate = |fingerprint: &str| Activate {
        key: license.key.clone(),
        fingerprint: fingerprint.into(),
        hostname: "host".into(),
        client_version: String::new(),
        actor: actor(),
        now: at(),
    };
    let deactivate = |fingerprint: &str| Deactivate {
        key: license.key.clone(),
        fingerprint: fingerprint.into(),
        actor: actor(),
        now: at(),
    };
    let redeem = |code: &RenewalCode| RedeemCode {
        cmd: Redeem {
            license_key: license.key.clone(),
            code: code.clone(),
            fingerprint: "ws-1".into(),
            client_version: Version::parse("1.0").unwrap(),
        },
        actor: actor(),
        now: at(),
    };
    let issue = |request_id: &str| Issue {
        cmd: issue_cmd(request_id),
        key: LicenseKey::generate(&acme(), LicenseKind::Standard),
        actor: actor(),
        now: at(),
    };

    // Lock, load, the seat with its event.
    assert_eq!(sent_by(&store, activate("ws-2")).await, 3, "Activate");
    assert_eq!(sent_by(&store, deactivate("ws-2")).await, 3, "Deactivate");
    // Lock, load the license, load the code with its product, the code's
    // claim with the extension and the event.
    assert_eq!(sent_by(&store, redeem(&code)).await, 4, "RedeemRenewalCode");
    // Claim the request id, load the product, the license with its event.
    assert_eq!(sent_by(&store, issue("counted")).await, 3, "IssueLicense");

    // The round trips on PostgreSQL's write path, COMMIT included: BEGIN
    // goes out with the first statement, the loads that do not depend on
    // each other in one batch (a lock with the loads after it; an
    // idempotency claim with the product), and COMMIT with a last
    // statement whose result decides nothing (a renewal's last statement
    // fails unless its code's claim changed a row, and so rolls back).
    let Writer::Postgres(pg) = &store.writer else {
        panic!("PostgreSQL's own writer");
    };
    assert_eq!(pg.round_trips(&activate("ws-3")).await, 2, "Activate");
    assert_eq!(pg.round_trips(&deactivate("ws-3")).await, 2, "Deactivate");
    assert_eq!(
        pg.round_trips(&redeem(&second_code)).await,
        2,
        "RedeemRenewalCode"
    );
    assert_eq!(pg.round_trips(&issue("tripped")).await, 2, "IssueLicense");

    // A last statement that fails undoes the whole transaction, though its
    // COMMIT went out with it: a license key that exists fails the insert,
    // and the request id claimed before it is free again.
    let collides = Issue {
        key: license.key.clone(),
        ..issue("collides")
    };
    assert!(pg.run(&collides).await.is_err(), "the key is taken");
    let fresh = issue("collides");
    let issued = pg.run(&fresh).await.expect("the request id is free");
    assert_eq!(issued.key, fresh.key, "a new license, not a replay");

    a_claimed_chain_runs_only_if_its_claim_changes_a_row(&store).await;

    store.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin_conn)
    .await
    .unwrap();
}
