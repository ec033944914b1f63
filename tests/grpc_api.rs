mod common;

// Black-box tests of the gRPC API against docs/api.md and docs/rules.md: every
// RPC's happy path, every refusal reason of docs/api.md (Errors) with its
// status code, ErrorInfo reason and figures, idempotent retries, and that a
// refused operation changes nothing.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Datelike, Duration, Months, SecondsFormat, Utc};
use common::{
    TestServer, assert_refused, bad_fields, code_req, days_ago, error_info, license_req, rid,
};
use licensd::proto as pb;
use prost_types::Timestamp;
use tonic::Code;

const LATEST: &str = "4.10.0";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("an RFC 3339 instant")
}

fn pts(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn dt(t: &Option<Timestamp>) -> DateTime<Utc> {
    let t = t.as_ref().expect("timestamp is set");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("timestamp in range")
}

fn plus_years(t: DateTime<Utc>, years: u32) -> DateTime<Utc> {
    t.checked_add_months(Months::new(12 * years)).unwrap()
}

fn plus_months(t: DateTime<Utc>, months: u32) -> DateTime<Utc> {
    t.checked_add_months(Months::new(months)).unwrap()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Now, in whole seconds.
fn now_secs() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

/// `years` calendar years and `days` days before now.
fn ago(years: u32, days: i64) -> Timestamp {
    pts(now_secs()
        .checked_sub_months(Months::new(12 * years))
        .unwrap()
        - Duration::days(days))
}

/// A BUSINESS license request starting at `starts_at`.
fn license_from(
    product: &str,
    seats: u32,
    term_years: u32,
    starts_at: Timestamp,
) -> pb::IssueLicenseRequest {
    let mut r = license_req(product, seats, term_years);
    r.starts_at = Some(starts_at);
    r
}

fn with_kind(mut r: pb::IssueLicenseRequest, kind: pb::LicenseKind) -> pb::IssueLicenseRequest {
    r.kind = kind as i32;
    r
}

fn personal_license(product: &str, seats: u32, term_years: u32) -> pb::IssueLicenseRequest {
    let mut r = license_req(product, seats, term_years);
    r.edition = pb::Edition::Personal as i32;
    r
}

/// A well-formed ACME key that was never issued.
fn unknown_key() -> String {
    licensd::domain::LicenseKey::generate(
        &licensd::domain::ProductCode::parse("ACME").unwrap(),
        licensd::domain::LicenseKind::Standard,
    )
    .to_string()
}

/// A well-formed renewal code that was never issued.
fn unknown_code() -> String {
    licensd::domain::RenewalCode::generate().expose_display()
}

/// `value` with one character of its random part (the first after the first
/// group of a code, or after the product code of a STANDARD key) changed into
/// another symbol of the alphabet: a typo.
fn mistype(value: &str) -> String {
    let alphabet = licensd::domain::keys::ALPHABET;
    let mut bytes = value.as_bytes().to_vec();
    let i = value.find('-').expect("dash-separated") + 1;
    let pos = alphabet
        .iter()
        .position(|&c| c == bytes[i])
        .expect("a symbol of the alphabet");
    bytes[i] = alphabet[(pos + 1) % alphabet.len()];
    let typo = String::from_utf8(bytes).unwrap();
    assert_ne!(typo, value);
    typo
}

fn redeem_req(key: &str, code: &str, fp: &str, version: &str) -> pb::RedeemRenewalCodeRequest {
    pb::RedeemRenewalCodeRequest {
        license_key: key.into(),
        renewal_code: code.into(),
        fingerprint: fp.into(),
        client_version: version.into(),
    }
}

async fn redeem(
    s: &mut TestServer,
    key: &str,
    code: &str,
    fp: &str,
    version: &str,
) -> Result<pb::RedeemRenewalCodeResponse, tonic::Status> {
    s.activation
        .redeem_renewal_code(redeem_req(key, code, fp, version))
        .await
        .map(|r| r.into_inner())
}

async fn validity(s: &mut TestServer, key: &str) -> i32 {
    s.validate(key, "", "").await.expect("validate").validity
}

async fn deactivate(
    s: &mut TestServer,
    key: &str,
    fp: &str,
) -> Result<pb::DeactivateResponse, tonic::Status> {
    s.activation
        .deactivate(pb::DeactivateRequest {
            license_key: key.into(),
            fingerprint: fp.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_code(s: &mut TestServer, code: &str) -> Result<pb::RenewalCode, tonic::Status> {
    s.licenses
        .get_renewal_code(pb::GetRenewalCodeRequest {
            renewal_code: code.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn void_code(
    s: &mut TestServer,
    code: &str,
    reason: &str,
) -> Result<pb::RenewalCode, tonic::Status> {
    s.licenses
        .void_renewal_code(pb::VoidRenewalCodeRequest {
            renewal_code: code.into(),
            reason: reason.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_license(s: &mut TestServer, key: &str) -> Result<pb::License, tonic::Status> {
    s.licenses
        .get_license(pb::GetLicenseRequest {
            license_key: key.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn list_licenses(
    s: &mut TestServer,
    req: pb::ListLicensesRequest,
) -> Result<pb::ListLicensesResponse, tonic::Status> {
    s.licenses.list_licenses(req).await.map(|r| r.into_inner())
}

async fn listed_keys(s: &mut TestServer, req: pb::ListLicensesRequest) -> Vec<String> {
    let page = list_licenses(s, req).await.expect("list licenses");
    assert_eq!(page.next_page_token, "");
    page.licenses.into_iter().map(|l| l.key).collect()
}

async fn suspend(
    s: &mut TestServer,
    key: &str,
    reason: &str,
    request_id: &str,
) -> Result<pb::License, tonic::Status> {
    s.licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.into(),
            reason: reason.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn reinstate(
    s: &mut TestServer,
    key: &str,
    reason: &str,
) -> Result<pb::License, tonic::Status> {
    s.licenses
        .reinstate_license(pb::ReinstateLicenseRequest {
            license_key: key.into(),
            reason: reason.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn revoke(s: &mut TestServer, key: &str, reason: &str) -> Result<pb::License, tonic::Status> {
    s.licenses
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: key.into(),
            reason: reason.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

fn types(events: &[pb::LicenseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.r#type.as_str()).collect()
}

/// Asserts that `res` is INVALID_ARGUMENT / INVALID_FIELD with a BadRequest
/// naming exactly `field`.
#[track_caller]
fn assert_bad_field<T: std::fmt::Debug>(res: Result<T, tonic::Status>, field: &str) {
    let status = res.expect_err("expected INVALID_FIELD");
    assert_eq!(status.code(), Code::InvalidArgument, "status {status:?}");
    let (reason, _) = error_info(&status);
    assert_eq!(reason, "INVALID_FIELD", "status {status:?}");
    assert_eq!(
        bad_fields(&status),
        vec![field.to_string()],
        "status {status:?}"
    );
}

/// What a refused renewal must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    expires_at: Option<Timestamp>,
    renewal_count: u32,
    seats_used: u32,
    status: i32,
    activations: Vec<pb::Activation>,
    code_state: i32,
}

async fn snapshot(s: &mut TestServer, key: &str, code: &str) -> Snapshot {
    let l = s.license(key).await;
    let c = get_code(s, code).await.expect("get code");
    Snapshot {
        expires_at: l.expires_at,
        renewal_count: l.renewal_count,
        seats_used: l.seats_used,
        status: l.status,
        activations: l.activations,
        code_state: c.state,
    }
}

/// Redeems and expects the business-rule refusal `reason`: license and code
/// stay as they were, and exactly one `renewal_refused` event with that
/// reason is appended. Returns the ErrorInfo metadata.
async fn assert_redeem_refused_and_unchanged(
    s: &mut TestServer,
    key: &str,
    code: &pb::RenewalCode,
    fp: &str,
    version: &str,
    reason: &str,
) -> HashMap<String, String> {
    let before = snapshot(s, key, &code.renewal_code).await;
    let events_before = s.events(key).await;
    let res = redeem(s, key, &code.renewal_code, fp, version).await;
    let metadata = assert_refused(res, Code::FailedPrecondition, reason);
    let after = snapshot(s, key, &code.renewal_code).await;
    assert_eq!(
        after, before,
        "a refused renewal changed the license or code"
    );
    let events_after = s.events(key).await;
    assert_eq!(
        events_after.len(),
        events_before.len() + 1,
        "one renewal_refused event: {events_after:?}"
    );
    assert_eq!(&events_after[..events_before.len()], &events_before[..]);
    let e = events_after.last().unwrap();
    assert_eq!(e.r#type, "renewal_refused");
    assert_eq!(e.refusal_reason, reason);
    assert_eq!(e.renewal_code_id, code.id);
    assert_eq!(e.fingerprint, fp);
    assert!(e.at.is_some());
    assert!(!e.actor.is_empty());
    metadata
}

/// The clock for tests that make a license lapse in seconds: real time,
/// moved on by a day while a 29 February is near. No calendar-year term ends
/// on a 29 February, so on that day no license can expire "in 3 seconds".
/// Returns the shift and the server's clock.
fn lapse_clock() -> (Duration, licensd::grpc::Clock) {
    let leap_day = |t: DateTime<Utc>| t.month() == 2 && t.day() == 29;
    let now = Utc::now();
    let shift = if leap_day(now) || leap_day(now + Duration::minutes(1)) {
        Duration::days(1)
    } else {
        Duration::zero()
    };
    (shift, std::sync::Arc::new(move || Utc::now() + shift))
}

/// A BUSINESS 1-year license of `product` that expires about 3 seconds from
/// the server's now (real time + `shift`, see [`lapse_clock`]), activated on
/// `fp`, then waited out: it has lapsed and lies inside the grace period.
async fn lapsed_license(
    s: &mut TestServer,
    shift: Duration,
    product: &str,
    seats: u32,
    fp: &str,
) -> pb::License {
    let expiry = now_secs() + shift + Duration::seconds(3);
    let starts = expiry.checked_sub_months(Months::new(12)).unwrap();
    let l = s.issue(license_from(product, seats, 1, pts(starts))).await;
    assert_eq!(dt(&l.expires_at), expiry);
    s.activate(&l.key, fp)
        .await
        .expect("activate before expiry");
    let wait = (expiry - (Utc::now() + shift)).to_std().unwrap_or_default()
        + std::time::Duration::from_millis(300);
    tokio::time::sleep(wait).await;
    let l = s.license(&l.key).await;
    assert_eq!(l.validity, pb::Validity::ExpiredRenewable as i32);
    l
}

// ---------------------------------------------------------------------------
// Products
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_create_product_applies_the_default_policy() {
    let mut s = TestServer::start().await;
    let created = s.product("ACME", LATEST).await;
    assert_eq!(created.code, "ACME");
    assert_eq!(created.display_name, "ACME product");
    assert_eq!(created.latest_version, "4.10.0");
    assert_eq!(created.personal_terms_years, vec![1, 2]);
    assert_eq!(created.business_terms_years, vec![1, 2, 3]);
    assert_eq!(created.grace_period_months, Some(1));
    assert_eq!(created.renewal_basis, pb::RenewalBasis::FromExpiry as i32);

    let got = s
        .products
        .get_product(pb::GetProductRequest {
            code: "ACME".into(),
        })
        .await
        .expect("get product")
        .into_inner();
    assert_eq!(got, created);
    s.stop().await;
}

#[tokio::test]
async fn api_list_products_pages_through_every_product_in_code_order() {
    let mut s = TestServer::start().await;
    for code in ["EEE", "BBB", "AAA", "DDD", "CCC"] {
        s.product(code, "1.0.0").await;
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = s
            .products
            .list_products(pb::ListProductsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .expect("list products")
            .into_inner();
        pages.push(
            page.products
                .iter()
                .map(|p| p.code.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(
        pages,
        vec![
            vec!["AAA".to_string(), "BBB".to_string()],
            vec!["CCC".to_string(), "DDD".to_string()],
            vec!["EEE".to_string()],
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn r6_update_product_with_a_mask_bumps_latest_version_only() {
    let mut s = TestServer::start().await;
    s.product("ACME", "4.9.2").await;
    let updated = s
        .products
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "not in the mask".into(),
                latest_version: "4.10.0".into(),
                grace_period_months: Some(5),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .expect("update product")
        .into_inner();
    assert_eq!(updated.latest_version, "4.10.0");
    assert_eq!(updated.display_name, "ACME product");
    assert_eq!(updated.grace_period_months, Some(1));
    assert_eq!(updated.personal_terms_years, vec![1, 2]);
    assert_eq!(updated.business_terms_years, vec![1, 2, 3]);
    assert_eq!(updated.renewal_basis, pb::RenewalBasis::FromExpiry as i32);
    let got = s
        .products
        .get_product(pb::GetProductRequest {
            code: "ACME".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, updated);

    // An empty mask updates the fields set to non-default values only.
    let renamed = s
        .products
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "Acme Studio".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect("update product")
        .into_inner();
    assert_eq!(renamed.display_name, "Acme Studio");
    assert_eq!(renamed.latest_version, "4.10.0");
    assert_eq!(renamed.grace_period_months, Some(1));
    assert_eq!(renamed.personal_terms_years, vec![1, 2]);
    assert_eq!(renamed.business_terms_years, vec![1, 2, 3]);
    assert_eq!(renamed.renewal_basis, pb::RenewalBasis::FromExpiry as i32);
    s.stop().await;
}

#[tokio::test]
async fn api_product_refusals_already_exists_not_found_and_bad_code() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let again = s
        .products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "acme".into(),
                ..Default::default()
            }),
        })
        .await;
    let md = assert_refused(again, Code::AlreadyExists, "PRODUCT_ALREADY_EXISTS");
    assert_eq!(md.get("product").map(String::as_str), Some("ACME"));

    let missing = s
        .products
        .get_product(pb::GetProductRequest {
            code: "NOPE".into(),
        })
        .await;
    assert_refused(missing, Code::NotFound, "PRODUCT_NOT_FOUND");
    let issue = s.licenses.issue_license(license_req("NOPE", 1, 1)).await;
    assert_refused(issue, Code::NotFound, "PRODUCT_NOT_FOUND");
    let code = s.licenses.issue_renewal_code(code_req("NOPE", 1, 1)).await;
    assert_refused(code, Code::NotFound, "PRODUCT_NOT_FOUND");

    for bad in ["XPROX", "NFR1", "A", "TOOLONGCODE", "AC-ME", ""] {
        let res = s
            .products
            .create_product(pb::CreateProductRequest {
                product: Some(pb::Product {
                    code: bad.into(),
                    ..Default::default()
                }),
            })
            .await;
        assert_bad_field(res, "product.code");
    }
    let res = s.licenses.issue_license(license_req("AC!ME", 1, 1)).await;
    assert_bad_field(res, "product");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Licenses: issue, read, list
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Administrative state (R11) and history
// ---------------------------------------------------------------------------

#[tokio::test]
async fn r11_a_suspended_license_is_not_valid_until_reinstated() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();

    let suspended = suspend(&mut s, &l.key, "chargeback", "")
        .await
        .expect("suspend");
    assert_eq!(suspended.status, pb::LicenseStatus::Suspended as i32);
    assert_eq!(suspended.validity, pb::Validity::Suspended as i32);
    let v = s.validate(&l.key, "fp-1", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::Suspended as i32);
    assert!(!v.valid);
    assert_refused(
        s.activate(&l.key, "fp-2").await,
        Code::FailedPrecondition,
        "LICENSE_SUSPENDED",
    );
    assert_eq!(s.license(&l.key).await.seats_used, 1);

    let back = reinstate(&mut s, &l.key, "paid").await.expect("reinstate");
    assert_eq!(back.status, pb::LicenseStatus::Active as i32);
    assert_eq!(back.validity, pb::Validity::Valid as i32);
    let v = s.validate(&l.key, "fp-1", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::Valid as i32);
    assert!(v.valid);
    s.activate(&l.key, "fp-2")
        .await
        .expect("activate after reinstatement");

    let events = s.events(&l.key).await;
    assert_eq!(
        types(&events),
        vec![
            "issued",
            "activated",
            "suspended",
            "reinstated",
            "activated"
        ]
    );
    assert_eq!(events[2].detail, "chargeback");
    assert_eq!(events[3].detail, "paid");
    s.stop().await;
}

#[tokio::test]
async fn r11_suspension_takes_precedence_over_expiry() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_from("ACME", 1, 1, ago(2, 60))).await;
    suspend(&mut s, &l.key, "audit", "").await.unwrap();
    assert_eq!(
        validity(&mut s, &l.key).await,
        pb::Validity::Suspended as i32
    );
    assert_refused(
        s.activate(&l.key, "fp-1").await,
        Code::FailedPrecondition,
        "LICENSE_SUSPENDED",
    );
    s.stop().await;
}

#[tokio::test]
async fn r11_a_revoked_license_is_final() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    suspend(&mut s, &l.key, "audit", "").await.unwrap();
    let revoked = revoke(&mut s, &l.key, "fraud").await.expect("revoke");
    assert_eq!(revoked.status, pb::LicenseStatus::Revoked as i32);
    assert_eq!(revoked.validity, pb::Validity::Revoked as i32);
    let v = s.validate(&l.key, "", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::Revoked as i32);
    assert!(!v.valid);
    assert_refused(
        s.activate(&l.key, "fp-1").await,
        Code::FailedPrecondition,
        "LICENSE_REVOKED",
    );
    assert_refused(
        reinstate(&mut s, &l.key, "oops").await,
        Code::FailedPrecondition,
        "LICENSE_REVOKED",
    );
    assert_refused(
        suspend(&mut s, &l.key, "again", "").await,
        Code::FailedPrecondition,
        "LICENSE_REVOKED",
    );
    let after = s.license(&l.key).await;
    assert_eq!(after.status, pb::LicenseStatus::Revoked as i32);
    assert_eq!(
        types(&s.events(&l.key).await),
        vec!["issued", "suspended", "revoked"]
    );
    s.stop().await;
}

#[tokio::test]
async fn r11_suspended_or_revoked_licenses_cannot_be_renewed_and_nothing_changes() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let code = s.code(code_req("ACME", 1, 1)).await;
    suspend(&mut s, &l.key, "chargeback", "").await.unwrap();
    assert_redeem_refused_and_unchanged(&mut s, &l.key, &code, "fp-1", LATEST, "LICENSE_SUSPENDED")
        .await;
    revoke(&mut s, &l.key, "fraud").await.unwrap();
    assert_redeem_refused_and_unchanged(&mut s, &l.key, &code, "fp-1", LATEST, "LICENSE_REVOKED")
        .await;
    s.stop().await;
}

#[tokio::test]
async fn api_license_events_record_the_whole_history_with_time_and_actor() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let t0 = Utc::now() - Duration::seconds(1);
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    s.activate(&l.key, "fp-2").await.unwrap();
    deactivate(&mut s, &l.key, "fp-2")
        .await
        .expect("deactivate");
    let code = s.code(code_req("ACME", 2, 1)).await;
    let renewed = redeem(&mut s, &l.key, &code.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem");
    assert_refused(
        redeem(&mut s, &l.key, &code.renewal_code, "fp-1", LATEST).await,
        Code::FailedPrecondition,
        "RENEWAL_CODE_ALREADY_REDEEMED",
    );
    suspend(&mut s, &l.key, "chargeback", "").await.unwrap();
    reinstate(&mut s, &l.key, "paid").await.unwrap();
    revoke(&mut s, &l.key, "fraud").await.unwrap();
    let t1 = Utc::now() + Duration::seconds(1);

    let events = s.events(&l.key).await;
    assert_eq!(
        types(&events),
        vec![
            "issued",
            "activated",
            "activated",
            "deactivated",
            "renewed",
            "renewal_refused",
            "suspended",
            "reinstated",
            "revoked"
        ]
    );
    let mut last_at = t0;
    for w in events.windows(2) {
        assert!(w[0].id < w[1].id, "ids increase: {events:?}");
    }
    for e in &events {
        let when = dt(&e.at);
        assert!(last_at <= when && when <= t1, "event time {when} for {e:?}");
        last_at = when;
        assert!(!e.actor.is_empty(), "actor of {e:?}");
    }
    assert_eq!(events[1].fingerprint, "fp-1");
    assert_eq!(events[2].fingerprint, "fp-2");
    assert_eq!(events[3].fingerprint, "fp-2");
    let r = &events[4];
    assert_eq!(r.old_expires_at, l.expires_at);
    assert_eq!(
        r.new_expires_at,
        renewed.license.as_ref().unwrap().expires_at
    );
    assert_eq!(dt(&r.new_expires_at), plus_years(dt(&l.expires_at), 1));
    assert_eq!(r.renewal_code_id, code.id);
    assert_eq!(r.fingerprint, "fp-1");
    let refused = &events[5];
    assert_eq!(refused.refusal_reason, "RENEWAL_CODE_ALREADY_REDEEMED");
    assert_eq!(refused.renewal_code_id, code.id);
    assert_eq!(events[6].detail, "chargeback");
    assert_eq!(events[7].detail, "paid");
    assert_eq!(events[8].detail, "fraud");

    // Pagination returns the same history, oldest first.
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = s
            .licenses
            .list_license_events(pb::ListLicenseEventsRequest {
                license_key: l.key.clone(),
                page_size: 4,
                page_token: token.clone(),
            })
            .await
            .expect("events page")
            .into_inner();
        pages.push(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![4, 4, 1]
    );
    assert_eq!(pages.concat(), events);
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Renewal codes
// ---------------------------------------------------------------------------

fn assert_code_shape(code: &str) {
    let alphabet = licensd::domain::keys::ALPHABET;
    let groups: Vec<&str> = code.split('-').collect();
    assert_eq!(groups.len(), 5, "shape of {code}");
    assert_eq!(groups[0], "RC", "shape of {code}");
    for g in &groups[1..] {
        assert_eq!(g.len(), 6, "shape of {code}");
        assert!(
            g.bytes().all(|c| alphabet.contains(&c)),
            "alphabet of {code}"
        );
    }
}

#[tokio::test]
async fn r4_issue_renewal_code_shows_the_code_once() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let before = Utc::now() - Duration::seconds(1);
    let mut req = code_req("ACME", 3, 2);
    req.reseller = "resell-1".into();
    let c = s.code(req).await;
    let after = Utc::now() + Duration::seconds(1);
    assert_code_shape(&c.renewal_code);
    assert!(!c.id.is_empty());
    assert!(!c.renewal_code.contains(&c.id) && !c.id.contains(&c.renewal_code));
    assert_eq!(c.product, "ACME");
    assert_eq!(c.edition, pb::Edition::Business as i32);
    assert_eq!(c.seats, 3);
    assert_eq!(c.term_years, 2);
    assert_eq!(c.state, pb::RenewalCodeState::Unredeemed as i32);
    let issued = dt(&c.issued_at);
    assert!(before <= issued && issued <= after);
    assert_eq!(c.redeemed_at, None);
    assert_eq!(c.redeemed_license_key, "");
    assert_eq!(c.order_ref, "order-2");
    assert_eq!(c.reseller, "resell-1");

    let other = s.code(code_req("ACME", 3, 2)).await;
    assert_ne!(other.renewal_code, c.renewal_code);
    assert_ne!(other.id, c.id);

    for variant in [
        c.renewal_code.clone(),
        c.renewal_code.to_lowercase(),
        c.renewal_code.replace('-', ""),
    ] {
        let got = get_code(&mut s, &variant).await.expect("get code");
        assert_eq!(got.renewal_code, "", "the code is shown only once");
        assert_eq!(got.id, c.id);
        assert_eq!(got.state, pb::RenewalCodeState::Unredeemed as i32);
        assert_eq!(got.seats, 3);
        assert_eq!(got.term_years, 2);
        assert_eq!(got.issued_at, c.issued_at);
    }
    s.stop().await;
}

#[tokio::test]
async fn r4_get_renewal_code_tells_where_and_when_it_was_redeemed() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    let before = Utc::now() - Duration::seconds(1);
    redeem(&mut s, &l.key, &c.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem");
    let after = Utc::now() + Duration::seconds(1);
    let got = get_code(&mut s, &c.renewal_code).await.unwrap();
    assert_eq!(got.renewal_code, "");
    assert_eq!(got.state, pb::RenewalCodeState::Redeemed as i32);
    assert_eq!(got.redeemed_license_key, l.key);
    let when = dt(&got.redeemed_at);
    assert!(before <= when && when <= after, "redeemed_at {when}");
    s.stop().await;
}

#[tokio::test]
async fn r4_a_voided_code_cannot_be_redeemed_and_a_redeemed_code_cannot_be_voided() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    let voided = void_code(&mut s, &c.renewal_code, "refund")
        .await
        .expect("void");
    assert_eq!(voided.id, c.id);
    assert_eq!(voided.state, pb::RenewalCodeState::Void as i32);
    assert_eq!(voided.void_reason, "refund");
    assert!(voided.voided_at.is_some());
    assert_eq!(voided.renewal_code, "");
    let got = get_code(&mut s, &c.renewal_code).await.unwrap();
    assert_eq!(got.state, pb::RenewalCodeState::Void as i32);
    assert_redeem_refused_and_unchanged(&mut s, &l.key, &c, "fp-1", LATEST, "RENEWAL_CODE_VOID")
        .await;

    let c2 = s.code(code_req("ACME", 1, 1)).await;
    redeem(&mut s, &l.key, &c2.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem");
    assert_refused(
        void_code(&mut s, &c2.renewal_code, "refund").await,
        Code::FailedPrecondition,
        "RENEWAL_CODE_ALREADY_REDEEMED",
    );
    let got = get_code(&mut s, &c2.renewal_code).await.unwrap();
    assert_eq!(got.state, pb::RenewalCodeState::Redeemed as i32);
    assert_eq!(got.void_reason, "");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Activation, deactivation, validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn r7_activate_is_idempotent_per_fingerprint() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    let first = s.activate(&l.key, "fp-1").await.expect("activate");
    let lic = first.license.unwrap();
    assert_eq!(lic.seats_used, 1);
    assert_eq!(lic.key, l.key);
    let a = first.activation.unwrap();
    assert_eq!(a.fingerprint, "fp-1");
    assert_eq!(a.hostname, "host-fp-1");
    assert!(a.activated_at.is_some());

    let second = s.activate(&l.key, "fp-1").await.expect("activate again");
    assert_eq!(second.license.unwrap().seats_used, 1);
    assert_eq!(second.activation.unwrap(), a);
    assert_eq!(s.license(&l.key).await.seats_used, 1);
    assert_eq!(types(&s.events(&l.key).await), vec!["issued", "activated"]);
    s.stop().await;
}

#[tokio::test]
async fn r7_deactivate_frees_the_seat() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    assert_refused(
        s.activate(&l.key, "fp-2").await,
        Code::FailedPrecondition,
        "SEAT_LIMIT_REACHED",
    );
    let after = deactivate(&mut s, &l.key, "fp-1")
        .await
        .expect("deactivate");
    let lic = after.license.unwrap();
    assert_eq!(lic.seats_used, 0);
    assert!(lic.activations.is_empty());
    let v = s.validate(&l.key, "fp-1", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::NotActivated as i32);
    let taken = s.activate(&l.key, "fp-2").await.expect("the freed seat");
    assert_eq!(taken.license.unwrap().seats_used, 1);
    assert_eq!(
        types(&s.events(&l.key).await),
        vec!["issued", "activated", "deactivated", "activated"]
    );
    s.stop().await;
}

#[tokio::test]
async fn r5_deactivate_of_an_unbound_fingerprint_is_machine_not_activated() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    assert_refused(
        deactivate(&mut s, &l.key, "fp-unknown").await,
        Code::FailedPrecondition,
        "MACHINE_NOT_ACTIVATED",
    );
    assert_eq!(s.license(&l.key).await.seats_used, 1);
    s.stop().await;
}

#[tokio::test]
async fn r7_seat_limit_refusal_changes_nothing_and_writes_no_event() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    s.activate(&l.key, "fp-2").await.unwrap();
    let before = s.license(&l.key).await;
    let events_before = s.events(&l.key).await;
    let md = assert_refused(
        s.activate(&l.key, "fp-3").await,
        Code::FailedPrecondition,
        "SEAT_LIMIT_REACHED",
    );
    assert_eq!(md.get("license_seats").map(String::as_str), Some("2"));
    let after = s.license(&l.key).await;
    assert_eq!(after.seats_used, 2);
    assert_eq!(after.activations, before.activations);
    assert_eq!(s.events(&l.key).await, events_before);
    // A workstation already bound still gets in.
    s.activate(&l.key, "fp-2").await.expect("bound fingerprint");
    s.stop().await;
}

#[tokio::test]
async fn r7_concurrent_activations_never_exceed_the_seat_count() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 3, 1)).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut client = s.activation.clone();
        let key = l.key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .activate(pb::ActivateRequest {
                    license_key: key,
                    fingerprint: format!("fp-{i}"),
                    hostname: format!("host-{i}"),
                    client_version: String::new(),
                })
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(error_info(&status).0, "SEAT_LIMIT_REACHED");
            }
        }
    }
    assert_eq!(ok, 3);
    let after = s.license(&l.key).await;
    assert_eq!(after.seats_used, 3);
    assert_eq!(after.activations.len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn r2_an_expired_license_cannot_be_activated() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    for starts_at in [ago(1, 5), ago(2, 60)] {
        let l = s.issue(license_from("ACME", 1, 1, starts_at)).await;
        let md = assert_refused(
            s.activate(&l.key, "fp-1").await,
            Code::FailedPrecondition,
            "LICENSE_EXPIRED",
        );
        assert_eq!(
            md.get("expires_at").map(String::as_str),
            Some(rfc3339(dt(&l.expires_at)).as_str())
        );
        let after = s.license(&l.key).await;
        assert_eq!(after.seats_used, 0);
        assert!(after.activations.is_empty());
        assert_eq!(types(&s.events(&l.key).await), vec!["issued"]);
    }
    s.stop().await;
}

#[tokio::test]
async fn r2_validate_reports_valid_with_the_license_figures() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let v = s.validate(&l.key, "fp-1", LATEST).await.expect("validate");
    // A bound workstation of a valid license gets an offline certificate
    // (tests/offline_certificates.rs checks it).
    assert_eq!(v.license_certificate.split('.').count(), 3);
    assert_eq!(
        pb::ValidateResponse {
            license_certificate: String::new(),
            ..v
        },
        pb::ValidateResponse {
            validity: pb::Validity::Valid as i32,
            valid: true,
            kind: pb::LicenseKind::Standard as i32,
            edition: pb::Edition::Business as i32,
            expires_at: l.expires_at,
            renewable_until: l.renewable_until,
            seats: 2,
            seats_used: 1,
            latest_version: "4.10.0".into(),
            update_available: false,
            license_certificate: String::new(),
        }
    );
    // Without a fingerprint, and with the key in lower case.
    let v = s.validate(&l.key.to_lowercase(), "", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::Valid as i32);
    assert!(v.valid);
    // A fingerprint that is not bound.
    let v = s.validate(&l.key, "fp-other", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::NotActivated as i32);
    assert!(!v.valid);
    s.stop().await;
}

#[tokio::test]
async fn r3_validate_reports_expired_renewable_inside_the_grace_month_and_expired_after() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let grace = s.issue(license_from("ACME", 1, 1, ago(1, 5))).await;
    let v = s.validate(&grace.key, "", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::ExpiredRenewable as i32);
    assert!(!v.valid);
    assert_eq!(v.expires_at, grace.expires_at);
    assert_eq!(
        dt(&v.renewable_until),
        plus_months(dt(&grace.expires_at), 1)
    );

    let old = s.issue(license_from("ACME", 1, 1, ago(2, 60))).await;
    let v = s.validate(&old.key, "", "").await.unwrap();
    assert_eq!(v.validity, pb::Validity::Expired as i32);
    assert!(!v.valid);
    assert_eq!(dt(&v.renewable_until), plus_months(dt(&old.expires_at), 1));
    s.stop().await;
}

#[tokio::test]
async fn r9_validate_reports_an_expired_promo_or_nfr_license_as_expired_not_renewable() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    for kind in [pb::LicenseKind::Promo, pb::LicenseKind::Nfr] {
        let l = s
            .issue(with_kind(license_from("ACME", 1, 1, ago(1, 5)), kind))
            .await;
        assert_eq!(l.validity, pb::Validity::Expired as i32);
        assert_eq!(l.renewable_until, None);
        let v = s.validate(&l.key, "", "").await.unwrap();
        assert_eq!(v.validity, pb::Validity::Expired as i32, "{kind:?}");
        assert!(!v.valid);
        assert_eq!(v.kind, kind as i32);
        assert_eq!(v.renewable_until, None);
        assert_eq!(v.expires_at, l.expires_at);
    }
    s.stop().await;
}

#[tokio::test]
async fn r8_validate_answers_not_found_and_renewal_code_without_an_error() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let v = s.validate(&unknown_key(), "", "").await.expect("OK answer");
    assert_eq!(v.validity, pb::Validity::NotFound as i32);
    assert!(!v.valid);
    let c = s.code(code_req("ACME", 1, 1)).await;
    for value in [
        c.renewal_code.clone(),
        c.renewal_code.to_lowercase().replace('-', ""),
    ] {
        let v = s.validate(&value, "", "").await.expect("OK answer");
        assert_eq!(v.validity, pb::Validity::RenewalCode as i32);
        assert!(!v.valid);
    }
    assert_eq!(
        get_code(&mut s, &c.renewal_code).await.unwrap().state,
        pb::RenewalCodeState::Unredeemed as i32
    );
    s.stop().await;
}

#[tokio::test]
async fn r6_validate_tells_when_an_update_is_available() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    for (client, expected) in [
        ("4.9.2", true),
        ("4.10.0", false),
        ("4.10.1", false),
        ("", false),
    ] {
        let v = s.validate(&l.key, "", client).await.unwrap();
        assert_eq!(v.update_available, expected, "client {client:?}");
        assert_eq!(v.latest_version, "4.10.0");
        assert_eq!(v.validity, pb::Validity::Valid as i32);
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Redemption
// ---------------------------------------------------------------------------

#[tokio::test]
async fn r4_redeem_moves_the_expiry_by_the_code_term_and_keeps_the_key() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 2, 2)).await;
    let res = redeem(&mut s, &l.key, &c.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem");
    assert_eq!(res.previous_expires_at, l.expires_at);
    let renewed = res.license.unwrap();
    assert_eq!(renewed.key, l.key);
    assert_eq!(dt(&renewed.expires_at), plus_years(dt(&l.expires_at), 2));
    assert_eq!(renewed.starts_at, l.starts_at);
    assert_eq!(renewed.renewal_count, 1);
    assert_eq!(renewed.seats_used, 1);
    assert_eq!(renewed.validity, pb::Validity::Valid as i32);
    assert_eq!(
        dt(&renewed.renewable_until),
        plus_months(plus_years(dt(&l.expires_at), 2), 1)
    );
    let got = s.license(&l.key).await;
    assert_eq!(got.expires_at, renewed.expires_at);
    assert_eq!(got.renewal_count, 1);
    let code = get_code(&mut s, &c.renewal_code).await.unwrap();
    assert_eq!(code.state, pb::RenewalCodeState::Redeemed as i32);
    assert_eq!(code.redeemed_license_key, l.key);

    // Exactly once: a second redemption is refused with when it was used.
    let other = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&other.key, "fp-9").await.unwrap();
    let md = assert_redeem_refused_and_unchanged(
        &mut s,
        &other.key,
        &c,
        "fp-9",
        LATEST,
        "RENEWAL_CODE_ALREADY_REDEEMED",
    )
    .await;
    assert_eq!(
        md.get("redeemed_at").map(String::as_str),
        Some(rfc3339(dt(&code.redeemed_at)).as_str())
    );
    s.stop().await;
}

#[tokio::test]
async fn r4_renewals_redeemed_early_stack() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c1 = s.code(code_req("ACME", 1, 1)).await;
    let c2 = s.code(code_req("ACME", 1, 2)).await;
    let r1 = redeem(&mut s, &l.key, &c1.renewal_code, "fp-1", LATEST)
        .await
        .expect("first");
    let r2 = redeem(&mut s, &l.key, &c2.renewal_code, "fp-1", LATEST)
        .await
        .expect("second");
    let e0 = dt(&l.expires_at);
    assert_eq!(dt(&r1.previous_expires_at), e0);
    assert_eq!(r2.previous_expires_at, r1.license.unwrap().expires_at);
    let final_license = r2.license.unwrap();
    assert_eq!(
        dt(&final_license.expires_at),
        plus_years(plus_years(e0, 1), 2)
    );
    assert_eq!(final_license.renewal_count, 2);
    let renewed: Vec<_> = s
        .events(&l.key)
        .await
        .into_iter()
        .filter(|e| e.r#type == "renewed")
        .collect();
    assert_eq!(renewed.len(), 2);
    assert_eq!(renewed[0].renewal_code_id, c1.id);
    assert_eq!(renewed[1].renewal_code_id, c2.id);
    assert_eq!(renewed[1].old_expires_at, renewed[0].new_expires_at);
    s.stop().await;
}

#[tokio::test]
async fn r3_r4_a_lapsed_license_inside_the_grace_month_renews_from_its_old_expiry() {
    let (shift, clock) = lapse_clock();
    let mut s = TestServer::start_with_clock(clock).await;
    s.product("ACME", LATEST).await;
    let l = lapsed_license(&mut s, shift, "ACME", 1, "fp-1").await;
    let c = s.code(code_req("ACME", 1, 1)).await;
    let res = redeem(&mut s, &l.key, &c.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem inside the grace period");
    assert_eq!(res.previous_expires_at, l.expires_at);
    let renewed = res.license.unwrap();
    assert_eq!(dt(&renewed.expires_at), plus_years(dt(&l.expires_at), 1));
    assert_eq!(renewed.renewal_count, 1);
    assert_eq!(renewed.validity, pb::Validity::Valid as i32);
    s.stop().await;
}

#[tokio::test]
async fn r4_with_from_now_if_expired_a_lapsed_license_restarts_from_the_renewal() {
    let (shift, clock) = lapse_clock();
    let mut s = TestServer::start_with_clock(clock).await;
    s.products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "FLEX".into(),
                display_name: "Flex".into(),
                latest_version: LATEST.into(),
                renewal_basis: pb::RenewalBasis::FromNowIfExpired as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("create product");
    let got = s
        .products
        .get_product(pb::GetProductRequest {
            code: "FLEX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.renewal_basis, pb::RenewalBasis::FromNowIfExpired as i32);

    let l = lapsed_license(&mut s, shift, "FLEX", 1, "fp-1").await;
    let c = s.code(code_req("FLEX", 1, 1)).await;
    let before = Utc::now() + shift - Duration::milliseconds(5);
    let res = redeem(&mut s, &l.key, &c.renewal_code, "fp-1", LATEST)
        .await
        .expect("redeem");
    let after = Utc::now() + shift + Duration::milliseconds(5);
    assert_eq!(res.previous_expires_at, l.expires_at);
    let new_expiry = dt(&res.license.unwrap().expires_at);
    assert!(
        plus_years(before, 1) <= new_expiry && new_expiry <= plus_years(after, 1),
        "restarts from now: {new_expiry}, renewed between {before} and {after}"
    );
    assert!(new_expiry > plus_years(dt(&l.expires_at), 1));

    // A license that has not lapsed still renews from its expiry.
    let valid = s.issue(license_req("FLEX", 1, 1)).await;
    s.activate(&valid.key, "fp-2").await.unwrap();
    let c2 = s.code(code_req("FLEX", 1, 1)).await;
    let res = redeem(&mut s, &valid.key, &c2.renewal_code, "fp-2", LATEST)
        .await
        .expect("redeem");
    assert_eq!(
        dt(&res.license.unwrap().expires_at),
        plus_years(dt(&valid.expires_at), 1)
    );
    s.stop().await;
}

#[tokio::test]
async fn r4_a_code_is_redeemed_exactly_once_under_concurrent_attempts() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let mut keys = Vec::new();
    for i in 0..4 {
        let l = s.issue(license_req("ACME", 1, 1)).await;
        s.activate(&l.key, &format!("fp-{i}")).await.unwrap();
        keys.push(l);
    }
    let c = s.code(code_req("ACME", 1, 1)).await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        for (i, l) in keys.iter().enumerate() {
            let mut client = s.activation.clone();
            let req = redeem_req(&l.key, &c.renewal_code, &format!("fp-{i}"), LATEST);
            tasks.push(tokio::spawn(async move {
                client.redeem_renewal_code(req).await
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(error_info(&status).0, "RENEWAL_CODE_ALREADY_REDEEMED");
            }
        }
    }
    assert_eq!(ok, 1);
    let mut renewals = 0;
    for l in &keys {
        renewals += s.license(&l.key).await.renewal_count;
    }
    assert_eq!(renewals, 1);
    s.stop().await;
}

#[tokio::test]
async fn r3_redeem_is_refused_after_the_grace_month_and_changes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_from("ACME", 2, 1, ago(2, 60))).await;
    let c = s.code(code_req("ACME", 2, 1)).await;
    let md = assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &c,
        "fp-1",
        LATEST,
        "RENEWAL_WINDOW_CLOSED",
    )
    .await;
    let until = plus_months(dt(&l.expires_at), 1);
    assert_eq!(dt(&l.renewable_until), until);
    assert_eq!(
        md.get("renewable_until").map(String::as_str),
        Some(rfc3339(until).as_str())
    );
    s.stop().await;
}

#[tokio::test]
async fn r6_redeem_from_an_outdated_client_is_refused_and_changes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    let md = assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &c,
        "fp-1",
        "4.9.2",
        "CLIENT_VERSION_OUTDATED",
    )
    .await;
    assert_eq!(md.get("latest_version").map(String::as_str), Some("4.10.0"));
    // After updating, the same code goes through (4.10.0 > 4.9.2 numerically).
    let res = redeem(&mut s, &l.key, &c.renewal_code, "fp-1", "4.10.0")
        .await
        .expect("redeem after update");
    assert_eq!(res.license.unwrap().renewal_count, 1);
    s.stop().await;
}

#[tokio::test]
async fn r6_a_release_bumping_latest_version_makes_the_old_client_outdated() {
    let mut s = TestServer::start().await;
    s.product("ACME", "4.9.2").await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    s.products
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                latest_version: "4.10.0".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .expect("bump");
    let c = s.code(code_req("ACME", 1, 1)).await;
    let md = assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &c,
        "fp-1",
        "4.9.2",
        "CLIENT_VERSION_OUTDATED",
    )
    .await;
    assert_eq!(md.get("latest_version").map(String::as_str), Some("4.10.0"));
    s.stop().await;
}

#[tokio::test]
async fn r7_redeem_with_another_seat_count_is_refused_and_changes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    for code_seats in [3, 1] {
        let c = s.code(code_req("ACME", code_seats, 1)).await;
        let md = assert_redeem_refused_and_unchanged(
            &mut s,
            &l.key,
            &c,
            "fp-1",
            LATEST,
            "SEAT_COUNT_MISMATCH",
        )
        .await;
        assert_eq!(md.get("license_seats").map(String::as_str), Some("2"));
        assert_eq!(
            md.get("code_seats").map(String::as_str),
            Some(code_seats.to_string().as_str())
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn r5_redeem_on_a_workstation_that_is_not_activated_is_refused_and_changes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 2, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    s.activate(&l.key, "fp-2").await.unwrap();
    let c = s.code(code_req("ACME", 2, 1)).await;
    assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &c,
        "fp-other",
        LATEST,
        "MACHINE_NOT_ACTIVATED",
    )
    .await;
    // A workstation that was deactivated no longer counts.
    deactivate(&mut s, &l.key, "fp-2").await.unwrap();
    assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &c,
        "fp-2",
        LATEST,
        "MACHINE_NOT_ACTIVATED",
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn r8_a_renewal_code_cannot_stand_in_for_a_license_key() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    for value in [
        c.renewal_code.clone(),
        c.renewal_code.to_lowercase().replace('-', ""),
        unknown_code(),
    ] {
        assert_refused(
            s.activate(&value, "fp-1").await,
            Code::FailedPrecondition,
            "RENEWAL_CODE_IS_NOT_A_LICENSE_KEY",
        );
        assert_refused(
            redeem(&mut s, &value, &c.renewal_code, "fp-1", LATEST).await,
            Code::FailedPrecondition,
            "RENEWAL_CODE_IS_NOT_A_LICENSE_KEY",
        );
        assert_refused(
            get_license(&mut s, &value).await,
            Code::FailedPrecondition,
            "RENEWAL_CODE_IS_NOT_A_LICENSE_KEY",
        );
    }
    assert_eq!(
        get_code(&mut s, &c.renewal_code).await.unwrap().state,
        pb::RenewalCodeState::Unredeemed as i32
    );
    assert_eq!(types(&s.events(&l.key).await), vec!["issued", "activated"]);
    s.stop().await;
}

#[tokio::test]
async fn r9_promo_and_nfr_licenses_are_never_renewed() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    for kind in [pb::LicenseKind::Promo, pb::LicenseKind::Nfr] {
        let l = s.issue(with_kind(license_req("ACME", 1, 1), kind)).await;
        s.activate(&l.key, "fp-1").await.unwrap();
        let c = s.code(code_req("ACME", 1, 1)).await;
        assert_redeem_refused_and_unchanged(
            &mut s,
            &l.key,
            &c,
            "fp-1",
            LATEST,
            "LICENSE_KIND_NOT_RENEWABLE",
        )
        .await;
    }
    s.stop().await;
}

#[tokio::test]
async fn r10_a_code_renews_only_the_same_product_and_edition() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    s.product("BETA", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let beta = s.code(code_req("BETA", 1, 1)).await;
    assert_redeem_refused_and_unchanged(&mut s, &l.key, &beta, "fp-1", LATEST, "PRODUCT_MISMATCH")
        .await;
    let mut personal = code_req("ACME", 1, 1);
    personal.edition = pb::Edition::Personal as i32;
    let personal = s.code(personal).await;
    assert_redeem_refused_and_unchanged(
        &mut s,
        &l.key,
        &personal,
        "fp-1",
        LATEST,
        "EDITION_MISMATCH",
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn api_redeem_reports_the_first_failing_check_in_spec_order() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    s.product("BETA", LATEST).await;
    // kind before product.
    let promo = s
        .issue(with_kind(license_req("ACME", 1, 1), pb::LicenseKind::Promo))
        .await;
    let beta = s.code(code_req("BETA", 2, 1)).await;
    assert_refused(
        redeem(&mut s, &promo.key, &beta.renewal_code, "fp-x", "1.0").await,
        Code::FailedPrecondition,
        "LICENSE_KIND_NOT_RENEWABLE",
    );
    // seats before window.
    let old = s.issue(license_from("ACME", 1, 1, ago(2, 60))).await;
    let two_seats = s.code(code_req("ACME", 2, 1)).await;
    assert_refused(
        redeem(&mut s, &old.key, &two_seats.renewal_code, "fp-x", "1.0").await,
        Code::FailedPrecondition,
        "SEAT_COUNT_MISMATCH",
    );
    // window before fingerprint and version.
    let one_seat = s.code(code_req("ACME", 1, 1)).await;
    assert_refused(
        redeem(&mut s, &old.key, &one_seat.renewal_code, "fp-x", "1.0").await,
        Code::FailedPrecondition,
        "RENEWAL_WINDOW_CLOSED",
    );
    // fingerprint before version.
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    assert_refused(
        redeem(&mut s, &l.key, &one_seat.renewal_code, "fp-x", "1.0").await,
        Code::FailedPrecondition,
        "MACHINE_NOT_ACTIVATED",
    );
    // code state before license state.
    suspend(&mut s, &l.key, "audit", "").await.unwrap();
    void_code(&mut s, &one_seat.renewal_code, "refund")
        .await
        .unwrap();
    assert_refused(
        redeem(&mut s, &l.key, &one_seat.renewal_code, "fp-1", LATEST).await,
        Code::FailedPrecondition,
        "RENEWAL_CODE_VOID",
    );
    // license not found before code not found.
    assert_refused(
        redeem(&mut s, &unknown_key(), &unknown_code(), "fp-1", LATEST).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    s.stop().await;
}

#[tokio::test]
async fn api_malformed_input_is_checked_before_the_renewal_code_in_the_key_field() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let c = s.code(code_req("ACME", 1, 1)).await;
    let res = s
        .activation
        .activate(pb::ActivateRequest {
            license_key: c.renewal_code.clone(),
            fingerprint: "f".repeat(300),
            hostname: "h".into(),
            client_version: String::new(),
        })
        .await;
    assert_bad_field(res, "fingerprint");
    let res = redeem(&mut s, &c.renewal_code, "not-a-code", "fp-1", LATEST).await;
    let status = res.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_info(&status).0, "MALFORMED_RENEWAL_CODE");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Malformed input and unknown references
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_a_mistyped_key_or_code_is_malformed_and_writes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    let typo = mistype(&l.key);
    let events_before = s.events(&l.key).await;

    let check_key =
        |res: Result<_, tonic::Status>| assert_refused(res, Code::InvalidArgument, "MALFORMED_KEY");
    let md = check_key(get_license(&mut s, &typo).await.map(|_| ()));
    assert_eq!(md.get("field").map(String::as_str), Some("license_key"));
    check_key(s.activate(&typo, "fp-1").await.map(|_| ()));
    check_key(s.validate(&typo, "", "").await.map(|_| ()));
    check_key(deactivate(&mut s, &typo, "fp-1").await.map(|_| ()));
    check_key(
        redeem(&mut s, &typo, &c.renewal_code, "fp-1", LATEST)
            .await
            .map(|_| ()),
    );
    check_key(suspend(&mut s, &typo, "x", "").await.map(|_| ()));
    let status = get_license(&mut s, &typo).await.unwrap_err();
    assert_eq!(bad_fields(&status), vec!["license_key".to_string()]);
    for garbage in ["", "hello", "ACME-!!!!!"] {
        check_key(get_license(&mut s, garbage).await.map(|_| ()));
    }

    let code_typo = mistype(&c.renewal_code);
    let status = get_code(&mut s, &code_typo).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_info(&status).0, "MALFORMED_RENEWAL_CODE");
    assert_eq!(bad_fields(&status), vec!["renewal_code".to_string()]);
    assert_refused(
        void_code(&mut s, &code_typo, "refund").await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    // A redemption with malformed input writes no history.
    assert_refused(
        redeem(&mut s, &l.key, &code_typo, "fp-1", LATEST).await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    assert_refused(
        redeem(&mut s, &l.key, &l.key, "fp-1", LATEST).await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    assert_bad_field(
        redeem(&mut s, &l.key, &c.renewal_code, "fp-1", "latest").await,
        "client_version",
    );
    assert_bad_field(
        redeem(&mut s, &l.key, &c.renewal_code, "", LATEST).await,
        "fingerprint",
    );
    assert_eq!(s.events(&l.key).await, events_before);
    assert_eq!(
        get_code(&mut s, &c.renewal_code).await.unwrap().state,
        pb::RenewalCodeState::Unredeemed as i32
    );
    assert_eq!(s.license(&l.key).await.renewal_count, 0);
    s.stop().await;
}

#[tokio::test]
async fn api_unknown_licenses_and_codes_are_not_found_and_write_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let key = unknown_key();
    assert_refused(
        get_license(&mut s, &key).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        s.activate(&key, "fp-1").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        deactivate(&mut s, &key, "fp-1").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        suspend(&mut s, &key, "x", "").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        revoke(&mut s, &key, "x").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        s.licenses
            .list_license_events(pb::ListLicenseEventsRequest {
                license_key: key.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    let c = s.code(code_req("ACME", 1, 1)).await;
    assert_refused(
        redeem(&mut s, &key, &c.renewal_code, "fp-1", LATEST).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );

    let code = unknown_code();
    assert_refused(
        get_code(&mut s, &code).await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    assert_refused(
        void_code(&mut s, &code, "refund").await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    assert_refused(
        redeem(&mut s, &l.key, &code, "fp-1", LATEST).await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    assert_eq!(types(&s.events(&l.key).await), vec!["issued", "activated"]);
    s.stop().await;
}

#[tokio::test]
async fn r1_a_term_not_offered_for_the_edition_is_refused() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let cases = [
        (personal_license("ACME", 1, 3), "3"),
        (license_req("ACME", 1, 4), "4"),
        (license_req("ACME", 1, 0), "0"),
    ];
    for (req, term) in cases {
        let status = s.licenses.issue_license(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let (reason, md) = error_info(&status);
        assert_eq!(reason, "TERM_NOT_ALLOWED");
        assert_eq!(md.get("term_years").map(String::as_str), Some(term));
        assert_eq!(bad_fields(&status), vec!["term_years".to_string()]);
    }
    let mut code = code_req("ACME", 1, 3);
    code.edition = pb::Edition::Personal as i32;
    let status = s.licenses.issue_renewal_code(code).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_info(&status).0, "TERM_NOT_ALLOWED");
    assert_eq!(bad_fields(&status), vec!["term_years".to_string()]);
    // Nothing was issued.
    assert!(listed_keys(&mut s, Default::default()).await.is_empty());
    // The business 3-year term and personal 2-year term are allowed.
    s.issue(license_req("ACME", 1, 3)).await;
    s.issue(personal_license("ACME", 1, 2)).await;
    s.stop().await;
}

#[tokio::test]
async fn api_invalid_fields_are_named_in_a_bad_request() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;

    let mut r = license_req("ACME", 0, 1);
    assert_bad_field(s.licenses.issue_license(r.clone()).await, "seats");
    r = license_req("ACME", 1, 1);
    r.edition = pb::Edition::Unspecified as i32;
    assert_bad_field(s.licenses.issue_license(r).await, "edition");
    r = license_req("ACME", 1, 1);
    r.request_id = String::new();
    assert_bad_field(s.licenses.issue_license(r).await, "request_id");
    r = license_req("ACME", 1, 1);
    r.product = "A".into();
    assert_bad_field(s.licenses.issue_license(r).await, "product");
    r = license_from("ACME", 1, 1, pts(at("1900-01-01T00:00:00Z")));
    assert_bad_field(s.licenses.issue_license(r).await, "starts_at");
    r = license_from(
        "ACME",
        1,
        1,
        Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        },
    );
    assert_bad_field(s.licenses.issue_license(r).await, "starts_at");

    let mut c = code_req("ACME", 0, 1);
    assert_bad_field(s.licenses.issue_renewal_code(c.clone()).await, "seats");
    c = code_req("ACME", 1, 1);
    c.edition = pb::Edition::Unspecified as i32;
    assert_bad_field(s.licenses.issue_renewal_code(c).await, "edition");
    c = code_req("ACME", 1, 1);
    c.request_id = String::new();
    assert_bad_field(s.licenses.issue_renewal_code(c).await, "request_id");

    let res = s
        .activation
        .activate(pb::ActivateRequest {
            license_key: l.key.clone(),
            fingerprint: "f".repeat(300),
            hostname: "h".into(),
            client_version: String::new(),
        })
        .await;
    assert_bad_field(res, "fingerprint");
    assert_bad_field(s.activate(&l.key, "").await, "fingerprint");
    assert_eq!(s.license(&l.key).await.seats_used, 0);

    let list = |page_size: i32, token: &str| pb::ListLicensesRequest {
        page_size,
        page_token: token.into(),
        ..Default::default()
    };
    assert_bad_field(list_licenses(&mut s, list(-1, "")).await, "page_size");
    assert_bad_field(list_licenses(&mut s, list(2, "bogus")).await, "page_token");
    assert_bad_field(
        list_licenses(
            &mut s,
            pb::ListLicensesRequest {
                expires_after: Some(Timestamp {
                    seconds: 253_402_300_800, // year 10000
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
        .await,
        "expires_after",
    );
    assert_bad_field(
        list_licenses(
            &mut s,
            pb::ListLicensesRequest {
                expires_before: Some(Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..Default::default()
            },
        )
        .await,
        "expires_before",
    );
    assert_bad_field(
        s.products
            .list_products(pb::ListProductsRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await,
        "page_size",
    );
    assert_bad_field(
        s.products
            .list_products(pb::ListProductsRequest {
                page_size: 2,
                page_token: "bogus".into(),
            })
            .await,
        "page_token",
    );
    for (page_size, token, field) in [(-1, "", "page_size"), (2, "bogus", "page_token")] {
        assert_bad_field(
            s.licenses
                .list_license_events(pb::ListLicenseEventsRequest {
                    license_key: l.key.clone(),
                    page_size,
                    page_token: token.into(),
                })
                .await,
            field,
        );
    }
    assert_eq!(
        listed_keys(&mut s, Default::default()).await,
        vec![l.key.clone()]
    );
    assert_eq!(types(&s.events(&l.key).await), vec!["issued"]);
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------

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
async fn api_issue_renewal_code_retried_returns_the_identical_code() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let req = code_req("ACME", 1, 1);
    let first = s.code(req.clone()).await;
    let again = s.code(req.clone()).await;
    assert_eq!(again.renewal_code, first.renewal_code);
    assert_eq!(again.id, first.id);
    assert_eq!(again.issued_at, first.issued_at);
    let mut other = req.clone();
    other.term_years = 2;
    assert_refused(
        s.licenses.issue_renewal_code(other).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    // A request id is one request, whatever the operation.
    let mut lic = license_req("ACME", 1, 1);
    lic.request_id = req.request_id.clone();
    assert_refused(
        s.licenses.issue_license(lic).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    // After redemption a retry still names the same code and issues no new one.
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    redeem(&mut s, &l.key, &first.renewal_code, "fp-1", LATEST)
        .await
        .unwrap();
    let retry = s.code(req).await;
    assert_eq!(retry.id, first.id);
    assert_eq!(retry.renewal_code, first.renewal_code);
    let l2 = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l2.key, "fp-2").await.unwrap();
    assert_refused(
        redeem(&mut s, &l2.key, &retry.renewal_code, "fp-2", LATEST).await,
        Code::FailedPrecondition,
        "RENEWAL_CODE_ALREADY_REDEEMED",
    );
    s.stop().await;
}

#[tokio::test]
async fn r11_suspend_retried_with_a_request_id_records_one_event() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    let request_id = rid("suspend");
    let a = suspend(&mut s, &l.key, "chargeback", &request_id)
        .await
        .unwrap();
    let b = suspend(&mut s, &l.key, "chargeback", &request_id)
        .await
        .unwrap();
    assert_eq!(a.status, pb::LicenseStatus::Suspended as i32);
    assert_eq!(b.status, pb::LicenseStatus::Suspended as i32);
    assert_eq!(types(&s.events(&l.key).await), vec!["issued", "suspended"]);
    assert_refused(
        suspend(&mut s, &l.key, "another reason", &request_id).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    // A late retry after reinstatement creates nothing.
    reinstate(&mut s, &l.key, "paid").await.unwrap();
    suspend(&mut s, &l.key, "chargeback", &request_id)
        .await
        .unwrap();
    assert_eq!(
        types(&s.events(&l.key).await),
        vec!["issued", "suspended", "reinstated"]
    );
    assert_eq!(
        s.license(&l.key).await.status,
        pb::LicenseStatus::Active as i32
    );
    s.stop().await;
}

#[tokio::test]
async fn api_malformed_seats_are_refused_before_the_product_or_request_id_is_looked_up() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    // Unknown product and seats 0: the field error comes first.
    assert_bad_field(
        s.licenses.issue_license(license_req("ZZZZ", 0, 1)).await,
        "seats",
    );
    assert_bad_field(
        s.licenses.issue_renewal_code(code_req("ZZZZ", 0, 1)).await,
        "seats",
    );
    // A used request id with a malformed payload: the field error comes first.
    let req = license_req("ACME", 1, 1);
    s.issue(req.clone()).await;
    let mut bad = req.clone();
    bad.seats = 0;
    assert_bad_field(s.licenses.issue_license(bad).await, "seats");
    s.stop().await;
}
