//! The `signing_keys` table: the Ed25519 keys of offline license
//! certificates (see [`crate::signing`]). At most one key is `active`
//! (a partial unique index); a key is published until retired. Its writes
//! are commands like every rule's (on SQLite through the one writer).

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::conn::{Arg, Command, Conn, Ending, args};
use crate::signing::{KeyState, StoredKey};
use crate::store::rows::{Columns, key_col, signing_key_from_row, signing_key_select};
use crate::store::{StoreResult, micros};

/// What `retire` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// Retired now.
    Now,
    /// It was already.
    Already,
    /// It signs: rotate first.
    IsActive,
    /// No such key.
    NotFound,
}

/// Stores a key as the active key if none is active. Replicas starting
/// together on PostgreSQL may both find none: the second insert meets the
/// one-active index and does nothing.
struct Ensure(StoredKey);

impl Command for Ensure {
    type Output = ();

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<()>> {
        conn.execute(
            "INSERT INTO signing_keys (kid, private_der, public_key, state, created_at) \
             SELECT $1, $2, $3, 'active', $4 \
             WHERE NOT EXISTS (SELECT 1 FROM signing_keys WHERE state = 'active') \
             ON CONFLICT DO NOTHING",
            &active_key_args(&self.0),
        )
        .await?;
        Ok(Ending::Commit(()))
    }
}

/// Makes a key the active one and the active one published.
struct Rotate(StoredKey);

impl Command for Rotate {
    type Output = ();

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<()>> {
        conn.execute(
            "UPDATE signing_keys SET state = 'published' WHERE state = 'active'",
            args![],
        )
        .await?;
        conn.execute(
            "INSERT INTO signing_keys (kid, private_der, public_key, state, created_at) \
             VALUES ($1, $2, $3, 'active', $4)",
            &active_key_args(&self.0),
        )
        .await?;
        Ok(Ending::Commit(()))
    }
}

/// The arguments of an active key's insert: kid, private and public key,
/// creation time.
fn active_key_args(key: &StoredKey) -> [Arg<'_>; 4] {
    [
        (&key.kid).into(),
        (&key.private_der).into(),
        (&key.public_key).into(),
        micros(key.created_at).into(),
    ]
}

/// Stops publishing a key, unless it is the active one.
struct Retire {
    kid: String,
    now: DateTime<Utc>,
}

impl Command for Retire {
    type Output = Retired;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Retired>> {
        let retired = conn
            .execute(
                "UPDATE signing_keys SET state = 'retired', retired_at = $1 \
                 WHERE kid = $2 AND state = 'published'",
                args![micros(self.now), &self.kid],
            )
            .await?;
        if retired == 1 {
            return Ok(Ending::Commit(Retired::Now));
        }
        let found = conn
            .fetch_optional(
                concat!(signing_key_select!(), "WHERE kid = $1"),
                args![&self.kid],
            )
            .await?;
        let state = match found {
            Some(row) => KeyState::parse(&row.text(key_col::STATE)?),
            None => None,
        };
        Ok(Ending::Commit(match state {
            Some(KeyState::Active) => Retired::IsActive,
            Some(_) => Retired::Already,
            None => Retired::NotFound,
        }))
    }
}

impl SqlStore {
    /// Every key, oldest first.
    pub async fn signing_keys(&self) -> StoreResult<Vec<StoredKey>> {
        let rows = sqlx::query(concat!(signing_key_select!(), "ORDER BY created_at, kid"))
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(signing_key_from_row).collect()
    }

    /// Stores `key` as the active key if no key is active (the first start;
    /// several replicas starting together store one).
    pub async fn ensure_signing_key(&self, key: &StoredKey) -> StoreResult<()> {
        self.write(None, Ensure(key.clone())).await
    }

    /// Makes `key` the active key, the active one published, in one
    /// transaction.
    pub async fn rotate_signing_key(&self, key: &StoredKey) -> StoreResult<()> {
        self.write(None, Rotate(key.clone())).await
    }

    /// Stops publishing the key `kid` (never the active one).
    pub async fn retire_signing_key(&self, kid: &str, now: DateTime<Utc>) -> StoreResult<Retired> {
        let retire = Retire {
            kid: kid.to_string(),
            now,
        };
        self.write(None, retire).await
    }
}
