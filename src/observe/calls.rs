//! One place every call passes through, outermost (before the gate): its
//! request id, its span, its log line and its metrics.
//!
//! * **Request id**: the caller's `x-request-id` metadata if it is sane (1–128
//!   characters of `A–Z a–z 0–9 - _ . : / + =`), else a fresh random one; it is
//!   echoed in the response metadata and is a field of the call's span, so
//!   every log line of the call carries it.
//! * **Span** `call` with `request_id`, `method`, `peer`, and, once the call
//!   has ended, `code` and `latency_ms`; the line `call finished` (level
//!   DEBUG, or WARN for `INTERNAL`/`UNKNOWN`/`DATA_LOSS`) carries them all.
//! * **Metrics** (with `--metrics-listen`): calls by service, method and
//!   code, latency by service and method, calls in flight, and refusals by
//!   their `ErrorInfo.reason`.
//!
//! A call ends when its response's trailers (or a trailers-only response's
//! headers) carry `grpc-status`; a response dropped before that (the client
//! went away) ends as `CANCELLED`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tonic::Code;
use tonic::body::Body;
use tracing::Span;
use tracing::field::Empty;

/// The metadata key of the request id.
pub const REQUEST_ID: &str = "x-request-id";

const MAX_REQUEST_ID: usize = 128;

/// The caller's request id if it is sane.
pub fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let ok = (1..=MAX_REQUEST_ID).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b));
    ok.then_some(text)
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Service and method names for labels: every method the server routes
/// (the licensing API, health, reflection), each name allocated once; any
/// other path is `unknown`, so a caller cannot grow the label set.
fn method_labels(path: &str) -> (&'static str, &'static str) {
    static KNOWN: OnceLock<HashMap<String, (&'static str, &'static str)>> = OnceLock::new();
    KNOWN
        .get_or_init(|| {
            let mut known = HashMap::new();
            for set in [
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ] {
                let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(set)
                else {
                    continue;
                };
                for file in set.file {
                    let package = file.package.unwrap_or_default();
                    for service in file.service {
                        let name = format!("{package}.{}", service.name.unwrap_or_default());
                        let service_label: &'static str = name.clone().leak();
                        for method in service.method {
                            let method = method.name.unwrap_or_default();
                            known.insert(
                                format!("/{name}/{method}"),
                                (service_label, &*method.leak()),
                            );
                        }
                    }
                }
            }
            known
        })
        .get(path)
        .copied()
        .unwrap_or(("unknown", "unknown"))
}

/// The tower layer (`metrics`: record metrics too).
#[derive(Clone, Copy)]
pub struct ObserveLayer {
    /// Whether to record metrics.
    pub metrics: bool,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics,
        }
    }
}

/// The service [`ObserveLayer`] wraps around everything else.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: bool,
}

impl<S> tower::Service<Request<Body>> for Observe<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        let id = match req.headers().get(REQUEST_ID).and_then(sane_request_id) {
            Some(id) => id.to_string(),
            None => new_request_id(),
        };
        let path = req.uri().path();
        let (service, method) = method_labels(path);
        let span = match super::peer_addr(&req) {
            Some(peer) => {
                tracing::info_span!("call", request_id = %id, method = %path, %peer, code = Empty, latency_ms = Empty)
            }
            None => {
                tracing::info_span!("call", request_id = %id, method = %path, peer = Empty, code = Empty, latency_ms = Empty)
            }
        };
        let end = CallEnd {
            span: span.clone(),
            start,
            service,
            method,
            metrics: self.metrics,
            done: false,
        };
        if self.metrics {
            metrics::gauge!("licensd_grpc_calls_in_flight").increment(1.0);
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = {
            let _entered = span.enter();
            inner.call(req)
        };
        Box::pin(async move {
            let result = {
                use tracing::Instrument;
                call.instrument(span).await
            };
            let mut end = end;
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    end.finish(Code::Internal, None);
                    return Err(e);
                }
            };
            if let Ok(value) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID, value);
            }
            if resp.headers().contains_key("grpc-status") {
                // Trailers-only: the call has ended.
                end.finish_with(resp.headers());
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                Body::new(Observed {
                    body,
                    end: Some(end),
                }),
            ))
        })
    }
}

/// What is recorded when a call ends.
struct CallEnd {
    span: Span,
    start: Instant,
    service: &'static str,
    method: &'static str,
    metrics: bool,
    done: bool,
}

impl CallEnd {
    fn finish_with(&mut self, headers: &HeaderMap) {
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32);
        let reason = if code != Code::Ok && self.metrics {
            refusal_reason(headers)
        } else {
            None
        };
        self.finish(code, reason);
    }

    fn finish(&mut self, code: Code, reason: Option<String>) {
        if self.done {
            return;
        }
        self.done = true;
        let latency = self.start.elapsed();
        let latency_ms = latency.as_secs_f64() * 1e3;
        let code_name = code_name(code);
        self.span.record("code", code_name);
        self.span.record("latency_ms", latency_ms);
        if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
            tracing::warn!(parent: &self.span, code = code_name, latency_ms, "call finished");
        } else {
            tracing::debug!(parent: &self.span, code = code_name, latency_ms, "call finished");
        }
        if self.metrics {
            let (service, method) = (self.service, self.method);
            metrics::gauge!("licensd_grpc_calls_in_flight").decrement(1.0);
            metrics::counter!("licensd_grpc_calls_total", "service" => service, "method" => method, "code" => code_name)
                .increment(1);
            metrics::histogram!("licensd_grpc_call_duration_seconds", "service" => service, "method" => method)
                .record(latency.as_secs_f64());
            if let Some(reason) = reason {
                metrics::counter!("licensd_refusals_total", "method" => method, "reason" => reason)
                    .increment(1);
            }
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        // The response was dropped before its status: the client went away.
        self.finish(Code::Cancelled, None);
    }
}

/// The `ErrorInfo.reason` of a refusal, from `grpc-status-details-bin`.
fn refusal_reason(headers: &HeaderMap) -> Option<String> {
    use tonic_types::StatusExt;
    let status = tonic::Status::from_header_map(headers)?;
    status.get_details_error_info().map(|info| info.reason)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that ends its call when the trailers (or the end) come.
struct Observed {
    body: Body,
    end: Option<CallEnd>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut end) = self.end.take()
                {
                    end.finish_with(trailers);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(mut end) = self.end.take() {
                    end.finish(status.code(), None);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut end) = self.end.take() {
                    // Ended without trailers: nothing said otherwise.
                    end.finish(Code::Ok, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_request_id_is_kept_and_anything_else_is_not() {
        let sane = |v: &str| sane_request_id(&HeaderValue::from_str(v).unwrap()).is_some();
        assert!(sane("abc-123_X.y:z/+="));
        assert!(sane(&"a".repeat(128)));
        assert!(!sane(&"a".repeat(129)));
        assert!(!sane(""));
        assert!(!sane("two words"));
        assert!(!sane("quote\"d"));
        assert!(sane_request_id(&HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()).is_none());
        assert_eq!(new_request_id().len(), 32);
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn only_routed_methods_are_labels() {
        assert_eq!(
            method_labels("/licensing.v1.ActivationService/Validate"),
            ("licensing.v1.ActivationService", "Validate")
        );
        assert_eq!(
            method_labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            method_labels("/licensing.v1.ActivationService/Nope"),
            ("unknown", "unknown")
        );
        assert_eq!(method_labels("/../../etc/passwd"), ("unknown", "unknown"));
    }
}
