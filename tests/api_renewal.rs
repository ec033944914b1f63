//! The API suite, renewal: renewal codes (issue, read, void, retries) and
//! their redemption: how the expiry moves, exactly once, the grace month, and
//! every business-rule refusal, which changes nothing but the history, in
//! the order the rules check them. Shared helpers: tests/common/api.rs.

mod common;

use chrono::{DateTime, Datelike, Duration, Months, Utc};
use common::api::{
    LATEST, ago, assert_redeem_refused_and_unchanged, deactivate, dt, get_code, get_license,
    license_from, now_secs, plus_months, plus_years, pts, redeem, redeem_req, rfc3339, suspend,
    types, unknown_code, unknown_key, void_code, with_kind,
};
use common::{TestServer, assert_refused, code_req, error_info, license_req};
use licensd::proto as pb;
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

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
