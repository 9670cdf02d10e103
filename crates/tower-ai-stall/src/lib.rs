//! StallDetector: deadlines on streamed AI answers; a stall is an error, never a silent
//! truncation.
//!
//! # Why AI APIs need it
//!
//! A streamed answer takes seconds to minutes and can go wrong half-way in ways an HTTP
//! client does not notice: the connection stays open and nothing more arrives; the
//! provider sends an error *inside* the 200 stream (OpenAI `data: {"error":…}`, Anthropic
//! `event: error`, Gemini `data: {"error":…}`), which an SSE parser that ignores it turns
//! into a short, clean answer; the stream ends without its terminal event (`[DONE]`,
//! `message_stop`, `response.completed`); or the model stops at its output-token limit
//! (`finish_reason: length`) and the caller ships truncated JSON. A plain timeout sees none
//! of this, and a whole-request timeout long enough for a slow answer is far too long for
//! a dead one.
//!
//! [`StallDetector`] sits next to the wire (above [`Classify`](tower_ai_core::Classify))
//! and puts optional deadlines on each phase of a call (see [`StallConfig`] for each one,
//! its default and the reasoning):
//!
//! - **before the head** (head, total): the call fails with [`AiError::Stalled`] (phase
//!   `Head` or `Total`), kind [`ErrorKind::Stalled`](tower_ai_core::ErrorKind::Stalled):
//!   retryable, a circuit-breaker failure, so AiRetry and ModelFallback above act on it;
//! - **before the first byte** of a `text/event-stream` success (first byte, total): by
//!   default the future waits for the first byte, so a stall here, a connection cut
//!   before any byte, or an error event in the very first chunk is also an error *of the
//!   call* — nothing reached the caller, so it is safe to retry; with
//!   [`await_first_content`](StallConfigBuilder::await_first_content) (off by default) the
//!   future holds the response until the first *content* event, buffering the preamble
//!   (bounded), so that a first-token stall after OpenAI's role chunk or Anthropic's
//!   `message_start` is a retryable error of the call too;
//! - **in the body** (first content, idle, total): the body ends with an
//!   [`AiError::Stalled`] error frame carrying the phase, the deadline and the bytes
//!   received — never a clean EOF, so half an answer cannot pass for a whole one.
//!
//! The total deadline is the earlier of the configured one and the request's
//! [`Deadline`](tower_ai_core::Deadline) (set by a
//! [`DeadlineLayer`](tower_ai_core::DeadlineLayer) or the caller): a call whose caller
//! will have given up by then ends then, with [`AiError::DeadlineExceeded`](tower_ai_core::AiError::DeadlineExceeded) rather than
//! `Stalled` (kind [`ErrorKind::DeadlineExceeded`](tower_ai_core::ErrorKind::DeadlineExceeded):
//! not retried, and not a circuit-breaker failure, since the caller's time may have gone
//! in waits above the call and says nothing about the provider). A request whose
//! deadline has already passed when it reaches the detector (spent waiting for a budget,
//! a cooldown or a retry) is not sent at all: the inner service is not called and the
//! call fails at once with `DeadlineExceeded { sent: false, .. }`. Reading the deadline is
//! one extensions lookup in `call`, and one clock read when there is one.
//!
//! It reads SSE bodies with [`StreamScanner`](tower_ai_core::stream::StreamScanner) in
//! the request's dialect, taken in `call` from the endpoint the path names
//! (`…/chat/completions`, `…/responses`, `…/messages`, `:streamGenerateContent`; so the
//! OpenAI-compatible endpoints of Anthropic and Gemini read as OpenAI streams), else
//! `StreamDialect::of(Provider::of(&req), path)`:
//! Anthropic `ping`s and SSE comments are liveness, not content
//! ([`liveness_resets_idle`](StallConfigBuilder::liveness_resets_idle) chooses whether
//! they reset the idle timer); an in-stream provider error ends the body with
//! [`AiError::Provider`] (classified, status 200) after every byte before it; a missing
//! terminal marker ends it with [`AiError::Truncated`]. How the stream ended, the finish
//! reason and the usage are put in a [`StreamOutcome`] in the response's extensions, and a
//! truncation by the token limit is also a `tracing` warning. A non-streamed JSON answer
//! gets the same: a [`StreamOutcome`] filled at its body's end with its finish reason and
//! usage, and the same warning when the token limit cut it.
//!
//! Chunks pass through as the inner body yields them (zero copies; the scanner keeps only
//! the bytes of an incomplete line). Responses that are not `text/event-stream`
//! successes get only the head and total deadlines. The response future and the body
//! each have at most one timer, created only when they are first pending and reset in
//! place from phase to phase; a chunk only marks progress, timed when the body next waits
//! (the timer catches up when it fires), so it costs no timer operation and no clock
//! read. `call` reads the request's path and headers, but the host (for the
//! `gen_ai.provider.name` of trace events) only when warnings can be recorded.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ai_core::{AiError, ClassifyLayer};
//! use tower_ai_stall::{StallDetectorLayer, StreamEnd, StreamOutcome};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_ai_core::BoxError> {
//! // A provider whose stream is cut after one chunk: no `data: [DONE]`.
//! let provider = service_fn(|_req: Request<String>| async {
//!     let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
//!     Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(Full::new(Bytes::from(sse)))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(StallDetectorLayer::builder().idle(Duration::from_secs(30)).build()?)
//!     .layer(ClassifyLayer::new())
//!     .service(provider);
//!
//! let req = Request::post("https://api.openai.com/v1/chat/completions").body(String::new())?;
//! let res = client.oneshot(req).await?;
//! let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
//! let err = res.into_body().collect().await.unwrap_err();
//! assert!(matches!(err.downcast_ref::<AiError>(), Some(AiError::Truncated { .. })));
//! assert_eq!(outcome.get().unwrap().end, StreamEnd::Truncated);
//! # Ok(())
//! # }
//! ```
//!
//! # Its place in the stack
//!
//! `ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware →
//! StallDetector → Classify → client`. Below the retry and fallback layers so that a
//! stall before the first byte is retried; above `Classify`, whose error bodies it then
//! bounds by the total deadline only.
//!
//! # Differences from `tower::timeout` and tower-http's `TimeoutBody`
//!
//! - `tower::timeout::Timeout` bounds only the future and creates a `Sleep` on every call;
//!   here the head deadline depends on whether the request is streamed, and the timer is
//!   created only when the inner future is actually pending.
//! - tower-http's `TimeoutBody` has one idle timeout and replaces its `Sleep` on every
//!   frame; here there are five phases, one timer per body reset in place, and the body
//!   knows the stream's dialect: content vs keep-alive, in-band errors, terminal markers,
//!   finish reasons.
//! - tower-resilience's time limiter bounds a whole call (and boxes its future); a stream
//!   that stalls after its head is invisible to it.
//! - Errors are [`AiError`]s (in a [`BoxError`](tower_ai_core::BoxError)) with the phase,
//!   the deadline and the bytes received, not a unit `Elapsed`.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](tower_ai_core::BoxError): the inner service's
//! error unchanged, or an [`AiError`] — see [`future::ResponseFuture`]. The body's errors
//! are the inner body's, or [`AiError::Stalled`], [`AiError::Provider`],
//! [`AiError::Truncated`] — see [`StallBody`].
//!
//! # Panics
//!
//! Like `tower::timeout`, it uses `tokio::time` timers: run it inside a Tokio runtime
//! with the time driver enabled. (Use a paused clock in tests: every deadline follows
//! `tokio::time::Instant`.)
//!
//! [`AiError`]: tower_ai_core::AiError
//! [`AiError::Stalled`]: tower_ai_core::AiError::Stalled
//! [`AiError::Provider`]: tower_ai_core::AiError::Provider
//! [`AiError::Truncated`]: tower_ai_core::AiError::Truncated
#![doc = include_str!("../TRUTH.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod config;
pub mod future;
mod layer;
#[cfg(feature = "metrics")]
mod meter;
mod service;
mod stall;

pub use body::StallBody;
pub use config::{
    StallConfig, StallConfigBuilder, StallConfigError, DEFAULT_FIRST_BYTE, DEFAULT_FIRST_CONTENT,
    DEFAULT_HEAD, DEFAULT_IDLE, DEFAULT_MAX_PREAMBLE, DEFAULT_TOTAL,
};
pub use layer::StallDetectorLayer;
pub use service::StallDetector;
pub use stall::{StreamEnd, StreamOutcome, StreamSummary};
pub use tower_ai_core::StallPhase;

/// Describes StallDetector's metrics (units and help text) to the installed `metrics` recorder;
/// call it once after installing the recorder. Feature `metrics`; the metrics are listed
/// in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
