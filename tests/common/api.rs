//! Helpers of the black-box API suite (`tests/api_*.rs`): tests of the gRPC
//! API against docs/api.md and docs/rules.md — every RPC's happy path, every
//! refusal reason of docs/api.md (Errors) with its status code, ErrorInfo
//! reason and figures, idempotent retries, and that a refused operation
//! changes nothing.

use std::collections::HashMap;

use super::{TestServer, assert_refused, bad_fields, error_info, license_req};
use chrono::{DateTime, Duration, Months, SecondsFormat, Utc};
use licensd::proto as pb;
use prost_types::Timestamp;
use tonic::Code;

pub const LATEST: &str = "4.10.0";

pub fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("an RFC 3339 instant")
}

pub fn pts(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn dt(t: &Option<Timestamp>) -> DateTime<Utc> {
    let t = t.as_ref().expect("timestamp is set");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("timestamp in range")
}

pub fn plus_years(t: DateTime<Utc>, years: u32) -> DateTime<Utc> {
    t.checked_add_months(Months::new(12 * years)).unwrap()
}

pub fn plus_months(t: DateTime<Utc>, months: u32) -> DateTime<Utc> {
    t.checked_add_months(Months::new(months)).unwrap()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Now, in whole seconds.
pub fn now_secs() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

/// `years` calendar years and `days` days before now.
pub fn ago(years: u32, days: i64) -> Timestamp {
    pts(now_secs()
        .checked_sub_months(Months::new(12 * years))
        .unwrap()
        - Duration::days(days))
}

/// A BUSINESS license request starting at `starts_at`.
pub fn license_from(
    product: &str,
    seats: u32,
    term_years: u32,
    starts_at: Timestamp,
) -> pb::IssueLicenseRequest {
    let mut r = license_req(product, seats, term_years);
    r.starts_at = Some(starts_at);
    r
}

pub fn with_kind(mut r: pb::IssueLicenseRequest, kind: pb::LicenseKind) -> pb::IssueLicenseRequest {
    r.kind = kind as i32;
    r
}

pub fn personal_license(product: &str, seats: u32, term_years: u32) -> pb::IssueLicenseRequest {
    let mut r = license_req(product, seats, term_years);
    r.edition = pb::Edition::Personal as i32;
    r
}

/// A well-formed ACME key that was never issued.
pub fn unknown_key() -> String {
    licensd::domain::LicenseKey::generate(
        &licensd::domain::ProductCode::parse("ACME").unwrap(),
        licensd::domain::LicenseKind::Standard,
    )
    .to_string()
}

/// A well-formed renewal code that was never issued.
pub fn unknown_code() -> String {
    licensd::domain::RenewalCode::generate().expose_display()
}

pub fn redeem_req(key: &str, code: &str, fp: &str, version: &str) -> pb::RedeemRenewalCodeRequest {
    pb::RedeemRenewalCodeRequest {
        license_key: key.into(),
        renewal_code: code.into(),
        fingerprint: fp.into(),
        client_version: version.into(),
    }
}

pub async fn redeem(
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

pub async fn validity(s: &mut TestServer, key: &str) -> i32 {
    s.validate(key, "", "").await.expect("validate").validity
}

pub async fn deactivate(
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

pub async fn get_code(s: &mut TestServer, code: &str) -> Result<pb::RenewalCode, tonic::Status> {
    s.licenses
        .get_renewal_code(pb::GetRenewalCodeRequest {
            renewal_code: code.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn void_code(
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

pub async fn get_license(s: &mut TestServer, key: &str) -> Result<pb::License, tonic::Status> {
    s.licenses
        .get_license(pb::GetLicenseRequest {
            license_key: key.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn list_licenses(
    s: &mut TestServer,
    req: pb::ListLicensesRequest,
) -> Result<pb::ListLicensesResponse, tonic::Status> {
    s.licenses.list_licenses(req).await.map(|r| r.into_inner())
}

pub async fn listed_keys(s: &mut TestServer, req: pb::ListLicensesRequest) -> Vec<String> {
    let page = list_licenses(s, req).await.expect("list licenses");
    assert_eq!(page.next_page_token, "");
    page.licenses.into_iter().map(|l| l.key).collect()
}

pub async fn suspend(
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

pub async fn revoke(
    s: &mut TestServer,
    key: &str,
    reason: &str,
) -> Result<pb::License, tonic::Status> {
    s.licenses
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: key.into(),
            reason: reason.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

pub fn types(events: &[pb::LicenseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.r#type.as_str()).collect()
}

/// Asserts that `res` is INVALID_ARGUMENT / INVALID_FIELD with a BadRequest
/// naming exactly `field`.
#[track_caller]
pub fn assert_bad_field<T: std::fmt::Debug>(res: Result<T, tonic::Status>, field: &str) {
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
pub async fn assert_redeem_refused_and_unchanged(
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
