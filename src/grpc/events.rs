//! The event feed's calls (LicenseService/ListEvents and WatchEvents):
//! request parsing and the stream of a watch.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::{self, invalid, token};
use super::{Ctx, ERROR_DOMAIN, status_of};
use crate::domain::Refusal;
use crate::domain::event::{EVENT_TYPES, is_event_type};
use crate::proto as pb;
use crate::store::{EventFilter, FeedEnd, FeedItem, FeedWatch};

/// Where a feed call starts and what it asks for.
pub struct FeedRequest {
    /// After this event id.
    pub after: i64,
    /// The filters.
    pub filter: EventFilter,
}

/// Parses a feed request's fields; an unknown product is NOT_FOUND.
pub async fn parse(
    ctx: &Ctx,
    after: &str,
    product: &str,
    event_types: &[String],
) -> Result<FeedRequest, Status> {
    let parsed = (|| {
        let after = token::parse_feed(after)?;
        let product = if product.is_empty() {
            None
        } else {
            Some(convert::product_code("product", product)?)
        };
        let mut types = Vec::new();
        for t in event_types {
            if !is_event_type(t) {
                return Err(invalid(
                    "event_types",
                    format!("unknown event type; one of {}", EVENT_TYPES.join(", ")),
                ));
            }
            if !types.contains(t) {
                types.push(t.clone());
            }
        }
        Ok::<_, Refusal>((after, product, types))
    })();
    let (after, product, types) = parsed.map_err(|r| super::refusal_status(&r))?;
    if let Some(code) = &product {
        // A typo in a product code would otherwise watch nothing, silently.
        ctx.store.get_product(code).await.map_err(status_of)?;
    }
    Ok(FeedRequest {
        after,
        filter: EventFilter {
            product: product.map(|p| p.to_string()),
            types,
        },
    })
}

/// A watch as a gRPC response stream: its messages, then the status that
/// says why it ended.
pub struct WatchStream {
    watch: FeedWatch,
    done: bool,
}

impl WatchStream {
    /// The stream of `watch`.
    pub fn new(watch: FeedWatch) -> Self {
        WatchStream { watch, done: false }
    }
}

/// Why a watch ended, for its consumer: each tells it to resume from the
/// last cursor it received.
fn end_status(end: FeedEnd) -> Status {
    match end {
        FeedEnd::TooSlow => Status::with_error_details(
            Code::ResourceExhausted,
            "the stream's consumer fell too far behind; resume from the last cursor received",
            ErrorDetails::with_error_info("CONSUMER_TOO_SLOW", ERROR_DOMAIN, []),
        ),
        FeedEnd::Closing => Status::with_error_details(
            Code::Unavailable,
            "licensd is shutting down; resume from the last cursor received",
            ErrorDetails::with_error_info("SHUTTING_DOWN", ERROR_DOMAIN, []),
        ),
        FeedEnd::Failed(e) => status_of(e),
    }
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<pb::WatchEventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.watch.items.poll_recv(cx) {
            Poll::Ready(Some(FeedItem::Event(e))) => {
                let event = convert::event_to_proto(&e);
                let cursor = event.cursor.clone();
                Poll::Ready(Some(Ok(pb::WatchEventsResponse {
                    event: Some(event),
                    cursor,
                })))
            }
            Poll::Ready(Some(FeedItem::Checkpoint(pos))) => {
                Poll::Ready(Some(Ok(pb::WatchEventsResponse {
                    event: None,
                    cursor: token::feed(pos),
                })))
            }
            Poll::Ready(None) => {
                self.done = true;
                // The watch sends its reason before it closes the channel.
                let status = match self.watch.end.try_recv() {
                    Ok(end) => end_status(end),
                    Err(_) => Status::unavailable(
                        "the event stream ended; resume from the last cursor received",
                    ),
                };
                Poll::Ready(Some(Err(status)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
