//! Licenses, activations and renewal codes as the rules see them, and a
//! license's validity at an instant.

use chrono::{DateTime, Utc};

use super::keys::LicenseKey;
use super::product::ProductCode;
use super::time::add_months;

// The enums stay reachable as `domain::license::…`, where callers outside the
// domain have always found them.
pub use super::kinds::{CodeState, Edition, LicenseKind, LicenseStatus};

/// Whether a license lets the product run at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// `now < expires_at` and active.
    Valid,
    /// `expires_at ≤ now ≤ renewable_until` (STANDARD only).
    ExpiredRenewable,
    /// Past the renewal window, or a PROMO/NFR license past expiry.
    Expired,
    /// Suspended.
    Suspended,
    /// Revoked.
    Revoked,
    /// No such license.
    NotFound,
    /// The fingerprint given is not activated on the license.
    NotActivated,
    /// The value given is a renewal code.
    RenewalCode,
}

/// A workstation bound to a license.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    /// Fingerprint reported by the product.
    pub fingerprint: String,
    /// Host name.
    pub hostname: String,
    /// When it was activated.
    pub activated_at: DateTime<Utc>,
}

/// A license with everything the rules need, including its product's grace
/// period (the policy in force now).
#[derive(Debug, Clone, PartialEq)]
pub struct License {
    /// Key.
    pub key: LicenseKey,
    /// Product.
    pub product: ProductCode,
    /// Edition.
    pub edition: Edition,
    /// Kind.
    pub kind: LicenseKind,
    /// Seats bought.
    pub seats: u32,
    /// Activations counted now.
    pub seats_used: u32,
    /// Term bought, in years.
    pub term_years: u32,
    /// Administrative status.
    pub status: LicenseStatus,
    /// Start.
    pub starts_at: DateTime<Utc>,
    /// End (exclusive).
    pub expires_at: DateTime<Utc>,
    /// Renewals so far.
    pub renewal_count: u32,
    /// Billing's order reference.
    pub order_ref: String,
    /// Billing's customer reference.
    pub customer_ref: String,
    /// Reseller.
    pub reseller: String,
    /// Issued at.
    pub created_at: DateTime<Utc>,
    /// The product's grace period in months (R3).
    pub grace_period_months: u32,
    /// The product's latest version, as read with the license (R6).
    pub latest_version: Option<std::sync::Arc<crate::domain::Version>>,
    /// The product's offline certificate lifetime in days (0: none), as
    /// read with the license.
    pub offline_lease_days: u32,
    /// The workstations bound now (may be left empty by list queries).
    pub activations: Vec<Activation>,
}

impl License {
    /// Whether the kind allows renewal at all (R9).
    pub fn is_renewable_kind(&self) -> bool {
        self.kind == LicenseKind::Standard
    }

    /// What the license's validity depends on.
    pub fn standing(&self) -> Standing {
        Standing {
            status: self.status,
            kind: self.kind,
            expires_at: self.expires_at,
            grace_period_months: self.grace_period_months,
        }
    }

    /// See [`Standing::renewable_until`].
    pub fn renewable_until(&self) -> Option<DateTime<Utc>> {
        self.standing().renewable_until()
    }

    /// See [`Standing::validity_at`].
    pub fn validity_at(&self, now: DateTime<Utc>) -> Validity {
        self.standing().validity_at(now)
    }

    /// Whether `fingerprint` is bound to this license.
    pub fn is_activated(&self, fingerprint: &str) -> bool {
        self.activations
            .iter()
            .any(|a| a.fingerprint == fingerprint)
    }
}

/// The part of a license its validity depends on: administrative state,
/// kind, expiry and its product's grace period. Validate answers from this
/// alone, whether the store read it from the database or from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Administrative status.
    pub status: LicenseStatus,
    /// Kind.
    pub kind: LicenseKind,
    /// End (exclusive).
    pub expires_at: DateTime<Utc>,
    /// The product's grace period in months (R3).
    pub grace_period_months: u32,
}

impl Standing {
    /// The last instant at which the license can be renewed: expiry plus the
    /// product's grace period (R3). `None` for PROMO/NFR licenses (R9).
    pub fn renewable_until(&self) -> Option<DateTime<Utc>> {
        if self.kind != LicenseKind::Standard {
            return None;
        }
        Some(
            add_months(self.expires_at, self.grace_period_months)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
    }

    /// Validity at `now` (docs/rules.md §3, validity at an instant): the
    /// administrative state first, then the clock.
    pub fn validity_at(&self, now: DateTime<Utc>) -> Validity {
        match self.status {
            LicenseStatus::Revoked => return Validity::Revoked,
            LicenseStatus::Suspended => return Validity::Suspended,
            LicenseStatus::Active => {}
        }
        if now < self.expires_at {
            return Validity::Valid;
        }
        match self.renewable_until() {
            Some(until) if now <= until => Validity::ExpiredRenewable,
            _ => Validity::Expired,
        }
    }
}

/// A renewal code as stored (never the code itself: only its public id).
#[derive(Debug, Clone, PartialEq)]
pub struct RenewalCodeRecord {
    /// Public id, safe to show.
    pub id: String,
    /// Product it renews.
    pub product: ProductCode,
    /// Edition it renews.
    pub edition: Edition,
    /// Seats; must equal the license's (R7).
    pub seats: u32,
    /// Years it adds.
    pub term_years: u32,
    /// State.
    pub state: CodeState,
    /// Issued at.
    pub issued_at: DateTime<Utc>,
    /// Redeemed at.
    pub redeemed_at: Option<DateTime<Utc>>,
    /// The license it renewed.
    pub redeemed_license_key: Option<LicenseKey>,
    /// Voided at.
    pub voided_at: Option<DateTime<Utc>>,
    /// Why voided.
    pub void_reason: String,
    /// Billing's order reference.
    pub order_ref: String,
    /// Reseller.
    pub reseller: String,
}
