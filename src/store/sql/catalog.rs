//! The catalog: products (their policies, read by every rule) and the API
//! tokens of the admin interface.

use chrono::{DateTime, Utc};

use super::conn::{Command, Conn, Ending, args};
use super::load::{Lock, require_product};
use super::{SqlStore, Writer};
use crate::domain::auth::{Role, Token};
use crate::domain::{FieldViolation, Product, ProductCode, Refusal};
use crate::store::change_notify::Change;
use crate::store::rows::{
    product_from_row, product_select, terms_to_text, token_from_row, token_select,
};
use crate::store::{ProductUpdate, StoreResult, TokenRecord, micros};

/// CreateProduct.
struct CreateProduct {
    product: Product,
    now: DateTime<Utc>,
}

impl Command for CreateProduct {
    type Output = Product;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Product>> {
        let (product, now) = (&self.product, micros(self.now));
        let latest = product
            .latest_version()
            .map(|v| v.to_string())
            .unwrap_or_default();
        // The code's unique key refuses a second product with it; DO NOTHING
        // says so without failing the statement (or a batch around it).
        let inserted = conn
            .execute(
                "INSERT INTO products (code, display_name, latest_version, personal_terms, business_terms, \
                 grace_period_months, renewal_basis, created_at, updated_at, offline_lease_days) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                args![
                    product.code().as_str(),
                    product.display_name(),
                    &latest,
                    &terms_to_text(product.personal_terms()),
                    &terms_to_text(product.business_terms()),
                    i64::from(product.grace_period_months()),
                    product.renewal_basis().as_str(),
                    now,
                    now,
                    i64::from(product.offline_lease_days()),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(Refusal::ProductAlreadyExists(product.code().to_string()).into());
        }
        Ok(Ending::Commit(product.clone()))
    }
}

/// UpdateProduct: `update` applied to the product as stored.
struct UpdateProduct {
    code: ProductCode,
    update: ProductUpdate,
    now: DateTime<Utc>,
}

impl Command for UpdateProduct {
    type Output = Product;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Product>> {
        let code = &self.code;
        let current = require_product(conn, code, Lock::ForUpdate).await?;
        let updated = Product::new(code.clone(), (self.update)(current.to_spec()))
            .map_err(Refusal::InvalidField)?;
        let latest = updated
            .latest_version()
            .map(|v| v.to_string())
            .unwrap_or_default();
        conn.execute(
            "UPDATE products SET display_name = $1, latest_version = $2, personal_terms = $3, business_terms = $4, \
             grace_period_months = $5, renewal_basis = $6, updated_at = $7, offline_lease_days = $9 WHERE code = $8",
            args![
                updated.display_name(),
                &latest,
                &terms_to_text(updated.personal_terms()),
                &terms_to_text(updated.business_terms()),
                i64::from(updated.grace_period_months()),
                updated.renewal_basis().as_str(),
                micros(self.now),
                code.as_str(),
                i64::from(updated.offline_lease_days()),
            ],
        )
        .await?;
        Ok(Ending::Commit(updated))
    }
}

/// A new API token.
struct CreateToken {
    name: String,
    role: Role,
    token: Token,
    now: DateTime<Utc>,
}

impl Command for CreateToken {
    type Output = ();

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<()>> {
        // A live token's name is unique (a partial unique index).
        let inserted = conn
            .execute(
                "INSERT INTO api_tokens (id, name, role, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING",
                args![
                    self.token.id(),
                    &self.name,
                    self.role.as_str(),
                    &self.token.secret_hash(),
                    micros(self.now),
                ],
            )
            .await?;
        if inserted == 0 {
            let taken = FieldViolation::new("name", "a live token already has this name");
            return Err(Refusal::InvalidField(taken).into());
        }
        Ok(Ending::Commit(()))
    }
}

/// Revokes the live token named `name`; whether there was one.
struct RevokeToken {
    name: String,
    now: DateTime<Utc>,
}

impl Command for RevokeToken {
    type Output = bool;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<bool>> {
        let revoked = conn
            .execute(
                "UPDATE api_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                args![micros(self.now), &self.name],
            )
            .await?;
        Ok(Ending::Commit(revoked > 0))
    }
}

impl SqlStore {
    pub(super) async fn create_product(
        &self,
        product: &Product,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        let cmd = CreateProduct {
            product: product.clone(),
            now,
        };
        self.write(Some(Change::Products), cmd).await
    }

    pub(super) async fn get_product(&self, code: &ProductCode) -> StoreResult<Product> {
        let mut conn = self.readers.acquire().await?;
        require_product(&mut *conn, code, Lock::No).await
    }

    pub(super) async fn list_products(
        &self,
        after: Option<&ProductCode>,
        limit: u32,
    ) -> StoreResult<Vec<Product>> {
        let rows = sqlx::query(concat!(
            product_select!(),
            "WHERE code > $1 ORDER BY code LIMIT $2"
        ))
        .bind(after.map(|c| c.as_str()).unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(product_from_row).collect()
    }

    pub(super) async fn update_product(
        &self,
        code: &ProductCode,
        update: ProductUpdate,
        now: DateTime<Utc>,
    ) -> StoreResult<Product> {
        let cmd = UpdateProduct {
            code: code.clone(),
            update,
            now,
        };
        self.write(Some(Change::Products), cmd).await
    }

    pub(super) async fn create_token(
        &self,
        name: &str,
        role: Role,
        token: &Token,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let cmd = CreateToken {
            name: name.to_string(),
            role,
            token: token.clone(),
            now,
        };
        self.write(None, cmd).await
    }

    pub(super) async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query(concat!(token_select!(), "ORDER BY name, created_at"))
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    pub(super) async fn revoke_token(&self, name: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let cmd = RevokeToken {
            name: name.to_string(),
            now,
        };
        self.write(None, cmd).await
    }

    pub(super) async fn find_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        // Every admin call asks: on SQLite one indexed lookup on the
        // calling task, without a hand-off to sqlx's thread; on PostgreSQL
        // one round trip through tokio-postgres (sqlx would add a ping).
        if let Some(fast) = &self.fast_reads {
            return fast.find_token(id);
        }
        const FIND: &str = concat!(token_select!(), "WHERE id = $1");
        if let Writer::Postgres(pg) = &self.writer {
            let rows = pg.read(FIND, args![id]).await?;
            return rows.first().map(token_from_row).transpose();
        }
        let row = sqlx::query(FIND)
            .bind(id)
            .fetch_optional(&self.readers)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }
}
