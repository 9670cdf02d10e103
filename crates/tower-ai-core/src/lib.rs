//! The shared vocabulary of tower-ai: what every layer agrees on.
//!
//! AI APIs fail in ways ordinary REST APIs do not: a 429 can mean "slow down" or "your
//! quota is gone" (never retry the second), overload is provider-wide, providers say
//! exactly when to come back (in headers with five different formats, or in the error
//! body), and a streamed answer can stall or carry an error inside a 200. This crate holds
//! the one reading of all that, so six layers agree on it and parse it once:
//!
//! - [`Provider`]: which dialect a request speaks, from its host, path and headers.
//! - [`ErrorKind`] and [`Classification`]: what a response or error *is* (retryable? a
//!   breaker failure? can another model help?), produced once per response by
//!   [`classify()`] and carried in the response's extensions by the [`Classify`] layer.
//! - [`RequestedWait`] and [`RateLimitInfo`]: `Retry-After` in all its forms,
//!   `retry-after-ms`, OpenAI's Go-duration `x-ratelimit-*`, Anthropic's RFC 3339
//!   `anthropic-ratelimit-*`, Gemini's `RetryInfo`, the IETF `RateLimit` fields; every
//!   wait validated and clamped to a configured maximum, with "asked for longer" reported.
//! - [`RequestMeta`] and [`Usage`]: model, stream flag, token estimate of a request, and
//!   the tokens a response used.
//! - [`AiBody`], [`ReplayBody`] and [`ClassifiedBody`]: the body types the layers share.
//! - [`sse`] and [`stream`]: an SSE push parser and a dialect-aware stream reader.
//! - [`keys`]: per-key state keys, with API keys hashed, never stored.
//! - [`AiError`]: the one error type, with every layer's refusal as a variant.
//! - [`Deadline`] and [`DeadlineLayer`]: the instant a request must be answered by,
//!   which every layer that waits honours.
//! - [`TelemetryLayer`]: one OpenTelemetry GenAI client span per logical call, and (with
//!   the `metrics` feature) the GenAI client metrics; see [`telemetry`].
//! - [`AttemptBudget`]: one cap on upstream calls per logical request, shared by
//!   ModelFallback and AiRetry through the request's extensions.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_ai_core::{classify, ClassifyConfig, ErrorKind, Provider};
//!
//! // OpenAI's "you are out of credits" is a 429, and retrying it is pointless.
//! let body = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
//! let verdict = classify(Provider::OpenAi, StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body, &ClassifyConfig::default());
//! assert_eq!(verdict.kind, Some(ErrorKind::QuotaExhausted));
//! assert!(!verdict.is_retryable());
//! assert!(ErrorKind::QuotaExhausted.is_fallback_trigger());
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod attempt;
mod body;
mod classify;
mod deadline;
pub mod duration;
mod error;
mod facts;
pub mod future;
pub mod keys;
mod kind;
mod layer;
mod meta;
#[cfg(feature = "metrics")]
pub mod meter;
pub mod overrides;
mod provider;
mod ratelimit;
pub mod respond;
mod service;
pub mod sse;
pub mod stream;
mod swar;
pub mod telemetry;

pub use attempt::AttemptBudget;
pub use body::{
    try_clone_request, AiBody, ClassifiedBody, ReplayBody, RetainedHead, RetainedRequest,
};
pub use classify::{classify, classify_at, Classification, ClassifyConfig, ProviderError};
pub use deadline::{parse_grpc_timeout, Deadline, DeadlineLayer, SetDeadline, MAX_HEADER_TIMEOUT};
pub use error::{
    redact_secrets, redacted_chain, AiError, BoxError, BudgetLimit, RedactedError, RouteFailure,
    StallPhase, REDACTED,
};
pub use kind::ErrorKind;
pub use layer::ClassifyLayer;
pub use meta::{
    check_model, model_of, model_path_span, top_level_bool, top_level_string, top_level_value_span,
    RequestMeta, Usage,
};
pub use provider::Provider;
pub use ratelimit::{response_clock, Bucket, RateLimitInfo, RequestedWait, WaitSource};
pub use respond::{error_response, ErrorDialect, ErrorReply};
pub use service::Classify;
pub use telemetry::{Telemetry, TelemetryLayer};
