//! Tower middleware that makes calls to AI model APIs survive the real world: rate
//! limits, exhausted quotas, overloaded providers, outages, slow and stalled streams, and
//! runaway spending.
//!
//! AI APIs fail in ways ordinary REST APIs do not. Calls take 1–120 s; limits count
//! requests *and tokens* per minute; providers say exactly when to come back (in five
//! header formats, or in the error body); a 429 can mean "slow down" or "your quota is
//! gone", and retrying the second never helps; overload (Anthropic 529, OpenAI and Gemini
//! 503) is provider-wide; a streamed answer can stall, carry an error inside a 200, or stop
//! half-way while looking complete. Each layer exists for one of those facts:
//!
//! | layer | decides | crate (feature) |
//! | --- | --- | --- |
//! | [`AiRetryLayer`] | whether and when to send the same request again | `tower-ai-retry` (`retry`) |
//! | [`RetryAfterAwareLayer`] | whether a request may go out now, given the cooldowns providers asked for | `tower-ai-retry-after` (`retry-after`) |
//! | [`CircuitBreakerLayer`] | whether a provider/model is healthy | `tower-ai-circuit-breaker` (`circuit-breaker`) |
//! | [`TokenBudgetLayer`] | whether a request fits requests/min, tokens/min, concurrency and spend caps | `tower-ai-budget` (`budget`) |
//! | [`ModelFallbackLayer`] | which model or provider serves the request | `tower-ai-fallback` (`fallback`) |
//! | [`StallDetectorLayer`] | whether a streamed answer is still alive | `tower-ai-stall` (`stall`) |
//! | [`ClassifyLayer`] | what each response *is*, read once for all the layers above | `tower-ai-core` |
//! | [`TelemetryLayer`] | nothing: one OpenTelemetry GenAI client span per logical call, and the GenAI client metrics (`metrics` feature) | `tower-ai-core` |
//!
//! [`AiStack`] puts them in the recommended order in one call; [`ServiceBuilderExt`] adds
//! them one by one by name. The `sim` feature re-exports the simulated provider
//! ([`sim`]) used by the tests, examples and benchmarks, for testing your own stacks.
//!
//! ```
//! use http::Request;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ai::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! # let client = tower_ai_sim::Simulator::new(tower_ai_sim::Scenario::builder().build()?).service();
//! // `client` is any `Service<http::Request<AiBody>>`: a hyper-util client, reqwest
//! // behind an adapter, or (here) the simulated provider.
//! let ai = ServiceBuilder::new().ai_stack(AiStack::new()).service(client);
//!
//! let req = Request::post("https://api.openai.com/v1/chat/completions")
//!     .header("authorization", "Bearer sk-...")
//!     .body(AiBody::from(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#))?;
//! let res = ai.oneshot(req).await?;
//! assert!(Classification::of(&res).is_success());
//! # Ok(())
//! # }
//! ```
//!
//! # Per-request overrides
//!
//! What a caller knows better than a layer's configuration goes in the request's
//! extensions: its [`Deadline`], StallDetector's deadlines for a long answer, AiRetry's
//! most attempts, the budget key. The types and which layer reads each are listed in one
//! place, [`overrides`].
//!
//! # Errors
//!
//! Every service returns `BoxError`, as tower's own middleware do. A provider's error
//! *response* (a 429 with its body) reaches the caller as a response, untouched, with its
//! [`Classification`] in the extensions; an [`AiError`] (downcast it, or use
//! [`AiError::find`]) says what happened when there is no response to give: a refusal
//! (`CircuitOpen`, `CoolingDown`, `BudgetExceeded`), a stall, a transport failure, every
//! route of a chain failing.
//!
//! # In a server
//!
//! A gateway answers its own callers from an `AiError` with [`ErrorReply`]: the status
//! (429 with `retry-after` for a budget or cooldown refusal, 503 for an open circuit, 504
//! for a stall, 502 for an upstream failure, …), a stable `code` and a message, in the
//! caller's [`ErrorDialect`] (OpenAI or Anthropic). The `axum` feature implements
//! `IntoResponse` for `AiError`; the `tonic` feature gives `From<AiError> for
//! tonic::Status` with `google.rpc.RetryInfo`. The table is in [`core::respond`].
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder_ext;
#[cfg(all(
    feature = "retry",
    feature = "retry-after",
    feature = "circuit-breaker",
    feature = "stall"
))]
mod stack;

pub use builder_ext::ServiceBuilderExt;
#[cfg(all(
    feature = "retry",
    feature = "retry-after",
    feature = "circuit-breaker",
    feature = "stall"
))]
pub use stack::AiStack;

/// The shared vocabulary: classification, rate-limit parsing, bodies, errors, SSE.
pub use tower_ai_core as core;
/// Per-request overrides through the request's extensions (the one list of them).
pub use tower_ai_core::overrides;
pub use tower_ai_core::{
    error_response, AiBody, AiError, BoxError, Classification, ClassifyConfig, ClassifyLayer,
    Deadline, DeadlineLayer, ErrorDialect, ErrorKind, ErrorReply, Provider, RequestMeta,
    TelemetryLayer, Usage,
};

/// One OpenTelemetry GenAI client span per logical call, and (with the `metrics` feature)
/// the GenAI client metrics: see [`TelemetryLayer`].
pub use tower_ai_core::telemetry;

/// AiRetry: backoff with jitter, only for what is worth retrying, inside a retry budget.
#[cfg(feature = "retry")]
pub use tower_ai_retry as retry;
#[cfg(feature = "retry")]
pub use tower_ai_retry::AiRetryLayer;

/// RetryAfterAware: per-key cooldowns learned from Retry-After and rate-limit headers.
#[cfg(feature = "retry-after")]
pub use tower_ai_retry_after as retry_after;
#[cfg(feature = "retry-after")]
pub use tower_ai_retry_after::RetryAfterAwareLayer;

/// CircuitBreaker: per-key closed/open/half-open.
#[cfg(feature = "circuit-breaker")]
pub use tower_ai_circuit_breaker as circuit_breaker;
#[cfg(feature = "circuit-breaker")]
pub use tower_ai_circuit_breaker::CircuitBreakerLayer;

/// TokenBudget: requests/min, tokens/min, concurrency and spend caps.
#[cfg(feature = "budget")]
pub use tower_ai_budget as budget;
#[cfg(feature = "budget")]
pub use tower_ai_budget::TokenBudgetLayer;

/// ModelFallback: a chain of models and providers, chosen by the kind of failure.
#[cfg(feature = "fallback")]
pub use tower_ai_fallback as fallback;
#[cfg(feature = "fallback")]
pub use tower_ai_fallback::ModelFallbackLayer;

/// StallDetector: deadlines on streamed answers.
#[cfg(feature = "stall")]
pub use tower_ai_stall as stall;
#[cfg(feature = "stall")]
pub use tower_ai_stall::StallDetectorLayer;

/// Shared state through Redis: limits, cooldowns and breakers across replicas.
#[cfg(feature = "redis")]
pub use tower_ai_redis as redis;

/// The simulated provider, for testing stacks.
#[cfg(feature = "sim")]
pub use tower_ai_sim as sim;

/// Describes the metrics of every enabled layer (units and help text) to the installed
/// `metrics` recorder: call it once, after installing the recorder. Feature `metrics`;
/// the metrics are listed in the README ("Metrics"), and
/// [`core::meter::WAIT_BUCKETS`] are the bucket boundaries recommended for their
/// histograms. It also turns on the GenAI client metrics of [`TelemetryLayer`]
/// (`telemetry::describe_metrics`), whose recommended buckets are
/// [`telemetry::BUCKETS`].
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    tower_ai_core::telemetry::describe_metrics();
    #[cfg(feature = "retry")]
    tower_ai_retry::describe_metrics();
    #[cfg(feature = "retry-after")]
    tower_ai_retry_after::describe_metrics();
    #[cfg(feature = "circuit-breaker")]
    tower_ai_circuit_breaker::describe_metrics();
    #[cfg(feature = "budget")]
    tower_ai_budget::describe_metrics();
    #[cfg(feature = "fallback")]
    tower_ai_fallback::describe_metrics();
    #[cfg(feature = "stall")]
    tower_ai_stall::describe_metrics();
}

/// Everything a stack needs, in one `use tower_ai::prelude::*;`.
pub mod prelude {
    pub use crate::ServiceBuilderExt;
    pub use tower_ai_core::{
        AiBody, AiError, BoxError, Classification, ClassifyLayer, Deadline, DeadlineLayer,
        ErrorKind, Provider, TelemetryLayer,
    };

    #[cfg(all(
        feature = "retry",
        feature = "retry-after",
        feature = "circuit-breaker",
        feature = "stall"
    ))]
    pub use crate::AiStack;
    #[cfg(feature = "budget")]
    pub use tower_ai_budget::TokenBudgetLayer;
    #[cfg(feature = "circuit-breaker")]
    pub use tower_ai_circuit_breaker::CircuitBreakerLayer;
    #[cfg(feature = "fallback")]
    pub use tower_ai_fallback::ModelFallbackLayer;
    #[cfg(feature = "retry")]
    pub use tower_ai_retry::AiRetryLayer;
    #[cfg(feature = "retry-after")]
    pub use tower_ai_retry_after::RetryAfterAwareLayer;
    #[cfg(feature = "stall")]
    pub use tower_ai_stall::StallDetectorLayer;
}
