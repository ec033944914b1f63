//! One decision function per operation. Each takes the rows the store loaded
//! and the current instant, and returns what to write or why not.

use chrono::{DateTime, Duration, Utc};

use super::error::{FieldViolation, Refusal};
use super::kinds::{CodeState, Edition, LicenseKind, LicenseStatus};
use super::license::{License, RenewalCodeRecord, Standing, Validity};
use super::product::{Product, RenewalBasis};
use super::time::add_years;
use super::version::Version;

/// Most seats one license may have.
pub const MAX_SEATS: u32 = 100_000;
/// How far in the future `starts_at` may lie (clock skew between billing and us).
pub const MAX_START_SKEW: Duration = Duration::minutes(5);

/// Bounds on free-text request fields.
pub mod input {
    use super::FieldViolation;

    /// Longest fingerprint.
    pub const MAX_FINGERPRINT: usize = 256;
    /// Longest host name.
    pub const MAX_HOSTNAME: usize = 255;
    /// Longest order/customer/reseller reference.
    pub const MAX_REF: usize = 128;
    /// Longest reason text.
    pub const MAX_REASON: usize = 1000;
    /// Longest request id.
    pub const MAX_REQUEST_ID: usize = 128;

    /// Free text of at most `max` characters without control characters.
    pub fn text(field: &str, value: &str, max: usize) -> Result<String, FieldViolation> {
        if value.chars().count() > max {
            return Err(FieldViolation::new(
                field,
                format!("at most {max} characters"),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(value.to_string())
    }

    /// Like [`text`], but also non-empty after trimming.
    pub fn required_text(field: &str, value: &str, max: usize) -> Result<String, FieldViolation> {
        if value.trim().is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        text(field, value, max)
    }

    /// A workstation fingerprint: 1–256 printable characters.
    pub fn fingerprint(field: &str, value: &str) -> Result<String, FieldViolation> {
        required_text(field, value, MAX_FINGERPRINT)
    }

    /// An idempotency key: 1–128 printable ASCII characters.
    pub fn request_id(field: &str, value: &str) -> Result<String, FieldViolation> {
        if value.is_empty()
            || value.len() > MAX_REQUEST_ID
            || !value.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(FieldViolation::new(
                field,
                format!("1 to {MAX_REQUEST_ID} printable ASCII characters without spaces"),
            ));
        }
        Ok(value.to_string())
    }
}

/// Start and end of a license about to be issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuePlan {
    /// Start.
    pub starts_at: DateTime<Utc>,
    /// Expiry: start plus the term in calendar years (R1).
    pub expires_at: DateTime<Utc>,
}

/// A seat count: 1 to [`MAX_SEATS`]. Checked when a request is parsed,
/// before anything is read, and again by the decisions below.
pub fn check_seats(seats: u32) -> Result<(), Refusal> {
    if seats == 0 || seats > MAX_SEATS {
        return Err(Refusal::InvalidField(FieldViolation::new(
            "seats",
            format!("between 1 and {MAX_SEATS}"),
        )));
    }
    Ok(())
}

/// The terms R1 allows an edition at all (a product may offer fewer).
pub fn terms_possible(edition: Edition) -> &'static [u32] {
    match edition {
        Edition::Personal => &[1, 2],
        Edition::Business => &[1, 2, 3],
    }
}

/// A term no product can sell for `edition` (R1) is refused when the request
/// is parsed, before the product is read.
pub fn check_term_possible(edition: Edition, term_years: u32) -> Result<(), Refusal> {
    let allowed = terms_possible(edition);
    if allowed.contains(&term_years) {
        Ok(())
    } else {
        Err(Refusal::TermNotAllowed {
            term_years,
            edition,
            allowed: allowed.to_vec(),
        })
    }
}

fn check_term(product: &Product, edition: Edition, term_years: u32) -> Result<(), Refusal> {
    let allowed = product.terms_for(edition);
    if !allowed.contains(&term_years) {
        return Err(Refusal::TermNotAllowed {
            term_years,
            edition,
            allowed: allowed.to_vec(),
        });
    }
    Ok(())
}

/// IssueLicense (R1): seats, term for the edition, start no later than now
/// (plus clock skew), expiry = start + term in calendar years.
pub fn issue(
    product: &Product,
    edition: Edition,
    seats: u32,
    term_years: u32,
    starts_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<IssuePlan, Refusal> {
    check_seats(seats)?;
    check_term(product, edition, term_years)?;
    let starts_at = starts_at.unwrap_or(now);
    if starts_at > now + MAX_START_SKEW {
        return Err(Refusal::InvalidField(FieldViolation::new(
            "starts_at",
            "must not lie in the future",
        )));
    }
    let expires_at = add_years(starts_at, term_years)
        .ok_or_else(|| Refusal::InvalidField(FieldViolation::new("starts_at", "out of range")))?;
    Ok(IssuePlan {
        starts_at,
        expires_at,
    })
}

/// IssueRenewalCode: the code's term must be one the product sells (R1).
pub fn issue_code(
    product: &Product,
    edition: Edition,
    seats: u32,
    term_years: u32,
) -> Result<(), Refusal> {
    check_seats(seats)?;
    check_term(product, edition, term_years)
}

/// What an accepted activation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivateDecision {
    /// The fingerprint is already bound: success, nothing changes.
    AlreadyActivated,
    /// Bind the fingerprint to a free seat.
    TakeSeat,
}

/// Activate (R2, R7, R11), in the order of docs/rules.md §4 (order of
/// checks): revoked → suspended → expired → already bound → seats full.
pub fn activate(
    license: &License,
    fingerprint: &str,
    now: DateTime<Utc>,
) -> Result<ActivateDecision, Refusal> {
    check_admin_state(license)?;
    if now >= license.expires_at {
        return Err(Refusal::LicenseExpired {
            expires_at: license.expires_at,
        });
    }
    if license.is_activated(fingerprint) {
        return Ok(ActivateDecision::AlreadyActivated);
    }
    if license.seats_used >= license.seats {
        return Err(Refusal::SeatLimitReached {
            seats: license.seats,
        });
    }
    Ok(ActivateDecision::TakeSeat)
}

/// Deactivate: frees the seat of a bound fingerprint, whatever the license's
/// state (freeing a seat is always allowed).
pub fn deactivate(license: &License, fingerprint: &str) -> Result<(), Refusal> {
    if license.is_activated(fingerprint) {
        Ok(())
    } else {
        Err(Refusal::MachineNotActivated)
    }
}

fn check_admin_state(license: &License) -> Result<(), Refusal> {
    match license.status {
        LicenseStatus::Revoked => Err(Refusal::LicenseRevoked),
        LicenseStatus::Suspended => Err(Refusal::LicenseSuspended),
        LicenseStatus::Active => Ok(()),
    }
}

/// Validate's answer about one license.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidateAnswer {
    /// The validity.
    pub validity: Validity,
    /// Whether `client_version` is older than the product's latest version.
    pub update_available: bool,
}

/// Validate (R2, R11): the license's validity at `now`; a VALID license on a
/// fingerprint that is not bound to it is `NotActivated`. `fingerprint_bound`
/// is `None` when the caller gave no fingerprint.
pub fn validate(
    standing: &Standing,
    fingerprint_bound: Option<bool>,
    client_version: Option<&Version>,
    latest_version: Option<&Version>,
    now: DateTime<Utc>,
) -> ValidateAnswer {
    let mut validity = standing.validity_at(now);
    if validity == Validity::Valid && fingerprint_bound == Some(false) {
        validity = Validity::NotActivated;
    }
    let update_available = matches!((client_version, latest_version), (Some(c), Some(l)) if c < l);
    ValidateAnswer {
        validity,
        update_available,
    }
}

/// An accepted renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalDecision {
    /// Expiry before.
    pub previous_expires_at: DateTime<Utc>,
    /// Expiry after.
    pub new_expires_at: DateTime<Utc>,
}

/// RedeemRenewalCode (R3–R11), in the order of docs/rules.md §4 (order of
/// checks): code redeemed / void → license revoked / suspended → kind →
/// product → edition → seats → window → fingerprint → client version. The
/// caller has already parsed the input and found the license and the code.
pub fn redeem(
    license: &License,
    code: &RenewalCodeRecord,
    product: &Product,
    fingerprint: &str,
    client_version: &Version,
    now: DateTime<Utc>,
) -> Result<RenewalDecision, Refusal> {
    match code.state {
        CodeState::Redeemed => {
            return Err(Refusal::RenewalCodeAlreadyRedeemed {
                redeemed_at: code.redeemed_at,
            });
        }
        CodeState::Void => return Err(Refusal::RenewalCodeVoid),
        CodeState::Unredeemed => {}
    }
    check_admin_state(license)?;
    if license.kind != LicenseKind::Standard {
        return Err(Refusal::LicenseKindNotRenewable { kind: license.kind });
    }
    if code.product != license.product {
        return Err(Refusal::ProductMismatch {
            license_product: license.product.to_string(),
            code_product: code.product.to_string(),
        });
    }
    if code.edition != license.edition {
        return Err(Refusal::EditionMismatch {
            license_edition: license.edition,
            code_edition: code.edition,
        });
    }
    if code.seats != license.seats {
        return Err(Refusal::SeatCountMismatch {
            license_seats: license.seats,
            code_seats: code.seats,
        });
    }
    let renewable_until = license
        .renewable_until()
        .expect("a STANDARD license has a renewal window");
    if now > renewable_until {
        return Err(Refusal::RenewalWindowClosed { renewable_until });
    }
    if !license.is_activated(fingerprint) {
        return Err(Refusal::MachineNotActivated);
    }
    if let Some(latest) = product.latest_version()
        && client_version < latest
    {
        return Err(Refusal::ClientVersionOutdated {
            client_version: client_version.to_string(),
            latest_version: latest.to_string(),
        });
    }
    let base = match product.renewal_basis() {
        RenewalBasis::FromNowIfExpired if now >= license.expires_at => now,
        _ => license.expires_at,
    };
    let new_expires_at = add_years(base, code.term_years).ok_or_else(|| {
        Refusal::InvalidField(FieldViolation::new("renewal_code", "expiry out of range"))
    })?;
    Ok(RenewalDecision {
        previous_expires_at: license.expires_at,
        new_expires_at,
    })
}

/// An administrative action on a license (R11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Suspend.
    Suspend,
    /// Reinstate.
    Reinstate,
    /// Revoke.
    Revoke,
}

impl StatusAction {
    /// The history event it records.
    pub fn event_type(self) -> &'static str {
        match self {
            StatusAction::Suspend => "suspended",
            StatusAction::Reinstate => "reinstated",
            StatusAction::Revoke => "revoked",
        }
    }
}

/// The new status after `action`, or `None` when the license is already in
/// that state (an idempotent no-op). A revoked license stays revoked.
pub fn change_status(
    license: &License,
    action: StatusAction,
) -> Result<Option<LicenseStatus>, Refusal> {
    use LicenseStatus::*;
    match (action, license.status) {
        (StatusAction::Revoke, Revoked) => Ok(None),
        (StatusAction::Revoke, _) => Ok(Some(Revoked)),
        (_, Revoked) => Err(Refusal::LicenseRevoked),
        (StatusAction::Suspend, Suspended) | (StatusAction::Reinstate, Active) => Ok(None),
        (StatusAction::Suspend, Active) => Ok(Some(Suspended)),
        (StatusAction::Reinstate, Suspended) => Ok(Some(Active)),
    }
}

/// VoidRenewalCode: only an unredeemed code can be voided; voiding a void
/// code again changes nothing (`Ok(false)`).
pub fn void_code(code: &RenewalCodeRecord) -> Result<bool, Refusal> {
    match code.state {
        CodeState::Unredeemed => Ok(true),
        CodeState::Void => Ok(false),
        CodeState::Redeemed => Err(Refusal::RenewalCodeAlreadyRedeemed {
            redeemed_at: code.redeemed_at,
        }),
    }
}

#[cfg(test)]
mod tests;
