use std::io;
use std::sync::{Arc, Mutex};

use tracing::field::{Empty, display};

use super::{JsonFields, JsonLines, push_str};

/// A log destination the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Each line as JSON, without its timestamp (the one thing that differs).
    fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                let mut v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                let ts = v.as_object_mut().unwrap().remove("timestamp").unwrap();
                assert!(ts.as_str().unwrap().ends_with('Z'), "{ts}");
                v
            })
            .collect()
    }
}

/// What the server logs: events outside and inside spans, nested spans, a
/// field recorded after its span opened, every kind of value, text that
/// needs escaping.
fn log_everything() {
    tracing::info!(
        key = "ACME-QN26J…",
        n = 3,
        big = u64::MAX,
        neg = -7,
        ok = true,
        "license renewed"
    );
    let call = tracing::info_span!(
        "call",
        request_id = %"0af3",
        method = %"/licensd.v1.ActivationService/Validate",
        peer = %"127.0.0.1:5000",
        client = Empty
    );
    let _in_call = call.enter();
    tracing::warn!(error = %"bad \"quote\"\n\ttab \u{1} \\ end", "renewal refused");
    call.record("client", display("10.0.0.9"));
    tracing::info!(
        ratio = 1.5,
        nan = f64::NAN,
        r#type = "renewed",
        "after the record"
    );
    let inner = tracing::info_span!("inner", depth = 2_u64, label = ?Some("x"));
    let _in_inner = inner.enter();
    tracing::error!(bytes = tracing::field::debug(&b"ab"[..]), "nested");
    let empty = tracing::info_span!("empty", later = Empty);
    let _in_empty = empty.enter();
    tracing::info!("in a span without fields");
    empty.record("later", 5);
    tracing::info!(unicode = "ü €  🙂", "in a span with a field recorded late");
}

#[test]
fn lines_say_what_tracing_subscribers_json_says() {
    let theirs = Captured::default();
    let ours = Captured::default();
    let subscriber = {
        let out = theirs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .finish()
    };
    tracing::subscriber::with_default(subscriber, log_everything);
    let subscriber = {
        let out = ours.clone();
        tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .finish()
    };
    tracing::subscriber::with_default(subscriber, log_everything);
    let (theirs, ours) = (theirs.lines(), ours.lines());
    assert_eq!(theirs.len(), 6);
    for (t, o) in theirs.iter().zip(&ours) {
        assert_eq!(t, o);
    }
    assert_eq!(theirs.len(), ours.len());
    // The line after `record` carries the field recorded late.
    assert_eq!(ours[2]["span"]["client"], "10.0.0.9");
    assert_eq!(ours[5]["span"]["later"], 5);
}

#[test]
fn strings_are_escaped_as_serde_json_escapes_them() {
    let mut samples: Vec<String> = (0u8..0x80).map(|b| format!("a{}b", b as char)).collect();
    samples.extend(["", "\"", "\\", "ü €  🙂", "\u{7f}\u{2028}", "end\\"].map(String::from));
    for s in samples {
        let mut ours = String::new();
        push_str(&mut ours, &s);
        assert_eq!(ours, serde_json::to_string(&s).unwrap(), "{s:?}");
    }
}
