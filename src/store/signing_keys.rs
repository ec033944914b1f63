//! The `signing_keys` table: the Ed25519 keys of offline license
//! certificates (see [`crate::signing`]). At most one key is `active`
//! (a partial unique index); a key is published until retired.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::rows::corrupt;
use super::sql::is_unique_violation;
use super::{SqlStore, StoreError, StoreResult, from_micros, micros};
use crate::signing::{KeyState, StoredKey};

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

impl SqlStore {
    /// Every key, oldest first.
    pub async fn signing_keys(&self) -> StoreResult<Vec<StoredKey>> {
        let rows = sqlx::query(
            "SELECT kid, private_der, public_key, state, created_at, retired_at \
             FROM signing_keys ORDER BY created_at, kid",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok(StoredKey {
                    kid: row.try_get("kid")?,
                    private_der: row.try_get("private_der")?,
                    public_key: row.try_get("public_key")?,
                    state: KeyState::parse(&state).ok_or_else(|| corrupt("key state", &state))?,
                    created_at: from_micros(row.try_get("created_at")?)?,
                    retired_at: row
                        .try_get::<Option<i64>, _>("retired_at")?
                        .map(from_micros)
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Stores `key` as the active key if no key is active (the first start;
    /// several replicas starting together store one).
    pub async fn ensure_signing_key(&self, key: &StoredKey) -> StoreResult<()> {
        let inserted = sqlx::query(
            "INSERT INTO signing_keys (kid, private_der, public_key, state, created_at) \
             SELECT $1, $2, $3, 'active', $4 \
             WHERE NOT EXISTS (SELECT 1 FROM signing_keys WHERE state = 'active')",
        )
        .bind(&key.kid)
        .bind(&key.private_der)
        .bind(&key.public_key)
        .bind(micros(key.created_at))
        .execute(&self.writer)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => Ok(()),
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    /// Makes `key` the active key, the active one published, in one
    /// transaction.
    pub async fn rotate_signing_key(&self, key: &StoredKey) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE signing_keys SET state = 'published' WHERE state = 'active'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_der, public_key, state, created_at) \
             VALUES ($1, $2, $3, 'active', $4)",
        )
        .bind(&key.kid)
        .bind(&key.private_der)
        .bind(&key.public_key)
        .bind(micros(key.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stops publishing the key `kid` (never the active one).
    pub async fn retire_signing_key(&self, kid: &str, now: DateTime<Utc>) -> StoreResult<Retired> {
        let done = sqlx::query(
            "UPDATE signing_keys SET state = 'retired', retired_at = $1 \
             WHERE kid = $2 AND state = 'published'",
        )
        .bind(micros(now))
        .bind(kid)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Retired::Now);
        }
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM signing_keys WHERE kid = $1")
                .bind(kid)
                .fetch_optional(&self.writer)
                .await?;
        Ok(match state.as_deref().and_then(KeyState::parse) {
            Some(KeyState::Active) => Retired::IsActive,
            Some(_) => Retired::Already,
            None => Retired::NotFound,
        })
    }
}
