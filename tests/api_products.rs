//! The API suite, products (ProductService): creation with the default policy,
//! reading, paging through the catalogue, updates with and without a field
//! mask, and the product refusals. Shared helpers: tests/common/api.rs.

mod common;

use common::api::{LATEST, assert_bad_field};
use common::{TestServer, assert_refused, code_req, license_req};
use licensd::proto as pb;
use tonic::Code;

#[tokio::test]
async fn api_create_product_applies_the_default_policy() {
    let mut s = TestServer::start().await;
    let created = s.product("ACME", LATEST).await;
    assert_eq!(created.code, "ACME");
    assert_eq!(created.display_name, "ACME product");
    assert_eq!(created.latest_version, "4.10.0");
    assert_eq!(created.personal_terms_years, vec![1, 2]);
    assert_eq!(created.business_terms_years, vec![1, 2, 3]);
    assert_eq!(created.grace_period_months, Some(1));
    assert_eq!(created.renewal_basis, pb::RenewalBasis::FromExpiry as i32);

    let got = s
        .products
        .get_product(pb::GetProductRequest {
            code: "ACME".into(),
        })
        .await
        .expect("get product")
        .into_inner();
    assert_eq!(got, created);
    s.stop().await;
}

#[tokio::test]
async fn api_list_products_pages_through_every_product_in_code_order() {
    let mut s = TestServer::start().await;
    for code in ["EEE", "BBB", "AAA", "DDD", "CCC"] {
        s.product(code, "1.0.0").await;
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = s
            .products
            .list_products(pb::ListProductsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .expect("list products")
            .into_inner();
        pages.push(
            page.products
                .iter()
                .map(|p| p.code.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(
        pages,
        vec![
            vec!["AAA".to_string(), "BBB".to_string()],
            vec!["CCC".to_string(), "DDD".to_string()],
            vec!["EEE".to_string()],
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn r6_update_product_with_a_mask_bumps_latest_version_only() {
    let mut s = TestServer::start().await;
    s.product("ACME", "4.9.2").await;
    let updated = s
        .products
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "not in the mask".into(),
                latest_version: "4.10.0".into(),
                grace_period_months: Some(5),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .expect("update product")
        .into_inner();
    assert_eq!(updated.latest_version, "4.10.0");
    assert_eq!(updated.display_name, "ACME product");
    assert_eq!(updated.grace_period_months, Some(1));
    assert_eq!(updated.personal_terms_years, vec![1, 2]);
    assert_eq!(updated.business_terms_years, vec![1, 2, 3]);
    assert_eq!(updated.renewal_basis, pb::RenewalBasis::FromExpiry as i32);
    let got = s
        .products
        .get_product(pb::GetProductRequest {
            code: "ACME".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, updated);

    // An empty mask updates the fields set to non-default values only.
    let renamed = s
        .products
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "Acme Studio".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect("update product")
        .into_inner();
    assert_eq!(renamed.display_name, "Acme Studio");
    assert_eq!(renamed.latest_version, "4.10.0");
    assert_eq!(renamed.grace_period_months, Some(1));
    assert_eq!(renamed.personal_terms_years, vec![1, 2]);
    assert_eq!(renamed.business_terms_years, vec![1, 2, 3]);
    assert_eq!(renamed.renewal_basis, pb::RenewalBasis::FromExpiry as i32);
    s.stop().await;
}

#[tokio::test]
async fn api_product_refusals_already_exists_not_found_and_bad_code() {
    let mut s = TestServer::start().await;
    s.product("ACME", LATEST).await;
    let again = s
        .products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "acme".into(),
                ..Default::default()
            }),
        })
        .await;
    let md = assert_refused(again, Code::AlreadyExists, "PRODUCT_ALREADY_EXISTS");
    assert_eq!(md.get("product").map(String::as_str), Some("ACME"));

    let missing = s
        .products
        .get_product(pb::GetProductRequest {
            code: "NOPE".into(),
        })
        .await;
    assert_refused(missing, Code::NotFound, "PRODUCT_NOT_FOUND");
    let issue = s.licenses.issue_license(license_req("NOPE", 1, 1)).await;
    assert_refused(issue, Code::NotFound, "PRODUCT_NOT_FOUND");
    let code = s.licenses.issue_renewal_code(code_req("NOPE", 1, 1)).await;
    assert_refused(code, Code::NotFound, "PRODUCT_NOT_FOUND");

    for bad in ["XPROX", "NFR1", "A", "TOOLONGCODE", "AC-ME", ""] {
        let res = s
            .products
            .create_product(pb::CreateProductRequest {
                product: Some(pb::Product {
                    code: bad.into(),
                    ..Default::default()
                }),
            })
            .await;
        assert_bad_field(res, "product.code");
    }
    let res = s.licenses.issue_license(license_req("AC!ME", 1, 1)).await;
    assert_bad_field(res, "product");
    s.stop().await;
}
