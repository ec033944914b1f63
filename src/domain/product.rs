//! Products and their licensing policy.

use std::fmt;

use super::error::FieldViolation;
use super::kinds::Edition;
use super::version::Version;

/// A product code: 2–8 characters of `A–Z0–9`, never containing `PRO` or
/// `NFR` (those mark PROMO and NFR keys). Input is upper-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductCode(String);

impl ProductCode {
    /// Parses and upper-cases a product code.
    pub fn parse(s: &str) -> Result<Self, String> {
        let up = s.to_ascii_uppercase();
        if !(2..=8).contains(&up.len()) || !up.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("a product code is 2 to 8 characters of A-Z and 0-9".into());
        }
        if up.contains("PRO") || up.contains("NFR") {
            return Err("a product code must not contain PRO or NFR".into());
        }
        Ok(ProductCode(up))
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProductCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a renewal moves the expiry (R4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalBasis {
    /// new expiry = old expiry + term, also for a lapsed license.
    FromExpiry,
    /// A lapsed license restarts at the moment of renewal.
    FromNowIfExpired,
}

impl RenewalBasis {
    /// Stable name used in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalBasis::FromExpiry => "FROM_EXPIRY",
            RenewalBasis::FromNowIfExpired => "FROM_NOW_IF_EXPIRED",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn from_str_opt(s: &str) -> Option<Self> {
        match s {
            "FROM_EXPIRY" => Some(RenewalBasis::FromExpiry),
            "FROM_NOW_IF_EXPIRED" => Some(RenewalBasis::FromNowIfExpired),
            _ => None,
        }
    }
}

/// Longest display name accepted.
pub const MAX_DISPLAY_NAME_LEN: usize = 200;
/// Longest grace period a product may set, in months.
pub const MAX_GRACE_MONTHS: u32 = 24;
/// Longest offline lease a product may set, in days.
pub const MAX_OFFLINE_LEASE_DAYS: u32 = 365;
/// The offline lease of a product that does not set one, in days.
pub const DEFAULT_OFFLINE_LEASE_DAYS: u32 = 30;

/// A product and its policy. Constructed through [`Product::new`], which
/// enforces every policy rule, so an existing value is always valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    code: ProductCode,
    display_name: String,
    latest_version: Option<Version>,
    personal_terms: Vec<u32>,
    business_terms: Vec<u32>,
    grace_period_months: u32,
    renewal_basis: RenewalBasis,
    offline_lease_days: u32,
}

/// The unchecked parts of a product, as a caller supplies them. `None` takes
/// the default.
#[derive(Debug, Clone, Default)]
pub struct ProductSpec {
    /// Display name.
    pub display_name: String,
    /// Latest version text ("" for none).
    pub latest_version: String,
    /// Terms for PERSONAL; empty → [1, 2].
    pub personal_terms: Vec<u32>,
    /// Terms for BUSINESS; empty → [1, 2, 3].
    pub business_terms: Vec<u32>,
    /// Grace period; `None` → 1 month.
    pub grace_period_months: Option<u32>,
    /// Renewal basis; `None` → FROM_EXPIRY.
    pub renewal_basis: Option<RenewalBasis>,
    /// Offline certificates' lifetime in days, 0 for none; `None` → 30.
    pub offline_lease_days: Option<u32>,
}

fn check_terms(
    field: &str,
    terms: &[u32],
    max: u32,
    default: &[u32],
) -> Result<Vec<u32>, FieldViolation> {
    if terms.is_empty() {
        return Ok(default.to_vec());
    }
    let mut t = terms.to_vec();
    t.sort_unstable();
    t.dedup();
    if t.iter().any(|&y| y == 0 || y > max) {
        return Err(FieldViolation::new(
            field,
            format!("terms must lie between 1 and {max} years (R1)"),
        ));
    }
    Ok(t)
}

impl Product {
    /// Validates a product's policy: terms within R1 (PERSONAL 1–2 years,
    /// BUSINESS 1–3), a grace period of 0–24 months, a well-formed version.
    pub fn new(code: ProductCode, spec: ProductSpec) -> Result<Self, FieldViolation> {
        if spec.display_name.chars().count() > MAX_DISPLAY_NAME_LEN
            || spec.display_name.chars().any(char::is_control)
        {
            return Err(FieldViolation::new(
                "product.display_name",
                format!("at most {MAX_DISPLAY_NAME_LEN} printable characters"),
            ));
        }
        let latest_version = if spec.latest_version.is_empty() {
            None
        } else {
            Some(
                Version::parse(&spec.latest_version)
                    .map_err(|e| FieldViolation::new("product.latest_version", e))?,
            )
        };
        let personal_terms = check_terms(
            "product.personal_terms_years",
            &spec.personal_terms,
            2,
            &[1, 2],
        )?;
        let business_terms = check_terms(
            "product.business_terms_years",
            &spec.business_terms,
            3,
            &[1, 2, 3],
        )?;
        let grace_period_months = spec.grace_period_months.unwrap_or(1);
        if grace_period_months > MAX_GRACE_MONTHS {
            return Err(FieldViolation::new(
                "product.grace_period_months",
                format!("at most {MAX_GRACE_MONTHS} months"),
            ));
        }
        let offline_lease_days = spec
            .offline_lease_days
            .unwrap_or(DEFAULT_OFFLINE_LEASE_DAYS);
        if offline_lease_days > MAX_OFFLINE_LEASE_DAYS {
            return Err(FieldViolation::new(
                "product.offline_lease_days",
                format!("at most {MAX_OFFLINE_LEASE_DAYS} days (0: no offline certificates)"),
            ));
        }
        Ok(Product {
            code,
            display_name: spec.display_name,
            latest_version,
            personal_terms,
            business_terms,
            grace_period_months,
            renewal_basis: spec.renewal_basis.unwrap_or(RenewalBasis::FromExpiry),
            offline_lease_days,
        })
    }

    /// The product's current values as a spec, to apply an update to.
    pub fn to_spec(&self) -> ProductSpec {
        ProductSpec {
            display_name: self.display_name.clone(),
            latest_version: self
                .latest_version
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_default(),
            personal_terms: self.personal_terms.clone(),
            business_terms: self.business_terms.clone(),
            grace_period_months: Some(self.grace_period_months),
            renewal_basis: Some(self.renewal_basis),
            offline_lease_days: Some(self.offline_lease_days),
        }
    }

    /// Code.
    pub fn code(&self) -> &ProductCode {
        &self.code
    }
    /// Display name.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }
    /// Latest released version, if the product requires one.
    pub fn latest_version(&self) -> Option<&Version> {
        self.latest_version.as_ref()
    }
    /// Terms allowed for PERSONAL.
    pub fn personal_terms(&self) -> &[u32] {
        &self.personal_terms
    }
    /// Terms allowed for BUSINESS.
    pub fn business_terms(&self) -> &[u32] {
        &self.business_terms
    }
    /// Grace period in months.
    pub fn grace_period_months(&self) -> u32 {
        self.grace_period_months
    }
    /// Renewal basis.
    pub fn renewal_basis(&self) -> RenewalBasis {
        self.renewal_basis
    }
    /// How long an offline certificate lasts, in days (0: none).
    pub fn offline_lease_days(&self) -> u32 {
        self.offline_lease_days
    }

    /// The terms allowed for `edition` (R1).
    pub fn terms_for(&self, edition: Edition) -> &[u32] {
        match edition {
            Edition::Personal => &self.personal_terms,
            Edition::Business => &self.business_terms,
        }
    }
}
