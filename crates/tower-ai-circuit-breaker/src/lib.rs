//! CircuitBreaker: a per-key closed/open/half-open breaker that fails fast on a sick
//! model or provider.
//!
//! # Why AI APIs need it
//!
//! A model call takes seconds to minutes. When a model is overloaded (Anthropic 529,
//! OpenAI/Gemini 503) or down, every call sent to it ties up a connection and a caller
//! for that long and adds to the overload. The breaker watches each key (provider host +
//! model by default, so one sick model does not stop the others), and once failures reach
//! a rate it refuses calls at once with [`AiError::CircuitOpen`]`{ key, until }`, so
//! ModelFallback can move to another model without waiting, and the provider gets room to
//! recover. After the open duration a few probe calls test the key; enough successes
//! close the breaker, a failure opens it again (for longer, if configured).
//!
//! What counts is decided by [`ErrorKind`](tower_ai_core::ErrorKind), read from the
//! [`Classification`](tower_ai_core::Classification) that
//! [`Classify`](tower_ai_core::Classify) put in the response (or from the error):
//! overload, server errors, timeouts, connection failures and stalls are failures; **rate
//! limits, quota exhaustion and client errors are ignored** (they describe the caller, not
//! the provider's health; a 429 storm must not open the breaker). Slow calls can have
//! their own rate threshold.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitEvent};
//! use tower_ai_core::{AiError, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::builder()
//!     .count_window(20)
//!     .minimum_calls(5)
//!     .failure_rate(0.5)
//!     .open_duration(Duration::from_secs(10))
//!     .open_backoff(2.0, Duration::from_secs(120))
//!     .listener(|e: &CircuitEvent| println!("{e:?}"))
//!     .build()?;
//! let handle = layer.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_req: Request<String>| async {
//!         Ok::<_, BoxError>(Response::builder().status(529).body(String::new())?)
//!     }));
//!
//! let req = || Request::post("https://api.anthropic.com/v1/messages")
//!     .body(r#"{"model":"claude-x","max_tokens":10}"#.to_owned())
//!     .unwrap();
//! for _ in 0..5 {
//!     assert_eq!(svc.clone().oneshot(req()).await?.status(), 529);
//! }
//! // Five overloads out of five: the sixth call is refused without reaching the provider.
//! let err = svc.clone().oneshot(req()).await.unwrap_err();
//! assert!(matches!(err.downcast_ref::<AiError>(), Some(AiError::CircuitOpen { .. })));
//! assert!(handle.is_open_for(&req()));
//! # Ok(())
//! # }
//! ```
//!
//! # The states
//!
//! - **Closed**: calls pass; outcomes fill a [`Window`] (the last N calls, or the last N
//!   seconds in buckets). Once it holds [`minimum_calls`](CircuitBreakerConfigBuilder::minimum_calls),
//!   a failure rate or slow-call rate at or above its threshold opens the breaker; so do
//!   [`consecutive_failures`](CircuitBreakerConfigBuilder::consecutive_failures) if set.
//! - **Open**: calls are refused at once, the inner service untouched, until the open
//!   duration ends. Each failed probe in a row multiplies it (up to a cap), if
//!   [`open_backoff`](CircuitBreakerConfigBuilder::open_backoff) is set.
//! - **Half-open**: up to [`half_open_probes`](CircuitBreakerConfigBuilder::half_open_probes)
//!   calls at once are let through; others are refused, not queued. A failed (or slow)
//!   probe reopens; [`half_open_successes`](CircuitBreakerConfigBuilder::half_open_successes)
//!   successes close it with an empty window. A probe whose future is dropped gives its
//!   permit back. An ignored outcome (a 429) neither closes nor reopens.
//!
//! A call's outcome counts only against the state that admitted it: a slow call sent
//! before the breaker opened does not count against the next closed period.
//!
//! # Streamed answers
//!
//! A `text/event-stream` answer whose head is a success is judged when its body ends, not
//! when its head arrives: the call's ticket travels in the [`BreakerBody`]. A clean end
//! (the last frame read) is a success; an error from the body counts by its
//! [`ErrorKind`](tower_ai_core::ErrorKind), like any other: a connection reset, a stall
//! or a stream cut before its terminal event ([`AiError::Stalled`] /
//! [`AiError::Truncated`], kind `Stalled`) and an in-stream overload or server error are
//! failures; an in-stream rate limit is ignored. So a provider that sends the role chunk
//! and then fails every stream opens the breaker. A body dropped before its end counts
//! for nothing (the caller stopped reading; that says nothing of the provider), and a
//! half-open probe resolves at its body's end (dropped early, it gives its permit back).
//! Slow-call detection times a stream to its head: its length is the answer's.
//!
//! The body's errors are what the layers below make of the stream: StallDetector (below
//! the breaker in the stack) turns stalls, cut streams and in-stream `error` events into
//! `AiError`s; without it, only transport errors fail a stream.
//!
//! # Several replicas
//!
//! With [`CircuitBreakerBuilder::store`], the breakers' state is shared by every replica
//! of a service (tower-ai-redis's `RedisBreakers` keeps it in Redis): a breaker opened by
//! one replica opens in all, and the half-open probes of all replicas stay within
//! `half_open_probes`. The failure window stays per replica, and the closed state's call
//! path is unchanged. Without a store (the default) nothing changes. See [`store`].
//!
//! # Place in the stack
//!
//! `ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware →
//! StallDetector → Classify → client`. Under AiRetry, each attempt is judged; above
//! TokenBudget, a doomed call is refused before it is budgeted. ModelFallback can skip an
//! open route without calling it: [`CircuitBreakerHandle::is_open_for`] (or `is_open` with
//! a [`Key`](tower_ai_core::keys::Key)), or by treating `CircuitOpen` (kind
//! `Overloaded`) as a trigger.
//!
//! # Cost
//!
//! In the closed state a call costs a key derivation ([`HostModel`](tower_ai_core::keys::HostModel)
//! scans the body for `"model"` and hashes host + model, without allocating), a check that
//! the key is the one the service called last (else a lookup in a per-thread cache), an
//! `Arc` clone on a cache line only the calling thread writes, one atomic load, and on
//! completion a look at the `content-type` header (is it a stream?) and one atomic add to
//! a per-thread counter. Clock reads: none for a success in a
//! count window, one in a time window (its bucket), two with slow-call detection (it must
//! time the call); a unit test counts them. No allocation, no lock, no boxed future. Bad
//! outcomes, other states, new keys and events take a `std::sync::Mutex` held for a few
//! instructions, never across an `.await`, and never while a listener runs. See
//! `benches/overhead.rs`.
//!
//! # Differences from tower-resilience's circuit breaker
//!
//! - Per key (host + model), not one breaker per layer; the map is bounded
//!   ([`max_keys`](CircuitBreakerConfigBuilder::max_keys)) and idle keys are forgotten.
//! - Failures are judged by `ErrorKind`, so 429s and quota errors do not trip it, and
//!   HTTP error *responses* count (not only `Err`).
//! - Shared state is per layer, always (every `layer()` call shares it).
//! - Named futures, no `tokio::sync::Mutex`, no allocation per call; the refusal is an
//!   `AiError`, inside the tower-style `BoxError`.
//! - Listener: a trait implemented by closures and `()`, not a list of callbacks.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](tower_ai_core::BoxError): the inner service's
//! error, or an [`AiError::CircuitOpen`] (downcast with `err.downcast_ref::<AiError>()`)
//! whose `until` is when an open breaker starts probing (the time of refusal for a
//! half-open breaker whose permits are taken; a day ahead for a forced one).
//!
//! [`AiError::CircuitOpen`]: tower_ai_core::AiError::CircuitOpen
//! [`AiError::Stalled`]: tower_ai_core::AiError::Stalled
//! [`AiError::Truncated`]: tower_ai_core::AiError::Truncated
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod clock;
mod config;
mod event;
pub mod future;
mod handle;
mod layer;
#[cfg(feature = "metrics")]
mod meter;
mod registry;
mod service;
pub mod store;
mod window;

pub use body::BreakerBody;
pub use breaker::Metrics;
pub use config::{
    CircuitBreakerConfig, CircuitBreakerConfigBuilder, ConfigError, FailurePolicy, SlowCalls,
    Window, MAX_DURATION, MAX_KEYS, MAX_WINDOW_CALLS,
};
pub use event::{CircuitEvent, CircuitState, Listener, TransitionReason, SUBSCRIBER_CAPACITY};
pub use handle::CircuitBreakerHandle;
pub use layer::{CircuitBreakerBuilder, CircuitBreakerLayer};
pub use service::CircuitBreaker;

/// Describes CircuitBreaker's metrics (units and help text) to the installed `metrics`
/// recorder; call it once after installing the recorder. Feature `metrics`; the metrics
/// are listed in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
