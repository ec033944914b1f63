//! The gRPC layer: tonic services that parse requests into domain values
//! (a bad field is `INVALID_ARGUMENT` naming it), call the store, and convert
//! the result back. Every error becomes a `tonic::Status` in exactly one
//! place, [`status_of`].

mod activation;
pub mod admission;
pub mod auth;
mod convert;
pub mod deadline;
pub mod drain;
mod events;
mod license;
mod product;
mod request;

pub use activation::ActivationApi;
pub use license::LicenseApi;
pub use product::ProductApi;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::Refusal;
use crate::domain::error::RefusalClass;
use crate::domain::keys::redact_secrets;
use crate::observe::client::{ClientAddr, client_ip};
use crate::store::{Actor, Store, StoreError};

/// Largest request message accepted (a licensing call is a few hundred bytes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The `google.rpc.ErrorInfo` domain of every refusal.
pub const ERROR_DOMAIN: &str = "licensing.v1";

/// Source of the current instant (tests may pin it).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The real clock, truncated to the microseconds the store keeps.
pub fn system_clock() -> Clock {
    Arc::new(|| crate::domain::time::truncate_micros(Utc::now()))
}

/// What every service holds.
#[derive(Clone)]
pub struct Ctx {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The clock.
    pub clock: Clock,
    /// Failed renewal-code attempts per license key.
    pub code_failures: Arc<auth::FailureWindow>,
    /// The keys of offline license certificates.
    pub keys: Arc<crate::signing::KeyRing>,
}

impl Ctx {
    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }
}

/// The one mapping from a refusal to a gRPC status (docs/api.md, Errors).
pub fn refusal_status(refusal: &Refusal) -> Status {
    let code = match refusal.class() {
        RefusalClass::InvalidArgument => Code::InvalidArgument,
        RefusalClass::NotFound => Code::NotFound,
        RefusalClass::AlreadyExists => Code::AlreadyExists,
        RefusalClass::FailedPrecondition => Code::FailedPrecondition,
    };
    let metadata = refusal
        .metadata()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect::<std::collections::HashMap<_, _>>();
    let mut details = ErrorDetails::with_error_info(refusal.reason(), ERROR_DOMAIN, metadata);
    if let Some(v) = refusal.field_violation() {
        details.add_bad_request_violation(v.field, v.description);
    }
    Status::with_error_details(code, refusal.to_string(), details)
}

/// The one mapping from any store error to a gRPC status. Internal errors are
/// logged with their context and answered without it.
pub fn status_of(err: StoreError) -> Status {
    match err {
        StoreError::Refused(r) => refusal_status(&r),
        StoreError::Unavailable(e) | StoreError::Retryable(e) => {
            tracing::warn!(error = %redact_secrets(&e), "database unavailable");
            Status::with_error_details(
                Code::Unavailable,
                "the license database is unavailable; retry shortly",
                ErrorDetails::with_error_info("DATABASE_UNAVAILABLE", ERROR_DOMAIN, []),
            )
        }
        StoreError::Internal(e) => {
            tracing::error!(error = %redact_secrets(&e), "internal error");
            Status::internal("internal error")
        }
    }
}

/// A refusal that asks the caller to come back after `wait`: a
/// `google.rpc.RetryInfo` delay (at least 1 ms), and an ErrorInfo `reason`
/// whose metadata holds `retry_after_ms` and `metadata`.
pub fn retry_later<const N: usize>(
    code: Code,
    reason: &str,
    message: &str,
    wait: std::time::Duration,
    metadata: [(&str, &str); N],
) -> Status {
    let mut details =
        ErrorDetails::with_retry_info(Some(wait.max(std::time::Duration::from_millis(1))));
    let mut info: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    info.insert("retry_after_ms".into(), wait.as_millis().to_string());
    details.set_error_info(reason, ERROR_DOMAIN, info);
    Status::with_error_details(code, message, details)
}

/// Answers a call refused before any service saw it with `status`, after
/// reading its request to the end (a unary request is at most
/// [`MAX_MESSAGE_BYTES`]; reading stops past that). Answering
/// while the client is still sending makes HTTP/2 reset the stream, and a
/// connection on which many streams are reset is closed by the server's
/// reset-flood protection: every call on it would fail, the accepted ones
/// too.
pub async fn refuse_after_reading(
    body: tonic::body::Body,
    status: Status,
) -> http::Response<tonic::body::Body> {
    use http_body::Body as _;
    let mut body = std::pin::pin!(body);
    let mut read = 0usize;
    while read <= MAX_MESSAGE_BYTES + 64 {
        match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(_)) | None => break,
        }
    }
    status.into_http()
}

/// Who is calling, for the history: the token's name, or the client's
/// address for the ActivationService (whose credential is the license key;
/// behind a trusted proxy, the address it forwarded the call for).
fn actor_of<T>(req: &tonic::Request<T>) -> Actor {
    if let Some(caller) = req.extensions().get::<auth::Caller>() {
        return Actor(caller.name.clone());
    }
    let forwarded = req.extensions().get::<ClientAddr>();
    match client_ip(forwarded, req.remote_addr()) {
        Some(ip) => Actor(format!("peer:{ip}")),
        None => Actor("peer:unknown".into()),
    }
}
