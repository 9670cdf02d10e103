//! A simulated AI provider that speaks the OpenAI, Anthropic and Gemini
//! dialects and misbehaves on cue.
//!
//! # Why
//!
//! The tower-ai layers exist because real model APIs fail in particular
//! ways: 429s that say exactly when to come back, quota 429s that must never
//! be retried, 529/503 overload, streams that stall or die half-way. Testing
//! those layers against a mock that returns a bare status proves little; this
//! simulator answers with the providers' real wire shapes (status codes, error
//! bodies, rate-limit headers, SSE framing, usage) from its own templates,
//! following a scripted [`Scenario`]. It shares no code with tower-ai-core's
//! classifier, so a parsing bug there cannot hide behind the same bug here.
//!
//! # Two ways to use it
//!
//! - In process: [`Simulator::service`] is a `tower::Service<http::Request<B>>`
//!   for any `http_body::Body<Data = Bytes>`. Everything runs on `tokio`'s
//!   clock, so a scenario on a paused clock (`#[tokio::test(start_paused = true)]`)
//!   is deterministic and minutes of provider time cost milliseconds.
//! - Over the wire: [`Simulator::serve`] runs a hyper 1 HTTP/1.1 server on a
//!   loopback port for real clients, SDKs and curl (see `examples/serve.rs`).
//!
//! ```
//! use std::time::Duration;
//! use http_body_util::Full;
//! use tower::ServiceExt;
//! use tower_ai_sim::{Fault, Latency, ModelSpec, Scenario, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let sim = Simulator::new(
//!     Scenario::builder()
//!         .seed(42)
//!         .model(ModelSpec::new("claude-sonnet").completion_tokens(20))
//!         .rpm_limit(2)
//!         .fault(Fault::status(529).between(Duration::from_secs(60), Duration::from_secs(70)))
//!         .latency(Latency::fixed(Duration::from_millis(800)))
//!         .build()?,
//! );
//! let body = r#"{"model":"claude-sonnet","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let call = || {
//!     let req = http::Request::post("/v1/messages").body(Full::new(body.into())).unwrap();
//!     sim.service().oneshot(req)
//! };
//! assert_eq!(call().await?.status(), 200);
//! assert_eq!(call().await?.status(), 200);
//! let limited = call().await?;              // the third request in the first minute
//! assert_eq!(limited.status(), 429);
//! // 1.6 s into the window: 58.4 s left, rounded up
//! assert_eq!(limited.headers()["retry-after"], "59");
//! tokio::time::sleep(Duration::from_secs(60)).await;
//! assert_eq!(call().await?.status(), 529);   // the scripted burst, in the next window
//! assert_eq!(sim.stats().count(429), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Dialects
//!
//! The dialect follows the path, as on the real services (see [`Dialect`]):
//! `POST /v1/chat/completions` (OpenAI), `POST /openai/deployments/{name}/chat/completions`
//! (Azure OpenAI), `POST /v1/messages` (Anthropic),
//! `POST /v1beta/models/{model}:generateContent` and
//! `…:streamGenerateContent?alt=sse` (Gemini). The model comes from the body's
//! `model` (OpenAI, Anthropic), the deployment name (Azure) or the path
//! (Gemini). An unknown path gets a 404, a wrong method a 405, a body that is
//! not a JSON object (or lacks a model) a 400 `invalid_request_error` /
//! `INVALID_ARGUMENT`, a body over the size limit a 413 — in the dialect's
//! shape, never a panic.
//!
//! What each answer looks like:
//!
//! | | OpenAI / Azure | Anthropic | Gemini |
//! |---|---|---|---|
//! | JSON success | `chat.completion`, `usage.prompt_tokens/completion_tokens/total_tokens` | `message`, `usage.input_tokens/output_tokens` | `candidates`, `usageMetadata.promptTokenCount/candidatesTokenCount/totalTokenCount` |
//! | stream | `data:` chunks, finish chunk, usage chunk (`choices: []`) only with `stream_options.include_usage`, `data: [DONE]` | named events `message_start`, `content_block_start`, `ping`, `content_block_delta`×n, `content_block_stop`, `message_delta` (cumulative usage), `message_stop` | `data:` chunks framed with `\r\n\r\n`, no `[DONE]`, final `usageMetadata` and `finishReason` on the last chunk; without `alt=sse` a JSON array |
//! | truncated by max tokens | `finish_reason: "length"` | `stop_reason: "max_tokens"` | `finishReason: "MAX_TOKENS"` |
//! | rate limit 429 | `retry-after` (integer s), `x-ratelimit-*` (Go durations `6m0s`/`12ms`; Azure: plain seconds and `retry-after-ms`) | `rate_limit_error`, `retry-after`, `anthropic-ratelimit-*` (RFC 3339 resets), `x-should-retry: true` | `RESOURCE_EXHAUSTED` with `QuotaFailure` (`…PerMinute…`) and `RetryInfo.retryDelay` (`"26s"`), no header |
//! | quota 429 | `insufficient_quota` | `rate_limit_error` + `details.error_code: enforced_spend_limit_reached`, no `retry-after` | `…PerDay…` quota id |
//! | overload | 503 `service_unavailable_error`/`server_is_overloaded` | 529 `overloaded_error` | 503 `UNAVAILABLE` |
//! | context too long | 400 `context_length_exceeded` | 400 `invalid_request_error` "prompt is too long" | 400 `INVALID_ARGUMENT` |
//! | mid-stream error | `data: {"error":{…}}` | `event: error` `overloaded_error` | `data: {"error":{…}}` |
//!
//! # How a request is judged
//!
//! In this order; the first rule that applies answers:
//!
//! 1. unknown path → 404, wrong method → 405, body over the size limit → 413,
//!    malformed body → 400 (these are recorded but touch no limit);
//! 2. unknown model with [`ScenarioBuilder::strict_models`] → 404;
//! 3. quota used up ([`ScenarioBuilder::quota_exhausted_after`]) → quota 429;
//! 4. the model's outage window ([`ScenarioBuilder::outage`]) → overload error;
//! 5. prompt estimate over the context window → context-length 400;
//! 6. rate limits: over the request limit, or over the token limit, → 429
//!    (refused requests use no capacity; admitted ones do from here on);
//! 7. scripted [`Fault`]s, in order;
//! 8. success (200), shaped by the first [`StreamFault`] that fires for a stream.
//!
//! Rate windows are fixed, [`ScenarioBuilder::rate_window`] long (60 s),
//! aligned to the simulator's start. Rate-limit headers are sent with every
//! answer from step 4 on when a limit is configured, counting the request
//! itself; `retry-after` (and Gemini's `RetryInfo`) on a rate-limit 429 is the
//! time to the end of the window, in whole seconds rounded up.
//!
//! JSON is written with `serde_json`, so object keys come out in its order
//! (alphabetical unless a crate in the build enables `preserve_order`), not
//! in the providers' order; no JSON parser cares.
//!
//! # Token accounting
//!
//! The prompt estimate is `ceil(b / 4)`, at least 1, where `b` is the total
//! UTF-8 byte length of all text content: `messages[].content` (a string, or
//! the `text` of each part), `system`, `instructions`, Gemini
//! `contents[].parts[].text` and `systemInstruction.parts[].text`. Roles,
//! tool definitions and other fields do not count. The answer has the
//! model's `completion_tokens`, cut to `max_completion_tokens` / `max_tokens` /
//! `generationConfig.maxOutputTokens` when those are smaller (and then
//! reported as truncated). Token limits charge prompt + completion tokens.
//!
//! # Time and randomness
//!
//! All time is `tokio::time`; all randomness comes from one `fastrand::Rng`
//! seeded by [`ScenarioBuilder::seed`], inside a `std::sync::Mutex` that is
//! held only while a request is judged (never across an `.await`). A request
//! is judged at the instant `call` runs: that instant picks its rate window
//! and decides its faults. Given the same seed and the same order of calls, a
//! scenario gives the same answers.
//!
//! # What is not simulated
//!
//! Authentication (no key is checked; script a 401 with a [`Fault`] if
//! needed), tool calls, images and other content types, the OpenAI Responses
//! API, Bedrock, embeddings, real tokenizers (the estimate is bytes / 4),
//! per-second sub-limits, Anthropic's separate input/output token limits
//! (only the combined `anthropic-ratelimit-tokens-*` is sent), prompt caching,
//! content filtering, HTTP/2, TLS, and connection-level faults (resets,
//! refused connections).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod accounting;
mod body;
mod dialect;
mod engine;
mod scenario;
mod scenario_file;
mod server;
mod service;
pub mod testing;

pub use accounting::{digest, CallRecord, Outcome, Stats, StreamFaultKind};
pub use body::{SimBody, SimBodyError};
pub use dialect::Dialect;
pub use scenario::{
    Fault, Latency, ModelSpec, Scenario, ScenarioBuilder, ScenarioError, StreamFault,
    DEFAULT_COMPLETION_TOKENS, DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_BODY_BYTES, DEFAULT_RATE_WINDOW,
    DEFAULT_STALL_DURATION, MAX_MODEL_NAME_BYTES,
};
pub use server::{SimServer, DEFAULT_SHUTDOWN_GRACE};
pub use service::{BoxError, ResponseFuture, SimService, Simulator};
