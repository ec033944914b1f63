//! Load shedding: a bound on the calls in flight, so that more load than the
//! server can serve is refused at once instead of queueing until every call
//! is late.
//!
//! Two budgets, so that neither starves the other: Validate (the hot path,
//! answered from memory) and every other licensing call (writes and reads
//! that go to the database). A call beyond its budget is answered
//! `UNAVAILABLE` at once, with `ErrorInfo` reason `OVERLOADED` and a
//! `RetryInfo` delay; clients retry it like any `UNAVAILABLE`. Health and
//! reflection are never refused: a load balancer must still see the server.
//! A call holds its place until its handler has answered.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::{Code, Status};

/// How long a refused caller is asked to wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_millis(50);

/// Budgets of calls in flight (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Validate calls.
    pub validate: u32,
    /// Every other licensing call.
    pub other: u32,
}

impl Default for AdmissionLimits {
    /// Measured on this project's 2-core machine (README, Reliability):
    /// far above what it serves at its best latency, far below what would
    /// let queues grow without bound.
    fn default() -> Self {
        AdmissionLimits {
            validate: 1024,
            other: 64,
        }
    }
}

/// The tower layer.
#[derive(Clone)]
pub struct AdmissionLayer {
    validate: Option<Arc<Semaphore>>,
    other: Option<Arc<Semaphore>>,
}

impl AdmissionLayer {
    /// Budgets of `limits`.
    pub fn new(limits: AdmissionLimits) -> Self {
        let budget = |n: u32| (n > 0).then(|| Arc::new(Semaphore::new(n as usize)));
        AdmissionLayer {
            validate: budget(limits.validate),
            other: budget(limits.other),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            budgets: self.clone(),
        }
    }
}

/// The service [`AdmissionLayer`] wraps.
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    budgets: AdmissionLayer,
}

/// The budget a path draws on, if any.
fn budget<'a>(
    budgets: &'a AdmissionLayer,
    path: &str,
) -> Option<(&'a Arc<Semaphore>, &'static str)> {
    if path == "/licensing.v1.ActivationService/Validate" {
        budgets.validate.as_ref().map(|s| (s, "validate"))
    } else if path.starts_with("/licensing.v1.") {
        budgets.other.as_ref().map(|s| (s, "other"))
    } else {
        None
    }
}

/// The refusal of a call beyond its budget.
pub fn overloaded(budget: &str) -> Status {
    super::retry_later(
        Code::Unavailable,
        "OVERLOADED",
        "licensd is at capacity; retry shortly",
        RETRY_AFTER,
        [("budget", budget)],
    )
}

impl<S> tower::Service<Request<Body>> for Admission<S>
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
        let permit = match budget(&self.budgets, req.uri().path()) {
            None => None,
            Some((semaphore, name)) => match semaphore.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let refusal = overloaded(name);
                    let body = req.into_body();
                    return Box::pin(async move {
                        Ok(super::refuse_after_reading(body, refusal).await)
                    });
                }
            },
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let answer = inner.call(req).await;
            drop(permit);
            answer
        })
    }
}
