//! The database after the soak, held to every invariant the rules state and
//! to what the load was told. Problems are collected, not panicked on, so
//! that the soak prints its figures either way.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::Row;

use super::load::{Model, Watched};

/// A key as the database stores it.
pub fn norm(key: &str) -> String {
    key.replace('-', "").to_uppercase()
}

/// What the audit counted, and what it found wrong.
#[derive(Debug, Default)]
pub struct Audit {
    pub licenses: usize,
    pub activations: usize,
    pub codes_redeemed: usize,
    pub events: usize,
    pub customers_checked: usize,
    pub problems: Vec<String>,
}

impl Audit {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(what());
        }
    }
}

/// Audits the database at `url` against `model`, the feed as ListEvents
/// listed it (`listed`) and as the consumer received it (`watched`).
pub async fn audit(
    url: &str,
    model: &Model,
    listed: &[(i64, String, String)],
    watched: &Watched,
) -> Audit {
    let pool = sqlx::PgPool::connect(url).await.expect("audit connects");
    let mut a = Audit::default();

    // Every license: seats within the limit and equal to the rows and to
    // the history; one `issued`; renewals equal to codes redeemed on it and
    // to `renewed` events; its status where its last status event put it.
    let rows = sqlx::query(
        "SELECT l.license_key, l.seats, l.seats_used, l.renewal_count, l.expires_at, l.status, \
         (SELECT COUNT(*) FROM activations a WHERE a.license_id = l.id), \
         (SELECT COUNT(*) FROM renewal_codes c WHERE c.redeemed_license_id = l.id AND c.state = 'REDEEMED'), \
         (SELECT e.type FROM license_events e WHERE e.license_id = l.id \
          AND e.type IN ('suspended', 'reinstated', 'revoked') ORDER BY e.id DESC LIMIT 1) \
         FROM licenses l",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let counts = sqlx::query(
        "SELECT l.license_key, e.type, COUNT(*) FROM license_events e \
         JOIN licenses l ON l.id = e.license_id GROUP BY l.license_key, e.type",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut events: HashMap<(String, String), i64> = HashMap::new();
    for r in &counts {
        events.insert((r.get(0), r.get(1)), r.get(2));
    }
    let count = |key: &str, kind: &str| {
        events
            .get(&(key.to_string(), kind.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let mut licenses: HashMap<String, (i64, i64, String, i64)> = HashMap::new();
    for r in &rows {
        let key: String = r.get(0);
        let (seats, used, renewals, expires_at): (i64, i64, i64, i64) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        let status: String = r.get(5);
        let (bound, redeemed): (i64, i64) = (r.get(6), r.get(7));
        let last_status: Option<String> = r.get(8);
        a.check(used <= seats, || {
            format!("{key}: {used} seats used of {seats}")
        });
        a.check(used == bound, || {
            format!("{key}: seats_used {used}, {bound} activation rows")
        });
        let (activated, deactivated) = (count(&key, "activated"), count(&key, "deactivated"));
        a.check(bound == activated - deactivated, || {
            format!("{key}: {bound} activations, history {activated} activated - {deactivated} deactivated")
        });
        a.check(count(&key, "issued") == 1, || {
            format!("{key}: issued events")
        });
        let renewed = count(&key, "renewed");
        a.check(renewals == redeemed && renewals == renewed, || {
            format!("{key}: renewal_count {renewals}, codes redeemed on it {redeemed}, renewed events {renewed}")
        });
        let expected_status = match last_status.as_deref() {
            Some("suspended") => "SUSPENDED",
            Some("revoked") => "REVOKED",
            _ => "ACTIVE",
        };
        a.check(status == expected_status, || {
            format!("{key}: status {status}, its history says {expected_status}")
        });
        licenses.insert(key, (bound, renewals, status, expires_at));
    }
    a.licenses = licenses.len();

    // Each workstation is bound iff its last activated/deactivated event
    // says so.
    let fps = sqlx::query(
        "SELECT l.license_key, e.fingerprint, (array_agg(e.type ORDER BY e.id DESC))[1], \
         EXISTS (SELECT 1 FROM activations a WHERE a.license_id = l.id AND a.fingerprint = e.fingerprint) \
         FROM license_events e JOIN licenses l ON l.id = e.license_id \
         WHERE e.type IN ('activated', 'deactivated') GROUP BY l.id, l.license_key, e.fingerprint",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for r in &fps {
        let (key, fp, last, bound): (String, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        a.check((last == "activated") == bound, || {
            format!("{key} {fp}: last event {last}, bound {bound}")
        });
    }

    // The expiry moved exactly by the renewals: each `renewed` starts where
    // the previous expiry was, and the last one ends at the expiry.
    let chain = sqlx::query(
        "SELECT l.license_key, e.type, e.old_expires_at, e.new_expires_at \
         FROM license_events e JOIN licenses l ON l.id = e.license_id \
         WHERE e.type IN ('issued', 'renewed') ORDER BY l.id, e.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut last_expiry: HashMap<String, i64> = HashMap::new();
    for r in &chain {
        let (key, kind): (String, String) = (r.get(0), r.get(1));
        let (old, new): (Option<i64>, Option<i64>) = (r.get(2), r.get(3));
        if kind == "renewed" {
            let previous = last_expiry.get(&key).copied();
            a.check(old == previous, || {
                format!("{key}: a renewal from {old:?}, the expiry was {previous:?}")
            });
        }
        match new {
            Some(new) => {
                last_expiry.insert(key, new);
            }
            None => a
                .problems
                .push(format!("{key}: a {kind} event without its expiry")),
        }
    }
    for (key, (_, _, _, expires_at)) in &licenses {
        a.check(last_expiry.get(key) == Some(expires_at), || {
            format!(
                "{key}: expiry {expires_at}, its history ends at {:?}",
                last_expiry.get(key)
            )
        });
    }

    // Codes: a redeemed one has exactly one `renewed` event, on its
    // license; any other none (no code redeemed twice).
    let codes = sqlx::query(
        "SELECT c.id, c.state, l.license_key, \
         (SELECT COUNT(*) FROM license_events e WHERE e.renewal_code_id = c.id AND e.type = 'renewed' \
          AND e.license_id = c.redeemed_license_id), \
         (SELECT COUNT(*) FROM license_events e WHERE e.renewal_code_id = c.id AND e.type = 'renewed') \
         FROM renewal_codes c LEFT JOIN licenses l ON l.id = c.redeemed_license_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut redeemed_on: HashMap<String, String> = HashMap::new();
    for r in &codes {
        let (id, state, key): (String, String, Option<String>) = (r.get(0), r.get(1), r.get(2));
        let (on_its_license, anywhere): (i64, i64) = (r.get(3), r.get(4));
        if state == "REDEEMED" {
            a.check((on_its_license, anywhere) == (1, 1), || {
                format!("code {id}: {on_its_license} renewals on its license, {anywhere} in all")
            });
            redeemed_on.insert(id, key.unwrap_or_default());
        } else {
            a.check(anywhere == 0, || {
                format!("code {id} ({state}) has a renewal")
            });
        }
    }
    a.codes_redeemed = redeemed_on.len();

    // What the load was told is there: every license issued, and each
    // whole life where it should be.
    for c in &model.customers {
        let key = norm(&c.key);
        let Some((bound, renewals, status, expires_at)) = licenses.get(&key) else {
            a.problems
                .push(format!("acknowledged license {key} missing"));
            continue;
        };
        if !c.complete {
            continue;
        }
        a.customers_checked += 1;
        a.check(
            (*bound, *renewals, status.as_str()) == (1, 1, "ACTIVE"),
            || {
                format!(
                    "{key}: {bound} seats, {renewals} renewals, {status}; expected 1, 1, ACTIVE"
                )
            },
        );
        let issued = chrono::DateTime::from_timestamp_micros(c.issued_expires_at).unwrap();
        let renewed = licensd::domain::time::add_years(issued, 1)
            .unwrap()
            .timestamp_micros();
        a.check(*expires_at == renewed, || {
            format!("{key}: expires {expires_at}, expected {renewed} (issued expiry + 1 year)")
        });
        let code = c.code_id.clone().unwrap_or_default();
        a.check(redeemed_on.get(&code) == Some(&key), || {
            format!(
                "{key}: its code {code} is redeemed on {:?}",
                redeemed_on.get(&code)
            )
        });
        for (kind, n) in [
            ("issued", 1),
            ("activated", 2),
            ("deactivated", 1),
            ("renewed", 1),
            ("suspended", 1),
            ("reinstated", 1),
        ] {
            a.check(count(&key, kind) == n, || {
                format!("{key}: {} {kind} events, expected {n}", count(&key, kind))
            });
        }
        let refused = count(&key, "renewal_refused") as usize;
        a.check(
            refused >= c.refusals_seen && refused < c.redeem_attempts.max(1),
            || {
                format!(
                    "{key}: {refused} renewal_refused events, {} refusals seen in {} attempts",
                    c.refusals_seen, c.redeem_attempts
                )
            },
        );
    }
    let pool_key = norm(&model.pool_key);
    let pool_rows: BTreeSet<String> = sqlx::query(
        "SELECT a.fingerprint FROM activations a JOIN licenses l ON l.id = a.license_id \
         WHERE l.license_key = $1",
    )
    .bind(&pool_key)
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    a.check(pool_rows == model.pool_bound, || {
        format!(
            "the pool's workstations: {pool_rows:?} bound, the load was told {:?}",
            model.pool_bound
        )
    });
    a.activations = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM activations")
        .fetch_one(&pool)
        .await
        .unwrap() as usize;

    // The event feed: every event exactly once, in id order, as the table
    // has it, both listed (ListEvents) and followed (WatchEvents across
    // kills).
    let table: Vec<(i64, String, String)> = sqlx::query(
        "SELECT e.id, l.license_key, e.type FROM license_events e \
         JOIN licenses l ON l.id = e.license_id ORDER BY e.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    a.events = table.len();
    for (name, feed) in [("ListEvents", listed), ("WatchEvents", &watched.events[..])] {
        let feed: Vec<(i64, String, String)> = feed
            .iter()
            .map(|(id, key, kind)| (*id, norm(key), kind.clone()))
            .collect();
        a.check(feed.windows(2).all(|w| w[0].0 < w[1].0), || {
            format!("{name}: not in strictly increasing id order")
        });
        if feed != table {
            let ids: BTreeMap<i64, usize> = feed.iter().fold(BTreeMap::new(), |mut m, e| {
                *m.entry(e.0).or_default() += 1;
                m
            });
            let missing = table.iter().filter(|e| !ids.contains_key(&e.0)).count();
            let repeated = ids.values().filter(|&&n| n > 1).count();
            a.problems.push(format!(
                "{name}: {} events, the table {}: {missing} missing, {repeated} repeated",
                feed.len(),
                table.len()
            ));
        }
    }
    pool.close().await;
    a
}
