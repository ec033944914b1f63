//! What a rule's transaction runs its statements through, so that each one
//! is written once for both backends.
//!
//! A write is a [`Command`]: a value holding its request, whose
//! [`run`](Command::run) loads rows, asks the domain for a decision and
//! writes it, through any [`Conn`]. Three connections implement `Conn`:
//!
//! * PostgreSQL's write connections (`store::postgres::writer`, on
//!   tokio-postgres), which pipeline: BEGIN goes with the first statement,
//!   a batch of statements together, COMMIT with a last statement that decides
//!   nothing; retried by [`SqlStore::write`](super::SqlStore);
//! * the SQLite writer's native connection (`store::sqlite::writer`), which
//!   runs many commands in one transaction (each undone alone if it
//!   fails) and commits them together (group commit);
//! * sqlx's `AnyConnection`, for the reads that share the loads (one
//!   statement per round trip).
//!
//! Why a trait over a connection, not a trait of "steps" each backend
//! implements: the steps (load the license and lock it, take a seat, record
//! the event) are where rules drift if written twice. Here the SQL text, the
//! order of the statements and the decision exist once; a backend supplies
//! only how a statement is executed. The SQL is the dialect both accept
//! (`$N` placeholders; SQLite's writer numbers them `?N`); where the
//! dialects differ (row locks) the command asks
//! [`Conn::dialect`].

use std::future::Future;

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::domain::Refusal;
use crate::store::rows::{Columns, Dialect};
use crate::store::{StoreError, StoreResult};

/// A value bound to a statement's placeholder. Typed even when NULL:
/// PostgreSQL checks a parameter's type against its column's.
#[derive(Debug, Clone, Copy)]
pub(in crate::store) enum Arg<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Blob(Option<&'a [u8]>),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(Some(v))
    }
}

impl<'a> From<&'a Vec<u8>> for Arg<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Arg::Blob(Some(v))
    }
}

/// One statement and its arguments, as a step of
/// [`Conn::fetch_batch`], [`Conn::execute_chain`] or [`Conn::finish_insert`].
pub(in crate::store) type Step<'s, 'a> = (&'static str, &'s [Arg<'a>]);

/// The arguments of one statement: `args![a, b, c]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::sql::conn::Arg::from($v)),*]
    };
}
pub(in crate::store) use args;

/// A connection a command's statements run on, inside a transaction the
/// caller began.
pub(in crate::store) trait Conn: Send {
    /// A row it returns, read by position.
    type Row: Columns + Send;

    /// Which SQL it speaks where the two differ.
    fn dialect(&self) -> Dialect;

    /// Runs `sql`; how many rows it changed.
    fn execute(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = StoreResult<u64>> + Send;

    /// Every row `sql` returns.
    fn fetch_all(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = StoreResult<Vec<Self::Row>>> + Send;

    /// The first row `sql` returns, if any.
    fn fetch_optional(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = StoreResult<Option<Self::Row>>> + Send;

    /// Runs `steps` in order, each after the one before has finished (so
    /// a statement sees the locks and changes of those before it), and
    /// returns each one's rows. PostgreSQL's write path sends them at once
    /// (one round trip). Should one fail, the batch fails; on PostgreSQL
    /// the transaction is then aborted, so nothing after it changes
    /// anything.
    fn fetch_batch(
        &mut self,
        steps: &[Step<'_, '_>],
    ) -> impl Future<Output = StoreResult<Vec<Vec<Self::Row>>>> + Send {
        async move {
            let mut rows = Vec::with_capacity(steps.len());
            for (sql, args) in steps {
                rows.push(self.fetch_all(sql, args).await?);
            }
            Ok(rows)
        }
    }

    /// Runs `steps` in order (none reading what another writes), in as
    /// few round trips as the backend allows; how many rows the first
    /// changed. Used for a change and the history event that records it.
    fn execute_chain(
        &mut self,
        steps: &[Step<'_, '_>],
    ) -> impl Future<Output = StoreResult<u64>> + Send {
        in_turn(self, steps)
    }

    /// Runs `steps` as [`execute_chain`](Conn::execute_chain) does, as the
    /// transaction's last statement, and ends the command with `ending`:
    /// everything was decided before, so only an error of `steps` can undo
    /// the transaction. PostgreSQL's write path sends COMMIT with it (one
    /// round trip fewer); elsewhere the transaction ends as usual.
    fn finish_chain<T: Send>(
        &mut self,
        steps: &[Step<'_, '_>],
        ending: Ending<T>,
    ) -> impl Future<Output = StoreResult<Ending<T>>> + Send {
        async move {
            self.execute_chain(steps).await?;
            Ok(ending)
        }
    }

    /// Runs `steps` as [`finish_chain`](Conn::finish_chain) does if the
    /// first one (a claim: a conditional update of one row, named by its
    /// key) changes its row; if it changes none, none of them changes
    /// anything and the answer is `None`. PostgreSQL's write path sends
    /// COMMIT with them, the claim checked inside the statement; elsewhere
    /// the claim runs first and the rest only after it changed its row. (A
    /// claim that changes more than one row is a mistake in its SQL: undone
    /// as one that changed none on PostgreSQL, an error elsewhere.)
    fn finish_chain_if_claimed<T: Send>(
        &mut self,
        steps: &[Step<'_, '_>],
        ending: Ending<T>,
    ) -> impl Future<Output = StoreResult<Option<Ending<T>>>> + Send {
        async move {
            let Some(((sql, args), rest)) = steps.split_first() else {
                return Err(StoreError::Internal("a claim without a statement".into()));
            };
            match self.execute(sql, args).await? {
                0 => Ok(None),
                1 => {
                    in_turn(self, rest).await?;
                    Ok(Some(ending))
                }
                // Undone with the command (an error after a change).
                n => Err(StoreError::Internal(format!(
                    "a claim changed {n} rows: {sql}"
                ))),
            }
        }
    }

    /// Runs `insert` (an INSERT … `RETURNING id`), then `then`, whose `$1`
    /// is that id and whose `args` are its `$2`, `$3`, …, as the
    /// transaction's last statement, ending the command with `ending` (see
    /// [`finish_chain`](Conn::finish_chain)): one round trip with COMMIT on
    /// PostgreSQL's write path. Used for a new license and the history
    /// event that records it.
    fn finish_insert<T: Send>(
        &mut self,
        insert: Step<'_, '_>,
        then: Step<'_, '_>,
        ending: Ending<T>,
    ) -> impl Future<Output = StoreResult<Ending<T>>> + Send {
        async move {
            let id = fetch_one(self, insert.0, insert.1).await?.int(0)?;
            let mut args = vec![Arg::from(id)];
            args.extend_from_slice(then.1);
            self.execute(then.0, &args).await?;
            Ok(ending)
        }
    }
}

/// [`Conn::execute_chain`] as one statement after the other.
async fn in_turn<C: Conn + ?Sized>(conn: &mut C, steps: &[Step<'_, '_>]) -> StoreResult<u64> {
    let mut first = None;
    for (sql, args) in steps {
        let changed = conn.execute(sql, args).await?;
        first.get_or_insert(changed);
    }
    Ok(first.unwrap_or(0))
}

/// The row `sql` must return.
pub(in crate::store) async fn fetch_one<C: Conn + ?Sized>(
    conn: &mut C,
    sql: &'static str,
    args: &[Arg<'_>],
) -> StoreResult<C::Row> {
    conn.fetch_optional(sql, args)
        .await?
        .ok_or_else(|| StoreError::Internal(format!("no row from {sql}")))
}

/// How a command's transaction ends.
pub(in crate::store) enum Ending<T> {
    /// Committed; the caller gets `T`.
    Commit(T),
    /// Committed (a history event of the refusal), and the caller is
    /// refused.
    CommitRefusal(Refusal),
}

impl<T> Ending<T> {
    /// The caller's answer once the transaction committed.
    pub(in crate::store) fn answer(self) -> StoreResult<T> {
        match self {
            Ending::Commit(t) => Ok(t),
            Ending::CommitRefusal(r) => Err(r.into()),
        }
    }
}

/// One write rule's transaction, written once for every backend. An
/// `Err` rolls back everything it wrote; [`Ending`] says what commits.
/// Run again from the start when PostgreSQL reports a deadlock or
/// serialisation failure, so `run` takes `&self`.
pub(in crate::store) trait Command: Send + Sync + 'static {
    /// What the caller gets.
    type Output: Send + 'static;

    /// Loads, decides and writes through `conn`.
    fn run<C: Conn>(
        &self,
        conn: &mut C,
    ) -> impl Future<Output = StoreResult<Ending<Self::Output>>> + Send;
}

fn query<'q>(
    sql: &'static str,
    args: &[Arg<'q>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let mut q = sqlx::query(sql);
    for arg in args {
        q = match *arg {
            Arg::Int(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
            Arg::Blob(v) => q.bind(v),
        };
    }
    q
}

/// PostgreSQL's one statement for [`Conn::execute_chain`], with its
/// arguments: each step a data-modifying `WITH` query (each runs once, on
/// the same snapshot), each step's placeholders numbered after those of the
/// steps before it.
pub(in crate::store) fn chained<'a>(steps: &[Step<'_, 'a>]) -> (&'static str, Vec<Arg<'a>>) {
    with_queries(Built::Chain, steps, "SELECT count(*) FROM w1")
}

/// PostgreSQL's one statement for [`Conn::finish_chain_if_claimed`]:
/// [`chained`]'s, whose answer fails with `division_by_zero` (SQLSTATE
/// 22012, which nothing else in these statements can raise) unless the
/// first step changed exactly one row. A failed statement changes nothing
/// and aborts the transaction, so the COMMIT sent behind it rolls back.
pub(in crate::store) fn claimed<'a>(steps: &[Step<'_, 'a>]) -> (&'static str, Vec<Arg<'a>>) {
    with_queries(
        Built::Claimed,
        steps,
        "SELECT 1 / (count(*) = 1)::int FROM w1",
    )
}

/// `steps` as data-modifying `WITH` queries `w1`, `w2`, …, then `last`.
fn with_queries<'a>(
    kind: Built,
    steps: &[Step<'_, 'a>],
    last: &'static str,
) -> (&'static str, Vec<Arg<'a>>) {
    let sql = built_once(kind, steps.iter().map(|(sql, _)| *sql), || {
        let mut sql = String::from("WITH ");
        let mut before = 0;
        for (i, (step, args)) in steps.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "w{} AS ({} RETURNING 1)",
                i + 1,
                shifted(step, before)
            ));
            before += args.len();
        }
        sql.push(' ');
        sql.push_str(last);
        sql
    });
    let args = steps.iter().flat_map(|(_, a)| a.iter().copied()).collect();
    (sql, args)
}

/// PostgreSQL's one statement for [`Conn::finish_insert`], with its
/// arguments: the insert as a data-modifying `WITH` query, `then`'s `$1`
/// the id it returned and its other placeholders numbered after the
/// insert's.
pub(in crate::store) fn inserted_then<'a>(
    insert: Step<'_, 'a>,
    then: Step<'_, 'a>,
) -> (&'static str, Vec<Arg<'a>>) {
    let insert_args = insert.1.len();
    let sql = built_once(Built::InsertThen, [insert.0, then.0], || {
        let then = renumbered(then.0, |n| match n {
            1 => "(SELECT id FROM w1)".to_string(),
            n => format!("${}", n - 1 + insert_args),
        });
        format!(
            "WITH w1 AS ({}) {then} RETURNING (SELECT id FROM w1)",
            insert.0
        )
    });
    (sql, insert.1.iter().chain(then.1).copied().collect())
}

/// Which combined statement [`built_once`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Built {
    Chain,
    Claimed,
    InsertThen,
}

/// The statement `build` makes of the static texts `parts` (as `kind`),
/// built the first time and kept for the process (the parts are static,
/// so their addresses name them; a statement's argument count is fixed by
/// its text).
fn built_once(
    kind: Built,
    parts: impl IntoIterator<Item = &'static str>,
    build: impl FnOnce() -> String,
) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Statements = HashMap<(Built, Vec<usize>), &'static str>;
    static BUILT: OnceLock<Mutex<Statements>> = OnceLock::new();
    let key = (
        kind,
        parts.into_iter().map(|p| p.as_ptr() as usize).collect(),
    );
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    built
        .entry(key)
        .or_insert_with(|| Box::leak(build().into_boxed_str()))
}

/// `sql` with each `$N` numbered `$(N + by)`.
fn shifted(sql: &str, by: usize) -> String {
    renumbered(sql, |n| format!("${}", n + by))
}

/// `sql` with each placeholder `$N` replaced by `to(N)`.
fn renumbered(sql: &str, to: impl Fn(usize) -> String) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&to(n)),
            Err(_) => out.push('$'),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

impl Conn for AnyConnection {
    type Row = AnyRow;

    fn dialect(&self) -> Dialect {
        match self.backend_name() {
            "PostgreSQL" => Dialect::Postgres,
            _ => Dialect::Sqlite,
        }
    }

    async fn execute(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        Ok(query(sql, args).execute(self).await?.rows_affected())
    }

    async fn fetch_all(&mut self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<Vec<AnyRow>> {
        Ok(query(sql, args).fetch_all(self).await?)
    }

    async fn fetch_optional(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<AnyRow>> {
        Ok(query(sql, args).fetch_optional(self).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::{Arg, Step, inserted_then, shifted};

    #[test]
    fn placeholders_shift_past_the_first_statement() {
        assert_eq!(
            shifted("INSERT INTO t (a, b) VALUES ($1, $10)", 5),
            "INSERT INTO t (a, b) VALUES ($6, $15)"
        );
        assert_eq!(shifted("SELECT '$' || $2", 1), "SELECT '$' || $3");
    }

    #[test]
    fn a_statement_after_an_insert_reads_its_id_as_its_first_placeholder() {
        let insert: Step = (
            "INSERT INTO t (a, b) VALUES ($1, $2) RETURNING id",
            args![1, 2],
        );
        let then: Step = (
            "INSERT INTO u (t_id, c, d) VALUES ($1, $2, $3)",
            args![3, 4],
        );
        let (sql, args) = inserted_then(insert, then);
        assert_eq!(
            sql,
            "WITH w1 AS (INSERT INTO t (a, b) VALUES ($1, $2) RETURNING id) \
             INSERT INTO u (t_id, c, d) VALUES ((SELECT id FROM w1), $3, $4) \
             RETURNING (SELECT id FROM w1)"
        );
        let ints: Vec<_> = args
            .iter()
            .map(|a| match a {
                Arg::Int(v) => *v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ints,
            [Some(1), Some(2), Some(3), Some(4)],
            "insert's, then then's"
        );
    }
}
