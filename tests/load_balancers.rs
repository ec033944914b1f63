//! Load balancers and NAT (README, Security, "Abuse limits" and "Behind a
//! load balancer"): from a trusted proxy (`--trusted-proxies`) the client
//! is the address `x-forwarded-for` / `x-real-ip` name, for the
//! per-address limits and as the actor in the history; from any other peer
//! those headers are ignored. Validate has a per-address budget of its own,
//! far above the other ActivationService calls', so that a site behind one
//! NAT keeps validating, while guessing renewal codes is limited per
//! license key.
//!
//! Every call really comes from 127.0.0.1; the forwarded addresses are
//! documentation ranges (RFC 5737) that only ever appear in metadata.

mod cluster;
mod common;

use std::time::{Duration, Instant};

use common::{TestServer, code_req, error_info, license_req};
use licensd::grpc::auth::LimitConfig;
use licensd::observe::client::TrustedProxies;
use licensd::proto as pb;
use licensd::server::Config;

/// `msg` with metadata `name: value` (as a proxy would add it).
fn with_header<T>(msg: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(name, value.parse().unwrap());
    req
}

/// `msg` as forwarded for `xff` (an `x-forwarded-for` value).
fn forwarded<T>(msg: T, xff: &str) -> tonic::Request<T> {
    with_header(msg, "x-forwarded-for", xff)
}

/// A server that trusts `proxies` and allows `per_sec` ActivationService
/// calls but Validate per address (burst twice that).
async fn server(proxies: &str, per_sec: u32) -> TestServer {
    TestServer::start_with(Config {
        trusted_proxies: TrustedProxies::parse(proxies).unwrap(),
        limits: LimitConfig {
            activation_per_ip_per_sec: per_sec,
            ..LimitConfig::default()
        },
        ..Config::default()
    })
    .await
}

/// Whether GetSigningKeys (a rate-limited ActivationService call) passes
/// the per-address limit when sent with `header: value` (or none).
async fn passes(s: &TestServer, header: Option<(&'static str, &str)>) -> bool {
    let msg = pb::GetSigningKeysRequest {};
    let req = match header {
        Some((name, value)) => with_header(msg, name, value),
        None => tonic::Request::new(msg),
    };
    match s.activation.clone().get_signing_keys(req).await {
        Ok(_) => true,
        Err(st) => {
            assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
            assert_eq!(error_info(&st).0, "RATE_LIMITED");
            false
        }
    }
}

/// Calls as `header` until the first refusal; how many passed (`None`: no
/// refusal within `max` calls).
async fn passed_before_refusal(
    s: &TestServer,
    header: Option<(&'static str, &str)>,
    max: usize,
) -> Option<usize> {
    for n in 0..max {
        if !passes(s, header).await {
            return Some(n);
        }
    }
    None
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    // 1 call/s, burst 2, per client.
    let s = server("127.0.0.0/8", 1).await;
    let started = Instant::now();
    let xff = |v| Some(("x-forwarded-for", v));
    let first = passed_before_refusal(&s, xff("203.0.113.7"), 10).await;
    assert!(
        matches!(first, Some(2..=3)),
        "203.0.113.7's budget: {first:?}"
    );
    // Other clients of the same proxy are not affected: the proxy's own
    // address, another x-forwarded-for, x-real-ip, and a client that forged
    // the left part of the list (the proxy appended the truth, and a second
    // trusted proxy its own).
    for header in [
        xff("198.51.100.9"),
        Some(("x-real-ip", "198.51.100.10")),
        xff("203.0.113.7, 192.0.2.1, 127.0.0.9"),
        None,
    ] {
        assert!(passes(&s, header).await, "{header:?} is refused");
        assert!(passes(&s, header).await, "{header:?} is refused");
    }
    // And 203.0.113.7 is still over its budget, also with a port.
    if started.elapsed() < Duration::from_millis(900) {
        assert!(!passes(&s, xff("203.0.113.7:40000")).await);
    }
    s.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_history_records_the_forwarded_client() {
    let mut s = server("127.0.0.0/8", 200).await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 2, 1)).await.key;
    let activate = |fingerprint: &str| pb::ActivateRequest {
        license_key: key.clone(),
        fingerprint: fingerprint.into(),
        hostname: "host".into(),
        client_version: "1.0.0".into(),
    };
    let mut client = s.activation.clone();
    client
        .activate(forwarded(
            activate("ws-1"),
            "1.1.1.1, 203.0.113.7, 127.0.0.9",
        ))
        .await
        .expect("activate behind a proxy");
    client
        .deactivate(with_header(
            pb::DeactivateRequest {
                license_key: key.clone(),
                fingerprint: "ws-1".into(),
            },
            "x-real-ip",
            "198.51.100.9",
        ))
        .await
        .expect("deactivate behind a proxy");
    // A proxy that sends nonsense: the call is served, as the peer's.
    client
        .activate(forwarded(activate("ws-2"), "unknown"))
        .await
        .expect("a malformed x-forwarded-for is ignored");
    let actors: Vec<(String, String)> = s
        .events(&key)
        .await
        .into_iter()
        .map(|e| (e.r#type, e.actor))
        .collect();
    let expected = [
        ("activated", "peer:203.0.113.7"),
        ("deactivated", "peer:198.51.100.9"),
        ("activated", "peer:127.0.0.1"),
    ];
    assert_eq!(
        actors[1..],
        expected.map(|(t, a)| (t.to_string(), a.to_string())),
        "{actors:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn from_an_untrusted_peer_forwarding_headers_are_ignored() {
    // Only 10.0.0.0/8 is trusted; the calls come from 127.0.0.1.
    let mut s = server("10.0.0.0/8", 1).await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 1, 1)).await.key;
    // The history records the peer, not the forged address.
    s.activation
        .activate(forwarded(
            pb::ActivateRequest {
                license_key: key.clone(),
                fingerprint: "ws-1".into(),
                hostname: "host".into(),
                client_version: "1.0.0".into(),
            },
            "203.0.113.7",
        ))
        .await
        .expect("activate");
    let events = s.events(&key).await;
    assert_eq!(events.last().unwrap().actor, "peer:127.0.0.1", "{events:?}");
    // A fresh forged address per call does not buy a fresh budget: the
    // peer's (burst 2, one spent above) runs out.
    let mut passed = 0;
    for i in 1..=10 {
        let header = if i % 2 == 0 {
            ("x-forwarded-for", format!("203.0.113.{i}"))
        } else {
            ("x-real-ip", format!("198.51.100.{i}"))
        };
        if !passes(&s, Some((header.0, &header.1))).await {
            break;
        }
        passed += 1;
    }
    assert!(passed <= 2, "{passed} calls passed on forged addresses");
    s.stop().await;
}

#[tokio::test]
async fn validate_from_one_address_far_above_the_activation_budget_is_served_while_code_guessing_is_refused_per_key()
 {
    let limits = LimitConfig {
        activation_per_ip_per_sec: 5,
        code_failures_per_window: 3,
        ..LimitConfig::default()
    };
    let mut s = TestServer::start_with(Config {
        limits: limits.clone(),
        ..Config::default()
    })
    .await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 1, 1)).await.key;
    s.activate(&key, "ws-1").await.unwrap();
    let real = s.code(code_req("ACME", 1, 1)).await.renewal_code;

    // A site behind one NAT address validates: 8 workstations at a time,
    // 1,000 calls, all served.
    const CALLS: usize = 1000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = s.activation.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = Vec::new();
            for _ in 0..CALLS / 8 {
                let r = client
                    .validate(pb::ValidateRequest {
                        license_key: key.clone(),
                        fingerprint: "ws-1".into(),
                        client_version: String::new(),
                        certificate_expires_at: None,
                    })
                    .await;
                match r {
                    Ok(v) => assert_eq!(v.into_inner().validity(), pb::Validity::Valid),
                    Err(st) => refused.push(st),
                }
            }
            refused
        }));
    }
    for t in tasks {
        let refused = t.await.unwrap();
        assert!(refused.is_empty(), "Validate refused: {:?}", refused[0]);
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{CALLS} Validates from one address in {elapsed:.2} s ({:.0}/s)",
        CALLS as f64 / elapsed
    );
    // What the other calls' budget would have let through in that time.
    let activation_budget = 2.0 * 5.0 + elapsed * 5.0;
    assert!(
        CALLS as f64 > 10.0 * activation_budget,
        "{CALLS} calls in {elapsed:.2} s are not far above the activation budget"
    );
    // In the meantime the same address guesses renewal codes for the
    // license: refused after 3 failures, even the real code; Validate goes on.
    let redeem = |code: String| pb::RedeemRenewalCodeRequest {
        license_key: key.clone(),
        renewal_code: code,
        fingerprint: "ws-1".into(),
        client_version: "1.0".into(),
    };
    for _ in 0..3 {
        let guess = licensd::domain::RenewalCode::generate().expose_display();
        let st = s
            .activation
            .redeem_renewal_code(redeem(guess))
            .await
            .unwrap_err();
        assert_eq!(error_info(&st).0, "RENEWAL_CODE_NOT_FOUND", "{st:?}");
    }
    let st = s
        .activation
        .redeem_renewal_code(redeem(real))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert_eq!(error_info(&st).0, "TOO_MANY_FAILED_RENEWAL_ATTEMPTS");
    assert_eq!(
        s.validate(&key, "ws-1", "").await.unwrap().validity(),
        pb::Validity::Valid
    );
    // The other calls' budget is in force for this address (5 spent above,
    // burst 10): Validate did not spend it, and it is not unlimited.
    let passed = passed_before_refusal(&s, None, 20).await;
    assert!(matches!(passed, Some(1..=9)), "{passed:?}");
    s.stop().await;
}

#[tokio::test]
async fn validate_beyond_its_own_per_address_budget_is_refused_with_a_retry_delay() {
    let s = TestServer::start_with(Config {
        limits: LimitConfig {
            // The other calls are unlimited: this is Validate's own budget.
            activation_per_ip_per_sec: 0,
            validate_per_ip_per_sec: 5,
            ..LimitConfig::default()
        },
        ..Config::default()
    })
    .await;
    let code = licensd::domain::RenewalCode::generate().expose_display();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..40 {
        let r = s
            .activation
            .clone()
            .validate(pb::ValidateRequest {
                license_key: code.clone(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => ok += 1,
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
                assert_eq!(error_info(&st).0, "RATE_LIMITED");
                assert!(st.message().contains("Validate"), "{st:?}");
                assert!(
                    tonic_types::StatusExt::get_error_details(&st)
                        .retry_info()
                        .is_some()
                );
                limited += 1;
            }
        }
    }
    assert!(ok >= 10 && limited > 0, "ok {ok}, limited {limited}");
    // The other calls are not limited by it.
    assert!(passed_before_refusal(&s, None, 20).await.is_none());
    s.stop().await;
}

/// The first line `replica` logs with every one of `parts` (waits up to 5 s).
async fn line_with(replica: &cluster::Replica, parts: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let found = replica
            .lines()
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p)));
        if let Some(line) = found {
            return line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no line with {parts:?}:\n{}",
            replica.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_trusts_the_proxies_it_is_given_and_logs_the_forwarded_client() {
    let db = common::TestDb::sqlite();
    let replica = cluster::Replica::start_with(
        &db.url,
        0,
        &["--trusted-proxies", "10.0.0.0/8, 127.0.0.1"],
        &[("RUST_LOG", "info,licensd=debug")],
    )
    .await;
    line_with(
        &replica,
        &[r#""trusted_proxies":"10.0.0.0/8,127.0.0.1/32""#],
    )
    .await;
    let mut req = forwarded(pb::GetSigningKeysRequest {}, "192.0.2.1, 203.0.113.7");
    req.metadata_mut()
        .insert("x-request-id", "lb-test-1".parse().unwrap());
    licensd::proto::activation_service_client::ActivationServiceClient::new(
        replica.channel().await,
    )
    .get_signing_keys(req)
    .await
    .unwrap();
    let finished = line_with(&replica, &["lb-test-1", "call finished"]).await;
    assert!(finished.contains(r#""client":"203.0.113.7""#), "{finished}");
    assert!(finished.contains(r#""peer":"127.0.0.1:"#), "{finished}");
}
