//! What the workloads measure while they run: per-RPC latency histograms and
//! status counts ([`Recorder`]), summed up per RPC at the end of a phase
//! ([`RpcReport`]). It imports nothing of the bench, so the workloads and the
//! report both build on it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The RPCs the workloads call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rpc {
    /// ActivationService/Validate.
    Validate,
    /// ActivationService/Activate.
    Activate,
    /// ActivationService/Deactivate.
    Deactivate,
    /// ActivationService/RedeemRenewalCode.
    Redeem,
    /// LicenseService/IssueLicense.
    Issue,
}

impl Rpc {
    const ALL: [Rpc; 5] = [
        Rpc::Validate,
        Rpc::Activate,
        Rpc::Deactivate,
        Rpc::Redeem,
        Rpc::Issue,
    ];

    /// The method name.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Validate => "Validate",
            Rpc::Activate => "Activate",
            Rpc::Deactivate => "Deactivate",
            Rpc::Redeem => "RedeemRenewalCode",
            Rpc::Issue => "IssueLicense",
        }
    }
}

/// The upper-snake name of a gRPC status code, as in the gRPC spec.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts of one RPC in one phase.
struct RpcCounts {
    /// Latency in microseconds.
    latency: Histogram<u64>,
    /// Latency of the calls answered (not refused with an error).
    answered: Histogram<u64>,
    codes: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<String, u64>,
    unexpected: u64,
    first_unexpected: Option<String>,
    first_error: Option<String>,
}

impl RpcCounts {
    fn new() -> Self {
        RpcCounts {
            // 1 µs to 100 s at three significant figures.
            latency: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds"),
            answered: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds"),
            codes: BTreeMap::new(),
            reasons: BTreeMap::new(),
            unexpected: 0,
            first_unexpected: None,
            first_error: None,
        }
    }
}

/// How one call ended.
pub enum Outcome {
    /// OK with the answer the seeded data implies.
    Ok,
    /// OK, but the answer contradicts the seeded data (a bench or server bug).
    Unexpected(String),
    /// A gRPC error.
    Error(tonic::Status),
}

/// The recorder of one phase (one workload against one server), shared by
/// its workers. One lock per RPC: a record is a few tens of nanoseconds, far
/// below the cost of a call.
pub struct Recorder {
    rpcs: [Mutex<RpcCounts>; 5],
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            rpcs: std::array::from_fn(|_| Mutex::new(RpcCounts::new())),
        }
    }
}

impl Recorder {
    /// Records one call of `rpc` that took `elapsed`.
    pub fn record(&self, rpc: Rpc, elapsed: Duration, outcome: Outcome) {
        let mut c = self.rpcs[rpc as usize].lock().expect("not poisoned");
        let us = elapsed.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
        c.latency.saturating_record(us);
        if !matches!(outcome, Outcome::Error(_)) {
            c.answered.saturating_record(us);
        }
        match outcome {
            Outcome::Ok => *c.codes.entry("OK").or_default() += 1,
            Outcome::Unexpected(what) => {
                *c.codes.entry("OK").or_default() += 1;
                c.unexpected += 1;
                c.first_unexpected.get_or_insert(what);
            }
            Outcome::Error(status) => {
                let code = code_name(status.code());
                *c.codes.entry(code).or_default() += 1;
                let reason = error_reason(&status);
                *c.reasons.entry(format!("{code}/{reason}")).or_default() += 1;
                c.first_error
                    .get_or_insert_with(|| format!("{code}: {}", status.message()));
            }
        }
    }

    /// The per-RPC summaries of the RPCs that were called, over `wall`.
    pub fn summarize(&self, wall: Duration) -> Vec<RpcReport> {
        let secs = wall.as_secs_f64().max(1e-9);
        Rpc::ALL
            .iter()
            .filter_map(|&rpc| {
                let c = self.rpcs[rpc as usize].lock().expect("not poisoned");
                let calls = c.latency.len();
                if calls == 0 {
                    return None;
                }
                let q = |p: f64| c.latency.value_at_quantile(p) as f64 / 1000.0;
                let a = &c.answered;
                let qa = |p: f64| a.value_at_quantile(p) as f64 / 1000.0;
                let answered_latency_ms = (!a.is_empty() && a.len() < calls).then(|| Latency {
                    p50: qa(0.50),
                    p90: qa(0.90),
                    p99: qa(0.99),
                    p999: qa(0.999),
                    max: a.max() as f64 / 1000.0,
                });
                Some(RpcReport {
                    rpc: rpc.name().to_string(),
                    calls,
                    calls_per_sec: calls as f64 / secs,
                    answered_calls: a.len(),
                    answered_latency_ms,
                    latency_ms: Latency {
                        p50: q(0.50),
                        p90: q(0.90),
                        p99: q(0.99),
                        p999: q(0.999),
                        max: c.latency.max() as f64 / 1000.0,
                    },
                    codes: c.codes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    reasons: c.reasons.clone(),
                    unexpected_answers: c.unexpected,
                    first_unexpected: c.first_unexpected.clone(),
                    first_error: c.first_error.clone(),
                })
            })
            .collect()
    }
}

/// The `google.rpc.ErrorInfo` reason of a status, or `-`.
fn error_reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_else(|| "-".into())
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest call.
    pub max: f64,
}

/// One RPC in one workload.
#[derive(Debug, Clone, Serialize)]
pub struct RpcReport {
    /// Method name.
    pub rpc: String,
    /// Calls completed (any status).
    pub calls: u64,
    /// Calls completed per second of the phase's wall time.
    pub calls_per_sec: f64,
    /// Latency as the client saw it.
    pub latency_ms: Latency,
    /// Calls answered (not refused with an error).
    pub answered_calls: u64,
    /// Their latency, when some calls were refused (under overload, the
    /// refusals are quick and would hide the accepted calls' latency).
    pub answered_latency_ms: Option<Latency>,
    /// Calls per gRPC status code (`OK`, `NOT_FOUND`, …).
    pub codes: BTreeMap<String, u64>,
    /// Errors per `CODE/ErrorInfo reason`.
    pub reasons: BTreeMap<String, u64>,
    /// OK answers that contradict the seeded data (e.g. a seeded key not
    /// VALID); always 0 unless something is broken.
    pub unexpected_answers: u64,
    /// The first such answer, described.
    pub first_unexpected: Option<String>,
    /// The first error's code and message.
    pub first_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorder_counts_codes_and_percentiles_per_rpc() {
        let r = Recorder::default();
        for ms in 1..=100 {
            r.record(Rpc::Validate, Duration::from_millis(ms), Outcome::Ok);
        }
        r.record(
            Rpc::Activate,
            Duration::from_millis(1),
            Outcome::Error(tonic::Status::not_found("x")),
        );
        let s = r.summarize(Duration::from_secs(1));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].rpc, "Validate");
        assert_eq!(s[0].calls, 100);
        assert!((s[0].latency_ms.p50 - 50.0).abs() < 0.1);
        assert_eq!(s[0].codes["OK"], 100);
        assert_eq!(s[1].codes["NOT_FOUND"], 1);
        assert_eq!(s[1].reasons["NOT_FOUND/-"], 1);
    }
}
