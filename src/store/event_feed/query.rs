//! Reading events from the database: the filter a consumer gives, applied
//! in SQL (here) and in memory ([`EventFilter::matches`]), and the
//! per-license history.

use sqlx::AnyConnection;

use crate::store::rows::{EVENT_SELECT, event_from_row};
use crate::store::{LicenseEvent, StoreResult};

/// Events read per statement.
pub(super) const PAGE: usize = 500;

/// What a consumer asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this product's licenses.
    pub product: Option<String>,
    /// Only these types (empty: every type).
    pub types: Vec<String>,
}

impl EventFilter {
    /// Whether `event` passes.
    pub fn matches(&self, event: &LicenseEvent) -> bool {
        self.product.as_ref().is_none_or(|p| *p == event.product)
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }
}

/// Reads the events with `after < id <= up_to` that pass `filter`, at most
/// `limit`, in id order.
pub(super) async fn read(
    conn: &mut AnyConnection,
    after: i64,
    up_to: i64,
    filter: &EventFilter,
    limit: usize,
) -> StoreResult<Vec<LicenseEvent>> {
    if up_to <= after || limit == 0 {
        return Ok(Vec::new());
    }
    let mut sql = format!("{EVENT_SELECT} WHERE e.id > $1 AND e.id <= $2");
    let mut n = 2;
    if filter.product.is_some() {
        n += 1;
        sql.push_str(&format!(" AND l.product_code = ${n}"));
    }
    if !filter.types.is_empty() {
        let marks: Vec<String> = (0..filter.types.len())
            .map(|i| format!("${}", n + 1 + i))
            .collect();
        n += filter.types.len();
        sql.push_str(&format!(" AND e.type IN ({})", marks.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY e.id LIMIT ${}", n + 1));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(up_to);
    if let Some(product) = &filter.product {
        query = query.bind(product.clone());
    }
    for t in &filter.types {
        query = query.bind(t.clone());
    }
    let rows = query.bind(limit as i64).fetch_all(&mut *conn).await?;
    rows.iter().map(event_from_row).collect()
}

/// The per-license history: the events of license `license_id` after
/// `after`, at most `limit`.
pub(in crate::store) async fn read_license_events(
    conn: &mut AnyConnection,
    license_id: i64,
    after: i64,
    limit: u32,
) -> StoreResult<Vec<LicenseEvent>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{EVENT_SELECT} WHERE e.license_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3"
    )))
    .bind(license_id)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(event_from_row).collect()
}
