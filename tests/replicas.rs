//! Several replicas, one database: three real `licensd serve` processes share
//! one PostgreSQL database (or one SQLite file) and are driven together. The
//! seat limit (R7), one-time redemption (R4) and idempotency hold whatever the
//! interleaving of calls across replicas.
//!
//! PostgreSQL tests read the admin URL from `LICENSD_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`) and create a fresh database
//! per test. Without the variable they are skipped with a notice on stderr,
//! except under CI (`CI` set), where they fail.

mod cluster;
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster::*;
use common::{code_req, license_req};
use licensd::proto as pb;

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
        certificate_expires_at: None,
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
    let code = issue_code(&nodes, code_req("ACME", 3, 2)).await;
    let new_expiry = redeem(&nodes, &key, code, "fp-2").await;
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

    set_latest_version(&nodes, "ACME", "2.0.0").await;
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
