//! What a benchmark run measured: per-RPC latency histograms and status
//! counts while it runs, and the report (a table on stdout, the same as JSON)
//! at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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

/// One workload against one server.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// `validate`, `activate`, `redeem`, `issue` or `mixed`.
    pub workload: String,
    /// `licensd`, or `ceiling` for the fixed-answer Validate server.
    pub server: String,
    /// Wall time the calls were measured over.
    pub seconds: f64,
    /// Per RPC.
    pub rpcs: Vec<RpcReport>,
    /// All RPCs together, per second.
    pub total_calls_per_sec: f64,
    /// Server CPU (user + system) spent during the workload; `None` with `--target`.
    pub server_cpu_seconds: Option<f64>,
    /// CPU the load generator (this process) spent meanwhile: on a small
    /// machine it competes with the server for the same cores.
    pub bench_cpu_seconds: f64,
    /// The server's peak resident set (VmHWM) at the end of the workload, MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// The server's resident set (VmRSS) at the end of the workload, MiB.
    pub server_rss_mib: Option<f64>,
}

impl WorkloadReport {
    /// Calls of every RPC together.
    pub fn total_calls(&self) -> u64 {
        self.rpcs.iter().map(|r| r.calls).sum()
    }
}

/// Consistency of the database after the run.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Licenses in the database.
    pub licenses: u64,
    /// Activations in the database.
    pub activations: u64,
    /// Activations seeded: churn must have given back every seat it took.
    pub activations_seeded: u64,
    /// Licenses whose `seats_used` differs from their activations.
    pub seat_count_mismatches: u64,
    /// Licenses with more activations than seats.
    pub over_seat_limit: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// licensd version.
    pub version: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Licenses seeded.
    pub licenses: u64,
    /// Activations seeded.
    pub activations: u64,
    /// Renewal codes seeded.
    pub renewal_codes: u64,
    /// Seconds spent seeding (bulk insert only).
    pub seed_seconds: f64,
    /// Calls in flight.
    pub concurrency: usize,
    /// HTTP/2 connections per server.
    pub connections: usize,
    /// Seconds per workload.
    pub duration_seconds: f64,
    /// Validate rounds alternating between the server and the ceiling.
    pub rounds: u32,
    /// CPUs of the machine.
    pub cpus: usize,
    /// `/proc/loadavg` before seeding.
    pub load_average_before: String,
    /// `/proc/loadavg` at the end.
    pub load_average_after: String,
    /// From spawning the server to health SERVING; `None` with `--target`.
    pub start_to_serving_seconds: Option<f64>,
    /// When the server's writes reach the disk, as it says
    /// (`synchronous=normal`, `synchronous_commit=on`, …); `None` with
    /// `--target`.
    pub durability: Option<String>,
    /// From spawn until the server's validation cache had loaded (`None`:
    /// no cache, or an external target).
    pub cache_loaded_seconds: Option<f64>,
    /// The same for the ceiling server.
    pub ceiling_start_to_serving_seconds: Option<f64>,
    /// Every workload run, the ceiling's Validate included.
    pub workloads: Vec<WorkloadReport>,
    /// Validate calls/s of the server over the ceiling's.
    pub validate_to_ceiling_ratio: Option<f64>,
    /// Server replicas on the database.
    pub replicas: u32,
    /// With `--metrics`: the series the server's `/metrics` held at the end.
    pub metrics_series: Option<usize>,
    /// The cross-replica lag, from the `lag` workload.
    pub lag: Option<super::lag::LagReport>,
    /// Event delivery, from the `events` workload.
    pub events: Option<super::event_lag::EventsReport>,
    /// Whether a workload ran out of renewal codes (raise `--codes`).
    pub renewal_codes_exhausted: bool,
    /// The database after the run.
    pub audit: Option<AuditReport>,
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn errors_cell(r: &RpcReport) -> String {
    let mut parts: Vec<String> = r.reasons.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    if r.unexpected_answers > 0 {
        parts.push(format!("unexpected×{}", r.unexpected_answers));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "licensd bench {} — {}, {} licenses ({} activations, {} renewal codes), \
             {} calls in flight over {} connections, {} s per workload",
            self.version,
            self.backend,
            thousands(self.licenses as f64),
            thousands(self.activations as f64),
            thousands(self.renewal_codes as f64),
            self.concurrency,
            self.connections,
            self.duration_seconds,
        );
        let _ = writeln!(
            out,
            "machine: {} CPUs, load average before {} / after {}",
            self.cpus, self.load_average_before, self.load_average_after
        );
        if let Some(series) = self.metrics_series {
            let _ = writeln!(
                out,
                "metrics: on in the server (not the ceiling); {series} series at the end"
            );
        }
        let _ = writeln!(
            out,
            "seeding (bulk insert of licenses, activations and codes): {:.2} s",
            self.seed_seconds,
        );
        let _ = writeln!(
            out,
            "durability (when a write reaches the disk): {}",
            self.durability.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "start to SERVING: {} s (ceiling server: {} s)",
            opt(self.start_to_serving_seconds, 3),
            opt(self.ceiling_start_to_serving_seconds, 3)
        );
        let _ = writeln!(
            out,
            "validation cache loaded (in the background; Validate reads the database until then): {} s after spawn",
            opt(self.cache_loaded_seconds, 3),
        );
        let _ = writeln!(out);
        let header = [
            "workload",
            "server",
            "rpc",
            "calls",
            "calls/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "srv CPU s",
            "srv µs/call",
            "bench CPU s",
            "peak RSS MiB",
            "errors",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for w in &self.workloads {
            let total = w.total_calls();
            let cpu_per_call = w
                .server_cpu_seconds
                .map(|c| c * 1e6 / (total.max(1) as f64));
            for (n, r) in w.rpcs.iter().enumerate() {
                let first = n == 0;
                rows.push(vec![
                    if first {
                        w.workload.clone()
                    } else {
                        String::new()
                    },
                    if first {
                        w.server.clone()
                    } else {
                        String::new()
                    },
                    r.rpc.clone(),
                    thousands(r.calls as f64),
                    thousands(r.calls_per_sec),
                    format!("{:.2}", r.latency_ms.p50),
                    format!("{:.2}", r.latency_ms.p90),
                    format!("{:.2}", r.latency_ms.p99),
                    format!("{:.2}", r.latency_ms.p999),
                    format!("{:.1}", r.latency_ms.max),
                    if first {
                        opt(w.server_cpu_seconds, 2)
                    } else {
                        String::new()
                    },
                    if first {
                        opt(cpu_per_call, 0)
                    } else {
                        String::new()
                    },
                    if first {
                        format!("{:.2}", w.bench_cpu_seconds)
                    } else {
                        String::new()
                    },
                    if first {
                        opt(w.server_peak_rss_mib, 1)
                    } else {
                        String::new()
                    },
                    errors_cell(r),
                ]);
                if let Some(l) = &r.answered_latency_ms {
                    let mut row = vec![String::new(); header.len()];
                    row[2] = format!("{} answered", r.rpc);
                    row[3] = thousands(r.answered_calls as f64);
                    row[4] = thousands(r.answered_calls as f64 / w.seconds.max(1e-9));
                    row[5] = format!("{:.2}", l.p50);
                    row[6] = format!("{:.2}", l.p90);
                    row[7] = format!("{:.2}", l.p99);
                    row[8] = format!("{:.2}", l.p999);
                    row[9] = format!("{:.1}", l.max);
                    rows.push(row);
                }
            }
            if w.rpcs.len() > 1 {
                let mut row = vec![String::new(); header.len()];
                row[2] = "(all)".into();
                row[3] = thousands(total as f64);
                row[4] = thousands(w.total_calls_per_sec);
                rows.push(row);
            }
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                // Text columns left-aligned, figures right-aligned.
                if c < 3 || c == header.len() - 1 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
                line.push_str("  ");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let _ = writeln!(out);
        match self.validate_to_ceiling_ratio {
            Some(ratio) => {
                let rate = |server: &str| {
                    self.workloads
                        .iter()
                        .find(|w| w.workload == "validate" && w.server == server)
                        .map(|w| w.total_calls_per_sec)
                        .unwrap_or(0.0)
                };
                let _ = writeln!(
                    out,
                    "Validate / ceiling: {ratio:.2} ({} vs {} calls/s, alternated in {} rounds)",
                    thousands(rate("licensd")),
                    thousands(rate("ceiling")),
                    self.rounds
                );
            }
            None => {
                let _ = writeln!(out, "Validate / ceiling: n/a");
            }
        }
        if let Some(events) = &self.events {
            let _ = writeln!(out, "{}", events.summary());
        }
        if let Some(lag) = &self.lag {
            let _ = writeln!(out, "{}", lag.summary());
        }
        if self.renewal_codes_exhausted {
            let _ = writeln!(
                out,
                "WARNING: renewal codes ran out; redeem stopped early (raise --codes)"
            );
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(
                out,
                "audit: {} licenses, {} activations ({} seeded), seats_used mismatches {}, over the seat limit {}",
                thousands(a.licenses as f64),
                thousands(a.activations as f64),
                thousands(a.activations_seeded as f64),
                a.seat_count_mismatches,
                a.over_seat_limit
            );
        }
        for w in &self.workloads {
            for r in &w.rpcs {
                if let Some(e) = &r.first_error {
                    let _ = writeln!(out, "first error of {} in {}: {e}", r.rpc, w.workload);
                }
                if let Some(u) = &r.first_unexpected {
                    let _ = writeln!(
                        out,
                        "first unexpected answer of {} in {}: {u}",
                        r.rpc, w.workload
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
    }

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
