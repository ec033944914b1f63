//! Concurrency: the seat limit (R7) and one-time redemption (R4) hold when
//! many calls arrive at once.

mod common;

use common::{TestServer, code_req, error_info, license_req};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use tonic::transport::Channel;

async fn channels(s: &TestServer, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(format!("http://{}", s.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

async fn r7_64_concurrent_activations_on_a_5_seat_license_take_exactly_5_seats(mut s: TestServer) {
    s.product("ACME", "").await;
    let key = s.issue(license_req("ACME", 5, 1)).await.key;
    let chans = channels(&s, 8).await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut client = ActivationServiceClient::new(chans[i % chans.len()].clone());
        let key = key.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client
                .activate(pb::ActivateRequest {
                    license_key: key,
                    fingerprint: format!("fp-{i}"),
                    hostname: format!("host-{i}"),
                    client_version: String::new(),
                })
                .await
        }));
    }
    let (mut ok, mut full, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(st)
                if st.code() == tonic::Code::FailedPrecondition
                    && error_info(&st).0 == "SEAT_LIMIT_REACHED" =>
            {
                full += 1
            }
            Err(st) => other.push(st),
        }
    }
    assert!(other.is_empty(), "unexpected refusals: {other:?}");
    assert_eq!((ok, full), (5, 59));
    let license = s.license(&key).await;
    assert_eq!(license.seats_used, 5);
    assert_eq!(license.activations.len(), 5);
    let activated = s
        .events(&key)
        .await
        .iter()
        .filter(|e| e.r#type == "activated")
        .count();
    assert_eq!(activated, 5);
    s.stop().await;
}

async fn r4_32_concurrent_redemptions_of_one_code_succeed_exactly_once(mut s: TestServer) {
    s.product("ACME", "").await;
    let license = s.issue(license_req("ACME", 2, 1)).await;
    let key = license.key.clone();
    s.activate(&key, "ws-1").await.unwrap();
    let code = s.code(code_req("ACME", 2, 1)).await.renewal_code;
    let chans = channels(&s, 8).await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut client = ActivationServiceClient::new(chans[i % chans.len()].clone());
        let (key, code, barrier) = (key.clone(), code.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client
                .redeem_renewal_code(pb::RedeemRenewalCodeRequest {
                    license_key: key,
                    renewal_code: code,
                    fingerprint: "ws-1".into(),
                    client_version: "1.0.0".into(),
                })
                .await
        }));
    }
    let (mut ok, mut used, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(st) if error_info(&st).0 == "RENEWAL_CODE_ALREADY_REDEEMED" => used += 1,
            Err(st) => other.push(st),
        }
    }
    assert!(other.is_empty(), "unexpected refusals: {other:?}");
    assert_eq!((ok, used), (1, 31));

    let after = s.license(&key).await;
    let before_exp = license.expires_at.unwrap();
    let after_exp = after.expires_at.unwrap();
    let before =
        chrono::DateTime::from_timestamp(before_exp.seconds, before_exp.nanos as u32).unwrap();
    let expected = licensd::domain::time::add_years(before, 1).unwrap();
    assert_eq!(
        chrono::DateTime::from_timestamp(after_exp.seconds, after_exp.nanos as u32).unwrap(),
        expected,
        "expiry moved exactly once"
    );
    assert_eq!(after.renewal_count, 1);
    let events = s.events(&key).await;
    assert_eq!(events.iter().filter(|e| e.r#type == "renewed").count(), 1);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.r#type == "renewal_refused")
            .count(),
        31
    );
    s.stop().await;
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::common::TestDb::sqlite();
                    super::$name(super::TestServer::start_on(db).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(s) = super::TestServer::start_postgres().await else { return };
                    super::$name(s).await;
                }
            )*
        }
    };
}

on_both_backends!(
    r7_64_concurrent_activations_on_a_5_seat_license_take_exactly_5_seats,
    r4_32_concurrent_redemptions_of_one_code_succeed_exactly_once,
);
