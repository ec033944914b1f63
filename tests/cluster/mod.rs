//! Several real `licensd serve` processes on one database (PostgreSQL or
//! SQLite), driven together: the harness of the replica tests.
//!
//! PostgreSQL clusters read the admin URL from `LICENSD_TEST_POSTGRES_URL`
//! (e.g. `postgres://postgres@127.0.0.1:5432/postgres`) and create a fresh
//! database per scenario. Without the variable they are skipped with a notice
//! on stderr, except under CI (`CI` set), where they fail.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, error_info};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use tonic::transport::{Channel, Endpoint};

pub const BIN: &str = env!("CARGO_BIN_EXE_licensd");
pub const REPLICAS: usize = 3;
pub const CHANNELS_PER_REPLICA: usize = 4;
/// A replica must print "licensd serving" within this time.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Every single RPC.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// A whole scenario, cluster start included.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A name unique within this machine and run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One `licensd serve` process.
pub struct Replica {
    child: Child,
    addr: String,
    /// Everything the process logged (stderr), for diagnostics.
    log: Arc<Mutex<Vec<String>>>,
    stopped: bool,
}

impl Replica {
    pub async fn start(database_url: &str, index: usize) -> Replica {
        Self::start_with(database_url, index, &[], &[]).await
    }

    /// [`start`](Self::start) with more arguments (a flag given here
    /// replaces its default) and environment.
    pub async fn start_with(
        database_url: &str,
        index: usize,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Replica {
        // Flags of `args` replace these defaults.
        let defaults: [(&str, &str); 7] = [
            ("--log-format", "json"),
            ("--drain-seconds", "5"),
            // Every call comes from 127.0.0.1: no per-address limit
            // (in production the replicas see many addresses).
            ("--activation-rate-per-ip", "0"),
            ("--validate-rate-per-ip", "0"),
            // These scenarios pile hundreds of writes onto one row, on
            // a small machine, in a debug build: some wait longer than
            // the 2 s production bound, which would answer them
            // UNAVAILABLE. They test exact outcomes under contention;
            // bounded waits are tests/outage.rs's.
            ("--database-timeout-ms", "10000"),
            // They also fire a few hundred calls at once to count exact
            // outcomes; load shedding is tests/overload.rs's.
            ("--max-calls-in-flight", "0"),
            ("--database-url", database_url),
        ];
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(
                defaults
                    .iter()
                    .filter(|(flag, _)| !args.contains(flag))
                    .flat_map(|(flag, value)| [*flag, *value]),
            )
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn licensd serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        {
            // Keep draining stderr for the life of the process so that the
            // server never blocks on a full pipe.
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.is_some()
                        && line.contains("licensd serving")
                        && let Some(addr) = line
                            .split("\"addr\":\"")
                            .nth(1)
                            .and_then(|v| v.split('"').next())
                    {
                        let _ = tx.take().unwrap().send(addr.to_string());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut replica = Replica {
            child,
            addr: String::new(),
            log,
            stopped: false,
        };
        match tokio::time::timeout(STARTUP_TIMEOUT, rx).await {
            Ok(Ok(addr)) => replica.addr = addr,
            Ok(Err(_)) => panic!(
                "replica {index} exited before serving:\n{}",
                replica.log_tail()
            ),
            Err(_) => panic!(
                "replica {index} did not print \"licensd serving\" within {STARTUP_TIMEOUT:?}:\n{}",
                replica.log_tail()
            ),
        }
        // Validate must be answered from the validation cache, not from the
        // database it falls back to while the cache loads.
        let start = Instant::now();
        while !replica.logged("validation cache loaded") {
            assert!(
                start.elapsed() < STARTUP_TIMEOUT,
                "replica {index}'s validation cache did not load within {STARTUP_TIMEOUT:?}:\n{}",
                replica.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        replica
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address it serves on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends SIGTERM and returns at once ([`terminate`](Self::terminate)
    /// waits).
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.try_wait().expect("try_wait");
        self.stopped |= status.is_some();
        status
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn log_tail(&self) -> String {
        // Give the reader thread a moment to catch up with a dying process.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap();
        let from = log.len().saturating_sub(40);
        log[from..].join("\n")
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_TIMEOUT)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to replica at {}: {e}", self.addr))
    }

    /// SIGTERM, then wait (bounded; SIGKILL as a last resort). Returns whether
    /// the process exited successfully on its own.
    pub fn terminate(&mut self) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if start.elapsed() < Duration::from_secs(15) => {
                    std::thread::sleep(Duration::from_millis(25))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// N replicas on one database.
pub struct Cluster {
    pub replicas: Vec<Replica>,
}

impl Cluster {
    /// Migrates the database once (as an operator would), then starts
    /// `REPLICAS` servers on it; each also migrates at start, harmlessly.
    pub async fn start(database_url: &str) -> (Cluster, Nodes) {
        Self::start_with(database_url, &[]).await
    }

    /// [`start`](Self::start) with more arguments for every replica (see
    /// [`Replica::start_with`]).
    pub async fn start_with(database_url: &str, args: &[&str]) -> (Cluster, Nodes) {
        let migrate = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(BIN)
                .args(["migrate", "--database-url", database_url])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("licensd migrate finishes within 20 s")
        .expect("run licensd migrate");
        assert!(
            migrate.status.success(),
            "licensd migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );

        // The billing side's token, made with the CLI as an operator would.
        let token = tokio::process::Command::new(BIN)
            .args(["token", "create", "--role", "admin", "--name", "replicas"])
            .args(["--database-url", database_url])
            .output()
            .await
            .expect("run licensd token create");
        assert!(
            token.status.success(),
            "{}",
            String::from_utf8_lossy(&token.stderr)
        );
        let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

        let starts = (0..REPLICAS).map(|i| Replica::start_with(database_url, i, args, &[]));
        let mut replicas = Vec::new();
        // Start them together: concurrent migrations at start must be harmless.
        let started = futures_join_all(starts.collect()).await;
        replicas.extend(started);
        let cluster = Cluster { replicas };

        let mut channels = Vec::new();
        for r in &cluster.replicas {
            let mut per = Vec::new();
            for _ in 0..CHANNELS_PER_REPLICA {
                per.push(r.channel().await);
            }
            channels.push(per);
        }
        let pids = cluster.replicas.iter().map(|r| r.child.id()).collect();
        (
            cluster,
            Nodes {
                channels,
                token,
                pids,
                database_url: database_url.to_string(),
            },
        )
    }

    /// Stops every replica; each must exit cleanly on SIGTERM.
    pub fn stop(mut self) {
        for (i, r) in self.replicas.iter_mut().enumerate() {
            let clean = r.terminate();
            assert!(
                clean,
                "replica {i} did not stop cleanly on SIGTERM:\n{}",
                r.log_tail()
            );
        }
    }
}

/// Awaits futures concurrently, in order (no `futures` dependency needed).
pub async fn futures_join_all<F>(futs: Vec<F>) -> Vec<F::Output>
where
    F: Future,
{
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// gRPC channels to the replicas: `channels[replica][n]`.
#[derive(Clone)]
pub struct Nodes {
    pub channels: Vec<Vec<Channel>>,
    pub token: String,
    /// The replicas' process ids.
    pub pids: Vec<u32>,
    /// The database they share.
    pub database_url: String,
}

impl Nodes {
    pub fn replicas(&self) -> usize {
        self.channels.len()
    }

    /// The i-th channel in round-robin order: replica `i % replicas`, then
    /// that replica's channels in turn.
    pub fn channel(&self, i: usize) -> Channel {
        let per = &self.channels[i % self.replicas()];
        per[(i / self.replicas()) % per.len()].clone()
    }

    /// Pauses (`SIGSTOP`) or resumes (`SIGCONT`) replica `i`'s process: a
    /// replica that stalls.
    pub fn pause(&self, i: usize, paused: bool) {
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &self.pids[i].to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} replica {i}");
    }

    pub fn activation(&self, i: usize) -> ActivationServiceClient<Channel> {
        ActivationServiceClient::new(self.channel(i))
    }

    pub fn licenses(&self, i: usize) -> LicenseServiceClient<common::Authed> {
        LicenseServiceClient::with_interceptor(
            self.channel(i),
            common::BearerAuth::new(Some(&self.token)),
        )
    }

    pub fn products(&self, i: usize) -> ProductServiceClient<common::Authed> {
        ProductServiceClient::with_interceptor(
            self.channel(i),
            common::BearerAuth::new(Some(&self.token)),
        )
    }
}

/// Runs `scenario` against a cluster on `database_url`, bounded in time. The
/// replicas are stopped whether the scenario passes or panics.
pub async fn run_cluster<F, Fut>(
    database_url: String,
    scenario: F,
) -> Result<(), tokio::task::JoinError>
where
    F: FnOnce(Nodes) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let (cluster, nodes) = Cluster::start(&database_url).await;
        // On a panic or timeout the cluster is dropped, which stops the replicas.
        tokio::time::timeout(SCENARIO_TIMEOUT, scenario(nodes))
            .await
            .unwrap_or_else(|_| panic!("scenario did not finish within {SCENARIO_TIMEOUT:?}"));
        cluster.stop();
    })
    .await
}

pub async fn on_postgres<F, Fut>(scenario: F)
where
    F: FnOnce(Nodes) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(db) = common::TestDb::postgres().await else {
        return;
    };
    let result = run_cluster(db.url.clone(), scenario).await;
    db.drop_db().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

pub async fn on_sqlite<F, Fut>(scenario: F)
where
    F: FnOnce(Nodes) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("replicas.db").display());
    let result = run_cluster(url, scenario).await;
    drop(dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub async fn create_product(nodes: &Nodes, code: &str, latest_version: &str) {
    nodes
        .products(0)
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: code.into(),
                display_name: format!("{code} product"),
                latest_version: latest_version.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create product");
}

pub async fn issue(nodes: &Nodes, req: pb::IssueLicenseRequest) -> pb::License {
    nodes
        .licenses(0)
        .issue_license(req)
        .await
        .expect("issue license")
        .into_inner()
}

/// Issues a renewal code on replica 0; returns the code.
pub async fn issue_code(nodes: &Nodes, req: pb::IssueRenewalCodeRequest) -> String {
    nodes
        .licenses(0)
        .issue_renewal_code(req)
        .await
        .expect("issue code")
        .into_inner()
        .renewal_code
}

/// Redeems `code` against `key` on replica 0 from the bound workstation
/// `fingerprint`, with client version 1.0.0; returns the new expiry.
pub async fn redeem(
    nodes: &Nodes,
    key: &str,
    code: String,
    fingerprint: &str,
) -> Option<prost_types::Timestamp> {
    nodes
        .activation(0)
        .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
            license_key: key.into(),
            renewal_code: code,
            fingerprint: fingerprint.into(),
            client_version: "1.0.0".into(),
        })
        .await
        .expect("redeem")
        .into_inner()
        .license
        .expect("license")
        .expires_at
}

/// Sets `product`'s latest version on replica 0.
pub async fn set_latest_version(nodes: &Nodes, product: &str, version: &str) {
    nodes
        .products(0)
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: product.into(),
                latest_version: version.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .expect("update product");
}

pub async fn get_license(nodes: &Nodes, i: usize, key: &str) -> pb::License {
    nodes
        .licenses(i)
        .get_license(pb::GetLicenseRequest {
            license_key: key.into(),
        })
        .await
        .expect("get license")
        .into_inner()
}

pub async fn events(nodes: &Nodes, key: &str) -> Vec<pb::LicenseEvent> {
    let resp = nodes
        .licenses(0)
        .list_license_events(pb::ListLicenseEventsRequest {
            license_key: key.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("list events")
        .into_inner();
    assert!(
        resp.next_page_token.is_empty(),
        "more than 1000 events for one license"
    );
    resp.events
}

pub fn activate_req(key: &str, fingerprint: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        hostname: format!("host-{fingerprint}"),
        client_version: "1.0.0".into(),
    }
}

pub fn to_chrono(t: Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.expect("timestamp set");
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("valid timestamp")
}

/// Whether `st` is FAILED_PRECONDITION with ErrorInfo reason `reason`.
pub fn refused_with(st: &tonic::Status, reason: &str) -> bool {
    st.code() == tonic::Code::FailedPrecondition && error_info(st).0 == reason
}

/// Spawns `n` tasks that wait on one barrier and then run `call(i)`.
pub async fn all_at_once<T, F, Fut>(n: usize, call: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let fut = call(i);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}
