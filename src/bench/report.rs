//! The report of a whole benchmark run: a table on stdout, the same as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::child::ThreadCpu;
use super::event_lag::EventsReport;
use super::lag::LagReport;
use super::record::RpcReport;

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
    /// The server's CPU by thread during a write workload.
    pub server_threads: Option<ThreadCpu>,
}

impl WorkloadReport {
    /// Calls of every RPC together.
    pub fn total_calls(&self) -> u64 {
        self.rpcs.iter().map(|r| r.calls).sum()
    }

    /// `seconds` of CPU spent on this workload, in µs per call.
    fn per_call_us(&self, seconds: f64) -> f64 {
        seconds * 1e6 / (self.total_calls().max(1) as f64)
    }

    /// The server's CPU per call, µs (`None` with `--target`).
    fn server_cpu_per_call_us(&self) -> Option<f64> {
        self.server_cpu_seconds.map(|s| self.per_call_us(s))
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
    pub lag: Option<LagReport>,
    /// Event delivery, from the `events` workload.
    pub events: Option<EventsReport>,
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
    /// The server's CPU per write of each write workload (every call of
    /// `activate`, `redeem` and `issue` is one write transaction), with the
    /// durability it was measured at, and where it went by thread.
    fn cpu_per_write(&self) -> Option<String> {
        let writes: Vec<&WorkloadReport> = self
            .workloads
            .iter()
            .filter(|w| ["activate", "redeem", "issue"].contains(&w.workload.as_str()))
            .collect();
        let per_write: Vec<(&str, f64)> = writes
            .iter()
            .filter_map(|w| Some((w.workload.as_str(), w.server_cpu_per_call_us()?)))
            .collect();
        if per_write.is_empty() {
            return None;
        }
        let figures: Vec<String> = per_write
            .iter()
            .map(|(workload, us)| format!("{workload} {us:.0} µs"))
            .collect();
        let mut out = format!(
            "server CPU per write ({}): {}",
            self.durability.as_deref().unwrap_or("-"),
            figures.join(", ")
        );
        let split: Vec<String> = writes
            .iter()
            .filter_map(|w| {
                let t = w.server_threads?;
                let parts: Vec<String> = [
                    ("Tokio", t.tokio),
                    ("writer", t.writer),
                    ("checkpointer", t.checkpointer),
                ]
                .into_iter()
                .filter(|(_, c)| c.user + c.kernel > 0.0)
                .map(|(name, c)| {
                    format!(
                        "{name} {:.0} + {:.0}",
                        w.per_call_us(c.user),
                        w.per_call_us(c.kernel)
                    )
                })
                .collect();
                (!parts.is_empty()).then(|| format!("{} {}", w.workload, parts.join(", ")))
            })
            .collect();
        if !split.is_empty() {
            let _ = write!(
                out,
                "\n  by thread, µs per write (user + kernel): {}",
                split.join("; ")
            );
        }
        if let Some(validate) = self.ceiling_cpu_per_validate() {
            let relative: Vec<String> = per_write
                .iter()
                .map(|(workload, us)| format!("{workload} {:.1}", us / validate))
                .collect();
            let _ = write!(
                out,
                "\n  in the ceiling's Validates ({validate:.0} µs of its server's CPU each, this run): {}",
                relative.join(", ")
            );
        }
        Some(out)
    }

    /// The ceiling server's CPU per Validate (µs) in this run: the cost of
    /// a call that is only gRPC, on this machine at this hour. A write's
    /// CPU over it moves less with the machine's speed (which on a shared
    /// host drifts twofold from day to day) than the µs do, though not
    /// free of noise itself. `None` if the ceiling answered no call.
    fn ceiling_cpu_per_validate(&self) -> Option<f64> {
        let w = self
            .workloads
            .iter()
            .find(|w| w.workload == "validate" && w.server == "ceiling")?;
        if w.total_calls() == 0 {
            return None;
        }
        w.server_cpu_per_call_us()
    }

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
            let cpu_per_call = w.server_cpu_per_call_us();
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
        if let Some(line) = self.cpu_per_write() {
            let _ = writeln!(out, "{line}");
        }
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
}
