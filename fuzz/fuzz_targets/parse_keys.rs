//! Arbitrary text through every parser of user-supplied identifiers: license
//! keys, renewal codes, versions, product codes and bearer tokens.
//!
//! Besides "never panics", every successful parse must round-trip through
//! its display form(s), and the parsers must agree with each other (a
//! renewal code is never a license key, and vice versa). The product-code
//! branch also generates keys and codes from a byte stream derived from the
//! input and checks that they parse back to themselves.

#![no_main]

use libfuzzer_sys::fuzz_target;
use licensd::domain::auth::Token;
use licensd::domain::license::LicenseKind;
use licensd::domain::{LicenseKey, ParseError, ProductCode, RenewalCode, Version};

/// A deterministic byte source seeded from the input (SplitMix64), for the
/// `generate_with` constructors: never runs dry, unlike the input itself.
fn byte_source(data: &[u8]) -> impl FnMut(&mut [u8]) {
    let mut state = data.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    move |buf: &mut [u8]| {
        for chunk in buf.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn check_license_key(s: &str) {
    match LicenseKey::parse(s) {
        Ok(k) => {
            let shown = k.to_string();
            assert_eq!(LicenseKey::parse(&shown), Ok(k.clone()), "display form");
            assert_eq!(
                LicenseKey::parse(k.normalized()),
                Ok(k.clone()),
                "normalized form"
            );
            assert_eq!(
                LicenseKey::parse(&shown.to_ascii_lowercase()),
                Ok(k.clone()),
                "lower case"
            );
            assert_eq!(shown.replace('-', ""), k.normalized());
            assert!(RenewalCode::parse(s).is_err(), "a key is never a code");
            let product = k.product();
            assert!(k.normalized().starts_with(product.as_str()));
            assert_eq!(ProductCode::parse(product.as_str()), Ok(product.clone()));
            // The log form never shows the secret tail of the key.
            let redacted = k.redacted();
            let tail = &k.normalized()[k.normalized().len() - 20..];
            assert!(!redacted.replace('-', "").contains(tail), "{redacted}");
            assert!(!format!("{k:?}").contains(tail));
        }
        Err(ParseError::IsRenewalCode) => {
            assert!(
                RenewalCode::parse(s).is_ok(),
                "IsRenewalCode for a non-code"
            );
        }
        Err(ParseError::MalformedKey) => {}
        Err(ParseError::MalformedCode) => panic!("LicenseKey::parse returned MalformedCode"),
    }
}

fn check_renewal_code(s: &str) {
    match RenewalCode::parse(s) {
        Ok(c) => {
            assert_eq!(RenewalCode::parse(&c.expose_display()), Ok(c.clone()));
            assert_eq!(RenewalCode::parse(c.expose_normalized()), Ok(c.clone()));
            assert_eq!(
                RenewalCode::parse(&c.expose_display().to_ascii_lowercase()),
                Ok(c.clone())
            );
            assert_eq!(LicenseKey::parse(s), Err(ParseError::IsRenewalCode));
            // Debug never prints the code.
            assert!(!format!("{c:?}").contains(&c.expose_normalized()[2..]));
        }
        Err(e) => assert_eq!(e, ParseError::MalformedCode),
    }
}

fn check_version(s: &str) {
    if let Ok(v) = Version::parse(s) {
        assert_eq!(v.as_str(), s);
        assert_eq!(Version::parse(&v.to_string()), Ok(v.clone()));
        assert_eq!(v.cmp(&v), std::cmp::Ordering::Equal);
        // Missing trailing components count as zero (R6).
        let parts = s.split('.').count();
        if parts < 6 && s.len() + 2 <= 64 {
            let longer = Version::parse(&format!("{s}.0")).expect("one more component");
            assert_eq!(longer, v);
            let next = Version::parse(&format!("{s}.1")).expect("one more component");
            assert!(next > v);
        }
    }
}

fn check_product_code(s: &str, data: &[u8]) {
    let Ok(p) = ProductCode::parse(s) else {
        return;
    };
    assert_eq!(p.as_str(), s.to_ascii_uppercase());
    assert_eq!(ProductCode::parse(p.as_str()), Ok(p.clone()));
    // Keys generated for any valid product code parse back to themselves.
    let mut bytes = byte_source(data);
    for kind in [LicenseKind::Standard, LicenseKind::Promo, LicenseKind::Nfr] {
        let k = LicenseKey::generate_with(&p, kind, &mut bytes);
        assert_eq!(LicenseKey::parse(&k.to_string()), Ok(k.clone()));
        assert_eq!(k.product(), p);
        assert_eq!(k.kind(), kind);
        assert!(RenewalCode::parse(&k.to_string()).is_err());
    }
    let c = RenewalCode::generate_with(&mut bytes);
    assert_eq!(RenewalCode::parse(&c.expose_display()), Ok(c.clone()));
    assert_eq!(
        LicenseKey::parse(&c.expose_display()),
        Err(ParseError::IsRenewalCode)
    );
}

fn check_token(s: &str) {
    if let Some(t) = Token::parse(s) {
        assert_eq!(t.expose(), s);
        assert_eq!(Token::parse(&t.expose()), Some(t.clone()));
        assert!(t.matches(&t.secret_hash()));
        let secret = s.rsplit('_').next().unwrap();
        assert!(!format!("{t:?}").contains(secret));
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    check_license_key(&s);
    check_renewal_code(&s);
    check_version(&s);
    check_product_code(&s, data);
    check_token(&s);
});
