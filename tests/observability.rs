//! What an operator sees: Prometheus metrics (`--metrics-listen`) and
//! request ids, against the real binary.
//!
//! * Every metric family moves under a short load that makes each kind of
//!   call, a refusal and an unauthenticated call; calls in flight come back
//!   to 0 once the calls have ended.
//! * On PostgreSQL with two replicas, the change notifications' latency and
//!   the number of listening replicas are reported.
//! * A caller's sane `x-request-id` is echoed and is on every log line of its
//!   call; an insane one is replaced by a fresh id, as is a missing one.

mod cluster;
mod common;

use std::collections::HashMap;
use std::time::Duration;

use cluster::*;
use common::{code_req, license_req};
use licensd::domain::{LicenseKey, LicenseKind, ProductCode};
use licensd::proto as pb;
use licensd::proto::license_service_client::LicenseServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics`, parsed into `series → value`.
async fn scrape(port: u16) -> HashMap<String, f64> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics listener");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
        .await
        .expect("metrics answered within 10 s")
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .filter(|l| l.starts_with("licensd_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the series of `name` whose labels include every one of
/// `labels` (`key="value"`).
fn total(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn admin_token(url: &str) -> String {
    let out = tokio::process::Command::new(BIN)
        .args(["token", "create", "--role", "admin", "--name", "observer"])
        .args(["--database-url", url])
        .output()
        .await
        .expect("run licensd token create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A migrated SQLite database in a temporary directory (kept while the
/// first value lives), its URL and an admin token.
async fn migrated_sqlite(name: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join(format!("{name}.db")).display());
    let status = std::process::Command::new(BIN)
        .args(["migrate", "--database-url", &url])
        .status()
        .unwrap();
    assert!(status.success());
    let token = admin_token(&url).await;
    (dir, url, token)
}

async fn nodes_of(replicas: &[&Replica], token: String, database_url: &str) -> Nodes {
    let mut channels = Vec::new();
    for r in replicas {
        channels.push(vec![r.channel().await]);
    }
    Nodes {
        channels,
        token,
        pids: replicas.iter().map(|r| r.pid()).collect(),
        database_url: database_url.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_moves_under_a_short_load() {
    let (_dir, url, token) = migrated_sqlite("metrics").await;
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let replica = Replica::start_with(&url, 0, &["--metrics-listen", &metrics_addr], &[]).await;
    assert!(replica.logged(&format!("http://{metrics_addr}/metrics")));
    let nodes = nodes_of(&[&replica], token, &url).await;
    let before = scrape(port).await;

    create_product(&nodes, "METRO", "1.0.0").await;
    let a = issue(&nodes, license_req("METRO", 2, 1)).await.key;
    let b = issue(&nodes, license_req("METRO", 2, 1)).await.key;
    let mut activation = nodes.activation(0);
    activation.activate(activate_req(&a, "fp-a")).await.unwrap();
    activation.activate(activate_req(&b, "fp-b")).await.unwrap();
    // Wait for the cache to have re-read both, then validate from memory.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..50 {
        let v = activation
            .validate(pb::ValidateRequest {
                license_key: a.clone(),
                fingerprint: "fp-a".into(),
                client_version: "1.0.0".into(),
                certificate_expires_at: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.valid);
    }
    let unknown =
        LicenseKey::generate(&ProductCode::parse("METRO").unwrap(), LicenseKind::Standard);
    let v = activation
        .validate(pb::ValidateRequest {
            license_key: unknown.to_string(),
            fingerprint: String::new(),
            client_version: String::new(),
            certificate_expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.validity, pb::Validity::NotFound as i32);
    activation
        .deactivate(pb::DeactivateRequest {
            license_key: a.clone(),
            fingerprint: "fp-a".into(),
        })
        .await
        .unwrap();
    let voided = issue_code(&nodes, code_req("METRO", 2, 1)).await;
    nodes
        .licenses(0)
        .void_renewal_code(pb::VoidRenewalCodeRequest {
            renewal_code: voided,
            reason: "order cancelled".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let code = issue_code(&nodes, code_req("METRO", 2, 1)).await;
    redeem(&nodes, &b, code, "fp-b").await;
    // A refusal, and a call without a token.
    let refused = activation
        .activate(activate_req("not a key", "fp"))
        .await
        .unwrap_err();
    let (reason, _) = common::error_info(&refused);
    let unauthenticated = LicenseServiceClient::new(nodes.channel(0))
        .get_license(pb::GetLicenseRequest {
            license_key: a.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    // Gauges are sampled every second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = scrape(port).await;

    let moved = |name: &str, labels: &[&str], by: f64| {
        let (was, is) = (total(&before, name, labels), total(&after, name, labels));
        assert!(
            is - was >= by,
            "{name}{labels:?} moved from {was} to {is}, expected +{by}"
        );
    };
    let validate = [r#"method="Validate""#];
    moved(
        "licensd_grpc_calls_total",
        &[r#"method="Validate""#, r#"code="OK""#],
        51.0,
    );
    moved(
        "licensd_grpc_calls_total",
        &[
            r#"service="licensing.v1.LicenseService""#,
            r#"method="IssueLicense""#,
            r#"code="OK""#,
        ],
        2.0,
    );
    moved(
        "licensd_grpc_calls_total",
        &[r#"code="INVALID_ARGUMENT""#],
        1.0,
    );
    moved(
        "licensd_grpc_calls_total",
        &[r#"code="UNAUTHENTICATED""#],
        1.0,
    );
    moved("licensd_grpc_call_duration_seconds_count", &validate, 51.0);
    moved(
        "licensd_grpc_call_duration_seconds_bucket",
        &[r#"method="Validate""#, r#"le="+Inf""#],
        51.0,
    );
    assert_eq!(
        total(&after, "licensd_grpc_calls_in_flight", &[]),
        0.0,
        "every call that started has ended"
    );
    assert!(after.contains_key("licensd_grpc_calls_in_flight"));
    moved(
        "licensd_refusals_total",
        &[&format!(r#"reason="{reason}""#)],
        1.0,
    );
    moved(
        "licensd_refusals_total",
        &[r#"reason="UNAUTHENTICATED""#],
        1.0,
    );
    assert!(total(&after, "licensd_db_pool_connections", &[r#"pool="writer""#]) >= 1.0);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("licensd_db_pool_idle_connections{"))
    );
    assert!(
        total(
            &after,
            "licensd_db_pool_max_connections",
            &[r#"pool="readers""#]
        ) >= 1.0
    );
    moved("licensd_db_acquire_seconds_count", &[], 8.0);
    // SQLite's group commit: at least one commit, each of at least one write.
    moved("licensd_sqlite_commit_seconds_count", &[], 1.0);
    moved("licensd_sqlite_batch_writes_sum", &[], 8.0);
    for op in [
        "issue_license",
        "activate",
        "deactivate",
        "redeem",
        "issue_renewal_code",
        "void_renewal_code",
        "create_product",
        "find_token",
    ] {
        moved(
            "licensd_store_operation_duration_seconds_count",
            &[&format!(r#"operation="{op}""#)],
            1.0,
        );
    }
    moved(
        "licensd_store_operation_duration_seconds_count",
        &[r#"operation="validation_lookup""#],
        1.0,
    );
    assert!(total(&after, "licensd_validation_cache_licenses", &[]) >= 2.0);
    assert_eq!(total(&after, "licensd_validation_cache_loaded", &[]), 1.0);
    assert_eq!(
        total(&after, "licensd_validation_cache_answering", &[]),
        1.0
    );
    assert_eq!(
        total(&after, "licensd_validation_cache_listening", &[]),
        1.0
    );
    let age = total(
        &after,
        "licensd_validation_cache_last_poll_age_seconds",
        &[],
    );
    assert!(age < 1.0, "last poll {age} s ago");
    moved("licensd_validation_cache_hits_total", &[], 40.0);
    moved("licensd_validation_cache_fallbacks_total", &[], 1.0);
    moved("licensd_licenses_issued_total", &[], 2.0);
    moved("licensd_activations_total", &[], 2.0);
    moved("licensd_deactivations_total", &[], 1.0);
    moved("licensd_renewals_total", &[], 1.0);
    moved("licensd_renewal_codes_issued_total", &[], 2.0);
    moved("licensd_renewal_codes_voided_total", &[], 1.0);
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_report_their_notifications() {
    let Some(db) = common::TestDb::postgres().await else {
        return;
    };
    let status = std::process::Command::new(BIN)
        .args(["migrate", "--database-url", &db.url])
        .status()
        .unwrap();
    assert!(status.success());
    let token = admin_token(&db.url).await;
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let first = Replica::start_with(&db.url, 0, &["--metrics-listen", &metrics_addr], &[]).await;
    let second = Replica::start(&db.url, 1).await;
    let nodes = nodes_of(&[&first, &second], token, &db.url).await;
    create_product(&nodes, "NOTE", "1.0.0").await;
    issue(&nodes, license_req("NOTE", 1, 1)).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let m = scrape(port).await;
    assert!(
        total(&m, "licensd_change_notification_seconds_count", &[]) >= 2.0,
        "{m:?}"
    );
    assert_eq!(total(&m, "licensd_replicas_listening", &[]), 1.0);
    drop((first, second));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_echoed_and_on_every_log_line_of_its_call() {
    let (_dir, url, token) = migrated_sqlite("ids").await;
    let replica = Replica::start_with(&url, 0, &[], &[("RUST_LOG", "info,licensd=debug")]).await;
    let nodes = nodes_of(&[&replica], token, &url).await;
    create_product(&nodes, "IDS", "1.0.0").await;

    let mut req = tonic::Request::new(license_req("IDS", 1, 1));
    req.metadata_mut()
        .insert("x-request-id", "billing-42.order:7".parse().unwrap());
    let resp = nodes.licenses(0).issue_license(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-request-id").unwrap(),
        "billing-42.order:7"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<String> = replica
        .lines()
        .into_iter()
        .filter(|l| l.contains("billing-42.order:7"))
        .collect();
    let issued = lines
        .iter()
        .find(|l| l.contains("license issued"))
        .unwrap_or_else(|| panic!("no 'license issued' line with the request id: {lines:#?}"));
    assert!(
        issued.contains("/licensing.v1.LicenseService/IssueLicense"),
        "{issued}"
    );
    assert!(issued.contains(r#""peer":"127.0.0.1:"#), "{issued}");
    let finished = lines
        .iter()
        .find(|l| l.contains("call finished"))
        .unwrap_or_else(|| panic!("no 'call finished' line with the request id: {lines:#?}"));
    assert!(finished.contains(r#""code":"OK""#), "{finished}");
    assert!(finished.contains(r#""latency_ms":"#), "{finished}");

    // An id that is not sane, and none at all: a fresh one each.
    let mut ids = Vec::new();
    for given in [Some("two words"), Some(&*"x".repeat(200)), None] {
        let mut req = tonic::Request::new(pb::GetProductRequest { code: "IDS".into() });
        if let Some(given) = given {
            req.metadata_mut()
                .insert("x-request-id", given.parse().unwrap());
        }
        let resp = nodes.products(0).get_product(req).await.unwrap();
        let id = resp
            .metadata()
            .get("x-request-id")
            .expect("an id is always echoed")
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "fresh ids differ");
    // A refusal carries the id too.
    let mut req = tonic::Request::new(pb::GetProductRequest {
        code: "NOPE".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "support-1".parse().unwrap());
    let refused = nodes.products(0).get_product(req).await.unwrap_err();
    assert_eq!(refused.metadata().get("x-request-id").unwrap(), "support-1");
    drop(replica);
}
