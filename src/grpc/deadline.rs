//! Deadlines: a call whose client deadline (`grpc-timeout`) or the server's
//! own limit (`Config::request_timeout`) passes is abandoned and answered
//! `DEADLINE_EXCEEDED` (ErrorInfo reason `DEADLINE_EXCEEDED`).
//!
//! Why our own layer: tonic enforces `grpc-timeout` itself, but answers an
//! expired call `CANCELLED` ("Timeout expired"), which tells a client that
//! *it* gave up. tonic's timer sits outside every layer of ours and starts
//! once our layers have been called, and each time it is polled it polls
//! ours first. This layer takes its deadline in [`tower::Service::call`]
//! (synchronously, from the outermost layer that calls on synchronously),
//! [`MARGIN`] before the client's, and answers once the clock has passed
//! it, whether or not the timer driver has fired its timer yet. Without the
//! margin tonic could still win: our clock reads "not yet", and by the time
//! tonic looks at its own timer (a moment later, after waiting for the
//! timer driver's lock while another thread fires timers) the driver has
//! fired it. With it, that moment would have to last a millisecond.
//!
//! Abandoning is dropping the handler's future: a write transaction that
//! had not committed rolls back, one that had is kept and announced (the
//! store's writes are cancel-safe), so a write is entirely done or not at
//! all. A deadline that has already passed on arrival (`grpc-timeout` 0)
//! starts no work. A streaming call's deadline covers the call until its
//! response starts, as tonic's does.

use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// How much earlier than the client's deadline a call is given up, so that
/// this layer's answer, not tonic's timer, ends it (see the module
/// documentation). The client hears DEADLINE_EXCEEDED at its deadline either
/// way; a call that would have finished in its last millisecond is the cost.
pub const MARGIN: Duration = Duration::from_millis(1);

/// The tower layer; `max` is the server's own limit on any call.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    /// Calls end at their client's deadline, and at the latest after `max`.
    pub fn new(max: Duration) -> Self {
        DeadlineLayer { max }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            max: self.max,
        }
    }
}

/// The service [`DeadlineLayer`] wraps.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

/// The answer to a call whose deadline passed.
pub fn deadline_exceeded() -> Status {
    Status::with_error_details(
        Code::DeadlineExceeded,
        "the call's deadline passed; its work was abandoned (a write is either done entirely or not at all)",
        ErrorDetails::with_error_info("DEADLINE_EXCEEDED", super::ERROR_DOMAIN, []),
    )
}

/// The `grpc-timeout` header's duration: 1 to 8 digits and a unit (`H`,
/// `M`, `S`, `m`, `u`, `n`); `None` if absent or malformed (then ignored,
/// as tonic ignores it).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S> tower::Service<Request<Body>> for Deadline<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let limit = match grpc_timeout(req.headers()) {
            Some(t) if t <= self.max => t.saturating_sub(MARGIN),
            _ => self.max,
        };
        if limit.is_zero() {
            return Box::pin(async { Ok(deadline_exceeded().into_http()) });
        }
        // Taken now, before tonic's timer starts (see the module documentation).
        let deadline = tokio::time::Instant::now() + limit;
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(req);
        Box::pin(async move {
            let mut call = std::pin::pin!(call);
            let mut expiry = std::pin::pin!(tokio::time::sleep_until(deadline));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                    return Poll::Ready(answer);
                }
                if expiry.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(deadline_exceeded().into_http()));
                }
                // The clock as well, last (nothing between it and tonic's
                // look at its timer): when tonic's timer has fired, ours
                // (due earlier) may not have been processed yet by the
                // timer driver.
                if tokio::time::Instant::now() >= deadline {
                    return Poll::Ready(Ok(deadline_exceeded().into_http()));
                }
                Poll::Pending
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(parsed("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parsed("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parsed("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parsed("15m"), Some(Duration::from_millis(15)));
        assert_eq!(parsed("0m"), Some(Duration::ZERO));
        assert_eq!(parsed("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parsed("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "m",
            "123456789m",
            "10",
            "10x",
            "-1m",
            "1.5S",
            " 5m",
            "５m",
        ] {
            let mut headers = HeaderMap::new();
            if let Ok(v) = bad.parse() {
                headers.insert("grpc-timeout", v);
            }
            assert_eq!(grpc_timeout(&headers), None, "{bad:?}");
        }
    }
}
