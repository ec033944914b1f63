use super::*;

#[test]
fn the_thumbprint_is_rfc_7638s() {
    // RFC 8037, appendix A.3: the thumbprint of the example key.
    let x = B64
        .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
        .unwrap();
    assert_eq!(
        thumbprint(&x.try_into().unwrap()),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
}

/// The signing (aws-lc-rs) signs as RFC 8032 says and as the key
/// handling's library (dalek) does, and dalek verifies it.
#[test]
fn the_signer_signs_as_rfc_8032_and_dalek_do() {
    use ed25519_dalek::{Signer as _, Verifier as _};
    let hex = |s: &str| hex::decode(s).unwrap();
    // RFC 8032, section 7.1, TEST 1 (the empty message).
    let secret = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
    let key = SigningKey::from_bytes(&secret.try_into().unwrap());
    assert_eq!(
        key.verifying_key().to_bytes().to_vec(),
        hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    );
    let pair = signing_pair(&key);
    assert_eq!(
        pair.sign(b"").as_ref(),
        hex(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        )
    );
    for _ in 0..4 {
        let key = SigningKey::from_pkcs8_der(&new_key(Utc::now()).private_der).unwrap();
        let message = format!("{}.{}", header("k"), rand::random::<u128>());
        let ours = pair_signature(&signing_pair(&key), message.as_bytes());
        assert_eq!(ours, key.sign(message.as_bytes()));
        key.verifying_key()
            .verify(message.as_bytes(), &ours)
            .unwrap();
    }
}

fn pair_signature(pair: &Ed25519KeyPair, message: &[u8]) -> ed25519_dalek::Signature {
    ed25519_dalek::Signature::from_slice(pair.sign(message).as_ref()).unwrap()
}

#[test]
fn a_stored_key_round_trips_and_its_private_part_is_never_printed() {
    let k = new_key(Utc::now());
    let back = SigningKey::from_pkcs8_der(&k.private_der).unwrap();
    assert_eq!(back.verifying_key().to_bytes().to_vec(), k.public_key);
    let shown = format!("{k:?}");
    assert!(shown.contains(&k.kid));
    assert!(!shown.contains("private"), "{shown}");
}

/// A ring signing with a fresh key, as `--signing-key-file` would make it.
fn ring() -> (KeyRing, ed25519_dalek::VerifyingKey) {
    let key = SigningKey::from_pkcs8_der(&new_key(Utc::now()).private_der).unwrap();
    let kid = thumbprint(&key.verifying_key().to_bytes());
    let ring = KeyRing {
        issuer: "https://licensd.example".into(),
        from_file: true,
        keys: RwLock::new(Keys {
            jwks: jwks(&[]),
            signer: Some((kid.clone(), signing_pair(&key), header(&kid))),
            generation: 1,
        }),
        issued: (0..SHARDS).map(|_| Default::default()).collect(),
    };
    (ring, key.verifying_key())
}

/// `jws`'s claims, after checking its signature with `public`.
fn verified(jws: &str, public: &ed25519_dalek::VerifyingKey) -> CertificateClaims {
    use ed25519_dalek::Verifier as _;
    let (input, signature) = jws.rsplit_once('.').unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&B64.decode(signature).unwrap()).unwrap();
    public
        .verify(input.as_bytes(), &signature)
        .expect("the signature verifies");
    let payload = input.split_once('.').unwrap().1;
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

/// A reused certificate is rebuilt from what was remembered, not kept as
/// text: it must be the signed bytes again, for every kind of fact (a
/// version written two ways, an expiry that caps the lease, a fingerprint
/// in any script), and anything that changes must sign anew.
#[test]
fn a_reused_certificate_is_byte_for_byte_the_one_signed() {
    use crate::domain::kinds::{LicenseKind, LicenseStatus};
    use crate::domain::{Edition, LicenseKey, ProductCode, Standing, Version};
    use chrono::{Duration, TimeZone};
    let (ring, public) = ring();
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 9, 30, 15).unwrap() + Duration::milliseconds(731);
    let versions = [
        None,
        Some(Version::parse("1.0").unwrap()),
        Some(Version::parse("1.0.0").unwrap()),
    ];
    let product = ProductCode::parse("ACME").unwrap();
    let mut seen = std::collections::HashSet::new();
    for (n, kind) in [LicenseKind::Standard, LicenseKind::Promo, LicenseKind::Nfr]
        .into_iter()
        .enumerate()
    {
        let key = LicenseKey::generate(&product, kind);
        for (expires_at, lease) in [
            (t0 + Duration::days(400), 30),
            // The license ends inside the lease, mid-second.
            (t0 + Duration::days(3) + Duration::milliseconds(250), 30),
            // It ends within the second in which the lease from `t0` ends,
            // after the lease from `t0`'s whole second: `exp` is that
            // whole second's lease end either way.
            (t0 + Duration::days(30) - Duration::milliseconds(200), 30),
            (t0 + Duration::days(400), 1),
        ] {
            for latest_version in &versions {
                for fingerprint in ["ws-1", "stanowisko-żółw-7", "端末-2"] {
                    let facts = CertificateFacts {
                        key: &key,
                        standing: Standing {
                            status: LicenseStatus::Active,
                            kind,
                            expires_at,
                            grace_period_months: 1,
                        },
                        edition: [Edition::Personal, Edition::Business][n % 2],
                        seats: 1 + n as u32,
                        latest_version: latest_version.as_ref(),
                        offline_lease_days: lease,
                        fingerprint,
                        fingerprint_bound: true,
                    };
                    let first = ring.certificate(&facts, t0).expect("a certificate");
                    let claims = verified(&first, &public);
                    assert_eq!(
                        claims,
                        certificate_claims(&facts, ring.issuer(), claims.jti.clone(), t0).unwrap()
                    );
                    assert!(
                        seen.insert(first.clone()),
                        "a version written differently is a new certificate"
                    );
                    for later in [
                        Duration::milliseconds(1),
                        Duration::seconds(1),
                        Duration::minutes(5),
                    ] {
                        assert_eq!(
                            ring.certificate(&facts, t0 + later).as_deref(),
                            Some(&*first)
                        );
                    }
                    // Past reuse_for: signed anew, and that one is reused.
                    let late = t0 + Duration::from_std(reuse_for(lease)).unwrap();
                    let fresh = ring.certificate(&facts, late).unwrap();
                    assert_ne!(fresh, first);
                    assert_eq!(verified(&fresh, &public).iat, late.timestamp());
                    assert_eq!(ring.certificate(&facts, late).unwrap(), fresh);
                    // Another seat count: not the same certificate.
                    let more = CertificateFacts {
                        seats: facts.seats + 1,
                        ..facts
                    };
                    let other = ring.certificate(&more, late).unwrap();
                    assert_eq!(verified(&other, &public).seats, facts.seats + 1);
                }
            }
        }
    }
    // What is remembered is a fraction of a certificate's ~600 bytes.
    assert!(
        std::mem::size_of::<Issued>() <= 200,
        "{}",
        std::mem::size_of::<Issued>()
    );
}
