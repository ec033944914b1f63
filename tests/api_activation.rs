//! The API suite, workstations: activation, deactivation and the seat limit
//! (also under concurrency), and Validate's answers (validity, figures,
//! update available). Shared helpers: tests/common/api.rs.

mod common;

use common::api::{
    LATEST, ago, deactivate, dt, get_code, license_from, plus_months, rfc3339, types, unknown_key,
    with_kind,
};
use common::{TestServer, assert_refused, code_req, error_info, license_req};
use licensd::proto as pb;
use tonic::Code;

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
