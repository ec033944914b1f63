//! The API suite, refused input: malformed keys, codes and fields (each named
//! in a BadRequest), unknown licenses and codes, terms not offered, and which
//! check comes first; none of them writes anything. Shared helpers:
//! tests/common/api.rs.

mod common;

use common::api::{
    LATEST, assert_bad_field, at, deactivate, get_code, get_license, license_from, list_licenses,
    listed_keys, personal_license, pts, redeem, revoke, suspend, types, unknown_code, unknown_key,
    void_code,
};
use common::{TestServer, assert_refused, bad_fields, code_req, error_info, license_req};
use licensd::proto as pb;
use prost_types::Timestamp;
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `value` with one character of its random part (the first after the first
/// group of a code, or after the product code of a STANDARD key) changed into
/// another symbol of the alphabet: a typo.
fn mistype(value: &str) -> String {
    let alphabet = licensd::domain::keys::ALPHABET;
    let mut bytes = value.as_bytes().to_vec();
    let i = value.find('-').expect("dash-separated") + 1;
    let pos = alphabet
        .iter()
        .position(|&c| c == bytes[i])
        .expect("a symbol of the alphabet");
    bytes[i] = alphabet[(pos + 1) % alphabet.len()];
    let typo = String::from_utf8(bytes).unwrap();
    assert_ne!(typo, value);
    typo
}

#[tokio::test]
async fn api_malformed_input_is_checked_before_the_renewal_code_in_the_key_field() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let c = s.code(code_req("ACME", 1, 1)).await;
    let res = s
        .activation
        .activate(pb::ActivateRequest {
            license_key: c.renewal_code.clone(),
            fingerprint: "f".repeat(300),
            hostname: "h".into(),
            client_version: String::new(),
        })
        .await;
    assert_bad_field(res, "fingerprint");
    let res = redeem(&mut s, &c.renewal_code, "not-a-code", "fp-1", LATEST).await;
    let status = res.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_info(&status).0, "MALFORMED_RENEWAL_CODE");
    s.stop().await;
}

#[tokio::test]
async fn api_a_mistyped_key_or_code_is_malformed_and_writes_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    let c = s.code(code_req("ACME", 1, 1)).await;
    let typo = mistype(&l.key);
    let events_before = s.events(&l.key).await;

    let check_key =
        |res: Result<_, tonic::Status>| assert_refused(res, Code::InvalidArgument, "MALFORMED_KEY");
    let md = check_key(get_license(&mut s, &typo).await.map(|_| ()));
    assert_eq!(md.get("field").map(String::as_str), Some("license_key"));
    check_key(s.activate(&typo, "fp-1").await.map(|_| ()));
    check_key(s.validate(&typo, "", "").await.map(|_| ()));
    check_key(deactivate(&mut s, &typo, "fp-1").await.map(|_| ()));
    check_key(
        redeem(&mut s, &typo, &c.renewal_code, "fp-1", LATEST)
            .await
            .map(|_| ()),
    );
    check_key(suspend(&mut s, &typo, "x", "").await.map(|_| ()));
    let status = get_license(&mut s, &typo).await.unwrap_err();
    assert_eq!(bad_fields(&status), vec!["license_key".to_string()]);
    for garbage in ["", "hello", "ACME-!!!!!"] {
        check_key(get_license(&mut s, garbage).await.map(|_| ()));
    }

    let code_typo = mistype(&c.renewal_code);
    let status = get_code(&mut s, &code_typo).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_info(&status).0, "MALFORMED_RENEWAL_CODE");
    assert_eq!(bad_fields(&status), vec!["renewal_code".to_string()]);
    assert_refused(
        void_code(&mut s, &code_typo, "refund").await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    // A redemption with malformed input writes no history.
    assert_refused(
        redeem(&mut s, &l.key, &code_typo, "fp-1", LATEST).await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    assert_refused(
        redeem(&mut s, &l.key, &l.key, "fp-1", LATEST).await,
        Code::InvalidArgument,
        "MALFORMED_RENEWAL_CODE",
    );
    assert_bad_field(
        redeem(&mut s, &l.key, &c.renewal_code, "fp-1", "latest").await,
        "client_version",
    );
    assert_bad_field(
        redeem(&mut s, &l.key, &c.renewal_code, "", LATEST).await,
        "fingerprint",
    );
    assert_eq!(s.events(&l.key).await, events_before);
    assert_eq!(
        get_code(&mut s, &c.renewal_code).await.unwrap().state,
        pb::RenewalCodeState::Unredeemed as i32
    );
    assert_eq!(s.license(&l.key).await.renewal_count, 0);
    s.stop().await;
}

#[tokio::test]
async fn api_unknown_licenses_and_codes_are_not_found_and_write_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let key = unknown_key();
    assert_refused(
        get_license(&mut s, &key).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        s.activate(&key, "fp-1").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        deactivate(&mut s, &key, "fp-1").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        suspend(&mut s, &key, "x", "").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        revoke(&mut s, &key, "x").await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_refused(
        s.licenses
            .list_license_events(pb::ListLicenseEventsRequest {
                license_key: key.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    let c = s.code(code_req("ACME", 1, 1)).await;
    assert_refused(
        redeem(&mut s, &key, &c.renewal_code, "fp-1", LATEST).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );

    let code = unknown_code();
    assert_refused(
        get_code(&mut s, &code).await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    assert_refused(
        void_code(&mut s, &code, "refund").await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    let l = s.issue(license_req("ACME", 1, 1)).await;
    s.activate(&l.key, "fp-1").await.unwrap();
    assert_refused(
        redeem(&mut s, &l.key, &code, "fp-1", LATEST).await,
        Code::NotFound,
        "RENEWAL_CODE_NOT_FOUND",
    );
    assert_eq!(types(&s.events(&l.key).await), vec!["issued", "activated"]);
    s.stop().await;
}

#[tokio::test]
async fn r1_a_term_not_offered_for_the_edition_is_refused() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let cases = [
        (personal_license("ACME", 1, 3), "3"),
        (license_req("ACME", 1, 4), "4"),
        (license_req("ACME", 1, 0), "0"),
    ];
    for (req, term) in cases {
        let status = s.licenses.issue_license(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let (reason, md) = error_info(&status);
        assert_eq!(reason, "TERM_NOT_ALLOWED");
        assert_eq!(md.get("term_years").map(String::as_str), Some(term));
        assert_eq!(bad_fields(&status), vec!["term_years".to_string()]);
    }
    let mut code = code_req("ACME", 1, 3);
    code.edition = pb::Edition::Personal as i32;
    let status = s.licenses.issue_renewal_code(code).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_info(&status).0, "TERM_NOT_ALLOWED");
    assert_eq!(bad_fields(&status), vec!["term_years".to_string()]);
    // Nothing was issued.
    assert!(listed_keys(&mut s, Default::default()).await.is_empty());
    // The business 3-year term and personal 2-year term are allowed.
    s.issue(license_req("ACME", 1, 3)).await;
    s.issue(personal_license("ACME", 1, 2)).await;
    s.stop().await;
}

#[tokio::test]
async fn api_invalid_fields_are_named_in_a_bad_request() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let l = s.issue(license_req("ACME", 1, 1)).await;

    let mut r = license_req("ACME", 0, 1);
    assert_bad_field(s.licenses.issue_license(r.clone()).await, "seats");
    r = license_req("ACME", 1, 1);
    r.edition = pb::Edition::Unspecified as i32;
    assert_bad_field(s.licenses.issue_license(r).await, "edition");
    r = license_req("ACME", 1, 1);
    r.request_id = String::new();
    assert_bad_field(s.licenses.issue_license(r).await, "request_id");
    r = license_req("ACME", 1, 1);
    r.product = "A".into();
    assert_bad_field(s.licenses.issue_license(r).await, "product");
    r = license_from("ACME", 1, 1, pts(at("1900-01-01T00:00:00Z")));
    assert_bad_field(s.licenses.issue_license(r).await, "starts_at");
    r = license_from(
        "ACME",
        1,
        1,
        Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        },
    );
    assert_bad_field(s.licenses.issue_license(r).await, "starts_at");

    let mut c = code_req("ACME", 0, 1);
    assert_bad_field(s.licenses.issue_renewal_code(c.clone()).await, "seats");
    c = code_req("ACME", 1, 1);
    c.edition = pb::Edition::Unspecified as i32;
    assert_bad_field(s.licenses.issue_renewal_code(c).await, "edition");
    c = code_req("ACME", 1, 1);
    c.request_id = String::new();
    assert_bad_field(s.licenses.issue_renewal_code(c).await, "request_id");

    let res = s
        .activation
        .activate(pb::ActivateRequest {
            license_key: l.key.clone(),
            fingerprint: "f".repeat(300),
            hostname: "h".into(),
            client_version: String::new(),
        })
        .await;
    assert_bad_field(res, "fingerprint");
    assert_bad_field(s.activate(&l.key, "").await, "fingerprint");
    assert_eq!(s.license(&l.key).await.seats_used, 0);

    let list = |page_size: i32, token: &str| pb::ListLicensesRequest {
        page_size,
        page_token: token.into(),
        ..Default::default()
    };
    assert_bad_field(list_licenses(&mut s, list(-1, "")).await, "page_size");
    assert_bad_field(list_licenses(&mut s, list(2, "bogus")).await, "page_token");
    assert_bad_field(
        list_licenses(
            &mut s,
            pb::ListLicensesRequest {
                expires_after: Some(Timestamp {
                    seconds: 253_402_300_800, // year 10000
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
        .await,
        "expires_after",
    );
    assert_bad_field(
        list_licenses(
            &mut s,
            pb::ListLicensesRequest {
                expires_before: Some(Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..Default::default()
            },
        )
        .await,
        "expires_before",
    );
    assert_bad_field(
        s.products
            .list_products(pb::ListProductsRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await,
        "page_size",
    );
    assert_bad_field(
        s.products
            .list_products(pb::ListProductsRequest {
                page_size: 2,
                page_token: "bogus".into(),
            })
            .await,
        "page_token",
    );
    for (page_size, token, field) in [(-1, "", "page_size"), (2, "bogus", "page_token")] {
        assert_bad_field(
            s.licenses
                .list_license_events(pb::ListLicenseEventsRequest {
                    license_key: l.key.clone(),
                    page_size,
                    page_token: token.into(),
                })
                .await,
            field,
        );
    }
    assert_eq!(
        listed_keys(&mut s, Default::default()).await,
        vec![l.key.clone()]
    );
    assert_eq!(types(&s.events(&l.key).await), vec!["issued"]);
    s.stop().await;
}

#[tokio::test]
async fn api_malformed_seats_are_refused_before_the_product_or_request_id_is_looked_up() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    // Unknown product and seats 0: the field error comes first.
    assert_bad_field(
        s.licenses.issue_license(license_req("ZZZZ", 0, 1)).await,
        "seats",
    );
    assert_bad_field(
        s.licenses.issue_renewal_code(code_req("ZZZZ", 0, 1)).await,
        "seats",
    );
    // A used request id with a malformed payload: the field error comes first.
    let req = license_req("ACME", 1, 1);
    s.issue(req.clone()).await;
    let mut bad = req.clone();
    bad.seats = 0;
    assert_bad_field(s.licenses.issue_license(bad).await, "seats");
    s.stop().await;
}
