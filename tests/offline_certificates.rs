//! Offline license certificates (docs/offline.md), checked as a product
//! would check them, with an implementation independent of the signer:
//! `ring`'s Ed25519 and a hand-split compact JWS against the JWKS from
//! GetSigningKeys. Claims, the expiry cap, renewal, every state that gets
//! none, the product's lease, tampering, rotation and retirement, and a key
//! from `--signing-key-file`.

mod cluster;
mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::Utc;
use common::{TestServer, code_req, days_ago, license_req};
use licensd::proto as pb;
use serde_json::Value;

const DAY: i64 = 86_400;

/// The published keys: kid → public key.
async fn jwks(s: &mut TestServer) -> HashMap<String, Vec<u8>> {
    let text = s
        .activation
        .get_signing_keys(pb::GetSigningKeysRequest {})
        .await
        .expect("GetSigningKeys needs no token")
        .into_inner()
        .jwks;
    parse_jwks(&text)
}

/// A JWK Set's Ed25519 keys: kid → public key (and nothing private in it).
fn parse_jwks(text: &str) -> HashMap<String, Vec<u8>> {
    let set: Value = serde_json::from_str(text).expect("JWKS is JSON");
    set["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            assert_eq!(k["kty"], "OKP");
            assert_eq!(k["crv"], "Ed25519");
            assert_eq!(k["use"], "sig");
            assert_eq!(k["alg"], "EdDSA");
            assert!(k.get("d").is_none(), "a private key in the JWKS: {k}");
            (
                k["kid"].as_str().unwrap().to_string(),
                B64.decode(k["x"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// A product `code` with the default lease, a license, and the certificate
/// its workstation `ws-1` got at activation.
async fn activated(s: &mut TestServer, code: &str) -> (pb::License, String) {
    product_with_lease(s, code, None).await;
    let license = s.issue(license_req(code, 1, 1)).await;
    let jws = s
        .activate(&license.key, "ws-1")
        .await
        .unwrap()
        .license_certificate;
    (license, jws)
}

/// Verifies `jws` as a product does; its claims, or why not.
fn verify(jws: &str, keys: &HashMap<String, Vec<u8>>) -> Result<Value, String> {
    let parts: Vec<&str> = jws.split('.').collect();
    let [h, p, s] = parts[..] else {
        return Err(format!("{} parts", parts.len()));
    };
    let header: Value = serde_json::from_slice(&B64.decode(h).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if header["alg"] != "EdDSA" || header["typ"] != "JWT" {
        return Err(format!("header {header}"));
    }
    // Exactly alg, typ and kid: a product's verifier may refuse a header
    // with members it does not know (`crit`, `jwk`, `x5u`…), and a key
    // embedded in the header must never be trusted.
    let mut members: Vec<&str> = header
        .as_object()
        .ok_or_else(|| format!("header {header} is not an object"))?
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    if members != ["alg", "kid", "typ"] {
        return Err(format!("header members {members:?}"));
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let key = keys.get(kid).ok_or_else(|| format!("unknown kid {kid}"))?;
    let signature = B64.decode(s).map_err(|e| e.to_string())?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(format!("{h}.{p}").as_bytes(), &signature)
        .map_err(|_| "bad signature".to_string())?;
    serde_json::from_slice(&B64.decode(p).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// A server clock the test moves: now plus the offset's seconds.
fn movable_clock() -> (
    std::sync::Arc<std::sync::atomic::AtomicI64>,
    licensd::grpc::Clock,
) {
    let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let clock: licensd::grpc::Clock = {
        let offset = offset.clone();
        std::sync::Arc::new(move || {
            licensd::domain::time::truncate_micros(
                Utc::now()
                    + chrono::Duration::seconds(offset.load(std::sync::atomic::Ordering::Relaxed)),
            )
        })
    };
    (offset, clock)
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().expect("timestamp").seconds
}

async fn product_with_lease(s: &mut TestServer, code: &str, lease: Option<u32>) {
    s.products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: code.into(),
                display_name: code.into(),
                latest_version: "2.1.0".into(),
                offline_lease_days: lease,
                ..Default::default()
            }),
        })
        .await
        .expect("create product");
}

async fn validate(s: &mut TestServer, key: &str, fp: &str) -> pb::ValidateResponse {
    s.validate(key, fp, "").await.expect("validate")
}

#[tokio::test]
async fn a_certificate_verifies_independently_and_says_what_the_license_is() {
    let mut s = TestServer::start().await;
    product_with_lease(&mut s, "OFFL", None).await;
    let license = s.issue(license_req("OFFL", 3, 1)).await;
    let activated = s.activate(&license.key, "ws-1").await.unwrap();
    let keys = jwks(&mut s).await;
    assert_eq!(keys.len(), 1);
    let c = verify(&activated.license_certificate, &keys).expect("verifies");
    assert_eq!(c["iss"], "licensd");
    assert_eq!(c["sub"], license.key.as_str());
    assert_eq!(c["aud"], "OFFL");
    assert_eq!(c["fingerprint"], "ws-1");
    assert_eq!(c["edition"], "BUSINESS");
    assert_eq!(c["kind"], "STANDARD");
    assert_eq!(c["seats"], 3);
    assert_eq!(c["latest_version"], "2.1.0");
    assert_eq!(c["license_expires_at"], secs(&license.expires_at));
    let iat = c["iat"].as_i64().unwrap();
    assert!((iat - Utc::now().timestamp()).abs() < 60);
    assert_eq!(c["nbf"], iat);
    // The default lease: 30 days (the license runs a year).
    assert_eq!(c["exp"], iat + 30 * DAY);
    let jti = c["jti"].as_str().unwrap();
    assert_eq!(jti.len(), 32);

    // Validate with the bound fingerprint hands one out; without a
    // fingerprint, or for one not bound, none.
    let v = validate(&mut s, &license.key, "ws-1").await;
    assert_eq!(v.validity, pb::Validity::Valid as i32);
    let again = verify(&v.license_certificate, &keys).expect("verifies");
    assert_eq!(again["fingerprint"], "ws-1");
    // Nothing changed since the activation: the same certificate, not a
    // new signature (src/signing.rs, reuse_for).
    assert_eq!(v.license_certificate, activated.license_certificate);
    assert!(
        validate(&mut s, &license.key, "")
            .await
            .license_certificate
            .is_empty()
    );
    let other = validate(&mut s, &license.key, "ws-2").await;
    assert_eq!(other.validity, pb::Validity::NotActivated as i32);
    assert!(other.license_certificate.is_empty());
    s.stop().await;
}

/// A product that says which certificate it holds (`certificate_expires_at`)
/// is not sent the same again on every Validate: only once a new one would
/// last half a lease longer.
#[tokio::test]
async fn a_workstation_that_holds_a_fresh_certificate_gets_a_new_one_half_a_lease_later() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    let offset = Arc::new(AtomicI64::new(0));
    let clock: licensd::grpc::Clock = {
        let offset = offset.clone();
        Arc::new(move || {
            licensd::domain::time::truncate_micros(
                Utc::now() + chrono::Duration::seconds(offset.load(Ordering::Relaxed)),
            )
        })
    };
    let mut s = TestServer::start_with_clock(clock).await;
    let (license, jws) = activated(&mut s, "HINT").await;
    let keys = jwks(&mut s).await;
    let held = verify(&jws, &keys).expect("verifies")["exp"]
        .as_i64()
        .unwrap();
    let with_hint = |held: i64, nanos: i32| pb::ValidateRequest {
        license_key: license.key.clone(),
        fingerprint: "ws-1".into(),
        client_version: String::new(),
        certificate_expires_at: Some(prost_types::Timestamp {
            seconds: held,
            nanos,
        }),
    };
    let mut activation = s.activation.clone();

    // Just received: VALID, and nothing new to carry.
    let v = activation
        .validate(with_hint(held, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.validity, pb::Validity::Valid as i32);
    assert_eq!(v.license_certificate, "");
    // Without the hint, as before: one on every VALID answer.
    assert!(
        !validate(&mut s, &license.key, "ws-1")
            .await
            .license_certificate
            .is_empty()
    );
    // A certificate held from long ago: a new one.
    let v = activation
        .validate(with_hint(held - 40 * DAY, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.license_certificate.is_empty());

    // 14 days on, a new one would add 14 days: not yet.
    offset.store(14 * DAY, Ordering::Relaxed);
    let v = activation
        .validate(with_hint(held, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.validity, pb::Validity::Valid as i32);
    assert_eq!(v.license_certificate, "");
    // 15 days on: half the lease more; the new one runs 30 days from now.
    offset.store(15 * DAY + 60, Ordering::Relaxed);
    let v = activation
        .validate(with_hint(held, 0))
        .await
        .unwrap()
        .into_inner();
    let fresh = verify(&v.license_certificate, &keys).expect("verifies");
    assert_eq!(fresh["exp"].as_i64().unwrap(), held + 15 * DAY + 60);

    // A hint that is no timestamp: refused, naming the field.
    let status = activation
        .validate(with_hint(held, -1))
        .await
        .expect_err("bad nanos");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(common::bad_fields(&status), vec!["certificate_expires_at"]);
    s.stop().await;
}

#[tokio::test]
async fn a_certificate_never_outlives_its_license_and_a_renewal_carries_the_new_expiry() {
    let mut s = TestServer::start().await;
    product_with_lease(&mut s, "CAPD", None).await;
    // A one-year license that started 360 days ago: 5 days left.
    let mut req = license_req("CAPD", 1, 1);
    req.starts_at = Some(days_ago(360));
    let license = s.issue(req).await;
    let a = s.activate(&license.key, "ws-1").await.unwrap();
    let keys = jwks(&mut s).await;
    let c = verify(&a.license_certificate, &keys).unwrap();
    assert_eq!(
        c["exp"],
        secs(&license.expires_at),
        "capped by the license's end"
    );

    let code = s.code(code_req("CAPD", 1, 1)).await.renewal_code;
    let renewed = s
        .activation
        .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
            license_key: license.key.clone(),
            renewal_code: code,
            fingerprint: "ws-1".into(),
            client_version: "2.1.0".into(),
        })
        .await
        .expect("redeem")
        .into_inner();
    let new_expiry = secs(&renewed.license.as_ref().unwrap().expires_at);
    assert!(new_expiry > secs(&license.expires_at) + 300 * DAY);
    let c = verify(&renewed.license_certificate, &keys).unwrap();
    assert_eq!(c["license_expires_at"], new_expiry);
    assert_eq!(c["exp"], c["iat"].as_i64().unwrap() + 30 * DAY);
    // Validate agrees at once (no stale reuse of the capped certificate).
    let v = validate(&mut s, &license.key, "ws-1").await;
    let c = verify(&v.license_certificate, &keys).unwrap();
    assert_eq!(c["license_expires_at"], new_expiry);
    s.stop().await;
}

#[tokio::test]
async fn no_certificate_for_a_license_that_is_not_valid_or_a_product_without_a_lease() {
    let mut s = TestServer::start().await;
    product_with_lease(&mut s, "STAT", None).await;
    let license = s.issue(license_req("STAT", 1, 1)).await;
    s.activate(&license.key, "ws-1").await.unwrap();
    let keys = jwks(&mut s).await;
    s.licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: license.key.clone(),
            reason: "chargeback".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let v = validate(&mut s, &license.key, "ws-1").await;
    assert_eq!(v.validity, pb::Validity::Suspended as i32);
    assert!(v.license_certificate.is_empty());
    s.licenses
        .reinstate_license(pb::ReinstateLicenseRequest {
            license_key: license.key.clone(),
            reason: "paid".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let v = validate(&mut s, &license.key, "ws-1").await;
    verify(&v.license_certificate, &keys).expect("valid again: a certificate");
    s.licenses
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: license.key.clone(),
            reason: "fraud".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let v = validate(&mut s, &license.key, "ws-1").await;
    assert_eq!(v.validity, pb::Validity::Revoked as i32);
    assert!(v.license_certificate.is_empty());

    // A product with offline_lease_days 0 hands out none; set to 7, a week.
    product_with_lease(&mut s, "NOLS", Some(0)).await;
    let license = s.issue(license_req("NOLS", 1, 1)).await;
    let a = s.activate(&license.key, "ws-1").await.unwrap();
    assert!(a.license_certificate.is_empty());
    assert!(
        validate(&mut s, &license.key, "ws-1")
            .await
            .license_certificate
            .is_empty()
    );
    let set_lease = |days: u32| pb::UpdateProductRequest {
        product: Some(pb::Product {
            code: "NOLS".into(),
            offline_lease_days: Some(days),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["offline_lease_days".into()],
        }),
    };
    let updated = s
        .products
        .update_product(set_lease(7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.offline_lease_days, Some(7));
    let v = validate(&mut s, &license.key, "ws-1").await;
    let c = verify(&v.license_certificate, &keys).unwrap();
    assert_eq!(c["exp"], c["iat"].as_i64().unwrap() + 7 * DAY);
    // Out of range: refused, nothing changed.
    let refused = s.products.update_product(set_lease(366)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        common::bad_fields(&refused),
        vec!["product.offline_lease_days"]
    );
    s.stop().await;
}

#[tokio::test]
async fn an_expired_license_gets_no_certificate() {
    // The server's clock moves past the license's end, then past its grace
    // month: neither an expired-but-renewable license nor one past its
    // renewal window may be carried offline.
    let (offset, clock) = movable_clock();
    let mut s = TestServer::start_with_clock(clock).await;
    product_with_lease(&mut s, "EXPD", None).await;
    let license = s.issue(license_req("EXPD", 1, 1)).await;
    assert!(
        !s.activate(&license.key, "ws-1")
            .await
            .unwrap()
            .license_certificate
            .is_empty()
    );
    offset.store(366 * DAY, std::sync::atomic::Ordering::Relaxed);
    let v = validate(&mut s, &license.key, "ws-1").await;
    assert_eq!(v.validity, pb::Validity::ExpiredRenewable as i32);
    assert!(v.license_certificate.is_empty());

    // The product's grace period is one calendar month (at most 31 days):
    // 32 days past the end is past the window.
    let past_window = secs(&license.expires_at) - Utc::now().timestamp() + 32 * DAY;
    offset.store(past_window, std::sync::atomic::Ordering::Relaxed);
    let v = validate(&mut s, &license.key, "ws-1").await;
    assert_eq!(v.validity, pb::Validity::Expired as i32);
    assert!(v.license_certificate.is_empty());
    s.stop().await;
}

/// PROMO and NFR licenses are carried offline like any other while valid,
/// the certificate says which kind they are (a product may treat them
/// differently offline), and they have no grace period: the moment they
/// end, Validate says EXPIRED and hands out none.
#[tokio::test]
async fn promo_and_nfr_certificates_name_their_kind_and_stop_at_expiry() {
    let (offset, clock) = movable_clock();
    let mut s = TestServer::start_with_clock(clock).await;
    product_with_lease(&mut s, "KIND", None).await;
    let keys = jwks(&mut s).await;
    let mut issued = Vec::new();
    for (kind, name) in [
        (pb::LicenseKind::Promo, "PROMO"),
        (pb::LicenseKind::Nfr, "NFR"),
    ] {
        let mut req = license_req("KIND", 1, 1);
        req.kind = kind as i32;
        let license = s.issue(req).await;
        assert_eq!(license.kind, kind as i32);
        let a = s.activate(&license.key, "ws-1").await.unwrap();
        let c = verify(&a.license_certificate, &keys).expect("verifies");
        assert_eq!(c["kind"], name, "{}", license.key);
        assert_eq!(c["sub"], license.key.as_str());
        assert_eq!(c["license_expires_at"], secs(&license.expires_at));
        let v = validate(&mut s, &license.key, "ws-1").await;
        assert_eq!(v.validity, pb::Validity::Valid as i32);
        assert_eq!(
            verify(&v.license_certificate, &keys).expect("verifies")["kind"],
            name
        );
        issued.push((license, name));
    }

    // A minute past the later end: no grace period, so EXPIRED at once,
    // where a STANDARD license would be EXPIRED_RENEWABLE.
    let end = issued
        .iter()
        .map(|(l, _)| secs(&l.expires_at))
        .max()
        .unwrap();
    offset.store(
        end - Utc::now().timestamp() + 60,
        std::sync::atomic::Ordering::Relaxed,
    );
    for (license, name) in &issued {
        let v = validate(&mut s, &license.key, "ws-1").await;
        assert_eq!(v.validity, pb::Validity::Expired as i32, "{name}");
        assert!(v.license_certificate.is_empty(), "{name}: a certificate");
    }
    s.stop().await;
}

#[tokio::test]
async fn tampering_and_foreign_keys_fail_verification() {
    let mut s = TestServer::start().await;
    let (_, jws) = activated(&mut s, "TAMP").await;
    let keys = jwks(&mut s).await;
    verify(&jws, &keys).expect("the untouched certificate verifies");
    let parts: Vec<&str> = jws.split('.').collect();
    let reencode = |v: &Value| B64.encode(serde_json::to_vec(v).unwrap());
    let header: Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();

    let mut more_seats = claims.clone();
    more_seats["seats"] = 100.into();
    let mut later = claims.clone();
    later["exp"] = (claims["exp"].as_i64().unwrap() + 365 * DAY).into();
    let mut none = header.clone();
    none["alg"] = "none".into();
    let mut other_kid = header.clone();
    other_kid["kid"] = "not-a-published-key".into();
    for (what, forged) in [
        (
            "a changed claim",
            format!("{}.{}.{}", parts[0], reencode(&more_seats), parts[2]),
        ),
        (
            "a later exp",
            format!("{}.{}.{}", parts[0], reencode(&later), parts[2]),
        ),
        ("alg none", format!("{}.{}.", reencode(&none), parts[1])),
        (
            "another kid",
            format!("{}.{}.{}", reencode(&other_kid), parts[1], parts[2]),
        ),
    ] {
        assert!(verify(&forged, &keys).is_err(), "{what} verified");
    }
    // Signed by a key of its own, under the published kid.
    let foreign = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let signing_input = format!("{}.{}", parts[0], reencode(&more_seats));
    use ed25519_dalek::Signer;
    let sig = foreign.sign(signing_input.as_bytes());
    let forged = format!("{signing_input}.{}", B64.encode(sig.to_bytes()));
    assert_eq!(verify(&forged, &keys).unwrap_err(), "bad signature");
    s.stop().await;
}

#[tokio::test]
async fn after_a_rotation_old_certificates_verify_until_their_key_is_retired() {
    let mut s = TestServer::start().await;
    product_with_lease(&mut s, "ROTA", None).await;
    let license = s.issue(license_req("ROTA", 1, 1)).await;
    let old = s
        .activate(&license.key, "ws-1")
        .await
        .unwrap()
        .license_certificate;
    let before = jwks(&mut s).await;
    let old_kid = before.keys().next().unwrap().clone();

    let db_url = s.db_url.clone();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensd"))
            .args(args)
            .args(["--database-url", &db_url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["signing-key", "list"]);
    assert!(
        listed.starts_with(&format!("{old_kid}\tactive\t")),
        "{listed}"
    );
    let new_kid = cli(&["signing-key", "rotate"]).trim().to_string();
    assert_ne!(new_kid, old_kid);
    // The server re-reads its keys within 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys = jwks(&mut s).await;
        if keys.contains_key(&new_kid) {
            break keys;
        }
        assert!(std::time::Instant::now() < deadline, "rotation not seen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(keys.contains_key(&old_kid), "the old key stays published");
    verify(&old, &keys).expect("a certificate signed before the rotation verifies");
    let fresh = validate(&mut s, &license.key, "ws-1")
        .await
        .license_certificate;
    let header: Value =
        serde_json::from_slice(&B64.decode(fresh.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["kid"], new_kid.as_str(), "signed with the new key");
    verify(&fresh, &keys).unwrap();

    // The active key cannot be retired; the old one can.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensd"))
        .args([
            "signing-key",
            "retire",
            &new_kid,
            "--database-url",
            &s.db_url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rotate first"));
    cli(&["signing-key", "retire", &old_kid]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys = jwks(&mut s).await;
        if !keys.contains_key(&old_kid) {
            break keys;
        }
        assert!(std::time::Instant::now() < deadline, "retirement not seen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        verify(&old, &keys).unwrap_err(),
        format!("unknown kid {old_kid}")
    );
    verify(&fresh, &keys).unwrap();
    let listed = cli(&["signing-key", "list"]);
    assert!(
        listed.contains(&format!("{old_kid}\tretired\t")),
        "{listed}"
    );
    assert!(
        !listed.contains("BEGIN") && listed.lines().count() == 2,
        "{listed}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_key_file_signs_and_is_the_only_key_published() {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    std::fs::write(
        &path,
        key.to_pkcs8_pem(Default::default()).unwrap().as_bytes(),
    )
    .unwrap();
    let mut s = TestServer::start_with(licensd::server::Config {
        signing_key_file: Some(path),
        certificate_issuer: "acme-licensing".into(),
        ..Default::default()
    })
    .await;
    product_with_lease(&mut s, "FILE", None).await;
    let license = s.issue(license_req("FILE", 1, 1)).await;
    let jws = s
        .activate(&license.key, "ws-1")
        .await
        .unwrap()
        .license_certificate;
    let keys = jwks(&mut s).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys.values().next().unwrap(),
        &key.verifying_key().to_bytes().to_vec()
    );
    let c = verify(&jws, &keys).unwrap();
    assert_eq!(c["iss"], "acme-licensing");
    s.stop().await;

    // An unreadable or wrong key file stops the server at start.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let db = common::TestDb::sqlite();
    let err = licensd::server::Application::build(licensd::server::Config {
        listen: "127.0.0.1:0".into(),
        database_url: db.url.clone(),
        signing_key_file: Some(bad),
        ..Default::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("bad.pem"), "{err}");
}

#[tokio::test]
async fn certificate_inspect_prints_the_claims_and_checks_the_signature() {
    let mut s = TestServer::start().await;
    let (license, jws) = activated(&mut s, "INSP").await;
    let set = s
        .activation
        .get_signing_keys(pb::GetSigningKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks;
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, &set).unwrap();
    let inspect = |cert: &str, with_keys: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_licensd"));
        cmd.args(["certificate", "inspect", cert]);
        if with_keys {
            cmd.arg("--jwks").arg(&jwks_file);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = inspect(&jws, true);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("sub: \"{}\"", license.key)), "{out}");
    assert!(out.contains("fingerprint: \"ws-1\""), "{out}");
    assert!(
        out.contains("expires in 30.0 days") || out.contains("expires in 29.9 days"),
        "{out}"
    );
    assert!(out.contains("signature: verifies with key"), "{out}");
    let (ok, out, _) = inspect(&jws, false);
    assert!(ok && out.contains("signature: not checked"), "{out}");
    // A changed claim: printed, and refused.
    let parts: Vec<&str> = jws.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    claims["seats"] = 50.into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    );
    let (ok, out, err) = inspect(&forged, true);
    assert!(!ok);
    assert!(out.contains("seats: 50"), "{out}");
    assert!(err.contains("does not verify"), "{err}");
    let (ok, _, err) = inspect("not.a-certificate", true);
    assert!(!ok && err.contains("3"), "{err}");
    // Nothing private in what it prints.
    assert!(!set.contains("\"d\""));
    s.stop().await;
}

/// The kid a certificate's header names.
fn kid_of(jws: &str) -> String {
    let header: Value =
        serde_json::from_slice(&B64.decode(jws.split('.').next().unwrap()).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_string()
}

async fn replica_jwks(nodes: &cluster::Nodes, i: usize) -> HashMap<String, Vec<u8>> {
    let text = nodes
        .activation(i)
        .get_signing_keys(pb::GetSigningKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks;
    parse_jwks(&text)
}

/// Three replicas share the keys: a certificate from one verifies with
/// every replica's key set, and after a rotation every replica signs with
/// the new key while the old certificate still verifies.
async fn replicas_share_keys_and_rotations(nodes: cluster::Nodes) {
    cluster::create_product(&nodes, "REPL", "1.0.0").await;
    let key = cluster::issue(&nodes, license_req("REPL", 3, 1)).await.key;
    let old = nodes
        .activation(0)
        .activate(cluster::activate_req(&key, "ws-1"))
        .await
        .unwrap()
        .into_inner()
        .license_certificate;
    let old_kid = kid_of(&old);
    for i in 0..nodes.replicas() {
        let keys = replica_jwks(&nodes, i).await;
        assert_eq!(keys.len(), 1, "one key, shared, on replica {i}");
        verify(&old, &keys).unwrap_or_else(|e| panic!("replica {i}: {e}"));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensd"))
        .args([
            "signing-key",
            "rotate",
            "--database-url",
            &nodes.database_url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_kid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_ne!(new_kid, old_kid);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for i in 0..nodes.replicas() {
        loop {
            let v = nodes
                .activation(i)
                .validate(pb::ValidateRequest {
                    license_key: key.clone(),
                    fingerprint: "ws-1".into(),
                    client_version: String::new(),
                    certificate_expires_at: None,
                })
                .await
                .unwrap()
                .into_inner();
            if kid_of(&v.license_certificate) == new_kid {
                let keys = replica_jwks(&nodes, i).await;
                verify(&v.license_certificate, &keys).unwrap();
                verify(&old, &keys).unwrap_or_else(|e| panic!("old on replica {i}: {e}"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} still signs with {old_kid}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replicas_share_signing_keys_and_all_sign_with_the_new_key_after_a_rotation() {
    cluster::on_postgres(replicas_share_keys_and_rotations).await;
}

/// The same on one SQLite file shared by three `licensd serve`: the keys
/// live in the database, whichever backend it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_replicas_share_signing_keys_and_all_sign_with_the_new_key_after_a_rotation() {
    cluster::on_sqlite(replicas_share_keys_and_rotations).await;
}
