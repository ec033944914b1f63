//! Arbitrary bytes decoded as every request message of `licensing.v1` and,
//! when they decode, handed to the real service implementations
//! (`ProductApi`, `LicenseApi`, `ActivationApi`) over a SQLite store.
//!
//! The property: no panic, and never `INTERNAL` or `UNKNOWN` — every bad
//! input is answered with a proper client-side error code.
//!
//! Input layout: the first byte picks the RPC (modulo the number of RPCs),
//! the rest is the protobuf body. To let the fuzzer reach the paths behind a
//! real license and renewal code (whose keys are random and check-summed,
//! so it could never guess them), a `license_key` field that is exactly
//! `@K` is replaced by the key of a license issued at start-up, and a
//! `renewal_code` field that is exactly `@C` by a renewal code issued at
//! start-up. `cargo run --example seed_corpus` writes seeds that use them.
//!
//! The handlers are called directly, below the authorization layer (which
//! is tested elsewhere): this target is about request conversion and the
//! store, not about who may call.
//!
//! The database lives for the whole fuzzing process, so state carries over
//! between inputs (a license may be suspended by one input and validated by
//! the next); that is intended, and a crash reproduces from the single
//! input in a fresh database in nearly all cases.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use licensd::grpc::auth::FailureWindow;
use licensd::grpc::{ActivationApi, Ctx, LicenseApi, ProductApi, system_clock};
use licensd::proto as pb;
use licensd::proto::activation_service_server::ActivationService;
use licensd::proto::license_service_server::LicenseService;
use licensd::proto::product_service_server::ProductService;
use licensd::store::{DatabaseUrl, Store};
use prost::Message;
use tonic::{Code, Request};

struct Harness {
    rt: tokio::runtime::Runtime,
    products: ProductApi,
    licenses: LicenseApi,
    activation: ActivationApi,
    /// The key of a license issued at start-up (substituted for `@K`).
    key: String,
    /// A renewal code issued at start-up (substituted for `@C`).
    code: String,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("fuzz.db").display());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = rt.block_on(async {
            DatabaseUrl::parse(&url)
                .expect("sqlite url")
                .open(Default::default())
                .await
                .expect("open store")
        });
        let store: Arc<dyn Store> = Arc::new(store);
        let ctx = Ctx {
            store,
            clock: system_clock(),
            // Generous, so that the limit itself is rarely what answers.
            code_failures: Arc::new(FailureWindow::new(1_000_000, Duration::from_secs(3600))),
        };
        let products = ProductApi::new(ctx.clone());
        let licenses = LicenseApi::new(ctx.clone());
        let activation = ActivationApi::new(ctx);
        let (key, code) = rt.block_on(async {
            products
                .create_product(Request::new(pb::CreateProductRequest {
                    product: Some(pb::Product {
                        code: "ACME".into(),
                        display_name: "Acme".into(),
                        latest_version: "4.10.0".into(),
                        ..Default::default()
                    }),
                }))
                .await
                .expect("create product");
            let license = licenses
                .issue_license(Request::new(pb::IssueLicenseRequest {
                    request_id: "fuzz-license".into(),
                    product: "ACME".into(),
                    edition: pb::Edition::Business as i32,
                    kind: pb::LicenseKind::Standard as i32,
                    seats: 3,
                    term_years: 1,
                    order_ref: "fuzz".into(),
                    customer_ref: "fuzz".into(),
                    ..Default::default()
                }))
                .await
                .expect("issue license")
                .into_inner();
            activation
                .activate(Request::new(pb::ActivateRequest {
                    license_key: license.key.clone(),
                    fingerprint: "fp-1".into(),
                    hostname: "host-1".into(),
                    client_version: "4.10.0".into(),
                }))
                .await
                .expect("activate");
            let code = licenses
                .issue_renewal_code(Request::new(pb::IssueRenewalCodeRequest {
                    request_id: "fuzz-code".into(),
                    product: "ACME".into(),
                    edition: pb::Edition::Business as i32,
                    seats: 3,
                    term_years: 1,
                    order_ref: "fuzz".into(),
                    ..Default::default()
                }))
                .await
                .expect("issue code")
                .into_inner();
            (license.key, code.renewal_code)
        });
        Harness {
            rt,
            products,
            licenses,
            activation,
            key,
            code,
            _dir: dir,
        }
    })
}

impl Harness {
    fn key(&self, k: &mut String) {
        if k == "@K" {
            *k = self.key.clone();
        }
    }

    fn code(&self, c: &mut String) {
        if c == "@C" {
            *c = self.code.clone();
        }
    }
}

/// Decodes `body` as `$ty`; if it decodes, runs `$call` on it and checks the
/// status code.
macro_rules! rpc {
    ($h:expr, $body:expr, $ty:ty, |$req:ident| $call:expr) => {{
        if let Ok(mut $req) = <$ty>::decode($body) {
            let h: &Harness = $h;
            let _ = &mut $req;
            let res = h.rt.block_on(async { $call.await.map(|_| ()) });
            check(stringify!($ty), res);
        }
    }};
}

fn check(what: &str, res: Result<(), tonic::Status>) {
    if let Err(status) = res {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "{what}: {status:?}"
        );
    }
}

const RPCS: u8 = 18;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let h = harness();
    match selector % RPCS {
        // ProductService
        0 => rpc!(h, body, pb::CreateProductRequest, |r| h
            .products
            .create_product(Request::new(r))),
        1 => rpc!(h, body, pb::GetProductRequest, |r| h
            .products
            .get_product(Request::new(r))),
        2 => rpc!(h, body, pb::ListProductsRequest, |r| h
            .products
            .list_products(Request::new(r))),
        3 => rpc!(h, body, pb::UpdateProductRequest, |r| h
            .products
            .update_product(Request::new(r))),
        // LicenseService
        4 => rpc!(h, body, pb::IssueLicenseRequest, |r| h
            .licenses
            .issue_license(Request::new(r))),
        5 => rpc!(h, body, pb::GetLicenseRequest, |r| {
            h.key(&mut r.license_key);
            h.licenses.get_license(Request::new(r))
        }),
        6 => rpc!(h, body, pb::ListLicensesRequest, |r| h
            .licenses
            .list_licenses(Request::new(r))),
        7 => rpc!(h, body, pb::SuspendLicenseRequest, |r| {
            h.key(&mut r.license_key);
            h.licenses.suspend_license(Request::new(r))
        }),
        8 => rpc!(h, body, pb::ReinstateLicenseRequest, |r| {
            h.key(&mut r.license_key);
            h.licenses.reinstate_license(Request::new(r))
        }),
        9 => rpc!(h, body, pb::RevokeLicenseRequest, |r| {
            h.key(&mut r.license_key);
            h.licenses.revoke_license(Request::new(r))
        }),
        10 => rpc!(h, body, pb::ListLicenseEventsRequest, |r| {
            h.key(&mut r.license_key);
            h.licenses.list_license_events(Request::new(r))
        }),
        11 => rpc!(h, body, pb::IssueRenewalCodeRequest, |r| h
            .licenses
            .issue_renewal_code(Request::new(r))),
        12 => rpc!(h, body, pb::GetRenewalCodeRequest, |r| {
            h.code(&mut r.renewal_code);
            h.licenses.get_renewal_code(Request::new(r))
        }),
        13 => rpc!(h, body, pb::VoidRenewalCodeRequest, |r| {
            h.code(&mut r.renewal_code);
            h.licenses.void_renewal_code(Request::new(r))
        }),
        // ActivationService
        14 => rpc!(h, body, pb::ActivateRequest, |r| {
            h.key(&mut r.license_key);
            h.activation.activate(Request::new(r))
        }),
        15 => rpc!(h, body, pb::DeactivateRequest, |r| {
            h.key(&mut r.license_key);
            h.activation.deactivate(Request::new(r))
        }),
        16 => rpc!(h, body, pb::ValidateRequest, |r| {
            h.key(&mut r.license_key);
            h.activation.validate(Request::new(r))
        }),
        _ => rpc!(h, body, pb::RedeemRenewalCodeRequest, |r| {
            h.key(&mut r.license_key);
            h.code(&mut r.renewal_code);
            h.activation.redeem_renewal_code(Request::new(r))
        }),
    }
});
