//! PostgreSQL's writes: each rule's [`Command`] on a connection of its own
//! pool, through tokio-postgres, which pipelines.
//!
//! Why not sqlx here: sqlx sends one statement per round trip and pings
//! every connection it takes back into its pool, so a write was BEGIN,
//! lock, load, change, COMMIT and the ping: six round trips, each a wakeup
//! of a PostgreSQL backend and of a Tokio task, which is most of what a
//! write costs the database's CPU and ours. tokio-postgres sends what it is
//! given without waiting for the answers before, so here:
//!
//! * BEGIN goes out with the transaction's first statement;
//! * a batch of statements goes out together ([`Conn::fetch_batch`]: a
//!   lock and the loads after it; the server still runs a load after the
//!   lock is held, so it reads what the lock's last holder committed);
//! * COMMIT goes out with a command's last statement when nothing is left
//!   to decide after it ([`Conn::finish_chain`]): should that statement
//!   fail, the transaction is aborted and the COMMIT behind it rolls it
//!   back;
//! * a connection goes back to the pool without a ping (a closed one is
//!   noticed by its client and not handed out again; one that dies idle
//!   fails its transaction's first round trip, which is then run again on
//!   another connection: nothing of it can have committed).
//!
//! Activate is then two round trips (BEGIN + lock + load; the change with
//! its history event + COMMIT). The statements, their order and the
//! decisions are the same [`Command`]s SQLite's writer runs; only how a
//! statement reaches the server differs.
//!
//! A write whose caller goes away mid-transaction (a deadline, a client
//! gone) leaves its connection inside a transaction whose answers are
//! still on their way; that connection is closed, never reused (the
//! server rolls the transaction back).

use std::future::Future;
use std::time::{Duration, Instant};

use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row, Statement};

use crate::store::rows::Columns;
use crate::store::rows::Dialect;
use crate::store::sql::conn::{
    Arg, Command, Conn, Ending, Step, chained, claimed, fetch_one, inserted_then,
};
use crate::store::{StoreError, StoreResult};

/// The pool of write connections.
pub(in crate::store) struct PgWriter {
    pool: Pool,
}

impl PgWriter {
    /// A pool of at most `max` connections made from `config`, a call
    /// waiting at most `wait` for one.
    pub(in crate::store) fn new(
        config: tokio_postgres::Config,
        max: usize,
        wait: Duration,
    ) -> StoreResult<Self> {
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max.max(1))
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("PostgreSQL write pool: {e}")))?;
        Ok(PgWriter { pool })
    }

    /// Runs `cmd` in a transaction of its own and commits it (a
    /// deadlock or serialisation failure is the caller's to retry). A
    /// connection found dead before anything could commit is dropped, and
    /// the transaction runs again on another, up to the pool's size.
    pub(in crate::store) async fn run<K: Command>(&self, cmd: &K) -> StoreResult<K::Output> {
        self.leased(Write(cmd)).await
    }

    /// The rows of the read `sql`, run on its own (no transaction): one
    /// round trip on a pooled connection. For the token lookup every
    /// billing and support call makes before its handler runs (sqlx would
    /// add a second round trip, its ping when the connection goes back to
    /// its pool). A connection found closed is dropped, and the read runs
    /// again on another.
    pub(in crate::store) async fn read(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Vec<Row>> {
        self.leased(Read { sql, args }).await
    }

    /// `work` on a pooled connection, which goes back to the pool if the
    /// work is [`Outcome::Done`]; when the work found its connection
    /// [`Lost`](Outcome::Lost), again on another, up to the pool's size
    /// (every idle one may have died with a restart of the database).
    async fn leased<W: OnConnection>(&self, work: W) -> StoreResult<W::Output> {
        let mut left = self.pool.status().max_size + 1;
        loop {
            let started = Instant::now();
            let client = self.pool.get().await?;
            if W::WRITE {
                metrics::histogram!("licensd_db_acquire_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            let mut lease = Lease(Some(client));
            match work.on(lease.client()).await {
                Outcome::Done(result) => {
                    lease.release();
                    return result;
                }
                Outcome::Lost(e) if left > 1 => {
                    left -= 1;
                    tracing::debug!(error = %e, "a pooled connection was lost; trying another");
                }
                Outcome::Lost(e) | Outcome::Broken(e) => return Err(e),
            }
        }
    }

    /// How many round trips `cmd`'s transaction took, COMMIT included
    /// (it must commit).
    #[cfg(test)]
    pub(in crate::store) async fn round_trips<K: Command>(&self, cmd: &K) -> usize {
        let mut lease = Lease(Some(self.pool.get().await.unwrap()));
        let (outcome, trips) = transaction(lease.client(), cmd).await;
        assert!(matches!(outcome, Outcome::Done(Ok(_))), "committed");
        lease.release();
        trips
    }

    /// Open connections, idle ones, and the limit.
    pub(in crate::store) fn stats(&self) -> (u32, usize, u32) {
        let s = self.pool.status();
        (s.size as u32, s.available, s.max_size as u32)
    }

    /// Closes every connection; later writes fail.
    pub(in crate::store) fn close(&self) {
        self.pool.close();
    }
}

/// What [`PgWriter::leased`] runs on a connection.
trait OnConnection {
    type Output: Send;
    /// A write (its wait for a connection is `licensd_db_acquire_seconds`).
    const WRITE: bool;
    fn on<'c>(
        &'c self,
        client: &'c ClientWrapper,
    ) -> impl Future<Output = Outcome<Self::Output>> + Send + 'c;
}

/// A rule's write: its transaction.
struct Write<'k, K>(&'k K);

impl<K: Command> OnConnection for Write<'_, K> {
    type Output = K::Output;
    const WRITE: bool = true;
    async fn on(&self, client: &ClientWrapper) -> Outcome<K::Output> {
        transaction(client, self.0).await.0
    }
}

/// One statement on its own.
struct Read<'s, 'a> {
    sql: &'static str,
    args: &'s [Arg<'a>],
}

impl OnConnection for Read<'_, '_> {
    type Output = Vec<Row>;
    const WRITE: bool = false;
    async fn on(&self, client: &ClientWrapper) -> Outcome<Vec<Row>> {
        let read = async {
            let statement = prepared(client, self.sql, self.args).await?;
            Ok(client.query(&statement, &params(self.args)).await?)
        };
        match read.await {
            Err(e) if client.is_closed() => Outcome::Lost(e),
            read => Outcome::Done(read),
        }
    }
}

/// A pooled connection that goes back to the pool only when
/// [`release`](Lease::release)d: dropped otherwise (a transaction cut
/// short), it is closed.
struct Lease(Option<Object>);

impl Lease {
    fn client(&self) -> &ClientWrapper {
        self.0.as_ref().expect("leased")
    }

    fn release(&mut self) {
        drop(self.0.take());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            // Out of the pool; dropping the client closes the connection.
            drop(Object::take(object));
        }
    }
}

/// How a transaction on one connection ended.
enum Outcome<T> {
    /// The caller's answer; the connection is idle and may be reused.
    Done(StoreResult<T>),
    /// The connection was found closed before COMMIT was sent (a read:
    /// before it answered): nothing committed, the work may run again
    /// elsewhere.
    Lost(StoreError),
    /// The connection is in an unknown state (its ROLLBACK or COMMIT
    /// failed): the error is the caller's, the connection is not reused.
    Broken(StoreError),
}

/// `cmd`'s transaction on `client`, and how many round trips it took.
async fn transaction<K: Command>(client: &ClientWrapper, cmd: &K) -> (Outcome<K::Output>, usize) {
    let mut tx = PgTx {
        client,
        begun: false,
        trips: 0,
        committed: None,
    };
    let ran = cmd.run(&mut tx).await;
    match tx.committed.take() {
        // COMMIT went out with the last statement.
        Some(commit) => (ended(ran, commit), tx.trips),
        None => (
            end(client, tx.begun, ran).await,
            tx.trips + usize::from(tx.begun),
        ),
    }
}

/// The outcome of a transaction whose COMMIT went out with its last
/// statement and was answered with `commit`. A statement that failed
/// aborted the transaction, and that COMMIT then rolled it back.
fn ended<T>(ran: StoreResult<Ending<T>>, commit: Result<(), tokio_postgres::Error>) -> Outcome<T> {
    match (ran, commit) {
        (ran, Ok(())) => Outcome::Done(ran.and_then(Ending::answer)),
        (Err(e), Err(_)) => Outcome::Broken(e),
        (Ok(_), Err(e)) => Outcome::Broken(e.into()),
    }
}

/// Commits what ran (`begun`: a transaction is open), or rolls it back.
async fn end<T>(client: &ClientWrapper, begun: bool, ran: StoreResult<Ending<T>>) -> Outcome<T> {
    match ran {
        Ok(ending) => {
            if begun && let Err(e) = client.batch_execute("COMMIT").await {
                // A conflict found at COMMIT leaves the connection idle
                // (the transaction is over); anything else may not.
                let e = StoreError::from(e);
                return match e {
                    StoreError::Retryable(_) if !client.is_closed() => Outcome::Done(Err(e)),
                    e => Outcome::Broken(e),
                };
            }
            Outcome::Done(ending.answer())
        }
        Err(e) if client.is_closed() => Outcome::Lost(e),
        Err(e) => {
            if begun && client.batch_execute("ROLLBACK").await.is_err() {
                return Outcome::Broken(e);
            }
            Outcome::Done(Err(e))
        }
    }
}

/// A transaction on one connection, begun with its first statement.
struct PgTx<'c> {
    client: &'c ClientWrapper,
    /// Whether BEGIN has been sent.
    begun: bool,
    /// Round trips so far.
    trips: usize,
    /// The answer to the COMMIT sent with the last statement, if it was.
    committed: Option<Result<(), tokio_postgres::Error>>,
}

impl<'c> PgTx<'c> {
    async fn prepared(&self, sql: &str, args: &[Arg<'_>]) -> StoreResult<Statement> {
        prepared(self.client, sql, args).await
    }

    /// BEGIN, if not yet sent: to be polled before (and so sent ahead of)
    /// the statements it goes out with. Every exchange with the server
    /// calls it once, so it also counts them.
    fn begin(
        &mut self,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send + use<'c> {
        let client: &'c ClientWrapper = self.client;
        let begin = (!self.begun).then(|| client.batch_execute("BEGIN"));
        self.begun = true;
        self.trips += 1;
        async move {
            match begin {
                Some(begin) => begin.await,
                None => Ok(()),
            }
        }
    }

    /// Runs `sql` as the transaction's last statement, COMMIT sent with
    /// it; the COMMIT's answer is kept for [`transaction`].
    async fn rows_then_commit(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<()> {
        Ok(self.then_commit(sql, args).await??)
    }

    /// [`rows_then_commit`](Self::rows_then_commit), the statement's own
    /// answer kept apart (outer: it could not be sent).
    async fn then_commit(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Result<(), tokio_postgres::Error>> {
        let statement = self.prepared(sql, args).await?;
        // Whatever could keep the statement from being sent must fail here,
        // before COMMIT goes out: COMMIT would then keep what ran before it.
        // Its arguments are typed as it was prepared, so they encode.
        if statement.params().len() != args.len() {
            return Err(StoreError::Internal(format!(
                "{} arguments for {} parameters: {sql}",
                args.len(),
                statement.params().len()
            )));
        }
        let params = params(args);
        let client = self.client;
        let (begun, ran, committed) = tokio::join!(
            biased;
            self.begin(),
            client.query(&statement, &params),
            client.batch_execute("COMMIT")
        );
        self.committed = Some(committed);
        begun?;
        Ok(ran.map(drop))
    }

    /// `exchange` (a statement not yet sent), with BEGIN ahead of it if
    /// this is the transaction's first.
    async fn with_begin<T>(
        &mut self,
        exchange: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> StoreResult<T> {
        let (begun, answer) = tokio::join!(biased; self.begin(), exchange);
        begun?;
        Ok(answer?)
    }

    async fn rows(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<Vec<Row>> {
        let statement = self.prepared(sql, args).await?;
        let params = params(args);
        let client = self.client;
        self.with_begin(client.query(&statement, &params)).await
    }
}

/// `sql`, prepared on `client` once (its parameters typed as `args` are,
/// as sqlx declares them: the server converts an `int8` argument for an
/// `integer` column).
async fn prepared(client: &ClientWrapper, sql: &str, args: &[Arg<'_>]) -> StoreResult<Statement> {
    let types: Vec<Type> = args
        .iter()
        .map(|a| match a {
            Arg::Int(_) => Type::INT8,
            Arg::Text(_) => Type::TEXT,
            Arg::Blob(_) => Type::BYTEA,
        })
        .collect();
    Ok(client.prepare_typed_cached(sql, &types).await?)
}

/// `args` as tokio-postgres takes them.
fn params<'a>(args: &'a [Arg<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            Arg::Int(v) => v as &(dyn ToSql + Sync),
            Arg::Text(v) => v as &(dyn ToSql + Sync),
            Arg::Blob(v) => v as &(dyn ToSql + Sync),
        })
        .collect()
}

impl Conn for PgTx<'_> {
    type Row = Row;

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn execute(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        let statement = self.prepared(sql, args).await?;
        let params = params(args);
        let client = self.client;
        self.with_begin(client.execute(&statement, &params)).await
    }

    async fn fetch_all(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<Vec<Row>> {
        self.rows(sql, args).await
    }

    async fn fetch_optional(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<Row>> {
        Ok(self.rows(sql, args).await?.into_iter().next())
    }

    async fn fetch_batch(&mut self, steps: &[Step<'_, '_>]) -> StoreResult<Vec<Vec<Row>>> {
        let mut statements = Vec::with_capacity(steps.len());
        for (sql, args) in steps {
            statements.push(self.prepared(sql, args).await?);
        }
        let params: Vec<_> = steps.iter().map(|(_, args)| params(args)).collect();
        let client = self.client;
        // `join_all` polls its futures in order, so they are sent in order.
        let queries = futures_util::future::join_all(
            statements
                .iter()
                .zip(&params)
                .map(|(statement, params)| client.query(statement, params)),
        );
        let (begun, answers) = tokio::join!(biased; self.begin(), queries);
        begun?;
        // The first failure is the cause; those after it failed because
        // the transaction was aborted.
        Ok(answers.into_iter().collect::<Result<_, _>>()?)
    }

    async fn execute_chain(&mut self, steps: &[Step<'_, '_>]) -> StoreResult<u64> {
        let (sql, args) = chained(steps);
        Ok(fetch_one(self, sql, &args).await?.int(0)? as u64)
    }

    async fn finish_chain<T: Send>(
        &mut self,
        steps: &[Step<'_, '_>],
        ending: Ending<T>,
    ) -> StoreResult<Ending<T>> {
        let (sql, args) = chained(steps);
        self.rows_then_commit(sql, &args).await?;
        Ok(ending)
    }

    async fn finish_chain_if_claimed<T: Send>(
        &mut self,
        steps: &[Step<'_, '_>],
        ending: Ending<T>,
    ) -> StoreResult<Option<Ending<T>>> {
        let (sql, args) = claimed(steps);
        match self.then_commit(sql, &args).await? {
            Ok(()) => Ok(Some(ending)),
            Err(e) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn finish_insert<T: Send>(
        &mut self,
        insert: Step<'_, '_>,
        then: Step<'_, '_>,
        ending: Ending<T>,
    ) -> StoreResult<Ending<T>> {
        let (sql, args) = inserted_then(insert, then);
        self.rows_then_commit(sql, &args).await?;
        Ok(ending)
    }
}
