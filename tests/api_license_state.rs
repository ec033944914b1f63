//! The API suite, administrative state (R11) and history: suspension,
//! reinstatement and revocation, their retries, that such a license cannot be
//! renewed, and the license's event history. Shared helpers:
//! tests/common/api.rs.

mod common;

use chrono::{Duration, Utc};
use common::api::{
    LATEST, ago, assert_redeem_refused_and_unchanged, deactivate, dt, license_from, plus_years,
    redeem, revoke, suspend, types, validity,
};
use common::{TestServer, assert_refused, code_req, license_req, rid};
use licensd::proto as pb;
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

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
