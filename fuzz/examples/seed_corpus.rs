//! Writes the seed inputs of both fuzz targets into `seeds/<target>/`:
//! well-formed keys, codes, versions, product codes and tokens for
//! `parse_keys`, and one valid request per RPC for `request_conversion`
//! (with the `@K` / `@C` placeholders that target substitutes).
//!
//! `cargo run --example seed_corpus` (from the `fuzz` directory).

use std::path::Path;

use licensd::domain::auth::Token;
use licensd::domain::license::LicenseKind;
use licensd::domain::{LicenseKey, ProductCode, RenewalCode};
use licensd::proto as pb;
use prost::Message;

fn counter_bytes(seed: u8) -> impl FnMut(&mut [u8]) {
    let mut n = seed;
    move |buf: &mut [u8]| {
        for b in buf {
            n = n.wrapping_mul(31).wrapping_add(7);
            *b = n;
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    let keys = root.join("parse_keys");
    std::fs::create_dir_all(&keys).unwrap();
    let acme = ProductCode::parse("ACME").unwrap();
    for (i, kind) in [LicenseKind::Standard, LicenseKind::Promo, LicenseKind::Nfr]
        .into_iter()
        .enumerate()
    {
        let k = LicenseKey::generate_with(&acme, kind, counter_bytes(i as u8));
        write(&keys, &format!("key-{kind}"), k.to_string().as_bytes());
        write(
            &keys,
            &format!("key-{kind}-normalized"),
            k.normalized().as_bytes(),
        );
    }
    let c = RenewalCode::generate_with(counter_bytes(9));
    write(&keys, "code", c.expose_display().as_bytes());
    write(&keys, "code-normalized", c.expose_normalized().as_bytes());
    write(&keys, "version", b"4.10.0");
    write(&keys, "version-long", b"1.2.3.4.5.6");
    write(&keys, "product", b"acme");
    // A token of the right shape (not a real one).
    let token = format!("lsd_{}_{}", "A".repeat(12), "B".repeat(32));
    assert!(Token::parse(&token).is_some());
    write(&keys, "token", token.as_bytes());

    let reqs = root.join("request_conversion");
    std::fs::create_dir_all(&reqs).unwrap();
    let product = pb::Product {
        code: "ZETA".into(),
        display_name: "Zeta".into(),
        latest_version: "2.0".into(),
        personal_terms_years: vec![1, 2],
        business_terms_years: vec![1, 2, 3],
        grace_period_months: Some(3),
        renewal_basis: 1,
    };
    let seeds: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "create_product",
            pb::CreateProductRequest {
                product: Some(product.clone()),
            }
            .encode_to_vec(),
        ),
        (
            1,
            "get_product",
            pb::GetProductRequest {
                code: "ACME".into(),
            }
            .encode_to_vec(),
        ),
        (
            2,
            "list_products",
            pb::ListProductsRequest {
                page_size: 10,
                page_token: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            3,
            "update_product",
            pb::UpdateProductRequest {
                product: Some(pb::Product {
                    code: "ACME".into(),
                    latest_version: "5.0".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["latest_version".into()],
                }),
            }
            .encode_to_vec(),
        ),
        (
            4,
            "issue_license",
            pb::IssueLicenseRequest {
                request_id: "seed-1".into(),
                product: "ACME".into(),
                edition: pb::Edition::Personal as i32,
                kind: pb::LicenseKind::Standard as i32,
                seats: 1,
                term_years: 2,
                starts_at: None,
                order_ref: "o".into(),
                customer_ref: "c".into(),
                reseller: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            5,
            "get_license",
            pb::GetLicenseRequest {
                license_key: "@K".into(),
            }
            .encode_to_vec(),
        ),
        (
            6,
            "list_licenses",
            pb::ListLicensesRequest {
                product: "ACME".into(),
                page_size: 5,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            7,
            "suspend_license",
            pb::SuspendLicenseRequest {
                license_key: "@K".into(),
                reason: "chargeback".into(),
                request_id: "seed-2".into(),
            }
            .encode_to_vec(),
        ),
        (
            8,
            "reinstate_license",
            pb::ReinstateLicenseRequest {
                license_key: "@K".into(),
                reason: "paid".into(),
                request_id: "seed-3".into(),
            }
            .encode_to_vec(),
        ),
        (
            9,
            "revoke_license",
            pb::RevokeLicenseRequest {
                license_key: "@K".into(),
                reason: "fraud".into(),
                request_id: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            10,
            "list_license_events",
            pb::ListLicenseEventsRequest {
                license_key: "@K".into(),
                page_size: 3,
                page_token: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            11,
            "issue_renewal_code",
            pb::IssueRenewalCodeRequest {
                request_id: "seed-4".into(),
                product: "ACME".into(),
                edition: pb::Edition::Business as i32,
                seats: 3,
                term_years: 1,
                order_ref: "o".into(),
                reseller: "r".into(),
            }
            .encode_to_vec(),
        ),
        (
            12,
            "get_renewal_code",
            pb::GetRenewalCodeRequest {
                renewal_code: "@C".into(),
            }
            .encode_to_vec(),
        ),
        (
            13,
            "void_renewal_code",
            pb::VoidRenewalCodeRequest {
                renewal_code: "@C".into(),
                reason: "refund".into(),
                request_id: "seed-5".into(),
            }
            .encode_to_vec(),
        ),
        (
            14,
            "activate",
            pb::ActivateRequest {
                license_key: "@K".into(),
                fingerprint: "fp-2".into(),
                hostname: "host-2".into(),
                client_version: "4.10.0".into(),
            }
            .encode_to_vec(),
        ),
        (
            15,
            "deactivate",
            pb::DeactivateRequest {
                license_key: "@K".into(),
                fingerprint: "fp-1".into(),
            }
            .encode_to_vec(),
        ),
        (
            16,
            "validate",
            pb::ValidateRequest {
                license_key: "@K".into(),
                fingerprint: "fp-1".into(),
                client_version: "4.9".into(),
                certificate_expires_at: None,
            }
            .encode_to_vec(),
        ),
        (
            17,
            "redeem_renewal_code",
            pb::RedeemRenewalCodeRequest {
                license_key: "@K".into(),
                renewal_code: "@C".into(),
                fingerprint: "fp-1".into(),
                client_version: "4.10.0".into(),
            }
            .encode_to_vec(),
        ),
    ];
    for (selector, name, body) in seeds {
        let mut bytes = vec![selector];
        bytes.extend_from_slice(&body);
        write(&reqs, name, &bytes);
    }
    println!("seeds written to {}", root.display());
}
