//! The store contract: every behaviour written once and run against both
//! backends, each test on a fresh database. PostgreSQL tests need
//! `LICENSD_TEST_POSTGRES_URL` (set by `.ci/run`); without it they are skipped
//! with a notice.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::TestDb;
use licensd::domain::product::ProductSpec;
use licensd::domain::rules::StatusAction;
use licensd::domain::{
    CodeState, Edition, LicenseKey, LicenseKind, LicenseStatus, Product, ProductCode, Refusal,
    RenewalCode, Version,
};
use licensd::signing::{KeyState, StoredKey, new_key};
use licensd::store::sql::signing_keys::Retired;
use licensd::store::{
    Actor, IssueLicense, IssueRenewalCode, LicenseFilter, Redeem, SqlStore, Store, StoreError,
};
use sqlx::Connection;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

const NOW: &str = "2026-01-15T12:00:00Z";

fn actor() -> Actor {
    Actor("test".into())
}

fn acme() -> ProductCode {
    ProductCode::parse("ACME").unwrap()
}

async fn product(store: &SqlStore, code: &str, latest: &str) -> Product {
    let p = Product::new(
        ProductCode::parse(code).unwrap(),
        ProductSpec {
            display_name: format!("{code} product"),
            latest_version: latest.into(),
            ..Default::default()
        },
    )
    .unwrap();
    store.create_product(&p, t(NOW)).await.unwrap()
}

fn issue_cmd(request_id: &str, seats: u32) -> IssueLicense {
    IssueLicense {
        request_id: request_id.into(),
        product: acme(),
        edition: Edition::Business,
        kind: LicenseKind::Standard,
        seats,
        term_years: 1,
        starts_at: None,
        order_ref: "o-1".into(),
        customer_ref: "c-1".into(),
        reseller: String::new(),
    }
}

fn code_cmd(request_id: &str, seats: u32) -> IssueRenewalCode {
    IssueRenewalCode {
        request_id: request_id.into(),
        product: acme(),
        edition: Edition::Business,
        seats,
        term_years: 1,
        order_ref: "o-2".into(),
        reseller: String::new(),
    }
}

fn refusal<T: std::fmt::Debug>(r: Result<T, StoreError>) -> Refusal {
    match r {
        Err(StoreError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Runs raw SQL against the test database (to attack the constraints).
async fn raw(db: &TestDb, sql: &str) -> Result<(), sqlx::Error> {
    if db.is_postgres() {
        let mut c = sqlx::PgConnection::connect(&db.url).await?;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await?;
    } else {
        let path = licensd::store::sqlite::sqlite_path(&db.url);
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts).await?;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Behaviours
// ---------------------------------------------------------------------------

async fn products_are_created_read_listed_and_updated(db: &TestDb, s: &SqlStore) {
    let _ = db;
    for code in ["BETA", "ACME", "ZED9"] {
        product(s, code, "1.0").await;
    }
    let dup = Product::new(acme(), ProductSpec::default()).unwrap();
    assert_eq!(
        refusal(s.create_product(&dup, t(NOW)).await),
        Refusal::ProductAlreadyExists("ACME".into())
    );
    let listed = s.list_products(None, 2).await.unwrap();
    assert_eq!(
        listed.iter().map(|p| p.code().as_str()).collect::<Vec<_>>(),
        ["ACME", "BETA"]
    );
    let rest = s
        .list_products(Some(&ProductCode::parse("BETA").unwrap()), 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    let updated = s
        .update_product(
            &acme(),
            Arc::new(|mut spec: ProductSpec| {
                spec.latest_version = "4.10.0".into();
                spec.grace_period_months = Some(3);
                spec
            }),
            t(NOW),
        )
        .await
        .unwrap();
    assert_eq!(updated.latest_version().unwrap().as_str(), "4.10.0");
    let read = s.get_product(&acme()).await.unwrap();
    assert_eq!(read, updated);
    assert_eq!(read.grace_period_months(), 3);
    assert_eq!(read.display_name(), "ACME product");
    assert_eq!(
        refusal(s.get_product(&ProductCode::parse("NOPE").unwrap()).await),
        Refusal::ProductNotFound("NOPE".into())
    );
}

async fn r1_issue_is_idempotent_per_request_id(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    let a = s
        .issue_license(&issue_cmd("r-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(a.expires_at, t("2027-01-15T12:00:00Z"));
    assert_eq!(a.status, LicenseStatus::Active);
    let again = s
        .issue_license(&issue_cmd("r-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(again.key, a.key);
    assert_eq!(
        refusal(
            s.issue_license(&issue_cmd("r-1", 3), &actor(), t(NOW))
                .await
        ),
        Refusal::IdempotencyKeyReused
    );
    let all = s
        .list_licenses(&LicenseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let mut cmd = issue_cmd("r-2", 1);
    cmd.edition = Edition::Personal;
    cmd.term_years = 3;
    assert!(matches!(
        refusal(s.issue_license(&cmd, &actor(), t(NOW)).await),
        Refusal::TermNotAllowed { term_years: 3, .. }
    ));
    let mut cmd = issue_cmd("r-3", 1);
    cmd.product = ProductCode::parse("NOPE").unwrap();
    assert!(matches!(
        refusal(s.issue_license(&cmd, &actor(), t(NOW)).await),
        Refusal::ProductNotFound(_)
    ));
}

async fn r7_activation_takes_seats_up_to_the_limit(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "fp-1", "h1", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    let (l2, act) = s
        .activate(&l.key, "fp-1", "h1", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!((l2.seats_used, act.fingerprint.as_str()), (1, "fp-1"));
    s.activate(&l.key, "fp-2", "h2", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(
        refusal(
            s.activate(&l.key, "fp-3", "h3", "1.0", &actor(), t(NOW))
                .await
        ),
        Refusal::SeatLimitReached { seats: 2 }
    );
    let after = s
        .deactivate(&l.key, "fp-1", &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(after.seats_used, 1);
    assert_eq!(
        refusal(s.deactivate(&l.key, "fp-1", &actor(), t(NOW)).await),
        Refusal::MachineNotActivated
    );
    let (full, _) = s
        .activate(&l.key, "fp-3", "h3", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(full.seats_used, 2);
    let fps: Vec<_> = full
        .activations
        .iter()
        .map(|a| a.fingerprint.as_str())
        .collect();
    assert_eq!(fps.len(), 2);
    assert!(fps.contains(&"fp-2") && fps.contains(&"fp-3"));
    // R2: expired licenses take no new workstation.
    let later = t("2027-01-15T12:00:00Z");
    s.deactivate(&l.key, "fp-3", &actor(), later).await.unwrap();
    assert!(matches!(
        refusal(
            s.activate(&l.key, "fp-9", "h", "1.0", &actor(), later)
                .await
        ),
        Refusal::LicenseExpired { .. }
    ));
}

async fn r4_a_code_renews_once_and_refusals_are_recorded(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "4.10.0").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "fp-1", "h1", "4.10.0", &actor(), t(NOW))
        .await
        .unwrap();
    let (record, code) = s
        .issue_renewal_code(&code_cmd("c-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(record.state, CodeState::Unredeemed);
    let (again, same) = s
        .issue_renewal_code(&code_cmd("c-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), &same), (record.id.as_str(), &code));

    let redeem = |v: &str| Redeem {
        license_key: l.key.clone(),
        code: code.clone(),
        fingerprint: "fp-1".into(),
        client_version: Version::parse(v).unwrap(),
    };
    // Refused (R6): nothing changes but one history event.
    assert!(matches!(
        refusal(s.redeem(&redeem("4.9.2"), &actor(), t(NOW)).await),
        Refusal::ClientVersionOutdated { .. }
    ));
    assert_eq!(
        s.get_license(&l.key).await.unwrap().expires_at,
        l.expires_at
    );
    assert_eq!(
        s.get_renewal_code(&code).await.unwrap().state,
        CodeState::Unredeemed
    );

    let (renewed, previous) = s.redeem(&redeem("4.10.0"), &actor(), t(NOW)).await.unwrap();
    assert_eq!(previous, l.expires_at);
    assert_eq!(renewed.expires_at, t("2028-01-15T12:00:00Z"));
    assert_eq!(renewed.renewal_count, 1);
    assert!(matches!(
        refusal(s.redeem(&redeem("4.10.0"), &actor(), t(NOW)).await),
        Refusal::RenewalCodeAlreadyRedeemed { .. }
    ));
    let rec = s.get_renewal_code(&code).await.unwrap();
    assert_eq!(rec.state, CodeState::Redeemed);
    assert_eq!(rec.redeemed_license_key.as_ref(), Some(&l.key));
    assert_eq!(rec.redeemed_at, Some(t(NOW)));

    let events = s.list_events(&l.key, None, 100).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "issued",
            "activated",
            "renewal_refused",
            "renewed",
            "renewal_refused"
        ]
    );
    assert_eq!(events[2].refusal_reason, "CLIENT_VERSION_OUTDATED");
    assert_eq!(events[3].old_expires_at, Some(l.expires_at));
    assert_eq!(events[3].new_expires_at, Some(renewed.expires_at));
    assert_eq!(
        events[3].renewal_code_id.as_deref(),
        Some(record.id.as_str())
    );
    let page = s.list_events(&l.key, Some(events[1].id), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[2].id, events[3].id]
    );

    let unknown = Redeem {
        code: RenewalCode::generate(),
        ..redeem("4.10.0")
    };
    assert_eq!(
        refusal(s.redeem(&unknown, &actor(), t(NOW)).await),
        Refusal::RenewalCodeNotFound
    );
    assert_eq!(
        s.list_events(&l.key, None, 100).await.unwrap().len(),
        5,
        "not-found writes nothing"
    );
}

async fn r11_status_changes_and_voids(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 1), &actor(), t(NOW))
        .await
        .unwrap();
    let sus = s
        .change_status(
            &l.key,
            StatusAction::Suspend,
            "late payment",
            Some("s-1"),
            &actor(),
            t(NOW),
        )
        .await
        .unwrap();
    assert_eq!(sus.status, LicenseStatus::Suspended);
    s.change_status(
        &l.key,
        StatusAction::Suspend,
        "late payment",
        Some("s-1"),
        &actor(),
        t(NOW),
    )
    .await
    .unwrap();
    let rev = s
        .change_status(
            &l.key,
            StatusAction::Revoke,
            "fraud",
            None,
            &actor(),
            t(NOW),
        )
        .await
        .unwrap();
    assert_eq!(rev.status, LicenseStatus::Revoked);
    assert_eq!(
        refusal(
            s.change_status(&l.key, StatusAction::Reinstate, "", None, &actor(), t(NOW))
                .await
        ),
        Refusal::LicenseRevoked
    );
    let events = s.list_events(&l.key, None, 100).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(kinds, ["issued", "suspended", "revoked"]);
    assert_eq!(events[1].detail, "late payment");

    let (_, code) = s
        .issue_renewal_code(&code_cmd("c-1", 1), &actor(), t(NOW))
        .await
        .unwrap();
    let void = s
        .void_renewal_code(&code, "refund", None, &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(
        (void.state, void.void_reason.as_str()),
        (CodeState::Void, "refund")
    );
    assert_eq!(void.voided_at, Some(t(NOW)));
}

async fn licenses_are_filtered_and_paged_by_expiry(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    product(s, "BETA", "").await;
    let mut keys = Vec::new();
    for (i, start) in [
        "2025-03-01T00:00:00Z",
        "2025-02-01T00:00:00Z",
        "2025-04-01T00:00:00Z",
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = issue_cmd(&format!("r-{i}"), 1);
        cmd.starts_at = Some(t(start));
        cmd.customer_ref = format!("c-{}", i % 2);
        keys.push(s.issue_license(&cmd, &actor(), t(NOW)).await.unwrap().key);
    }
    let mut other = issue_cmd("r-beta", 1);
    other.product = ProductCode::parse("BETA").unwrap();
    s.issue_license(&other, &actor(), t(NOW)).await.unwrap();

    let acme_only = LicenseFilter {
        product: Some(acme()),
        ..Default::default()
    };
    let page1 = s.list_licenses(&acme_only, None, 2).await.unwrap();
    let page2 = s
        .list_licenses(&acme_only, Some(page1[1].1), 2)
        .await
        .unwrap();
    let order: Vec<&LicenseKey> = page1
        .iter()
        .chain(page2.iter())
        .map(|(l, _)| &l.key)
        .collect();
    assert_eq!(order, [&keys[1], &keys[0], &keys[2]]);

    let window = LicenseFilter {
        expires_after: Some(t("2026-02-15T00:00:00Z")),
        expires_before: Some(t("2026-03-15T00:00:00Z")),
        ..Default::default()
    };
    let due = s.list_licenses(&window, None, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].0.key, keys[0]);
    let by_customer = LicenseFilter {
        customer_ref: Some("c-1".into()),
        ..Default::default()
    };
    let theirs = s.list_licenses(&by_customer, None, 10).await.unwrap();
    assert_eq!(theirs.len(), 2, "the second ACME license and the BETA one");
    assert_eq!(theirs[0].0.key, keys[1]);
    assert_eq!(theirs[1].0.product.as_str(), "BETA");
    let both = LicenseFilter {
        customer_ref: Some("c-1".into()),
        product: Some(acme()),
        ..Default::default()
    };
    assert_eq!(s.list_licenses(&both, None, 10).await.unwrap().len(), 1);
}

/// Every combination of ListLicenses' filters, paged two at a time, lists
/// exactly the licenses a plain filter of the whole listing keeps, in the
/// same order: the statement is chosen by which filters are set, and its
/// bounds merge the cursor with the expiry window.
async fn every_combination_of_listing_filters_lists_what_it_should(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    product(s, "BETA", "").await;
    for i in 0..14 {
        let mut cmd = issue_cmd(&format!("r-{i}"), 1);
        if i % 3 == 0 {
            cmd.product = ProductCode::parse("BETA").unwrap();
        }
        cmd.customer_ref = format!("c-{}", i % 2);
        cmd.order_ref = format!("o-{}", i % 4);
        // Several licenses share an expiry, so the cursor's id decides.
        cmd.starts_at = Some(t(&format!("2025-{:02}-01T00:00:00Z", 1 + i % 5)));
        s.issue_license(&cmd, &actor(), t(NOW)).await.unwrap();
    }
    let everything = s
        .list_licenses(&LicenseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(everything.len(), 14);
    let edge = |month: u32| t(&format!("2026-{month:02}-01T00:00:00Z"));
    let mut combinations = 0;
    for mask in 0u32..32 {
        let filter = LicenseFilter {
            product: (mask & 1 != 0).then(acme),
            customer_ref: (mask & 2 != 0).then(|| "c-1".to_string()),
            order_ref: (mask & 4 != 0).then(|| "o-3".to_string()),
            // Exactly on an expiry: `expires_after` includes it,
            // `expires_before` does not.
            expires_after: (mask & 8 != 0).then(|| edge(2)),
            expires_before: (mask & 16 != 0).then(|| edge(5)),
        };
        let wanted: Vec<&LicenseKey> = everything
            .iter()
            .map(|(l, _)| l)
            .filter(|l| filter.product.as_ref().is_none_or(|p| l.product == *p))
            .filter(|l| {
                filter
                    .customer_ref
                    .as_ref()
                    .is_none_or(|c| l.customer_ref == *c)
            })
            .filter(|l| filter.order_ref.as_ref().is_none_or(|o| l.order_ref == *o))
            .filter(|l| filter.expires_after.is_none_or(|t| l.expires_at >= t))
            .filter(|l| filter.expires_before.is_none_or(|t| l.expires_at < t))
            .map(|l| &l.key)
            .collect();
        let mut listed = Vec::new();
        let mut cursor = None;
        loop {
            let page = s.list_licenses(&filter, cursor, 2).await.unwrap();
            listed.extend(page.iter().map(|(l, _)| l.key.clone()));
            assert!(
                listed.len() <= wanted.len(),
                "filter {filter:?} lists too much: {listed:?}"
            );
            match page.last() {
                Some((_, c)) if page.len() == 2 => cursor = Some(*c),
                _ => break,
            }
        }
        let listed: Vec<&LicenseKey> = listed.iter().collect();
        assert_eq!(listed, wanted, "filter {filter:?}");
        combinations += usize::from(!wanted.is_empty());
    }
    assert!(
        combinations >= 24,
        "most combinations list something: {combinations}"
    );
}

/// However many replicas store a first signing key at once, one key is
/// active; a rotation keeps exactly one active; only a published key
/// retires.
async fn one_signing_key_is_active_whoever_stores_one(db: &TestDb, s: &SqlStore) {
    let _ = db;
    let now = t(NOW);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.ensure_signing_key(&new_key(now)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let active = |keys: &[StoredKey]| -> Vec<String> {
        keys.iter()
            .filter(|k| k.state == KeyState::Active)
            .map(|k| k.kid.clone())
            .collect()
    };
    let keys = s.signing_keys().await.unwrap();
    assert_eq!((keys.len(), active(&keys).len()), (1, 1), "{keys:?}");
    let first = keys[0].kid.clone();
    s.ensure_signing_key(&new_key(now)).await.unwrap();
    assert_eq!(
        s.signing_keys().await.unwrap().len(),
        1,
        "a key is active already"
    );

    let next = new_key(now);
    s.rotate_signing_key(&next).await.unwrap();
    let keys = s.signing_keys().await.unwrap();
    assert_eq!(active(&keys), std::slice::from_ref(&next.kid));
    let old = keys.iter().find(|k| k.kid == first).unwrap();
    assert_eq!(old.state, KeyState::Published);

    let retire = |kid: String| async move { s.retire_signing_key(&kid, now).await.unwrap() };
    assert_eq!(retire(next.kid.clone()).await, Retired::IsActive);
    assert_eq!(retire(first.clone()).await, Retired::Now);
    assert_eq!(retire(first.clone()).await, Retired::Already);
    assert_eq!(retire("no-such-key".into()).await, Retired::NotFound);
    let keys = s.signing_keys().await.unwrap();
    let old = keys.iter().find(|k| k.kid == first).unwrap();
    assert_eq!((old.state, old.retired_at), (KeyState::Retired, Some(now)));
    assert_eq!(active(&keys), [next.kid]);
}

async fn validation_view_reports_the_fingerprint_binding(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "2.0").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 2), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "fp-1", "h1", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    let v = s
        .validation_view(&l.key, Some("fp-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.fingerprint_bound, Some(true));
    assert_eq!(v.latest_version.unwrap().as_str(), "2.0");
    assert_eq!((v.seats, v.seats_used), (2, 1));
    let v = s
        .validation_view(&l.key, Some("fp-2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.fingerprint_bound, Some(false));
    let v = s.validation_view(&l.key, None).await.unwrap().unwrap();
    assert_eq!(v.fingerprint_bound, None);
    let unknown = LicenseKey::generate(&acme(), LicenseKind::Standard);
    assert!(s.validation_view(&unknown, None).await.unwrap().is_none());
}

async fn renewal_codes_are_stored_only_as_hashes(db: &TestDb, s: &SqlStore) {
    product(s, "ACME", "").await;
    let mut codes = Vec::new();
    for i in 0..5 {
        codes.push(
            s.issue_renewal_code(&code_cmd(&format!("c-{i}"), 1), &actor(), t(NOW))
                .await
                .unwrap()
                .1,
        );
    }
    s.close().await;
    if db.is_postgres() {
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        for table in [
            "renewal_codes",
            "idempotency_keys",
            "settings",
            "license_events",
        ] {
            let dump: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT coalesce(string_agg(t::text, '|'), '') FROM {table} t"
            )))
            .fetch_one(&mut c)
            .await
            .unwrap();
            for code in &codes {
                assert!(
                    !dump.contains(code.expose_normalized()),
                    "{table} holds a code"
                );
                assert!(
                    !dump.contains(&code.expose_display()),
                    "{table} holds a code"
                );
            }
        }
    } else {
        let path = licensd::store::sqlite::sqlite_path(&db.url);
        let mut bytes = std::fs::read(&path).unwrap();
        let wal = path.with_extension("db-wal");
        if let Ok(w) = std::fs::read(wal) {
            bytes.extend(w);
        }
        let text = String::from_utf8_lossy(&bytes);
        for code in &codes {
            assert!(!text.contains(code.expose_normalized()));
            assert!(!text.contains(&code.expose_display()));
        }
    }
}

async fn constraints_refuse_impossible_states(db: &TestDb, s: &SqlStore) {
    product(s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 1), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "fp-1", "h", "1", &actor(), t(NOW))
        .await
        .unwrap();
    let (_, code) = s
        .issue_renewal_code(&code_cmd("c-1", 1), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "fp-1", "h", "1", &actor(), t(NOW))
        .await
        .unwrap();
    s.redeem(
        &Redeem {
            license_key: l.key.clone(),
            code: code.clone(),
            fingerprint: "fp-1".into(),
            client_version: Version::parse("1").unwrap(),
        },
        &actor(),
        t(NOW),
    )
    .await
    .unwrap();
    let key = l.key.normalized();
    let id = format!("(SELECT id FROM licenses WHERE license_key = '{key}')");
    // R7: a second workstation on a one-seat license.
    assert!(raw(db, &format!(
        "INSERT INTO activations (license_id, fingerprint, activated_at) VALUES ({id}, 'fp-2', 0)"
    ))
    .await
    .is_err());
    // The same fingerprint twice.
    assert!(raw(db, &format!(
        "INSERT INTO activations (license_id, fingerprint, activated_at) VALUES ({id}, 'fp-1', 0)"
    ))
    .await
    .is_err());
    // Seats below one; seats_used above seats.
    assert!(
        raw(
            db,
            &format!("UPDATE licenses SET seats = 0 WHERE license_key = '{key}'")
        )
        .await
        .is_err()
    );
    assert!(
        raw(
            db,
            &format!("UPDATE licenses SET seats_used = 2 WHERE license_key = '{key}'")
        )
        .await
        .is_err()
    );
    // R4: a redeemed code cannot go back, nor be renewed from twice.
    assert!(raw(db, "UPDATE renewal_codes SET state = 'UNREDEEMED', redeemed_at = NULL, redeemed_license_id = NULL").await.is_err());
    let code_id = s.get_renewal_code(&code).await.unwrap().id;
    assert!(raw(db, &format!(
        "INSERT INTO license_events (license_id, type, at, actor, old_expires_at, new_expires_at, renewal_code_id) \
         VALUES ({id}, 'renewed', 0, 'x', 1, 2, '{code_id}')"
    ))
    .await
    .is_err());
    // R9: a STANDARD key never carries a marker.
    assert!(
        raw(
            db,
            &format!("UPDATE licenses SET kind = 'PROMO' WHERE license_key = '{key}'")
        )
        .await
        .is_err()
    );
    // The store still reads a consistent license.
    let after = s.get_license(&l.key).await.unwrap();
    assert_eq!(
        (after.seats, after.seats_used, after.activations.len()),
        (1, 1, 1)
    );
}

async fn concurrent_writes_keep_every_rule(db: &TestDb, s: &SqlStore) {
    let _ = db;
    product(s, "ACME", "").await;
    let s = Arc::new(s.clone());
    let l = s
        .issue_license(&issue_cmd("r-1", 5), &actor(), t(NOW))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (s, key) = (s.clone(), l.key.clone());
        tasks.push(tokio::spawn(async move {
            s.activate(&key, &format!("fp-{i}"), "h", "1", &actor(), t(NOW))
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Refused(Refusal::SeatLimitReached { seats: 5 })) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(s.get_license(&l.key).await.unwrap().seats_used, 5);

    let (_, code) = s
        .issue_renewal_code(&code_cmd("c-1", 5), &actor(), t(NOW))
        .await
        .unwrap();
    let fp = s.get_license(&l.key).await.unwrap().activations[0]
        .fingerprint
        .clone();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cmd = Redeem {
            license_key: l.key.clone(),
            code: code.clone(),
            fingerprint: fp.clone(),
            client_version: Version::parse("1").unwrap(),
        };
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.redeem(&cmd, &actor(), t(NOW)).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Refused(Refusal::RenewalCodeAlreadyRedeemed { .. })) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok, 1);
    // Each refusal kept its history event, whatever was committed with it.
    let events = s.list_events(&l.key, None, 1_000).await.unwrap();
    let count = |kind: &str| events.iter().filter(|e| e.event_type == kind).count();
    assert_eq!((count("renewed"), count("renewal_refused")), (1, 19));
    assert_eq!(
        s.get_license(&l.key).await.unwrap().expires_at,
        l.expires_at + (t("2028-01-15T12:00:00Z") - t("2027-01-15T12:00:00Z"))
    );

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.issue_license(&issue_cmd("same-request", 1), &actor(), t(NOW))
                .await
        }));
    }
    let mut keys = std::collections::HashSet::new();
    for task in tasks {
        keys.insert(task.await.unwrap().expect("idempotent retries succeed").key);
    }
    assert_eq!(keys.len(), 1);
}

/// With the validation cache on, Validate's view of every license equals the
/// database's, whichever store made the change: the cache's compact record
/// (status, kind, edition, expiry, seats, fingerprint hashes, product
/// policy) loses nothing Validate answers.
async fn the_validation_cache_answers_exactly_as_the_database(db: &TestDb, s: &SqlStore) {
    use licensd::store::validation_cache::Answer;
    product(s, "ACME", "2.0").await;
    // A second store on the same database (another replica) with the cache,
    // polling often so that the test is quick.
    let cached = db.open().await.with_validation_cache(
        std::time::Duration::from_millis(20),
        licensd::store::validation_cache::DEFAULT_MAX_STALENESS,
    );
    let mut keys = Vec::new();
    for (i, (kind, edition, seats)) in [
        (LicenseKind::Standard, Edition::Business, 3),
        (LicenseKind::Standard, Edition::Personal, 1),
        (LicenseKind::Promo, Edition::Business, 2),
        (LicenseKind::Nfr, Edition::Personal, 5),
    ]
    .into_iter()
    .enumerate()
    {
        // Half the writes on each store.
        let w = if i % 2 == 0 { s } else { &cached };
        let cmd = IssueLicense {
            kind,
            edition,
            ..issue_cmd(&format!("cache-{i}"), seats)
        };
        let l = w.issue_license(&cmd, &actor(), t(NOW)).await.unwrap();
        for f in 0..seats.min(2) {
            w.activate(&l.key, &format!("fp-{f}"), "h", "1.0", &actor(), t(NOW))
                .await
                .unwrap();
        }
        keys.push(l.key);
    }
    s.change_status(&keys[0], StatusAction::Suspend, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    cached
        .change_status(&keys[1], StatusAction::Revoke, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    cached
        .deactivate(&keys[2], "fp-1", &actor(), t(NOW))
        .await
        .unwrap();
    s.update_product(
        &acme(),
        Arc::new(|spec| ProductSpec {
            latest_version: "3.1".into(),
            grace_period_months: Some(4),
            ..spec
        }),
        t(NOW),
    )
    .await
    .unwrap();

    // Wait until the cache has loaded and two polls have started since the
    // last write: every change is in.
    let cache = cached.validation_cache().expect("cache on");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cache.stats().loaded {
        assert!(std::time::Instant::now() < deadline, "cache did not load");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let epoch = cache.stats().epoch;
    while cache.stats().epoch < epoch + 2 || cache.stats().pending > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "cache did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    for key in &keys {
        for fp in [None, Some("fp-0"), Some("fp-1"), Some("fp-9")] {
            let from_db = s.validation_view(key, fp).await.unwrap();
            let from_cache = match cache.lookup(key, fp, std::time::Instant::now()) {
                Answer::Found(v) => Some(v),
                Answer::AskDatabase => panic!("the cache should answer"),
            };
            assert_eq!(from_cache, from_db, "{fp:?}");
            assert_eq!(cached.validation_view(key, fp).await.unwrap(), from_db);
        }
    }
    // A key it does not hold is the database's to answer: no such license.
    let unknown = LicenseKey::generate(&acme(), LicenseKind::Standard);
    assert_eq!(
        cache.lookup(&unknown, None, std::time::Instant::now()),
        Answer::AskDatabase
    );
    assert_eq!(cached.validation_view(&unknown, None).await.unwrap(), None);
    cached.close().await;
}

/// When the cache's polls fail, it stops answering within 800 ms of the last
/// poll that succeeded, and Validate reads the database: a change made
/// meanwhile is answered, never the cache's old copy. When polls succeed
/// again, the cache answers again, with the change.
async fn a_cache_whose_polls_fail_leaves_validate_to_the_database(db: &TestDb, s: &SqlStore) {
    use licensd::store::validation_cache::Answer;
    use std::time::{Duration, Instant};
    product(s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("r-1", 1), &actor(), t(NOW))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let cached = cached_store(db, Duration::from_millis(20), Some(&l.key)).await;
    let cache = cached.validation_cache().unwrap().clone();
    // Polls now fail (the event log is out of reach); the license changes
    // behind the cache's back.
    raw(
        db,
        "ALTER TABLE license_events RENAME TO license_events_away",
    )
    .await
    .unwrap();
    raw(
        db,
        &format!(
            "UPDATE licenses SET status = 'SUSPENDED' WHERE license_key = '{}'",
            l.key.normalized()
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        cache.lookup(&l.key, None, Instant::now()),
        Answer::AskDatabase
    );
    let v = cached.validation_view(&l.key, None).await.unwrap().unwrap();
    assert_eq!(v.standing.status, LicenseStatus::Suspended);

    // Polls succeed again: the cache answers again, with the change. (It
    // was made without an event, so it reaches the cache only on a license's
    // next event; an event makes it visible.)
    raw(
        db,
        "ALTER TABLE license_events_away RENAME TO license_events",
    )
    .await
    .unwrap();
    s.change_status(&l.key, StatusAction::Reinstate, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    loop {
        match cache.lookup(&l.key, None, Instant::now()) {
            Answer::Found(v) if v.standing.status == LicenseStatus::Active => break,
            _ => {
                assert!(Instant::now() < deadline, "the cache did not answer again");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    cached.close().await;
}

// ---------------------------------------------------------------------------
// One test per behaviour and backend
// ---------------------------------------------------------------------------

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::sqlite();
                    let store = db.open().await;
                    super::$name(&db, &store).await;
                    store.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    let store = db.open().await;
                    super::$name(&db, &store).await;
                    store.close().await;
                    db.drop_db().await;
                }
            )*
        }
    };
}

contract!(
    products_are_created_read_listed_and_updated,
    r1_issue_is_idempotent_per_request_id,
    r7_activation_takes_seats_up_to_the_limit,
    r4_a_code_renews_once_and_refusals_are_recorded,
    r11_status_changes_and_voids,
    licenses_are_filtered_and_paged_by_expiry,
    every_combination_of_listing_filters_lists_what_it_should,
    one_signing_key_is_active_whoever_stores_one,
    validation_view_reports_the_fingerprint_binding,
    the_validation_cache_answers_exactly_as_the_database,
    a_cache_whose_polls_fail_leaves_validate_to_the_database,
    a_license_issued_elsewhere_is_found_at_once,
    renewal_codes_are_stored_only_as_hashes,
    constraints_refuse_impossible_states,
    concurrent_writes_keep_every_rule,
    a_write_dropped_at_any_point_is_still_seen_at_once,
);

/// Has PostgreSQL end every session on database `name`, as a restart would;
/// one `true` per session ended.
async fn terminate_connections(admin: &mut sqlx::PgConnection, name: &str) -> Vec<bool> {
    sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// A write that waits for a row lock longer than the store's lock timeout
/// gives up (UNAVAILABLE) and releases what it holds, on the connections
/// the writes run on as on the others; the same write succeeds once the
/// lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_gives_up_waiting_for_a_lock_after_the_lock_timeout() {
    use std::time::{Duration, Instant};
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let lock_timeout = Duration::from_millis(300);
    let s = licensd::store::DatabaseUrl::parse(&db.url)
        .unwrap()
        .open(licensd::store::postgres::PostgresOptions {
            lock_timeout,
            ..Default::default()
        })
        .await
        .unwrap();
    product(&s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("held", 3), &actor(), t(NOW))
        .await
        .unwrap();
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE")
        .bind(l.key.normalized())
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let waited = tokio::time::timeout(
        lock_timeout * 10,
        s.activate(&l.key, "ws-a", "h", "1.0", &actor(), t(NOW)),
    )
    .await
    .expect("the write gave up by itself");
    let took = started.elapsed();
    assert!(
        matches!(waited, Err(StoreError::Unavailable(_))),
        "gave up: {waited:?}"
    );
    assert!(
        took >= lock_timeout && took < lock_timeout * 5,
        "after the lock timeout, not before or long after: {took:?}"
    );
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let (license, _) = s
        .activate(&l.key, "ws-a", "h", "1.0", &actor(), t(NOW))
        .await
        .expect("the lock is free");
    assert_eq!(license.seats_used, 1, "the refused attempt took nothing");
    s.close().await;
    db.drop_db().await;
}

/// Pooled PostgreSQL connections are not pinged before use. When the
/// database drops every connection (a restart, a failover), the next writes
/// must still succeed: their BEGIN fails on a dead connection, nothing ran,
/// and it is tried again on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_survive_the_database_dropping_every_connection() {
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.open().await;
    product(&store, "ACME", "").await;
    // Fill the pool with idle connections.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .issue_license(&issue_cmd(&format!("warm-{i}"), 1), &actor(), t(NOW))
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("issues");
    }

    let mut admin = sqlx::PgConnection::connect(db.admin_url.as_deref().unwrap())
        .await
        .unwrap();
    let killed = terminate_connections(&mut admin, db.name.as_deref().unwrap()).await;
    assert!(killed.len() >= 2, "the pool held connections: {killed:?}");
    assert!(killed.iter().all(|k| *k));

    let mut keys = Vec::new();
    for i in 0..4 {
        let l = store
            .issue_license(&issue_cmd(&format!("after-{i}"), 1), &actor(), t(NOW))
            .await
            .expect("a write right after the database dropped every connection");
        keys.push(l.key);
    }

    // Again, and this time the pool sits idle before the next calls: reads
    // must not meet a dead connection either.
    let killed = terminate_connections(&mut admin, db.name.as_deref().unwrap()).await;
    assert!(!killed.is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    for key in &keys {
        let l = store
            .get_license(key)
            .await
            .expect("a read after a restart");
        assert_eq!(&l.key, key);
    }
    store.close().await;
    let _ = admin.close().await;
    db.drop_db().await;
}

/// The cache's status for `key`, once it answers from memory.
/// Another replica's store, its validation cache polling every `refresh`,
/// once its first load has finished and, given `holding`, it answers that
/// license from memory.
async fn cached_store(
    db: &TestDb,
    refresh: std::time::Duration,
    holding: Option<&LicenseKey>,
) -> SqlStore {
    use licensd::store::validation_cache::Answer;
    use std::time::{Duration, Instant};
    let s = db.open().await.with_validation_cache(
        refresh,
        licensd::store::validation_cache::DEFAULT_MAX_STALENESS,
    );
    let cache = s.validation_cache().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = match holding {
            Some(key) => matches!(cache.lookup(key, None, Instant::now()), Answer::Found(_)),
            None => cache.stats().loaded,
        };
        if ready {
            return s;
        }
        assert!(Instant::now() < deadline, "the cache did not load");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cached_status(
    cache: &licensd::store::validation_cache::ValidationCache,
    key: &LicenseKey,
) -> Option<LicenseStatus> {
    match cache.lookup(key, None, std::time::Instant::now()) {
        licensd::store::validation_cache::Answer::Found(v) => Some(v.standing.status),
        _ => None,
    }
}

/// PostgreSQL hands out event ids from a sequence, so an event can commit
/// after one with a higher id. The cache must still apply it: each poll asks
/// for the events of every transaction that was still running at the
/// previous poll (by `txid` against the snapshot's `xmin`), not for ids above
/// the highest seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cache_applies_an_event_that_commits_after_a_later_one() {
    use std::time::{Duration, Instant};
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let s = db.open().await;
    product(&s, "ACME", "").await;
    let a = s
        .issue_license(&issue_cmd("a", 1), &actor(), t(NOW))
        .await
        .unwrap();
    let b = s
        .issue_license(&issue_cmd("b", 1), &actor(), t(NOW))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let cached = cached_store(&db, Duration::from_millis(20), Some(&a.key)).await;
    let cache = cached.validation_cache().unwrap();

    // A transaction suspends `a`, taking an event id, and stays open...
    let mut slow = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    sqlx::query("UPDATE licenses SET status = 'SUSPENDED' WHERE license_key = $1")
        .bind(a.key.normalized())
        .execute(&mut slow)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO license_events (license_id, type, at, actor) \
         SELECT id, 'suspended', 0, 'test' FROM licenses WHERE license_key = $1",
    )
    .bind(a.key.normalized())
    .execute(&mut slow)
    .await
    .unwrap();
    // ...while a later change, with a higher event id, commits and the
    // cache's polls move past it.
    s.change_status(&b.key, StatusAction::Suspend, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    while cached_status(cache, &b.key).await != Some(LicenseStatus::Suspended) {
        assert!(
            Instant::now() < deadline,
            "the cache did not see b's change"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let epoch = cache.stats().epoch;
    while cache.stats().epoch < epoch + 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cached_status(cache, &a.key).await,
        Some(LicenseStatus::Active),
        "not committed yet"
    );

    // Once the older event commits, the cache applies it.
    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    let committed = Instant::now();
    while cached_status(cache, &a.key).await != Some(LicenseStatus::Suspended) {
        assert!(
            committed.elapsed() < Duration::from_secs(5),
            "the cache never applied the event that committed late"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cached.close().await;
    s.close().await;
    db.drop_db().await;
}

/// PostgreSQL: a write that waited for a license's row lock decides on what
/// the transaction it waited for left, not on what it saw before the wait.
/// Here the holder released workstation A's seat and gave one to B; an
/// activation of A that waited must take a seat again (not answer "already
/// activated" from the rows read before the wait) and list B's. (One
/// statement that locked and joined at once would fail this: a statement
/// that waited re-reads the locked row, not the rows it joined.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_that_waited_for_the_lock_sees_what_the_holder_changed() {
    use std::time::Duration;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let s = db.open().await;
    product(&s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("waited", 3), &actor(), t(NOW))
        .await
        .unwrap();
    s.activate(&l.key, "ws-a", "h-a", "1.0", &actor(), t(NOW))
        .await
        .unwrap();
    let key = l.key.normalized().to_string();
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for (sql, bound) in [
        ("BEGIN", false),
        (
            "SELECT id FROM licenses WHERE license_key = $1 FOR UPDATE",
            true,
        ),
        (
            "DELETE FROM activations WHERE fingerprint = 'ws-a' \
             AND license_id = (SELECT id FROM licenses WHERE license_key = $1)",
            true,
        ),
        (
            "INSERT INTO activations (license_id, fingerprint, hostname, client_version, activated_at) \
             SELECT id, 'ws-b', 'h-b', '1.0', 0 FROM licenses WHERE license_key = $1",
            true,
        ),
    ] {
        let q = sqlx::query(sql);
        let q = if bound { q.bind(&key) } else { q };
        q.execute(&mut holder).await.unwrap();
    }
    let later = t("2026-01-16T12:00:00Z");
    let who = actor();
    let (activated, ()) = tokio::join!(
        s.activate(&l.key, "ws-a", "h-a2", "1.0", &who, later),
        async {
            // Long enough for the activation to be waiting on the lock.
            tokio::time::sleep(Duration::from_millis(300)).await;
            sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        }
    );
    let (license, activation) = activated.unwrap();
    assert_eq!(
        (activation.hostname.as_str(), activation.activated_at),
        ("h-a2", later),
        "a new seat for ws-a, not the released one"
    );
    let mut seats: Vec<&str> = license
        .activations
        .iter()
        .map(|a| a.fingerprint.as_str())
        .collect();
    seats.sort();
    assert_eq!((seats, license.seats_used), (vec!["ws-a", "ws-b"], 2));
    s.close().await;
    db.drop_db().await;
}

/// PostgreSQL: a change made through another replica reaches the cache by
/// `LISTEN/NOTIFY`, long before its next poll; a flood of notifications
/// naming unknown keys, malformed ones or a forged sender changes nothing the
/// cache answers; and when the database drops the listening connection, the
/// cache stops answering until it listens again and a poll that started
/// afterwards has caught up with what was missed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_are_pushed_and_a_lost_listener_silences_the_cache_until_caught_up() {
    use licensd::store::validation_cache::Answer;
    use sqlx::Connection;
    use std::time::{Duration, Instant};
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let s = db.open().await;
    product(&s, "ACME", "").await;
    let l = s
        .issue_license(&issue_cmd("pushed", 1), &actor(), t(NOW))
        .await
        .unwrap();
    // This replica polls every 10 s of its own accord: whatever reaches it
    // sooner was pushed.
    let cached = cached_store(&db, Duration::from_secs(10), Some(&l.key)).await;
    let cache = cached.validation_cache().unwrap().clone();
    assert!(cache.stats().listening);

    // A change on the other replica: pushed, then re-read by the poll the
    // notification asked for.
    s.change_status(&l.key, StatusAction::Suspend, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    let written = Instant::now();
    while cached_status(&cache, &l.key).await != Some(LicenseStatus::Suspended) {
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the change was not pushed (the next poll is 10 s away)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A flood of notifications that name nothing real.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let unknown = LicenseKey::generate(&acme(), LicenseKind::Standard);
    for i in 0..2_000 {
        let payload = match i % 4 {
            0 => format!("1:{i} {}", unknown.normalized()),
            1 => format!("garbage {i} ' ; -- *"),
            2 => format!("ffff:{i} NOT-A-KEY {}", "Z".repeat(200)),
            _ => format!("abc:{i} {} *", l.key.normalized()),
        };
        sqlx::query("SELECT pg_notify('licensd_changes', $1)")
            .bind(payload)
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let flooded = Instant::now();
    loop {
        assert_ne!(
            cached_status(&cache, &l.key).await,
            Some(LicenseStatus::Active),
            "an old answer"
        );
        if cache.stats().pending == 0
            && cached_status(&cache, &l.key).await == Some(LicenseStatus::Suspended)
        {
            break;
        }
        assert!(
            flooded.elapsed() < Duration::from_secs(5),
            "the cache did not settle after the flood: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        cache.stats().licenses,
        1,
        "nothing is held for unknown keys"
    );
    assert_eq!(cached.validation_view(&unknown, None).await.unwrap(), None);

    // The database drops the listening connection.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2",
    )
    .bind(db.name.as_deref().unwrap())
    .bind(cached.change_listener_name().unwrap())
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "one listening connection");
    let dropped = Instant::now();
    while cache.stats().listening {
        assert!(
            dropped.elapsed() < Duration::from_secs(3),
            "the cache did not notice"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Meanwhile a change is made that it cannot hear of.
    assert_eq!(
        cache.lookup(&l.key, None, Instant::now()),
        Answer::AskDatabase,
        "no answers from memory while not listening"
    );
    s.change_status(&l.key, StatusAction::Reinstate, "", None, &actor(), t(NOW))
        .await
        .unwrap();
    assert_eq!(
        cached
            .validation_view(&l.key, None)
            .await
            .unwrap()
            .unwrap()
            .standing
            .status,
        LicenseStatus::Active
    );
    // It listens again, catches up, and answers again: with the change.
    loop {
        match cache.lookup(&l.key, None, Instant::now()) {
            Answer::Found(v) => {
                assert_eq!(v.standing.status, LicenseStatus::Active, "caught up");
                break;
            }
            Answer::AskDatabase => {
                assert!(
                    dropped.elapsed() < Duration::from_secs(5),
                    "the cache did not answer again: {:?}",
                    cache.stats()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    assert!(cache.stats().listening);
    let _ = admin.close().await;
    cached.close().await;
    s.close().await;
    db.drop_db().await;
}

/// A license issued through one store is found at once through another
/// store whose cache has loaded (it does not hold the key yet): the cache
/// never answers "no such license" itself.
async fn a_license_issued_elsewhere_is_found_at_once(db: &TestDb, s: &SqlStore) {
    use std::time::Duration;
    product(s, "ACME", "").await;
    let cached = cached_store(db, Duration::from_secs(10), None).await;
    for i in 0..20 {
        let l = s
            .issue_license(&issue_cmd(&format!("elsewhere-{i}"), 1), &actor(), t(NOW))
            .await
            .unwrap();
        let v = cached.validation_view(&l.key, None).await.unwrap();
        assert!(v.is_some(), "issued elsewhere, answered missing");
    }
    cached.close().await;
}

/// Polls a future at most `polls` times, then drops it: a caller that
/// gives up (a deadline, a client gone) at every await point of a write in
/// turn.
struct DropAfter<F> {
    inner: std::pin::Pin<Box<F>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for DropAfter<F> {
    type Output = Option<F::Output>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.polls == 0 {
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        self.inner.as_mut().poll(cx).map(Some)
    }
}

/// A write dropped after its commit but before it marked the license in
/// the cache (src/store/sql/tx.rs, cancel_guard) must not leave the cache
/// answering the old state. The write is dropped after 1, 2, 3, … polls,
/// so at each of its await points in turn, until it completes; each time a
/// lookup right after must agree with the database.
async fn a_write_dropped_at_any_point_is_still_seen_at_once(db: &TestDb, plain: &SqlStore) {
    use std::time::Duration;
    product(plain, "ACME", "").await;
    let l = plain
        .issue_license(&issue_cmd("dropped", 1), &actor(), t(NOW))
        .await
        .unwrap();
    // Polls far apart (after the first load): only the marking can be right.
    let s = cached_store(db, Duration::from_secs(30), Some(&l.key)).await;
    let mut wrong = Vec::new();
    let mut points = 0;
    let mut suspend = true;
    // The await points a write passes vary with timing: sweep at least five
    // times, and until writes were dropped at five points. (On SQLite a
    // write has one: queued, then answered; an idle writer can answer before
    // its caller first waits, and that sweep drops nothing.)
    let mut sweeps = 0;
    while sweeps < 5 || (points < 5 && sweeps < 50) {
        sweeps += 1;
        let mut polls = 1;
        loop {
            let action = if suspend {
                StatusAction::Suspend
            } else {
                StatusAction::Reinstate
            };
            let who = actor();
            let finished = DropAfter {
                inner: Box::pin(s.change_status(&l.key, action, "", None, &who, t(NOW))),
                polls,
            }
            .await
            .is_some();
            // A dropped COMMIT may still be landing (PostgreSQL): the answer
            // must be the database's state before or after it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let truth = s.get_license(&l.key).await.unwrap().status;
            let answered = s.validation_view(&l.key, None).await.unwrap().unwrap();
            if answered.standing.status != truth {
                wrong.push(format!(
                    "dropped after {polls} polls: cache {:?}, database {truth:?}",
                    answered.standing.status
                ));
            }
            if truth
                == if suspend {
                    LicenseStatus::Suspended
                } else {
                    LicenseStatus::Active
                }
            {
                suspend = !suspend;
            }
            if finished {
                break;
            }
            polls += 1;
            points += 1;
            assert!(polls < 500, "the write never finished");
        }
    }
    eprintln!("dropped at {points} points in {sweeps} sweeps");
    assert!(points >= 5, "no write was dropped before it finished");
    assert!(wrong.is_empty(), "{wrong:#?}");
    s.close().await;
}

/// The durability setting is the writer's, and said as it is: SQLite's
/// `synchronous` (`full` unless `normal` is asked for), PostgreSQL's
/// `synchronous_commit` (the server's: on by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durability_setting_is_applied_and_reported() {
    use licensd::store::DatabaseUrl;
    use licensd::store::sqlite::{Durability, SqliteOptions};
    let db = TestDb::sqlite();
    let url = DatabaseUrl::parse(&db.url).unwrap();
    let s = db.open().await;
    assert_eq!(s.durability().await.unwrap(), "synchronous=full");
    s.close().await;
    let normal = SqliteOptions {
        synchronous: Durability::Normal,
        ..SqliteOptions::default()
    };
    let s = url.open_tuned(Default::default(), normal).await.unwrap();
    assert_eq!(s.durability().await.unwrap(), "synchronous=normal");
    s.close().await;
    assert_eq!("NORMAL".parse::<Durability>(), Ok(Durability::Normal));
    assert!("off".parse::<Durability>().is_err());
    if let Some(db) = TestDb::postgres().await {
        let s = db.open().await;
        assert_eq!(s.durability().await.unwrap(), "synchronous_commit=on");
        s.close().await;
        db.drop_db().await;
    }
}
