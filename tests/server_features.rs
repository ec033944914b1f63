//! Operability: reflection v1 and v1alpha, the health service, graceful
//! shutdown under load, message size limits.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, code_req, error_info, license_req};
use licensd::grpc::auth::LimitConfig;
use licensd::proto as pb;
use licensd::server::Config;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::{v1, v1alpha};

async fn reflect_v1(
    s: &TestServer,
    req: v1::server_reflection_request::MessageRequest,
) -> v1::ServerReflectionResponse {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(s.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap()
}

#[tokio::test]
async fn reflection_v1_lists_services_and_resolves_error_details() {
    let s = TestServer::start().await;
    let resp = reflect_v1(
        &s,
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected {resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "licensing.v1.ProductService",
        "licensing.v1.LicenseService",
        "licensing.v1.ActivationService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // grpcurl resolves google.rpc.ErrorInfo to print a refusal's details.
    let resp = reflect_v1(
        &s,
        v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "google.rpc.ErrorInfo".into(),
        ),
    )
    .await;
    assert!(
        matches!(
            resp.message_response,
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{resp:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_lists_services() {
    let s = TestServer::start().await;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(s.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected {resp:?}")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "licensing.v1.ActivationService")
    );
    s.stop().await;
}

#[tokio::test]
async fn health_reports_serving_overall_and_per_service() {
    let s = TestServer::start().await;
    let mut health = HealthClient::new(s.channel.clone());
    for service in [
        "",
        "licensing.v1.ActivationService",
        "licensing.v1.LicenseService",
        "licensing.v1.ProductService",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    s.stop().await;
}

async fn cache_health(s: &TestServer) -> Result<ServingStatus, tonic::Code> {
    HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: licensd::server::CACHE_HEALTH.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .map_err(|e| e.code())
}

/// `licensd.ValidationCache` says whether Validate is answered from memory:
/// SERVING once the cache has loaded (and while its polls succeed: the
/// cache's unit tests cover it going stale), unknown with the cache off.
#[tokio::test]
async fn health_reports_whether_validate_is_answered_from_the_cache() {
    let s = TestServer::start().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cache_health(&s).await != Ok(ServingStatus::Serving) {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never reported SERVING: {:?}",
            cache_health(&s).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.stop().await;

    let off = TestServer::start_with(Config {
        validate_cache_refresh: None,
        ..Config::default()
    })
    .await;
    assert_eq!(cache_health(&off).await, Err(tonic::Code::NotFound));
    off.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_under_load_finishes_in_flight_calls_within_the_drain_time() {
    // No per-address limit: this test is the load.
    let mut s = TestServer::start_with(Config {
        limits: LimitConfig {
            activation_per_ip_per_sec: 0,
            validate_per_ip_per_sec: 0,
            ..LimitConfig::default()
        },
        ..Config::default()
    })
    .await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 1, 1)).await.key;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = s.activation.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let r = client
                    .validate(pb::ValidateRequest {
                        license_key: key.clone(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(resp) => {
                        assert_eq!(resp.into_inner().validity(), pb::Validity::Valid);
                        ok += 1
                    }
                    // After shutdown the connection goes away (HTTP/2 GOAWAY):
                    // the client sees a transport error, never a server answer.
                    Err(st) => {
                        let transport = std::error::Error::source(&st)
                            .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
                        assert!(transport || st.code() == tonic::Code::Unavailable, "{st:?}");
                        refused += 1;
                        break;
                    }
                }
            }
            (ok, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    s.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        started.elapsed()
    );
    let mut total_ok = 0;
    for t in tasks {
        let (ok, refused) = t.await.unwrap();
        total_ok += ok;
        assert_eq!(refused, 1, "every client sees the server go away");
    }
    assert!(total_ok > 0);
}

#[tokio::test]
async fn an_oversize_message_is_refused_cleanly_and_the_server_keeps_serving() {
    let mut s = TestServer::start().await;
    let huge = "x".repeat(100 * 1024);
    let err = s
        .activation
        .validate(pb::ValidateRequest {
            license_key: huge,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let ok = s
        .activation
        .validate(pb::ValidateRequest {
            license_key: licensd::domain::RenewalCode::generate().expose_display(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().validity(), pb::Validity::RenewalCode);
    s.stop().await;
}

#[tokio::test]
async fn activation_calls_beyond_the_per_address_rate_are_refused_with_a_retry_delay() {
    let s = TestServer::start_with(Config {
        limits: LimitConfig {
            activation_per_ip_per_sec: 5,
            ..LimitConfig::default()
        },
        ..Config::default()
    })
    .await;
    // Not Validate: it has a budget of its own (tests/load_balancers.rs).
    let (mut ok, mut limited) = (0, 0);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        let r = s
            .activation
            .clone()
            .get_signing_keys(pb::GetSigningKeysRequest {})
            .await;
        match r {
            Ok(_) => ok += 1,
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
                assert_eq!(error_info(&st).0, "RATE_LIMITED");
                let delay = tonic_types::StatusExt::get_error_details(&st)
                    .retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("RetryInfo with a delay");
                assert!(
                    delay > std::time::Duration::ZERO && delay <= std::time::Duration::from_secs(1)
                );
                limited += 1;
            }
        }
    }
    // A burst of twice the rate passes, plus what the rate refills while the
    // loop runs; the rest is refused.
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as i32;
    assert!(
        ok >= 10 && ok <= 10 + refill,
        "ok = {ok}, refill = {refill}"
    );
    assert!(limited > 0);
    assert_eq!(ok + limited, 40);
    s.stop().await;
}

#[tokio::test]
async fn guessing_renewal_codes_is_throttled_per_license_key() {
    let mut s = TestServer::start_with(Config {
        limits: LimitConfig {
            code_failures_per_window: 3,
            ..LimitConfig::default()
        },
        ..Config::default()
    })
    .await;
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 1, 1)).await.key;
    s.activate(&key, "ws-1").await.unwrap();
    let real = s.code(code_req("ACME", 1, 1)).await.renewal_code;
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
        assert_eq!(error_info(&st).0, "RENEWAL_CODE_NOT_FOUND");
    }
    // Now even the real code waits: the budget of this license key is spent.
    let st = s
        .activation
        .redeem_renewal_code(redeem(real.clone()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    assert_eq!(error_info(&st).0, "TOO_MANY_FAILED_RENEWAL_ATTEMPTS");
    assert!(
        tonic_types::StatusExt::get_error_details(&st)
            .retry_info()
            .is_some()
    );
    // Nothing was redeemed, and other licenses are not affected.
    let code = s
        .licenses
        .get_renewal_code(pb::GetRenewalCodeRequest { renewal_code: real })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code.state(), pb::RenewalCodeState::Unredeemed);
    let other = s.issue(license_req("ACME", 1, 1)).await.key;
    s.activate(&other, "ws-2").await.unwrap();
    let guess = licensd::domain::RenewalCode::generate().expose_display();
    let st = s
        .activation
        .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
            license_key: other,
            renewal_code: guess,
            fingerprint: "ws-2".into(),
            client_version: "1.0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error_info(&st).0, "RENEWAL_CODE_NOT_FOUND");
    s.stop().await;
}

/// With `--sqlite-mmap-mib`, Validate reads pages through the mapping: it
/// must see exactly what the writer committed, at once (a deactivation, a
/// suspension), like the `pread` path does.
#[tokio::test]
async fn validate_through_a_memory_mapped_file_sees_every_committed_change() {
    let mut s = TestServer::start_with(Config {
        sqlite_mmap_mib: 64,
        // Every Validate reads the file, none the validation cache.
        validate_cache_refresh: None,
        ..Config::default()
    })
    .await;
    s.product("ACME", "2.0.0").await;
    let key = s.issue(license_req("ACME", 2, 1)).await.key;
    s.activate(&key, "ws-1").await.unwrap();
    let v = s.validate(&key, "ws-1", "1.0.0").await.unwrap();
    assert_eq!(v.validity(), pb::Validity::Valid, "{v:?}");
    assert_eq!((v.seats, v.seats_used), (2, 1));
    assert_eq!(v.latest_version, "2.0.0");
    assert!(v.update_available);

    s.activation
        .deactivate(pb::DeactivateRequest {
            license_key: key.clone(),
            fingerprint: "ws-1".into(),
        })
        .await
        .unwrap();
    let v = s.validate(&key, "ws-1", "1.0.0").await.unwrap();
    assert_eq!(v.validity(), pb::Validity::NotActivated, "{v:?}");
    assert_eq!(v.seats_used, 0);

    s.activate(&key, "ws-2").await.unwrap();
    s.licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.clone(),
            reason: "chargeback".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let v = s.validate(&key, "ws-2", "1.0.0").await.unwrap();
    assert_eq!(v.validity(), pb::Validity::Suspended, "{v:?}");
    s.stop().await;
}
