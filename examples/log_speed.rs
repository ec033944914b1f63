//! What a call's span and a write's log line cost in the server's JSON
//! format against `tracing-subscriber`'s own JSON format (the lines are the
//! same; a test in `src/telemetry/json.rs` compares them), written to a
//! sink: `cargo run --release --example log_speed`.

use std::hint::black_box;
use std::time::Instant;

use licensd::telemetry::json::{JsonFields, JsonLines};
use tracing::field::Empty;

const CALLS: u32 = 200_000;

/// A call as the server makes it: its span, and one line in it.
fn calls(lines: bool) -> f64 {
    let start = Instant::now();
    for i in 0..CALLS {
        let span = tracing::info_span!(
            "call",
            request_id = %format_args!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
            method = %"/licensd.v1.ActivationService/RedeemRenewalCode",
            peer = %std::net::SocketAddr::from(([127, 0, 0, 1], 40_000)),
            client = Empty
        );
        let _in = span.enter();
        if lines {
            tracing::info!(key = %"ACME-QN26J…", "license renewed");
        }
        black_box(&span);
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
}

fn main() {
    for round in 1..=3 {
        let theirs = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .json()
            .flatten_event(true)
            .finish();
        let (theirs_span, theirs_line) =
            tracing::subscriber::with_default(theirs, || (calls(false), calls(true)));
        let ours = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .finish();
        let (ours_span, ours_line) =
            tracing::subscriber::with_default(ours, || (calls(false), calls(true)));
        println!(
            "round {round}: a call's span {theirs_span:.2} → {ours_span:.2} µs; \
             span and one line {theirs_line:.2} → {ours_line:.2} µs \
             (tracing-subscriber's JSON → licensd's)"
        );
    }
}
