//! The chaos soak (README, Reliability): three `licensd serve` replicas on
//! one PostgreSQL cluster of the test's own (`tests/pgcluster/mod.rs`) take
//! a mixed load (`tests/soak/load.rs`) while replicas are SIGKILLed (now
//! and then two at once) and started again and the database is restarted,
//! fast and as a crash (now and then with a replica killed while it is
//! down, and started again before it is back); then the database is
//! audited against every invariant and what the load was told
//! (`tests/soak/audit.rs`).
//!
//! Not in the default run (`#[ignore]`); loopback only, bounded in time:
//!
//! ```text
//! cargo test --release --test chaos_soak -- --ignored --nocapture
//! ```
//!
//! `LICENSD_SOAK_SECONDS` sets how long the chaos lasts (default 60, at
//! most 900); `LICENSD_SOAK_SEED` replays a schedule. A client retries
//! UNAVAILABLE and a connection lost to a kill on another replica; any
//! INTERNAL or UNKNOWN answer, a transport error from a replica that was
//! not killed, a call past 6 s, or a refusal the load cannot provoke fails
//! the soak.

mod cluster;
mod common;
mod pgcluster;
mod soak;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Cluster, Replica};
use licensd::proto as pb;
use pgcluster::PgCluster;
use soak::load::{self, Model, Watched};
use soak::{Fleet, Outcome, Rng};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const CUSTOMERS: usize = 8;
const POOL_USERS: usize = 4;
const VALIDATORS: usize = 2;
/// Every few seconds something is killed; every fourth time the database.
const CHAOS_EVERY: (Duration, Duration) =
    (Duration::from_millis(2000), Duration::from_millis(4500));
const DATABASE_EVERY: usize = 4;
/// How long a killed replica stays down, and the database.
const DOWN_FOR: (Duration, Duration) = (Duration::from_millis(200), Duration::from_millis(2000));

/// What the chaos did.
#[derive(Default)]
struct Chaos {
    kills: usize,
    /// Of which while the database was down.
    kills_in_outage: usize,
    /// Two replicas killed at once (one left serving).
    double_kills: usize,
    /// Replicas started during an outage: from the start of the process to
    /// serving with its cache loaded.
    waited_for_database: Vec<Duration>,
    /// Replica restarts: from the start of the process to serving with its
    /// cache loaded.
    restarts: Vec<Duration>,
    /// Database restarts: (mode, when the stop began, how long it was down,
    /// when `pg_ctl start` returned).
    db_restarts: Vec<(&'static str, Duration, Duration, Duration)>,
}

/// SIGKILLs replica `i` (its calls in flight lose their connection).
fn kill(fleet: &Fleet, replicas: &mut [Replica], i: usize, chaos: &mut Chaos) -> usize {
    fleet.down(i);
    let pid = replicas[i].pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -KILL replica {i}");
    assert!(
        !replicas[i].terminate(),
        "replica {i} exited cleanly after SIGKILL"
    );
    chaos.kills += 1;
    i
}

/// Starts replica `i` again (on a new port) and hands it to the clients.
async fn restart(
    fleet: &Fleet,
    replicas: &mut [Replica],
    i: usize,
    url: &str,
    args: &[&str],
    chaos: &mut Chaos,
) {
    let started = Instant::now();
    let replica = Replica::start_with(url, i, args, &[]).await;
    chaos.restarts.push(started.elapsed());
    fleet.up(i, replica.addr());
    replicas[i] = replica;
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the chaos soak, a minute or more: cargo test --release --test chaos_soak -- --ignored --nocapture"]
async fn chaos_soak_kills_replicas_and_restarts_the_database_under_load_and_loses_nothing() {
    let seconds = env_u64("LICENSD_SOAK_SECONDS").unwrap_or(60).clamp(5, 900);
    let seed = env_u64("LICENSD_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let Some(pg) = tokio::task::spawn_blocking(|| PgCluster::start("the chaos soak"))
        .await
        .unwrap()
    else {
        return;
    };
    // Everything after the cluster's start is bounded: the chaos, then at
    // most three minutes to settle and audit.
    let bound = Duration::from_secs(seconds + 180);
    tokio::time::timeout(bound, soak(Arc::new(pg), seconds, seed))
        .await
        .unwrap_or_else(|_| panic!("the soak did not finish within {bound:?} (seed {seed})"));
}

async fn soak(pg: Arc<PgCluster>, seconds: u64, seed: u64) {
    eprintln!("chaos soak: {seconds} s of chaos, seed {seed}");
    let url = pg.url();
    // The production bound on database waits.
    let args = ["--database-timeout-ms", "2000"];
    let (cluster, nodes) = Cluster::start_with(&url, &args).await;
    cluster::create_product(&nodes, load::PRODUCT, "1.0.0").await;
    let pool_key = cluster::issue(
        &nodes,
        common::license_req(load::PRODUCT, load::POOL_SEATS, 1),
    )
    .await
    .key;
    let Cluster { mut replicas } = cluster;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr().to_string()).collect();
    let t0 = Instant::now();
    let fleet = Arc::new(Fleet::new(&addrs, &nodes.token, seed, t0));
    drop(nodes);
    let model = Arc::new(Mutex::new(Model {
        pool_key,
        ..Default::default()
    }));

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..CUSTOMERS {
        load.push(tokio::spawn(load::customer(
            fleet.clone(),
            model.clone(),
            w,
            stop.clone(),
        )));
    }
    for u in 0..POOL_USERS {
        let mine = (0..load::POOL_WORKSTATIONS)
            .filter(|f| f % POOL_USERS == u)
            .map(|f| format!("pool-{f}"))
            .collect();
        load.push(tokio::spawn(load::pool_user(
            fleet.clone(),
            model.clone(),
            mine,
            stop.clone(),
        )));
    }
    for _ in 0..VALIDATORS {
        load.push(tokio::spawn(load::validator(
            fleet.clone(),
            model.clone(),
            stop.clone(),
        )));
    }
    let watched = Arc::new(Mutex::new(Watched::default()));
    let until = Arc::new(Mutex::new(None));
    let watcher = tokio::spawn(load::watcher(fleet.clone(), watched.clone(), until.clone()));

    // The chaos.
    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut chaos = Chaos::default();
    let chaos_end = t0 + Duration::from_secs(seconds);
    let mut n = 0;
    loop {
        tokio::time::sleep(rng.between(CHAOS_EVERY.0, CHAOS_EVERY.1)).await;
        if Instant::now() >= chaos_end {
            break;
        }
        n += 1;
        if n % DATABASE_EVERY == 0 {
            let mode = if chaos.db_restarts.len() % 2 == 0 {
                "fast"
            } else {
                "immediate"
            };
            let began = t0.elapsed();
            let p = pg.clone();
            tokio::task::spawn_blocking(move || p.stop_server(mode))
                .await
                .unwrap();
            // Half the time a replica dies too while the database is down,
            // and comes back after it, or (half of those) is started again
            // while it is still down and waits for it.
            let also_killed = (rng.below(2) == 0).then(|| {
                let i = rng.below(replicas.len());
                kill(&fleet, &mut replicas, i, &mut chaos)
            });
            let early = also_killed.filter(|_| rng.below(2) == 0).map(|i| {
                let url = url.clone();
                let started = Instant::now();
                tokio::spawn(async move {
                    let replica = Replica::start_with(&url, i, &args, &[]).await;
                    (i, replica, started.elapsed())
                })
            });
            tokio::time::sleep(rng.between(DOWN_FOR.0, DOWN_FOR.1)).await;
            let down_for = t0.elapsed() - began;
            let p = pg.clone();
            tokio::task::spawn_blocking(move || p.start_server())
                .await
                .unwrap();
            chaos
                .db_restarts
                .push((mode, began, down_for, t0.elapsed()));
            if let Some(early) = early {
                let (i, replica, took) = early.await.expect("a replica started in the outage");
                chaos.kills_in_outage += 1;
                chaos.waited_for_database.push(took);
                fleet.up(i, replica.addr());
                replicas[i] = replica;
            } else if let Some(i) = also_killed {
                chaos.kills_in_outage += 1;
                restart(&fleet, &mut replicas, i, &url, &args, &mut chaos).await;
            }
        } else if rng.below(3) == 0 {
            // Two at once: one replica left serving.
            let i = rng.below(replicas.len());
            let j = (i + 1 + rng.below(replicas.len() - 1)) % replicas.len();
            kill(&fleet, &mut replicas, i, &mut chaos);
            kill(&fleet, &mut replicas, j, &mut chaos);
            chaos.double_kills += 1;
            tokio::time::sleep(rng.between(DOWN_FOR.0, DOWN_FOR.1)).await;
            restart(&fleet, &mut replicas, i, &url, &args, &mut chaos).await;
            restart(&fleet, &mut replicas, j, &url, &args, &mut chaos).await;
        } else {
            let i = rng.below(replicas.len());
            kill(&fleet, &mut replicas, i, &mut chaos);
            tokio::time::sleep(rng.between(DOWN_FOR.0, DOWN_FOR.1)).await;
            restart(&fleet, &mut replicas, i, &url, &args, &mut chaos).await;
        }
    }
    let chaos_over = t0.elapsed();
    eprintln!(
        "chaos over at {} ms: {} kills, {} database restarts; settling",
        ms(chaos_over),
        chaos.kills,
        chaos.db_restarts.len()
    );

    // Settle: the load finishes the lives it has begun.
    stop.store(true, Ordering::Relaxed);
    for t in load {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the load stops within 60 s of the chaos")
            .expect("load task");
    }
    let settled = t0.elapsed();

    // Every replica SERVING, and agreeing on every license.
    for (i, r) in replicas.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut health = HealthClient::new(r.channel().await);
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.as_ref().ok() == Some(&(ServingStatus::Serving as i32)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} not SERVING 15 s after the load stopped: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let keys = model.lock().unwrap().clone_keys();
    let disagreements = validate_everywhere(&replicas, &keys).await;

    // The event feed, listed on one replica, and followed to its end.
    let listed = list_events(&replicas[0], &fleet).await;
    *until.lock().unwrap() = Some(listed.last().map(|e| e.0).unwrap_or(0));
    watcher.await.expect("watcher");

    let model = std::mem::take(&mut *model.lock().unwrap());
    let watched = std::mem::take(&mut *watched.lock().unwrap());
    let audit = soak::audit::audit(&url, &model, &listed, &watched).await;

    // Figures.
    let samples = fleet.record.samples();
    eprintln!(
        "\nchaos soak figures (seed {seed}, {seconds} s of chaos, settled {} ms after it):",
        ms(settled - chaos_over)
    );
    eprintln!("  calls per kind and outcome (each attempt):");
    for ((kind, outcome), count) in fleet.record.tally() {
        eprintln!("    {kind:<11} {outcome:<45} {count}");
    }
    let mut kinds: Vec<&str> = samples.iter().map(|s| s.kind).collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds {
        let mut took: Vec<Duration> = samples
            .iter()
            .filter(|s| s.kind == kind && s.outcome == Outcome::Ok)
            .map(|s| s.took)
            .collect();
        took.sort();
        let p = |q: f64| {
            took.get(((took.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        let slowest = samples
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.took)
            .max()
            .unwrap_or_default();
        eprintln!(
            "  {kind:<11} OK p50 {:.1} ms, p99 {:.1} ms; slowest attempt {} ms",
            p(0.5).as_secs_f64() * 1e3,
            p(0.99).as_secs_f64() * 1e3,
            ms(slowest)
        );
    }
    let longest = samples.iter().max_by_key(|s| s.took);
    eprintln!("  longest attempt: {longest:?}");
    eprintln!(
        "  kills {} ({} while the database was down, {} of them started again before it was back; {} times two at once; replica back serving in {}–{} ms), database restarts {}",
        chaos.kills,
        chaos.kills_in_outage,
        chaos.waited_for_database.len(),
        chaos.double_kills,
        chaos.restarts.iter().min().map(|d| ms(*d)).unwrap_or(0),
        chaos.restarts.iter().max().map(|d| ms(*d)).unwrap_or(0),
        chaos.db_restarts.len()
    );
    if !chaos.waited_for_database.is_empty() {
        eprintln!(
            "  replicas started during an outage, serving (cache loaded) after: {:?} ms",
            chaos
                .waited_for_database
                .iter()
                .map(|d| ms(*d))
                .collect::<Vec<_>>()
        );
    }
    for (mode, began, down_for, started) in &chaos.db_restarts {
        // The first write acknowledged that was sent after the start, and
        // the longest time without an acknowledged write around the restart.
        let back = samples
            .iter()
            .filter(|s| s.kind != "validate" && s.outcome == Outcome::Ok && s.at >= *started)
            .map(|s| s.at + s.took)
            .min();
        let mut acknowledged: Vec<Duration> = samples
            .iter()
            .filter(|s| s.kind != "validate" && s.outcome == Outcome::Ok)
            .map(|s| s.at + s.took)
            .filter(|&end| {
                end + Duration::from_secs(2) >= *began && end <= *started + Duration::from_secs(5)
            })
            .collect();
        acknowledged.sort();
        let pause = acknowledged
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        eprintln!(
            "  database restart -m {mode} at {} ms, down {} ms: first write acknowledged {} after pg_ctl start returned; no write acknowledged for {} ms",
            ms(*began),
            ms(*down_for),
            back.map(|b| format!("{} ms", ms(b - *started)))
                .unwrap_or("never".into()),
            ms(pause)
        );
    }
    eprintln!(
        "  freshness: {} changes answered by Validate on a random replica within 1 s of their acknowledgement, {} answers of the previous state meanwhile",
        fleet.record.fresh.load(Ordering::Relaxed),
        fleet.record.stale.load(Ordering::Relaxed)
    );
    eprintln!(
        "  event feed: {} events, the consumer opened {} streams; their endings: {:?}",
        audit.events, watched.streams, watched.endings
    );
    eprintln!(
        "  audit: {} licenses ({} whole lives checked against the model), {} activations, {} codes redeemed, {} problems",
        audit.licenses,
        audit.customers_checked,
        audit.activations,
        audit.codes_redeemed,
        audit.problems.len()
    );

    // Verdict.
    let failed: Vec<_> = samples
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Failed(_) | Outcome::TimedOut))
        .collect();
    assert!(
        failed.is_empty(),
        "{} attempts failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let violations = fleet.record.violations();
    assert!(violations.is_empty(), "the load saw: {violations:#?}");
    assert!(
        disagreements.is_empty(),
        "replicas disagree after settling: {disagreements:#?}"
    );
    assert!(
        audit.problems.is_empty(),
        "the audit found: {:#?}",
        audit.problems
    );
    assert!(
        audit.customers_checked > 0,
        "no license's life was completed"
    );
    assert!(
        chaos.kills > 0,
        "nothing was killed: raise LICENSD_SOAK_SECONDS"
    );

    for (i, r) in replicas.iter_mut().enumerate() {
        assert!(
            r.terminate(),
            "replica {i} did not stop cleanly on SIGTERM:\n{}",
            r.log_tail()
        );
    }
}

impl Model {
    fn clone_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.customers.iter().map(|c| c.key.clone()).collect();
        keys.push(self.pool_key.clone());
        keys
    }
}

/// Validates every key on every replica; the answers (validity, expiry,
/// seats used) must agree. A replica is given a second to catch up.
async fn validate_everywhere(replicas: &[Replica], keys: &[String]) -> Vec<String> {
    let mut clients = Vec::new();
    for r in replicas {
        clients.push(Fleet::activation(r.channel().await));
    }
    let mut disagreements = Vec::new();
    for key in keys {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut answers = Vec::new();
            for c in &mut clients {
                let v = c
                    .validate(pb::ValidateRequest {
                        license_key: key.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|v| {
                        let v = v.into_inner();
                        (v.validity, v.expires_at.map(|t| t.seconds), v.seats_used)
                    })
                    .map_err(|st| format!("{:?}", soak::classify(&st, false)));
                answers.push(v);
            }
            let agree = answers.windows(2).all(|w| w[0] == w[1])
                && answers[0]
                    .as_ref()
                    .is_ok_and(|a| a.0 == pb::Validity::Valid as i32);
            if agree {
                break;
            }
            if Instant::now() > deadline {
                disagreements.push(format!("{key}: {answers:?}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    disagreements
}

/// The whole event feed, listed on `replica`: (id, license key, type).
async fn list_events(replica: &Replica, fleet: &Fleet) -> Vec<(i64, String, String)> {
    let mut licenses = fleet.licenses(replica.channel().await);
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = licenses
            .list_events(pb::ListEventsRequest {
                after: after.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner();
        out.extend(
            page.events
                .iter()
                .map(|e| (e.id, e.license_key.clone(), e.r#type.clone())),
        );
        after = page.next_cursor;
        if page.events.len() < 1000 {
            return out;
        }
    }
}
