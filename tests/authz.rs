//! The authorization matrix (docs/api.md, Roles): every RPC of the three
//! licensing services × every kind of caller, against the expected answer.
//!
//! * missing, malformed, unknown, forged or revoked token → UNAUTHENTICATED
//!   (ErrorInfo reason `UNAUTHENTICATED`);
//! * a valid token whose role may not call the method → PERMISSION_DENIED
//!   (reason `PERMISSION_DENIED`);
//! * allowed → anything but those two (and never INTERNAL): the call may still
//!   fail for business reasons, e.g. NOT_FOUND.
//!
//! Every refused call is also checked to have changed nothing: the whole
//! database is dumped before and after it and compared.

mod common;

use std::collections::BTreeSet;

use common::{TestServer, code_req, error_info, license_req};
use licensd::domain::auth::{Role, Token};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use prost::Message;
use tonic::{Code, Status};

const BIN: &str = env!("CARGO_BIN_EXE_licensd");

// ---------------------------------------------------------------------------
// The expected table.
// ---------------------------------------------------------------------------

/// Every RPC of ProductService, LicenseService and ActivationService.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    CreateProduct,
    GetProduct,
    ListProducts,
    UpdateProduct,
    IssueLicense,
    GetLicense,
    ListLicenses,
    SuspendLicense,
    ReinstateLicense,
    RevokeLicense,
    ListLicenseEvents,
    IssueRenewalCode,
    GetRenewalCode,
    VoidRenewalCode,
    ListEvents,
    WatchEvents,
    Activate,
    Deactivate,
    Validate,
    RedeemRenewalCode,
    GetSigningKeys,
}

/// Who may call an RPC.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// No token needed (the license key is the credential).
    Nothing,
    /// A live token with one of these roles.
    Role(&'static [Role]),
}

use Need::{Nothing, Role as R};

const ADMIN: &[Role] = &[Role::Admin];
const BILLING: &[Role] = &[Role::Admin, Role::Billing];
const READERS: &[Role] = &[Role::Admin, Role::Billing, Role::Support];

/// (service, rpc, who may call it) — the role table of docs/api.md (Roles).
#[rustfmt::skip]
const MATRIX: &[(&str, Rpc, Need)] = &[
    ("ProductService",    Rpc::CreateProduct,     R(ADMIN)),
    ("ProductService",    Rpc::GetProduct,        R(READERS)),
    ("ProductService",    Rpc::ListProducts,      R(READERS)),
    ("ProductService",    Rpc::UpdateProduct,     R(ADMIN)),
    ("LicenseService",    Rpc::IssueLicense,      R(BILLING)),
    ("LicenseService",    Rpc::GetLicense,        R(READERS)),
    ("LicenseService",    Rpc::ListLicenses,      R(READERS)),
    ("LicenseService",    Rpc::SuspendLicense,    R(BILLING)),
    ("LicenseService",    Rpc::ReinstateLicense,  R(BILLING)),
    ("LicenseService",    Rpc::RevokeLicense,     R(BILLING)),
    ("LicenseService",    Rpc::ListLicenseEvents, R(READERS)),
    ("LicenseService",    Rpc::IssueRenewalCode,  R(BILLING)),
    ("LicenseService",    Rpc::GetRenewalCode,    R(READERS)),
    ("LicenseService",    Rpc::VoidRenewalCode,   R(BILLING)),
    ("LicenseService",    Rpc::ListEvents,        R(READERS)),
    ("LicenseService",    Rpc::WatchEvents,       R(READERS)),
    ("ActivationService", Rpc::Activate,          Nothing),
    ("ActivationService", Rpc::Deactivate,        Nothing),
    ("ActivationService", Rpc::Validate,          Nothing),
    ("ActivationService", Rpc::RedeemRenewalCode, Nothing),
    ("ActivationService", Rpc::GetSigningKeys,    Nothing),
];

/// A caller: what it sends as `authorization`, and the role the server
/// should recognise (`None`: not authenticated).
struct Caller {
    label: String,
    authorization: Option<String>,
    role: Option<Role>,
}

/// What a call must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Refused(Code, &'static str),
}

fn expected(need: Need, caller: &Caller) -> Expect {
    match (need, caller.role) {
        (Nothing, _) => Expect::Allowed,
        (R(_), None) => Expect::Refused(Code::Unauthenticated, "UNAUTHENTICATED"),
        (R(roles), Some(role)) if roles.contains(&role) => Expect::Allowed,
        (R(_), Some(_)) => Expect::Refused(Code::PermissionDenied, "PERMISSION_DENIED"),
    }
}

// ---------------------------------------------------------------------------
// Performing a call.
// ---------------------------------------------------------------------------

type Authed = common::Authed;

/// The three clients, all sending the caller's `authorization` (also to the
/// ActivationService, which must ignore it).
struct Clients {
    products: ProductServiceClient<Authed>,
    licenses: LicenseServiceClient<Authed>,
    activation: ActivationServiceClient<Authed>,
}

fn clients(s: &TestServer, authorization: Option<&str>) -> Clients {
    let auth = common::BearerAuth(
        authorization.map(|v| v.parse().expect("header value is visible ASCII")),
    );
    Clients {
        products: ProductServiceClient::with_interceptor(s.channel.clone(), auth.clone()),
        licenses: LicenseServiceClient::with_interceptor(s.channel.clone(), auth.clone()),
        activation: ActivationServiceClient::with_interceptor(s.channel.clone(), auth),
    }
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

/// What the calls work on.
struct Fixture {
    /// Product every call uses.
    product: String,
    /// A BUSINESS license with 5 seats, `fp-main` activated.
    key: String,
    /// A license only RevokeLicense touches.
    doomed_key: String,
    /// An unredeemed code for GetRenewalCode / VoidRenewalCode.
    code: String,
    /// An unredeemed code matching `key`, for RedeemRenewalCode.
    redeem_code: String,
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Performs `rpc` with a request that would succeed (or fail only for a
/// business reason) if the caller were allowed, so that a refused call would
/// have changed something had the gate let it through.
async fn perform(rpc: Rpc, c: &mut Clients, fx: &Fixture) -> Result<(), Status> {
    match rpc {
        Rpc::CreateProduct => c
            .products
            .create_product(pb::CreateProductRequest {
                product: Some(pb::Product {
                    code: unique("NEW"),
                    display_name: "created in the matrix".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
        Rpc::GetProduct => c
            .products
            .get_product(pb::GetProductRequest {
                code: fx.product.clone(),
            })
            .await
            .map(drop),
        Rpc::ListProducts => c
            .products
            .list_products(pb::ListProductsRequest::default())
            .await
            .map(drop),
        Rpc::UpdateProduct => c
            .products
            .update_product(pb::UpdateProductRequest {
                product: Some(pb::Product {
                    code: fx.product.clone(),
                    display_name: unique("renamed "),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
            })
            .await
            .map(drop),
        Rpc::IssueLicense => c
            .licenses
            .issue_license(license_req(&fx.product, 1, 1))
            .await
            .map(drop),
        Rpc::GetLicense => c
            .licenses
            .get_license(pb::GetLicenseRequest {
                license_key: fx.key.clone(),
            })
            .await
            .map(drop),
        Rpc::ListLicenses => c
            .licenses
            .list_licenses(pb::ListLicensesRequest::default())
            .await
            .map(drop),
        Rpc::SuspendLicense => c
            .licenses
            .suspend_license(pb::SuspendLicenseRequest {
                license_key: fx.key.clone(),
                reason: "authz matrix".into(),
                request_id: String::new(),
            })
            .await
            .map(drop),
        Rpc::ReinstateLicense => c
            .licenses
            .reinstate_license(pb::ReinstateLicenseRequest {
                license_key: fx.key.clone(),
                reason: "authz matrix".into(),
                request_id: String::new(),
            })
            .await
            .map(drop),
        Rpc::RevokeLicense => c
            .licenses
            .revoke_license(pb::RevokeLicenseRequest {
                license_key: fx.doomed_key.clone(),
                reason: "authz matrix".into(),
                request_id: String::new(),
            })
            .await
            .map(drop),
        Rpc::ListLicenseEvents => c
            .licenses
            .list_license_events(pb::ListLicenseEventsRequest {
                license_key: fx.key.clone(),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .map(drop),
        Rpc::IssueRenewalCode => c
            .licenses
            .issue_renewal_code(code_req(&fx.product, 1, 1))
            .await
            .map(drop),
        Rpc::GetRenewalCode => c
            .licenses
            .get_renewal_code(pb::GetRenewalCodeRequest {
                renewal_code: fx.code.clone(),
            })
            .await
            .map(drop),
        Rpc::VoidRenewalCode => c
            .licenses
            .void_renewal_code(pb::VoidRenewalCodeRequest {
                renewal_code: fx.code.clone(),
                reason: "refund".into(),
                request_id: String::new(),
            })
            .await
            .map(drop),
        Rpc::ListEvents => c
            .licenses
            .list_events(pb::ListEventsRequest::default())
            .await
            .map(drop),
        Rpc::WatchEvents => c
            .licenses
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .map(drop),
        Rpc::Activate => c
            .activation
            .activate(pb::ActivateRequest {
                license_key: fx.key.clone(),
                fingerprint: "fp-matrix".into(),
                hostname: "matrix".into(),
                client_version: "2.0.0".into(),
            })
            .await
            .map(drop),
        Rpc::Deactivate => c
            .activation
            .deactivate(pb::DeactivateRequest {
                license_key: fx.key.clone(),
                fingerprint: "fp-matrix".into(),
            })
            .await
            .map(drop),
        Rpc::Validate => c
            .activation
            .validate(pb::ValidateRequest {
                license_key: fx.key.clone(),
                fingerprint: "fp-main".into(),
                client_version: "2.0.0".into(),
                certificate_expires_at: None,
            })
            .await
            .map(drop),
        Rpc::RedeemRenewalCode => c
            .activation
            .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
                license_key: fx.key.clone(),
                renewal_code: fx.redeem_code.clone(),
                fingerprint: "fp-main".into(),
                client_version: "2.0.0".into(),
            })
            .await
            .map(drop),
        Rpc::GetSigningKeys => c
            .activation
            .get_signing_keys(pb::GetSigningKeysRequest {})
            .await
            .map(drop),
    }
}

// ---------------------------------------------------------------------------
// Database dump: proof that a refused call changed nothing.
// ---------------------------------------------------------------------------

/// Every row of every table, as text, in a stable order.
async fn dump(db_url: &str) -> Vec<String> {
    let mut out = Vec::new();
    if db_url.starts_with("postgres") {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(db_url).await.expect("connect");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .expect("list tables");
        for t in tables {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT t::text FROM \"{t}\" t ORDER BY 1"
            )))
            .fetch_all(&mut conn)
            .await
            .expect("dump table");
            out.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
        }
        let _ = conn.close().await;
    } else {
        use sqlx::Connection;
        let path = licensd::store::sqlite::sqlite_path(db_url);
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .expect("open the database read-only");
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&mut conn)
                .await
                .expect("list tables");
        for t in tables {
            let cols: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
                    .bind(&t)
                    .fetch_all(&mut conn)
                    .await
                    .expect("columns");
            let row = cols
                .iter()
                .map(|c| format!("quote(\"{c}\")"))
                .collect::<Vec<_>>()
                .join(" || ',' || ");
            let mut rows: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {row} FROM \"{t}\"")))
                    .fetch_all(&mut conn)
                    .await
                    .expect("dump table");
            rows.sort();
            out.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
        }
        let _ = conn.close().await;
    }
    assert!(!out.is_empty(), "the dump sees the data");
    out
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

#[track_caller]
fn assert_refused_with(status: &Status, code: Code, reason: &str, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    let (got, _) = error_info(status);
    assert_eq!(got, reason, "{what}: {status:?}");
}

#[track_caller]
fn assert_allowed(res: &Result<(), Status>, what: &str) {
    if let Err(status) = res {
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied | Code::Internal | Code::Unknown
            ),
            "{what}: an allowed call was answered {status:?}"
        );
    }
}

/// `licensd token revoke NAME --database-url URL`, the real binary.
async fn cli_revoke(db_url: &str, name: &str) {
    let out = tokio::process::Command::new(BIN)
        .args(["token", "revoke", name, "--database-url", db_url])
        .output()
        .await
        .expect("run licensd");
    assert!(
        out.status.success(),
        "token revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Product ACME (latest 2.0.0), the fixture's licenses and codes.
async fn fixture(s: &mut TestServer) -> Fixture {
    s.product("ACME", "2.0.0").await;
    let key = s.issue(license_req("ACME", 5, 1)).await.key;
    s.activation
        .activate(pb::ActivateRequest {
            license_key: key.clone(),
            fingerprint: "fp-main".into(),
            hostname: "main".into(),
            client_version: "2.0.0".into(),
        })
        .await
        .expect("activate fp-main");
    let doomed_key = s.issue(license_req("ACME", 1, 1)).await.key;
    let code = s.code(code_req("ACME", 1, 1)).await.renewal_code;
    let redeem_code = s.code(code_req("ACME", 5, 1)).await.renewal_code;
    Fixture {
        product: "ACME".into(),
        key,
        doomed_key,
        code,
        redeem_code,
    }
}

/// Replaces the last character of `token` (part of its secret) with another
/// symbol: the id still finds the row, the secret no longer matches.
fn forge(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    let other = if last == "A" { "B" } else { "A" };
    format!("{head}{other}")
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// The matrix above names every method of the three services, once.
#[test]
fn the_matrix_covers_every_rpc_of_the_api() {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut api = BTreeSet::new();
    for file in set.file.iter().filter(|f| f.package() == "licensing.v1") {
        for service in &file.service {
            for method in &service.method {
                api.insert(format!("{}/{}", service.name(), method.name()));
            }
        }
    }
    let table: Vec<String> = MATRIX
        .iter()
        .map(|(service, rpc, _)| format!("{service}/{rpc:?}"))
        .collect();
    let in_table: BTreeSet<String> = table.iter().cloned().collect();
    assert_eq!(in_table.len(), table.len(), "an RPC is listed twice");
    assert_eq!(in_table, api, "the matrix must list exactly the API's RPCs");
}

#[tokio::test]
async fn every_rpc_answers_every_caller_as_the_role_table_says() {
    let mut s = TestServer::start().await;
    let fx = fixture(&mut s).await;

    let support = common::create_token(&s.db_url, "support", "support-desk").await;
    let billing = common::create_token(&s.db_url, "billing", "billing-eu").await;
    let admin = common::create_token(&s.db_url, "admin", "ops").await;

    // Revocation with the real CLI while the server runs is immediate: the
    // very next call with the token is refused.
    let revoked = common::create_token(&s.db_url, "admin", "leaked-admin").await;
    {
        let mut c = clients(&s, bearer(&revoked).as_deref());
        perform(Rpc::ListProducts, &mut c, &fx)
            .await
            .expect("a live admin token works");
        cli_revoke(&s.db_url, "leaked-admin").await;
        let status = perform(Rpc::ListProducts, &mut c, &fx)
            .await
            .expect_err("a revoked token is refused at once");
        assert_refused_with(
            &status,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
            "first call after revocation",
        );
    }

    let callers = vec![
        Caller {
            label: "no token".into(),
            authorization: None,
            role: None,
        },
        Caller {
            label: "malformed: Basic scheme".into(),
            authorization: Some("Basic YWRtaW46YWRtaW4=".into()),
            role: None,
        },
        Caller {
            label: "malformed: `Bearer` without a token".into(),
            authorization: Some("Bearer".into()),
            role: None,
        },
        Caller {
            label: "malformed: not a token".into(),
            authorization: bearer("not-a-token"),
            role: None,
        },
        Caller {
            label: "malformed: admin token without `Bearer `".into(),
            authorization: Some(admin.clone()),
            role: None,
        },
        Caller {
            label: "malformed: admin token with trailing junk".into(),
            authorization: bearer(&format!("{admin}X")),
            role: None,
        },
        Caller {
            label: "malformed: oversized".into(),
            authorization: bearer(&"A".repeat(2000)),
            role: None,
        },
        Caller {
            label: "well-formed unknown token".into(),
            authorization: bearer(&Token::generate().expose()),
            role: None,
        },
        Caller {
            label: "admin id with a forged secret".into(),
            authorization: bearer(&forge(&admin)),
            role: None,
        },
        Caller {
            label: "revoked admin token".into(),
            authorization: bearer(&revoked),
            role: None,
        },
        Caller {
            label: "support".into(),
            authorization: bearer(&support),
            role: Some(Role::Support),
        },
        Caller {
            label: "billing".into(),
            authorization: bearer(&billing),
            role: Some(Role::Billing),
        },
        Caller {
            label: "admin".into(),
            authorization: bearer(&admin),
            role: Some(Role::Admin),
        },
    ];

    let mut checked = 0;
    for &(service, rpc, need) in MATRIX {
        for caller in &callers {
            let what = format!("{service}/{rpc:?} as {}", caller.label);
            let mut c = clients(&s, caller.authorization.as_deref());
            match expected(need, caller) {
                Expect::Allowed => {
                    let res = perform(rpc, &mut c, &fx).await;
                    assert_allowed(&res, &what);
                }
                Expect::Refused(code, reason) => {
                    let before = dump(&s.db_url).await;
                    let status = perform(rpc, &mut c, &fx)
                        .await
                        .expect_err(&format!("{what}: must be refused"));
                    assert_refused_with(&status, code, reason, &what);
                    let after = dump(&s.db_url).await;
                    assert!(
                        before == after,
                        "{what}: a refused call changed the database:\nbefore: {before:#?}\nafter: {after:#?}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, MATRIX.len() * callers.len());
    s.stop().await;
}

#[tokio::test]
async fn history_records_the_token_name_and_the_peer_as_actor() {
    let mut s = TestServer::start().await;
    s.product("ACME", "").await;
    let billing = common::create_token(&s.db_url, "billing", "billing-eu-7").await;
    let (_, mut licenses) = s.clients_with(Some(&billing));

    let key = licenses
        .issue_license(license_req("ACME", 2, 1))
        .await
        .expect("billing issues")
        .into_inner()
        .key;
    licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.clone(),
            reason: "unpaid".into(),
            request_id: String::new(),
        })
        .await
        .expect("billing suspends");
    // An admin reinstates (the admin token of the harness is "test-admin").
    s.licenses
        .reinstate_license(pb::ReinstateLicenseRequest {
            license_key: key.clone(),
            reason: "paid".into(),
            request_id: String::new(),
        })
        .await
        .expect("admin reinstates");
    s.activate(&key, "ws-1").await.expect("activate");

    let events = s.events(&key).await;
    let actors: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.r#type.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        actors,
        [
            ("issued", "billing-eu-7"),
            ("suspended", "billing-eu-7"),
            ("reinstated", "test-admin"),
            ("activated", "peer:127.0.0.1"),
        ],
        "{events:#?}"
    );
    // The secret is never the actor.
    assert!(events.iter().all(|e| !billing.contains(&e.actor)));
    s.stop().await;
}

#[tokio::test]
async fn refused_calls_change_nothing() {
    let mut s = TestServer::start().await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 2, 1)).await.key;
    let code = s.code(code_req("ACME", 2, 1)).await.renewal_code;
    let support = common::create_token(&s.db_url, "support", "support-desk").await;
    let billing = common::create_token(&s.db_url, "billing", "billing-eu").await;
    let (mut sp, mut sl) = s.clients_with(Some(&support));
    let (mut bp, _) = s.clients_with(Some(&billing));
    let (_, mut anon) = s.clients_with(None);

    let count = |l: pb::ListLicensesResponse| l.licenses.len();
    let before = count(
        s.licenses
            .list_licenses(pb::ListLicensesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    let events_before = s.events(&key).await;

    // Support and anonymous callers cannot issue.
    let st = sl
        .issue_license(license_req("ACME", 1, 1))
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "support issues",
    );
    let st = anon
        .issue_license(license_req("ACME", 1, 1))
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
        "anonymous issues",
    );
    let after = count(
        s.licenses
            .list_licenses(pb::ListLicensesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(after, before, "a refused IssueLicense created a license");

    // Support cannot suspend or revoke: the license stays active, its history as it was.
    let st = sl
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.clone(),
            reason: "x".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "support suspends",
    );
    let st = sl
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: key.clone(),
            reason: "x".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "support revokes",
    );
    let license = s.license(&key).await;
    assert_eq!(license.status, pb::LicenseStatus::Active as i32);
    assert_eq!(s.events(&key).await, events_before);

    // Support cannot void a code: it stays unredeemed.
    let st = sl
        .void_renewal_code(pb::VoidRenewalCodeRequest {
            renewal_code: code.clone(),
            reason: "refund".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "support voids",
    );
    let got = s
        .licenses
        .get_renewal_code(pb::GetRenewalCodeRequest {
            renewal_code: code.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::RenewalCodeState::Unredeemed as i32);

    // Billing and support cannot create or change products.
    let st = bp
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "BILL".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "billing creates a product",
    );
    let st = sp
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                latest_version: "9.0.0".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_refused_with(
        &st,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "support bumps a version",
    );
    let st = s
        .products
        .get_product(pb::GetProductRequest {
            code: "BILL".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    let acme = s
        .products
        .get_product(pb::GetProductRequest {
            code: "ACME".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.latest_version, "");
    s.stop().await;
}
