//! The gate in front of every service: bearer tokens and roles for the
//! billing/support APIs, and abuse limits for the ActivationService.
//!
//! It is a tower layer, not a tonic interceptor, because checking a token
//! reads the database (tokens live there so that every replica honours a
//! revocation at once), and interceptors cannot wait.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{Request, Response};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ERROR_DOMAIN;
use crate::domain::auth::{Access, Role, Token, required_access};
use crate::observe::client;
use crate::store::Store;

/// The authenticated caller of a billing/support method, put in the request
/// extensions for the services (the actor of history events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Abuse-limit settings (README, Security, says what each one is for).
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// ActivationService calls other than Validate per second per client
    /// IP (0: no limit).
    pub activation_per_ip_per_sec: u32,
    /// Validate calls per second per client IP (0: no limit).
    pub validate_per_ip_per_sec: u32,
    /// Failed renewal-code attempts per license key and window (0: no limit).
    pub code_failures_per_window: u32,
    /// The window for failed renewal-code attempts.
    pub code_failure_window: Duration,
}

impl Default for LimitConfig {
    /// Defaults that never bother an honest product, and tell a fleet
    /// behind one address from an attack:
    ///
    /// * Validate is what every installed product calls, on start and every
    ///   so often, and 5,000 workstations behind one NAT are one address:
    ///   a morning's start of all of them within 10 s is 500 calls/s, which
    ///   the burst (twice the rate) absorbs many times over. 2,000 calls/s
    ///   is still a tenth of what one replica answers at its slowest
    ///   measured (about 20,000 calls/s, README, Performance), so one
    ///   address cannot take a replica's Validate away from the others.
    ///   A key has 100 random bits: guessing them through Validate is
    ///   hopeless at any rate.
    /// * Activate, Deactivate, RedeemRenewalCode and GetSigningKeys happen
    ///   at installation, at a move and at renewal: 200 calls/s per address
    ///   is a whole site reinstalling at once.
    /// * Guessing renewal codes is counted per license key, wherever the
    ///   guesses come from: 20 failed attempts an hour, plenty for a person
    ///   mistyping a code.
    fn default() -> Self {
        LimitConfig {
            activation_per_ip_per_sec: 200,
            validate_per_ip_per_sec: 2000,
            code_failures_per_window: 20,
            code_failure_window: Duration::from_secs(3600),
        }
    }
}

/// Counts failed renewal-code attempts per license key in a sliding window.
///
/// Hand-written rather than a `governor` limiter because only *failed*
/// attempts count: the check must not consume anything, and a rate limiter
/// cannot be asked "would you allow one more?" without spending it.
pub struct FailureWindow {
    max: usize,
    window: Duration,
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// Most license keys tracked at once; beyond it, the stalest are forgotten.
const MAX_TRACKED_KEYS: usize = 100_000;

impl FailureWindow {
    /// At most `max` failures per `window` (0: unlimited).
    pub fn new(max: u32, window: Duration) -> Self {
        FailureWindow {
            max: max as usize,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `key` has used up its failures.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("not poisoned");
        let Some(times) = seen.get_mut(key) else {
            return Ok(());
        };
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.len() >= self.max {
            let oldest = *times.front().expect("non-empty");
            return Err(self.window.saturating_sub(now.duration_since(oldest)));
        }
        Ok(())
    }

    /// Records one failure of `key`.
    pub fn record(&self, key: &str) {
        if self.max == 0 {
            return;
        }
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("not poisoned");
        if seen.len() >= MAX_TRACKED_KEYS && !seen.contains_key(key) {
            let window = self.window;
            seen.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) < window)
            });
            if seen.len() >= MAX_TRACKED_KEYS {
                seen.clear();
            }
        }
        let times = seen.entry(key.to_string()).or_default();
        times.push_back(now);
        while times.len() > self.max {
            times.pop_front();
        }
    }
}

/// RESOURCE_EXHAUSTED with a retry delay (`google.rpc.RetryInfo`).
pub fn exhausted(reason: &str, message: &str, wait: Duration) -> Status {
    super::retry_later(Code::ResourceExhausted, reason, message, wait, [])
}

fn refusal(code: Code, reason: &str, message: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []),
    )
}

/// Calls per second per client address, with a burst of twice that.
type PerAddress = DefaultKeyedRateLimiter<IpAddr>;

fn per_address(per_sec: u32) -> Option<PerAddress> {
    NonZeroU32::new(per_sec).map(|rate| {
        let burst = NonZeroU32::new(rate.get().saturating_mul(2)).unwrap_or(rate);
        RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
    })
}

/// Shared state of the gate.
pub struct Gate {
    store: Arc<dyn Store>,
    /// ActivationService calls but Validate.
    per_ip: Option<PerAddress>,
    /// Validate, a budget of its own: a fleet behind one NAT validates far
    /// more often than it activates.
    validate_per_ip: Option<PerAddress>,
}

impl Gate {
    /// A gate over `store` with `limits`.
    pub fn new(store: Arc<dyn Store>, limits: &LimitConfig) -> Arc<Self> {
        Arc::new(Gate {
            store,
            per_ip: per_address(limits.activation_per_ip_per_sec),
            validate_per_ip: per_address(limits.validate_per_ip_per_sec),
        })
    }

    /// Forgets idle per-IP buckets (called periodically).
    pub fn forget_idle(&self) {
        for limiter in [&self.per_ip, &self.validate_per_ip].into_iter().flatten() {
            limiter.retain_recent();
        }
    }

    async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        roles: &[Role],
    ) -> Result<Caller, Status> {
        let unauthenticated = |m: &str| refusal(Code::Unauthenticated, "UNAUTHENTICATED", m);
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| unauthenticated("missing `authorization: Bearer <token>` metadata"))?;
        let text = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| unauthenticated("authorization must be `Bearer <token>`"))?;
        let token = Token::parse(text.trim()).ok_or_else(|| unauthenticated("unknown token"))?;
        let record = match self.store.find_token(token.id()).await {
            Ok(r) => r,
            Err(e) => return Err(super::status_of(e)),
        };
        let record = record
            .filter(|r| r.revoked_at.is_none() && token.matches(&r.secret_hash))
            .ok_or_else(|| unauthenticated("unknown or revoked token"))?;
        if !roles.contains(&record.role) {
            return Err(refusal(
                Code::PermissionDenied,
                "PERMISSION_DENIED",
                &format!("the {} role may not call this method", record.role),
            ));
        }
        Ok(Caller {
            name: record.name,
            role: record.role,
        })
    }

    /// The per-address budget of ActivationService method `path`.
    fn limit_client(&self, path: &str, client: Option<IpAddr>) -> Result<(), Status> {
        let (limiter, message) = if path == VALIDATE_PATH {
            (
                &self.validate_per_ip,
                "too many Validate calls from this address; retry later",
            )
        } else {
            (
                &self.per_ip,
                "too many calls from this address; retry later",
            )
        };
        let (Some(limiter), Some(ip)) = (limiter, client) else {
            return Ok(());
        };
        limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            exhausted("RATE_LIMITED", message, wait)
        })
    }
}

/// The client's IP address (with or without TLS; behind a trusted proxy,
/// the one it forwarded the call for).
pub fn client_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    client::client_ip(req.extensions().get(), client::peer_addr(req))
}

/// The tower layer.
#[derive(Clone)]
pub struct GateLayer(pub Arc<Gate>);

impl<S> tower::Layer<S> for GateLayer {
    type Service = GateService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// The service the layer wraps around the router.
#[derive(Clone)]
pub struct GateService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> tower::Service<Request<Body>> for GateService<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // Take the service that was polled ready; leave a clone for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let decision = match required_access(&path) {
                Access::Public => {
                    if path.starts_with(ACTIVATION_PREFIX) {
                        gate.limit_client(&path, client_ip(&req))
                    } else {
                        Ok(())
                    }
                }
                Access::Roles(roles) => {
                    gate.authenticate(req.headers(), roles).await.map(|caller| {
                        req.extensions_mut().insert(caller);
                    })
                }
            };
            match decision {
                Ok(()) => inner.call(req).await.map(malformed_is_invalid_argument),
                Err(status) => Ok(super::refuse_after_reading(req.into_body(), status).await),
            }
        })
    }
}

/// The messages tonic gives the INTERNAL status it answers when the request
/// itself is broken (undecodable protobuf, a truncated frame, no message, a
/// compressed-flag without compression) before any licensd code runs.
const TONIC_DECODE_ERRORS: &[&str] = &[
    "failed to decode Protobuf message",
    "Unexpected EOF decoding stream",
    "Missing request message",
    "protocol error: received message with",
    "Error decompressing",
];

/// A caller's malformed request is never INTERNAL (docs/api.md, Errors):
/// tonic's answer for an undecodable request becomes INVALID_ARGUMENT with an
/// ErrorInfo.
/// licensd's own internal errors always read "internal error", so they are
/// never mistaken for these.
fn malformed_is_invalid_argument(resp: Response<Body>) -> Response<Body> {
    let Some(status) = Status::from_header_map(resp.headers()) else {
        return resp;
    };
    if status.code() != Code::Internal
        || !TONIC_DECODE_ERRORS
            .iter()
            .any(|m| status.message().starts_with(m))
    {
        return resp;
    }
    refusal(
        Code::InvalidArgument,
        "MALFORMED_REQUEST",
        "the request is not a well-formed licensing.v1 message",
    )
    .into_http()
}

const ACTIVATION_PREFIX: &str = "/licensing.v1.ActivationService/";
const VALIDATE_PATH: &str = "/licensing.v1.ActivationService/Validate";
