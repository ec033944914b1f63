//! Several replicas, one database: three real `licensd serve` processes share
//! one PostgreSQL database (or one SQLite file) and are driven together. The
//! seat limit (R7), one-time redemption (R4) and idempotency hold whatever the
//! interleaving of calls across replicas.
//!
//! PostgreSQL tests read the admin URL from `LICENSD_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`) and create a fresh database
//! per test. Without the variable they are skipped with a notice on stderr,
//! except under CI (`CI` set), where they fail.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{code_req, error_info, license_req};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_licensd");
const REPLICAS: usize = 3;
const CHANNELS_PER_REPLICA: usize = 4;
/// A replica must print "licensd serving" within this time.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Every single RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// A whole scenario, cluster start included.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A name unique within this machine and run.
fn unique(prefix: &str) -> String {
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
struct Replica {
    child: Child,
    addr: String,
    /// Everything the process logged (stderr), for diagnostics.
    log: Arc<Mutex<Vec<String>>>,
    stopped: bool,
}

impl Replica {
    async fn start(database_url: &str, index: usize) -> Replica {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--drain-seconds",
                "5",
                // Every call comes from 127.0.0.1: no per-address limit
                // (in production the replicas see many addresses).
                "--activation-rate-per-ip",
                "0",
                "--database-url",
                database_url,
            ])
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

    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn log_tail(&self) -> String {
        // Give the reader thread a moment to catch up with a dying process.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap();
        let from = log.len().saturating_sub(40);
        log[from..].join("\n")
    }

    async fn channel(&self) -> Channel {
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
    fn terminate(&mut self) -> bool {
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
struct Cluster {
    replicas: Vec<Replica>,
}

impl Cluster {
    /// Migrates the database once (as an operator would), then starts
    /// `REPLICAS` servers on it; each also migrates at start, harmlessly.
    async fn start(database_url: &str) -> (Cluster, Nodes) {
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

        let starts = (0..REPLICAS).map(|i| Replica::start(database_url, i));
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
        (cluster, Nodes { channels, token })
    }

    /// Stops every replica; each must exit cleanly on SIGTERM.
    fn stop(mut self) {
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
async fn futures_join_all<F>(futs: Vec<F>) -> Vec<F::Output>
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
struct Nodes {
    channels: Vec<Vec<Channel>>,
    token: String,
}

impl Nodes {
    fn replicas(&self) -> usize {
        self.channels.len()
    }

    /// The i-th channel in round-robin order: replica `i % replicas`, then
    /// that replica's channels in turn.
    fn channel(&self, i: usize) -> Channel {
        let per = &self.channels[i % self.replicas()];
        per[(i / self.replicas()) % per.len()].clone()
    }

    fn activation(&self, i: usize) -> ActivationServiceClient<Channel> {
        ActivationServiceClient::new(self.channel(i))
    }

    fn licenses(&self, i: usize) -> LicenseServiceClient<common::Authed> {
        LicenseServiceClient::with_interceptor(
            self.channel(i),
            common::BearerAuth::new(Some(&self.token)),
        )
    }

    fn products(&self, i: usize) -> ProductServiceClient<common::Authed> {
        ProductServiceClient::with_interceptor(
            self.channel(i),
            common::BearerAuth::new(Some(&self.token)),
        )
    }
}

/// Runs `scenario` against a cluster on `database_url`, bounded in time. The
/// replicas are stopped whether the scenario passes or panics.
async fn run_cluster<F, Fut>(
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

async fn on_postgres<F, Fut>(scenario: F)
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

async fn on_sqlite<F, Fut>(scenario: F)
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

async fn create_product(nodes: &Nodes, code: &str, latest_version: &str) {
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

async fn issue(nodes: &Nodes, req: pb::IssueLicenseRequest) -> pb::License {
    nodes
        .licenses(0)
        .issue_license(req)
        .await
        .expect("issue license")
        .into_inner()
}

async fn get_license(nodes: &Nodes, i: usize, key: &str) -> pb::License {
    nodes
        .licenses(i)
        .get_license(pb::GetLicenseRequest {
            license_key: key.into(),
        })
        .await
        .expect("get license")
        .into_inner()
}

async fn events(nodes: &Nodes, key: &str) -> Vec<pb::LicenseEvent> {
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

fn activate_req(key: &str, fingerprint: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        hostname: format!("host-{fingerprint}"),
        client_version: "1.0.0".into(),
    }
}

fn to_chrono(t: Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.expect("timestamp set");
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("valid timestamp")
}

/// Whether `st` is FAILED_PRECONDITION with ErrorInfo reason `reason`.
fn refused_with(st: &tonic::Status, reason: &str) -> bool {
    st.code() == tonic::Code::FailedPrecondition && error_info(st).0 == reason
}

/// Spawns `n` tasks that wait on one barrier and then run `call(i)`.
async fn all_at_once<T, F, Fut>(n: usize, call: F) -> Vec<T>
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

// ---------------------------------------------------------------------------
// Scenarios (written once, run on both backends)
// ---------------------------------------------------------------------------

/// R7: 200 concurrent activations with distinct fingerprints across the
/// replicas on a 5-seat license take exactly 5 seats.
async fn seat_limit_across_replicas(nodes: Nodes) {
    create_product(&nodes, "ACME", "").await;
    let key = issue(&nodes, license_req("ACME", 5, 1)).await.key;

    let results = all_at_once(200, |i| {
        let mut client = nodes.activation(i);
        let req = activate_req(&key, &format!("fp-{i}"));
        async move { client.activate(req).await }
    })
    .await;

    let (mut ok, mut full, mut other) = (BTreeSet::new(), 0, Vec::new());
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(_) => {
                ok.insert(format!("fp-{i}"));
            }
            Err(st) if refused_with(&st, "SEAT_LIMIT_REACHED") => full += 1,
            Err(st) => other.push(st),
        }
    }
    assert!(
        other.is_empty(),
        "{} unexpected refusals, e.g. {:?}",
        other.len(),
        other.first()
    );
    assert_eq!((ok.len(), full), (5, 195), "successes / SEAT_LIMIT_REACHED");

    for r in 0..nodes.replicas() {
        let license = get_license(&nodes, r, &key).await;
        assert_eq!(license.seats_used, 5, "seats_used seen by replica {r}");
        let bound: BTreeSet<String> = license
            .activations
            .iter()
            .map(|a| a.fingerprint.clone())
            .collect();
        assert_eq!(license.activations.len(), 5);
        assert_eq!(bound, ok, "the activations are the successful calls");
    }
    let activated = events(&nodes, &key)
        .await
        .iter()
        .filter(|e| e.r#type == "activated")
        .count();
    assert_eq!(activated, 5, "activated events");
}

/// R4: 100 concurrent redemptions of one code across the replicas: exactly
/// one succeeds, the expiry moves once.
async fn one_time_redemption_across_replicas(nodes: Nodes) {
    create_product(&nodes, "ACME", "1.0.0").await;
    let license = issue(&nodes, license_req("ACME", 2, 1)).await;
    let key = license.key.clone();
    nodes
        .activation(0)
        .activate(activate_req(&key, "ws-1"))
        .await
        .expect("activate ws-1");
    let code = nodes
        .licenses(0)
        .issue_renewal_code(code_req("ACME", 2, 1))
        .await
        .expect("issue code")
        .into_inner()
        .renewal_code;

    let results = all_at_once(100, |i| {
        let mut client = nodes.activation(i);
        let req = pb::RedeemRenewalCodeRequest {
            license_key: key.clone(),
            renewal_code: code.clone(),
            fingerprint: "ws-1".into(),
            client_version: "1.0.0".into(),
        };
        async move { client.redeem_renewal_code(req).await }
    })
    .await;

    let before = to_chrono(license.expires_at);
    let expected = licensd::domain::time::add_years(before, 1).unwrap();
    let (mut ok, mut used, mut other) = (Vec::new(), 0, Vec::new());
    for r in results {
        match r {
            Ok(resp) => ok.push(resp.into_inner()),
            Err(st) if refused_with(&st, "RENEWAL_CODE_ALREADY_REDEEMED") => used += 1,
            Err(st) => other.push(st),
        }
    }
    assert!(
        other.is_empty(),
        "{} unexpected refusals, e.g. {:?}",
        other.len(),
        other.first()
    );
    assert_eq!(
        (ok.len(), used),
        (1, 99),
        "successes / RENEWAL_CODE_ALREADY_REDEEMED"
    );
    let winner = &ok[0];
    assert_eq!(to_chrono(winner.previous_expires_at), before);
    assert_eq!(
        to_chrono(winner.license.as_ref().unwrap().expires_at),
        expected
    );

    for r in 0..nodes.replicas() {
        let after = get_license(&nodes, r, &key).await;
        assert_eq!(
            to_chrono(after.expires_at),
            expected,
            "expiry moved exactly once (replica {r})"
        );
        assert_eq!(after.renewal_count, 1);
    }
    let events = events(&nodes, &key).await;
    let renewed: Vec<_> = events.iter().filter(|e| e.r#type == "renewed").collect();
    assert_eq!(renewed.len(), 1, "renewed events");
    assert_eq!(to_chrono(renewed[0].old_expires_at), before);
    assert_eq!(to_chrono(renewed[0].new_expires_at), expected);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.r#type == "renewal_refused")
        .collect();
    assert_eq!(refused.len(), 99, "every refused renewal is in the history");
    assert!(
        refused
            .iter()
            .all(|e| e.refusal_reason == "RENEWAL_CODE_ALREADY_REDEEMED")
    );

    let state = nodes
        .licenses(1)
        .get_renewal_code(pb::GetRenewalCodeRequest {
            renewal_code: code.clone(),
        })
        .await
        .expect("get code")
        .into_inner();
    assert_eq!(state.state, pb::RenewalCodeState::Redeemed as i32);
    assert_eq!(state.redeemed_license_key, key);
}

/// Idempotency: 100 concurrent IssueLicense calls sharing one request_id
/// across the replicas create one license.
async fn idempotent_issue_across_replicas(nodes: Nodes) {
    create_product(&nodes, "ACME", "").await;
    let order_ref = unique("order-rep");
    let req = pb::IssueLicenseRequest {
        request_id: unique("rid-rep"),
        order_ref: order_ref.clone(),
        ..license_req("ACME", 3, 2)
    };

    let results = all_at_once(100, |i| {
        let mut client = nodes.licenses(i);
        let req = req.clone();
        async move { client.issue_license(req).await }
    })
    .await;

    let mut keys = BTreeSet::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(l) => {
                keys.insert(l.into_inner().key);
            }
            Err(st) => errors.push(st),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of 100 retries failed, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(
        keys.len(),
        1,
        "every call returns the same license: {keys:?}"
    );

    for r in 0..nodes.replicas() {
        let listed = nodes
            .licenses(r)
            .list_licenses(pb::ListLicensesRequest {
                order_ref: order_ref.clone(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .expect("list licenses")
            .into_inner();
        let listed: Vec<String> = listed.licenses.into_iter().map(|l| l.key).collect();
        assert_eq!(
            listed,
            keys.iter().cloned().collect::<Vec<_>>(),
            "exactly one license (replica {r})"
        );
    }
}

/// R7 under churn: 12 workers across the replicas activate/deactivate their
/// own workstation on a 3-seat license for ~3 s while a reader checks every
/// replica's view; at the end the seat count matches the activations and
/// what the workers believe.
async fn churn_across_replicas(nodes: Nodes) {
    const WORKERS: usize = 12;
    const SEATS: u32 = 3;
    const DURATION: Duration = Duration::from_secs(3);
    const MAX_ITERATIONS: usize = 10_000;

    create_product(&nodes, "ACME", "").await;
    let key = issue(&nodes, license_req("ACME", SEATS, 1)).await.key;
    let deadline = Instant::now() + DURATION;
    let done = Arc::new(AtomicBool::new(false));

    let reader = {
        let (nodes, key, done) = (nodes.clone(), key.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0usize;
            let mut max_used = 0;
            while !done.load(Ordering::Relaxed) && reads < 100_000 {
                let l = get_license(&nodes, reads, &key).await;
                assert!(
                    l.seats_used <= l.seats,
                    "read {reads}: seats_used {} > seats {}",
                    l.seats_used,
                    l.seats
                );
                assert_eq!(
                    l.seats_used as usize,
                    l.activations.len(),
                    "read {reads}: seats_used disagrees with the activations"
                );
                max_used = max_used.max(l.seats_used);
                reads += 1;
            }
            (reads, max_used)
        })
    };

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut client = nodes.activation(w);
            let key = key.clone();
            tokio::spawn(async move {
                let fp = format!("churn-{w}");
                let mut active = false;
                let (mut activations, mut iterations) = (0usize, 0usize);
                while Instant::now() < deadline && iterations < MAX_ITERATIONS {
                    iterations += 1;
                    match client.activate(activate_req(&key, &fp)).await {
                        Ok(resp) => {
                            let l = resp.into_inner().license.expect("license");
                            assert!(l.seats_used <= l.seats, "{fp}: activate answered {l:?}");
                            assert_eq!(l.seats_used as usize, l.activations.len());
                            active = true;
                            activations += 1;
                        }
                        Err(st) if refused_with(&st, "SEAT_LIMIT_REACHED") => {
                            assert!(!active, "{fp}: refused although already active")
                        }
                        Err(st) => panic!("{fp}: activate failed unexpectedly: {st:?}"),
                    }
                    // Stopping here leaves seats taken at the end.
                    if Instant::now() >= deadline {
                        break;
                    }
                    let res = client
                        .deactivate(pb::DeactivateRequest {
                            license_key: key.clone(),
                            fingerprint: fp.clone(),
                        })
                        .await;
                    match res {
                        Ok(_) => {
                            assert!(active, "{fp}: deactivated although never activated");
                            active = false;
                        }
                        Err(st) if refused_with(&st, "MACHINE_NOT_ACTIVATED") => {
                            assert!(!active, "{fp}: active workstation reported not activated")
                        }
                        Err(st) => panic!("{fp}: deactivate failed unexpectedly: {st:?}"),
                    }
                }
                (fp, active, activations)
            })
        })
        .collect();

    let mut believed = BTreeSet::new();
    let mut total_activations = 0;
    for w in workers {
        let (fp, active, activations) = w.await.expect("worker");
        total_activations += activations;
        if active {
            believed.insert(fp);
        }
    }
    done.store(true, Ordering::Relaxed);
    let (reads, max_used) = reader.await.expect("reader");
    assert!(reads > 0, "the reader read nothing");
    assert!(
        total_activations >= WORKERS,
        "too little churn: {total_activations} successful activations"
    );
    assert!(max_used <= SEATS);

    for r in 0..nodes.replicas() {
        let l = get_license(&nodes, r, &key).await;
        let bound: BTreeSet<String> = l
            .activations
            .iter()
            .map(|a| a.fingerprint.clone())
            .collect();
        assert!(l.seats_used <= SEATS);
        assert_eq!(l.seats_used as usize, l.activations.len(), "replica {r}");
        assert_eq!(
            bound, believed,
            "replica {r}: activations match what the workers believe"
        );
    }
    eprintln!(
        "churn: {total_activations} successful activations, {reads} reads, final seats_used {}",
        believed.len()
    );
}

/// Longest a change may take to reach Validate on another replica.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

/// After a write made on replica 0 returned at `written`: replica 0 answers
/// `expected` at once (it sees its own writes), and on every other replica
/// each Validate that *starts* `VISIBLE_WITHIN` or more after `written`
/// answers `expected` (calls started earlier may still see the old state).
/// Returns the longest lag observed: from `written` to the start of the
/// first call that saw the change, per replica.
async fn visible_everywhere(
    nodes: &Nodes,
    what: &str,
    written: Instant,
    req: &pb::ValidateRequest,
    expected: impl Fn(&pb::ValidateResponse) -> bool,
) -> Duration {
    let own = nodes
        .activation(0)
        .validate(req.clone())
        .await
        .expect("validate")
        .into_inner();
    assert!(
        expected(&own),
        "{what}: the replica that wrote it answers {own:?}"
    );
    let mut worst = Duration::ZERO;
    for r in 1..nodes.replicas() {
        loop {
            let started = Instant::now();
            let got = nodes
                .activation(r)
                .validate(req.clone())
                .await
                .expect("validate")
                .into_inner();
            if expected(&got) {
                worst = worst.max(started - written);
                break;
            }
            assert!(
                started - written < VISIBLE_WITHIN,
                "{what}: replica {r} still answers {got:?} to a call started {:?} after the write",
                started - written
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    worst
}

/// Each kind of change made on one replica (issue, activate, deactivate,
/// suspend, reinstate, renew, product update, revoke) reaches Validate on
/// every other replica within 1 s, and at once on the replica that made it.
async fn changes_reach_validate_on_every_replica(nodes: Nodes) {
    create_product(&nodes, "ACME", "1.0.0").await;
    let validate = |fp: &str, version: &str| pb::ValidateRequest {
        license_key: String::new(),
        fingerprint: fp.into(),
        client_version: version.into(),
    };
    let valid = pb::Validity::Valid as i32;
    let mut lags = Vec::new();

    let key = issue(&nodes, license_req("ACME", 3, 1)).await.key;
    let on = |mut r: pb::ValidateRequest| {
        r.license_key = key.clone();
        r
    };
    let lag = visible_everywhere(
        &nodes,
        "issue",
        Instant::now(),
        &on(validate("", "")),
        |v| v.validity == valid,
    )
    .await;
    lags.push(("issue", lag));

    let mut activation = nodes.activation(0);
    activation
        .activate(activate_req(&key, "fp-1"))
        .await
        .expect("activate");
    let lag = visible_everywhere(
        &nodes,
        "activate",
        Instant::now(),
        &on(validate("fp-1", "")),
        |v| v.validity == valid && v.seats_used == 1,
    )
    .await;
    lags.push(("activate", lag));

    activation
        .deactivate(pb::DeactivateRequest {
            license_key: key.clone(),
            fingerprint: "fp-1".into(),
        })
        .await
        .expect("deactivate");
    let lag = visible_everywhere(
        &nodes,
        "deactivate",
        Instant::now(),
        &on(validate("fp-1", "")),
        |v| v.validity == pb::Validity::NotActivated as i32 && v.seats_used == 0,
    )
    .await;
    lags.push(("deactivate", lag));

    activation
        .activate(activate_req(&key, "fp-2"))
        .await
        .expect("activate");
    nodes
        .licenses(0)
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.clone(),
            reason: "chargeback".into(),
            request_id: String::new(),
        })
        .await
        .expect("suspend");
    let lag = visible_everywhere(
        &nodes,
        "suspend",
        Instant::now(),
        &on(validate("fp-2", "")),
        |v| v.validity == pb::Validity::Suspended as i32,
    )
    .await;
    lags.push(("suspend", lag));

    nodes
        .licenses(0)
        .reinstate_license(pb::ReinstateLicenseRequest {
            license_key: key.clone(),
            reason: "paid".into(),
            request_id: String::new(),
        })
        .await
        .expect("reinstate");
    let lag = visible_everywhere(
        &nodes,
        "reinstate",
        Instant::now(),
        &on(validate("fp-2", "")),
        |v| v.validity == valid && v.seats_used == 1,
    )
    .await;
    lags.push(("reinstate", lag));

    let before = get_license(&nodes, 0, &key).await.expires_at;
    let code = nodes
        .licenses(0)
        .issue_renewal_code(code_req("ACME", 3, 2))
        .await
        .expect("issue code")
        .into_inner()
        .renewal_code;
    let renewed = activation
        .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
            license_key: key.clone(),
            renewal_code: code,
            fingerprint: "fp-2".into(),
            client_version: "1.0.0".into(),
        })
        .await
        .expect("redeem")
        .into_inner();
    let new_expiry = renewed.license.expect("license").expires_at;
    assert!(to_chrono(new_expiry) > to_chrono(before));
    let lag = visible_everywhere(
        &nodes,
        "renew",
        Instant::now(),
        &on(validate("fp-2", "")),
        |v| v.expires_at == new_expiry,
    )
    .await;
    lags.push(("renew", lag));

    nodes
        .products(0)
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                latest_version: "2.0.0".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["latest_version".into()],
            }),
        })
        .await
        .expect("update product");
    let lag = visible_everywhere(
        &nodes,
        "product update",
        Instant::now(),
        &on(validate("fp-2", "1.0.0")),
        |v| v.latest_version == "2.0.0" && v.update_available,
    )
    .await;
    lags.push(("product update", lag));

    nodes
        .licenses(0)
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: key.clone(),
            reason: "fraud".into(),
            request_id: String::new(),
        })
        .await
        .expect("revoke");
    let lag = visible_everywhere(
        &nodes,
        "revoke",
        Instant::now(),
        &on(validate("fp-2", "")),
        |v| v.validity == pb::Validity::Revoked as i32,
    )
    .await;
    lags.push(("revoke", lag));
    eprintln!("longest lag before another replica's Validate saw the change: {lags:?}");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_every_change_reaches_validate_on_every_replica_within_1s() {
    on_postgres(changes_reach_validate_on_every_replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_every_change_reaches_validate_on_every_replica_within_1s() {
    on_sqlite(changes_reach_validate_on_every_replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_r7_200_activations_across_3_replicas_take_exactly_5_seats() {
    on_postgres(seat_limit_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_r7_200_activations_across_3_replicas_take_exactly_5_seats() {
    on_sqlite(seat_limit_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_r4_100_redemptions_of_one_code_across_3_replicas_succeed_exactly_once() {
    on_postgres(one_time_redemption_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_r4_100_redemptions_of_one_code_across_3_replicas_succeed_exactly_once() {
    on_sqlite(one_time_redemption_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_idempotency_100_issues_with_one_request_id_across_3_replicas_create_one_license()
{
    on_postgres(idempotent_issue_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_idempotency_100_issues_with_one_request_id_across_3_replicas_create_one_license() {
    on_sqlite(idempotent_issue_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_r7_activation_churn_across_3_replicas_never_exceeds_seats() {
    on_postgres(churn_across_replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_r7_activation_churn_across_3_replicas_never_exceeds_seats() {
    on_sqlite(churn_across_replicas).await;
}

#[test]
fn postgres_url_gets_its_database_replaced() {
    assert_eq!(
        common::with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        common::with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(
        common::with_database("postgres://h:5432", "x"),
        "postgres://h:5432/x"
    );
}
