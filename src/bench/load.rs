//! The load: `concurrency` workers, each with one call in flight, spread over
//! a few HTTP/2 connections, each running one workload until a deadline.
//!
//! Every response is checked: its gRPC status is counted, and an OK answer
//! is compared with what the seeded data implies (a seeded key is VALID, an
//! activation leaves the license within its seats, a renewal moves the
//! expiry forward). Writes keep the seat rule intact by construction:
//!
//! * worker `w` only churns licenses `i` with `i % concurrency == w`, and has
//!   at most one activation of its own outstanding, so it never asks for more
//!   than the one seat every seeded license keeps free, and it deactivates
//!   whatever it activated (at the latest when its run ends);
//! * renewal codes are handed out once each from a shared cursor, and code
//!   `j` is redeemed against a license of the same class (product, edition,
//!   seats) from a workstation the seed bound to it, by an up-to-date client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tonic::transport::Channel;

use super::record::{Outcome, Recorder, Rpc};
use crate::domain::{LicenseKey, RenewalCode};
use crate::proto as pb;
use crate::proto::activation_service_client::ActivationServiceClient;
use crate::proto::license_service_client::LicenseServiceClient;
use crate::store::bulk::{SEED_VERSION, SeedPlan};

/// What a phase's workers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Validate a random seeded key, with one of its bound fingerprints half
    /// of the time.
    Validate,
    /// Validate well-formed keys that no license has (a guessing flood):
    /// every call costs the server one indexed read.
    ValidateUnknown,
    /// Activate a fresh fingerprint on a license, then deactivate it.
    Churn,
    /// Redeem the next renewal code.
    Redeem,
    /// IssueLicense with a fresh request id.
    Issue,
    /// 95% Validate, 4% churn (activate or deactivate), 1% redeem.
    Mixed,
    /// Half the workers churn, the other half validate, at once: Validate
    /// under a write flood.
    Flood,
}

/// Renewal codes handed out once each, from `next` up to `end`.
pub struct CodePool {
    next: AtomicUsize,
    end: usize,
    /// Set when a worker found the pool empty.
    pub exhausted: AtomicBool,
}

impl CodePool {
    /// Codes `range` of the seeded list.
    pub fn new(range: std::ops::Range<usize>) -> Self {
        CodePool {
            next: AtomicUsize::new(range.start),
            end: range.end,
            exhausted: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<usize> {
        let j = self.next.fetch_add(1, Ordering::Relaxed);
        if j < self.end {
            Some(j)
        } else {
            self.exhausted.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// What every worker of a run shares.
pub struct Shared {
    /// Seeded keys, by license index.
    pub keys: Vec<LicenseKey>,
    /// Seeded renewal codes.
    pub codes: Vec<RenewalCode>,
    /// Well-formed keys of the seeded product that no license has.
    pub unknown_keys: Vec<LicenseKey>,
    /// `authorization` value for billing calls (see [`Shared::authorized`]).
    pub bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    /// The seeded product.
    pub product: String,
    /// Distinguishes this run's request ids from any earlier run's.
    pub run_id: String,
    /// Workers in flight (also the churn partition count).
    pub concurrency: usize,
    /// Validate with a fingerprint says it holds a fresh offline
    /// certificate (`certificate_expires_at`), as a product that keeps its
    /// certificate does: the answer then carries none.
    pub certificate_hint: bool,
}

impl Shared {
    /// `msg` as a billing call, with the bench's admin token.
    pub fn authorized<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req
    }
}

/// Runs `load` with `shared.concurrency` workers over `channels` for
/// `duration`, recording into `recorder`. Returns the wall time from start
/// until the last in-flight call returned.
pub async fn run_phase(
    load: Load,
    shared: &Arc<Shared>,
    channels: &[Channel],
    codes: &Arc<CodePool>,
    duration: Duration,
    recorder: &Arc<Recorder>,
) -> Duration {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..shared.concurrency {
        let channel = channels[w % channels.len()].clone();
        let mut worker = Worker {
            id: w,
            shared: shared.clone(),
            codes: codes.clone(),
            recorder: recorder.clone(),
            activation: ActivationServiceClient::new(channel.clone()),
            license: LicenseServiceClient::new(channel),
            rng: SmallRng::from_rng(&mut rand::rng()),
            pending: None,
            serial: 0,
            // 37 is prime to 100: the workers start at different places of
            // the cycle, so the first redemptions come at once.
            mixed_slot: (w as u64 * 37) % 100,
            backoff: None,
        };
        tasks.spawn(async move { worker.run(load, deadline).await });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            // A worker only panics on a bug; make it loud.
            std::panic::resume_unwind(e.into_panic());
        }
    }
    start.elapsed()
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    codes: Arc<CodePool>,
    recorder: Arc<Recorder>,
    activation: ActivationServiceClient<Channel>,
    license: LicenseServiceClient<Channel>,
    rng: SmallRng,
    /// The activation this worker made and has not undone: (license, fingerprint).
    pending: Option<(usize, String)>,
    serial: u64,
    /// `mixed`: where this worker is in its cycle of 100 calls (95
    /// Validates, 4 churns, 1 redemption: exactly, not by chance).
    mixed_slot: u64,
    /// The delay the last refusal asked for.
    backoff: Option<Duration>,
}

/// What one step did.
enum Step {
    Done,
    /// Nothing left for this worker to do (no license of its own to churn,
    /// no renewal code left).
    Idle,
}

impl Worker {
    async fn run(&mut self, load: Load, deadline: Instant) {
        while Instant::now() < deadline {
            let step = match load {
                Load::Validate => self.validate().await,
                Load::ValidateUnknown => self.validate_unknown().await,
                Load::Churn => self.churn().await,
                Load::Redeem => self.redeem().await,
                Load::Issue => self.issue().await,
                Load::Flood if self.id.is_multiple_of(2) => self.churn().await,
                Load::Flood => self.validate().await,
                Load::Mixed => {
                    let roll = self.mixed_slot;
                    self.mixed_slot = (self.mixed_slot + 1) % 100;
                    let step = if roll < 95 {
                        Step::Idle
                    } else if roll < 99 {
                        self.churn().await
                    } else {
                        self.redeem().await
                    };
                    match step {
                        // Validate, also in place of a churn or redeem this
                        // worker has nothing for.
                        Step::Idle => self.validate().await,
                        done => done,
                    }
                }
            };
            if matches!(step, Step::Idle) {
                break;
            }
            if let Some(wait) = self.backoff.take() {
                tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
        // Give back the seat this worker holds.
        if let Some((i, fp)) = self.pending.take() {
            self.deactivate(i, fp).await;
        }
    }

    fn record(&mut self, rpc: Rpc, started: Instant, outcome: Outcome) {
        // A refusal that asks to come back later (OVERLOADED, RATE_LIMITED)
        // is honoured, as a well-behaved client does: hammering a server
        // that sheds load would measure the hammering.
        if let Outcome::Error(status) = &outcome {
            use tonic_types::StatusExt;
            self.backoff = status.get_details_retry_info().and_then(|r| r.retry_delay);
        }
        self.recorder.record(rpc, started.elapsed(), outcome);
    }

    fn random_license(&mut self) -> usize {
        self.rng.random_range(0..self.shared.keys.len())
    }

    async fn validate(&mut self) -> Step {
        let i = self.random_license();
        let shape = SeedPlan::shape(i);
        let fingerprint = if self.rng.random_bool(0.5) {
            SeedPlan::fingerprint(i, self.rng.random_range(0..shape.activations))
        } else {
            String::new()
        };
        // The seeded product's lease is the default, 30 days: a certificate
        // received just now expires then.
        let certificate_expires_at = (self.shared.certificate_hint && !fingerprint.is_empty())
            .then(|| prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() + 30 * 86_400,
                nanos: 0,
            });
        let req = pb::ValidateRequest {
            license_key: self.shared.keys[i].to_string(),
            fingerprint,
            client_version: SEED_VERSION.into(),
            certificate_expires_at,
        };
        let started = Instant::now();
        let res = self.activation.validate(req).await;
        let outcome = match res {
            Ok(r) => {
                let r = r.into_inner();
                if r.validity == pb::Validity::Valid as i32 && r.valid {
                    Outcome::Ok
                } else {
                    Outcome::Unexpected(format!(
                        "seeded license {i} answered validity {} instead of VALID",
                        r.validity
                    ))
                }
            }
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Validate, started, outcome);
        Step::Done
    }

    async fn validate_unknown(&mut self) -> Step {
        let i = self.rng.random_range(0..self.shared.unknown_keys.len());
        let req = pb::ValidateRequest {
            license_key: self.shared.unknown_keys[i].to_string(),
            fingerprint: String::new(),
            client_version: String::new(),
            certificate_expires_at: None,
        };
        let started = Instant::now();
        let outcome = match self.activation.validate(req).await {
            Ok(r) if r.get_ref().validity == pb::Validity::NotFound as i32 => Outcome::Ok,
            Ok(r) => Outcome::Unexpected(format!(
                "a key no license has answered validity {}",
                r.get_ref().validity
            )),
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Validate, started, outcome);
        Step::Done
    }

    /// The licenses this worker may churn: `w`, `w + C`, `w + 2C`, …
    fn own_license(&mut self) -> Option<usize> {
        let (n, c, w) = (self.shared.keys.len(), self.shared.concurrency, self.id);
        if w >= n {
            return None;
        }
        let owned = (n - w).div_ceil(c);
        Some(w + c * self.rng.random_range(0..owned))
    }

    /// One half of a churn cycle: activate a fresh fingerprint, or undo the
    /// activation this worker made last.
    async fn churn(&mut self) -> Step {
        if let Some((i, fp)) = self.pending.take() {
            self.deactivate(i, fp).await;
            return Step::Done;
        }
        let Some(i) = self.own_license() else {
            return Step::Idle;
        };
        self.serial += 1;
        let fp = format!("churn-{}-{}-{}", self.shared.run_id, self.id, self.serial);
        let req = pb::ActivateRequest {
            license_key: self.shared.keys[i].to_string(),
            fingerprint: fp.clone(),
            hostname: format!("bench-{}", self.id),
            client_version: SEED_VERSION.into(),
        };
        let started = Instant::now();
        let res = self.activation.activate(req).await;
        let outcome = match res {
            Ok(r) => {
                // Whatever the answer says, the seat may be taken: undo it.
                self.pending = Some((i, fp.clone()));
                let r = r.into_inner();
                let seats = SeedPlan::shape(i).seats;
                match r.license {
                    Some(l) if l.seats == seats && l.seats_used <= seats => {
                        if l.activations.iter().any(|a| a.fingerprint == fp) {
                            Outcome::Ok
                        } else {
                            Outcome::Unexpected(format!(
                                "license {i}: the new fingerprint is not among the activations"
                            ))
                        }
                    }
                    other => Outcome::Unexpected(format!(
                        "license {i} ({seats} seats): activation answered {:?}",
                        other.map(|l| (l.seats, l.seats_used))
                    )),
                }
            }
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Activate, started, outcome);
        Step::Done
    }

    async fn deactivate(&mut self, i: usize, fingerprint: String) {
        let req = pb::DeactivateRequest {
            license_key: self.shared.keys[i].to_string(),
            fingerprint: fingerprint.clone(),
        };
        let started = Instant::now();
        let res = self.activation.deactivate(req).await;
        let outcome = match res {
            Ok(r) => match r.into_inner().license {
                Some(l) if !l.activations.iter().any(|a| a.fingerprint == fingerprint) => {
                    Outcome::Ok
                }
                _ => Outcome::Unexpected(format!("license {i}: the fingerprint is still bound")),
            },
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Deactivate, started, outcome);
    }

    async fn redeem(&mut self) -> Step {
        let Some(j) = self.codes.take() else {
            return Step::Idle;
        };
        // A license of the code's class: i = class + CLASSES·k.
        let class = SeedPlan::code_class(j);
        let n = self.shared.keys.len();
        if class >= n {
            return Step::Idle;
        }
        let per_class = (n - class).div_ceil(SeedPlan::CLASSES);
        let i = class + SeedPlan::CLASSES * self.rng.random_range(0..per_class);
        let req = pb::RedeemRenewalCodeRequest {
            license_key: self.shared.keys[i].to_string(),
            renewal_code: self.shared.codes[j].expose_display(),
            fingerprint: SeedPlan::fingerprint(i, 0),
            client_version: SEED_VERSION.into(),
        };
        let started = Instant::now();
        let res = self.activation.redeem_renewal_code(req).await;
        let outcome = match res {
            Ok(r) => {
                let r = r.into_inner();
                let before = r.previous_expires_at.map(|t| t.seconds);
                let after = r
                    .license
                    .as_ref()
                    .and_then(|l| l.expires_at)
                    .map(|t| t.seconds);
                match (before, after) {
                    (Some(b), Some(a)) if a > b => Outcome::Ok,
                    _ => Outcome::Unexpected(format!(
                        "license {i}: renewal did not move the expiry ({before:?} → {after:?})"
                    )),
                }
            }
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Redeem, started, outcome);
        Step::Done
    }

    async fn issue(&mut self) -> Step {
        self.serial += 1;
        let req = self.shared.authorized(pb::IssueLicenseRequest {
            request_id: format!("bench-{}-{}-{}", self.shared.run_id, self.id, self.serial),
            product: self.shared.product.clone(),
            edition: pb::Edition::Business as i32,
            kind: pb::LicenseKind::Standard as i32,
            seats: 1,
            term_years: 1,
            starts_at: None,
            order_ref: format!("bench-{}", self.serial),
            customer_ref: format!("bench-{}", self.id),
            reseller: String::new(),
        });
        let started = Instant::now();
        let res = self.license.issue_license(req).await;
        let outcome = match res {
            Ok(r) => {
                let l = r.into_inner();
                if l.validity == pb::Validity::Valid as i32 && l.seats == 1 {
                    Outcome::Ok
                } else {
                    Outcome::Unexpected(format!(
                        "issued license answered validity {} seats {}",
                        l.validity, l.seats
                    ))
                }
            }
            Err(status) => Outcome::Error(status),
        };
        self.record(Rpc::Issue, started, outcome);
        Step::Done
    }
}
