//! Unit tests of the decision functions, one or more per business rule
//! (docs/rules.md §1, R1–R11) plus the order of checks (docs/rules.md §4).
//! Every boundary is tested on both sides, to the second.

use super::*;
use crate::domain::keys::{LicenseKey, ParseError, RenewalCode};
use crate::domain::license::Activation;
use crate::domain::product::{ProductCode, ProductSpec};

// ---------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------

/// The expiry most tests use: the last day of a 31-day month, so that
/// "plus one calendar month" clamps to 28 February.
const EXPIRY: &str = "2025-01-31T12:00:00Z";
/// `EXPIRY` plus one calendar month.
const RENEWABLE_UNTIL: &str = "2025-02-28T12:00:00Z";
/// The workstation bound to every test license.
const FP: &str = "fp-workstation-1";
/// Seats of every test license and code.
const SEATS: u32 = 5;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn acme() -> ProductCode {
    ProductCode::parse("ACME").unwrap()
}

fn beta() -> ProductCode {
    ProductCode::parse("BETA").unwrap()
}

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

/// ACME with the default policy and no latest version.
fn product() -> Product {
    product_with(ProductSpec::default())
}

fn product_with(spec: ProductSpec) -> Product {
    Product::new(acme(), spec).unwrap()
}

fn product_latest(latest: &str) -> Product {
    product_with(ProductSpec {
        latest_version: latest.into(),
        ..Default::default()
    })
}

fn product_basis(basis: RenewalBasis) -> Product {
    product_with(ProductSpec {
        renewal_basis: Some(basis),
        ..Default::default()
    })
}

/// A license of `kind` for ACME BUSINESS, 5 seats, one of them used by `FP`,
/// expiring at `expires_at`, grace period 1 month.
fn license_of(kind: LicenseKind, expires_at: DateTime<Utc>) -> License {
    let starts_at = expires_at - Duration::days(365);
    License {
        key: LicenseKey::generate(&acme(), kind),
        product: acme(),
        edition: Edition::Business,
        kind,
        seats: SEATS,
        seats_used: 1,
        term_years: 1,
        status: LicenseStatus::Active,
        starts_at,
        expires_at,
        renewal_count: 0,
        order_ref: "ORD-1".into(),
        customer_ref: "CUST-1".into(),
        reseller: String::new(),
        created_at: starts_at,
        grace_period_months: 1,
        latest_version: None,
        offline_lease_days: 30,
        activations: vec![Activation {
            fingerprint: FP.into(),
            hostname: "ws-1".into(),
            activated_at: starts_at,
        }],
    }
}

/// A STANDARD license expiring at `expires_at`.
fn license(expires_at: DateTime<Utc>) -> License {
    license_of(LicenseKind::Standard, expires_at)
}

/// A STANDARD license expiring at `EXPIRY`.
fn std_license() -> License {
    license(at(EXPIRY))
}

fn with_status(mut l: License, status: LicenseStatus) -> License {
    l.status = status;
    l
}

/// An unredeemed 1-year code for ACME BUSINESS, 5 seats.
fn code() -> RenewalCodeRecord {
    RenewalCodeRecord {
        id: "rc_0001".into(),
        product: acme(),
        edition: Edition::Business,
        seats: SEATS,
        term_years: 1,
        state: CodeState::Unredeemed,
        issued_at: at("2025-01-01T00:00:00Z"),
        redeemed_at: None,
        redeemed_license_key: None,
        voided_at: None,
        void_reason: String::new(),
        order_ref: "ORD-2".into(),
        reseller: String::new(),
    }
}

fn code_term(term_years: u32) -> RenewalCodeRecord {
    RenewalCodeRecord {
        term_years,
        ..code()
    }
}

fn redeemed_code(redeemed_at: DateTime<Utc>) -> RenewalCodeRecord {
    RenewalCodeRecord {
        state: CodeState::Redeemed,
        redeemed_at: Some(redeemed_at),
        redeemed_license_key: Some(LicenseKey::generate(&acme(), LicenseKind::Standard)),
        ..code()
    }
}

fn void_code_record() -> RenewalCodeRecord {
    RenewalCodeRecord {
        state: CodeState::Void,
        voided_at: Some(at("2025-01-02T00:00:00Z")),
        void_reason: "refund".into(),
        ..code()
    }
}

/// Redeems from `FP` with client 4.10.0.
fn redeem_at(
    l: &License,
    c: &RenewalCodeRecord,
    p: &Product,
    now: DateTime<Utc>,
) -> Result<RenewalDecision, Refusal> {
    redeem(l, c, p, FP, &v("4.10.0"), now)
}

fn renewed(previous: &str, new: &str) -> Result<RenewalDecision, Refusal> {
    Ok(RenewalDecision {
        previous_expires_at: at(previous),
        new_expires_at: at(new),
    })
}

/// The field of an `InvalidField` refusal; panics on any other refusal.
fn invalid_field<T: std::fmt::Debug>(r: Result<T, Refusal>) -> String {
    match r {
        Err(Refusal::InvalidField(v)) => v.field,
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

fn plan(starts_at: &str, expires_at: &str) -> Result<IssuePlan, Refusal> {
    Ok(IssuePlan {
        starts_at: at(starts_at),
        expires_at: at(expires_at),
    })
}

const NOW: &str = "2025-03-10T09:00:00Z";

// ---------------------------------------------------------------------------
// R1 Terms
// ---------------------------------------------------------------------------

#[test]
fn r1_personal_three_year_term_is_refused() {
    assert_eq!(
        issue(&product(), Edition::Personal, 1, 3, None, at(NOW)),
        Err(Refusal::TermNotAllowed {
            term_years: 3,
            edition: Edition::Personal,
            allowed: vec![1, 2],
        })
    );
}

#[test]
fn r1_personal_one_and_two_year_terms_are_accepted() {
    assert_eq!(
        issue(&product(), Edition::Personal, 1, 1, None, at(NOW)),
        plan(NOW, "2026-03-10T09:00:00Z")
    );
    assert_eq!(
        issue(&product(), Edition::Personal, 1, 2, None, at(NOW)),
        plan(NOW, "2027-03-10T09:00:00Z")
    );
}

#[test]
fn r1_business_three_year_term_is_accepted() {
    assert_eq!(
        issue(&product(), Edition::Business, 10, 3, None, at(NOW)),
        plan(NOW, "2028-03-10T09:00:00Z")
    );
}

#[test]
fn r1_zero_and_four_year_terms_are_refused_for_both_editions() {
    for (edition, allowed) in [
        (Edition::Personal, vec![1, 2]),
        (Edition::Business, vec![1, 2, 3]),
    ] {
        for term_years in [0, 4] {
            assert_eq!(
                issue(&product(), edition, 1, term_years, None, at(NOW)),
                Err(Refusal::TermNotAllowed {
                    term_years,
                    edition,
                    allowed: allowed.clone(),
                }),
                "{edition} {term_years}"
            );
        }
    }
}

#[test]
fn r1_term_not_allowed_is_an_invalid_argument_naming_term_years() {
    let err = issue(&product(), Edition::Personal, 1, 3, None, at(NOW)).unwrap_err();
    assert_eq!(err.reason(), "TERM_NOT_ALLOWED");
    assert_eq!(
        err.class(),
        crate::domain::error::RefusalClass::InvalidArgument
    );
    assert_eq!(err.field_violation().unwrap().field, "term_years");
    assert!(
        err.metadata()
            .contains(&("allowed_terms_years", "1,2".to_string()))
    );
}

#[test]
fn r1_a_product_restricting_its_terms_refuses_the_others() {
    let p = product_with(ProductSpec {
        business_terms: vec![1],
        ..Default::default()
    });
    assert_eq!(
        issue(&p, Edition::Business, 1, 2, None, at(NOW)),
        Err(Refusal::TermNotAllowed {
            term_years: 2,
            edition: Edition::Business,
            allowed: vec![1],
        })
    );
    assert_eq!(
        issue(&p, Edition::Business, 1, 1, None, at(NOW)),
        plan(NOW, "2026-03-10T09:00:00Z")
    );
}

#[test]
fn r1_a_license_issued_on_a_leap_day_for_one_year_expires_on_28_february() {
    let now = at("2024-02-29T10:15:30Z");
    assert_eq!(
        issue(&product(), Edition::Personal, 1, 1, None, now),
        plan("2024-02-29T10:15:30Z", "2025-02-28T10:15:30Z")
    );
}

#[test]
fn r1_a_leap_day_start_for_two_years_expires_on_28_february_not_1_march() {
    assert_eq!(
        issue(
            &product(),
            Edition::Business,
            1,
            2,
            Some(at("2024-02-29T23:59:59Z")),
            at(NOW)
        ),
        plan("2024-02-29T23:59:59Z", "2026-02-28T23:59:59Z")
    );
}

#[test]
fn r1_terms_are_calendar_years_across_a_leap_day() {
    // 2023-03-01 + 1 year is 366 days later, not 365.
    let p = issue(
        &product(),
        Edition::Personal,
        1,
        1,
        Some(at("2023-03-01T00:00:00Z")),
        at(NOW),
    )
    .unwrap();
    assert_eq!(p.expires_at, at("2024-03-01T00:00:00Z"));
    assert_eq!((p.expires_at - p.starts_at).num_days(), 366);
}

#[test]
fn r1_starts_at_in_the_past_is_allowed() {
    assert_eq!(
        issue(
            &product(),
            Edition::Business,
            3,
            2,
            Some(at("2020-06-15T08:00:00Z")),
            at(NOW)
        ),
        plan("2020-06-15T08:00:00Z", "2022-06-15T08:00:00Z")
    );
}

#[test]
fn r1_starts_at_defaults_to_now() {
    let now = at("2025-07-04T17:30:45Z");
    assert_eq!(
        issue(&product(), Edition::Business, 1, 1, None, now),
        plan("2025-07-04T17:30:45Z", "2026-07-04T17:30:45Z")
    );
}

#[test]
fn r1_starts_at_far_in_the_future_is_refused() {
    let now = at(NOW);
    assert_eq!(
        invalid_field(issue(
            &product(),
            Edition::Business,
            1,
            1,
            Some(now + Duration::days(30)),
            now
        )),
        "starts_at"
    );
}

#[test]
fn r1_starts_at_within_the_clock_skew_is_accepted_and_one_second_beyond_refused() {
    let now = at(NOW);
    let edge = now + MAX_START_SKEW;
    assert_eq!(
        issue(&product(), Edition::Business, 1, 1, Some(edge), now),
        plan("2025-03-10T09:05:00Z", "2026-03-10T09:05:00Z")
    );
    assert_eq!(
        invalid_field(issue(
            &product(),
            Edition::Business,
            1,
            1,
            Some(edge + secs(1)),
            now
        )),
        "starts_at"
    );
}

#[test]
fn r1_zero_seats_are_refused() {
    assert_eq!(
        invalid_field(issue(&product(), Edition::Business, 0, 1, None, at(NOW))),
        "seats"
    );
}

#[test]
fn r1_seats_up_to_the_maximum_are_accepted_and_one_more_refused() {
    assert!(issue(&product(), Edition::Business, MAX_SEATS, 1, None, at(NOW)).is_ok());
    assert!(issue(&product(), Edition::Business, 1, 1, None, at(NOW)).is_ok());
    assert_eq!(
        invalid_field(issue(
            &product(),
            Edition::Business,
            MAX_SEATS + 1,
            1,
            None,
            at(NOW)
        )),
        "seats"
    );
}

#[test]
fn r1_issue_code_checks_term_per_edition_and_seats() {
    assert_eq!(issue_code(&product(), Edition::Business, 5, 3), Ok(()));
    assert_eq!(issue_code(&product(), Edition::Personal, 1, 2), Ok(()));
    assert_eq!(
        issue_code(&product(), Edition::Personal, 1, 3),
        Err(Refusal::TermNotAllowed {
            term_years: 3,
            edition: Edition::Personal,
            allowed: vec![1, 2],
        })
    );
    assert_eq!(
        issue_code(&product(), Edition::Business, 1, 0),
        Err(Refusal::TermNotAllowed {
            term_years: 0,
            edition: Edition::Business,
            allowed: vec![1, 2, 3],
        })
    );
    assert_eq!(
        invalid_field(issue_code(&product(), Edition::Business, 0, 1)),
        "seats"
    );
}

// ---------------------------------------------------------------------------
// R2 Expiry
// ---------------------------------------------------------------------------

#[test]
fn r2_license_is_valid_one_second_before_expires_at() {
    let l = std_license();
    assert_eq!(l.validity_at(at(EXPIRY) - secs(1)), Validity::Valid);
}

#[test]
fn r2_license_is_expired_renewable_exactly_at_expires_at() {
    let l = std_license();
    assert_eq!(l.validity_at(at(EXPIRY)), Validity::ExpiredRenewable);
}

#[test]
fn r2_validate_reports_valid_before_and_expired_renewable_at_expiry_for_a_bound_fingerprint() {
    let l = std_license();
    let before = validate_license(&l, Some(FP), None, None, at(EXPIRY) - secs(1));
    assert_eq!(before.validity, Validity::Valid);
    let at_expiry = validate_license(&l, Some(FP), None, None, at(EXPIRY));
    assert_eq!(at_expiry.validity, Validity::ExpiredRenewable);
}

#[test]
fn r2_activate_is_refused_with_license_expired_exactly_at_expires_at() {
    let l = std_license();
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY)),
        Err(Refusal::LicenseExpired {
            expires_at: at(EXPIRY)
        })
    );
}

#[test]
fn r2_activate_is_accepted_one_second_before_expires_at() {
    let l = std_license();
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY) - secs(1)),
        Ok(ActivateDecision::TakeSeat)
    );
}

#[test]
fn r2_activate_is_refused_long_after_expiry() {
    let l = std_license();
    assert_eq!(
        activate(&l, "fp-new", at("2026-01-01T00:00:00Z")),
        Err(Refusal::LicenseExpired {
            expires_at: at(EXPIRY)
        })
    );
}

#[test]
fn r2_license_expired_carries_expires_at_in_metadata() {
    let err = activate(&std_license(), "fp-new", at(EXPIRY)).unwrap_err();
    assert_eq!(err.reason(), "LICENSE_EXPIRED");
    assert_eq!(
        err.metadata(),
        vec![("expires_at", "2025-01-31T12:00:00Z".to_string())]
    );
}

// ---------------------------------------------------------------------------
// R3 Renewal window
// ---------------------------------------------------------------------------

#[test]
fn r3_renewable_until_is_expiry_plus_one_calendar_month_clamped_to_28_february() {
    assert_eq!(std_license().renewable_until(), Some(at(RENEWABLE_UNTIL)));
}

#[test]
fn r3_renewal_is_accepted_while_the_license_is_still_valid() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &code(),
            &product(),
            at("2024-12-01T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r3_renewal_is_accepted_exactly_at_renewable_until() {
    assert_eq!(
        redeem_at(&std_license(), &code(), &product(), at(RENEWABLE_UNTIL)),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r3_renewal_is_refused_one_second_after_the_grace_month() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &code(),
            &product(),
            at(RENEWABLE_UNTIL) + secs(1)
        ),
        Err(Refusal::RenewalWindowClosed {
            renewable_until: at(RENEWABLE_UNTIL)
        })
    );
}

#[test]
fn r3_window_closed_carries_renewable_until_in_metadata() {
    let err = redeem_at(
        &std_license(),
        &code(),
        &product(),
        at(RENEWABLE_UNTIL) + secs(1),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "RENEWAL_WINDOW_CLOSED");
    assert_eq!(
        err.metadata(),
        vec![("renewable_until", "2025-02-28T12:00:00Z".to_string())]
    );
}

#[test]
fn r3_validity_is_expired_renewable_at_renewable_until_and_expired_one_second_after() {
    let l = std_license();
    assert_eq!(
        l.validity_at(at(RENEWABLE_UNTIL)),
        Validity::ExpiredRenewable
    );
    assert_eq!(
        l.validity_at(at(RENEWABLE_UNTIL) + secs(1)),
        Validity::Expired
    );
}

#[test]
fn r3_a_product_grace_period_of_three_months_is_respected() {
    let p = product_with(ProductSpec {
        grace_period_months: Some(3),
        ..Default::default()
    });
    assert_eq!(p.grace_period_months(), 3);
    let mut l = std_license();
    l.grace_period_months = p.grace_period_months();
    let until = at("2025-04-30T12:00:00Z");
    assert_eq!(l.renewable_until(), Some(until));
    // Past the default one-month window, still inside three months.
    assert_eq!(
        l.validity_at(at(RENEWABLE_UNTIL) + secs(1)),
        Validity::ExpiredRenewable
    );
    assert_eq!(
        redeem_at(&l, &code(), &p, at(RENEWABLE_UNTIL) + secs(1)),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
    assert_eq!(
        redeem_at(&l, &code(), &p, until),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
    assert_eq!(l.validity_at(until), Validity::ExpiredRenewable);
    assert_eq!(
        redeem_at(&l, &code(), &p, until + secs(1)),
        Err(Refusal::RenewalWindowClosed {
            renewable_until: until
        })
    );
    assert_eq!(l.validity_at(until + secs(1)), Validity::Expired);
}

#[test]
fn r3_a_grace_period_of_zero_months_allows_renewal_only_up_to_expires_at() {
    let p = product_with(ProductSpec {
        grace_period_months: Some(0),
        ..Default::default()
    });
    let mut l = std_license();
    l.grace_period_months = 0;
    assert_eq!(l.renewable_until(), Some(at(EXPIRY)));
    assert_eq!(l.validity_at(at(EXPIRY)), Validity::ExpiredRenewable);
    assert_eq!(l.validity_at(at(EXPIRY) + secs(1)), Validity::Expired);
    assert_eq!(
        redeem_at(&l, &code(), &p, at(EXPIRY)),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
    assert_eq!(
        redeem_at(&l, &code(), &p, at(EXPIRY) + secs(1)),
        Err(Refusal::RenewalWindowClosed {
            renewable_until: at(EXPIRY)
        })
    );
}

#[test]
fn r3_validate_reports_expired_renewable_and_expired_around_the_window_end() {
    let l = std_license();
    assert_eq!(
        validate_license(&l, None, None, None, at(RENEWABLE_UNTIL)).validity,
        Validity::ExpiredRenewable
    );
    assert_eq!(
        validate_license(&l, None, None, None, at(RENEWABLE_UNTIL) + secs(1)).validity,
        Validity::Expired
    );
}

// ---------------------------------------------------------------------------
// R4 Renewal code
// ---------------------------------------------------------------------------

#[test]
fn r4_from_expiry_moves_a_valid_license_by_the_term() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &code(),
            &product(),
            at("2025-01-15T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r4_from_expiry_adds_a_three_year_code_term() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &code_term(3),
            &product(),
            at("2025-01-15T00:00:00Z")
        ),
        renewed(EXPIRY, "2028-01-31T12:00:00Z")
    );
}

#[test]
fn r4_from_expiry_also_applies_when_lapsed_inside_the_grace_period() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &code(),
            &product(),
            at("2025-02-20T08:30:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r4_from_expiry_is_the_explicit_basis_too() {
    let p = product_basis(RenewalBasis::FromExpiry);
    assert_eq!(
        redeem_at(&std_license(), &code(), &p, at("2025-02-20T08:30:00Z")),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r4_renewing_a_license_expiring_on_a_leap_day_uses_calendar_years() {
    let l = license(at("2024-02-29T10:00:00Z"));
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2024-02-01T00:00:00Z")),
        renewed("2024-02-29T10:00:00Z", "2025-02-28T10:00:00Z")
    );
}

#[test]
fn r4_from_now_if_expired_restarts_a_lapsed_license_from_now() {
    let p = product_basis(RenewalBasis::FromNowIfExpired);
    assert_eq!(
        redeem_at(&std_license(), &code(), &p, at("2025-02-10T08:30:15Z")),
        renewed(EXPIRY, "2026-02-10T08:30:15Z")
    );
}

#[test]
fn r4_from_now_if_expired_extends_a_still_valid_license_from_its_expiry() {
    let p = product_basis(RenewalBasis::FromNowIfExpired);
    assert_eq!(
        redeem_at(&std_license(), &code(), &p, at(EXPIRY) - secs(1)),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
    assert_eq!(
        redeem_at(&std_license(), &code(), &p, at("2024-11-05T00:00:00Z")),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r4_from_now_if_expired_at_the_window_end_restarts_from_that_instant() {
    let p = product_basis(RenewalBasis::FromNowIfExpired);
    assert_eq!(
        redeem_at(&std_license(), &code(), &p, at(RENEWABLE_UNTIL)),
        renewed(EXPIRY, "2026-02-28T12:00:00Z")
    );
}

#[test]
fn r4_two_early_renewals_stack() {
    let p = product();
    let mut l = std_license();
    let first = redeem_at(&l, &code(), &p, at("2025-01-10T00:00:00Z")).unwrap();
    assert_eq!(first.previous_expires_at, at(EXPIRY));
    assert_eq!(first.new_expires_at, at("2026-01-31T12:00:00Z"));
    l.expires_at = first.new_expires_at;
    l.renewal_count += 1;

    let second_code = RenewalCodeRecord {
        id: "rc_0002".into(),
        ..code_term(2)
    };
    let second = redeem_at(&l, &second_code, &p, at("2025-01-11T00:00:00Z")).unwrap();
    assert_eq!(
        second,
        RenewalDecision {
            previous_expires_at: at("2026-01-31T12:00:00Z"),
            new_expires_at: at("2028-01-31T12:00:00Z"),
        }
    );
    // After stacking, the license is valid right up to the new expiry.
    l.expires_at = second.new_expires_at;
    assert_eq!(
        l.validity_at(at("2028-01-31T12:00:00Z") - secs(1)),
        Validity::Valid
    );
    assert_eq!(
        l.renewable_until(),
        Some(at("2028-02-29T12:00:00Z")),
        "2028 is a leap year"
    );
}

#[test]
fn r4_two_early_renewals_stack_from_expiry_also_with_from_now_if_expired() {
    let p = product_basis(RenewalBasis::FromNowIfExpired);
    let mut l = std_license();
    let first = redeem_at(&l, &code(), &p, at("2025-01-10T00:00:00Z")).unwrap();
    l.expires_at = first.new_expires_at;
    let second = redeem_at(&l, &code(), &p, at("2025-01-10T00:05:00Z")).unwrap();
    assert_eq!(second.new_expires_at, at("2027-01-31T12:00:00Z"));
}

#[test]
fn r4_a_redeemed_code_is_refused() {
    let redeemed_at = at("2025-01-05T10:00:00Z");
    assert_eq!(
        redeem_at(
            &std_license(),
            &redeemed_code(redeemed_at),
            &product(),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::RenewalCodeAlreadyRedeemed {
            redeemed_at: Some(redeemed_at)
        })
    );
}

#[test]
fn r4_a_void_code_is_refused() {
    assert_eq!(
        redeem_at(
            &std_license(),
            &void_code_record(),
            &product(),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::RenewalCodeVoid)
    );
}

#[test]
fn r4_a_renewal_keeps_the_previous_expiry_for_the_history() {
    let d = redeem_at(
        &std_license(),
        &code(),
        &product(),
        at("2025-02-01T00:00:00Z"),
    )
    .unwrap();
    assert_eq!(d.previous_expires_at, at(EXPIRY));
    assert!(d.new_expires_at > d.previous_expires_at);
}

// ---------------------------------------------------------------------------
// R5 Where it is entered
// ---------------------------------------------------------------------------

#[test]
fn r5_a_fingerprint_that_is_not_activated_is_refused() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product(),
            "fp-elsewhere",
            &v("4.10.0"),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::MachineNotActivated)
    );
}

#[test]
fn r5_a_license_without_activations_cannot_be_renewed() {
    let mut l = std_license();
    l.activations.clear();
    l.seats_used = 0;
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::MachineNotActivated)
    );
}

#[test]
fn r5_an_activated_fingerprint_is_accepted() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product(),
            FP,
            &v("1.0"),
            at("2025-01-10T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

// ---------------------------------------------------------------------------
// R6 Current version
// ---------------------------------------------------------------------------

#[test]
fn r6_client_4_9_2_with_latest_4_10_0_is_outdated() {
    let err = redeem(
        &std_license(),
        &code(),
        &product_latest("4.10.0"),
        FP,
        &v("4.9.2"),
        at("2025-01-10T00:00:00Z"),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Refusal::ClientVersionOutdated {
            client_version: "4.9.2".into(),
            latest_version: "4.10.0".into(),
        }
    );
    assert_eq!(
        err.metadata(),
        vec![
            ("client_version", "4.9.2".to_string()),
            ("latest_version", "4.10.0".to_string()),
        ]
    );
}

#[test]
fn r6_client_at_the_latest_version_is_accepted() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product_latest("4.10.0"),
            FP,
            &v("4.10.0"),
            at("2025-01-10T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r6_client_newer_than_the_latest_version_is_accepted() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product_latest("4.10.0"),
            FP,
            &v("4.10.1"),
            at("2025-01-10T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r6_client_4_10_equals_latest_4_10_0_and_is_accepted() {
    assert!(
        redeem(
            &std_license(),
            &code(),
            &product_latest("4.10.0"),
            FP,
            &v("4.10"),
            at("2025-01-10T00:00:00Z")
        )
        .is_ok()
    );
}

#[test]
fn r6_client_4_9_99_is_outdated_against_4_10() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product_latest("4.10"),
            FP,
            &v("4.9.99"),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::ClientVersionOutdated {
            client_version: "4.9.99".into(),
            latest_version: "4.10".into(),
        })
    );
}

#[test]
fn r6_a_product_without_latest_version_accepts_any_client_version() {
    for client in ["0.0.1", "1", "4.9.2", "99.0.0"] {
        assert_eq!(
            redeem(
                &std_license(),
                &code(),
                &product(),
                FP,
                &v(client),
                at("2025-01-10T00:00:00Z")
            ),
            renewed(EXPIRY, "2026-01-31T12:00:00Z"),
            "{client}"
        );
    }
}

#[test]
fn r6_validate_reports_update_available_only_for_an_older_client() {
    let l = std_license();
    let now = at("2025-01-10T00:00:00Z");
    let latest = v("4.10.0");
    let ans = |client: Option<&str>, latest: Option<&Version>| {
        let c = client.map(v);
        validate_license(&l, Some(FP), c.as_ref(), latest, now)
    };
    assert_eq!(
        ans(Some("4.9.2"), Some(&latest)),
        ValidateAnswer {
            validity: Validity::Valid,
            update_available: true
        }
    );
    assert!(!ans(Some("4.10.0"), Some(&latest)).update_available);
    assert!(!ans(Some("4.10.1"), Some(&latest)).update_available);
    assert!(!ans(None, Some(&latest)).update_available);
    assert!(!ans(Some("4.9.2"), None).update_available);
}

#[test]
fn r6_an_outdated_client_does_not_change_validity() {
    let l = std_license();
    let ans = validate_license(
        &l,
        Some(FP),
        Some(&v("1.0")),
        Some(&v("4.10.0")),
        at(EXPIRY),
    );
    assert_eq!(
        ans,
        ValidateAnswer {
            validity: Validity::ExpiredRenewable,
            update_available: true
        }
    );
}

// ---------------------------------------------------------------------------
// R7 Seat count
// ---------------------------------------------------------------------------

#[test]
fn r7_a_code_with_equal_seats_is_accepted() {
    assert_eq!(code().seats, std_license().seats);
    assert_eq!(
        redeem_at(
            &std_license(),
            &code(),
            &product(),
            at("2025-01-10T00:00:00Z")
        ),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn r7_a_code_with_more_seats_is_refused() {
    let c = RenewalCodeRecord { seats: 6, ..code() };
    let err = redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")).unwrap_err();
    assert_eq!(
        err,
        Refusal::SeatCountMismatch {
            license_seats: 5,
            code_seats: 6
        }
    );
    assert_eq!(
        err.metadata(),
        vec![
            ("license_seats", "5".to_string()),
            ("code_seats", "6".to_string())
        ]
    );
}

#[test]
fn r7_a_code_with_fewer_seats_is_refused() {
    let c = RenewalCodeRecord { seats: 1, ..code() };
    assert_eq!(
        redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::SeatCountMismatch {
            license_seats: 5,
            code_seats: 1
        })
    );
}

#[test]
fn r7_activation_is_refused_when_every_seat_is_used() {
    let mut l = std_license();
    l.seats_used = l.seats;
    assert_eq!(
        activate(&l, "fp-new", at("2025-01-10T00:00:00Z")),
        Err(Refusal::SeatLimitReached { seats: 5 })
    );
}

#[test]
fn r7_activation_takes_the_last_free_seat() {
    let mut l = std_license();
    l.seats_used = l.seats - 1;
    assert_eq!(
        activate(&l, "fp-new", at("2025-01-10T00:00:00Z")),
        Ok(ActivateDecision::TakeSeat)
    );
}

#[test]
fn r7_a_single_seat_license_takes_one_workstation_and_refuses_a_second() {
    let mut l = std_license();
    l.seats = 1;
    l.seats_used = 0;
    l.activations.clear();
    assert_eq!(
        activate(&l, FP, at("2025-01-10T00:00:00Z")),
        Ok(ActivateDecision::TakeSeat)
    );
    l.seats_used = 1;
    l.activations.push(Activation {
        fingerprint: FP.into(),
        hostname: "ws-1".into(),
        activated_at: at("2025-01-10T00:00:00Z"),
    });
    assert_eq!(
        activate(&l, "fp-second", at("2025-01-10T00:00:01Z")),
        Err(Refusal::SeatLimitReached { seats: 1 })
    );
}

#[test]
fn r7_an_already_bound_fingerprint_on_a_full_license_is_already_activated() {
    let mut l = std_license();
    l.seats_used = l.seats;
    assert_eq!(
        activate(&l, FP, at("2025-01-10T00:00:00Z")),
        Ok(ActivateDecision::AlreadyActivated)
    );
}

#[test]
fn r7_deactivate_frees_a_bound_seat_and_refuses_an_unknown_fingerprint() {
    let l = std_license();
    assert_eq!(deactivate(&l, FP), Ok(()));
    assert_eq!(
        deactivate(&l, "fp-unknown"),
        Err(Refusal::MachineNotActivated)
    );
}

#[test]
fn r7_deactivate_is_allowed_on_an_expired_suspended_or_revoked_license() {
    for status in [LicenseStatus::Suspended, LicenseStatus::Revoked] {
        assert_eq!(deactivate(&with_status(std_license(), status), FP), Ok(()));
    }
    // Expiry plays no role in deactivate (it takes no instant at all).
    assert_eq!(deactivate(&license(at("2000-01-01T00:00:00Z")), FP), Ok(()));
}

// ---------------------------------------------------------------------------
// R8 Not an activation key
// ---------------------------------------------------------------------------

#[test]
fn r8_a_renewal_code_text_is_refused_as_a_license_key() {
    let rc = RenewalCode::generate();
    for text in [
        rc.expose_display(),
        rc.expose_normalized().to_string(),
        rc.expose_display().to_lowercase(),
        rc.expose_display().replace('-', " "),
    ] {
        assert_eq!(LicenseKey::parse(&text), Err(ParseError::IsRenewalCode));
    }
}

#[test]
fn r8_a_license_key_is_not_a_renewal_code() {
    let l = std_license();
    assert_eq!(
        RenewalCode::parse(&l.key.to_string()),
        Err(ParseError::MalformedCode)
    );
    assert_eq!(LicenseKey::parse(&l.key.to_string()), Ok(l.key.clone()));
}

#[test]
fn r8_the_refusal_has_its_own_reason() {
    let r = Refusal::RenewalCodeIsNotALicenseKey {
        field: "license_key",
    };
    assert_eq!(r.reason(), "RENEWAL_CODE_IS_NOT_A_LICENSE_KEY");
    assert_eq!(
        r.class(),
        crate::domain::error::RefusalClass::FailedPrecondition
    );
}

// ---------------------------------------------------------------------------
// R9 Promo and partner licenses
// ---------------------------------------------------------------------------

#[test]
fn r9_a_promo_license_is_not_renewable() {
    let l = license_of(LicenseKind::Promo, at(EXPIRY));
    assert!(l.key.to_string().contains("PRO"));
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseKindNotRenewable {
            kind: LicenseKind::Promo
        })
    );
}

#[test]
fn r9_an_nfr_license_is_not_renewable() {
    let l = license_of(LicenseKind::Nfr, at(EXPIRY));
    assert!(l.key.to_string().contains("NFR"));
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseKindNotRenewable {
            kind: LicenseKind::Nfr
        })
    );
}

#[test]
fn r9_promo_and_nfr_are_not_renewable_even_after_expiry() {
    for kind in [LicenseKind::Promo, LicenseKind::Nfr] {
        let l = license_of(kind, at(EXPIRY));
        assert_eq!(
            redeem_at(&l, &code(), &product(), at(EXPIRY)),
            Err(Refusal::LicenseKindNotRenewable { kind })
        );
    }
}

#[test]
fn r9_promo_and_nfr_are_expired_not_expired_renewable_right_at_expires_at() {
    for kind in [LicenseKind::Promo, LicenseKind::Nfr] {
        let l = license_of(kind, at(EXPIRY));
        assert_eq!(
            l.validity_at(at(EXPIRY) - secs(1)),
            Validity::Valid,
            "{kind}"
        );
        assert_eq!(l.validity_at(at(EXPIRY)), Validity::Expired, "{kind}");
        assert_eq!(
            validate_license(&l, Some(FP), None, None, at(EXPIRY)).validity,
            Validity::Expired,
            "{kind}"
        );
    }
}

#[test]
fn r9_promo_and_nfr_have_no_renewable_until() {
    for kind in [LicenseKind::Promo, LicenseKind::Nfr] {
        let l = license_of(kind, at(EXPIRY));
        assert!(!l.is_renewable_kind());
        assert_eq!(l.renewable_until(), None, "{kind}");
    }
    assert!(std_license().is_renewable_kind());
    assert_eq!(std_license().renewable_until(), Some(at(RENEWABLE_UNTIL)));
}

#[test]
fn r9_promo_can_still_be_activated_while_valid() {
    let l = license_of(LicenseKind::Promo, at(EXPIRY));
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY) - secs(1)),
        Ok(ActivateDecision::TakeSeat)
    );
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY)),
        Err(Refusal::LicenseExpired {
            expires_at: at(EXPIRY)
        })
    );
}

// ---------------------------------------------------------------------------
// R10 Matching product
// ---------------------------------------------------------------------------

#[test]
fn r10_a_code_for_another_product_is_refused() {
    let c = RenewalCodeRecord {
        product: beta(),
        ..code()
    };
    let err = redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")).unwrap_err();
    assert_eq!(
        err,
        Refusal::ProductMismatch {
            license_product: "ACME".into(),
            code_product: "BETA".into(),
        }
    );
    assert_eq!(err.reason(), "PRODUCT_MISMATCH");
}

#[test]
fn r10_a_code_for_another_edition_is_refused() {
    let c = RenewalCodeRecord {
        edition: Edition::Personal,
        ..code()
    };
    assert_eq!(
        redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::EditionMismatch {
            license_edition: Edition::Business,
            code_edition: Edition::Personal,
        })
    );
}

#[test]
fn r10_a_business_code_does_not_renew_a_personal_license() {
    let mut l = std_license();
    l.edition = Edition::Personal;
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::EditionMismatch {
            license_edition: Edition::Personal,
            code_edition: Edition::Business,
        })
    );
}

// ---------------------------------------------------------------------------
// R11 Administrative state
// ---------------------------------------------------------------------------

#[test]
fn r11_a_suspended_license_is_suspended_even_when_not_expired() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    let now = at("2025-01-10T00:00:00Z");
    assert_eq!(l.validity_at(now), Validity::Suspended);
    assert_eq!(
        validate_license(&l, Some(FP), None, None, now).validity,
        Validity::Suspended
    );
}

#[test]
fn r11_suspended_takes_precedence_over_expiry_and_the_window() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(l.validity_at(at(EXPIRY)), Validity::Suspended);
    assert_eq!(
        l.validity_at(at(RENEWABLE_UNTIL) + secs(1)),
        Validity::Suspended
    );
}

#[test]
fn r11_a_suspended_license_cannot_be_activated() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(
        activate(&l, "fp-new", at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseSuspended)
    );
    // Not even re-confirmed for an already bound workstation.
    assert_eq!(
        activate(&l, FP, at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseSuspended)
    );
}

#[test]
fn r11_a_suspended_license_cannot_be_renewed() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseSuspended)
    );
}

#[test]
fn r11_a_revoked_license_is_revoked_whatever_the_clock() {
    let l = with_status(std_license(), LicenseStatus::Revoked);
    for now in [
        at("2025-01-10T00:00:00Z"),
        at(EXPIRY),
        at(RENEWABLE_UNTIL) + secs(1),
    ] {
        assert_eq!(l.validity_at(now), Validity::Revoked, "{now}");
    }
}

#[test]
fn r11_a_revoked_license_cannot_be_activated_or_renewed() {
    let l = with_status(std_license(), LicenseStatus::Revoked);
    let now = at("2025-01-10T00:00:00Z");
    assert_eq!(activate(&l, "fp-new", now), Err(Refusal::LicenseRevoked));
    assert_eq!(activate(&l, FP, now), Err(Refusal::LicenseRevoked));
    assert_eq!(
        redeem_at(&l, &code(), &product(), now),
        Err(Refusal::LicenseRevoked)
    );
}

#[test]
fn r11_a_reinstated_license_is_valid_again() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    let status = change_status(&l, StatusAction::Reinstate).unwrap().unwrap();
    let l = with_status(l, status);
    let now = at("2025-01-10T00:00:00Z");
    assert_eq!(l.validity_at(now), Validity::Valid);
    assert_eq!(activate(&l, "fp-new", now), Ok(ActivateDecision::TakeSeat));
}

#[test]
fn r11_suspend_an_active_license() {
    let l = std_license();
    assert_eq!(
        change_status(&l, StatusAction::Suspend),
        Ok(Some(LicenseStatus::Suspended))
    );
}

#[test]
fn r11_suspend_twice_changes_nothing() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(change_status(&l, StatusAction::Suspend), Ok(None));
}

#[test]
fn r11_reinstate_a_suspended_license() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(
        change_status(&l, StatusAction::Reinstate),
        Ok(Some(LicenseStatus::Active))
    );
}

#[test]
fn r11_reinstate_an_active_license_changes_nothing() {
    assert_eq!(
        change_status(&std_license(), StatusAction::Reinstate),
        Ok(None)
    );
}

#[test]
fn r11_revoke_an_active_or_suspended_license() {
    for status in [LicenseStatus::Active, LicenseStatus::Suspended] {
        assert_eq!(
            change_status(&with_status(std_license(), status), StatusAction::Revoke),
            Ok(Some(LicenseStatus::Revoked)),
            "{status}"
        );
    }
}

#[test]
fn r11_revoke_twice_changes_nothing() {
    let l = with_status(std_license(), LicenseStatus::Revoked);
    assert_eq!(change_status(&l, StatusAction::Revoke), Ok(None));
}

#[test]
fn r11_revoke_is_final_reinstate_and_suspend_are_refused() {
    let l = with_status(std_license(), LicenseStatus::Revoked);
    assert_eq!(
        change_status(&l, StatusAction::Reinstate),
        Err(Refusal::LicenseRevoked)
    );
    assert_eq!(
        change_status(&l, StatusAction::Suspend),
        Err(Refusal::LicenseRevoked)
    );
}

#[test]
fn r11_status_actions_record_their_history_event() {
    assert_eq!(StatusAction::Suspend.event_type(), "suspended");
    assert_eq!(StatusAction::Reinstate.event_type(), "reinstated");
    assert_eq!(StatusAction::Revoke.event_type(), "revoked");
}

#[test]
fn r11_void_code_voids_an_unredeemed_code() {
    assert_eq!(void_code(&code()), Ok(true));
}

#[test]
fn r11_void_code_twice_changes_nothing() {
    assert_eq!(void_code(&void_code_record()), Ok(false));
}

#[test]
fn r11_void_code_refuses_a_redeemed_code() {
    let t = at("2025-01-05T10:00:00Z");
    assert_eq!(
        void_code(&redeemed_code(t)),
        Err(Refusal::RenewalCodeAlreadyRedeemed {
            redeemed_at: Some(t)
        })
    );
}

// ---------------------------------------------------------------------------
// Validate
// ---------------------------------------------------------------------------

/// Validate as the store answers it: the license's standing and whether the
/// fingerprint (if any) is bound.
fn validate_license(
    l: &License,
    fingerprint: Option<&str>,
    client_version: Option<&Version>,
    latest_version: Option<&Version>,
    now: DateTime<Utc>,
) -> ValidateAnswer {
    validate(
        &l.standing(),
        fingerprint.map(|f| l.is_activated(f)),
        client_version,
        latest_version,
        now,
    )
}

#[test]
fn validate_an_unbound_fingerprint_on_a_valid_license_is_not_activated() {
    let l = std_license();
    assert_eq!(
        validate_license(
            &l,
            Some("fp-elsewhere"),
            None,
            None,
            at("2025-01-10T00:00:00Z")
        ),
        ValidateAnswer {
            validity: Validity::NotActivated,
            update_available: false
        }
    );
}

#[test]
fn validate_a_bound_fingerprint_on_a_valid_license_is_valid() {
    assert_eq!(
        validate_license(
            &std_license(),
            Some(FP),
            None,
            None,
            at("2025-01-10T00:00:00Z")
        ),
        ValidateAnswer {
            validity: Validity::Valid,
            update_available: false
        }
    );
}

#[test]
fn validate_without_fingerprint_reports_the_license_validity() {
    assert_eq!(
        validate_license(&std_license(), None, None, None, at(EXPIRY) - secs(1)).validity,
        Validity::Valid
    );
}

#[test]
fn validate_suspended_and_revoked_take_precedence_over_not_activated() {
    let now = at("2025-01-10T00:00:00Z");
    assert_eq!(
        validate_license(
            &with_status(std_license(), LicenseStatus::Suspended),
            Some("fp-elsewhere"),
            None,
            None,
            now
        )
        .validity,
        Validity::Suspended
    );
    assert_eq!(
        validate_license(
            &with_status(std_license(), LicenseStatus::Revoked),
            Some("fp-elsewhere"),
            None,
            None,
            now
        )
        .validity,
        Validity::Revoked
    );
}

// ---------------------------------------------------------------------------
// Order of checks (docs/rules.md §4): the first failing check is reported
// ---------------------------------------------------------------------------

#[test]
fn order_a_void_code_on_a_revoked_promo_license_is_renewal_code_void() {
    let l = with_status(
        license_of(LicenseKind::Promo, at(EXPIRY)),
        LicenseStatus::Revoked,
    );
    assert_eq!(
        redeem_at(
            &l,
            &void_code_record(),
            &product(),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::RenewalCodeVoid)
    );
}

#[test]
fn order_a_redeemed_code_on_a_suspended_license_is_already_redeemed() {
    let t = at("2025-01-05T10:00:00Z");
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(
        redeem_at(
            &l,
            &redeemed_code(t),
            &product(),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::RenewalCodeAlreadyRedeemed {
            redeemed_at: Some(t)
        })
    );
}

#[test]
fn order_a_revoked_promo_license_is_license_revoked() {
    let l = with_status(
        license_of(LicenseKind::Promo, at(EXPIRY)),
        LicenseStatus::Revoked,
    );
    assert_eq!(
        redeem_at(&l, &code(), &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseRevoked)
    );
}

#[test]
fn order_a_suspended_license_with_a_product_mismatch_is_license_suspended() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    let c = RenewalCodeRecord {
        product: beta(),
        ..code()
    };
    assert_eq!(
        redeem_at(&l, &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseSuspended)
    );
}

#[test]
fn order_a_promo_license_with_a_product_mismatch_is_kind_not_renewable() {
    let l = license_of(LicenseKind::Promo, at(EXPIRY));
    let c = RenewalCodeRecord {
        product: beta(),
        ..code()
    };
    assert_eq!(
        redeem_at(&l, &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::LicenseKindNotRenewable {
            kind: LicenseKind::Promo
        })
    );
}

#[test]
fn order_product_and_edition_mismatch_is_product_mismatch() {
    let c = RenewalCodeRecord {
        product: beta(),
        edition: Edition::Personal,
        ..code()
    };
    assert_eq!(
        redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::ProductMismatch {
            license_product: "ACME".into(),
            code_product: "BETA".into(),
        })
    );
}

#[test]
fn order_edition_and_seat_mismatch_is_edition_mismatch() {
    let c = RenewalCodeRecord {
        edition: Edition::Personal,
        seats: 1,
        ..code()
    };
    assert_eq!(
        redeem_at(&std_license(), &c, &product(), at("2025-01-10T00:00:00Z")),
        Err(Refusal::EditionMismatch {
            license_edition: Edition::Business,
            code_edition: Edition::Personal,
        })
    );
}

#[test]
fn order_seat_mismatch_and_window_closed_is_seat_count_mismatch() {
    let c = RenewalCodeRecord {
        seats: 10,
        ..code()
    };
    assert_eq!(
        redeem_at(&std_license(), &c, &product(), at("2026-06-01T00:00:00Z")),
        Err(Refusal::SeatCountMismatch {
            license_seats: 5,
            code_seats: 10
        })
    );
}

#[test]
fn order_window_closed_and_fingerprint_not_activated_is_window_closed() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product(),
            "fp-elsewhere",
            &v("4.10.0"),
            at(RENEWABLE_UNTIL) + secs(1)
        ),
        Err(Refusal::RenewalWindowClosed {
            renewable_until: at(RENEWABLE_UNTIL)
        })
    );
}

#[test]
fn order_fingerprint_not_activated_and_outdated_client_is_machine_not_activated() {
    assert_eq!(
        redeem(
            &std_license(),
            &code(),
            &product_latest("4.10.0"),
            "fp-elsewhere",
            &v("4.9.2"),
            at("2025-01-10T00:00:00Z")
        ),
        Err(Refusal::MachineNotActivated)
    );
}

#[test]
fn order_redeem_reports_each_failing_check_in_spec_order() {
    // Start with every check failing, then fix them one at a time: each step
    // must report the next check in the order of docs/rules.md §4.
    let now = at("2026-06-01T00:00:00Z"); // long after the window closed
    let p = product_latest("4.10.0");
    let mut l = with_status(
        license_of(LicenseKind::Promo, at(EXPIRY)),
        LicenseStatus::Revoked,
    );
    let mut c = RenewalCodeRecord {
        product: beta(),
        edition: Edition::Personal,
        seats: 1,
        ..redeemed_code(at("2025-01-05T10:00:00Z"))
    };
    let mut fp = "fp-elsewhere";
    let client = v("4.9.2");
    let run = |l: &License, c: &RenewalCodeRecord, fp: &str, now| {
        redeem(l, c, &p, fp, &client, now).map_err(|e| e.reason())
    };

    assert_eq!(run(&l, &c, fp, now), Err("RENEWAL_CODE_ALREADY_REDEEMED"));
    c.state = CodeState::Void;
    assert_eq!(run(&l, &c, fp, now), Err("RENEWAL_CODE_VOID"));
    c.state = CodeState::Unredeemed;
    assert_eq!(run(&l, &c, fp, now), Err("LICENSE_REVOKED"));
    l.status = LicenseStatus::Suspended;
    assert_eq!(run(&l, &c, fp, now), Err("LICENSE_SUSPENDED"));
    l.status = LicenseStatus::Active;
    assert_eq!(run(&l, &c, fp, now), Err("LICENSE_KIND_NOT_RENEWABLE"));
    l.kind = LicenseKind::Nfr;
    assert_eq!(run(&l, &c, fp, now), Err("LICENSE_KIND_NOT_RENEWABLE"));
    l.kind = LicenseKind::Standard;
    assert_eq!(run(&l, &c, fp, now), Err("PRODUCT_MISMATCH"));
    c.product = acme();
    assert_eq!(run(&l, &c, fp, now), Err("EDITION_MISMATCH"));
    c.edition = Edition::Business;
    assert_eq!(run(&l, &c, fp, now), Err("SEAT_COUNT_MISMATCH"));
    c.seats = SEATS;
    assert_eq!(run(&l, &c, fp, now), Err("RENEWAL_WINDOW_CLOSED"));
    let now = at(RENEWABLE_UNTIL);
    assert_eq!(run(&l, &c, fp, now), Err("MACHINE_NOT_ACTIVATED"));
    fp = FP;
    assert_eq!(run(&l, &c, fp, now), Err("CLIENT_VERSION_OUTDATED"));
    assert_eq!(
        redeem(&l, &c, &p, fp, &v("4.10.0"), now),
        renewed(EXPIRY, "2026-01-31T12:00:00Z")
    );
}

#[test]
fn order_activate_revoked_and_expired_is_license_revoked() {
    let l = with_status(std_license(), LicenseStatus::Revoked);
    assert_eq!(
        activate(&l, "fp-new", at(RENEWABLE_UNTIL) + secs(1)),
        Err(Refusal::LicenseRevoked)
    );
}

#[test]
fn order_activate_suspended_and_expired_is_license_suspended() {
    let l = with_status(std_license(), LicenseStatus::Suspended);
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY)),
        Err(Refusal::LicenseSuspended)
    );
}

#[test]
fn order_activate_expired_and_already_bound_is_license_expired() {
    assert_eq!(
        activate(&std_license(), FP, at(EXPIRY)),
        Err(Refusal::LicenseExpired {
            expires_at: at(EXPIRY)
        })
    );
}

#[test]
fn order_activate_expired_and_seats_full_is_license_expired() {
    let mut l = std_license();
    l.seats_used = l.seats;
    assert_eq!(
        activate(&l, "fp-new", at(EXPIRY)),
        Err(Refusal::LicenseExpired {
            expires_at: at(EXPIRY)
        })
    );
}
