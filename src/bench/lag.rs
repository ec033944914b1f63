//! The `lag` workload: how long after a write is acknowledged by one replica
//! does another replica's Validate answer it?
//!
//! One trial at a time, on seeded licenses taken in turn: suspend the
//! license on the first replica, then validate it on another (round robin)
//! until the answer is SUSPENDED; reinstate it, and validate until VALID
//! again (two samples per trial, every license left as it was). Nothing else
//! runs meanwhile. A sample's lag is the time from the write's answer to the
//! start of the first Validate that answered right (0 when the very first
//! read did); its "agreed" time runs to the end of that call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use super::BenchError;
use super::load::Shared;
use crate::proto as pb;
use crate::proto::activation_service_client::ActivationServiceClient;
use crate::proto::license_service_client::LicenseServiceClient;

/// Longest a replica may take to agree before the run fails.
const GIVE_UP: Duration = Duration::from_secs(2);

/// What `lag` measured.
#[derive(Debug, Clone, Serialize)]
pub struct LagReport {
    /// Samples (two per trial).
    pub samples: u64,
    /// Samples whose first read on the other replica was stale.
    pub stale_first_reads: u64,
    /// Write answered → start of the first right read, ms (p50, p99, max).
    pub lag_ms: [f64; 3],
    /// Write answered → end of the first right read, ms (p50, p99, max).
    pub agreed_ms: [f64; 3],
}

impl LagReport {
    /// One line for the table.
    pub fn summary(&self) -> String {
        format!(
            "cross-replica lag ({} samples, write on replica 1, Validate on the others): \
             stale first reads {} ({:.1} %); lag p50 {:.3} / p99 {:.3} / max {:.3} ms; \
             agreed answer received p50 {:.3} / p99 {:.3} / max {:.3} ms",
            self.samples,
            self.stale_first_reads,
            100.0 * self.stale_first_reads as f64 / self.samples.max(1) as f64,
            self.lag_ms[0],
            self.lag_ms[1],
            self.lag_ms[2],
            self.agreed_ms[0],
            self.agreed_ms[1],
            self.agreed_ms[2],
        )
    }
}

/// Runs trials for `duration`: writes through `writer`, reads through
/// `readers` (the other replicas).
pub async fn measure(
    shared: &Arc<Shared>,
    writer: &Channel,
    readers: &[Channel],
    duration: Duration,
) -> Result<LagReport, BenchError> {
    let mut admin = LicenseServiceClient::new(writer.clone());
    let mut lag = Histogram::<u64>::new(3)?;
    let mut agreed = Histogram::<u64>::new(3)?;
    let mut stale = 0;
    let deadline = Instant::now() + duration;
    let mut trial = 0usize;
    while Instant::now() < deadline {
        let key = shared.keys[trial % shared.keys.len()].to_string();
        let mut reader = ActivationServiceClient::new(readers[trial % readers.len()].clone());
        trial += 1;
        for suspend in [true, false] {
            let expected = if suspend {
                let req = shared.authorized(pb::SuspendLicenseRequest {
                    license_key: key.clone(),
                    reason: "bench lag".into(),
                    request_id: String::new(),
                });
                admin.suspend_license(req).await?;
                pb::Validity::Suspended
            } else {
                let req = shared.authorized(pb::ReinstateLicenseRequest {
                    license_key: key.clone(),
                    reason: "bench lag".into(),
                    request_id: String::new(),
                });
                admin.reinstate_license(req).await?;
                pb::Validity::Valid
            };
            let written = Instant::now();
            let mut first = true;
            loop {
                let started = written.elapsed();
                let v = reader
                    .validate(pb::ValidateRequest {
                        license_key: key.clone(),
                        fingerprint: String::new(),
                        client_version: String::new(),
                        certificate_expires_at: None,
                    })
                    .await?
                    .into_inner();
                if v.validity == expected as i32 {
                    let lag_us = if first { 0 } else { started.as_micros() as u64 };
                    lag.record(lag_us)?;
                    agreed.record(written.elapsed().as_micros() as u64)?;
                    break;
                }
                if first {
                    stale += 1;
                    first = false;
                }
                if written.elapsed() > GIVE_UP {
                    return Err(format!(
                        "a replica still answered {} for {key} {GIVE_UP:?} after the write",
                        v.validity
                    )
                    .into());
                }
            }
        }
    }
    let ms = |h: &Histogram<u64>| {
        [
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        ]
    };
    Ok(LagReport {
        samples: lag.len(),
        stale_first_reads: stale,
        lag_ms: ms(&lag),
        agreed_ms: ms(&agreed),
    })
}
