//! The `events` workload: how long after a write is acknowledged does its
//! event reach a WatchEvents stream (on another replica with `--replicas`
//! 2 or more), and what do many open streams cost?
//!
//! `--watchers N` streams (plus the one that times) are opened on the
//! watched server, spread over connections of at most 100 streams, each from
//! the feed's current end and filtered to `suspended`/`reinstated`. Then, one
//! at a time for the duration, a seeded license is suspended (then
//! reinstated) on the first replica with a unique reason, and the timing
//! stream waits for the event that carries it. A sample runs from the write's
//! answer to the event's arrival (0 when the event came first: the writer
//! answers only after the other replicas have acknowledged the change). At
//! the end every stream must have received every event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::BenchError;
use super::child::{self, ProcSample};
use super::load::Shared;
use crate::proto as pb;
use crate::proto::license_service_client::LicenseServiceClient;

/// Longest an event may take to arrive before the run fails.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Streams per connection (a server allows 200 concurrent streams per
/// HTTP/2 connection by default).
const STREAMS_PER_CONNECTION: usize = 100;

/// What `events` measured.
#[derive(Debug, Clone, Serialize)]
pub struct EventsReport {
    /// Events timed (two per trial).
    pub samples: u64,
    /// Samples whose event arrived before the write's answer did.
    pub before_answer: u64,
    /// Write answered → event received, ms (p50, p99, max).
    pub delivered_ms: [f64; 3],
    /// Write sent → event received, ms (p50, p99, max).
    pub sent_to_received_ms: [f64; 3],
    /// Streams open besides the timing one.
    pub watchers: usize,
    /// Streams (of all `watchers + 1`) that received every event.
    pub complete_streams: usize,
    /// The watched server's resident set before the streams opened and with
    /// them open, MiB.
    pub rss_mib: [f64; 2],
    /// The watched server's CPU per trial (suspend or reinstate, with every
    /// stream's delivery), µs.
    pub watched_cpu_us_per_write: f64,
}

impl EventsReport {
    /// One line for the table.
    pub fn summary(&self) -> String {
        format!(
            "event delivery ({} events, write on replica 1, {} streams): answered → received \
             p50 {:.3} / p99 {:.3} / max {:.3} ms ({} before the answer); sent → received \
             p50 {:.3} / p99 {:.3} / max {:.3} ms; {} of {} streams complete; watched server \
             RSS {:.1} → {:.1} MiB, {:.0} µs CPU per write",
            self.samples,
            self.watchers + 1,
            self.delivered_ms[0],
            self.delivered_ms[1],
            self.delivered_ms[2],
            self.before_answer,
            self.sent_to_received_ms[0],
            self.sent_to_received_ms[1],
            self.sent_to_received_ms[2],
            self.complete_streams,
            self.watchers + 1,
            self.rss_mib[0],
            self.rss_mib[1],
            self.watched_cpu_us_per_write,
        )
    }
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

/// Runs trials for `duration`: writes through `writer`, streams from
/// `watched_addr`; `sample` reads the watched server's process.
pub async fn measure(
    shared: &Arc<Shared>,
    writer: &Channel,
    watched_addr: &str,
    watchers: usize,
    duration: Duration,
    sample: impl Fn() -> Option<ProcSample>,
) -> Result<EventsReport, BenchError> {
    let mut admin = LicenseServiceClient::new(writer.clone());
    let types = vec!["suspended".to_string(), "reinstated".to_string()];

    // The feed's current end, so that the streams start there.
    let mut after = String::new();
    loop {
        let page = admin
            .list_events(shared.authorized(pb::ListEventsRequest {
                after: after.clone(),
                event_types: types.clone(),
                page_size: 1000,
                ..Default::default()
            }))
            .await?
            .into_inner();
        after = page.next_cursor;
        if page.events.len() < 1000 {
            break;
        }
    }

    let rss_before = sample().map_or(0.0, |s| s.rss_mib);
    let mut channels = Vec::new();
    for _ in 0..(watchers + 1).div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(child::connect(watched_addr).await?);
    }
    let waiting: Waiting = Arc::new(Mutex::new(HashMap::new()));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..=watchers).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for i in 0..=watchers {
        let mut client = LicenseServiceClient::new(channels[i / STREAMS_PER_CONNECTION].clone());
        let mut stream = client
            .watch_events(shared.authorized(pb::WatchEventsRequest {
                after: after.clone(),
                product: shared.product.clone(),
                event_types: types.clone(),
            }))
            .await?
            .into_inner();
        let (waiting, counts) = (waiting.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(msg)) = stream.message().await {
                let Some(event) = msg.event else { continue };
                counts[i].fetch_add(1, Ordering::Relaxed);
                if i == 0
                    && let Some(tx) = waiting.lock().expect("lock").remove(&event.detail)
                {
                    let _ = tx.send(Instant::now());
                }
            }
        }));
    }
    let rss_with = sample().map_or(0.0, |s| s.rss_mib);

    let mut delivered = Histogram::<u64>::new(3)?;
    let mut end_to_end = Histogram::<u64>::new(3)?;
    let mut before_answer = 0;
    let cpu_before = sample().map(|s| s.cpu_seconds);
    let deadline = Instant::now() + duration;
    let mut trial = 0usize;
    while Instant::now() < deadline {
        let key = shared.keys[trial % shared.keys.len()].to_string();
        for suspend in [true, false] {
            let tag = format!("bench events {} {trial} {suspend}", shared.run_id);
            let (tx, rx) = oneshot::channel();
            waiting.lock().expect("lock").insert(tag.clone(), tx);
            let sent = Instant::now();
            if suspend {
                admin
                    .suspend_license(shared.authorized(pb::SuspendLicenseRequest {
                        license_key: key.clone(),
                        reason: tag.clone(),
                        request_id: String::new(),
                    }))
                    .await?;
            } else {
                admin
                    .reinstate_license(shared.authorized(pb::ReinstateLicenseRequest {
                        license_key: key.clone(),
                        reason: tag.clone(),
                        request_id: String::new(),
                    }))
                    .await?;
            }
            let answered = Instant::now();
            let received = tokio::time::timeout(GIVE_UP, rx)
                .await
                .map_err(|_| format!("the event of {tag} did not arrive within {GIVE_UP:?}"))?
                .map_err(|_| "the timing stream ended".to_string())?;
            if received < answered {
                before_answer += 1;
            }
            delivered.record(received.saturating_duration_since(answered).as_micros() as u64)?;
            end_to_end.record(received.duration_since(sent).as_micros() as u64)?;
        }
        trial += 1;
    }
    let cpu = match (cpu_before, sample()) {
        (Some(b), Some(a)) => (a.cpu_seconds - b).max(0.0),
        _ => 0.0,
    };
    // Every stream should have it all by now; give the last a moment.
    let expected = delivered.len();
    let settle = Instant::now() + Duration::from_secs(5);
    let complete = loop {
        let complete = counts
            .iter()
            .filter(|c| c.load(Ordering::Relaxed) >= expected)
            .count();
        if complete == counts.len() || Instant::now() > settle {
            break complete;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for t in tasks {
        t.abort();
    }
    let ms = |h: &Histogram<u64>| {
        [
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        ]
    };
    Ok(EventsReport {
        samples: expected,
        before_answer,
        delivered_ms: ms(&delivered),
        sent_to_received_ms: ms(&end_to_end),
        watchers,
        complete_streams: complete,
        rss_mib: [rss_before, rss_with],
        watched_cpu_us_per_write: cpu * 1e6 / expected.max(1) as f64,
    })
}
