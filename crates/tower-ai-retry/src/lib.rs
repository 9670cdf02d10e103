//! AiRetry: sends an AI API request again when the provider's answer says it may help,
//! after the wait the provider asked for, inside a retry budget.
//!
//! # Why AI APIs need their own retry
//!
//! - A 429 can mean "slow down" or "your quota is gone": retrying the second never helps.
//!   AiRetry decides from the response's [`Classification`](tower_ai_core::Classification)
//!   (put there by [`ClassifyLayer`](tower_ai_core::ClassifyLayer), or read cheaply from
//!   status and headers), and from transport errors ([`ErrorKind::of_error`](tower_ai_core::ErrorKind::of_error)).
//!   400/401/403/404/422, quota 429s, "request too large" 429s are sent exactly once.
//! - Providers say when to come back (`retry-after-ms`, `Retry-After`, Gemini's
//!   `RetryInfo`, …). That wait is used **as given, never shortened**. Only when the
//!   provider names none does AiRetry back off exponentially (base × multiplier^n, capped)
//!   with [`Jitter`] Full, Equal, Decorrelated or None, drawn from a seedable RNG.
//! - A wait longer than [`max_wait`](AiRetryConfigBuilder::max_wait) ends the retries at
//!   once instead of sleeping for it (see "What the caller gets").
//! - Calls take seconds to minutes: [`max_elapsed`](AiRetryConfigBuilder::max_elapsed) is
//!   a deadline across attempts and waits; no wait that would end at or after it is begun.
//! - During an outage, retries multiply load. The [`RetryBudget`] (shared by every clone
//!   of the layer) keeps retries to a fraction of recent calls plus a floor.
//! - The body is replayed, never re-serialised: [`ReplayBody::try_clone`](tower_ai_core::ReplayBody::try_clone)
//!   (a `Bytes` refcount for [`AiBody`](tower_ai_core::AiBody)). A body that cannot be
//!   replayed (a streamed upload) is sent once and its answer returned as it is.
//! - An `idempotency-key` header (random, set once, the same on every attempt, never on
//!   GET/HEAD, a caller's own key kept) and `x-stainless-retry-count` (`"0"` on the
//!   first attempt, as the official SDKs send) go with every attempt; both are
//!   configurable or can be turned off.
//! - Streams: only a failure *before* the response head reaches the caller is retried;
//!   once a response is returned, AiRetry is done with it and never retries behind the
//!   caller's back (a mid-stream error is the caller's, or the StallDetector's, to see).
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ai_core::{AiBody, BoxError};
//! use tower_ai_retry::{AiRetryLayer, Jitter, OnExhausted};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let retry = AiRetryLayer::builder()
//!     .max_attempts(4)
//!     .max_elapsed(Duration::from_secs(60))
//!     .max_wait(Duration::from_secs(30))
//!     .jitter(Jitter::Full)
//!     .on_exhausted(OnExhausted::ReturnLast)
//!     .build()?;
//! let client = tower::service_fn(|_req: Request<AiBody>| async {
//!     Ok::<_, BoxError>(Response::new("{\"choices\":[]}"))
//! });
//! let svc = ServiceBuilder::new().layer(retry).service(client);
//! let req = Request::post("https://api.openai.com/v1/chat/completions")
//!     .body(AiBody::from(r#"{"model":"gpt-4o","messages":[]}"#))?;
//! assert_eq!(svc.oneshot(req).await?.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! # Place in the stack
//!
//! `ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware →
//! StallDetector → Classify → client`: AiRetry repeats one route; the layers below it
//! refuse with `AiError`s that carry a "not before" (`CoolingDown { until }`,
//! `BudgetExceeded { retry_after }`), which AiRetry treats as a requested wait (subject
//! to `max_wait` and the deadline). A `CircuitOpen { until }` is returned at once unless
//! [`wait_on_open_circuit`](AiRetryConfigBuilder::wait_on_open_circuit) is set: an open
//! breaker means "fail fast", and waiting 30 s for it to half-open is rarely what a caller
//! wants. Under ModelFallback every refusal is returned at once while a later route can
//! serve.
//!
//! # What the caller gets
//!
//! - A success, or a failure no retry can help (400, 401, quota 429, …): the response
//!   as it is. A final failure response carries a [`RetryStop`] (attempts and
//!   [`StopReason`]) and its [`Classification`](tower_ai_core::Classification) in its
//!   extensions.
//! - Retries ended on a retryable failure response (attempts used up, deadline, budget,
//!   or a requested wait above `max_wait`): by default ([`OnExhausted::ReturnLast`]) the
//!   provider's **last response unchanged** (a 429 stays a 429 with its body), with the
//!   extensions above. With [`OnExhausted::Error`], an
//!   [`AiError::RetriesExhausted { attempts, last, wait }`](tower_ai_core::AiError::RetriesExhausted).
//! - **The contract for ModelFallback** ("retries stopped because the wait was too
//!   long"): in `ReturnLast` mode the response's extensions hold
//!   `RetryStop { reason: StopReason::WaitTooLong, .. }` and a `Classification` whose
//!   `wait.exceeds_max()` is true (its `delay` clamped to AiRetry's `max_wait`,
//!   `requested` as asked); in `Error` mode, `RetriesExhausted.wait` is `Some(wait)`
//!   (with the same `exceeds_max()`), and `None` for every other reason.
//! - A transport error (or a layer's refusal) that ends the retries: the error as it
//!   is, in both modes.
//! - **The request's [`Deadline`](tower_ai_core::Deadline)**: a wait (backoff,
//!   `Retry-After` or a layer's "not before") that would end at or after it is not
//!   started; retrying ends at once with the last answer or error, the reason
//!   [`StopReason::RequestDeadline`] (traced as `stop = "request_deadline"`). A call
//!   StallDetector cut at that deadline (`DeadlineExceeded`) is not retried.
//!
//! # Tracing
//!
//! One `ai_retry` span per logical call (`attempts` recorded at the end); one event per
//! attempt with `attempt`, `http.response.status_code`, `error.type`, and for retries
//! `wait_ms` and `wait.source` (`retry-after`, `retry-after-ms`, `retry-info`, …,
//! `until` for a layer's refusal, `backoff`), and for an attempt that got an answer the
//! provider's `request_id` (its `x-request-id` or `request-id` header, see
//! [`tower_ai_core::telemetry::request_id`]). No other header is logged.
//!
//! # Cost
//!
//! The future is named and unboxed (a retry boxes its sleep and its next attempt). On
//! the happy path a call allocates only the box of what a retry needs, with the copy of
//! the request kept for it (its headers inline, the body a refcount), taken before the
//! two headers go in; the idempotency key is a slice of a per-thread slab (no allocation
//! of its own), the attempt number a static value. Under ModelFallback, which keeps a
//! copy of the same request and offers its head (method, URI, headers) with it, the head
//! is shared instead of copied when the request still has exactly that head (see
//! [`RetainedRequest::share_offered`](tower_ai_core::RetainedRequest::share_offered)),
//! and the box is less than half the size.
//!
//! Nothing on the success path takes a lock or writes memory shared between threads: an
//! instance's first call deposits in the [`RetryBudget`] with one atomic add in a
//! per-thread stripe; an instance that serves many calls deposits in batches (one clock
//! read and one atomic add per 16 calls; see [`RetryBudget`] for what a retry sees) and,
//! from its second call, works from its own copy of the configuration (so the refcount
//! its futures take is its own). The clock is otherwise read only for a deadline.
//!
//! # Differences from `tower::retry` and tower-resilience
//!
//! - The decision is AI-aware (classification, `x-should-retry`, provider waits) rather
//!   than a user `Policy`; the provider's wait beats the backoff and is never shortened.
//! - The budget is lock-free on the success path (tower's `TpsBudget` locks a mutex on
//!   every deposit) and is built in.
//! - Waits too long to honour end the retries with the wait attached; the deadline spans
//!   attempts and waits.
//! - tower-resilience boxes every future; this one is named.
//!
//! # Errors
//!
//! The service's error is [`BoxError`](tower_ai_core::BoxError): the inner service's error
//! as it is, or [`AiError::RetriesExhausted`](tower_ai_core::AiError::RetriesExhausted)
//! in `Error` mode. The builder returns a [`ConfigError`] for nonsensical settings.
//!
//! # Panics
//!
//! Never on network or user input.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod budget;
mod config;
pub mod future;
mod key;
mod layer;
#[cfg(feature = "metrics")]
mod meter;
mod service;

pub use backoff::{Backoff, Jitter};
pub use budget::RetryBudget;
pub use config::{AiRetryConfig, AiRetryConfigBuilder, ConfigError, OnExhausted};
pub use future::{RetryStop, StopReason};
pub use layer::AiRetryLayer;
pub use service::AiRetry;

/// Describes AiRetry's metrics (units and help text) to the installed `metrics` recorder;
/// call it once after installing the recorder. Feature `metrics`; the metrics are listed
/// in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
