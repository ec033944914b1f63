//! The database going away under load, and coming back, against the real
//! server (README, Reliability).
//!
//! * PostgreSQL: the test runs its own throwaway cluster
//!   (`tests/pgcluster/mod.rs`: `initdb` and `pg_ctl` from `pg_config
//!   --bindir`, on a free port, in a temporary directory; as the `postgres`
//!   user when the test runs as root, which `initdb` refuses), never the
//!   machine's shared server. Without those programs the test is skipped
//!   with a notice, except in CI (`CI` set), where it fails.
//! * SQLite: the real binary, whose every file write starts failing
//!   (`prlimit --fsize=0`, as a full disk or a file system remounted
//!   read-only would), and then succeeds again.
//!
//! What both check: a call that needs the database fails with
//! `UNAVAILABLE`/`DATABASE_UNAVAILABLE` within the bound, never `INTERNAL`;
//! the server recovers by itself; every acknowledged write is there.

mod cluster;
mod common;
mod pgcluster;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestDb, TestServer, license_req, loud_notice};
use licensd::grpc::auth::LimitConfig;
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::server::Config;
use pgcluster::{PgCluster, output};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

// ---------------------------------------------------------------------------
// Load and its record
// ---------------------------------------------------------------------------

/// One call: when it started (since the load began), how long it took, and
/// its outcome (the code and ErrorInfo reason of a failure).
#[derive(Debug, Clone)]
struct Sample {
    kind: &'static str,
    at: Duration,
    took: Duration,
    outcome: Result<(), (Code, String)>,
}

#[derive(Default)]
struct Record {
    samples: Mutex<Vec<Sample>>,
    /// Acknowledged writes: issued license keys, (key, fingerprint) bound.
    issued: Mutex<Vec<String>>,
    activated: Mutex<Vec<(String, String)>>,
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

impl Record {
    fn add<T>(
        &self,
        kind: &'static str,
        t0: Instant,
        started: Instant,
        res: &Result<T, tonic::Status>,
    ) {
        let outcome = match res {
            Ok(_) => Ok(()),
            Err(s) => Err((s.code(), reason(s))),
        };
        self.samples.lock().unwrap().push(Sample {
            kind,
            at: started - t0,
            took: started.elapsed(),
            outcome,
        });
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }
}

/// Runs the mixed load until `stop`: issuing licenses, activating new
/// workstations on `seat_keys`, validating `read_keys` (never written while
/// the load runs, so Validate may answer them from memory).
fn mixed_load(
    clients: (
        LicenseServiceClient<common::Authed>,
        ActivationServiceClient<Channel>,
    ),
    product: &str,
    seat_keys: Vec<String>,
    read_keys: Vec<String>,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for w in 0..3 {
        let (mut licenses, record, stop) = (clients.0.clone(), record.clone(), stop.clone());
        let product = product.to_string();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let res = licenses.issue_license(license_req(&product, 1, 1)).await;
                record.add("issue", t0, started, &res);
                if let Ok(l) = res {
                    record.issued.lock().unwrap().push(l.into_inner().key);
                }
                tokio::time::sleep(Duration::from_millis(5 + w)).await;
            }
        }));
    }
    let n = Arc::new(AtomicUsize::new(0));
    for w in 0..3 {
        let (mut activation, record, stop, n) =
            (clients.1.clone(), record.clone(), stop.clone(), n.clone());
        let keys = seat_keys.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let key = keys[i % keys.len()].clone();
                let fingerprint = format!("fp-{w}-{i}");
                let started = Instant::now();
                let res = activation
                    .activate(pb::ActivateRequest {
                        license_key: key.clone(),
                        fingerprint: fingerprint.clone(),
                        hostname: "host".into(),
                        client_version: "1.0.0".into(),
                    })
                    .await;
                record.add("activate", t0, started, &res);
                if res.is_ok() {
                    record.activated.lock().unwrap().push((key, fingerprint));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for w in 0..2 {
        let (mut activation, record, stop) = (clients.1.clone(), record.clone(), stop.clone());
        let keys = read_keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let started = Instant::now();
                let res = activation
                    .validate(pb::ValidateRequest {
                        license_key: keys[i % keys.len()].clone(),
                        fingerprint: String::new(),
                        client_version: String::new(),
                        certificate_expires_at: None,
                    })
                    .await;
                record.add("validate", t0, started, &res);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tasks
}

/// Polls health ("" service) every 50 ms until `stop`: (since t0, status).
fn watch_health(
    channel: tonic::transport::Channel,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> tokio::task::JoinHandle<Vec<(Duration, i32)>> {
    tokio::spawn(async move {
        let mut health = HealthClient::new(channel);
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1);
            seen.push((t0.elapsed(), status));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}

/// Every failure is UNAVAILABLE with reason DATABASE_UNAVAILABLE.
fn assert_only_database_unavailable(samples: &[Sample]) {
    let wrong: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.outcome.as_ref().err().is_some_and(|(code, reason)| {
                *code != Code::Unavailable || reason != "DATABASE_UNAVAILABLE"
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} calls failed otherwise than UNAVAILABLE/DATABASE_UNAVAILABLE, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// The bound under test (the default is 2 s).
const DB_TIMEOUT: Duration = Duration::from_secs(1);
/// The validation cache's staleness bound under test (default 800 ms),
/// long enough to see Validate ride through the start of the outage.
const STALENESS: Duration = Duration::from_secs(3);
/// How long the cluster stays down.
const OUTAGE: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_under_load_fails_fast_rides_through_and_recovers_without_losing_an_acknowledged_write()
 {
    let Some(cluster) =
        tokio::task::spawn_blocking(|| PgCluster::start("database outage on PostgreSQL"))
            .await
            .unwrap()
    else {
        return;
    };
    let cluster = Arc::new(cluster);
    let config = Config {
        database_timeout: DB_TIMEOUT,
        validate_cache_max_staleness: STALENESS,
        limits: LimitConfig {
            activation_per_ip_per_sec: 0,
            ..LimitConfig::default()
        },
        ..Config::default()
    };
    let mut s = TestServer::start_on_with(TestDb::at(&cluster.url()), config).await;
    s.product("OUTG", "1.0.0").await;
    let mut seat_keys = Vec::new();
    for _ in 0..4 {
        seat_keys.push(s.issue(license_req("OUTG", 1_000, 1)).await.key);
    }
    let mut read_keys = Vec::new();
    for _ in 0..5 {
        read_keys.push(s.issue(license_req("OUTG", 1, 1)).await.key);
    }
    // The cache has loaded them (Validate answers from memory).
    let mut cache_health = HealthClient::new(s.channel.clone());
    wait_for_cache(&mut cache_health, Duration::from_secs(10)).await;

    let record = Arc::new(Record::default());
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let load = mixed_load(
        (s.licenses.clone(), s.activation.clone()),
        "OUTG",
        seat_keys,
        read_keys,
        record.clone(),
        stop.clone(),
        t0,
    );
    let health = watch_health(s.channel.clone(), stop.clone(), t0);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop_begin = t0.elapsed();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_server("fast"))
        .await
        .unwrap();
    let stopped = t0.elapsed();
    // A replica (re)started during the outage, as an orchestrator would:
    // it waits for the database instead of exiting.
    let url = cluster.url();
    let late = tokio::spawn(async move {
        let wait = ["--database-wait-seconds", "30"];
        let replica = cluster::Replica::start_with(&url, 1, &wait, &[]).await;
        (replica, t0.elapsed())
    });
    tokio::time::sleep(OUTAGE).await;
    let start_begin = t0.elapsed();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_server())
        .await
        .unwrap();
    let started = t0.elapsed();

    // Recovery: a write acknowledged again, health SERVING, Validate from
    // memory again, each within a few seconds and without a restart.
    let deadline = Instant::now() + Duration::from_secs(15);
    let write_back = loop {
        let back = record
            .samples()
            .iter()
            .filter(|x| x.kind != "validate" && x.at > started && x.outcome.is_ok())
            .map(|x| x.at + x.took)
            .min();
        if let Some(at) = back {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no write succeeded within 15 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_for_cache(&mut cache_health, Duration::from_secs(15)).await;
    let cache_back = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let health = health.await.unwrap();
    let samples = record.samples();

    // 1. Failures are UNAVAILABLE/DATABASE_UNAVAILABLE, never INTERNAL.
    assert_only_database_unavailable(&samples);
    let failed_writes = samples
        .iter()
        .filter(|x| {
            x.kind != "validate" && x.outcome.is_err() && x.at > stopped && x.at < start_begin
        })
        .count();
    assert!(failed_writes > 0, "no write failed during the outage");

    // 2. No call waited much longer than the bound.
    let slowest = samples.iter().max_by_key(|x| x.took).unwrap();
    assert!(
        slowest.took <= DB_TIMEOUT + Duration::from_millis(900),
        "a call took {} ms (bound {} ms): {slowest:?}",
        ms(slowest.took),
        ms(DB_TIMEOUT)
    );

    // 3. Validate answered from memory into the outage, within the
    // staleness bound of the last poll and not beyond, then UNAVAILABLE.
    let validates: Vec<&Sample> = samples.iter().filter(|x| x.kind == "validate").collect();
    let last_ok_in_outage = validates
        .iter()
        // Ended before the restart began: not answered by the database.
        .filter(|x| x.outcome.is_ok() && x.at > stop_begin && x.at + x.took < start_begin)
        .map(|x| x.at)
        .max();
    let last_ok_in_outage =
        last_ok_in_outage.expect("Validate answered nothing from memory once the database stopped");
    assert!(
        last_ok_in_outage > stop_begin + Duration::from_millis(500),
        "Validate stopped answering from memory {} ms into the outage, well within its {} ms bound",
        ms(last_ok_in_outage - stop_begin),
        ms(STALENESS)
    );
    assert!(
        last_ok_in_outage <= stop_begin + STALENESS + Duration::from_millis(100),
        "Validate answered from memory {} ms into the outage, beyond its {} ms bound",
        ms(last_ok_in_outage - stop_begin),
        ms(STALENESS)
    );
    let unavailable_validates = validates
        .iter()
        .filter(|x| x.outcome.is_err() && x.at > stop_begin + STALENESS && x.at < start_begin)
        .count();
    assert!(
        unavailable_validates > 0,
        "Validate was never refused during the outage"
    );

    // 4. Health: NOT_SERVING within a probe and a bound of the stop, SERVING
    // again after the restart.
    let not_serving = health
        .iter()
        .find(|(at, st)| *at > stop_begin && *st == ServingStatus::NotServing as i32)
        .map(|(at, _)| *at)
        .expect("health never turned NOT_SERVING");
    assert!(
        not_serving
            <= stopped
                + licensd::server::DATABASE_PROBE_EVERY
                + DB_TIMEOUT
                + Duration::from_millis(700),
        "health turned NOT_SERVING {} ms after the database began to stop",
        ms(not_serving - stop_begin)
    );
    let serving_again = health
        .iter()
        .find(|(at, st)| *at > started && *st == ServingStatus::Serving as i32)
        .map(|(at, _)| *at)
        .expect("health never turned SERVING again");

    // 5. Recovery within a few seconds, no restart.
    let recovered = write_back.max(serving_again).max(cache_back);
    assert!(
        recovered - started < Duration::from_secs(8),
        "recovery took {} ms",
        ms(recovered - started)
    );

    // The replica started during the outage serves once the database is
    // back, and finds what was written meanwhile.
    let (mut late, late_serving) = late.await.expect("the replica started during the outage");
    assert!(
        late.logged("database unreachable at start"),
        "{}",
        late.log_tail()
    );
    let issued = record.issued.lock().unwrap().clone();
    let newest = issued.last().expect("licenses were issued").clone();
    let mut late_client = ActivationServiceClient::new(late.channel().await);
    late_client
        .validate(pb::ValidateRequest {
            license_key: newest,
            ..Default::default()
        })
        .await
        .expect("the late replica validates a license written before it served");
    assert!(late.terminate(), "{}", late.log_tail());

    // 6. Every acknowledged write is in the database.
    let issued = record.issued.lock().unwrap().clone();
    let activated = record.activated.lock().unwrap().clone();
    let (missing_licenses, missing_activations) = audit(&cluster.url(), &issued, &activated).await;
    assert_eq!(missing_licenses, 0, "acknowledged licenses missing");
    assert_eq!(missing_activations, 0, "acknowledged activations missing");

    let during: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.at > stopped && x.at < start_begin)
        .collect();
    eprintln!(
        "outage figures (PostgreSQL, --database-timeout-ms {}, staleness {} ms, outage {} ms): \
         calls {} ({} during the outage, {} failed), slowest call {} ms, slowest during the outage {} ms; \
         Validate from memory until {} ms into the outage; health NOT_SERVING {} ms after the stop began; \
         after the restart: a write acknowledged in {} ms, health SERVING in {} ms, cache answering in {} ms, \
         a replica started during the outage serving (cache loaded) by {} ms; \
         acknowledged writes audited: {} licenses, {} activations, none missing",
        ms(DB_TIMEOUT),
        ms(STALENESS),
        ms(start_begin - stopped),
        samples.len(),
        during.len(),
        during.iter().filter(|x| x.outcome.is_err()).count(),
        ms(slowest.took),
        ms(during.iter().map(|x| x.took).max().unwrap_or_default()),
        ms(last_ok_in_outage - stop_begin),
        ms(not_serving - stop_begin),
        ms(write_back.saturating_sub(started)),
        ms(serving_again - started),
        ms(cache_back - started),
        ms(late_serving - started),
        issued.len(),
        activated.len(),
    );
    s.stop().await;
}

/// Waits until the validation cache answers Validate (its health SERVING).
async fn wait_for_cache(health: &mut HealthClient<tonic::transport::Channel>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: licensd::server::CACHE_HEALTH.into(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.as_ref().ok() == Some(&(ServingStatus::Serving as i32)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the validation cache did not answer within {within:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// SQLite: the disk refuses every write, then takes them again
// ---------------------------------------------------------------------------

/// `licensd serve` as a child process whose file writes can be made to
/// fail: it ignores SIGXFSZ (set by the shell and kept across `exec`), so a
/// file-size limit makes every write fail with EFBIG, as a full disk
/// (ENOSPC) or a read-only file system (EROFS) would, instead of killing it.
struct Child {
    child: std::process::Child,
    addr: String,
    /// What it logged.
    log: Arc<Mutex<Vec<String>>>,
}

impl Child {
    fn spawn(database_url: &str) -> Child {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new("sh")
            .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_licensd"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--activation-rate-per-ip",
                "0",
                "--database-timeout-ms",
                &DB_TIMEOUT.as_millis().to_string(),
                "--database-url",
                database_url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn licensd serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                if let Some(addr) = line
                    .contains("licensd serving")
                    .then(|| {
                        line.split("\"addr\":\"")
                            .nth(1)
                            .and_then(|v| v.split('"').next())
                    })
                    .flatten()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("licensd serving within 20 s");
        Child { child, addr, log }
    }

    /// Sets the process's file-size limit: 0 fails every file write.
    fn file_size_limit(&self, soft: &str) {
        let status = Command::new("prlimit")
            .args([
                "--pid",
                &self.child.id().to_string(),
                &format!("--fsize={soft}:unlimited"),
            ])
            .status()
            .expect("prlimit (util-linux)");
        assert!(status.success(), "prlimit --fsize={soft}");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the disk refuses writes.
const DISK_FULL: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sqlite_disk_that_refuses_writes_gives_unavailable_and_loses_no_acknowledged_write() {
    if output(Command::new("prlimit").arg("--version")).is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prlimit (util-linux) must be installed in CI"
        );
        loud_notice("SKIPPED (SQLite disk failure): no prlimit");
        return;
    }
    let db = TestDb::sqlite();
    let token = common::create_token(&db.url, "admin", "outage-admin").await;
    let server = Child::spawn(&db.url);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let auth = common::BearerAuth::new(Some(&token));
    let mut products =
        licensd::proto::product_service_client::ProductServiceClient::with_interceptor(
            channel.clone(),
            auth.clone(),
        );
    let mut licenses = LicenseServiceClient::with_interceptor(channel.clone(), auth);
    let activation = ActivationServiceClient::new(channel.clone());
    products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "DISK".into(),
                display_name: "disk".into(),
                latest_version: "1.0.0".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create product");
    let mut issue = async |seats| {
        licenses
            .issue_license(license_req("DISK", seats, 1))
            .await
            .expect("issue")
            .into_inner()
            .key
    };
    let mut seat_keys = Vec::new();
    for _ in 0..3 {
        seat_keys.push(issue(1_000).await);
    }
    let mut read_keys = Vec::new();
    for _ in 0..3 {
        read_keys.push(issue(1).await);
    }

    let record = Arc::new(Record::default());
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let load = mixed_load(
        (licenses.clone(), activation),
        "DISK",
        seat_keys,
        read_keys,
        record.clone(),
        stop.clone(),
        t0,
    );
    let health = watch_health(channel.clone(), stop.clone(), t0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let full_begin = t0.elapsed();
    server.file_size_limit("0");
    let full = t0.elapsed();
    tokio::time::sleep(DISK_FULL).await;
    let freed_begin = t0.elapsed();
    server.file_size_limit("unlimited");
    let freed = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    let write_back = loop {
        let back = record
            .samples()
            .iter()
            .filter(|x| x.kind != "validate" && x.at > freed && x.outcome.is_ok())
            .map(|x| x.at + x.took)
            .min();
        if let Some(at) = back {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no write succeeded within 10 s of the disk taking writes again; the server logged:\n{}",
            server
                .log
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let _health = health.await.unwrap();
    let samples = record.samples();

    // Failures are UNAVAILABLE/DATABASE_UNAVAILABLE only, writes did fail
    // while the disk refused them, and Validate never failed (reads need
    // no write).
    assert_only_database_unavailable(&samples);
    let failed_writes = samples
        .iter()
        .filter(|x| x.kind != "validate" && x.outcome.is_err())
        .count();
    assert!(
        failed_writes > 0,
        "no write failed while the disk refused writes"
    );
    assert!(
        samples
            .iter()
            .filter(|x| x.kind != "validate" && x.outcome.is_err())
            .all(|x| x.at + x.took > full_begin && x.at < freed),
        "a write failed outside the time the disk refused writes"
    );
    let failed_validates = samples
        .iter()
        .filter(|x| x.kind == "validate" && x.outcome.is_err())
        .count();
    assert_eq!(failed_validates, 0, "Validate failed while only writes did");
    let slowest = samples.iter().max_by_key(|x| x.took).unwrap();
    assert!(
        slowest.took <= DB_TIMEOUT + Duration::from_millis(900),
        "a call took {} ms",
        ms(slowest.took)
    );

    // Killed without warning, then every acknowledged write is in the file.
    drop(server);
    let issued = record.issued.lock().unwrap().clone();
    let activated = record.activated.lock().unwrap().clone();
    let (missing_licenses, missing_activations) = audit(&db.url, &issued, &activated).await;
    assert_eq!(missing_licenses, 0, "acknowledged licenses missing");
    assert_eq!(missing_activations, 0, "acknowledged activations missing");
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.at > full && x.at < freed_begin)
        .collect();
    eprintln!(
        "disk failure figures (SQLite, --database-timeout-ms {}, writes refused for {} ms): \
         calls {} ({} while refused, {} of them failed), slowest call {} ms; \
         a write acknowledged {} ms after the disk took writes again; \
         acknowledged writes audited after kill -9: {} licenses, {} activations, none missing",
        ms(DB_TIMEOUT),
        ms(freed_begin - full),
        samples.len(),
        during.len(),
        during.iter().filter(|x| x.outcome.is_err()).count(),
        ms(slowest.took),
        ms(write_back.saturating_sub(freed)),
        issued.len(),
        activated.len(),
    );
}

/// How many of the acknowledged licenses and activations are missing from
/// the database at `url` (either backend).
async fn audit(url: &str, issued: &[String], activated: &[(String, String)]) -> (usize, usize) {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("audit connects");
    let keys: std::collections::HashSet<String> = sqlx::query("SELECT license_key FROM licenses")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    let bound: std::collections::HashSet<(String, String)> = sqlx::query(
        "SELECT l.license_key, a.fingerprint FROM activations a JOIN licenses l ON l.id = a.license_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
    .collect();
    pool.close().await;
    let norm = |k: &str| k.replace('-', "").to_uppercase();
    (
        issued.iter().filter(|k| !keys.contains(&norm(k))).count(),
        activated
            .iter()
            .filter(|(k, f)| !bound.contains(&(norm(k), f.clone())))
            .count(),
    )
}
