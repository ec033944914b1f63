//! Graceful shutdown of the real binary (README, Reliability): SIGTERM while
//! calls are in flight, one client holds an idle HTTP/2 connection and
//! another watches health (as gRPC client-side health checking does).
//! Health turns NOT_SERVING first (then the Watch ends, `UNAVAILABLE`
//! `SHUTTING_DOWN`), the call in flight completes, and the process exits on
//! its own, well within `--drain-seconds`: neither the idle connection nor
//! the open Watch stream holds it until the drain time runs out.

mod cluster;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use cluster::Replica;
use common::{BearerAuth, TestDb, license_req};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use prost::Message;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The harness's `--drain-seconds` (tests/cluster/mod.rs).
const DRAIN: Duration = Duration::from_secs(5);

/// A gRPC length-prefixed message.
fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// A Validate in flight on a connection of its own: its headers and the
/// first bytes of its message are sent, the rest waits for
/// [`SlowCall::finish`].
struct SlowCall {
    stream: h2::SendStream<Bytes>,
    response: h2::client::ResponseFuture,
    rest: Bytes,
}

impl SlowCall {
    async fn start(addr: &str, key: &str) -> SlowCall {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{addr}/licensing.v1.ActivationService/Validate"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut stream) = send.send_request(req, false).unwrap();
        let mut whole = frame(
            &pb::ValidateRequest {
                license_key: key.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let rest = whole.split_off(whole.len() / 2);
        stream.send_data(whole, false).unwrap();
        SlowCall {
            stream,
            response,
            rest,
        }
    }

    /// Sends the rest of the request; the answer.
    async fn finish(mut self) -> Result<pb::ValidateResponse, String> {
        self.stream
            .send_data(self.rest, true)
            .map_err(|e| format!("send: {e}"))?;
        let response = self.response.await.map_err(|e| format!("response: {e}"))?;
        let (parts, mut body) = response.into_parts();
        if let Some(status) = parts.headers.get("grpc-status") {
            return Err(format!("trailers-only answer: grpc-status {status:?}"));
        }
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("trailers: {e}"))?;
        let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
        if status.map(|s| s.as_bytes()) != Some(b"0") {
            return Err(format!("grpc-status {status:?}"));
        }
        pb::ValidateResponse::decode(bytes.get(5..).unwrap_or_default())
            .map_err(|e| format!("decode: {e}"))
    }
}

/// Whether a failed call failed because the server went away (it refused
/// the stream, or the connection was gone), not with an answer of its own.
fn server_went_away(st: &tonic::Status) -> bool {
    let transport = std::error::Error::source(st)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    transport || st.code() == tonic::Code::Unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_with_an_idle_connection_turns_health_not_serving_first_completes_the_call_in_flight_and_exits_within_the_drain_time()
 {
    let db = TestDb::sqlite();
    let token = common::create_token(&db.url, "admin", "ops").await;
    let mut server = Replica::start(&db.url, 0).await;
    let addr = server.addr().to_string();

    let seed = server.channel().await;
    let auth = BearerAuth::new(Some(&token));
    ProductServiceClient::with_interceptor(seed.clone(), auth.clone())
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "SHUT".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let key = LicenseServiceClient::with_interceptor(seed, auth)
        .issue_license(license_req("SHUT", 1, 1))
        .await
        .unwrap()
        .into_inner()
        .key;

    // A client that connected, made one call, and now sits idle.
    let idle = server.channel().await;
    let serving = HealthClient::new(idle.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);
    // A client watching health.
    let mut watch = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest {
            service: "licensing.v1.ActivationService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // A call in flight: half of its request sent.
    let slow = SlowCall::start(&addr, &key).await;
    // Load: Validate as fast as 8 callers can, until the server goes away.
    let load = server.channel().await;
    let signalled = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = ActivationServiceClient::new(load.clone());
        let key = key.clone();
        let signalled = signalled.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut ok_after_signal) = (0u32, 0u32);
            let give_up = Instant::now() + Duration::from_secs(20);
            while Instant::now() < give_up {
                let call = client.validate(pb::ValidateRequest {
                    license_key: key.clone(),
                    ..Default::default()
                });
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(resp)) => {
                        assert_eq!(resp.into_inner().validity(), pb::Validity::Valid);
                        ok += 1;
                        ok_after_signal += u32::from(signalled.load(Ordering::SeqCst));
                    }
                    Ok(Err(st)) => {
                        assert!(server_went_away(&st), "a call failed otherwise: {st:?}");
                        return (ok, ok_after_signal);
                    }
                    Err(_) => panic!("a Validate took 10 s"),
                }
            }
            panic!("the load ran 20 s without the server going away");
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    signalled.store(true, Ordering::SeqCst);
    server.signal_term();

    // Health turns NOT_SERVING first: the watcher hears it while the server
    // still drains.
    let next = tokio::time::timeout(Duration::from_secs(3), watch.message())
        .await
        .expect("health said nothing within 3 s of SIGTERM")
        .expect("the Watch stream failed before saying NOT_SERVING")
        .expect("the Watch stream ended before saying NOT_SERVING");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // Then the stream ends, with a status clients retry elsewhere.
    let end = tokio::time::timeout(Duration::from_secs(3), watch.message())
        .await
        .expect("the Watch stream did not end within 3 s of NOT_SERVING")
        .expect_err("the Watch stream said more after NOT_SERVING");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert_eq!(common::error_info(&end).0, "SHUTTING_DOWN");

    // The call in flight completes, its request finished half a second
    // into the drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = tokio::time::timeout(Duration::from_secs(3), slow.finish())
        .await
        .expect("the call in flight got no answer")
        .unwrap_or_else(|e| panic!("the call in flight was not completed: {e}"));
    assert_eq!(answer.validity(), pb::Validity::Valid);

    // The process exits by itself, long before the drain time would have
    // cut the idle connection and the Watch stream off.
    let status = loop {
        if let Some(status) = server.exit_status() {
            break status;
        }
        assert!(
            sent.elapsed() < DRAIN * 2,
            "still running {:?} after SIGTERM:\n{}",
            sent.elapsed(),
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = sent.elapsed();
    eprintln!("exited {exited:?} after SIGTERM");
    assert!(status.success(), "{status:?}:\n{}", server.log_tail());
    assert!(
        !server.logged("drain timed out"),
        "the drain waited for the idle clients:\n{}",
        server.log_tail()
    );
    assert!(
        exited < DRAIN - Duration::from_secs(2),
        "exit took {exited:?}, with --drain-seconds {DRAIN:?}"
    );
    assert!(server.logged("licensd stopped"), "{}", server.log_tail());

    let mut total = 0;
    for t in tasks {
        let (ok, _) = t.await.unwrap();
        total += ok;
    }
    assert!(total > 0, "no Validate was answered under load");
    drop(idle);
}
