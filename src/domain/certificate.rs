//! Offline license certificates (docs/offline.md): which workstation gets
//! one, and what it says. Signing is not a rule and lives elsewhere
//! (`crate::signing`); this decides the claims, with time as a parameter.
//!
//! A certificate is handed out only for a license that is `VALID` now, to a
//! workstation bound to it, by a product whose `offline_lease_days` is not
//! 0. It expires at the earlier of now plus the lease and the license's own
//! expiry: a certificate never outlives its license (R2), so an expired,
//! suspended, revoked or unbound license, or a PROMO/NFR license past its
//! end, never gets one.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::kinds::Edition;
use super::license::{Standing, Validity};
use super::{LicenseKey, Version};

/// The claims of a certificate (a JWT's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateClaims {
    /// Issuer (`--certificate-issuer`).
    pub iss: String,
    /// The license key, as customers see it (with dashes).
    pub sub: String,
    /// The product code.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before (= `iat`).
    pub nbf: i64,
    /// Expires at (Unix seconds): the earlier of `iat` + the lease and the
    /// license's expiry.
    pub exp: i64,
    /// Unique id of this certificate.
    pub jti: String,
    /// The workstation it is bound to.
    pub fingerprint: String,
    /// `PERSONAL` or `BUSINESS`.
    pub edition: String,
    /// `STANDARD`, `PROMO` or `NFR`.
    pub kind: String,
    /// Seats bought.
    pub seats: u32,
    /// The license's expiry (Unix seconds).
    pub license_expires_at: i64,
    /// The product's latest version ("" when it sets none).
    pub latest_version: String,
}

/// What a certificate is decided from: a license as Validate sees it, and
/// the workstation asking.
#[derive(Debug, Clone, Copy)]
pub struct CertificateFacts<'a> {
    /// The license.
    pub key: &'a LicenseKey,
    /// Its status, kind, expiry and grace period.
    pub standing: Standing,
    /// Edition.
    pub edition: Edition,
    /// Seats bought.
    pub seats: u32,
    /// The product's latest version.
    pub latest_version: Option<&'a Version>,
    /// The product's offline lease in days (0: no certificates).
    pub offline_lease_days: u32,
    /// The workstation.
    pub fingerprint: &'a str,
    /// Whether that workstation is bound to the license.
    pub fingerprint_bound: bool,
}

/// Whether the workstation gets a certificate at `now`, and if so its
/// `(iat, exp)` in Unix seconds: the rule, without building the claims.
pub fn certificate_lifetime(
    facts: &CertificateFacts<'_>,
    now: DateTime<Utc>,
) -> Option<(i64, i64)> {
    if facts.offline_lease_days == 0
        || !facts.fingerprint_bound
        || facts.standing.validity_at(now) != Validity::Valid
    {
        return None;
    }
    let lease_end = now + Duration::days(i64::from(facts.offline_lease_days));
    let iat = now.timestamp();
    // Whole seconds, rounded down: never past the license's end.
    let exp = lease_end.min(facts.standing.expires_at).timestamp();
    (exp > iat).then_some((iat, exp))
}

/// Whether a workstation that holds a certificate expiring at `held_exp`
/// (Unix seconds; `None`: it holds none, or does not say) is sent a new one
/// expiring at `exp`: only when that extends its offline time by at least
/// half the lease. A workstation that validates often then gets about two
/// certificates per lease instead of one per call, and one whose license
/// ends before a lease does is not sent the same end again and again.
pub fn worth_sending(held_exp: Option<i64>, exp: i64, offline_lease_days: u32) -> bool {
    let half_lease = i64::from(offline_lease_days) * 86_400 / 2;
    held_exp.is_none_or(|held| exp.saturating_sub(held) >= half_lease)
}

/// The claims of a certificate for `facts` at `now`, or `None` when the
/// workstation gets none ([`certificate_lifetime`]). `jti` is the
/// certificate's unique id.
pub fn certificate_claims(
    facts: &CertificateFacts<'_>,
    issuer: &str,
    jti: String,
    now: DateTime<Utc>,
) -> Option<CertificateClaims> {
    let (iat, exp) = certificate_lifetime(facts, now)?;
    let license_end = facts.standing.expires_at;
    Some(CertificateClaims {
        iss: issuer.to_string(),
        sub: facts.key.to_string(),
        aud: facts.key.product().as_str().to_string(),
        iat,
        nbf: iat,
        exp,
        jti,
        fingerprint: facts.fingerprint.to_string(),
        edition: facts.edition.as_str().to_string(),
        kind: facts.standing.kind.as_str().to_string(),
        seats: facts.seats,
        license_expires_at: license_end.timestamp(),
        latest_version: facts
            .latest_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProductCode;
    use crate::domain::kinds::{LicenseKind, LicenseStatus};
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    fn facts<'a>(key: &'a LicenseKey, expires_at: DateTime<Utc>) -> CertificateFacts<'a> {
        CertificateFacts {
            key,
            standing: Standing {
                status: LicenseStatus::Active,
                kind: key.kind(),
                expires_at,
                grace_period_months: 1,
            },
            edition: Edition::Business,
            seats: 3,
            latest_version: None,
            offline_lease_days: 30,
            fingerprint: "ws-1",
            fingerprint_bound: true,
        }
    }

    fn key(kind: LicenseKind) -> LicenseKey {
        LicenseKey::generate(&ProductCode::parse("ACME").unwrap(), kind)
    }

    #[test]
    fn a_valid_bound_license_gets_the_lease_capped_by_its_expiry() {
        let k = key(LicenseKind::Standard);
        let now = at(2026, 1, 1);
        let c = certificate_claims(&facts(&k, at(2027, 1, 1)), "licensd", "j1".into(), now)
            .expect("a certificate");
        assert_eq!(c.sub, k.to_string());
        assert_eq!(c.aud, "ACME");
        assert_eq!((c.iat, c.nbf), (now.timestamp(), now.timestamp()));
        assert_eq!(c.exp, (now + Duration::days(30)).timestamp());
        assert_eq!(c.license_expires_at, at(2027, 1, 1).timestamp());
        assert_eq!(
            (c.edition.as_str(), c.kind.as_str(), c.seats),
            ("BUSINESS", "STANDARD", 3)
        );
        assert_eq!(
            (c.fingerprint.as_str(), c.iss.as_str(), c.jti.as_str()),
            ("ws-1", "licensd", "j1")
        );
        // Ten days before the license ends: the certificate ends with it.
        let late = at(2026, 12, 22);
        let c =
            certificate_claims(&facts(&k, at(2027, 1, 1)), "licensd", "j2".into(), late).unwrap();
        assert_eq!(c.exp, at(2027, 1, 1).timestamp());
    }

    #[test]
    fn no_certificate_unless_valid_bound_and_leased() {
        let k = key(LicenseKind::Standard);
        let now = at(2026, 1, 1);
        let ok = facts(&k, at(2027, 1, 1));
        let none = |f: CertificateFacts<'_>, now| certificate_claims(&f, "i", "j".into(), now);
        assert!(none(ok, now).is_some());
        for status in [LicenseStatus::Suspended, LicenseStatus::Revoked] {
            let mut f = ok;
            f.standing.status = status;
            assert!(none(f, now).is_none(), "{status:?}");
        }
        // Expired, inside and after the grace period.
        assert!(none(ok, at(2027, 1, 15)).is_none());
        assert!(none(ok, at(2027, 3, 1)).is_none());
        // Within the license's last (whole) second: nothing left to lease.
        let mut f = ok;
        f.standing.expires_at = at(2027, 1, 1) + Duration::milliseconds(700);
        assert!(none(f, at(2027, 1, 1) + Duration::milliseconds(200)).is_none());
        let c = none(f, at(2027, 1, 1) - Duration::milliseconds(500)).unwrap();
        assert_eq!(c.exp - c.iat, 1);
        let mut f = ok;
        f.fingerprint_bound = false;
        assert!(none(f, now).is_none());
        let mut f = ok;
        f.offline_lease_days = 0;
        assert!(none(f, now).is_none());
        // PROMO and NFR: valid until their end, nothing after.
        for kind in [LicenseKind::Promo, LicenseKind::Nfr] {
            let k = key(kind);
            let f = facts(&k, at(2026, 6, 1));
            assert_eq!(none(f, now).unwrap().kind, kind.as_str());
            assert!(none(f, at(2026, 6, 2)).is_none());
        }
    }

    #[test]
    fn a_held_certificate_is_replaced_only_for_half_a_lease_more() {
        let day = 86_400;
        let now = at(2026, 3, 1).timestamp();
        // Nothing held: always.
        assert!(worth_sending(None, now + 30 * day, 30));
        // Just received: not again.
        assert!(!worth_sending(Some(now + 30 * day), now + 30 * day, 30));
        // 14 days old: 14 more days is less than half of 30.
        assert!(!worth_sending(Some(now + 16 * day), now + 30 * day, 30));
        // 15 days old: half the lease more.
        assert!(worth_sending(Some(now + 15 * day), now + 30 * day, 30));
        // Expired long ago, or a nonsense value: a new one.
        assert!(worth_sending(Some(now - 400 * day), now + 30 * day, 30));
        assert!(worth_sending(Some(i64::MIN), now + 30 * day, 30));
        // The license ends in 5 days: the held certificate already ends
        // there, a new one would add nothing.
        assert!(!worth_sending(Some(now + 5 * day), now + 5 * day, 30));
        // Held from before a renewal cut it short: the new one goes further.
        assert!(worth_sending(Some(now + 5 * day), now + 30 * day, 30));
    }
}
