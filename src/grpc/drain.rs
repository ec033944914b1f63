//! Streams end when the server drains.
//!
//! On shutdown the transport stops accepting, sends every connection an
//! HTTP/2 GOAWAY and waits until each connection's calls have finished: an
//! idle connection closes at once, a unary call finishes by itself. A
//! stream that follows a state never finishes by itself, though: a client
//! watching health (gRPC client-side health checking holds a `Watch` open
//! for as long as it is connected) would hold the process until the drain
//! time ran out, and then be cut off without a status. So, once the drain
//! begins, every answer that is a stream ends as soon as it has nothing
//! ready to send, with `UNAVAILABLE` ("the server is shutting down"),
//! which clients retry elsewhere. What was ready goes out first: the
//! health watchers hear NOT_SERVING, which is set before the drain starts.
//! Unary calls pass through untouched: their answer is complete before its
//! body is read, and the transport already waits for them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;

use crate::observe::calls::is_server_stream;

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
        let stream = is_server_stream(req.uri().path());
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
        let _ = Status::unavailable("the server is shutting down").add_header(&mut trailers);
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
    fn streams_are_known_from_the_descriptors() {
        assert!(is_server_stream("/grpc.health.v1.Health/Watch"));
        assert!(is_server_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_server_stream("/grpc.health.v1.Health/Check"));
        assert!(!is_server_stream(
            "/licensing.v1.ActivationService/Validate"
        ));
        assert!(!is_server_stream("/nope/Nope"));
    }
}
