//! Shared by `overhead.rs` (timing) and `allocations.rs` (heap allocations per call): the
//! in-memory provider, the request, one call, and every stack that is measured.
//!
//! Each variant is a *maker*: a closure that hands out a service. The makers of stacks
//! whose state is shared (all of tower-ai's layers, tower-resilience's) return clones of one
//! service, so two threads contend on the same breaker, budget and cooldown state; tower's
//! `RateLimit` is not `Clone`, so its maker builds one per thread from a shared layer (its
//! `TpsBudget` is still shared through the retry policy's `Arc`).
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    missing_debug_implementations
)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceBuilder};
use tower_ai::prelude::*;
use tower_ai_core::try_clone_request;

/// A small OpenAI chat completion request.
pub const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":64}"#;

/// A small OpenAI chat completion answer.
pub const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;

/// The response body of the in-memory provider.
pub type Body = Full<Bytes>;

/// The in-memory provider: always ready, answers 200 with [`ANSWER`] at once.
#[derive(Debug, Clone, Copy)]
pub struct Bare;

impl Service<Request<AiBody>> for Bare {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        drop(black_box(req));
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(ANSWER)))))
    }
}

/// The request of every variant: POST to OpenAI with two headers and [`BODY`].
pub fn request() -> Request<AiBody> {
    Request::builder()
        .method(Method::POST)
        .uri(Uri::from_static(
            "https://api.openai.com/v1/chat/completions",
        ))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(AiBody::from(BODY))
        .expect("a valid request")
}

/// One call: `poll_ready`, `call`, poll the future to its end (every variant answers on
/// the first poll except tower-resilience's circuit breaker, whose tokio `Mutex` can make
/// it wait while the other thread holds it: then it is polled again, as a runtime would
/// once woken), drop the response and its body.
#[inline]
pub fn once<S>(svc: &mut S, cx: &mut Context<'_>, req: Request<AiBody>)
where
    S: Service<Request<AiBody>>,
    S::Error: std::fmt::Debug,
{
    loop {
        match svc.poll_ready(cx) {
            Poll::Ready(r) => break r.expect("the bench stacks are always ready"),
            Poll::Pending => std::hint::spin_loop(),
        }
    }
    let mut fut = pin!(svc.call(req));
    loop {
        match fut.as_mut().poll(cx) {
            Poll::Ready(r) => {
                drop(black_box(r.expect("the bench provider does not fail")));
                return;
            }
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// A runtime for the layers' timers to register with (nothing ever waits on them on the
/// happy path, but `tokio::time::sleep` and tower's `RateLimit` need a timer to exist).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime")
}

/// Waker for the manual polls.
pub fn noop_cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

// ---------------------------------------------------------------------------------------
// tower-ai

/// Limits far above anything a bench reaches.
const HUGE: u64 = 1 << 50;

pub fn ai_retry() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    AiRetryLayer::new(3).layer(Bare)
}

pub fn retry_after() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    RetryAfterAwareLayer::new().layer(Bare)
}

pub fn circuit_breaker() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    CircuitBreakerLayer::new().layer(Bare)
}

pub fn token_budget() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    TokenBudgetLayer::new(HUGE, HUGE).layer(Bare)
}

pub fn model_fallback() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    ModelFallbackLayer::models(["gpt-4o-mini"])
        .expect("a valid chain")
        .layer(Bare)
}

pub fn stall_detector() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    StallDetectorLayer::new().layer(Bare)
}

pub fn classify() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    ClassifyLayer::new().layer(Bare)
}

/// `AiStack::new()`: retry, breaker, cooldown gate, stall detector, classify.
pub fn ai_stack_default() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    ServiceBuilder::new().ai_stack(AiStack::new()).service(Bare)
}

/// The full six-layer stack (+ Classify): `AiStack` with a budget and a fallback chain.
pub fn ai_stack_full() -> impl Service<Request<AiBody>, Error = BoxError> + Clone + Send {
    let stack = AiStack::new()
        .budget(TokenBudgetLayer::new(HUGE, HUGE))
        .fallback(ModelFallbackLayer::models(["gpt-4o-mini"]).expect("a valid chain"));
    ServiceBuilder::new().ai_stack(stack).service(Bare)
}

// ---------------------------------------------------------------------------------------
// tower: RateLimit → Retry (TpsBudget) → Timeout, the order `ServiceBuilder` needs
// (`Retry` clones its inner service and `RateLimit` is not `Clone`).

/// tower's Retry policy: retry 429 and 5xx, funded by a shared `TpsBudget`.
#[derive(Clone)]
pub struct TowerPolicy(pub Arc<TpsBudget>);

impl<B> tower::retry::Policy<Request<AiBody>, Response<B>, BoxError> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _: &mut Request<AiBody>,
        r: &mut Result<Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        match r {
            Ok(res) if !(res.status() == 429 || res.status().is_server_error()) => {
                self.0.deposit();
                None
            }
            _ => self
                .0
                .withdraw()
                .then(|| tokio::time::sleep(Duration::from_millis(500))),
        }
    }

    fn clone_request(&mut self, req: &Request<AiBody>) -> Option<Request<AiBody>> {
        try_clone_request(req)
    }
}

/// The layer of tower's stack (shared by every service made from it).
pub fn tower_layer() -> impl Layer<
    Bare,
    Service: Service<Request<AiBody>, Response = Response<Body>, Error = BoxError> + Send,
> + Clone
       + Send
       + Sync {
    ServiceBuilder::new()
        .rate_limit(HUGE, Duration::from_secs(1))
        .retry(TowerPolicy(Arc::new(TpsBudget::new(
            Duration::from_secs(10),
            10,
            0.2,
        ))))
        .timeout(Duration::from_secs(60))
}

// ---------------------------------------------------------------------------------------
// tower-resilience: retry → circuit breaker → rate limiter (its retry needs a `Clone`
// request, so the request travels as `Replayable` between two `map_request`s).

/// A request whose clone replays its body (what tower-resilience's retry needs).
pub struct Replayable(pub Request<AiBody>);

impl Clone for Replayable {
    fn clone(&self) -> Self {
        Replayable(try_clone_request(&self.0).expect("an in-memory body"))
    }
}

/// tower-resilience's three-layer stack, configured to look at statuses as ours do:
/// retry 429/5xx responses (3 attempts, exponential backoff), count 5xx as breaker
/// failures, and a rate limit far away.
pub fn tower_resilience(
) -> impl Service<Request<AiBody>, Response = Response<Body>, Error: std::fmt::Debug> + Clone + Send
{
    use tower_resilience::circuitbreaker::CircuitBreakerLayer as TrCircuitBreaker;
    use tower_resilience::ratelimiter::RateLimiterLayer;

    let unwrap = tower::util::MapRequestLayer::new(|r: Replayable| r.0);
    let limiter = RateLimiterLayer::builder()
        .limit_for_period(1 << 40)
        .refresh_period(Duration::from_secs(1))
        .build()
        .expect("a valid rate limiter");
    let breaker = TrCircuitBreaker::builder()
        .failure_classifier(|r: &Result<Response<Body>, _>| match r {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        })
        .build()
        .expect("a valid breaker");
    let inner = breaker.layer(limiter.layer(unwrap.layer(Bare)));
    let svc = tower_resilience_retry(inner);
    tower::util::MapRequestLayer::new(Replayable).layer(svc)
}

/// tower-resilience's retry over `inner` (a function, so the error type is inferred).
fn tower_resilience_retry<S>(
    inner: S,
) -> tower_resilience::retry::Retry<S, Replayable, Response<Body>, S::Error>
where
    S: Service<Replayable, Response = Response<Body>>,
{
    tower_resilience::retry::RetryLayer::<Replayable, Response<Body>, S::Error>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(500))
        .retry_on_response(|res: &Response<Body>| {
            res.status() == 429 || res.status().is_server_error()
        })
        .build()
        .layer(inner)
}
