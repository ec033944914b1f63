//! The chaos soak's client side (`tests/chaos_soak.rs`): the replicas as a
//! client sees them, calls retried as a client would, and a record of what
//! every attempt answered. The load is in `load.rs`, the audit of the
//! database afterwards in `audit.rs`.

pub mod audit;
pub mod load;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use crate::common::{Authed, BearerAuth};

/// One attempt may take this long before the client gives up on it, which
/// fails the soak: a call waits for the database at most 2 s per step (a
/// token lookup, the operation) and then for the other replicas'
/// acknowledgement of its change at most 500 ms.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// A call is retried (UNAVAILABLE, a lost connection) for this long.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

/// xorshift64*: the chaos schedule and the load's choices come from one
/// printed seed, so a failing run can be replayed (as far as timing allows).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A duration in `lo..hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + Duration::from_micros(self.next() % (hi - lo).as_micros().max(1) as u64)
    }
}

/// What one attempt answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// licensd's UNAVAILABLE, with its reason (`DATABASE_UNAVAILABLE`,
    /// `OVERLOADED`, …): retried.
    Unavailable(String),
    /// The replica was SIGKILLed during the call: a transport error, no
    /// answer. Retried on another replica.
    ConnectionLost,
    /// licensd's refusal (code and reason): the caller decides.
    Refused(String),
    /// No answer within [`CALL_TIMEOUT`]: a failure.
    TimedOut,
    /// INTERNAL, UNKNOWN, or a transport error from a replica that was not
    /// killed: a failure.
    Failed(String),
}

/// One attempt: its kind, when it started (since the soak began), how long
/// it took, what it answered.
#[derive(Debug, Clone)]
pub struct Sample {
    pub kind: &'static str,
    pub at: Duration,
    pub took: Duration,
    pub outcome: Outcome,
}

/// Every attempt, and what the load found wrong.
pub struct Record {
    pub t0: Instant,
    samples: Mutex<Vec<Sample>>,
    violations: Mutex<Vec<String>>,
    /// Changes Validate answered within 1 s, and answers of the previous
    /// state seen meanwhile.
    pub fresh: AtomicUsize,
    pub stale: AtomicUsize,
}

impl Record {
    pub fn new(t0: Instant) -> Record {
        Record {
            t0,
            samples: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            fresh: AtomicUsize::new(0),
            stale: AtomicUsize::new(0),
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn violation(&self, what: String) {
        eprintln!("VIOLATION at {:?}: {what}", self.t0.elapsed());
        self.violations.lock().unwrap().push(what);
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Attempts per kind and outcome.
    pub fn tally(&self) -> BTreeMap<(&'static str, String), usize> {
        let mut out = BTreeMap::new();
        for s in self.samples.lock().unwrap().iter() {
            let outcome = match &s.outcome {
                Outcome::Ok => "OK".to_string(),
                Outcome::Unavailable(r) => format!("UNAVAILABLE {r}"),
                Outcome::ConnectionLost => "connection lost".to_string(),
                Outcome::Refused(r) => r.clone(),
                Outcome::TimedOut => "TIMED OUT".to_string(),
                Outcome::Failed(r) => format!("FAILED {r}"),
            };
            *out.entry((s.kind, outcome)).or_default() += 1;
        }
        out
    }
}

/// The last answer of a call retried as a client would.
pub struct Answer<T> {
    pub result: Result<T, tonic::Status>,
    /// An earlier attempt may have done the work (it ended UNAVAILABLE or
    /// without an answer).
    pub ambiguous: bool,
    pub attempts: usize,
}

struct Slot {
    channel: Option<Channel>,
    addr: Option<String>,
    /// Bumped at each kill: a call that started on another generation lost
    /// its connection to the kill.
    generation: u64,
}

/// The replicas as the clients see them: a slot each, empty while the
/// replica is down. A restarted replica comes back on another port.
pub struct Fleet {
    slots: Mutex<Vec<Slot>>,
    rng: Mutex<Rng>,
    auth: BearerAuth,
    pub record: Record,
}

impl Fleet {
    pub fn new(addrs: &[String], token: &str, seed: u64, t0: Instant) -> Fleet {
        let fleet = Fleet {
            slots: Mutex::new(
                addrs
                    .iter()
                    .map(|_| Slot {
                        channel: None,
                        addr: None,
                        generation: 0,
                    })
                    .collect(),
            ),
            rng: Mutex::new(Rng::new(seed)),
            auth: BearerAuth::new(Some(token)),
            record: Record::new(t0),
        };
        for (i, a) in addrs.iter().enumerate() {
            fleet.up(i, a);
        }
        fleet
    }

    /// Replica `i` serves at `addr`.
    pub fn up(&self, i: usize, addr: &str) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let mut slots = self.slots.lock().unwrap();
        slots[i].channel = Some(channel);
        slots[i].addr = Some(addr.to_string());
    }

    /// Replica `i` is about to be killed: no new call goes there, and the
    /// calls in flight may lose their connection.
    pub fn down(&self, i: usize) {
        let mut slots = self.slots.lock().unwrap();
        slots[i].channel = None;
        slots[i].addr = None;
        slots[i].generation += 1;
    }

    pub fn random(&self, n: usize) -> usize {
        self.rng.lock().unwrap().below(n)
    }

    /// A replica that is up (not `avoid` if another is): (index,
    /// generation, channel, address).
    pub fn pick(&self, avoid: Option<usize>) -> Option<(usize, u64, Channel, String)> {
        let slots = self.slots.lock().unwrap();
        let up: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].channel.is_some())
            .collect();
        let preferred: Vec<usize> = up.iter().copied().filter(|&i| Some(i) != avoid).collect();
        let from = if preferred.is_empty() {
            &up
        } else {
            &preferred
        };
        if from.is_empty() {
            return None;
        }
        let i = from[self.rng.lock().unwrap().below(from.len())];
        Some((
            i,
            slots[i].generation,
            slots[i].channel.clone().unwrap(),
            slots[i].addr.clone().unwrap(),
        ))
    }

    pub fn generation(&self, i: usize) -> u64 {
        self.slots.lock().unwrap()[i].generation
    }

    pub fn licenses(&self, channel: Channel) -> LicenseServiceClient<Authed> {
        LicenseServiceClient::with_interceptor(channel, self.auth.clone())
    }

    pub fn activation(channel: Channel) -> ActivationServiceClient<Channel> {
        ActivationServiceClient::new(channel)
    }

    /// Calls `f` on a replica that is up until it answers something other
    /// than UNAVAILABLE or a lost connection, for at most [`RETRY_FOR`];
    /// every attempt is recorded.
    pub async fn call<T, F, Fut>(&self, kind: &'static str, mut f: F) -> Answer<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let give_up = Instant::now() + RETRY_FOR;
        let (mut ambiguous, mut attempts, mut avoid) = (false, 0, None);
        loop {
            if Instant::now() > give_up {
                self.record.violation(format!(
                    "{kind}: no answer after retrying for {RETRY_FOR:?}"
                ));
                return Answer {
                    result: Err(tonic::Status::unavailable("gave up")),
                    ambiguous,
                    attempts,
                };
            }
            let Some((i, generation, channel, _)) = self.pick(avoid) else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            attempts += 1;
            let started = Instant::now();
            let res = tokio::time::timeout(CALL_TIMEOUT, f(channel)).await;
            let took = started.elapsed();
            let outcome = match &res {
                Err(_) => Outcome::TimedOut,
                Ok(Ok(_)) => Outcome::Ok,
                Ok(Err(st)) => classify(st, self.generation(i) != generation),
            };
            self.record.samples.lock().unwrap().push(Sample {
                kind,
                at: started - self.record.t0,
                took,
                outcome: outcome.clone(),
            });
            match (outcome, res) {
                (Outcome::Ok, Ok(Ok(r))) => {
                    return Answer {
                        result: Ok(r.into_inner()),
                        ambiguous,
                        attempts,
                    };
                }
                (Outcome::Unavailable(_), _) => {
                    ambiguous = true;
                    avoid = Some(i);
                    // licensd's RetryInfo asks for 50 ms.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (Outcome::ConnectionLost, _) => {
                    ambiguous = true;
                    avoid = Some(i);
                }
                (_, Ok(Err(st))) => {
                    return Answer {
                        result: Err(st),
                        ambiguous,
                        attempts,
                    };
                }
                (_, _) => {
                    return Answer {
                        result: Err(tonic::Status::deadline_exceeded("client timeout")),
                        ambiguous: true,
                        attempts,
                    };
                }
            }
        }
    }
}

/// The ErrorInfo reason licensd puts on every answer it gives, if any.
pub fn reason(st: &tonic::Status) -> Option<String> {
    st.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
}

/// An error's outcome; `killed`: the replica was killed since the call
/// started.
pub fn classify(st: &tonic::Status, killed: bool) -> Outcome {
    match (st.code(), reason(st)) {
        // A transport error: no answer from licensd.
        (_, None) if killed => Outcome::ConnectionLost,
        (Code::Internal | Code::Unknown | Code::DataLoss, _) | (_, None) => {
            Outcome::Failed(format!("{:?}: {}", st.code(), st.message()))
        }
        (Code::Unavailable, Some(reason)) => Outcome::Unavailable(reason),
        (code, Some(reason)) => Outcome::Refused(format!("{code:?} {reason}")),
    }
}

/// Whether `res` is the refusal `reason`.
pub fn refused_with<T>(res: &Result<T, tonic::Status>, reason_: &str) -> bool {
    res.as_ref()
        .err()
        .is_some_and(|st| reason(st).as_deref() == Some(reason_))
}
