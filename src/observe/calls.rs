//! One place every call passes through, outermost (before the gate): its
//! request id, its span, its log line and its metrics.
//!
//! * **Request id**: the caller's `x-request-id` metadata if it is sane (1–128
//!   characters of `A–Z a–z 0–9 - _ . : / + =`), else a fresh random one; it is
//!   echoed in the response metadata and is a field of the call's span, so
//!   every log line of the call carries it.
//! * **Client address**: the TCP peer's, or the one a trusted proxy forwarded
//!   the call for ([`super::client`]), put in the request's extensions for
//!   the limits and the history.
//! * **Span** `call` with `request_id`, `method` and `peer` (and `client`
//!   when a trusted proxy forwarded the call); when the call
//!   ends, the line `call finished` (level DEBUG, or WARN for
//!   `INTERNAL`/`UNKNOWN`/`DATA_LOSS`) adds its `code` and `latency_ms`.
//!   Validate's budget is a few microseconds per call, so the end of a call
//!   is followed (its response body watched for the trailers) only when
//!   someone will read it: metrics on, or DEBUG enabled.
//! * **Metrics** (with `--metrics-listen`): calls by service, method and
//!   code, latency by service and method, calls in flight, and refusals by
//!   their `ErrorInfo.reason`.
//!
//! A call ends when its response's trailers (or a trailers-only response's
//! headers) carry `grpc-status`; a response dropped before that (the client
//! went away) ends as `CANCELLED`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use metrics::{Counter, Gauge, Histogram};
use tonic::Code;
use tonic::body::Body;
use tracing::Span;
use tracing::field::Empty;

use super::client::{ClientAddr, TrustedProxies, peer_addr};

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

/// 32 random hex digits.
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for d in id.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    String::from_utf8(id.to_vec()).expect("hex is ASCII")
}

/// Service and method names for labels: every method the server routes
/// (the licensing API, health, reflection), each name allocated once; any
/// other path is `unknown`, so a caller cannot grow the label set.
#[cfg(test)]
fn method_labels(path: &str) -> (&'static str, &'static str) {
    known_methods()
        .get(path)
        .map(|&(service, method, _)| (service, method))
        .unwrap_or(("unknown", "unknown"))
}

/// Whether `path` is a method whose answer is a stream (health's Watch,
/// reflection, any `stream` response of the licensing API).
pub fn is_server_stream(path: &str) -> bool {
    known_methods().get(path).is_some_and(|m| m.2)
}

/// Path → (service, method, answers with a stream).
type Methods = HashMap<String, (&'static str, &'static str, bool)>;

/// Every method the server routes.
fn known_methods() -> &'static Methods {
    static KNOWN: OnceLock<Methods> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known = HashMap::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = format!("{package}.{}", service.name.unwrap_or_default());
                    let service_label: &'static str = name.clone().leak();
                    for method in service.method {
                        let streams = method.server_streaming();
                        let method = method.name.unwrap_or_default();
                        known.insert(
                            format!("/{name}/{method}"),
                            (service_label, &*method.leak(), streams),
                        );
                    }
                }
            }
        }
        known
    })
}

/// One method's metric handles, registered once (a handle records without
/// looking its series up again).
struct MethodMetrics {
    method: &'static str,
    duration: Histogram,
    /// By gRPC code (0–16), registered at the first call that ends so.
    calls: [OnceLock<Counter>; 17],
    service: &'static str,
}

impl MethodMetrics {
    fn new(service: &'static str, method: &'static str) -> Self {
        MethodMetrics {
            service,
            method,
            duration: metrics::histogram!("licensd_grpc_call_duration_seconds", "service" => service, "method" => method),
            calls: Default::default(),
        }
    }

    fn calls(&self, code: Code) -> &Counter {
        let i = (code as usize).min(16);
        self.calls[i].get_or_init(|| {
            metrics::counter!("licensd_grpc_calls_total", "service" => self.service, "method" => self.method, "code" => code_name(code))
        })
    }
}

/// Every method's handles, and calls in flight.
struct Recorders {
    methods: HashMap<&'static str, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
    in_flight: Gauge,
}

impl Recorders {
    fn new() -> Self {
        let mut methods = HashMap::new();
        for (path, (service, method, _)) in known_methods() {
            methods.insert(path.as_str(), Arc::new(MethodMetrics::new(service, method)));
        }
        Recorders {
            methods,
            unknown: Arc::new(MethodMetrics::new("unknown", "unknown")),
            in_flight: metrics::gauge!("licensd_grpc_calls_in_flight"),
        }
    }

    fn of(&self, path: &str) -> &Arc<MethodMetrics> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }
}

/// The tower layer.
#[derive(Clone)]
pub struct ObserveLayer {
    recorders: Option<Arc<Recorders>>,
    trusted: Option<Arc<TrustedProxies>>,
}

impl ObserveLayer {
    /// With `metrics`, calls are also recorded (into the recorder installed
    /// by then, see [`super::install`]).
    pub fn new(metrics: bool) -> Self {
        ObserveLayer {
            recorders: metrics.then(|| Arc::new(Recorders::new())),
            trusted: None,
        }
    }

    /// Takes the client's address from calls of `proxies` that forward one.
    pub fn trusting(mut self, proxies: &TrustedProxies) -> Self {
        self.trusted = (!proxies.is_empty()).then(|| Arc::new(proxies.clone()));
        self
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            recorders: self.recorders.clone(),
            trusted: self.trusted.clone(),
        }
    }
}

/// The service [`ObserveLayer`] wraps around everything else.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    recorders: Option<Arc<Recorders>>,
    trusted: Option<Arc<TrustedProxies>>,
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        let peer = peer_addr(&req);
        let forwarded = match (&self.trusted, peer) {
            (Some(trusted), Some(peer)) => trusted.forwarded_for(peer.ip(), req.headers()),
            _ => None,
        };
        if let Some(ip) = forwarded {
            req.extensions_mut().insert(ClientAddr(ip));
        }
        let id = match req.headers().get(REQUEST_ID).and_then(sane_request_id) {
            Some(id) => id.to_string(),
            None => new_request_id(),
        };
        let path = req.uri().path();
        let recorded = self
            .recorders
            .as_ref()
            .map(|r| (r.of(path).clone(), r.in_flight.clone()));
        let span = match peer {
            Some(peer) => {
                tracing::info_span!("call", request_id = %id, method = %path, %peer, client = Empty)
            }
            None => {
                tracing::info_span!("call", request_id = %id, method = %path, peer = Empty, client = Empty)
            }
        };
        if let Some(ip) = forwarded {
            span.record("client", tracing::field::display(ip));
        }
        if let Some((_, in_flight)) = &recorded {
            in_flight.increment(1.0);
        }
        let followed = recorded.is_some() || tracing::enabled!(tracing::Level::DEBUG);
        let end = followed.then(|| CallEnd {
            span: span.clone(),
            start,
            recorded,
            done: false,
        });
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = {
            let _entered = span.enter();
            inner.call(req)
        };
        Box::pin(async move {
            use tracing::Instrument;
            let call = call.instrument(span);
            tokio::pin!(call);
            let result = call.as_mut().await;
            let span = call.span();
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    if let Some(mut end) = end {
                        end.finish(Code::Internal, None);
                    }
                    return Err(e);
                }
            };
            if let Ok(value) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID, value);
            }
            let Some(mut end) = end else {
                // Not followed: a trailers-only server error is still worth
                // a line.
                if let Some(code) = header_code(resp.headers())
                    && matches!(code, Code::Internal | Code::Unknown | Code::DataLoss)
                {
                    let latency_ms = start.elapsed().as_secs_f64() * 1e3;
                    tracing::warn!(parent: span, code = code_name(code), latency_ms, "call finished");
                }
                return Ok(resp);
            };
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
    /// With metrics: the method's handles and calls in flight.
    recorded: Option<(Arc<MethodMetrics>, Gauge)>,
    done: bool,
}

impl CallEnd {
    fn finish_with(&mut self, headers: &HeaderMap) {
        let code = header_code(headers).unwrap_or(Code::Unknown);
        let reason = if code != Code::Ok && self.recorded.is_some() {
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
        if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
            tracing::warn!(parent: &self.span, code = code_name, latency_ms, "call finished");
        } else {
            tracing::debug!(parent: &self.span, code = code_name, latency_ms, "call finished");
        }
        if let Some((m, in_flight)) = &self.recorded {
            in_flight.decrement(1.0);
            m.calls(code).increment(1);
            m.duration.record(latency.as_secs_f64());
            if let Some(reason) = reason {
                metrics::counter!("licensd_refusals_total", "method" => m.method, "reason" => reason)
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

/// The status a response's headers (or trailers) carry.
fn header_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
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
