//! The event feed (ListEvents, WatchEvents): every event exactly once, in
//! one order, resumable on any replica, on both backends; PostgreSQL's
//! out-of-order commits; filters, refusals, slow consumers, shutdown.

mod cluster;
mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::*;
use common::{TestServer, assert_refused, code_req, license_req};
use licensd::proto as pb;
use licensd::proto::license_service_client::LicenseServiceClient;
use tonic::Code;

/// Writers on replica 0, and mixed writes each of them makes.
const WRITERS: usize = 4;
const ROUNDS: usize = 6;

/// Events a consumer takes from one stream before it drops it and resumes
/// on the next replica.
const SEGMENT: usize = 25;

fn watch_req(after: &str) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        after: after.into(),
        ..Default::default()
    }
}

fn id_of(cursor: &str) -> i64 {
    cursor
        .trim_start_matches("f1.")
        .parse()
        .expect("a feed cursor")
}

/// One round of mixed writes on replica 0; returns the license key and the
/// renewal codes it used.
async fn mixed_writes(nodes: &Nodes, product: &str) -> (String, Vec<String>) {
    let mut codes = Vec::new();
    let license = issue(nodes, license_req(product, 2, 1)).await;
    let key = license.key;
    let mut activation = nodes.activation(0);
    for fp in ["ws-a", "ws-b"] {
        activation
            .activate(pb::ActivateRequest {
                license_key: key.clone(),
                fingerprint: fp.into(),
                hostname: fp.into(),
                client_version: "1.0.0".into(),
            })
            .await
            .expect("activate");
    }
    activation
        .deactivate(pb::DeactivateRequest {
            license_key: key.clone(),
            fingerprint: "ws-a".into(),
        })
        .await
        .expect("deactivate");
    let redeem = |code: String| pb::RedeemRenewalCodeRequest {
        license_key: key.clone(),
        renewal_code: code,
        fingerprint: "ws-b".into(),
        client_version: "1.0.0".into(),
    };
    for _ in 0..2 {
        let code = issue_code(nodes, code_req(product, 2, 1)).await;
        codes.push(code.clone());
        activation
            .redeem_renewal_code(redeem(code))
            .await
            .expect("redeem");
    }
    // A code again: a refusal, recorded as an event too.
    let code = issue_code(nodes, code_req(product, 2, 1)).await;
    codes.push(code.clone());
    activation
        .redeem_renewal_code(redeem(code.clone()))
        .await
        .expect("redeem");
    let refused = activation.redeem_renewal_code(redeem(code)).await;
    assert!(refused.is_err(), "a code redeems once");
    let mut licenses = nodes.licenses(0);
    licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: key.clone(),
            reason: "feed test".into(),
            request_id: String::new(),
        })
        .await
        .expect("suspend");
    licenses
        .reinstate_license(pb::ReinstateLicenseRequest {
            license_key: key.clone(),
            reason: "feed test".into(),
            request_id: String::new(),
        })
        .await
        .expect("reinstate");
    (key, codes)
}

/// What a consumer received.
#[derive(Default)]
struct Received {
    events: Vec<pb::LicenseEvent>,
    cursor: String,
    streams: usize,
}

/// Follows the feed from the beginning until it has an event with id
/// `until` (once known), reconnecting every [`SEGMENT`] events to the next
/// of replicas 1 and 2 with its last cursor.
async fn consume(nodes: Nodes, until: Arc<Mutex<Option<i64>>>, got: Arc<Mutex<Received>>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (cursor, n) = {
            let g = got.lock().unwrap();
            (g.cursor.clone(), g.streams)
        };
        let replica = 1 + n % 2;
        let mut stream = nodes
            .licenses(replica)
            .watch_events(watch_req(&cursor))
            .await
            .expect("watch")
            .into_inner();
        got.lock().unwrap().streams += 1;
        let mut taken = 0;
        loop {
            let target = *until.lock().unwrap();
            let last = got.lock().unwrap().events.last().map(|e| e.id);
            if let (Some(t), Some(l)) = (target, last)
                && l >= t
            {
                return;
            }
            assert!(Instant::now() < deadline, "the consumer did not catch up");
            let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
            let Ok(next) = next else { continue };
            let msg = next.expect("stream ok").expect("stream open");
            let mut g = got.lock().unwrap();
            if let Some(e) = msg.event {
                assert_eq!(e.cursor, msg.cursor);
                g.events.push(e);
                taken += 1;
            }
            g.cursor = msg.cursor;
            if taken == SEGMENT {
                break;
            }
        }
        // Dropped mid-stream: the next one resumes from the cursor.
    }
}

async fn every_event_exactly_once(nodes: Nodes) {
    create_product(&nodes, "FEED", "1.0.0").await;
    let until = Arc::new(Mutex::new(None));
    let got = Arc::new(Mutex::new(Received::default()));
    let consumer = tokio::spawn(consume(nodes.clone(), until.clone(), got.clone()));

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let nodes = nodes.clone();
            tokio::spawn(async move {
                let mut rounds = Vec::new();
                for _ in 0..ROUNDS {
                    rounds.push(mixed_writes(&nodes, "FEED").await);
                }
                rounds
            })
        })
        .collect();
    let mut keys = Vec::new();
    let mut codes = Vec::new();
    for w in writers {
        for (key, used) in w.await.expect("writer") {
            keys.push(key);
            codes.extend(used);
        }
    }

    // The truth, per license, from each license's own history
    // (ListLicenseEvents), in full.
    let mut truth: BTreeMap<i64, pb::LicenseEvent> = BTreeMap::new();
    for key in &keys {
        for e in events(&nodes, key).await {
            assert_eq!(&e.license_key, key);
            truth.insert(e.id, e);
        }
    }
    assert_eq!(truth.len(), keys.len() * 10, "10 events per round");
    *until.lock().unwrap() = truth.keys().next_back().copied();
    tokio::time::timeout(Duration::from_secs(45), consumer)
        .await
        .expect("the consumer finishes")
        .expect("consumer");

    let (received, streams) = {
        let g = got.lock().unwrap();
        (g.events.clone(), g.streams)
    };
    let ids: Vec<i64> = received.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeats: {ids:?}"
    );
    let expected: Vec<i64> = truth.keys().copied().collect();
    assert_eq!(ids, expected, "every event exactly once");
    // Each streamed event is the one the license's history shows, every
    // field of it: type, time, actor, fingerprint, old and new expiry,
    // renewal code id, refusal reason, detail, key, product, cursor.
    for e in &received {
        assert_eq!(e, &truth[&e.id], "the feed and the history differ");
        assert_eq!(e.product, "FEED");
        assert_eq!(id_of(&e.cursor), e.id);
    }
    // And the fields compared are filled where they should be (two empty
    // fields would compare equal too).
    let of_type = |t: &'static str| received.iter().filter(move |e| e.r#type == t);
    assert_eq!(of_type("renewed").count(), keys.len() * 3);
    for e in of_type("renewed") {
        assert!(!e.renewal_code_id.is_empty(), "{e:?}");
        assert_eq!(e.fingerprint, "ws-b", "{e:?}");
        assert!(e.old_expires_at.is_some() && e.new_expires_at.is_some());
        assert!(
            e.new_expires_at.as_ref().unwrap().seconds > e.old_expires_at.as_ref().unwrap().seconds
        );
    }
    assert_eq!(of_type("renewal_refused").count(), keys.len());
    for e in of_type("renewal_refused") {
        assert!(!e.renewal_code_id.is_empty(), "{e:?}");
        assert!(!e.refusal_reason.is_empty(), "{e:?}");
    }
    assert!(
        received
            .iter()
            .all(|e| !e.actor.is_empty() && e.at.is_some())
    );
    assert!(
        of_type("activated")
            .chain(of_type("deactivated"))
            .all(|e| e.fingerprint.starts_with("ws-"))
    );

    // No renewal code, in any form, in any event (only its public id).
    assert_eq!(codes.len(), keys.len() * 3);
    for code in &codes {
        let parsed = licensd::domain::keys::RenewalCode::parse(code).expect("a code");
        let normalized = parsed.expose_normalized().to_string();
        let forms = [
            parsed.expose_display(),
            normalized.clone(),
            // The random part alone.
            normalized[2..].to_string(),
        ];
        for e in &received {
            let text = format!("{e:?}").to_uppercase();
            for form in &forms {
                assert!(
                    !text.contains(&form.to_uppercase()),
                    "renewal code {form} in event {e:?}"
                );
            }
        }
    }
    assert!(streams > 4, "the consumer resumed on other replicas");

    // ListEvents on the third replica agrees, page by page.
    let mut listed = Vec::new();
    let mut after = String::new();
    loop {
        let page = nodes
            .licenses(2)
            .list_events(pb::ListEventsRequest {
                after: after.clone(),
                page_size: 17,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner();
        listed.extend(page.events.iter().map(|e| e.id));
        assert!(!page.next_cursor.is_empty());
        after = page.next_cursor;
        if page.events.len() < 17 {
            break;
        }
    }
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_once_in_order_across_replicas_sqlite() {
    on_sqlite(every_event_exactly_once).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_once_in_order_across_replicas_postgres() {
    on_postgres(every_event_exactly_once).await;
}

/// A transaction that took a lower event id commits after one that took a
/// higher id: the feed holds the higher one back until the lower one is
/// final, then delivers both in id order, so that no cursor skips one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_with_a_lower_id_is_not_skipped() {
    use sqlx::Connection;
    let Some(mut s) = TestServer::start_postgres().await else {
        return;
    };
    s.product("LATE", "1.0.0").await;
    // The late writer's license: its insert locks the row against other writes.
    let other = s.issue(license_req("LATE", 2, 1)).await.key;
    let key = s.issue(license_req("LATE", 2, 1)).await.key;
    let mut stream = s
        .licenses
        .watch_events(watch_req(""))
        .await
        .expect("watch")
        .into_inner();
    next_event(&mut stream).await;
    let first = next_event(&mut stream).await;
    assert_eq!(first.r#type, "issued");

    // Another writer (here, by hand) takes the next id and stays open.
    let mut db = sqlx::PgConnection::connect(&s.db_url).await.expect("db");
    let mut tx = db.begin().await.expect("begin");
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO license_events (license_id, type, at, actor, detail) \
         SELECT id, 'suspended', 0, 'test', 'committed late' FROM licenses WHERE license_key = $1 \
         RETURNING id",
    )
    .bind(other.replace('-', ""))
    .fetch_one(&mut *tx)
    .await
    .expect("insert");

    // A later write commits first, with a higher id.
    s.activate(&key, "ws-1").await.expect("activate");
    let activated = s
        .events(&key)
        .await
        .into_iter()
        .find(|e| e.r#type == "activated")
        .expect("activated");
    assert!(activated.id > late_id);

    // Neither is delivered or listed while the lower id is in flight.
    let early = tokio::time::timeout(Duration::from_millis(700), stream.message()).await;
    assert!(
        early.is_err(),
        "delivered past an id still in flight: {early:?}"
    );
    let page = s
        .licenses
        .list_events(pb::ListEventsRequest {
            after: first.cursor.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(page.events.is_empty(), "listed past an id still in flight");
    assert!(id_of(&page.next_cursor) < late_id);

    tx.commit().await.expect("commit");
    let a = next_event(&mut stream).await;
    let b = next_event(&mut stream).await;
    assert_eq!((a.id, b.id), (late_id, activated.id));
    let page = s
        .licenses
        .list_events(pb::ListEventsRequest {
            after: first.cursor,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let listed: Vec<i64> = page.events.iter().map(|e| e.id).collect();
    assert_eq!(listed, vec![late_id, activated.id]);
    drop(stream);
    s.stop().await;
}

/// The server's own limit on a call (`request_timeout`) bounds a stream
/// only until its response starts (src/grpc/deadline.rs): a consumer that
/// watches for longer than that keeps receiving, not DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_lives_past_the_servers_request_timeout() {
    let mut s = TestServer::start_with(licensd::server::Config {
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    s.product("LONG", "1.0.0").await;
    let key = s.issue(license_req("LONG", 1, 1)).await.key;
    let mut stream = s
        .licenses
        .watch_events(watch_req(""))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next_event(&mut stream).await.r#type, "issued");
    // Twice the limit, then a write.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.activate(&key, "ws-1").await.expect("activate");
    let e = next_event(&mut stream).await;
    assert_eq!(
        (
            e.license_key.as_str(),
            e.r#type.as_str(),
            e.fingerprint.as_str()
        ),
        (key.as_str(), "activated", "ws-1")
    );
    drop(stream);
    s.stop().await;
}

async fn next_event(stream: &mut tonic::Streaming<pb::WatchEventsResponse>) -> pb::LicenseEvent {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(e) = msg.event {
            return e;
        }
    }
}

#[tokio::test]
async fn filters_by_product_and_type_and_refuses_bad_requests() {
    let mut s = TestServer::start().await;
    s.product("ALPHA", "1.0.0").await;
    s.product("BETA", "1.0.0").await;
    let a = s.issue(license_req("ALPHA", 2, 1)).await.key;
    let b = s.issue(license_req("BETA", 2, 1)).await.key;
    s.activate(&a, "ws-a").await.expect("activate");
    s.activate(&b, "ws-b").await.expect("activate");

    let list = |s: &mut TestServer, product: &str, types: &[&str]| {
        let req = pb::ListEventsRequest {
            product: product.into(),
            event_types: types.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        let mut client = s.licenses.clone();
        async move { client.list_events(req).await }
    };
    let all = list(&mut s, "", &[]).await.expect("all").into_inner();
    let kinds: Vec<(String, String)> = all
        .events
        .iter()
        .map(|e| (e.license_key.clone(), e.r#type.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (a.clone(), "issued".into()),
            (b.clone(), "issued".into()),
            (a.clone(), "activated".into()),
            (b.clone(), "activated".into()),
        ]
    );
    let beta = list(&mut s, "BETA", &[]).await.expect("beta").into_inner();
    assert!(beta.events.iter().all(|e| e.product == "BETA"));
    assert_eq!(beta.events.len(), 2);
    let activations = list(&mut s, "ALPHA", &["activated", "deactivated"])
        .await
        .expect("activations")
        .into_inner();
    assert_eq!(activations.events.len(), 1);
    assert_eq!(activations.events[0].fingerprint, "ws-a");
    // The cursor moved past what the filters left out.
    assert_eq!(activations.next_cursor, all.next_cursor);

    // The same filters on a stream.
    let mut stream = s
        .licenses
        .watch_events(pb::WatchEventsRequest {
            product: "BETA".into(),
            event_types: vec!["activated".into()],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.license_key.as_str(), e.r#type.as_str()),
        (b.as_str(), "activated")
    );
    s.activate(&a, "ws-a2").await.expect("activate");
    s.activate(&b, "ws-b2").await.expect("activate");
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.license_key.as_str(), e.fingerprint.as_str()),
        (b.as_str(), "ws-b2")
    );
    drop(stream);

    // Refusals, and nothing streamed for them.
    for bad in [
        "x",
        "f1.",
        "f1.-5",
        "f1.+5",
        "e1.3",
        "f1.99999999999999999999",
    ] {
        let res = s
            .licenses
            .list_events(pb::ListEventsRequest {
                after: bad.into(),
                ..Default::default()
            })
            .await;
        let status = res.expect_err("a malformed cursor");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        assert_eq!(common::bad_fields(&status), vec!["after"], "{bad}");
        let res = s.licenses.watch_events(watch_req(bad)).await;
        assert_eq!(res.expect_err("refused").code(), Code::InvalidArgument);
    }
    let status = list(&mut s, "", &["exploded"]).await.expect_err("bad type");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(common::bad_fields(&status), vec!["event_types"]);
    assert_refused(
        list(&mut s, "GAMMA", &[]).await,
        Code::NotFound,
        "PRODUCT_NOT_FOUND",
    );
    let status = list(&mut s, "not a code!", &[])
        .await
        .expect_err("bad product");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = s
        .licenses
        .list_events(pb::ListEventsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative page size");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Roles: support reads the feed; no token, or a wrong one, does not.
    let support = common::create_token(&s.db_url, "support", "support-desk").await;
    let (_, mut as_support) = s.clients_with(Some(&support));
    let page = as_support
        .list_events(pb::ListEventsRequest::default())
        .await
        .expect("support reads the feed")
        .into_inner();
    assert_eq!(page.events.len(), 6);
    let (_, mut anonymous) = s.clients_with(None);
    let status = anonymous
        .list_events(pb::ListEventsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = anonymous
        .watch_events(watch_req(""))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let (_, mut forged) = s.clients_with(Some("lsd_abcdefgh_0000000000000000000000000000"));
    let status = forged
        .watch_events(watch_req(""))
        .await
        .expect_err("a forged token");
    assert_eq!(status.code(), Code::Unauthenticated);
    s.stop().await;
}

/// A consumer that stops reading holds a bounded buffer, is told
/// `CONSUMER_TOO_SLOW` once the stall time passes, and resumes from its last
/// cursor without a gap or a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_is_cut_off_and_resumes_from_its_cursor() {
    let mut s = TestServer::start_with(licensd::server::Config {
        watch_stall: Duration::from_secs(1),
        limits: licensd::grpc::auth::LimitConfig {
            activation_per_ip_per_sec: 0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    s.product("SLOW", "1.0.0").await;
    let key = s.issue(license_req("SLOW", 4, 1)).await.key;
    // Enough events to fill the HTTP/2 window and the watch's buffer.
    const PAIRS: usize = 1500;
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut activation = s.activation.clone();
        let key = key.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..PAIRS / 4 {
                let _ = w;
                activation
                    .activate(pb::ActivateRequest {
                        license_key: key.clone(),
                        fingerprint: format!("ws-{w}"),
                        hostname: "h".into(),
                        client_version: "1.0.0".into(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("activate {i}: {e:?}"));
                activation
                    .deactivate(pb::DeactivateRequest {
                        license_key: key.clone(),
                        fingerprint: format!("ws-{w}"),
                    })
                    .await
                    .expect("deactivate");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let total = 1 + 2 * PAIRS;

    // Opens the stream and reads nothing for three seconds. (With small
    // HTTP/2 windows: a client's default 2 MiB would hold all the events.)
    let narrow = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut slow = LicenseServiceClient::with_interceptor(
        narrow,
        common::BearerAuth::new(Some(&s.admin_token)),
    );
    let mut stream = slow
        .watch_events(watch_req(""))
        .await
        .expect("watch")
        .into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut ids = Vec::new();
    let mut cursor = String::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream moves or ends")
        {
            Ok(Some(msg)) => {
                ids.extend(msg.event.map(|e| e.id));
                cursor = msg.cursor;
            }
            Ok(None) => panic!(
                "the stream ended without a status after {} events",
                ids.len()
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert_eq!(common::error_info(&end).0, "CONSUMER_TOO_SLOW");
    assert!(
        !ids.is_empty() && ids.len() < total,
        "cut off part way: {} of {total}",
        ids.len()
    );

    // Resumed from the last cursor: the rest, nothing twice.
    let mut stream = s
        .licenses
        .watch_events(watch_req(&cursor))
        .await
        .expect("watch")
        .into_inner();
    while ids.len() < total {
        ids.push(next_event(&mut stream).await.id);
    }
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), total, "no event twice");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    drop(stream);
    s.stop().await;
}

/// Shutting down ends open streams at once (they would otherwise hold the
/// drain to its end), with a status that tells the consumer to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_with_a_resumable_status() {
    let mut s = TestServer::start_with(licensd::server::Config {
        drain_timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await;
    s.product("BYE", "1.0.0").await;
    s.issue(license_req("BYE", 1, 1)).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut client: LicenseServiceClient<common::Authed> = s.licenses.clone();
        let mut stream = client
            .watch_events(watch_req(""))
            .await
            .expect("watch")
            .into_inner();
        next_event(&mut stream).await;
        streams.push(stream);
    }
    let started = Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return None,
                        Err(status) => return Some(status),
                    }
                }
            })
        })
        .collect();
    s.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the streams: {:?}",
        started.elapsed()
    );
    for r in readers {
        let status = r.await.expect("reader").expect("ended with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(common::error_info(&status).0, "SHUTTING_DOWN");
    }
}
