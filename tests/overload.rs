//! Load shedding (src/grpc/admission.rs): beyond its budget of calls in
//! flight a call is refused at once, UNAVAILABLE with reason OVERLOADED and
//! a RetryInfo delay, nothing written; the other budget, and health, are
//! not touched.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, license_req};
use licensd::grpc::admission::AdmissionLimits;
use licensd::proto as pb;
use licensd::server::Config;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_beyond_the_budget_are_refused_at_once_and_validate_keeps_its_own() {
    let mut s = TestServer::start_with(Config {
        admission: AdmissionLimits {
            validate: 0,
            other: 2,
        },
        ..Config::default()
    })
    .await;
    s.product("LOAD", "1.0.0").await;
    let license = s.issue(license_req("LOAD", 500, 1)).await;

    // A write flood: 200 activations at once, on 8 connections.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(
            tonic::transport::Channel::from_shared(format!("http://{}", s.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut flood = Vec::new();
    for i in 0..200 {
        let mut client =
            pb::activation_service_client::ActivationServiceClient::new(channels[i % 8].clone());
        let key = license.key.clone();
        flood.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = client
                .activate(pb::ActivateRequest {
                    license_key: key,
                    fingerprint: format!("flood-{i}"),
                    hostname: String::new(),
                    client_version: String::new(),
                })
                .await;
            (r.map(drop), started.elapsed())
        }));
    }
    // Meanwhile Validate, on its own budget, is never refused.
    let mut validates = 0;
    let mut validate_client = s.activation.clone();
    while flood.iter().any(|f| !f.is_finished()) || validates < 50 {
        validate_client
            .validate(pb::ValidateRequest {
                license_key: license.key.clone(),
                fingerprint: String::new(),
                client_version: String::new(),
                certificate_expires_at: None,
            })
            .await
            .expect("Validate is not refused by the write budget");
        validates += 1;
    }
    let mut accepted = 0;
    let mut refused = 0;
    for f in flood {
        let (r, took) = f.await.unwrap();
        match r {
            Ok(()) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                let (reason, md) = common::error_info(&status);
                assert_eq!(reason, "OVERLOADED");
                assert_eq!(md["budget"], "other");
                assert_eq!(md["retry_after_ms"], "50");
                let retry = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("a RetryInfo delay");
                assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
                assert!(took < Duration::from_secs(5), "a refusal waited {took:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "200 writes at once against a budget of 2: none refused"
    );
    assert!(accepted >= 2, "accepted {accepted}");
    // Nothing written for a refusal: the seats are exactly the accepted ones.
    let after = s.license(&license.key).await;
    assert_eq!(after.seats_used as usize, accepted);
    assert_eq!(after.activations.len(), accepted);
    eprintln!("{accepted} accepted, {refused} refused, {validates} validates during the flood");

    // Health answers whatever the budgets.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    s.stop().await;
}
