//! Test harness: the real server on port 0 against a fresh SQLite database.
#![allow(dead_code)]

pub mod api;

use std::collections::HashMap;
use std::net::SocketAddr;

use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use licensd::server::{Application, Config};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The admin URL of the PostgreSQL server tests may create databases on,
/// from `LICENSD_TEST_POSTGRES_URL`. Without it PostgreSQL tests are skipped
/// with a loud notice, except in CI, where its absence fails the test.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("LICENSD_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "LICENSD_TEST_POSTGRES_URL must be set in CI: PostgreSQL tests may not be skipped there"
            );
            loud_notice(
                "SKIPPED (PostgreSQL backend): set \
                 LICENSD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres to run \
                 the PostgreSQL tests",
            );
            None
        }
    }
}

/// Prints `msg` once per test binary straight to stderr: libtest captures
/// `eprintln!` of passing tests, but a skipped backend must be seen.
pub fn loud_notice(msg: &str) {
    use std::io::Write;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = writeln!(std::io::stderr(), "\n*** {msg} ***\n");
    });
}

/// `url` with its database name replaced by `name` (query string kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh, empty database: an SQLite file in a temporary directory, or a
/// new PostgreSQL database dropped again by [`TestDb::drop_db`].
pub struct TestDb {
    /// The URL `licensd` is given.
    pub url: String,
    pub admin_url: Option<String>,
    pub name: Option<String>,
    _dir: Option<TempDir>,
}

impl TestDb {
    /// A fresh SQLite database file.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("licensd.db").display());
        TestDb {
            url,
            admin_url: None,
            name: None,
            _dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL database, or `None` (skipped) without a server.
    pub async fn postgres() -> Option<TestDb> {
        use sqlx::Connection;
        let admin = postgres_admin_url()?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "licensd_t_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand_suffix()
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL at LICENSD_TEST_POSTGRES_URL is reachable");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin)
            .to_string();
        Some(TestDb {
            url: format!("{base}/{name}"),
            admin_url: Some(admin),
            name: Some(name),
            _dir: None,
        })
    }

    /// The database at `url`, which the test owns (nothing is dropped).
    pub fn at(url: &str) -> TestDb {
        TestDb {
            url: url.to_string(),
            admin_url: None,
            name: None,
            _dir: None,
        }
    }

    /// The API suite's database: SQLite, or PostgreSQL when
    /// `LICENSD_TEST_BACKEND=postgres`.
    pub async fn for_api_tests() -> TestDb {
        if std::env::var("LICENSD_TEST_BACKEND").as_deref() == Ok("postgres") {
            TestDb::postgres()
                .await
                .expect("LICENSD_TEST_BACKEND=postgres needs LICENSD_TEST_POSTGRES_URL")
        } else {
            TestDb::sqlite()
        }
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.name.is_some()
    }

    /// Opens the store on this database.
    pub async fn open(&self) -> licensd::store::SqlStore {
        licensd::store::DatabaseUrl::parse(&self.url)
            .unwrap()
            .open(Default::default())
            .await
            .expect("open store")
    }

    /// Drops a PostgreSQL database (SQLite files go with their directory).
    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let (Some(admin), Some(name)) = (&self.admin_url, &self.name)
            && let Ok(mut conn) = sqlx::PgConnection::connect(admin).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() % 1_000_000) as u32
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerAuth {
    /// With `token` (or none).
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth(token.map(|t| format!("Bearer {t}").parse().expect("ASCII token")))
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends a bearer token.
pub type Authed = tonic::service::interceptor::InterceptedService<Channel, BearerAuth>;

/// Creates a token with `role` directly in the database at `url` (as
/// `licensd token create` does) and returns it.
pub async fn create_token(url: &str, role: &str, name: &str) -> String {
    use licensd::store::Store;
    let store = licensd::store::DatabaseUrl::parse(url)
        .unwrap()
        .open(Default::default())
        .await
        .expect("open store");
    let token = licensd::domain::auth::Token::generate();
    store
        .create_token(
            name,
            licensd::domain::auth::Role::parse(role).unwrap(),
            &token,
            chrono::Utc::now(),
        )
        .await
        .expect("create token");
    store.close().await;
    token.expose()
}

/// A running server with clients (billing and product calls as an admin).
pub struct TestServer {
    pub addr: SocketAddr,
    pub db_path: std::path::PathBuf,
    pub db_url: String,
    pub admin_token: String,
    pub products: ProductServiceClient<Authed>,
    pub licenses: LicenseServiceClient<Authed>,
    pub activation: ActivationServiceClient<Channel>,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    db: Option<TestDb>,
}

impl TestServer {
    /// Starts a server on a fresh database: SQLite, or PostgreSQL when
    /// `LICENSD_TEST_BACKEND=postgres` (CI runs the API suite both ways).
    pub async fn start() -> TestServer {
        Self::start_on(TestDb::for_api_tests().await).await
    }

    /// Starts a server on a fresh PostgreSQL database, or `None` (skipped).
    pub async fn start_postgres() -> Option<TestServer> {
        Some(Self::start_on(TestDb::postgres().await?).await)
    }

    /// Starts a server on `db` with the default configuration.
    pub async fn start_on(db: TestDb) -> TestServer {
        Self::start_configured(db, Config::default(), None).await
    }

    /// Starts a server on `db` with `config` (its listen address and
    /// database are replaced).
    pub async fn start_on_with(db: TestDb, config: Config) -> TestServer {
        Self::start_configured(db, config, None).await
    }

    /// Like [`start`](Self::start), with the server reading `clock`.
    pub async fn start_with_clock(clock: licensd::grpc::Clock) -> TestServer {
        let db = TestDb::for_api_tests().await;
        Self::start_configured(db, Config::default(), Some(clock)).await
    }

    /// Starts a server on a fresh SQLite database with `config` (its listen
    /// address and database are replaced).
    pub async fn start_with(config: Config) -> TestServer {
        Self::start_configured(TestDb::sqlite(), config, None).await
    }

    async fn start_configured(
        db: TestDb,
        config: Config,
        clock: Option<licensd::grpc::Clock>,
    ) -> TestServer {
        licensd::telemetry::init_for_tests();
        let db_path = licensd::store::sqlite::sqlite_path(&db.url);
        let config = Config {
            listen: "127.0.0.1:0".into(),
            database_url: db.url.clone(),
            ..config
        };
        let admin_token = create_token(&db.url, "admin", "test-admin").await;
        let mut app = Application::build(config).await.expect("server builds");
        if let Some(clock) = clock {
            app = app.with_clock(clock);
        }
        let addr = app.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        let auth = BearerAuth::new(Some(&admin_token));
        TestServer {
            addr,
            db_path,
            db_url: db.url.clone(),
            products: ProductServiceClient::with_interceptor(channel.clone(), auth.clone()),
            licenses: LicenseServiceClient::with_interceptor(channel.clone(), auth),
            admin_token,
            activation: ActivationServiceClient::new(channel.clone()),
            channel,
            stop: Some(tx),
            task: Some(task),
            db: Some(db),
        }
    }

    /// Clients that send `token` (or no token).
    pub fn clients_with(
        &self,
        token: Option<&str>,
    ) -> (ProductServiceClient<Authed>, LicenseServiceClient<Authed>) {
        let auth = BearerAuth::new(token);
        (
            ProductServiceClient::with_interceptor(self.channel.clone(), auth.clone()),
            LicenseServiceClient::with_interceptor(self.channel.clone(), auth),
        )
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }

    /// Creates product `code` with defaults and `latest_version`.
    pub async fn product(&mut self, code: &str, latest_version: &str) -> pb::Product {
        self.products
            .create_product(pb::CreateProductRequest {
                product: Some(pb::Product {
                    code: code.into(),
                    display_name: format!("{code} product"),
                    latest_version: latest_version.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("create product")
            .into_inner()
    }

    /// Issues a license.
    pub async fn issue(&mut self, req: pb::IssueLicenseRequest) -> pb::License {
        self.licenses
            .issue_license(req)
            .await
            .expect("issue license")
            .into_inner()
    }

    /// Issues a renewal code.
    pub async fn code(&mut self, req: pb::IssueRenewalCodeRequest) -> pb::RenewalCode {
        self.licenses
            .issue_renewal_code(req)
            .await
            .expect("issue code")
            .into_inner()
    }

    /// Activates `fingerprint` on `key`.
    pub async fn activate(
        &mut self,
        key: &str,
        fingerprint: &str,
    ) -> Result<pb::ActivateResponse, tonic::Status> {
        self.activation
            .activate(pb::ActivateRequest {
                license_key: key.into(),
                fingerprint: fingerprint.into(),
                hostname: format!("host-{fingerprint}"),
                client_version: "1.0.0".into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Validates `key` for `fingerprint` and `client_version` (either may be
    /// empty).
    pub async fn validate(
        &mut self,
        key: &str,
        fingerprint: &str,
        client_version: &str,
    ) -> Result<pb::ValidateResponse, tonic::Status> {
        self.activation
            .validate(pb::ValidateRequest {
                license_key: key.into(),
                fingerprint: fingerprint.into(),
                client_version: client_version.into(),
                certificate_expires_at: None,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Reads a license.
    pub async fn license(&mut self, key: &str) -> pb::License {
        self.licenses
            .get_license(pb::GetLicenseRequest {
                license_key: key.into(),
            })
            .await
            .expect("get license")
            .into_inner()
    }

    /// All events of a license.
    pub async fn events(&mut self, key: &str) -> Vec<pb::LicenseEvent> {
        self.licenses
            .list_license_events(pb::ListLicenseEventsRequest {
                license_key: key.into(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .expect("events")
            .into_inner()
            .events
    }
}

/// A request id unique within the test run.
pub fn rid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// An IssueLicense request for a BUSINESS license of `product`.
pub fn license_req(product: &str, seats: u32, term_years: u32) -> pb::IssueLicenseRequest {
    pb::IssueLicenseRequest {
        request_id: rid("lic"),
        product: product.into(),
        edition: pb::Edition::Business as i32,
        kind: pb::LicenseKind::Standard as i32,
        seats,
        term_years,
        starts_at: None,
        order_ref: "order-1".into(),
        customer_ref: "cust-1".into(),
        reseller: String::new(),
    }
}

/// An IssueRenewalCode request for BUSINESS codes of `product`.
pub fn code_req(product: &str, seats: u32, term_years: u32) -> pb::IssueRenewalCodeRequest {
    pb::IssueRenewalCodeRequest {
        request_id: rid("code"),
        product: product.into(),
        edition: pb::Edition::Business as i32,
        seats,
        term_years,
        order_ref: "order-2".into(),
        reseller: String::new(),
    }
}

/// A timestamp `days` days before now.
pub fn days_ago(days: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() - chrono::Duration::days(days);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// The ErrorInfo of a refusal: (reason, metadata). Panics if absent or if the
/// domain is not `licensing.v1`.
pub fn error_info(status: &tonic::Status) -> (String, HashMap<String, String>) {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "licensing.v1");
    (info.reason.clone(), info.metadata.clone())
}

/// Asserts that `res` failed with `code` and ErrorInfo `reason`; returns the metadata.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(
    res: Result<T, tonic::Status>,
    code: tonic::Code,
    reason: &str,
) -> HashMap<String, String> {
    let status = res.expect_err("expected a refusal");
    assert_eq!(status.code(), code, "status {status:?}");
    let (got, metadata) = error_info(&status);
    assert_eq!(got, reason, "status {status:?}");
    metadata
}

/// The BadRequest field names of a refusal.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
