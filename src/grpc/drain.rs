//! Streams end when the server drains.
//!
//! On shutdown the transport stops accepting, sends every connection an
//! HTTP/2 GOAWAY and waits until each connection's calls have finished: an
//! idle connection closes at once, a unary call finishes by itself. A
//! stream that follows a state never finishes by itself, though: a client
//! watching health (gRPC client-side health checking holds a `Watch` open
//! for as long as it is connected) would hold the process until the drain
//! time ran out, and then be cut off without a status. So, once the drain
//! begins, the streams of the services licensd embeds (health, reflection)
//! end as soon as they have nothing ready to send, with `UNAVAILABLE`,
//! reason `SHUTTING_DOWN`, which clients retry elsewhere. What was ready
//! goes out first: the health watchers hear NOT_SERVING, which is set
//! before the drain starts.
//!
//! licensd's own streams (`licensing.v1`, e.g. WatchEvents) are left to end
//! themselves: they say more (the cursor to resume from), and ending them
//! here would race their own last word. Unary calls pass through
//! untouched: their answer is complete before its body is read, and the
//! transport already waits for them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ERROR_DOMAIN;
use crate::observe::calls::is_server_stream;

/// Whether the answer to `path` is a stream this layer ends at the drain.
fn ends_at_drain(path: &str) -> bool {
    is_server_stream(path) && !path.starts_with("/licensing.v1.")
}

/// Starts the drain of every stream [`DrainLayer`] wrapped.
pub struct Drain(watch::Sender<bool>);

impl Drain {
    /// A drain and the layer it ends the streams of.
    pub fn new() -> (Drain, DrainLayer) {
        let (tx, rx) = watch::channel(false);
        (Drain(tx), DrainLayer(rx))
    }

    /// Ends every stream once it has nothing ready to send.
    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

/// The tower layer.
#[derive(Clone)]
pub struct DrainLayer(watch::Receiver<bool>);

impl<S> tower::Layer<S> for DrainLayer {
    type Service = Draining<S>;
    fn layer(&self, inner: S) -> Draining<S> {
        Draining {
            inner,
            drain: self.0.clone(),
        }
    }
}

/// The service [`DrainLayer`] wraps.
#[derive(Clone)]
pub struct Draining<S> {
    inner: S,
    drain: watch::Receiver<bool>,
}

impl<S> tower::Service<Request<Body>> for Draining<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let stream = ends_at_drain(req.uri().path());
        let call = self.inner.call(req);
        if !stream {
            return Box::pin(call);
        }
        let mut drain = self.drain.clone();
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| {
                Body::new(Ending {
                    body,
                    drained: Box::pin(async move {
                        // A dropped sender (the server is gone) ends too.
                        let _ = drain.wait_for(|started| *started).await;
                    }),
                    ended: false,
                })
            }))
        })
    }
}

/// A streamed answer that ends when the drain starts and nothing is ready.
struct Ending {
    body: Body,
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl http_body::Body for Ending {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.drained.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        let mut trailers = HeaderMap::new();
        let _ = Status::with_error_details(
            Code::Unavailable,
            "licensd is shutting down",
            ErrorDetails::with_error_info("SHUTTING_DOWN", ERROR_DOMAIN, []),
        )
        .add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_services_streams_end_at_the_drain_and_nothing_else() {
        assert!(ends_at_drain("/grpc.health.v1.Health/Watch"));
        assert!(ends_at_drain(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(ends_at_drain(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        // A stream, but licensd's own: it ends itself.
        assert!(is_server_stream("/licensing.v1.LicenseService/WatchEvents"));
        assert!(!ends_at_drain("/licensing.v1.LicenseService/WatchEvents"));
        assert!(!ends_at_drain("/grpc.health.v1.Health/Check"));
        assert!(!ends_at_drain("/licensing.v1.ActivationService/Validate"));
        assert!(!ends_at_drain("/nope/Nope"));
    }
}
