//! ModelFallback: a chain of models and providers, chosen by the kind of failure.
//!
//! # Why AI calls need it
//!
//! When a model is overloaded (Anthropic 529, OpenAI 503), out of quota, or its context
//! window is too small for the prompt, waiting does not help: *another* model or provider
//! does. Which one depends on the failure: an overload or a quota error moves on to the
//! next route, a context-length error to a model with a larger window, a content filter
//! to a route with another policy, and a 401 to nothing at all (it fails the same way
//! everywhere). [`ModelFallback`] sends a request down an ordered [`FallbackChain`] of
//! [`Route`]s and decides at each failure, from the [`Classification`] the layers below
//! attached (or from the [`AiError`] they returned), whether and where to go next.
//!
//! - **Routes.** [`Route::primary`] (the wrapped service, request as sent),
//!   [`Route::model`] (the wrapped service, the model rewritten where the provider reads
//!   it: the body's top-level `"model"` value with every other byte kept, and the path's
//!   model segment for Gemini and Azure OpenAI deployments), [`Route::service`] (another provider, with an
//!   optional [`rewrite`](Route::rewrite) of URL, headers and body), and
//!   [`Route::degraded`] / [`Route::degraded_static`] (an answer made without a call,
//!   marked degraded).
//! - **Triggers** per [`ErrorKind`] ([`default_action`], changed with
//!   [`FallbackChainBuilder::on`]): Overloaded, ServerError, Timeout, Connection,
//!   Stalled (before the response is handed over), QuotaExhausted, RateLimited,
//!   NotFound and RequestTooLarge → [`Action::Next`]; ContextLengthExceeded →
//!   [`Action::LargerContext`] (per-route [`context_window`](Route::context_window));
//!   ContentFiltered → [`Action::ContentPolicy`] ([`content_policy`](Route::content_policy)
//!   routes); Unauthorized, Forbidden, BadRequest, Unknown → [`Action::Stop`].
//! - **Quota is per account**: a quota or billing failure (OpenAI `insufficient_quota`,
//!   Anthropic's spend-limit 429 or `billing_error`) skips later routes on the same
//!   [`account`](Route::account) (by default `primary` and `model` routes share the
//!   wrapped service's, each `service` route has its own), and when none on another
//!   account is left it reaches the caller as it is, not as another model's answer.
//! - **No waiting on a route that asked for too long**: a wait over the maximum
//!   (`RequestedWait::exceeds_max`, on the response or in
//!   `AiError::RetriesExhausted { wait }`) moves on at once; so do `AiError::CircuitOpen`
//!   and `AiError::CoolingDown` from a layer below (nothing was sent, no time spent). A
//!   route's [`skip_if`](Route::skip_if) predicate (a breaker handle) skips it without a
//!   call.
//! - **Near the deadline** (the request's [`Deadline`](tower_ai_core::Deadline)): a later
//!   route that calls a provider is not started once the deadline leaves less than
//!   [`min_route_time`](FallbackChainBuilder::min_route_time) (default: once it has
//!   passed); a degraded route still answers. Waits below that would pass the deadline
//!   are refused at once by the layers that would wait (TokenBudget by its predicted
//!   start, RetryAfterAware by the cooldown's end, AiRetry by its next wait), so the
//!   chain moves on instead of waiting.
//! - **One attempt budget** per request across the chain, retries included
//!   ([`AttemptBudget`], in the extensions of each request sent, for AiRetry to draw from).
//! - **Reports what served**: [`Served`] in the response extensions (and optionally a
//!   header, [`FallbackChainBuilder::served_header`]); on total failure
//!   [`AiError::AllRoutesFailed`] with each tried route's last [`RouteFailure`].
//! - **The caller's request is never changed for later routes**: it is kept whole and
//!   cloned per attempt ([`try_clone_request`](tower_ai_core::try_clone_request); with an
//!   `AiBody` the body bytes are shared, not copied). A body that cannot be replayed is
//!   sent once, on the first route.
//! - **Streams**: the decision is made on the response head (and on errors returned
//!   before it); once a response is handed to the caller it is theirs, so a stream never
//!   falls back half-way.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ai_core::{AiBody, ClassifiedBody, ClassifyLayer, ReplayBody};
//! use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route, Served};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_ai_core::BoxError> {
//! // A gateway on which "big" is overloaded and "small" answers.
//! let gateway = service_fn(|req: Request<AiBody>| async move {
//!     let overloaded = req.body().bytes().unwrap().windows(5).any(|w| w == b"\"big\"");
//!     let status = if overloaded { 503 } else { 200 };
//!     Response::builder().status(status).body(Full::new(Bytes::from_static(b"{}")))
//! });
//!
//! let chain = FallbackChain::<AiBody, ClassifiedBody<Full<Bytes>>>::builder()
//!     .route(Route::primary("big"))
//!     .route(Route::model("small"))
//!     .route(Route::degraded_static("busy", StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"busy"}"#))
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(ModelFallbackLayer::new(chain.clone()))
//!     .layer(ClassifyLayer::new())
//!     .service(gateway);
//!
//! let req = Request::post("https://gateway.example/v1/chat/completions")
//!     .body(AiBody::from(r#"{"model":"big","messages":[{"role":"user","content":"Hi"}]}"#))?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! let served = Served::get(&res).unwrap();
//! assert_eq!((&*served.route, served.model.as_deref()), ("small", Some("small")));
//! assert_eq!(&*chain.served(&res).route, "small");
//! # Ok(())
//! # }
//! ```
//!
//! # Its place in the stack
//!
//! Outermost: `ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware
//! → StallDetector → Classify → client`. Fallback sees a route's final verdict, after
//! retries on that route; the breaker below it refuses a route that is down with
//! `CircuitOpen`, which moves on at once. A cross-provider route's service should carry
//! its own stack (retry, breaker, classify) for its provider.
//!
//! Give a route the breaker's handle so an open route is not even called (a skipped
//! route costs no attempt and no time):
//!
//! ```
//! use http::{Request, Response};
//! use tower_ai_circuit_breaker::CircuitBreakerLayer;
//! use tower_ai_core::AiBody;
//! use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let breaker = CircuitBreakerLayer::new();
//! let handle = breaker.handle();
//! let chain: FallbackChain<AiBody, Response<String>> = FallbackChain::builder()
//!     .route(Route::primary("gpt-4o").skip_if(move |req: &Request<AiBody>| handle.is_open_for(req)))
//!     .route(Route::model("gpt-4o-mini"))
//!     .build()?;
//! let fallback = ModelFallbackLayer::new(chain);
//! // ServiceBuilder::new().layer(fallback).layer(retry).layer(breaker)…
//! # let _ = (fallback, breaker);
//! # Ok(())
//! # }
//! ```
//!
//! # Cost
//!
//! The first route's call is made in `call` on the service `poll_ready` made ready, and
//! its future is held inline (no box). A response served by the first route is returned
//! untouched (no [`Served`] inserted unless [`mark_primary`](FallbackChainBuilder::mark_primary)).
//! What the happy path pays for: one copy of the request kept for later routes (an
//! `AiBody`'s bytes are reference-counted; the stack's own extensions are kept beside
//! it) and, when the budget is shared with the layers below, the budget's `Arc` and its
//! extension entry. The copy's head (method, URI, headers, their values copied in) is in
//! an `Arc` that is offered with every request sent
//! ([`RetainedHead::offer`](tower_ai_core::RetainedHead::offer)): AiRetry below shares it
//! instead of copying the request's head again when the request it gets still has it.
//! Measured (`benches/allocations.rs`, a request with two headers): 1 allocation for the
//! copy (that `Arc`), 4 for the shared budget
//! ([`share_budget(false)`](FallbackChainBuilder::share_budget) when no retry layer below
//! reads it), 1 more for a first route that rewrites the model. A one-route chain keeps
//! no copy.
//! Later routes on the wrapped service go through [`tower::util::Oneshot`]; cross-provider
//! routes are [`tower::util::BoxCloneSyncService`]s (boxed future).
//!
//! # Differences from LiteLLM's fallbacks and tower-resilience
//!
//! - LiteLLM keeps separate lists (`fallbacks`, `context_window_fallbacks`,
//!   `content_policy_fallbacks`); here one ordered chain, with context windows and a
//!   content-policy flag per route, covers the three.
//! - tower-resilience has no model fallback; its `fallback` pattern replaces an error with
//!   a value. Here a failure is judged by kind, retries on a route stay in AiRetry, and
//!   the total number of upstream calls is capped across both.
//! - Failures are read from `Classification` (a provider's error *response* is a failure
//!   although the inner service returned `Ok`).
//!
//! # Errors
//!
//! The service's error is [`BoxError`](tower_ai_core::BoxError). A failure that does not
//! call for a fallback (a 401, say) reaches the caller as it is: a response, or the inner
//! error; so does a failure that called for a fallback no route can take (no larger
//! model, no content-policy route) when it is the first route's. Once the chain has moved
//! on, a request that no remaining route serves (or whose attempt budget is spent) fails
//! with [`AiError::AllRoutesFailed`] (unless
//! [`return_last`](FallbackChainBuilder::return_last)); its `failures` list each route
//! tried or skipped, in order, with its last classification and message.
//!
//! [`Classification`]: tower_ai_core::Classification
//! [`AiError`]: tower_ai_core::AiError
//! [`AiError::AllRoutesFailed`]: tower_ai_core::AiError::AllRoutesFailed
//! [`ErrorKind`]: tower_ai_core::ErrorKind
//! [`RouteFailure`]: tower_ai_core::RouteFailure
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod fallback;
pub mod future;
mod layer;
#[cfg(feature = "metrics")]
mod meter;
mod rewrite;
mod service;

pub use config::{
    default_action, Action, ConfigError, DegradedBody, FallbackChain, FallbackChainBuilder, Route,
    RouteService,
};
pub use fallback::Served;
pub use layer::ModelFallbackLayer;
pub use rewrite::rewrite_model;
pub use service::ModelFallback;
pub use tower_ai_core::AttemptBudget;

/// Describes ModelFallback's metrics (units and help text) to the installed `metrics` recorder;
/// call it once after installing the recorder. Feature `metrics`; the metrics are listed
/// in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
