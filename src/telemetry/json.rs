//! The JSON log lines, written straight into the line.
//!
//! `tracing-subscriber`'s own JSON format keeps each span's fields as a
//! JSON string and, for every line logged inside the span, parses that
//! string back into a map, once for `span` and once more for `spans`; its
//! fields go into a map of `serde_json::Value`s first, and the line is
//! written a few bytes at a time, each piece checked to be UTF-8. Every
//! call opens a span, and every write logs a line in it. Here a span's
//! fields are written once, as a JSON object, and copied into each line as
//! they are; the line is built in one string and written once.
//!
//! The lines say the same as `tracing_subscriber::fmt().json()
//! .flatten_event(true)` (a test compares them): `timestamp`, `level`, the
//! event's fields, `target`, `span` (the current span's fields and its
//! `name`) and `spans` (every span in scope, root first).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// A span's fields as one JSON object (`{"request_id":"…",…}`).
#[derive(Debug, Default)]
pub struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut object = Object::default();
        fields.record(&mut object);
        writer.write_str(&object.close())
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = Object::default();
        fields.record(&mut added);
        if added.is_empty() {
            return Ok(());
        }
        if current.fields.is_empty() || current.fields == "{}" {
            current.fields = added.close();
            return Ok(());
        }
        // A field recorded after the span opened (rare: `client` behind a
        // trusted proxy): merged, a field recorded again replacing its
        // value, as `tracing-subscriber`'s own format does.
        let mut merged: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?;
        let added: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&added.close()).map_err(|_| fmt::Error)?;
        merged.extend(added);
        current.fields = serde_json::to_string(&merged).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// The line format (with [`JsonFields`] for the spans' fields).
#[derive(Debug, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Object::default();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.key("timestamp");
        push_str(&mut line.out, &timestamp);
        line.key("level");
        push_str(&mut line.out, meta.level().as_str());
        event.record(&mut line);
        line.key("target");
        push_str(&mut line.out, meta.target());
        let current = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(current) = current {
            line.key("span");
            push_span::<_, N>(&mut line.out, &current);
            line.key("spans");
            line.out.push('[');
            for (i, span) in current.scope().from_root().enumerate() {
                if i > 0 {
                    line.out.push(',');
                }
                push_span::<_, N>(&mut line.out, &span);
            }
            line.out.push(']');
        }
        let mut line = line.close();
        line.push('\n');
        writer.write_str(&line)
    }
}

/// `span`'s fields with its `name`, as one object.
fn push_span<'a, R, N>(out: &mut String, span: &SpanRef<'a, R>)
where
    R: LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    let extensions = span.extensions();
    let fields = extensions
        .get::<FormattedFields<N>>()
        .map(|f| f.fields.as_str())
        .unwrap_or("");
    // `{…` without its closing brace, or just `{` for a span without fields.
    match fields.strip_suffix('}') {
        Some(open) if open.len() > 1 => {
            out.push_str(open);
            out.push(',');
        }
        _ => out.push('{'),
    }
    out.push_str("\"name\":");
    push_str(out, span.metadata().name());
    out.push('}');
}

/// A JSON object being written, a field at a time.
#[derive(Default)]
struct Object {
    out: String,
}

impl Object {
    fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Opens the next entry: `{` or `,`, then `"key":`.
    fn key(&mut self, key: &str) {
        self.out.push(if self.out.is_empty() { '{' } else { ',' });
        push_str(&mut self.out, key);
        self.out.push(':');
    }

    fn close(mut self) -> String {
        if self.out.is_empty() {
            self.out.push('{');
        }
        self.out.push('}');
        self.out
    }

    /// The key a field is written under, or `None` for a field that is
    /// not written (`log.*`: a `log` record's metadata, already in the line).
    fn name(field: &Field) -> Option<&'static str> {
        let name = field.name();
        if name.starts_with("log.") {
            None
        } else {
            Some(name.strip_prefix("r#").unwrap_or(name))
        }
    }

    /// A field whose `Display` is its JSON.
    fn raw(&mut self, field: &Field, value: impl fmt::Display) {
        if let Some(name) = Self::name(field) {
            self.key(name);
            let _ = write!(self.out, "{value}");
        }
    }
}

impl Visit for Object {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.raw(field, serde_json::Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, value);
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.raw(field, serde_json::Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(name) = Self::name(field) {
            self.key(name);
            push_str(&mut self.out, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if let Some(name) = Self::name(field) {
            self.key(name);
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            push_str(&mut self.out, &text);
        }
    }
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn push_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests;
