//! RetryAfterAware: a shared per-key cooldown gate, learned from `Retry-After` and
//! rate-limit headers, that holds requests a provider has already said it will refuse.
//!
//! # Why AI APIs need it
//!
//! Providers tell every caller exactly when to come back: a 429/503/529 with
//! `Retry-After` (or `retry-after-ms`, Gemini's `RetryInfo`, …), and on *every* answer
//! rate-limit headers (`x-ratelimit-remaining-requests: 0`, `…-reset-requests: 12.5s`;
//! Anthropic's RFC 3339 resets). Without a shared gate, each concurrent caller finds the
//! 429 for itself and burns a call (and, with token limits, part of the budget) doing so.
//! RetryAfterAware keeps one cooldown per key and applies it to everyone:
//!
//! - **Learns** from responses: a 429/503/529 classified rate-limited or overloaded with
//!   a requested wait (cooldown until now + wait, cut to `max_cooldown`), and any
//!   response whose rate-limit headers show a bucket with nothing remaining and a reset
//!   (`RateLimitInfo::exhausted_for`). Headers are only read on the response path, and
//!   only when a rate-limit header is present.
//! - **Paces** by remaining capacity: once a key's requests bucket runs low (≤
//!   `pace_below` left, or ≤ 10 %), its sends are numbered, so the gate knows how many
//!   of the "remaining" were already used by requests still in flight, and holds the
//!   rest until the reset. At the reset, `limit` requests go at once and the rest keep
//!   waiting: no thundering herd. Resets are measured from when the request was sent
//!   (providers stamp them when they admit the request) plus `reset_margin`.
//! - **Holds** requests for a cooling key in the response future (`Waiting { sleep }`),
//!   then acquires the inner service's readiness with `Oneshot`: a waiting request holds
//!   no inner permit. Requests for other keys pass untouched. With
//!   [`OnCooldown::FailFast`] (or when the wait would exceed `max_wait`, or the cooldown
//!   ends at or after the request's [`Deadline`](tower_ai_core::Deadline)) the request
//!   fails at once with `AiError::CoolingDown { key, until }`, and so does one that finds
//!   [`max_waiters_per_key`](CooldownConfigBuilder::max_waiters_per_key) (256) waiting for
//!   its key or [`max_waiters`](CooldownConfigBuilder::max_waiters) (4 096) waiting in
//!   all: a waiter holds its request, so waiters are bounded. A cancelled waiter gives
//!   its place back.
//! - **Spreads** the release when the capacity behind a cooldown is unknown (a bare
//!   `Retry-After`): each waiter wakes at a random point of `release_spread` after the
//!   end, drawn from a seeded RNG.
//! - **Bounded**: at most `max_keys` keys; idle keys without a cooldown are evicted
//!   first, then the least recently seen without a running cooldown or waiters. A running
//!   cooldown is never forgotten before it ends (teaching the gate about other keys
//!   cannot lift it); when every key holds one, a new key's lesson is not kept. A key with state takes about 115 bytes (its
//!   entry and its share of the table; `tests/hostile.rs`, `memory_per_key`);
//!   [`RetryAfterAwareLayer::stats`] counts keys, waiters and bytes.
//!
//! Key = a [`KeyFn`](tower_ai_core::keys::KeyFn): [`HostModel`](tower_ai_core::keys::HostModel)
//! (default: provider host + model), [`ApiKeyHash`](tower_ai_core::keys::ApiKeyHash)
//! (the API key, hashed, never stored), [`ApiKeyHostModel`](tower_ai_core::keys::ApiKeyHostModel)
//! (API key hash + host + model), [`Global`](tower_ai_core::keys::Global), or a
//! closure.
//!
//! # Which key: one account, or one per tenant
//!
//! The default, `HostModel`, models **one provider account**: a `Retry-After` on
//! `host/model` cools that model down for every caller of the layer, for up to
//! [`max_cooldown`](CooldownConfigBuilder::max_cooldown). That is right when every
//! request spends the same API key's limits (an application, or a gateway that calls the
//! provider with its own key): the next caller would get the same 429. It is wrong in a
//! proxy that forwards **each tenant's own API key**: the provider's limits are then per
//! key, and one tenant's 429 would hold back every other tenant of that model. Such a
//! proxy keys the gate by tenant too:
//!
//! ```
//! use tower_ai_core::keys::ApiKeyHostModel;
//! use tower_ai_retry_after::RetryAfterAwareLayer;
//! let gate = RetryAfterAwareLayer::new().key_fn(ApiKeyHostModel);
//! # let _ = gate;
//! ```
//!
//! The price is one state per tenant and model, within `max_keys`. The same choice
//! applies to TokenBudget's key (per-tenant limits: `ApiKeyHash` or `ApiKeyHostModel`)
//! and, more rarely, to CircuitBreaker's (an outage is the provider's, for all tenants:
//! keep `HostModel` unless failures are per key, e.g. a revoked key).
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ai_core::{AiBody, BoxError, ClassifyLayer};
//! use tower_ai_retry_after::RetryAfterAwareLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let gate = RetryAfterAwareLayer::builder()
//!     .wait(Duration::from_secs(30))
//!     .release_spread(Duration::from_millis(200))
//!     .build()?;
//! let client = tower::service_fn(|_req: Request<AiBody>| async {
//!     Ok::<_, BoxError>(Response::new(AiBody::from("{}")))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(gate.clone()) // the state is shared by every service of this layer
//!     .layer(ClassifyLayer::new())
//!     .service(client);
//! let req = Request::post("https://api.anthropic.com/v1/messages")
//!     .body(AiBody::from(r#"{"model":"claude-sonnet-4","messages":[]}"#))?;
//! assert_eq!(svc.oneshot(req).await?.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! # Several replicas
//!
//! With [`CooldownConfigBuilder::store`], the cooldowns are shared by every replica of a
//! service: tower-ai-redis's `RedisCooldowns` keeps them in Redis, so a `429` one replica
//! meets holds the others too. Without a store (the default) the state is in-process and
//! the call path is unchanged. See [`store`].
//!
//! # Place in the stack
//!
//! `ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware →
//! StallDetector → Classify → client`. Under AiRetry, a request that waits here is one
//! attempt; a `CoolingDown { until }` refusal is a requested wait for AiRetry.
//!
//! # Cost
//!
//! While no key has state, a call computes its key and reads one atomic; with state, a
//! read lock on one of 16 shards and a few atomics. No allocation either way. Nothing
//! is attached to responses: layers above read
//! [`RateLimitInfo::from_headers`](tower_ai_core::RateLimitInfo::from_headers) (cheap) or
//! the [`Classification`](tower_ai_core::Classification) if they need it.
//!
//! # Differences from tower and tower-resilience
//!
//! tower's `RateLimit` and tower-resilience's rate limiter enforce a rate you configure;
//! this gate enforces the one the provider reports, per key, and only while it is
//! exhausted. Neither reads `Retry-After`.
//!
//! # Errors
//!
//! [`BoxError`](tower_ai_core::BoxError): the inner error as it is, or
//! `AiError::CoolingDown { key, until }` for a refused request (`key` is the key
//! function's label, never a secret). The builder returns a [`ConfigError`].
//!
//! # Panics
//!
//! Never on network or user input.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod cooldown;
pub mod future;
mod layer;
#[cfg(feature = "metrics")]
mod meter;
mod service;
pub mod store;

pub use config::{
    ConfigError, CooldownConfig, CooldownConfigBuilder, OnCooldown, DEFAULT_MAX_WAITERS,
    DEFAULT_MAX_WAITERS_PER_KEY,
};
pub use layer::{CoolingKey, GateStats, RetryAfterAwareLayer};
pub use service::RetryAfterAware;

/// Describes RetryAfterAware's metrics (units and help text) to the installed `metrics` recorder;
/// call it once after installing the recorder. Feature `metrics`; the metrics are listed
/// in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
