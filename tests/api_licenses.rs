//! The API suite, licenses: issuing (key shape and kind, every field, the
//! term's expiry including 29 February, licenses issued in the past, retries
//! with the same request id), reading a license, and listing licenses by
//! filter, expiry window and page. Shared helpers: tests/common/api.rs.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, Duration, Months, Utc};
use common::api::{
    LATEST, ago, at, dt, get_license, license_from, list_licenses, listed_keys, now_secs,
    personal_license, plus_months, plus_years, pts, types, validity, with_kind,
};
use common::{TestServer, assert_refused, days_ago, license_req};
use licensd::proto as pb;
use tonic::Code;

#[tokio::test]
async fn r9_issued_keys_start_with_the_product_and_show_their_kind() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    for _ in 0..20 {
        let l = s.issue(license_req("ACME", 2, 1)).await;
        assert!(l.key.starts_with("ACME-"), "{}", l.key);
        let bare = l.key.replace('-', "");
        assert!(!bare.contains("PRO") && !bare.contains("NFR"), "{}", l.key);
        assert_eq!(l.kind, pb::LicenseKind::Standard as i32);
    }
    let mut req = license_req("ACME", 2, 1);
    req.kind = pb::LicenseKind::Unspecified as i32;
    let unspecified = s.issue(req).await;
    assert_eq!(unspecified.kind, pb::LicenseKind::Standard as i32);
    assert!(!unspecified.key.replace('-', "").contains("PRO"));

    let promo = s
        .issue(with_kind(license_req("ACME", 1, 1), pb::LicenseKind::Promo))
        .await;
    assert!(promo.key.starts_with("ACME-"), "{}", promo.key);
    assert!(promo.key.contains("PRO"), "{}", promo.key);
    assert!(!promo.key.contains("NFR"), "{}", promo.key);
    assert_eq!(promo.kind, pb::LicenseKind::Promo as i32);
    assert_eq!(promo.renewable_until, None);

    let nfr = s
        .issue(with_kind(license_req("ACME", 1, 1), pb::LicenseKind::Nfr))
        .await;
    assert!(nfr.key.starts_with("ACME-"), "{}", nfr.key);
    assert!(nfr.key.contains("NFR"), "{}", nfr.key);
    assert!(!nfr.key.contains("PRO"), "{}", nfr.key);
    assert_eq!(nfr.kind, pb::LicenseKind::Nfr as i32);
    assert_eq!(nfr.renewable_until, None);
    s.stop().await;
}

#[tokio::test]
async fn r1_issue_license_returns_every_field_and_expires_after_the_term() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let before = Utc::now() - Duration::seconds(1);
    let mut req = license_req("ACME", 3, 2);
    req.order_ref = "ord-42".into();
    req.customer_ref = "cust-42".into();
    req.reseller = "resell-1".into();
    let l = s.issue(req).await;
    let after = Utc::now() + Duration::seconds(1);
    assert_eq!(l.product, "ACME");
    assert_eq!(l.edition, pb::Edition::Business as i32);
    assert_eq!(l.kind, pb::LicenseKind::Standard as i32);
    assert_eq!(l.seats, 3);
    assert_eq!(l.seats_used, 0);
    assert_eq!(l.term_years, 2);
    assert_eq!(l.status, pb::LicenseStatus::Active as i32);
    assert_eq!(l.validity, pb::Validity::Valid as i32);
    assert_eq!(l.renewal_count, 0);
    assert_eq!(l.order_ref, "ord-42");
    assert_eq!(l.customer_ref, "cust-42");
    assert_eq!(l.reseller, "resell-1");
    assert!(l.activations.is_empty());
    let starts = dt(&l.starts_at);
    assert!(
        before <= starts && starts <= after,
        "starts_at defaults to now: {starts}"
    );
    let created = dt(&l.created_at);
    assert!(
        before <= created && created <= after,
        "created_at {created}"
    );
    assert_eq!(dt(&l.expires_at), plus_years(starts, 2));
    assert_eq!(
        dt(&l.renewable_until),
        plus_months(plus_years(starts, 2), 1)
    );
    s.stop().await;
}

#[tokio::test]
async fn r1_a_license_issued_on_the_29th_of_february_for_one_year_expires_on_the_28th() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let start = at("2024-02-29T10:00:00Z");

    let one = s.issue(license_from("ACME", 1, 1, pts(start))).await;
    assert_eq!(dt(&one.starts_at), start);
    assert_eq!(dt(&one.expires_at), at("2025-02-28T10:00:00Z"));
    assert_eq!(dt(&one.renewable_until), at("2025-03-28T10:00:00Z"));
    // Issued in the past: long expired and past its renewal window.
    assert_eq!(one.validity, pb::Validity::Expired as i32);
    assert_eq!(
        validity(&mut s, &one.key).await,
        pb::Validity::Expired as i32
    );

    let mut personal = personal_license("ACME", 1, 2);
    personal.starts_at = Some(pts(start));
    let two = s.issue(personal).await;
    assert_eq!(two.edition, pb::Edition::Personal as i32);
    assert_eq!(dt(&two.expires_at), at("2026-02-28T10:00:00Z"));

    let three = s.issue(license_from("ACME", 1, 3, pts(start))).await;
    assert_eq!(dt(&three.expires_at), at("2027-02-28T10:00:00Z"));
    let expected = if Utc::now() < at("2027-02-28T10:00:00Z") {
        pb::Validity::Valid
    } else if Utc::now() <= at("2027-03-28T10:00:00Z") {
        pb::Validity::ExpiredRenewable
    } else {
        pb::Validity::Expired
    };
    assert_eq!(three.validity, expected as i32);
    s.stop().await;
}

#[tokio::test]
async fn r2_r3_validity_of_licenses_issued_in_the_past() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let cases = [
        (days_ago(30), pb::Validity::Valid),
        (ago(1, 5), pb::Validity::ExpiredRenewable),
        (ago(2, 60), pb::Validity::Expired),
    ];
    for (starts_at, expected) in cases {
        let l = s.issue(license_from("ACME", 1, 1, starts_at)).await;
        assert_eq!(dt(&l.starts_at), dt(&Some(starts_at)));
        assert_eq!(dt(&l.expires_at), plus_years(dt(&Some(starts_at)), 1));
        assert_eq!(l.validity, expected as i32, "issued {starts_at:?}");
        assert_eq!(s.license(&l.key).await.validity, expected as i32);
        let v = s.validate(&l.key, "", "").await.unwrap();
        assert_eq!(v.validity, expected as i32);
        assert_eq!(v.valid, expected == pb::Validity::Valid);
    }
    s.stop().await;
}

#[tokio::test]
async fn api_issue_license_retried_with_the_same_request_id_returns_the_same_license() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let req = license_req("ACME", 2, 1);
    let first = s.issue(req.clone()).await;
    let again = s.issue(req.clone()).await;
    assert_eq!(again.key, first.key);
    assert_eq!(again.expires_at, first.expires_at);
    assert_eq!(again.created_at, first.created_at);
    assert_eq!(
        listed_keys(&mut s, Default::default()).await,
        vec![first.key.clone()]
    );
    assert_eq!(types(&s.events(&first.key).await), vec!["issued"]);

    let mut other = req.clone();
    other.seats = 3;
    assert_refused(
        s.licenses.issue_license(other).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    let mut other = req.clone();
    other.customer_ref = "someone-else".into();
    assert_refused(
        s.licenses.issue_license(other).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    assert_eq!(
        listed_keys(&mut s, Default::default()).await,
        vec![first.key.clone()]
    );
    s.stop().await;
}

#[tokio::test]
async fn api_get_license_accepts_any_case_without_dashes_and_shows_activations() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 3, 1)).await;
    let a1 = s
        .activate(&l.key, "fp-1")
        .await
        .unwrap()
        .activation
        .unwrap();
    let a2 = s
        .activate(&l.key, "fp-2")
        .await
        .unwrap()
        .activation
        .unwrap();

    for variant in [
        l.key.clone(),
        l.key.to_lowercase(),
        l.key.replace('-', ""),
        l.key.to_lowercase().replace('-', ""),
    ] {
        let got = get_license(&mut s, &variant).await.expect("get license");
        assert_eq!(got.key, l.key, "asked with {variant}");
        assert_eq!(got.seats_used, 2);
        let mut fps: Vec<(String, String)> = got
            .activations
            .iter()
            .map(|a| (a.fingerprint.clone(), a.hostname.clone()))
            .collect();
        fps.sort();
        assert_eq!(
            fps,
            vec![
                ("fp-1".to_string(), "host-fp-1".to_string()),
                ("fp-2".to_string(), "host-fp-2".to_string()),
            ]
        );
        for a in &got.activations {
            let expected = if a.fingerprint == "fp-1" { &a1 } else { &a2 };
            assert_eq!(a.activated_at, expected.activated_at);
        }
    }
    s.stop().await;
}

async fn issue(s: &mut TestServer, product: &str, cust: &str, order: &str) -> String {
    let mut r = license_req(product, 1, 1);
    r.customer_ref = cust.into();
    r.order_ref = order.into();
    s.issue(r).await.key
}

#[tokio::test]
async fn api_list_licenses_filters_by_product_customer_and_order() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    s.product("BETA", LATEST).await;
    let l1 = issue(&mut s, "ACME", "cust-1", "order-1").await;
    let l2 = issue(&mut s, "ACME", "cust-2", "order-2").await;
    let l3 = issue(&mut s, "ACME", "cust-1", "order-3").await;
    let l4 = issue(&mut s, "BETA", "cust-1", "order-1").await;

    let set = |v: Vec<String>| v.into_iter().collect::<HashSet<_>>();
    let expect = |v: &[&String]| v.iter().map(|k| (*k).clone()).collect::<HashSet<_>>();

    let all = listed_keys(&mut s, Default::default()).await;
    assert_eq!(all.len(), 4);
    assert_eq!(set(all), expect(&[&l1, &l2, &l3, &l4]));
    let acme = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            product: "ACME".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(set(acme), expect(&[&l1, &l2, &l3]));
    let cust1 = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            customer_ref: "cust-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(set(cust1), expect(&[&l1, &l3, &l4]));
    let acme_cust1 = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            product: "ACME".into(),
            customer_ref: "cust-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(set(acme_cust1), expect(&[&l1, &l3]));
    let order1 = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            order_ref: "order-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(set(order1), expect(&[&l1, &l4]));
    let beta_order1 = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            product: "BETA".into(),
            order_ref: "order-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(beta_order1, vec![l4.clone()]);
    let nobody = listed_keys(
        &mut s,
        pb::ListLicensesRequest {
            customer_ref: "nobody".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.is_empty(), "{nobody:?}");
    s.stop().await;
}

#[tokio::test]
async fn r3_list_licenses_expiring_next_month_for_the_renewal_offer() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let now = now_secs();
    let year_ago = now.checked_sub_months(Months::new(12)).unwrap();
    let lapsed = s.issue(license_from("ACME", 1, 1, ago(1, 5))).await;
    let in_10_days = s
        .issue(license_from(
            "ACME",
            1,
            1,
            pts(year_ago + Duration::days(10)),
        ))
        .await;
    let in_40_days = s
        .issue(license_from(
            "ACME",
            1,
            1,
            pts(year_ago + Duration::days(40)),
        ))
        .await;
    let in_a_year = s.issue(license_from("ACME", 1, 1, pts(now))).await;

    let window = |after: DateTime<Utc>, before: DateTime<Utc>| pb::ListLicensesRequest {
        expires_after: Some(pts(after)),
        expires_before: Some(pts(before)),
        ..Default::default()
    };
    // Ordered by expiry.
    assert_eq!(
        listed_keys(&mut s, Default::default()).await,
        vec![
            lapsed.key.clone(),
            in_10_days.key.clone(),
            in_40_days.key.clone(),
            in_a_year.key.clone()
        ]
    );
    // Billing's "expiring next month".
    assert_eq!(
        listed_keys(&mut s, window(now, now + Duration::days(30))).await,
        vec![in_10_days.key.clone()]
    );
    assert_eq!(
        listed_keys(
            &mut s,
            window(now + Duration::days(30), now + Duration::days(60))
        )
        .await,
        vec![in_40_days.key.clone()]
    );
    // expires_after is inclusive, expires_before exclusive.
    let e10 = dt(&in_10_days.expires_at);
    let e40 = dt(&in_40_days.expires_at);
    assert_eq!(
        listed_keys(&mut s, window(e10, e40)).await,
        vec![in_10_days.key.clone()]
    );
    assert_eq!(
        listed_keys(&mut s, window(e10, e40 + Duration::seconds(1))).await,
        vec![in_10_days.key.clone(), in_40_days.key.clone()]
    );
    let only_before = pb::ListLicensesRequest {
        expires_before: Some(pts(now)),
        ..Default::default()
    };
    assert_eq!(
        listed_keys(&mut s, only_before).await,
        vec![lapsed.key.clone()]
    );
    let only_after = pb::ListLicensesRequest {
        expires_after: Some(pts(now + Duration::days(60))),
        ..Default::default()
    };
    assert_eq!(
        listed_keys(&mut s, only_after).await,
        vec![in_a_year.key.clone()]
    );
    s.stop().await;
}

#[tokio::test]
async fn api_list_licenses_pages_through_every_match_in_expiry_order() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let mut expected = Vec::new();
    for d in (1..=5).rev() {
        expected.push(s.issue(license_from("ACME", 1, 1, days_ago(d))).await.key);
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_licenses(
            &mut s,
            pb::ListLicensesRequest {
                product: "ACME".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("list");
        pages.push(page.licenses.into_iter().map(|l| l.key).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(pages.concat(), expected);
    s.stop().await;
}
