//! The soak's mixed load. Customers each run one license's life again and
//! again (issue, activate two workstations, buy and redeem a renewal code,
//! deactivate one, suspend, reinstate; after each change Validate on any
//! replica must answer it within 1 s); a seat pool has more workstations
//! than seats, taken and freed across the replicas; Validate is called
//! throughout; a consumer follows the event feed. Each keeps a model of
//! what it was told, which the audit holds the database to.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use licensd::proto as pb;

use super::{Fleet, classify, refused_with};
use crate::common::{code_req, license_req};

pub const PRODUCT: &str = "CHAOS";
/// Seats of a customer's license and of its renewal codes.
pub const SEATS: u32 = 2;
/// The pool's seats, and its workstations.
pub const POOL_SEATS: u32 = 3;
pub const POOL_WORKSTATIONS: usize = 8;

/// One customer license, as its customer was told.
#[derive(Debug, Clone, Default)]
pub struct Customer {
    pub key: String,
    /// Expiry when issued, microseconds.
    pub issued_expires_at: i64,
    /// The renewal code's id, once redeemed on it.
    pub code_id: Option<String>,
    /// RENEWAL_CODE_ALREADY_REDEEMED answers to retries of its redemption
    /// (an earlier attempt had redeemed it), and the attempts in all.
    pub refusals_seen: usize,
    pub redeem_attempts: usize,
    /// Its life ran to the end (issued … reinstated).
    pub complete: bool,
}

/// What the load was told.
#[derive(Default)]
pub struct Model {
    pub customers: Vec<Customer>,
    pub pool_key: String,
    /// The pool's workstations bound now.
    pub pool_bound: BTreeSet<String>,
    pub validates_not_found: usize,
}

pub fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

fn activate_req(key: &str, fingerprint: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        hostname: format!("host-{fingerprint}"),
        client_version: "1.0.0".into(),
    }
}

fn deactivate_req(key: &str, fingerprint: &str) -> pb::DeactivateRequest {
    pb::DeactivateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
    }
}

/// The answer, or `None` with the failure recorded.
fn expect<T>(fleet: &Fleet, who: &str, step: &str, res: Result<T, tonic::Status>) -> Option<T> {
    res.map_err(|st| {
        fleet
            .record
            .violation(format!("{who} {step}: {:?}", classify(&st, false)))
    })
    .ok()
}

/// A change acknowledged on one replica is answered by every replica
/// within 1 s (docs/operations.md, Replicas): Validate on any replica
/// answers `want` for `key` from `fingerprint` by a call that starts at
/// most 1 s after the acknowledgement.
async fn fresh(fleet: &Fleet, who: &str, key: &str, fingerprint: &str, want: pb::Validity) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let req = pb::ValidateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        ..Default::default()
    };
    loop {
        let started = Instant::now();
        let res = fleet
            .call("validate", |ch| {
                let req = req.clone();
                async move { Fleet::activation(ch).validate(req).await }
            })
            .await
            .result;
        let Some(answer) = expect(fleet, who, "validate", res) else {
            return;
        };
        if answer.validity == want as i32 {
            fleet.record.fresh.fetch_add(1, Ordering::Relaxed);
            return;
        }
        fleet.record.stale.fetch_add(1, Ordering::Relaxed);
        if started > deadline {
            fleet.record.violation(format!(
                "{who}: Validate answered {:?} for {fingerprint}, over 1 s after the change to {want:?} was acknowledged",
                pb::Validity::try_from(answer.validity)
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One customer license's life; `None` where a step failed (recorded).
async fn life(fleet: &Fleet, model: &Mutex<Model>, w: usize, n: usize) -> Option<()> {
    let who = format!("customer {w}/{n}");
    let req = license_req(PRODUCT, SEATS, 1);
    let issued = fleet
        .call("issue", |ch| {
            let req = req.clone();
            async move { fleet.licenses(ch).issue_license(req).await }
        })
        .await
        .result;
    let license = expect(fleet, &who, "issue", issued)?;
    let key = license.key.clone();
    let slot = {
        let mut m = model.lock().unwrap();
        m.customers.push(Customer {
            key: key.clone(),
            issued_expires_at: micros(&license.expires_at),
            ..Default::default()
        });
        m.customers.len() - 1
    };

    for fp in ["a", "b"] {
        let req = activate_req(&key, fp);
        let res = fleet
            .call("activate", |ch| {
                let req = req.clone();
                async move { Fleet::activation(ch).activate(req).await }
            })
            .await
            .result;
        expect(fleet, &who, "activate", res)?;
    }
    fresh(fleet, &who, &key, "b", pb::Validity::Valid).await;

    let req = code_req(PRODUCT, SEATS, 1);
    let code = fleet
        .call("issue_code", |ch| {
            let req = req.clone();
            async move { fleet.licenses(ch).issue_renewal_code(req).await }
        })
        .await
        .result;
    let code = expect(fleet, &who, "issue_code", code)?;

    let req = pb::RedeemRenewalCodeRequest {
        license_key: key.clone(),
        renewal_code: code.renewal_code.clone(),
        fingerprint: "a".into(),
        client_version: "1.0.0".into(),
    };
    let redeemed = fleet
        .call("redeem", |ch| {
            let req = req.clone();
            async move { Fleet::activation(ch).redeem_renewal_code(req).await }
        })
        .await;
    let again =
        redeemed.ambiguous && refused_with(&redeemed.result, "RENEWAL_CODE_ALREADY_REDEEMED");
    if !again {
        expect(fleet, &who, "redeem", redeemed.result)?;
    }
    {
        let mut m = model.lock().unwrap();
        let c = &mut m.customers[slot];
        c.code_id = Some(code.id.clone());
        c.refusals_seen = usize::from(again);
        c.redeem_attempts = redeemed.attempts;
    }

    let req = deactivate_req(&key, "b");
    let freed = fleet
        .call("deactivate", |ch| {
            let req = req.clone();
            async move { Fleet::activation(ch).deactivate(req).await }
        })
        .await;
    if !(freed.ambiguous && refused_with(&freed.result, "MACHINE_NOT_ACTIVATED")) {
        expect(fleet, &who, "deactivate", freed.result)?;
    }
    fresh(fleet, &who, &key, "b", pb::Validity::NotActivated).await;

    let req = pb::SuspendLicenseRequest {
        license_key: key.clone(),
        reason: "chaos".into(),
        request_id: crate::cluster::unique("suspend"),
    };
    let res = fleet
        .call("suspend", |ch| {
            let req = req.clone();
            async move { fleet.licenses(ch).suspend_license(req).await }
        })
        .await
        .result;
    expect(fleet, &who, "suspend", res)?;
    fresh(fleet, &who, &key, "a", pb::Validity::Suspended).await;
    let req = pb::ReinstateLicenseRequest {
        license_key: key.clone(),
        reason: "chaos".into(),
        request_id: crate::cluster::unique("reinstate"),
    };
    let res = fleet
        .call("reinstate", |ch| {
            let req = req.clone();
            async move { fleet.licenses(ch).reinstate_license(req).await }
        })
        .await
        .result;
    expect(fleet, &who, "reinstate", res)?;
    fresh(fleet, &who, &key, "a", pb::Validity::Valid).await;
    model.lock().unwrap().customers[slot].complete = true;
    Some(())
}

/// Customer `w`: one license's life after another until `stop`.
pub async fn customer(
    fleet: Arc<Fleet>,
    model: Arc<Mutex<Model>>,
    w: usize,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if life(&fleet, &model, w, n).await.is_none() {
            return;
        }
        n += 1;
    }
}

/// Takes and frees the pool's seats with workstations `mine`, on whichever
/// replica, until `stop`; leaves the model's `pool_bound` exact.
pub async fn pool_user(
    fleet: Arc<Fleet>,
    model: Arc<Mutex<Model>>,
    mine: Vec<String>,
    stop: Arc<AtomicBool>,
) {
    let key = model.lock().unwrap().pool_key.clone();
    while !stop.load(Ordering::Relaxed) {
        let fp = mine[fleet.random(mine.len())].clone();
        let bound = model.lock().unwrap().pool_bound.contains(&fp);
        if bound {
            let req = deactivate_req(&key, &fp);
            let res = fleet
                .call("deactivate", |ch| {
                    let req = req.clone();
                    async move { Fleet::activation(ch).deactivate(req).await }
                })
                .await;
            if res.result.is_ok()
                || (res.ambiguous && refused_with(&res.result, "MACHINE_NOT_ACTIVATED"))
            {
                model.lock().unwrap().pool_bound.remove(&fp);
            } else {
                fleet
                    .record
                    .violation(format!("pool deactivate {fp}: {:?}", res.result.err()));
                return;
            }
        } else {
            let req = activate_req(&key, &fp);
            let res = fleet
                .call("activate", |ch| {
                    let req = req.clone();
                    async move { Fleet::activation(ch).activate(req).await }
                })
                .await;
            if res.result.is_ok() {
                model.lock().unwrap().pool_bound.insert(fp);
            } else if !refused_with(&res.result, "SEAT_LIMIT_REACHED") {
                fleet
                    .record
                    .violation(format!("pool activate {fp}: {:?}", res.result.err()));
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Validates acknowledged licenses on any replica until `stop`: a license
/// that exists is never answered NOT_FOUND (docs/operations.md, Replicas).
pub async fn validator(fleet: Arc<Fleet>, model: Arc<Mutex<Model>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let key = {
            let m = model.lock().unwrap();
            let n = m.customers.len();
            let pick = fleet.random(n + 1);
            if pick == n {
                m.pool_key.clone()
            } else {
                m.customers[pick].key.clone()
            }
        };
        let req = pb::ValidateRequest {
            license_key: key.clone(),
            ..Default::default()
        };
        let res = fleet
            .call("validate", |ch| {
                let req = req.clone();
                async move { Fleet::activation(ch).validate(req).await }
            })
            .await
            .result;
        match res {
            Ok(v) if v.validity == pb::Validity::NotFound as i32 => {
                model.lock().unwrap().validates_not_found += 1;
                fleet
                    .record
                    .violation(format!("Validate answered NOT_FOUND for {key}"));
            }
            Ok(_) => {}
            Err(st) => fleet
                .record
                .violation(format!("validate: {:?}", classify(&st, false))),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the event feed's consumer received.
#[derive(Default)]
pub struct Watched {
    /// (id, license key, type), in the order received.
    pub events: Vec<(i64, String, String)>,
    pub cursor: String,
    /// Streams opened, and how the ended ones ended.
    pub streams: usize,
    pub endings: std::collections::BTreeMap<String, usize>,
}

/// Follows the event feed (WatchEvents) on one replica after another,
/// resuming from its cursor whenever a stream ends (its replica killed,
/// the database restarted), until `done` and it has event `until` (set by
/// the soak once the load has stopped).
pub async fn watcher(fleet: Arc<Fleet>, got: Arc<Mutex<Watched>>, until: Arc<Mutex<Option<i64>>>) {
    let deadline_after_target = Duration::from_secs(30);
    let mut target_set_at: Option<Instant> = None;
    let mut avoid = None;
    loop {
        let Some((i, generation, _, addr)) = fleet.pick(avoid) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        avoid = Some(i);
        // A channel of its own: the stream must not be cut by a timeout.
        let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
        else {
            continue;
        };
        let cursor = got.lock().unwrap().cursor.clone();
        got.lock().unwrap().streams += 1;
        let opened = fleet
            .licenses(channel)
            .watch_events(pb::WatchEventsRequest {
                after: cursor,
                ..Default::default()
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(st) => {
                let ending = format!(
                    "open: {:?}",
                    classify(&st, fleet.generation(i) != generation)
                );
                *got.lock().unwrap().endings.entry(ending).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            if let Some(target) = *until.lock().unwrap() {
                let set_at = *target_set_at.get_or_insert_with(Instant::now);
                let last = got.lock().unwrap().events.last().map(|e| e.0);
                if last.is_some_and(|l| l >= target) {
                    return;
                }
                if set_at.elapsed() > deadline_after_target {
                    fleet.record.violation(format!(
                        "the event feed's consumer did not reach event {target}"
                    ));
                    return;
                }
            }
            let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
            let Ok(next) = next else { continue };
            let ending = match next {
                Ok(Some(msg)) => {
                    let mut g = got.lock().unwrap();
                    if let Some(e) = msg.event {
                        g.events.push((e.id, e.license_key, e.r#type));
                    }
                    g.cursor = msg.cursor;
                    continue;
                }
                Ok(None) => "ended OK".to_string(),
                Err(st) => {
                    let outcome = classify(&st, fleet.generation(i) != generation);
                    if matches!(outcome, super::Outcome::Failed(_)) {
                        fleet
                            .record
                            .violation(format!("WatchEvents on replica {i}: {outcome:?}"));
                    }
                    format!("{outcome:?}")
                }
            };
            *got.lock().unwrap().endings.entry(ending).or_default() += 1;
            break;
        }
    }
}
