//! proto ⇄ domain. Parsing functions return a [`Refusal`] naming the field.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::domain::error::FieldViolation;
use crate::domain::{
    Activation, CodeState, Edition, License, LicenseKey, LicenseKind, LicenseStatus, ParseError,
    Product, ProductCode, Refusal, RenewalBasis, RenewalCode, RenewalCodeRecord, Validity,
};
use crate::proto as pb;
use crate::store::LicenseEvent;

pub fn invalid(field: &str, description: impl Into<String>) -> Refusal {
    Refusal::InvalidField(FieldViolation::new(field, description))
}

pub fn field(r: Result<String, FieldViolation>) -> Result<String, Refusal> {
    r.map_err(Refusal::InvalidField)
}

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Earliest and latest instants accepted from callers.
const MIN_SECONDS: i64 = 946_684_800; // 2000-01-01
const MAX_SECONDS: i64 = 7_258_118_400; // 2200-01-01

pub fn parse_timestamp(
    name: &str,
    t: Option<&Timestamp>,
) -> Result<Option<DateTime<Utc>>, Refusal> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) || !(MIN_SECONDS..MAX_SECONDS).contains(&t.seconds) {
        return Err(invalid(
            name,
            "a timestamp between 2000-01-01 and 2200-01-01",
        ));
    }
    let dt = DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .ok_or_else(|| invalid(name, "out of range"))?;
    Ok(Some(crate::domain::time::truncate_micros(dt)))
}

pub fn edition(name: &str, v: i32) -> Result<Edition, Refusal> {
    match pb::Edition::try_from(v) {
        Ok(pb::Edition::Personal) => Ok(Edition::Personal),
        Ok(pb::Edition::Business) => Ok(Edition::Business),
        _ => Err(invalid(
            name,
            "EDITION_PERSONAL or EDITION_BUSINESS is required",
        )),
    }
}

pub fn edition_to_proto(e: Edition) -> pb::Edition {
    match e {
        Edition::Personal => pb::Edition::Personal,
        Edition::Business => pb::Edition::Business,
    }
}

pub fn kind(name: &str, v: i32) -> Result<LicenseKind, Refusal> {
    match pb::LicenseKind::try_from(v) {
        Ok(pb::LicenseKind::Unspecified | pb::LicenseKind::Standard) => Ok(LicenseKind::Standard),
        Ok(pb::LicenseKind::Promo) => Ok(LicenseKind::Promo),
        Ok(pb::LicenseKind::Nfr) => Ok(LicenseKind::Nfr),
        Err(_) => Err(invalid(name, "unknown license kind")),
    }
}

pub fn kind_to_proto(k: LicenseKind) -> pb::LicenseKind {
    match k {
        LicenseKind::Standard => pb::LicenseKind::Standard,
        LicenseKind::Promo => pb::LicenseKind::Promo,
        LicenseKind::Nfr => pb::LicenseKind::Nfr,
    }
}

pub fn renewal_basis(name: &str, v: i32) -> Result<Option<RenewalBasis>, Refusal> {
    match pb::RenewalBasis::try_from(v) {
        Ok(pb::RenewalBasis::Unspecified) => Ok(None),
        Ok(pb::RenewalBasis::FromExpiry) => Ok(Some(RenewalBasis::FromExpiry)),
        Ok(pb::RenewalBasis::FromNowIfExpired) => Ok(Some(RenewalBasis::FromNowIfExpired)),
        Err(_) => Err(invalid(name, "unknown renewal basis")),
    }
}

fn renewal_basis_to_proto(b: RenewalBasis) -> pb::RenewalBasis {
    match b {
        RenewalBasis::FromExpiry => pb::RenewalBasis::FromExpiry,
        RenewalBasis::FromNowIfExpired => pb::RenewalBasis::FromNowIfExpired,
    }
}

pub fn validity_to_proto(v: Validity) -> pb::Validity {
    match v {
        Validity::Valid => pb::Validity::Valid,
        Validity::ExpiredRenewable => pb::Validity::ExpiredRenewable,
        Validity::Expired => pb::Validity::Expired,
        Validity::Suspended => pb::Validity::Suspended,
        Validity::Revoked => pb::Validity::Revoked,
        Validity::NotFound => pb::Validity::NotFound,
        Validity::NotActivated => pb::Validity::NotActivated,
        Validity::RenewalCode => pb::Validity::RenewalCode,
    }
}

fn status_to_proto(s: LicenseStatus) -> pb::LicenseStatus {
    match s {
        LicenseStatus::Active => pb::LicenseStatus::Active,
        LicenseStatus::Suspended => pb::LicenseStatus::Suspended,
        LicenseStatus::Revoked => pb::LicenseStatus::Revoked,
    }
}

fn code_state_to_proto(s: CodeState) -> pb::RenewalCodeState {
    match s {
        CodeState::Unredeemed => pb::RenewalCodeState::Unredeemed,
        CodeState::Redeemed => pb::RenewalCodeState::Redeemed,
        CodeState::Void => pb::RenewalCodeState::Void,
    }
}

/// A license key field; a renewal code there is refused with its own reason (R8).
pub fn license_key(name: &'static str, s: &str) -> Result<LicenseKey, Refusal> {
    LicenseKey::parse(s).map_err(|e| match e {
        ParseError::IsRenewalCode => Refusal::RenewalCodeIsNotALicenseKey { field: name },
        _ => Refusal::MalformedKey { field: name },
    })
}

/// Like [`license_key`], for requests with more fields: a malformed value is
/// refused at once (outer `Err`), while a renewal code in the key's place
/// (inner `Err`) is reported only after every other field has been checked,
/// as the order of checks puts malformed input first.
pub fn license_key_deferred(
    name: &'static str,
    s: &str,
) -> Result<Result<LicenseKey, Refusal>, Refusal> {
    match license_key(name, s) {
        Err(r @ Refusal::RenewalCodeIsNotALicenseKey { .. }) => Ok(Err(r)),
        other => other.map(Ok),
    }
}

pub fn renewal_code(name: &'static str, s: &str) -> Result<RenewalCode, Refusal> {
    RenewalCode::parse(s).map_err(|_| Refusal::MalformedRenewalCode { field: name })
}

pub fn product_code(name: &str, s: &str) -> Result<ProductCode, Refusal> {
    ProductCode::parse(s).map_err(|e| invalid(name, e))
}

/// A page size: 0 → `default`, negative → refused, above `max` → `max`.
pub fn page_size(v: i32, default: u32, max: u32) -> Result<u32, Refusal> {
    match v {
        0 => Ok(default),
        v if v < 0 => Err(invalid("page_size", "must not be negative")),
        v => Ok((v as u32).min(max)),
    }
}

pub fn product_to_proto(p: &Product) -> pb::Product {
    pb::Product {
        code: p.code().to_string(),
        display_name: p.display_name().to_string(),
        latest_version: p
            .latest_version()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        personal_terms_years: p.personal_terms().to_vec(),
        business_terms_years: p.business_terms().to_vec(),
        grace_period_months: Some(p.grace_period_months()),
        renewal_basis: renewal_basis_to_proto(p.renewal_basis()) as i32,
        offline_lease_days: Some(p.offline_lease_days()),
    }
}

pub fn activation_to_proto(a: &Activation) -> pb::Activation {
    pb::Activation {
        fingerprint: a.fingerprint.clone(),
        hostname: a.hostname.clone(),
        activated_at: Some(timestamp(a.activated_at)),
    }
}

pub fn license_to_proto(l: &License, now: DateTime<Utc>) -> pb::License {
    pb::License {
        key: l.key.to_string(),
        product: l.product.to_string(),
        edition: edition_to_proto(l.edition) as i32,
        kind: kind_to_proto(l.kind) as i32,
        seats: l.seats,
        seats_used: l.seats_used,
        term_years: l.term_years,
        status: status_to_proto(l.status) as i32,
        validity: validity_to_proto(l.validity_at(now)) as i32,
        starts_at: Some(timestamp(l.starts_at)),
        expires_at: Some(timestamp(l.expires_at)),
        renewable_until: l.renewable_until().map(timestamp),
        renewal_count: l.renewal_count,
        order_ref: l.order_ref.clone(),
        customer_ref: l.customer_ref.clone(),
        reseller: l.reseller.clone(),
        created_at: Some(timestamp(l.created_at)),
        activations: l.activations.iter().map(activation_to_proto).collect(),
    }
}

/// A renewal code's record; `code` is given only in IssueRenewalCode's answer.
pub fn code_to_proto(r: &RenewalCodeRecord, code: Option<&RenewalCode>) -> pb::RenewalCode {
    pb::RenewalCode {
        renewal_code: code.map(RenewalCode::expose_display).unwrap_or_default(),
        id: r.id.clone(),
        product: r.product.to_string(),
        edition: edition_to_proto(r.edition) as i32,
        seats: r.seats,
        term_years: r.term_years,
        state: code_state_to_proto(r.state) as i32,
        issued_at: Some(timestamp(r.issued_at)),
        redeemed_at: r.redeemed_at.map(timestamp),
        redeemed_license_key: r
            .redeemed_license_key
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_default(),
        order_ref: r.order_ref.clone(),
        reseller: r.reseller.clone(),
        voided_at: r.voided_at.map(timestamp),
        void_reason: r.void_reason.clone(),
    }
}

pub fn event_to_proto(e: &LicenseEvent) -> pb::LicenseEvent {
    pb::LicenseEvent {
        id: e.id,
        r#type: e.event_type.clone(),
        at: Some(timestamp(e.at)),
        actor: e.actor.clone(),
        fingerprint: e.fingerprint.clone(),
        old_expires_at: e.old_expires_at.map(timestamp),
        new_expires_at: e.new_expires_at.map(timestamp),
        renewal_code_id: e.renewal_code_id.clone().unwrap_or_default(),
        refusal_reason: e.refusal_reason.clone(),
        detail: e.detail.clone(),
        license_key: e.license_key.to_string(),
        product: e.product.clone(),
        cursor: token::feed(e.id),
    }
}

/// Page tokens are opaque to callers: a version tag and the position.
pub mod token {
    use super::{Refusal, invalid};
    use crate::store::LicenseCursor;

    fn bad() -> Refusal {
        invalid("page_token", "not a page token returned by this service")
    }

    pub fn products(after: &str) -> String {
        format!("p1.{after}")
    }
    pub fn parse_products(t: &str) -> Result<Option<String>, Refusal> {
        if t.is_empty() {
            return Ok(None);
        }
        t.strip_prefix("p1.")
            .map(|s| Some(s.to_string()))
            .ok_or_else(bad)
    }

    pub fn licenses(c: LicenseCursor) -> String {
        format!("l1.{}.{}", c.expires_at_micros, c.id)
    }
    pub fn parse_licenses(t: &str) -> Result<Option<LicenseCursor>, Refusal> {
        if t.is_empty() {
            return Ok(None);
        }
        let rest = t.strip_prefix("l1.").ok_or_else(bad)?;
        let (e, i) = rest.split_once('.').ok_or_else(bad)?;
        Ok(Some(LicenseCursor {
            expires_at_micros: e.parse().map_err(|_| bad())?,
            id: i.parse().map_err(|_| bad())?,
        }))
    }

    pub fn events(id: i64) -> String {
        format!("e1.{id}")
    }
    /// The event feed's cursor: after event `id`.
    pub fn feed(id: i64) -> String {
        format!("f1.{id}")
    }
    /// A feed cursor; empty: from the beginning.
    pub fn parse_feed(t: &str) -> Result<i64, Refusal> {
        if t.is_empty() {
            return Ok(0);
        }
        t.strip_prefix("f1.")
            .and_then(|id| id.parse::<i64>().ok())
            .filter(|id| *id >= 0 && !t[3..].starts_with('+'))
            .ok_or_else(|| invalid("after", "not a cursor returned by this service"))
    }

    pub fn parse_events(t: &str) -> Result<Option<i64>, Refusal> {
        if t.is_empty() {
            return Ok(None);
        }
        let rest = t.strip_prefix("e1.").ok_or_else(bad)?;
        rest.parse().map(Some).map_err(|_| bad())
    }
}
