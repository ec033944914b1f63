//! The catalog: products (their policies, read by every rule) and the API
//! tokens of the admin interface.

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::load::{Lock, require_product};
use super::tx::is_unique_violation;
use crate::domain::auth::{Role, Token};
use crate::domain::product::ProductSpec;
use crate::domain::{Product, ProductCode, Refusal};
use crate::store::change_notify::Change;
use crate::store::rows::{product_from_row, terms_to_text, token_from_row};
use crate::store::{StoreResult, TokenRecord, micros};

impl SqlStore {
    pub(super) async fn create_product(
        &self,
        product: &Product,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        self.write(Some(Change::Products), move |mut tx| async move {
            let res = sqlx::query(
                "INSERT INTO products (code, display_name, latest_version, personal_terms, business_terms, \
                 grace_period_months, renewal_basis, created_at, updated_at, offline_lease_days) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(product.code().as_str())
            .bind(product.display_name())
            .bind(product.latest_version().map(|v| v.to_string()).unwrap_or_default())
            .bind(terms_to_text(product.personal_terms()))
            .bind(terms_to_text(product.business_terms()))
            .bind(i64::from(product.grace_period_months()))
            .bind(product.renewal_basis().as_str())
            .bind(micros(now))
            .bind(micros(now))
            .bind(i64::from(product.offline_lease_days()))
            .execute(&mut *tx)
            .await;
            match res {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Refusal::ProductAlreadyExists(product.code().to_string()).into());
                }
                other => other?,
            };
            tx.commit().await?;
            Ok(product.clone())
        })
        .await
    }

    pub(super) async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        let mut conn = self.readers.acquire().await?;
        require_product(&mut conn, code, Lock::No).await
    }

    pub(super) async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        let rows = sqlx::query("SELECT * FROM products WHERE code > $1 ORDER BY code LIMIT $2")
            .bind(after.map(|c| c.as_str()).unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(product_from_row).collect()
    }

    pub(super) async fn update_product(
        &self,
        code: &ProductCode,
        update: &(dyn Fn(ProductSpec) -> ProductSpec + Send + Sync),
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        self.write(Some(Change::Products), move |mut tx| async move {
            let current = require_product(&mut tx, code, Lock::ForUpdate(self.dialect)).await?;
            let updated =
                Product::new(code.clone(), update(current.to_spec())).map_err(Refusal::InvalidField)?;
            sqlx::query(
                "UPDATE products SET display_name = $1, latest_version = $2, personal_terms = $3, business_terms = $4, \
                 grace_period_months = $5, renewal_basis = $6, updated_at = $7, offline_lease_days = $9 WHERE code = $8",
            )
            .bind(updated.display_name())
            .bind(updated.latest_version().map(|v| v.to_string()).unwrap_or_default())
            .bind(terms_to_text(updated.personal_terms()))
            .bind(terms_to_text(updated.business_terms()))
            .bind(i64::from(updated.grace_period_months()))
            .bind(updated.renewal_basis().as_str())
            .bind(micros(now))
            .bind(code.as_str())
            .bind(i64::from(updated.offline_lease_days()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(updated)
        })
        .await
    }

    pub(super) async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token.id())
        .bind(name)
        .bind(role.as_str())
        .bind(token.secret_hash())
        .bind(micros(now))
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => Err(Refusal::InvalidField(
                crate::domain::FieldViolation::new("name", "a live token already has this name"),
            )
            .into()),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(tx.commit().await?),
        }
    }

    pub(super) async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM api_tokens ORDER BY name, created_at",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    pub(super) async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(micros(now))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM api_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }
}
