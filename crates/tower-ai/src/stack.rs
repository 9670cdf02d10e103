//! [`AiStack`]: the recommended order of every layer, in one call.

use std::time::Duration;
use tower_ai_circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer};

use tower_ai_core::{Classify, ClassifyConfig, ClassifyLayer, SetDeadline, TelemetryLayer};
use tower_ai_retry::{AiRetry, AiRetryLayer};
use tower_ai_retry_after::RetryAfterAwareLayer;
use tower_ai_stall::{StallDetector, StallDetectorLayer};
use tower_layer::{Identity, Layer};

/// The whole tower-ai stack in the recommended order, as one [`Layer`]:
///
/// ```text
/// Telemetry → Deadline → ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware → StallDetector → Classify → client
/// ```
///
/// Telemetry's span covers the logical call (every attempt, wait and fallback below it is
/// its child, see [`TelemetryLayer`]); fallback sees a route's final verdict; retry repeats one route; the breaker fails fast
/// before a doomed call is budgeted; the budget and the cooldown gate hold requests that
/// would be rejected anyway; the stall detector and the classifier sit next to the wire.
///
/// [`AiStack::new`] gives every always-on layer its defaults: AiRetry with 3 attempts
/// (jittered exponential backoff, the provider's own wait honoured up to 60 s, a retry
/// budget), a per-model CircuitBreaker, a per-model RetryAfterAware gate, StallDetector's
/// streaming deadlines, and Classify. Each provider's dialect (OpenAI, Azure, Anthropic,
/// Gemini, OpenAI-compatible) is recognised per request, so the same defaults serve all.
/// Every call gets an end-to-end [`Deadline`](tower_ai_core::Deadline) of
/// [`AiStack::DEFAULT_DEADLINE`] (10 minutes, the official OpenAI SDKs' default timeout),
/// or less when the caller asked for less (a `Deadline` in the request's extensions, a
/// `grpc-timeout`, `x-stainless-timeout` or `x-stainless-read-timeout` header): no layer
/// waits past it, so a provider that never answers costs the caller 10 minutes, not three
/// attempts of StallDetector's 20-minute total. Change it with
/// [`deadline`](AiStack::deadline), remove it with [`no_deadline`](AiStack::no_deadline).
/// TokenBudget and ModelFallback need facts only you have (your limits, your chain of
/// models), so they join with [`budget`](AiStack::budget) and
/// [`fallback`](AiStack::fallback); until then they are [`Identity`] and cost nothing.
///
/// State (breaker windows, cooldowns, retry and token budgets) lives in the layers, so
/// every service made from one `AiStack` (and from its clones) shares it: one provider
/// account, one view of its limits.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use http_body_util::{BodyExt, Full};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_ai::prelude::*;
/// use tower_ai_sim::{ModelSpec, Scenario, Simulator};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), BoxError> {
/// // A provider whose main model is down for the first minute.
/// let sim = Simulator::new(
///     Scenario::builder()
///         .model(ModelSpec::new("gpt-4o"))
///         .model(ModelSpec::new("gpt-4o-mini"))
///         .outage("gpt-4o", Duration::ZERO, Duration::from_secs(60))
///         .build()?,
/// );
/// let stack = AiStack::new()
///     .budget(TokenBudgetLayer::new(500, 200_000))
///     // The request as sent, then the same request for a smaller model.
///     .fallback(ModelFallbackLayer::models(["gpt-4o-mini"])?);
/// let client = ServiceBuilder::new().layer(stack).service(sim.service());
///
/// let req = Request::post("/v1/chat/completions")
///     .body(AiBody::from(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#))?;
/// let res = client.oneshot(req).await?;
/// assert_eq!(res.status(), 200);
/// // AiRetry sent gpt-4o its 3 attempts (503 each time), then ModelFallback asked
/// // gpt-4o-mini once. (With the two layers the other way round, a fallback inside each
/// // retry, the calls would read gpt-4o, gpt-4o-mini.)
/// let models: Vec<_> = sim.calls().into_iter().filter_map(|c| c.model).collect();
/// assert_eq!(models, ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini"]);
/// let answer = res.into_body().collect().await?.to_bytes();
/// assert!(!answer.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AiStack<
    F = Identity,
    B = Identity,
    CB = CircuitBreakerLayer,
    RA = RetryAfterAwareLayer,
    T = TelemetryLayer,
> {
    telemetry: T,
    deadline: Option<Duration>,
    fallback: F,
    retry: AiRetryLayer,
    breaker: CB,
    budget: B,
    cooldown: RA,
    stall: StallDetectorLayer,
    classify: ClassifyLayer,
}

impl AiStack {
    /// The end-to-end deadline of every call through the default stack: 10 minutes.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

    /// The stack with its defaults (see the type's docs).
    pub fn new() -> Self {
        AiStack {
            telemetry: TelemetryLayer::new(),
            deadline: Some(AiStack::DEFAULT_DEADLINE),
            fallback: Identity::new(),
            retry: AiRetryLayer::new(3),
            breaker: CircuitBreakerLayer::new(),
            budget: Identity::new(),
            cooldown: RetryAfterAwareLayer::new(),
            stall: StallDetectorLayer::new(),
            classify: ClassifyLayer::new(),
        }
    }
}

impl AiStack {
    /// The default stack with its randomness (AiRetry's jitter and idempotency keys,
    /// RetryAfterAware's release spread) drawn from `seed`: the same traffic on a paused
    /// clock gives the same outcome on every run, which is what tests and reproducible
    /// benchmarks want. Production stacks should use [`AiStack::new`], seeded from entropy.
    ///
    /// ```
    /// use tower_ai::AiStack;
    /// let stack = AiStack::seeded(7);
    /// # let _ = stack;
    /// ```
    pub fn seeded(seed: u64) -> Self {
        AiStack {
            retry: AiRetryLayer::builder()
                .seed(seed)
                .build()
                .expect("the default retry configuration is valid"),
            cooldown: RetryAfterAwareLayer::builder()
                .seed(seed)
                .build()
                .expect("the default cooldown configuration is valid"),
            ..AiStack::new()
        }
    }
}

impl Default for AiStack {
    fn default() -> Self {
        AiStack::new()
    }
}

impl<F, B, CB, RA, T> AiStack<F, B, CB, RA, T> {
    /// Gives every call at most `timeout` end to end (instead of
    /// [`AiStack::DEFAULT_DEADLINE`]); a caller's shorter deadline still wins. See
    /// [`DeadlineLayer`](tower_ai_core::DeadlineLayer).
    pub fn deadline(mut self, timeout: Duration) -> Self {
        self.deadline = Some(timeout);
        self
    }

    /// Sets no deadline: calls are bounded only by each layer's own limits (and by a
    /// `Deadline` the caller put in the request's extensions). Timeout headers are then
    /// not read.
    pub fn no_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Uses `telemetry` (another answer-body bound) instead of the default
    /// [`TelemetryLayer`].
    pub fn telemetry(self, telemetry: TelemetryLayer) -> AiStack<F, B, CB, RA, TelemetryLayer> {
        self.with_telemetry(telemetry)
    }

    /// Leaves the [`TelemetryLayer`] out: no GenAI span or metric for the calls through
    /// this stack. For a stack inside another one's span (an `AiStack` serving as a
    /// fallback route of another `AiStack`, whose span already covers the call), and for
    /// a response body of the same type as the stack's without telemetry.
    pub fn no_telemetry(self) -> AiStack<F, B, CB, RA, Identity> {
        self.with_telemetry(Identity::new())
    }

    fn with_telemetry<T2>(self, telemetry: T2) -> AiStack<F, B, CB, RA, T2> {
        AiStack {
            telemetry,
            deadline: self.deadline,
            fallback: self.fallback,
            retry: self.retry,
            breaker: self.breaker,
            budget: self.budget,
            cooldown: self.cooldown,
            stall: self.stall,
            classify: self.classify,
        }
    }

    /// Uses `retry` instead of the default AiRetry.
    pub fn retry(mut self, retry: AiRetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// Uses `stall` instead of the default StallDetector.
    pub fn stall(mut self, stall: StallDetectorLayer) -> Self {
        self.stall = stall;
        self
    }

    /// Classifies with `config` (the longest provider wait accepted, the error-body bound).
    pub fn classify(mut self, config: ClassifyConfig) -> Self {
        self.classify = ClassifyLayer::with_config(config);
        self
    }

    /// Uses `breaker` (any key function, any listener) instead of the default
    /// per-model CircuitBreaker.
    pub fn circuit_breaker<CB2>(self, breaker: CB2) -> AiStack<F, B, CB2, RA, T> {
        AiStack {
            telemetry: self.telemetry,
            deadline: self.deadline,
            fallback: self.fallback,
            retry: self.retry,
            breaker,
            budget: self.budget,
            cooldown: self.cooldown,
            stall: self.stall,
            classify: self.classify,
        }
    }

    /// Uses `cooldown` (another key function, fail-fast) instead of the default
    /// per-model RetryAfterAware gate.
    pub fn retry_after<RA2>(self, cooldown: RA2) -> AiStack<F, B, CB, RA2, T> {
        AiStack {
            telemetry: self.telemetry,
            deadline: self.deadline,
            fallback: self.fallback,
            retry: self.retry,
            breaker: self.breaker,
            budget: self.budget,
            cooldown,
            stall: self.stall,
            classify: self.classify,
        }
    }

    /// Adds a budget (a `TokenBudgetLayer`) between the breaker and the cooldown gate.
    pub fn budget<B2>(self, budget: B2) -> AiStack<F, B2, CB, RA, T> {
        AiStack {
            telemetry: self.telemetry,
            deadline: self.deadline,
            fallback: self.fallback,
            retry: self.retry,
            breaker: self.breaker,
            budget,
            cooldown: self.cooldown,
            stall: self.stall,
            classify: self.classify,
        }
    }

    /// Adds a fallback chain (a `ModelFallbackLayer`) outside everything else.
    pub fn fallback<F2>(self, fallback: F2) -> AiStack<F2, B, CB, RA, T> {
        AiStack {
            telemetry: self.telemetry,
            deadline: self.deadline,
            fallback,
            retry: self.retry,
            breaker: self.breaker,
            budget: self.budget,
            cooldown: self.cooldown,
            stall: self.stall,
            classify: self.classify,
        }
    }
}

impl<F, B, K, L, RA, T> AiStack<F, B, CircuitBreakerLayer<K, L>, RA, T> {
    /// A handle on the circuit breaker's state: read each key's state and metrics, force
    /// a circuit open or closed (and give ModelFallback a `skip_if` that avoids open
    /// routes without calling them).
    pub fn breaker_handle(&self) -> CircuitBreakerHandle<K> {
        self.breaker.handle()
    }
}

impl<S, F, B, CB, RA, T> Layer<S> for AiStack<F, B, CB, RA, T>
where
    RA: Layer<StallDetector<Classify<S>>>,
    B: Layer<RA::Service>,
    CB: Layer<B::Service>,
    F: Layer<AiRetry<CB::Service>>,
    T: Layer<SetDeadline<F::Service>>,
{
    type Service = T::Service;

    fn layer(&self, client: S) -> Self::Service {
        let s = self.classify.layer(client);
        let s = self.stall.layer(s);
        let s = self.cooldown.layer(s);
        let s = self.budget.layer(s);
        let s = self.breaker.layer(s);
        let s = self.retry.layer(s);
        let s = self.fallback.layer(s);
        let s = match self.deadline {
            Some(timeout) => SetDeadline::new(s, timeout),
            None => SetDeadline::off(s),
        };
        self.telemetry.layer(s)
    }
}
