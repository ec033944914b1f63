//! `licensd bench` end to end on a small database: every workload runs,
//! every call answers OK, and the seat counts hold afterwards.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_licensd");

/// Runs `licensd bench` over 200 licenses for 1 s per workload with `extra`
/// arguments; returns its JSON report.
fn bench(extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--licenses",
            "200",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--workload",
            "all",
            // Enough for a release build's renewals over 200 licenses (the
            // default's 5,000 a second ran out there).
            "--codes",
            "22000",
        ])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("Validate / ceiling:"), "{stdout}");
    assert!(stdout.contains("server CPU per write ("), "{stdout}");
    assert!(
        stdout.contains("by thread, µs per write (user + kernel): activate Tokio "),
        "{stdout}"
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_writes_in_ceiling_validates(&stdout, &report);
    report
}

/// The line giving each write's server CPU in the ceiling's Validates
/// says what the JSON's CPU seconds and calls give.
fn assert_writes_in_ceiling_validates(stdout: &str, report: &serde_json::Value) {
    let per_call = |workload: &str, server: &str| {
        let w = report["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["workload"] == workload && w["server"] == server)
            .unwrap_or_else(|| panic!("no {workload} on {server}"));
        let calls: u64 = w["rpcs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["calls"].as_u64().unwrap())
            .sum();
        w["server_cpu_seconds"].as_f64().unwrap() / calls as f64
    };
    let validate = per_call("validate", "ceiling");
    let prefix = "  in the ceiling's Validates (";
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?}:\n{stdout}"));
    let (head, figures) = line.split_once("): ").unwrap();
    assert_eq!(
        head,
        format!(
            "{prefix}{:.0} µs of its server's CPU each, this run",
            validate * 1e6
        )
    );
    let figures: Vec<&str> = figures.split(", ").collect();
    assert_eq!(figures.len(), 3, "{line}");
    for (figure, workload) in figures.iter().zip(["activate", "redeem", "issue"]) {
        let (name, value) = figure.split_once(' ').unwrap();
        assert_eq!(name, workload, "{line}");
        let expected = per_call(workload, "licensd") / validate;
        assert_eq!(value, format!("{expected:.1}"), "{line}");
    }
}

/// Every workload ran with only OK answers, and the seats add up.
fn assert_clean(report: &serde_json::Value) {
    assert_eq!(report["licenses"], 200);
    assert!(report["start_to_serving_seconds"].as_f64().unwrap() > 0.0);
    // The server's own word on when a write reaches the disk.
    let durability = report["durability"].as_str().unwrap();
    assert!(
        ["synchronous=full", "synchronous_commit=on"].contains(&durability),
        "{durability}"
    );
    assert!(report["validate_to_ceiling_ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(report["renewal_codes_exhausted"], false);

    let workloads = report["workloads"].as_array().unwrap();
    let expected = [
        ("validate", "licensd", &["Validate"][..]),
        ("validate", "ceiling", &["Validate"][..]),
        ("activate", "licensd", &["Activate", "Deactivate"][..]),
        ("redeem", "licensd", &["RedeemRenewalCode"][..]),
        ("issue", "licensd", &["IssueLicense"][..]),
        (
            "mixed",
            "licensd",
            &["Validate", "Activate", "Deactivate", "RedeemRenewalCode"][..],
        ),
        // Every call answered OK with VALIDITY_NOT_FOUND.
        ("validate-unknown", "licensd", &["Validate"][..]),
    ];
    for (workload, server, rpcs) in expected {
        let w = workloads
            .iter()
            .find(|w| w["workload"] == workload && w["server"] == server)
            .unwrap_or_else(|| panic!("no {workload} on {server} in {report:#}"));
        assert!(w["server_cpu_seconds"].as_f64().is_some(), "{w:#}");
        assert!(w["server_peak_rss_mib"].as_f64().unwrap() > 0.0, "{w:#}");
        for rpc in rpcs {
            let r = w["rpcs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["rpc"] == *rpc)
                .unwrap_or_else(|| panic!("no {rpc} in {workload}: {w:#}"));
            let codes = r["codes"].as_object().unwrap();
            assert!(
                codes["OK"].as_u64().unwrap() > 0,
                "{rpc} in {workload}: {r:#}"
            );
            // SEAT_LIMIT_REACHED, RENEWAL_CODE_ALREADY_REDEEMED, NOT_FOUND…
            // would all be bugs of the bench or the server.
            assert_eq!(codes.len(), 1, "{rpc} in {workload}: non-OK codes {r:#}");
            assert_eq!(r["unexpected_answers"], 0, "{rpc} in {workload}: {r:#}");
            assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        }
    }

    let audit = &report["audit"];
    assert_eq!(audit["seat_count_mismatches"], 0, "{audit:#}");
    assert_eq!(audit["over_seat_limit"], 0, "{audit:#}");
    // Churn gave back every seat it took.
    assert_eq!(
        audit["activations"], audit["activations_seeded"],
        "{audit:#}"
    );
}

#[test]
fn bench_on_sqlite_runs_every_workload_with_only_ok_answers_and_exact_seat_counts() {
    let report = bench(&[]);
    assert_eq!(report["backend"], "sqlite");
    assert_clean(&report);
    // Each write workload's CPU is told apart by thread: Tokio's, and the
    // SQLite writer's (found by its thread's name).
    let spent = |t: &serde_json::Value| t["user"].as_f64().unwrap() + t["kernel"].as_f64().unwrap();
    for w in report["workloads"].as_array().unwrap() {
        if ["activate", "redeem", "issue"].contains(&w["workload"].as_str().unwrap()) {
            let t = &w["server_threads"];
            assert!(
                spent(&t["tokio"]) > 0.0 && spent(&t["writer"]) > 0.0,
                "{w:#}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_on_postgres_runs_every_workload_with_only_ok_answers_and_exact_seat_counts() {
    let Some(db) = common::TestDb::postgres().await else {
        return;
    };
    let url = db.url.clone();
    // Two replicas: `all` then includes the cross-replica lag; `events`
    // streams from the second replica.
    let report = tokio::task::spawn_blocking(move || {
        bench(&[
            "--database-url",
            &url,
            "--replicas",
            "2",
            "--workload",
            "events",
            "--watchers",
            "20",
        ])
    })
    .await;
    db.drop_db().await;
    let report = report.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    assert_eq!(report["backend"], "postgres");
    assert_clean(&report);
    let lag = &report["lag"];
    assert!(lag["samples"].as_u64().unwrap() > 0, "{lag:#}");
    let [p50, p99, max] = [0, 1, 2].map(|i| lag["agreed_ms"][i].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lag:#}");
    let events = &report["events"];
    assert!(events["samples"].as_u64().unwrap() > 0, "{events:#}");
    assert_eq!(events["complete_streams"], 21, "{events:#}");
    let [p50, p99, max] = [0, 1, 2].map(|i| events["sent_to_received_ms"][i].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{events:#}");
}
