//! Replicas agree: a write acknowledged on one replica is what the other
//! replicas' Validate answers at once, not only "within a second".
//!
//! Three real `licensd serve` processes share one database. Each trial makes
//! one write on replica 0 and, as soon as it is acknowledged, validates on
//! replica 1 or 2 (a load balancer's next pick). A license that exists is
//! never answered `VALIDITY_NOT_FOUND` (the cache leaves unknown keys to the
//! database), on both backends. On PostgreSQL every other change is pushed
//! to the other replicas by `LISTEN/NOTIFY`, and the writer answers only
//! once every other listening replica has acknowledged it. (How long that
//! takes is measured by `licensd bench --replicas`, not asserted here.)

mod cluster;
mod common;

use cluster::*;
use common::{code_req, license_req};
use licensd::proto as pb;

const TRIALS: usize = 100;

/// Stale answers allowed per 100 immediate reads on another replica. The
/// writer answers only after every other listening replica has
/// acknowledged the notification (it has marked the license by then), so
/// a stale answer needs an acknowledgement that came too late (a stall of
/// half a second) or a replica that was not yet known to be listening.
const STALE_ALLOWED: usize = 1;

fn validate_req(key: &str, fingerprint: &str, version: &str) -> pb::ValidateRequest {
    pb::ValidateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        client_version: version.into(),
        certificate_expires_at: None,
    }
}

/// Stale answers of one kind of change.
struct Tally {
    what: &'static str,
    trials: usize,
    stale: Vec<String>,
}

impl Tally {
    fn new(what: &'static str) -> Self {
        Tally {
            what,
            trials: 0,
            stale: Vec::new(),
        }
    }

    /// Validates `req` on another replica than 0 (alternating) right away
    /// and counts the answer as stale unless `expected` holds.
    async fn read_at_once(
        &mut self,
        nodes: &Nodes,
        req: pb::ValidateRequest,
        mut expected: impl FnMut(&pb::ValidateResponse) -> bool,
    ) {
        let replica = 1 + self.trials % (nodes.replicas() - 1);
        self.trials += 1;
        let got = nodes
            .activation(replica)
            .validate(req.clone())
            .await
            .expect("validate")
            .into_inner();
        if !expected(&got) {
            // How long it stays stale tells a race (microseconds) from a
            // change that only the next poll brought (milliseconds).
            let seen = std::time::Instant::now();
            let mut again = nodes.activation(replica);
            let mut until = None;
            for _ in 0..200 {
                let v = again
                    .validate(req.clone())
                    .await
                    .expect("validate")
                    .into_inner();
                if expected(&v) {
                    until = Some(seen.elapsed());
                    break;
                }
            }
            self.stale.push(format!(
                "trial {} on replica {replica}: {got:?}; answered right {until:?} later",
                self.trials
            ));
        }
    }

    fn check(&self) {
        eprintln!(
            "{}: {} stale of {} immediate reads on another replica",
            self.what,
            self.stale.len(),
            self.trials
        );
        assert_eq!(self.trials, TRIALS, "{}", self.what);
        assert!(
            self.stale.len() <= STALE_ALLOWED,
            "{}: {} stale answers of {}:\n{}",
            self.what,
            self.stale.len(),
            self.trials,
            self.stale.join("\n")
        );
    }
}

/// 100 licenses issued on replica 0, each validated at once on another
/// replica: VALID every time, never NOT_FOUND.
async fn a_license_issued_on_one_replica_is_found_at_once_on_the_others(
    nodes: &Nodes,
    product: &str,
) {
    create_product(nodes, product, "1.0.0").await;
    let mut not_found = 0;
    let mut tally = Tally::new("issue");
    for _ in 0..TRIALS {
        let key = issue(nodes, license_req(product, 2, 1)).await.key;
        tally
            .read_at_once(nodes, validate_req(&key, "", ""), |v| {
                if v.validity == pb::Validity::NotFound as i32 {
                    not_found += 1;
                }
                v.validity == pb::Validity::Valid as i32 && v.valid
            })
            .await;
    }
    assert_eq!(not_found, 0, "false NOT_FOUND answers: {:?}", tally.stale);
    assert!(tally.stale.is_empty(), "{:?}", tally.stale);
    tally.check();
}

/// Suspend and reinstate (alternating), then revoke: each answered by the
/// other replicas at once.
async fn status_changes_are_answered_at_once_on_the_others(nodes: &Nodes, product: &str) {
    create_product(nodes, product, "1.0.0").await;
    let key = issue(nodes, license_req(product, 2, 1)).await.key;
    let mut tally = Tally::new("suspend/reinstate");
    for i in 0..TRIALS {
        let mut licenses = nodes.licenses(0);
        let expected = if i % 2 == 0 {
            licenses
                .suspend_license(pb::SuspendLicenseRequest {
                    license_key: key.clone(),
                    reason: "chargeback".into(),
                    request_id: String::new(),
                })
                .await
                .expect("suspend");
            pb::Validity::Suspended
        } else {
            licenses
                .reinstate_license(pb::ReinstateLicenseRequest {
                    license_key: key.clone(),
                    reason: "paid".into(),
                    request_id: String::new(),
                })
                .await
                .expect("reinstate");
            pb::Validity::Valid
        };
        tally
            .read_at_once(nodes, validate_req(&key, "", ""), |v| {
                v.validity == expected as i32
            })
            .await;
    }
    tally.check();

    let mut keys = Vec::new();
    for _ in 0..TRIALS {
        keys.push(issue(nodes, license_req(product, 1, 1)).await.key);
    }
    let mut tally = Tally::new("revoke");
    for key in &keys {
        nodes
            .licenses(0)
            .revoke_license(pb::RevokeLicenseRequest {
                license_key: key.clone(),
                reason: "fraud".into(),
                request_id: String::new(),
            })
            .await
            .expect("revoke");
        tally
            .read_at_once(nodes, validate_req(key, "", ""), |v| {
                v.validity == pb::Validity::Revoked as i32
            })
            .await;
    }
    tally.check();
}

/// Activate a workstation, then deactivate it (alternating): the other
/// replicas answer VALID for it, then NOT_ACTIVATED, at once.
async fn activations_are_answered_at_once_on_the_others(nodes: &Nodes, product: &str) {
    create_product(nodes, product, "1.0.0").await;
    let key = issue(nodes, license_req(product, 2, 1)).await.key;
    let mut tally = Tally::new("activate/deactivate");
    let mut activation = nodes.activation(0);
    for i in 0..TRIALS {
        let fingerprint = format!("fp-{}", i / 2);
        let expected = if i % 2 == 0 {
            activation
                .activate(activate_req(&key, &fingerprint))
                .await
                .expect("activate");
            (pb::Validity::Valid, 1)
        } else {
            activation
                .deactivate(pb::DeactivateRequest {
                    license_key: key.clone(),
                    fingerprint: fingerprint.clone(),
                })
                .await
                .expect("deactivate");
            (pb::Validity::NotActivated, 0)
        };
        tally
            .read_at_once(nodes, validate_req(&key, &fingerprint, ""), |v| {
                (v.validity, v.seats_used) == (expected.0 as i32, expected.1)
            })
            .await;
    }
    tally.check();
}

/// Renewals (each moves the expiry), then product updates (each a new
/// latest version): the other replicas answer the new figures at once.
async fn renewals_and_product_updates_are_answered_at_once_on_the_others(
    nodes: &Nodes,
    product: &str,
) {
    create_product(nodes, product, "1.0.0").await;
    let key = issue(nodes, license_req(product, 2, 1)).await.key;
    let mut activation = nodes.activation(0);
    activation
        .activate(activate_req(&key, "fp-renew"))
        .await
        .expect("activate");
    let mut codes = Vec::new();
    for _ in 0..TRIALS {
        codes.push(issue_code(nodes, code_req(product, 2, 1)).await);
    }
    let mut tally = Tally::new("renew");
    for code in codes {
        let expires_at = redeem(nodes, &key, code, "fp-renew").await;
        tally
            .read_at_once(nodes, validate_req(&key, "fp-renew", ""), |v| {
                v.expires_at == expires_at
            })
            .await;
    }
    tally.check();

    let mut tally = Tally::new("product update");
    for i in 0..TRIALS {
        let latest = format!("1.0.{}", i + 1);
        set_latest_version(nodes, product, &latest).await;
        tally
            .read_at_once(nodes, validate_req(&key, "fp-renew", "1.0.0"), |v| {
                v.latest_version == latest && v.update_available
            })
            .await;
    }
    tally.check();
}

/// Every kind of change, one after the other on one cluster (scenarios run
/// side by side would measure the machine's scheduler, not the replicas).
async fn every_kind_of_change_is_answered_at_once_on_the_others(nodes: Nodes) {
    a_license_issued_on_one_replica_is_found_at_once_on_the_others(&nodes, "ISSUE").await;
    status_changes_are_answered_at_once_on_the_others(&nodes, "STATUS").await;
    activations_are_answered_at_once_on_the_others(&nodes, "SEATS").await;
    renewals_and_product_updates_are_answered_at_once_on_the_others(&nodes, "RENEW").await;
}

/// The writer waits for the other replicas' acknowledgements: while one is
/// paused, a write on replica 0 does not answer, and once it resumes the
/// write answers and that replica answers the new state at once. A replica
/// that stays paused costs one bounded wait, not one per write, and is
/// waited for again once it has caught up.
async fn a_write_waits_until_the_other_replicas_have_marked_it(nodes: Nodes) {
    use std::time::{Duration, Instant};
    create_product(&nodes, "ACKS", "1.0.0").await;
    let key = issue(&nodes, license_req("ACKS", 2, 1)).await.key;
    let validity = |replica: usize| {
        let nodes = nodes.clone();
        let key = key.clone();
        async move {
            nodes
                .activation(replica)
                .validate(validate_req(&key, "", ""))
                .await
                .expect("validate")
                .into_inner()
                .validity
        }
    };
    let status_change = |suspend: bool| {
        let nodes = nodes.clone();
        let key = key.clone();
        async move {
            let started = Instant::now();
            let mut licenses = nodes.licenses(0);
            if suspend {
                licenses
                    .suspend_license(pb::SuspendLicenseRequest {
                        license_key: key,
                        reason: "chargeback".into(),
                        request_id: String::new(),
                    })
                    .await
                    .expect("suspend");
            } else {
                licenses
                    .reinstate_license(pb::ReinstateLicenseRequest {
                        license_key: key,
                        reason: "paid".into(),
                        request_id: String::new(),
                    })
                    .await
                    .expect("reinstate");
            }
            started.elapsed()
        }
    };
    assert_eq!(validity(1).await, pb::Validity::Valid as i32);

    // Replica 1 stalls: the suspension is not answered until it resumes
    // and has marked the license.
    nodes.pause(1, true);
    let write = tokio::spawn(status_change(true));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered_early = write.is_finished();
    nodes.pause(1, false);
    let took = write.await.expect("suspend task");
    assert!(
        !answered_early,
        "the write answered while replica 1 had not marked it ({took:?})"
    );
    assert_eq!(validity(1).await, pb::Validity::Suspended as i32);
    assert_eq!(validity(2).await, pb::Validity::Suspended as i32);

    // Stalled for longer than the writer waits: one write waits for it
    // (bounded), the next does not.
    nodes.pause(1, true);
    let first = status_change(false).await;
    let second = status_change(true).await;
    nodes.pause(1, false);
    assert!(
        first >= Duration::from_millis(400) && first < Duration::from_secs(3),
        "the first write after the stall waited {first:?}"
    );
    assert!(
        second < Duration::from_millis(400),
        "a replica known to be late is not waited for again ({second:?})"
    );
    // It catches up by itself and is waited for again.
    let caught_up = Instant::now();
    while validity(1).await != pb::Validity::Suspended as i32 {
        assert!(
            caught_up.elapsed() < Duration::from_secs(5),
            "replica 1 did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its acknowledgement of the late batch arrives with its next one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes.pause(1, true);
    let write = tokio::spawn(status_change(false));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered_early = write.is_finished();
    nodes.pause(1, false);
    write.await.expect("reinstate task");
    assert!(
        !answered_early,
        "replica 1 is waited for again once caught up"
    );
    assert_eq!(validity(1).await, pb::Validity::Valid as i32);
}

async fn issued_licenses_are_found_at_once_on_the_others(nodes: Nodes) {
    a_license_issued_on_one_replica_is_found_at_once_on_the_others(&nodes, "ISSUE").await;
}

/// The two clusters of this file do not run side by side.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_every_change_on_one_replica_is_answered_at_once_by_the_others_never_not_found() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    on_postgres(every_kind_of_change_is_answered_at_once_on_the_others).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_write_waits_for_the_other_replicas_acknowledgements() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    on_postgres(a_write_waits_until_the_other_replicas_have_marked_it).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_license_issued_on_one_replica_is_never_not_found_on_another() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    on_sqlite(issued_licenses_are_found_at_once_on_the_others).await;
}
