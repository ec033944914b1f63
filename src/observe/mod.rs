//! What an operator sees of a running server besides its answers: request
//! ids and one span per call ([`calls`]), and Prometheus metrics on a
//! listener of their own (`--metrics-listen`, off by default).
//!
//! Metrics are recorded with the `metrics` crate and exposed by
//! `metrics-exporter-prometheus` (the crate renders the exposition format
//! and serves `GET /metrics`; nothing here writes it by hand). Families, all
//! prefixed `licensd_` (docs/operations.md, Metrics, lists them):
//! calls, latency, calls in flight and refusals ([`calls`]); the store's
//! operations ([`crate::store::metered`]); the database pools, the
//! validation cache and the change notifications (sampled every second
//! here); business counters (the services, where a change succeeds).

pub mod calls;
pub mod client;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::SqlStore;

/// Latency buckets of every `…_seconds` histogram: 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// How often gauges are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The recorder, installed once per process.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Starts serving metrics on `addr` (`GET /metrics`) and installs the
/// process's recorder. Must be called inside a Tokio runtime. Fails if the
/// address cannot be bound, or if a recorder is already installed.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| format!("metrics on {addr}: {e}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "metrics: a recorder is already installed in this process".to_string())?;
    let _ = HANDLE.set(handle);
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics listener stopped");
        }
    });
    describe();
    // Counters a dashboard plots from the start, at 0 until they move.
    for name in [
        "licensd_licenses_issued_total",
        "licensd_activations_total",
        "licensd_deactivations_total",
        "licensd_renewals_total",
        "licensd_renewal_codes_issued_total",
        "licensd_renewal_codes_voided_total",
        "licensd_validation_cache_hits_total",
        "licensd_validation_cache_fallbacks_total",
        "licensd_db_retries_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    tracing::info!(%addr, "metrics served at http://{addr}/metrics");
    Ok(())
}

/// Samples the gauges of `store` every second until the task is aborted
/// (and keeps the histograms' windows moving).
pub async fn sample(store: SqlStore) {
    loop {
        if let Some(handle) = HANDLE.get() {
            handle.run_upkeep();
        }
        for pool in store.pool_stats() {
            metrics::gauge!("licensd_db_pool_connections", "pool" => pool.name)
                .set(f64::from(pool.size));
            metrics::gauge!("licensd_db_pool_idle_connections", "pool" => pool.name)
                .set(pool.idle as f64);
            metrics::gauge!("licensd_db_pool_max_connections", "pool" => pool.name)
                .set(f64::from(pool.max));
        }
        if let Some(cache) = store.validation_cache() {
            let stats = cache.stats();
            metrics::gauge!("licensd_validation_cache_licenses").set(stats.licenses as f64);
            metrics::gauge!("licensd_validation_cache_loaded")
                .set(f64::from(u8::from(stats.loaded)));
            metrics::gauge!("licensd_validation_cache_answering")
                .set(f64::from(u8::from(stats.answering)));
            metrics::gauge!("licensd_validation_cache_listening")
                .set(f64::from(u8::from(stats.listening)));
            if let Some(age) = stats.last_poll_age {
                metrics::gauge!("licensd_validation_cache_last_poll_age_seconds")
                    .set(age.as_secs_f64());
            }
        }
        if let Some(peers) = store.replicas_listening() {
            metrics::gauge!("licensd_replicas_listening").set(peers as f64);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// One business event, counted where the change succeeds.
#[derive(Debug, Clone, Copy)]
pub enum Business {
    /// A license issued.
    LicenseIssued,
    /// A workstation activated (or confirmed).
    Activation,
    /// A workstation released.
    Deactivation,
    /// A license renewed with a code.
    Renewal,
    /// A renewal code issued.
    CodeIssued,
    /// A renewal code voided.
    CodeVoided,
}

/// Counts one business event.
pub fn count(event: Business) {
    let name = match event {
        Business::LicenseIssued => "licensd_licenses_issued_total",
        Business::Activation => "licensd_activations_total",
        Business::Deactivation => "licensd_deactivations_total",
        Business::Renewal => "licensd_renewals_total",
        Business::CodeIssued => "licensd_renewal_codes_issued_total",
        Business::CodeVoided => "licensd_renewal_codes_voided_total",
    };
    metrics::counter!(name).increment(1);
}

fn describe() {
    describe_counter!(
        "licensd_grpc_calls_total",
        "Calls ended, by service, method and gRPC code."
    );
    describe_histogram!(
        "licensd_grpc_call_duration_seconds",
        Unit::Seconds,
        "Call latency (first byte in to status out), by service and method."
    );
    describe_gauge!(
        "licensd_grpc_calls_in_flight",
        "Calls started and not ended."
    );
    describe_counter!(
        "licensd_refusals_total",
        "Refused calls, by method and google.rpc.ErrorInfo reason."
    );
    describe_histogram!(
        "licensd_store_operation_duration_seconds",
        Unit::Seconds,
        "Store operations (one transaction or read each, retries included), by operation."
    );
    describe_counter!(
        "licensd_store_operation_errors_total",
        "Store operations that failed (not refusals), by operation and kind."
    );
    describe_histogram!(
        "licensd_db_acquire_seconds",
        Unit::Seconds,
        "Time a write waited for a pooled connection (SQLite: for its batch to begin)."
    );
    describe_histogram!(
        "licensd_sqlite_batch_writes",
        "SQLite: writes committed together, per commit."
    );
    describe_histogram!(
        "licensd_sqlite_commit_seconds",
        Unit::Seconds,
        "SQLite: one batch's transaction, from BEGIN to the end of its COMMIT (the disk sync included)."
    );
    describe_histogram!(
        "licensd_sqlite_checkpoint_seconds",
        Unit::Seconds,
        "SQLite: one checkpoint of the WAL into the database file (on its own thread, every 100 ms while there are writes)."
    );
    describe_counter!(
        "licensd_sqlite_batch_reruns_total",
        "SQLite: batches rolled back and run again with a savepoint per write, because a write failed after changing rows."
    );
    describe_counter!(
        "licensd_db_retries_total",
        "Write transactions tried again after a deadlock or serialization failure."
    );
    describe_gauge!("licensd_db_pool_connections", "Open connections, by pool.");
    describe_gauge!(
        "licensd_db_pool_idle_connections",
        "Idle connections, by pool."
    );
    describe_gauge!(
        "licensd_db_pool_max_connections",
        "Pool size limit, by pool."
    );
    describe_gauge!(
        "licensd_validation_cache_licenses",
        "Licenses the validation cache holds."
    );
    describe_gauge!(
        "licensd_validation_cache_loaded",
        "1 once the first full load has finished."
    );
    describe_gauge!(
        "licensd_validation_cache_answering",
        "1 while Validate is answered from memory."
    );
    describe_gauge!(
        "licensd_validation_cache_listening",
        "1 while change notifications are received (always 1 on SQLite)."
    );
    describe_gauge!(
        "licensd_validation_cache_last_poll_age_seconds",
        Unit::Seconds,
        "Since the start of the last poll that caught up."
    );
    describe_counter!(
        "licensd_validation_cache_hits_total",
        "Validate calls answered from memory."
    );
    describe_counter!(
        "licensd_validation_cache_fallbacks_total",
        "Validate calls the cache left to the database (unknown key, stale, cache behind)."
    );
    describe_histogram!(
        "licensd_change_notification_seconds",
        Unit::Seconds,
        "PostgreSQL: from a write's commit to its notification heard back and acknowledged by every listening replica."
    );
    describe_gauge!(
        "licensd_replicas_listening",
        "PostgreSQL: other replicas this one waits for (listening, not late)."
    );
    describe_counter!("licensd_licenses_issued_total", "Licenses issued.");
    describe_counter!("licensd_activations_total", "Successful Activate calls.");
    describe_counter!(
        "licensd_deactivations_total",
        "Successful Deactivate calls."
    );
    describe_counter!("licensd_renewals_total", "Licenses renewed with a code.");
    describe_counter!(
        "licensd_renewal_codes_issued_total",
        "Renewal codes issued."
    );
    describe_counter!(
        "licensd_renewal_codes_voided_total",
        "Renewal codes voided."
    );
}
