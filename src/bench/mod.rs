//! `licensd bench`: a load generator that answers "how many calls per second
//! does one replica take, and what does it cost as the license base grows?".
//!
//! One run:
//!
//! 1. **Seeds** a fresh database (an SQLite file in a temporary directory, or
//!    the `--database-url` given, which must be empty): a product and an
//!    admin token through the [`Store`](crate::store::Store), then N licenses
//!    with 1–2 activations each and unredeemed renewal codes by bulk insert
//!    ([`crate::store::bulk`]), timed.
//! 2. **Starts** `licensd serve` from the same binary as a child (or drives
//!    `--target ADDR`), and times spawn → health SERVING. A second child runs
//!    with the hidden `--validate-ceiling` flag: the same server stack, but
//!    Validate answers a fixed response without touching the store
//!    ([`ceiling`]).
//! 3. **Drives** each workload for `--duration` seconds with `--concurrency`
//!    calls in flight over `--connections` HTTP/2 connections ([`load`]),
//!    checking the status of every response and recording latencies in HDR
//!    histograms ([`record`]). Validate alternates between the server and the
//!    ceiling in `--rounds` rounds, so machine noise hits both alike.
//! 4. **Reports** a table per workload and RPC (calls/s, p50/p90/p99/p99.9,
//!    errors by code, server CPU seconds from `/proc/<pid>/stat`, peak RSS
//!    from `/proc/<pid>/status`), the Validate/ceiling ratio and an audit of
//!    the seat counts; `--json PATH` writes the same as JSON ([`report`]).

mod ceiling;
mod child;
mod event_lag;
mod lag;
mod load;
mod record;
mod report;

pub use ceiling::ValidateCeiling;
pub use record::{Latency, RpcReport};
pub use report::{AuditReport, Report, WorkloadReport};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tonic::transport::Channel;

use self::child::{ProcSample, ServerChild};
use self::load::{CodePool, Load, Shared};
use self::record::Recorder;
use crate::domain::auth::{Role, Token};
use crate::domain::product::ProductSpec;
use crate::domain::{Product, ProductCode};
use crate::store::bulk::{self, SEED_VERSION, SeedPlan};
use crate::store::{DatabaseUrl, Store};

/// Errors of a benchmark run.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// The product every seeded license is for.
const PRODUCT: &str = "BENCH";

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Validate random seeded keys (with a bound fingerprint half of the
    /// time), alternating with the ceiling server.
    Validate,
    /// Activate a fresh fingerprint, then deactivate it, on random licenses.
    Activate,
    /// Redeem renewal codes against licenses they fit.
    Redeem,
    /// IssueLicense with unique request ids (admin token).
    Issue,
    /// 95% validate, 4% activate/deactivate, 1% redeem.
    Mixed,
    /// Half the calls in flight activate/deactivate, half validate, at
    /// once: Validate's latency under a write flood (with `--concurrency`
    /// above the server's budgets, the refused writes show as errors).
    /// Not part of `all`.
    Flood,
    /// Validate well-formed keys that no license has (an unknown-key flood).
    ValidateUnknown,
    /// With `--replicas 2` or more: a write on the first replica, then
    /// Validate on another until it agrees; reports the lag.
    Lag,
    /// WatchEvents streams (`--watchers` besides the timing one; on another
    /// replica with `--replicas` 2 or more) while licenses are suspended and
    /// reinstated one at a time: how soon each event arrives, what the
    /// streams cost. Not part of `all`.
    Events,
    /// Every workload above but `events`, in that order (`lag` with
    /// `--replicas` ≥ 2).
    All,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Validate => "validate",
            Workload::Activate => "activate",
            Workload::Redeem => "redeem",
            Workload::Issue => "issue",
            Workload::Mixed => "mixed",
            Workload::Flood => "flood",
            Workload::ValidateUnknown => "validate-unknown",
            Workload::Lag => "lag",
            Workload::Events => "events",
            Workload::All => "all",
        }
    }
}

/// `licensd bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Licenses to seed, each with 1–2 activated workstations.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(12..=20_000_000))]
    pub licenses: u64,
    /// Database to seed and serve: an empty PostgreSQL database
    /// (postgres://…) or an SQLite path. Default: an SQLite file in a
    /// temporary directory, deleted afterwards.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Drive the server at ADDR instead of starting one; it must serve
    /// --database-url. No server CPU/RSS figures and no ceiling then.
    #[arg(long, requires = "database_url")]
    pub target: Option<String>,
    /// Calls in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// HTTP/2 connections per server the calls are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub connections: u64,
    /// Seconds each workload runs (Validate: this long against the server
    /// and as long against the ceiling).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of unrecorded Validate load on each server before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Validate rounds alternating between the server and the ceiling.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Workloads to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub workload: Vec<Workload>,
    /// Renewal codes to seed. Default: enough for 5,000 redemptions per
    /// second in `redeem` and 500 in `mixed`.
    #[arg(long)]
    pub codes: Option<usize>,
    /// Also write the report as JSON to PATH.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Extra arguments for the server children, e.g. `--server-arg=--db-max-connections=32`.
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Replicas of the server to start on the one database (the workloads
    /// drive the first; `lag` writes on it and validates on the others).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub replicas: u32,
    /// Validate calls with a fingerprint send `certificate_expires_at` of a
    /// certificate received just now, as a product that keeps its offline
    /// certificate does (the answer then carries none); without it, every
    /// VALID answer to a bound fingerprint carries a certificate.
    #[arg(long)]
    pub certificate_hint: bool,
    /// `events`: WatchEvents streams to hold open besides the timing one.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=20_000))]
    pub watchers: u64,
    /// Serve Prometheus metrics from the measured server (not the ceiling),
    /// to measure what recording them costs; the bench scrapes them once at
    /// the end and reports how many series it read.
    #[arg(long)]
    pub metrics: bool,
}

fn workloads(asked: &[Workload], replicas: u32) -> Vec<Workload> {
    use Workload::*;
    let mut out = Vec::new();
    for &w in asked {
        let add = match w {
            All if replicas > 1 => vec![
                Validate,
                Activate,
                Redeem,
                Issue,
                Mixed,
                ValidateUnknown,
                Lag,
            ],
            All => vec![Validate, Activate, Redeem, Issue, Mixed, ValidateUnknown],
            w => vec![w],
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    let workloads = workloads(&args.workload, args.replicas);
    if workloads.contains(&Workload::Events) && args.target.is_some() {
        return Err("the events workload starts its own servers (no --target)".into());
    }
    if workloads.contains(&Workload::Lag) && (args.replicas < 2 || args.target.is_some()) {
        return Err("the lag workload needs --replicas 2 or more (and no --target)".into());
    }
    let concurrency = args.concurrency as usize;
    let duration = Duration::from_secs_f64(args.duration);
    let load_before = child::load_average();

    // 1. The database.
    let temp = match args.database_url {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let database_url = match (&args.database_url, &temp) {
        (Some(url), _) => url.clone(),
        (None, Some(dir)) => format!("sqlite:{}", dir.path().join("bench.db").display()),
        (None, None) => unreachable!("a temporary directory when no URL is given"),
    };
    let url = DatabaseUrl::parse(&database_url)?;
    let backend = match url {
        DatabaseUrl::Sqlite(_) => "sqlite",
        DatabaseUrl::Postgres(_) => "postgres",
    };
    progress(format_args!(
        "seeding {} licenses into {backend}{}",
        args.licenses,
        if temp.is_some() {
            " (temporary file)"
        } else {
            ""
        }
    ));
    let now = crate::domain::time::truncate_micros(chrono::Utc::now());
    let product = ProductCode::parse(PRODUCT)?;
    let token = Token::generate();
    {
        let store = url.open(Default::default()).await?;
        let spec = ProductSpec {
            display_name: "licensd bench".into(),
            latest_version: SEED_VERSION.into(),
            ..ProductSpec::default()
        };
        let made = store
            .create_product(
                &Product::new(product.clone(), spec).map_err(|v| v.description)?,
                now,
            )
            .await;
        if let Err(e) = made {
            store.close().await;
            return Err(format!("{e} (licensd bench needs an empty database)").into());
        }
        store
            .create_token("bench-admin", Role::Admin, &token, now)
            .await?;
        store.close().await;
    }
    let per_sec = |rate: f64| (rate * args.duration).ceil() as usize + 100;
    let (redeem_codes, mixed_codes) = match args.codes {
        Some(n) => (n - n / 11, n / 11),
        None => (per_sec(5000.0), per_sec(500.0)),
    };
    let plan = SeedPlan {
        product: product.clone(),
        licenses: args.licenses as usize,
        codes: redeem_codes + mixed_codes,
        now,
    };
    let seed_started = Instant::now();
    let seeded = bulk::seed(&url, &plan).await?;
    let seed_seconds = seed_started.elapsed().as_secs_f64();
    progress(format_args!(
        "seeded {} licenses, {} activations, {} renewal codes in {seed_seconds:.2} s",
        seeded.keys.len(),
        seeded.activations,
        seeded.codes.len()
    ));
    let activations_seeded = seeded.activations;

    // 2. The servers.
    let mut cache_loaded = None;
    let mut metrics_port = None;
    let (server, ceiling) = match &args.target {
        Some(_) => (None, None),
        None => {
            let mut server_args = args.server_arg.clone();
            if args.metrics {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                metrics_port = Some(port);
                server_args.push(format!("--metrics-listen=127.0.0.1:{port}"));
            }
            let s = ServerChild::start(&database_url, false, &server_args).await?;
            progress(format_args!(
                "server pid {} on {}: SERVING {:.3} s after spawn",
                s.pid,
                s.addr,
                s.start_to_serving.as_secs_f64()
            ));
            if !args.server_arg.iter().any(|a| a == "--no-validate-cache") {
                let at = s.wait_cache_loaded(Duration::from_secs(600)).await?;
                progress(format_args!(
                    "server's validation cache loaded {:.3} s after spawn",
                    at.as_secs_f64()
                ));
                cache_loaded = Some(at.as_secs_f64());
            }
            let c = ServerChild::start(&database_url, true, &args.server_arg).await?;
            progress(format_args!(
                "ceiling server pid {} on {}: SERVING {:.3} s after spawn",
                c.pid,
                c.addr,
                c.start_to_serving.as_secs_f64()
            ));
            (Some(s), Some(c))
        }
    };
    let addr = match (&args.target, &server) {
        (Some(t), _) => {
            child::wait_serving(t, Duration::from_secs(30)).await?;
            t.clone()
        }
        (None, Some(s)) => s.addr.clone(),
        (None, None) => unreachable!("a server when there is no target"),
    };
    // More replicas on the same database, for `lag`.
    let mut extra_replicas = Vec::new();
    if args.target.is_none() {
        for _ in 1..args.replicas {
            let r = ServerChild::start(&database_url, false, &args.server_arg).await?;
            if !args.server_arg.iter().any(|a| a == "--no-validate-cache") {
                r.wait_cache_loaded(Duration::from_secs(600)).await?;
            }
            progress(format_args!("replica pid {} on {}", r.pid, r.addr));
            extra_replicas.push(r);
        }
    }
    let channels = connect_all(&addr, args.connections as usize).await?;
    let ceiling_channels = match &ceiling {
        Some(c) => Some(connect_all(&c.addr, args.connections as usize).await?),
        None => None,
    };

    let shared = Arc::new(Shared {
        keys: seeded.keys,
        codes: seeded.codes,
        unknown_keys: (0..10_000)
            .map(|_| {
                crate::domain::LicenseKey::generate(&product, crate::domain::LicenseKind::Standard)
            })
            .collect(),
        bearer: format!("Bearer {}", token.expose()).parse()?,
        product: PRODUCT.into(),
        run_id: format!("{:x}", now.timestamp_micros()),
        concurrency,
        certificate_hint: args.certificate_hint,
    });
    let redeem_pool = Arc::new(CodePool::new(0..redeem_codes));
    let mixed_pool = Arc::new(CodePool::new(redeem_codes..redeem_codes + mixed_codes));
    let no_codes = Arc::new(CodePool::new(0..0));

    // Warm-up: connections, caches, the allocator.
    if args.warmup > 0.0 {
        let warm = Duration::from_secs_f64(args.warmup);
        progress(format_args!(
            "warming up for {:.1} s per server",
            args.warmup
        ));
        let sink = Arc::new(Recorder::default());
        load::run_phase(Load::Validate, &shared, &channels, &no_codes, warm, &sink).await;
        if let Some(ch) = &ceiling_channels {
            load::run_phase(Load::Validate, &shared, ch, &no_codes, warm, &sink).await;
        }
    }

    // 3. The workloads.
    let sample = |s: &Option<ServerChild>| s.as_ref().map(ServerChild::sample);
    let mut reports = Vec::new();
    let mut lag_report = None;
    let mut events_report = None;
    for w in workloads {
        progress(format_args!(
            "running {} for {:.1} s",
            w.name(),
            args.duration
        ));
        if w == Workload::Validate {
            let rec = Arc::new(Recorder::default());
            let ceiling_rec = Arc::new(Recorder::default());
            let (mut wall, mut ceiling_wall) = (Duration::ZERO, Duration::ZERO);
            let (mut cpu, mut ceiling_cpu) = (0.0, 0.0);
            let (mut own, mut ceiling_own) = (0.0, 0.0);
            let rounds = if ceiling_channels.is_some() {
                args.rounds
            } else {
                1
            };
            let slice = duration / rounds;
            for _ in 0..rounds {
                let (before, own_before) = (sample(&server), own_sample());
                wall += load::run_phase(Load::Validate, &shared, &channels, &no_codes, slice, &rec)
                    .await;
                cpu += cpu_between(before, sample(&server));
                own += cpu_between(own_before, own_sample());
                if let Some(ch) = &ceiling_channels {
                    let (before, own_before) = (sample(&ceiling), own_sample());
                    ceiling_wall += load::run_phase(
                        Load::Validate,
                        &shared,
                        ch,
                        &no_codes,
                        slice,
                        &ceiling_rec,
                    )
                    .await;
                    ceiling_cpu += cpu_between(before, sample(&ceiling));
                    ceiling_own += cpu_between(own_before, own_sample());
                }
            }
            reports.push(workload_report(
                "validate",
                "licensd",
                &rec,
                wall,
                server.as_ref().map(|_| cpu),
                own,
                sample(&server),
            ));
            if ceiling_channels.is_some() {
                reports.push(workload_report(
                    "validate",
                    "ceiling",
                    &ceiling_rec,
                    ceiling_wall,
                    Some(ceiling_cpu),
                    ceiling_own,
                    sample(&ceiling),
                ));
            }
            continue;
        }
        if w == Workload::Lag {
            let mut readers = Vec::new();
            for r in &extra_replicas {
                readers.push(child::connect(&r.addr).await?);
            }
            let lag = lag::measure(&shared, &channels[0], &readers, duration).await?;
            progress(format_args!("{}", lag.summary()));
            lag_report = Some(lag);
            continue;
        }
        if w == Workload::Events {
            let (watched_addr, watched) = match extra_replicas.first() {
                Some(r) => (r.addr.clone(), Some(r)),
                None => (addr.clone(), server.as_ref()),
            };
            let report = event_lag::measure(
                &shared,
                &channels[0],
                &watched_addr,
                args.watchers as usize,
                duration,
                || watched.map(ServerChild::sample),
            )
            .await?;
            progress(format_args!("{}", report.summary()));
            events_report = Some(report);
            continue;
        }
        let (kind, pool) = match w {
            Workload::ValidateUnknown => (Load::ValidateUnknown, &no_codes),
            Workload::Activate => (Load::Churn, &no_codes),
            Workload::Redeem => (Load::Redeem, &redeem_pool),
            Workload::Issue => (Load::Issue, &no_codes),
            Workload::Mixed => (Load::Mixed, &mixed_pool),
            Workload::Flood => (Load::Flood, &no_codes),
            Workload::Validate | Workload::Lag | Workload::Events | Workload::All => {
                unreachable!("expanded above")
            }
        };
        let rec = Arc::new(Recorder::default());
        let (before, own_before) = (sample(&server), own_sample());
        let wall = load::run_phase(kind, &shared, &channels, pool, duration, &rec).await;
        let (after, own_after) = (sample(&server), own_sample());
        let mut report = workload_report(
            w.name(),
            "licensd",
            &rec,
            wall,
            before.map(|b| cpu_between(Some(b), after)),
            cpu_between(own_before, own_after),
            after,
        );
        report.server_threads = before.zip(after).map(|(b, a)| a.threads.minus(b.threads));
        reports.push(report);
    }

    // 4. Stop, audit, report.
    let start_to_serving = server.as_ref().map(|s| s.start_to_serving.as_secs_f64());
    let durability = server.as_ref().map(|s| s.durability.clone());
    let ceiling_start = ceiling.as_ref().map(|s| s.start_to_serving.as_secs_f64());
    drop(channels);
    drop(ceiling_channels);
    let metrics_series = match metrics_port {
        Some(port) => {
            let series = child::scrape_metrics(port).await?;
            progress(format_args!("server's metrics: {series} series scraped"));
            Some(series)
        }
        None => None,
    };
    if let Some(s) = server {
        s.stop().await;
    }
    if let Some(c) = ceiling {
        c.stop().await;
    }
    for r in extra_replicas {
        r.stop().await;
    }
    let audit = bulk::audit(&url).await?;
    let rate = |server: &str| {
        reports
            .iter()
            .find(|r| r.workload == "validate" && r.server == server)
            .map(|r| r.total_calls_per_sec)
    };
    let ratio = match (rate("licensd"), rate("ceiling")) {
        (Some(v), Some(c)) if c > 0.0 => Some(v / c),
        _ => None,
    };
    let report = Report {
        version: env!("CARGO_PKG_VERSION").into(),
        backend: backend.into(),
        licenses: args.licenses,
        activations: activations_seeded,
        renewal_codes: (redeem_codes + mixed_codes) as u64,
        seed_seconds,
        concurrency,
        connections: args.connections as usize,
        duration_seconds: args.duration,
        rounds: args.rounds,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load_average_before: load_before,
        load_average_after: child::load_average(),
        start_to_serving_seconds: start_to_serving,
        durability,
        cache_loaded_seconds: cache_loaded,
        ceiling_start_to_serving_seconds: ceiling_start,
        workloads: reports,
        replicas: args.replicas,
        metrics_series,
        lag: lag_report,
        events: events_report,
        validate_to_ceiling_ratio: ratio,
        renewal_codes_exhausted: redeem_pool.exhausted.load(Ordering::Relaxed)
            || mixed_pool.exhausted.load(Ordering::Relaxed),
        audit: Some(AuditReport {
            licenses: audit.licenses,
            activations: audit.activations,
            activations_seeded,
            seat_count_mismatches: audit.seat_count_mismatches,
            over_seat_limit: audit.over_seat_limit,
        }),
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        progress(format_args!("wrote {}", path.display()));
    }
    drop(temp);
    Ok(())
}

async fn connect_all(addr: &str, n: usize) -> Result<Vec<Channel>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(child::connect(addr).await?);
    }
    Ok(out)
}

/// This process (the load generator) now.
fn own_sample() -> Option<ProcSample> {
    Some(ProcSample::of(std::process::id()))
}

fn cpu_between(before: Option<ProcSample>, after: Option<ProcSample>) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) => (a.cpu_seconds - b.cpu_seconds).max(0.0),
        _ => 0.0,
    }
}

fn workload_report(
    workload: &str,
    server: &str,
    rec: &Recorder,
    wall: Duration,
    cpu: Option<f64>,
    bench_cpu: f64,
    after: Option<ProcSample>,
) -> WorkloadReport {
    let rpcs = rec.summarize(wall);
    let total: u64 = rpcs.iter().map(|r| r.calls).sum();
    WorkloadReport {
        workload: workload.into(),
        server: server.into(),
        seconds: wall.as_secs_f64(),
        total_calls_per_sec: total as f64 / wall.as_secs_f64().max(1e-9),
        rpcs,
        server_cpu_seconds: cpu,
        bench_cpu_seconds: bench_cpu,
        server_peak_rss_mib: after.map(|a| a.peak_rss_mib),
        server_rss_mib: after.map(|a| a.rss_mib),
        server_threads: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_expands_to_every_workload_once_in_order() {
        use Workload::*;
        assert_eq!(
            workloads(&[Mixed, All], 1),
            vec![Mixed, Validate, Activate, Redeem, Issue, ValidateUnknown]
        );
        assert_eq!(
            workloads(&[All], 3),
            vec![
                Validate,
                Activate,
                Redeem,
                Issue,
                Mixed,
                ValidateUnknown,
                Lag
            ]
        );
        assert_eq!(workloads(&[Issue, Issue], 1), vec![Issue]);
    }
}
