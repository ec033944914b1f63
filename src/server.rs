//! Wiring: the store, the three services, health, reflection, limits and a
//! graceful shutdown.
//!
//! [`Application::build`] opens the store and binds the listener (port 0
//! picks a free port, which tests use); [`Application::run_until`] serves
//! until the shutdown future resolves, then stops accepting calls, lets the
//! in-flight ones finish within [`Config::drain_timeout`], and closes the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;
use tokio::net::TcpListener;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::validation_cache::{DEFAULT_MAX_STALENESS, ValidationCache};

use crate::bench::ValidateCeiling;
use crate::grpc::admission::{AdmissionLayer, AdmissionLimits};
use crate::grpc::auth::{FailureWindow, Gate, GateLayer, LimitConfig};
use crate::grpc::deadline::DeadlineLayer;
use crate::grpc::drain::Drain;
use crate::grpc::{ActivationApi, Clock, Ctx, LicenseApi, ProductApi, system_clock};
use crate::observe::calls::ObserveLayer;
use crate::observe::client::TrustedProxies;
use crate::proto::activation_service_server::ActivationServiceServer;
use crate::proto::license_service_server::LicenseServiceServer;
use crate::proto::product_service_server::ProductServiceServer;
use crate::signing::KeyRing;
use crate::store::bounded::Bounded;
use crate::store::postgres::PostgresOptions;
use crate::store::sqlite::SqliteOptions;
use crate::store::{DatabaseUrl, SqlStore, Store};

// The request limit belongs to the gRPC layer, which also reads refused
// requests up to it; the server applies it to each service.
pub use crate::grpc::MAX_MESSAGE_BYTES;

/// How often an idle connection is pinged.
pub const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// How often the validation cache polls for changes by default.
pub const DEFAULT_VALIDATE_CACHE_REFRESH: Duration = Duration::from_millis(100);

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// `sqlite:PATH` (or a bare path) or `postgres://…`.
    pub database_url: String,
    /// PostgreSQL pool size per replica.
    pub db_max_connections: u32,
    /// Longest a call waits for the database (a connection, a lock, an
    /// answer) before it is answered UNAVAILABLE (`DATABASE_UNAVAILABLE`).
    pub database_timeout: Duration,
    /// How long a starting server waits for an unreachable database (it
    /// retries) before it gives up; zero: it gives up at once.
    pub database_wait: Duration,
    /// SQLite: when a commit reaches the disk (`full`: before it is
    /// acknowledged).
    pub sqlite_synchronous: crate::store::sqlite::Durability,
    /// SQLite: MiB of the database file Validate's readers memory-map
    /// (0: none).
    pub sqlite_mmap_mib: u64,
    /// SQLite: MiB of the database file the writer memory-maps (0: none).
    pub sqlite_writer_mmap_mib: u64,
    /// How often the validation cache polls for changes; `None`: no cache,
    /// Validate reads the database.
    pub validate_cache_refresh: Option<Duration>,
    /// How long after its last successful poll the validation cache may
    /// still answer (the staleness bound; see
    /// [`crate::store::validation_cache`]).
    pub validate_cache_max_staleness: Duration,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Longest a single call may run, whatever its client's deadline; past
    /// it (or the client's `grpc-timeout`) the call ends DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// Abuse limits of the ActivationService.
    pub limits: LimitConfig,
    /// Peers (load balancers) whose `x-forwarded-for`/`x-real-ip` name the
    /// client the limits and the history use.
    pub trusted_proxies: TrustedProxies,
    /// TLS, if any.
    pub tls: Option<TlsFiles>,
    /// Calls in flight beyond which calls are refused at once.
    pub admission: AdmissionLimits,
    /// Where to serve Prometheus metrics (`None`: no metrics).
    pub metrics_listen: Option<SocketAddr>,
    /// The `iss` of offline license certificates.
    pub certificate_issuer: String,
    /// A PKCS#8 PEM Ed25519 key to sign certificates with, instead of the
    /// database's keys.
    pub signing_key_file: Option<PathBuf>,
    /// How long a WatchEvents stream waits for its consumer to take the next
    /// event before it ends the stream (`CONSUMER_TOO_SLOW`).
    pub watch_stall: Duration,
    /// Benchmark only (`licensd bench`): serve the [`ValidateCeiling`],
    /// whose Validate answers a fixed VALID response without touching the
    /// store, to measure the framework's ceiling. Never set in production.
    pub validate_ceiling: bool,
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA that client certificates must chain to (mTLS); `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            database_url: "sqlite:licensd.db".into(),
            db_max_connections: PostgresOptions::default().max_connections,
            database_timeout: crate::store::DEFAULT_DATABASE_TIMEOUT,
            database_wait: DEFAULT_DATABASE_WAIT,
            sqlite_synchronous: Default::default(),
            sqlite_mmap_mib: 0,
            sqlite_writer_mmap_mib: crate::store::sqlite::DEFAULT_WRITER_MMAP_MIB,
            validate_cache_refresh: Some(DEFAULT_VALIDATE_CACHE_REFRESH),
            validate_cache_max_staleness: DEFAULT_MAX_STALENESS,
            drain_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            limits: LimitConfig::default(),
            trusted_proxies: TrustedProxies::default(),
            tls: None,
            metrics_listen: None,
            admission: AdmissionLimits::default(),
            certificate_issuer: "licensd".into(),
            signing_key_file: None,
            watch_stall: crate::store::event_feed::DEFAULT_STALL,
            validate_ceiling: false,
        }
    }
}

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database URL names a backend this build cannot use.
    #[error("{0}")]
    UnsupportedDatabase(String),
    /// The store could not be opened.
    #[error("cannot open the database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The signing keys could not be loaded.
    #[error("{0}")]
    Keys(#[from] crate::signing::KeyError),
    /// The metrics listener could not be started.
    #[error("{0}")]
    Metrics(String),
    /// The TLS files could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How long a starting server waits for an unreachable database by default.
pub const DEFAULT_DATABASE_WAIT: Duration = Duration::from_secs(60);

/// Opens the store `config` names; while a PostgreSQL server is unreachable
/// (refused, timed out, starting up: `StoreError::Unavailable`), tries again
/// with backoff for up to `config.database_wait`. Anything else (a bad URL,
/// refused credentials, a failed migration, any SQLite error: a local file
/// has nothing to wait for) fails at once.
pub async fn open_store_waiting(config: &Config) -> Result<SqlStore, ServerError> {
    let remote = matches!(
        DatabaseUrl::parse(&config.database_url),
        Ok(DatabaseUrl::Postgres(_))
    );
    let wait = if remote {
        config.database_wait
    } else {
        Duration::ZERO
    };
    let give_up = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        match open_store(config).await {
            Err(ServerError::Store(crate::store::StoreError::Unavailable(why)))
                if tokio::time::Instant::now() + pause < give_up =>
            {
                attempts += 1;
                if attempts == 1 {
                    tracing::warn!(error = %why, wait_seconds = config.database_wait.as_secs(), "database unreachable at start; trying again until it answers");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Ok(store) => {
                if attempts > 0 {
                    tracing::info!(attempts, "database reachable; starting");
                }
                return Ok(store);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens the store `config` names.
pub async fn open_store(config: &Config) -> Result<SqlStore, ServerError> {
    let url = DatabaseUrl::parse(&config.database_url).map_err(ServerError::UnsupportedDatabase)?;
    let pg = PostgresOptions {
        max_connections: config.db_max_connections,
        acquire_timeout: config.database_timeout,
        lock_timeout: config.database_timeout,
        ..PostgresOptions::default()
    };
    let lite = SqliteOptions {
        acquire_timeout: config.database_timeout,
        mmap_bytes: config.sqlite_mmap_mib.saturating_mul(1024 * 1024),
        synchronous: config.sqlite_synchronous,
        writer_mmap_bytes: config.sqlite_writer_mmap_mib.saturating_mul(1024 * 1024),
        ..SqliteOptions::default()
    };
    let store = url.open_tuned(pg, lite).await?;
    store.event_feed().set_stall(config.watch_stall);
    Ok(match config.validate_cache_refresh {
        Some(refresh) => store.with_validation_cache(refresh, config.validate_cache_max_staleness),
        None => store,
    })
}

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    store: SqlStore,
    keys: Arc<KeyRing>,
    config: Config,
    clock: Clock,
}

impl Application {
    /// Opens (and migrates) the store and binds the listener.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        if let Some(addr) = config.metrics_listen {
            crate::observe::install(addr).map_err(ServerError::Metrics)?;
        }
        let store = open_store_waiting(&config).await?;
        let keys = KeyRing::load(
            &store,
            &config.certificate_issuer,
            config.signing_key_file.as_deref(),
        )
        .await?;
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        Ok(Application {
            listener,
            store,
            keys,
            config,
            clock: system_clock(),
        })
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains and closes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let addr = self.local_addr();
        let durability = self
            .store
            .durability()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let metrics = self.config.metrics_listen.is_some();
        // Every call waits for the database at most `database_timeout`
        // (inside the metrics, so that a call cut short counts as failed).
        let bounded = Bounded::new(self.store.clone(), self.config.database_timeout);
        let store: Arc<dyn Store> = if metrics {
            Arc::new(crate::store::metered::Metered(bounded))
        } else {
            Arc::new(bounded)
        };
        let sampler = metrics.then(|| tokio::spawn(crate::observe::sample(self.store.clone())));
        let limits = &self.config.limits;
        let ctx = Ctx {
            store: store.clone(),
            clock: self.clock.clone(),
            code_failures: Arc::new(FailureWindow::new(
                limits.code_failures_per_window,
                limits.code_failure_window,
            )),
            keys: self.keys.clone(),
        };
        let key_refresh = tokio::spawn(self.keys.clone().keep_fresh(self.store.clone()));
        let gate = Gate::new(store.clone(), limits);
        let janitor = tokio::spawn({
            let gate = gate.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    gate.forget_idle();
                }
            }
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        set_all(&health, ServingStatus::Serving).await;
        let watchdog = tokio::spawn(watch_database(store.clone(), health.clone()));
        let cache_watch = self
            .store
            .validation_cache()
            .map(|cache| tokio::spawn(watch_cache(cache.clone(), health.clone())));

        let reflection_v1 = reflection()
            .build_v1()
            .expect("embedded descriptors are valid");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("embedded descriptors are valid");

        // One ActivationService: the real one, or for `licensd bench` the
        // ceiling around it (Validate answered without the store).
        let activation = ActivationApi::new(ctx.clone());
        let (activation, ceiling) = if self.config.validate_ceiling {
            (None, Some(ValidateCeiling(activation)))
        } else {
            (Some(activation), None)
        };

        let (drain, drain_layer) = Drain::new();
        let mut builder = Server::builder();
        if let Some(tls) = &self.config.tls {
            builder = builder.tls_config(tls_config(tls)?)?;
        }
        // No `builder.timeout`: tonic answers an expired call CANCELLED;
        // DeadlineLayer answers DEADLINE_EXCEEDED, for the server's limit too.
        let router = builder
            .tcp_nodelay(true)
            // Event streams live long and may be quiet: HTTP/2 pings keep
            // them (and the proxies between) alive, and find dead peers.
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // Outermost: every call, refused by the gate or not, gets its
            // request id, client address, span and metrics.
            .layer(ObserveLayer::new(metrics).trusting(&self.config.trusted_proxies))
            // Right inside it, so that its timer starts before tonic's
            // (ObserveLayer calls on synchronously) and its answer is the
            // one recorded.
            .layer(DeadlineLayer::new(self.config.request_timeout))
            // Health watchers' streams end when the drain starts, after
            // what they had to say (NOT_SERVING): they never end otherwise.
            .layer(drain_layer)
            // Before the gate: an overloaded server spends nothing on a
            // call it refuses.
            .layer(AdmissionLayer::new(self.config.admission))
            .layer(GateLayer(gate))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                ProductServiceServer::new(ProductApi::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                LicenseServiceServer::new(LicenseApi::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_optional_service(activation.map(|api| {
                ActivationServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES)
            }))
            .add_optional_service(ceiling.map(|api| {
                ActivationServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES)
            }));

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        tracing::info!(%addr, %durability, "licensd serving");
        if !self.config.trusted_proxies.is_empty() {
            tracing::info!(
                trusted_proxies = %self.config.trusted_proxies,
                "calls from these peers are limited and recorded as the client their x-forwarded-for or x-real-ip names"
            );
        }

        tokio::select! {
            res = &mut server => {
                // The transport stopped on its own: report why.
                watchdog.abort();
                cache_watch.iter().for_each(|t| t.abort());
                sampler.iter().for_each(|t| t.abort());
                key_refresh.abort();
                janitor.abort();
                self.store.close().await;
                return res.map_err(|e| ServerError::Store(crate::store::StoreError::Internal(e.to_string())))?
                    .map_err(ServerError::from);
            }
            () = shutdown => {}
        }

        tracing::info!("shutting down: draining in-flight calls");
        watchdog.abort();
        cache_watch.iter().for_each(|t| t.abort());
        if cache_watch.is_some() {
            health
                .set_service_status(CACHE_HEALTH, ServingStatus::NotServing)
                .await;
        }
        janitor.abort();
        key_refresh.abort();
        sampler.iter().for_each(|t| t.abort());
        set_all(&health, ServingStatus::NotServing).await;
        // Event streams never finish on their own: end them (their
        // consumers resume from their cursors on another replica).
        self.store.event_feed().close();
        // A health watcher's stream ends once it has said NOT_SERVING.
        drain.start();
        let _ = stop_tx.send(());
        match tokio::time::timeout(self.config.drain_timeout, &mut server).await {
            Ok(Ok(res)) => res?,
            Ok(Err(join)) => tracing::error!(error = %join, "server task failed"),
            Err(_) => {
                tracing::warn!(timeout = ?self.config.drain_timeout, "drain timed out; aborting remaining calls");
                server.abort();
            }
        }
        self.store.close().await;
        tracing::info!("licensd stopped");
        Ok(())
    }
}

/// Reflection over the licensing API, health, and the `google.rpc` error
/// details (so grpcurl can print a refusal's ErrorInfo); built once per
/// reflection version.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| ServerError::Tls(format!("{}: {e}", p.display())))
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status("licensing.v1.ProductService", status)
        .await;
    health
        .set_service_status("licensing.v1.LicenseService", status)
        .await;
    health
        .set_service_status("licensing.v1.ActivationService", status)
        .await;
}

/// The health service name that reports whether Validate is answered from
/// the validation cache (SERVING) or from the database (NOT_SERVING: still
/// loading, or polls failing). Unknown to health when the cache is off.
pub const CACHE_HEALTH: &str = "licensd.ValidationCache";

/// Keeps [`CACHE_HEALTH`] in step with the cache, and logs each change.
async fn watch_cache(cache: Arc<ValidationCache>, health: HealthReporter) {
    let mut fresh = None;
    loop {
        let now = cache.is_fresh(std::time::Instant::now());
        if fresh != Some(now) {
            match (fresh, now) {
                (Some(_), true) => tracing::info!("validation cache answers Validate again"),
                (Some(_), false) => {
                    tracing::warn!("validation cache is behind; Validate reads the database")
                }
                (None, _) => {}
            }
            fresh = Some(now);
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(CACHE_HEALTH, status).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How often health asks the database whether it answers.
pub const DATABASE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Reports NOT_SERVING while the database does not answer: a probe every
/// [`DATABASE_PROBE_EVERY`], each waiting at most `--database-timeout-ms`
/// (the store is bounded). The first failed probe turns every service
/// NOT_SERVING, the first that succeeds SERVING again.
async fn watch_database(store: Arc<dyn Store>, health: HealthReporter) {
    let mut serving = true;
    loop {
        tokio::time::sleep(DATABASE_PROBE_EVERY).await;
        let probe = store.ping().await;
        let ok = probe.is_ok();
        if ok != serving {
            serving = ok;
            match probe {
                Ok(()) => tracing::info!("the database answers again: health SERVING"),
                Err(e) => {
                    tracing::warn!(error = %crate::domain::keys::redact_secrets(&e.to_string()), "the database does not answer: health NOT_SERVING")
                }
            }
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&health, status).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
