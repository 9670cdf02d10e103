//! One OpenTelemetry GenAI client span per logical call, and the GenAI client metrics.
//!
//! [`TelemetryLayer`] sits outside every other layer (`AiStack` puts it outermost), so its
//! span covers the whole logical call: every attempt, wait and fallback below it happens
//! inside it, and the `tracing` events and spans the layers emit (AiRetry's `ai_retry`
//! span and its attempt events, a cooldown wait, a fallback to the next route) are its
//! children. The span follows the [OpenTelemetry GenAI span conventions]
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/>), read by
//! `tracing-opentelemetry` through its special `otel.*` fields:
//!
//! | field | value |
//! | --- | --- |
//! | `otel.name` | `{gen_ai.operation.name} {gen_ai.request.model}`, e.g. `chat gpt-4o` (the `tracing` name is `gen_ai.client`) |
//! | `otel.kind` | `client` |
//! | `otel.status_code` | `error` when the call failed |
//! | `gen_ai.operation.name` | `chat` (Chat Completions, Responses, Messages), `generate_content` (Gemini), `text_completion`, `embeddings` |
//! | `gen_ai.provider.name` | [`Provider::gen_ai_name`]: `openai`, `anthropic`, `gcp.gemini`, `azure.ai.openai`, `_OTHER` |
//! | `gen_ai.request.model`, `gen_ai.request.max_tokens`, `gen_ai.request.stream` | from the request ([`RequestMeta`], parsed once and left in the extensions for the layers below) |
//! | `gen_ai.response.id`, `gen_ai.response.model` | the answer's `id`/`model` (Gemini: `responseId`/`modelVersion`), for a stream from its first events |
//! | `gen_ai.response.finish_reasons` | the normalised [`FinishReason`] as a JSON array, e.g. `["stop"]` (a `tracing` field holds no array) |
//! | `gen_ai.response.time_to_first_chunk` | seconds from the call to the first chunk of a stream |
//! | `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` | the provider's own count ([`Usage`]) |
//! | `server.address`, `server.port` | the request URI's host and port (the scheme's when it has none) |
//! | `http.response.status_code` | the final response's status |
//! | `http.response.header.x-request-id`, `http.response.header.request-id` | the provider's request id (OpenAI and Azure send the first, Anthropic the second), on every response, success or not |
//! | `error.type` | see [`error_type`] |
//!
//! The span ends when the answer does: a non-streamed answer when its body has been read
//! (its usage is in it) or dropped, a stream at its end, when its usage and finish reason
//! are known. An error response (already read by [`Classify`](crate::Classify)) or an
//! error ends it at once.
//!
//! # Cost
//!
//! Nothing is read or allocated for a call no `tracing` subscriber wants the span of (the
//! span's `INFO` level and `tower_ai` target decide, as for any span); while no subscriber
//! enables `INFO` at all and no `log` logger takes `INFO` records, not even the span is
//! made (two loads decide, and the inner future is handed on as it is). With the GenAI
//! metrics on, any call costs one allocation, two clock reads, and a read of the
//! answer on the way (a bounded copy of a JSON answer of up to
//! [`TelemetryLayer::max_answer_body`] bytes, or a scan of each chunk of a stream that
//! keeps nothing), like TokenBudget's.
//!
//! # Metrics
//!
//! With the `metrics` cargo feature, the layer records the four GenAI client histograms of
//! the [OpenTelemetry GenAI metrics conventions]
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-metrics/>) through the
//! [`metrics`](https://docs.rs/metrics) facade, once `describe_metrics()` (in this
//! module with the feature) has been called: [`OPERATION_DURATION`], [`TOKEN_USAGE`], [`TIME_TO_FIRST_CHUNK`]
//! and [`TIME_PER_OUTPUT_CHUNK`], with the bucket boundaries the conventions recommend in
//! [`BUCKETS`] (the `metrics` facade has no buckets of its own: give them to your
//! exporter). Labels: `gen_ai.operation.name`, `gen_ai.provider.name`,
//! `gen_ai.request.model`, `gen_ai.response.model`, `server.address`, `server.port`, and
//! `error.type` on the duration of a failed call, `gen_ai.token.type` (`input`, `output`)
//! on the token usage. A model name or server address is a label only for the first
//! [`MAX_MODEL_LABELS`] / [`MAX_SERVER_LABELS`] distinct values the process sees; any
//! further one is recorded as `_OTHER`, so a caller sending a new model name with every
//! request cannot make the series grow without bound.
//!
//! ```
//! use http::Request;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ai_core::{AiBody, ClassifyLayer, TelemetryLayer};
//! use tower_ai_sim::{Scenario, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_ai_core::BoxError> {
//! let sim = Simulator::new(Scenario::builder().build()?);
//! let client = ServiceBuilder::new()
//!     .layer(TelemetryLayer::new())
//!     .layer(ClassifyLayer::new())
//!     .service(sim.service());
//! // With a subscriber that exports spans (tracing-opentelemetry, say), this call is one
//! // `chat gpt-4o` client span with the answer's id, model, finish reason and usage.
//! let req = Request::post("https://api.openai.com/v1/chat/completions")
//!     .body(AiBody::from(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#))?;
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use tracing::field::Empty;
use tracing::Span;

use crate::body::ReplayBody;
use crate::classify::Classification;
use crate::error::{AiError, BoxError};
use crate::keys::MAX_MODEL_LEN;
use crate::meta::{RequestMeta, Usage};
use crate::provider::Provider;
use crate::stream::{
    is_event_stream, response_identity, FinishReason, StreamDialect, StreamScanner,
};

/// The name of the request-duration histogram: seconds from the call to the end of its
/// answer (`s`).
pub const OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
/// The name of the token-usage histogram: the provider's input and output token counts
/// (`{token}`), labelled `gen_ai.token.type`.
pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";
/// The name of the time-to-first-chunk histogram of streamed answers (`s`).
pub const TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
/// The name of the time-per-output-chunk histogram of streamed answers: for each chunk
/// after the first, the time since the one before (`s`).
pub const TIME_PER_OUTPUT_CHUNK: &str = "gen_ai.client.operation.time_per_output_chunk";

/// The bucket boundaries the GenAI conventions recommend for the three time histograms
/// (seconds): 0.01 doubling to 81.92.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// The bucket boundaries the GenAI conventions recommend for token usage: 1 to 4^13.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// Each GenAI client histogram's name with its recommended buckets, for an exporter's
/// setup (with `metrics-exporter-prometheus`:
/// `builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets)` for each).
pub const BUCKETS: [(&str, &[f64]); 4] = [
    (OPERATION_DURATION, &DURATION_BUCKETS),
    (TOKEN_USAGE, &TOKEN_BUCKETS),
    (TIME_TO_FIRST_CHUNK, &DURATION_BUCKETS),
    (TIME_PER_OUTPUT_CHUNK, &DURATION_BUCKETS),
];
/// How many distinct model names (request and response models together) the metrics
/// label; later ones are labelled `_OTHER`.
pub const MAX_MODEL_LABELS: usize = 256;
/// How many distinct server addresses the metrics label; later ones are labelled `_OTHER`.
pub const MAX_SERVER_LABELS: usize = 64;

/// The default [`TelemetryLayer::max_answer_body`]: 1 MiB.
pub const DEFAULT_MAX_ANSWER_BODY: usize = 1024 * 1024;

/// The longest response id or model kept from an answer, in bytes.
const MAX_ID_LEN: usize = 256;

/// Applies [`Telemetry`]: one GenAI client span per call (see the [module docs](self)).
#[derive(Debug, Clone, Copy)]
pub struct TelemetryLayer {
    max_answer_body: usize,
}

impl Default for TelemetryLayer {
    fn default() -> Self {
        TelemetryLayer {
            max_answer_body: DEFAULT_MAX_ANSWER_BODY,
        }
    }
}

impl TelemetryLayer {
    /// The layer, reading at most [`DEFAULT_MAX_ANSWER_BODY`] bytes of a non-streamed
    /// answer for its usage, id and model.
    pub fn new() -> Self {
        TelemetryLayer::default()
    }

    /// Reads at most `bytes` of a non-streamed answer that arrives in several frames
    /// (kept until its end, then read); a longer answer's span has no usage, id or model
    /// from its body. An answer in one frame is read where it lies, up to the same bound.
    /// `0` reads no answer body.
    pub fn max_answer_body(mut self, bytes: usize) -> Self {
        self.max_answer_body = bytes;
        self
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Telemetry<S> {
        Telemetry {
            inner,
            max_answer_body: self.max_answer_body,
        }
    }
}

/// The service of [`TelemetryLayer`]: see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Telemetry<S> {
    inner: S,
    max_answer_body: usize,
}

impl<S> Telemetry<S> {
    /// Wraps `inner` with the default [`TelemetryLayer`].
    pub fn new(inner: S) -> Self {
        TelemetryLayer::new().layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The `gen_ai.operation.name` of a request to `path` of `provider`: `chat` for Chat
/// Completions, Responses and Messages, `generate_content` for Gemini's
/// `:generateContent`/`:streamGenerateContent`, `text_completion` for the legacy
/// `/completions`, `embeddings` for `/embeddings` and Gemini's `:embedContent`; any other
/// path is taken for `chat`, the operation tower-ai is made for.
///
/// ```
/// use tower_ai_core::{telemetry::operation_name, Provider};
/// assert_eq!(operation_name(Provider::OpenAi, "/v1/chat/completions"), "chat");
/// assert_eq!(operation_name(Provider::Gemini, "/v1beta/models/gemini-2.5-flash:streamGenerateContent"), "generate_content");
/// assert_eq!(operation_name(Provider::OpenAi, "/v1/embeddings"), "embeddings");
/// ```
pub fn operation_name(provider: Provider, path: &str) -> &'static str {
    if path.ends_with("/chat/completions")
        || path.ends_with("/responses")
        || path.ends_with("/messages")
    {
        "chat"
    } else if path.ends_with("/completions") {
        "text_completion"
    } else if path.ends_with("/embeddings")
        || path.contains(":embedContent")
        || path.contains(":batchEmbedContents")
    {
        "embeddings"
    } else if path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
        || provider == Provider::Gemini
    {
        "generate_content"
    } else {
        "chat"
    }
}

/// The `error.type` of a failed call's error: for an [`AiError`], the layer's refusal
/// (`circuit_open`, `cooling_down`, `budget_exceeded`, `model_too_long`), the stream's end
/// (`stalled`, `truncated`), or the [`ErrorKind`](crate::ErrorKind) of the provider's
/// error or of the transport failure (`rate_limited`, `overloaded`, `timeout`,
/// `connection`, … as [`ErrorKind::as_str`](crate::ErrorKind::as_str) names them); for an
/// error response, its classification's kind. What tower-ai cannot tell is `_OTHER`, the
/// conventions' value for that.
///
/// ```
/// use tower_ai_core::{telemetry::error_type, AiError};
/// let err = AiError::Truncated { bytes_received: 10 };
/// assert_eq!(error_type(&err), "truncated");
/// assert_eq!(error_type(&std::io::Error::other("boom")), "connection");
/// ```
pub fn error_type(err: &(dyn std::error::Error + 'static)) -> &'static str {
    match AiError::find(err) {
        Some(AiError::CircuitOpen { .. }) => "circuit_open",
        Some(AiError::CoolingDown { .. }) => "cooling_down",
        Some(AiError::BudgetExceeded { .. }) => "budget_exceeded",
        Some(AiError::ModelTooLong { .. }) => "model_too_long",
        Some(AiError::Stalled { .. }) => "stalled",
        Some(AiError::Truncated { .. }) => "truncated",
        Some(e) => kind_name(Some(e.kind())),
        None => kind_name(Some(crate::ErrorKind::of_error(err))),
    }
}

fn kind_name(kind: Option<crate::ErrorKind>) -> &'static str {
    match kind {
        None | Some(crate::ErrorKind::Unknown) => "_OTHER",
        Some(k) => k.as_str(),
    }
}

impl<S, B, ResB> Service<Request<B>> for Telemetry<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = Response<TelemetryBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !metrics_on() && !span_wanted() {
            // Nobody listens: the inner future as it is, with no span made or dropped.
            return ResponseFuture {
                inner: self.inner.call(req),
                call: None,
            };
        }
        self.observed(req)
    }
}

/// Whether a call's span could be wanted: a subscriber anywhere enables `INFO` (the
/// maximum level of every subscriber, kept by `tracing`), or a `log` logger takes `INFO`
/// records (`tracing`'s `log` fallback, when no subscriber was ever set). Two loads.
#[inline]
fn span_wanted() -> bool {
    tracing::level_enabled!(tracing::Level::INFO) || log::max_level() >= log::LevelFilter::Info
}

impl<S> Telemetry<S> {
    /// A call that a subscriber, a logger or the metrics may want: its span and its
    /// `Call`.
    #[inline(never)]
    fn observed<B, ResB>(&mut self, mut req: Request<B>) -> ResponseFuture<S::Future>
    where
        S: Service<Request<B>, Response = Response<ResB>>,
        B: ReplayBody,
    {
        let span = tracing::info_span!(
            target: "tower_ai",
            "gen_ai.client",
            otel.name = Empty,
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = Empty,
            gen_ai.provider.name = Empty,
            gen_ai.request.model = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.stream = Empty,
            gen_ai.response.id = Empty,
            gen_ai.response.model = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.response.time_to_first_chunk = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            server.address = Empty,
            server.port = Empty,
            http.response.status_code = Empty,
            "http.response.header.x-request-id" = Empty,
            "http.response.header.request-id" = Empty,
            error.type = Empty,
        );
        let metrics = metrics_on();
        let traced = listened(&span);
        if !traced && !metrics {
            return ResponseFuture {
                inner: self.inner.call(req),
                call: None,
            };
        }
        let span = if traced { span } else { Span::none() };
        let call = Call::start(&mut req, span, metrics, self.max_answer_body);
        let inner = {
            let _in = call.span.enter();
            self.inner.call(req)
        };
        ResponseFuture {
            inner,
            call: Some(call),
        }
    }
}

/// The provider's request id of a response, as its headers carry it: `x-request-id`
/// (OpenAI, Azure OpenAI) or `request-id` (Anthropic), at most 256 bytes of it.
///
/// ```
/// let mut headers = http::HeaderMap::new();
/// headers.insert("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy".parse().unwrap());
/// assert_eq!(tower_ai_core::telemetry::request_id(&headers), Some("req_011CSHoEeqs5C35K2UUqR7Fy"));
/// ```
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    let id = headers
        .get("x-request-id")
        .or_else(|| headers.get("request-id"))?;
    id.to_str().ok().map(|id| bounded(id, MAX_ID_LEN))
}

/// Whether a subscriber listens to `span`. A span a subscriber disabled is; so is one
/// made while the thread's subscriber is the no-op one although a subscriber elsewhere
/// (another thread's scoped default) gave its callsite an `always` interest.
fn listened(span: &Span) -> bool {
    span.with_subscriber(|(_, d)| !d.is::<tracing::subscriber::NoSubscriber>())
        .unwrap_or(false)
}

/// An integer as a signed one: OpenTelemetry attributes are `i64`, and
/// tracing-opentelemetry records a `u64` field as text.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A short string kept from the network: at most `max` bytes, cut at a character.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What one call's telemetry keeps, from the call to the end of its answer.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
struct Call {
    span: Span,
    start: Instant,
    provider: Provider,
    operation: &'static str,
    dialect: StreamDialect,
    request_model: Option<Arc<str>>,
    response_model: Option<Box<str>>,
    response_id: bool,
    server: Option<(Box<str>, u16)>,
    first_chunk: Option<Instant>,
    last_chunk: Option<Instant>,
    error: Option<&'static str>,
    reader: Reader,
    max_answer_body: usize,
    /// Whether the metrics are recorded (the `metrics` feature, turned on).
    metrics: bool,
    #[cfg(feature = "metrics")]
    chunk_histogram: Option<::metrics::Histogram>,
}

/// How the answer is read.
enum Reader {
    /// Not read (not yet, an error response, or nothing to read for).
    None,
    /// A non-streamed answer: read in place when it comes in one frame, else copied
    /// (bounded) and read at its end.
    Json(Vec<u8>),
    /// A non-streamed answer over the bound: not read.
    Overflow,
    /// A stream: each chunk scanned, nothing kept.
    Sse(Box<StreamScanner>),
}

impl Call {
    fn start<B: ReplayBody>(
        req: &mut Request<B>,
        span: Span,
        metrics: bool,
        max_answer_body: usize,
    ) -> Box<Call> {
        let provider = Provider::of(req);
        let path = req.uri().path();
        let operation = operation_name(provider, path);
        let dialect = StreamDialect::of(provider, path);
        let server = server_of(req);
        let meta = RequestMeta::get_or_insert(req);
        let request_model: Option<Arc<str>> =
            meta.model.as_ref().map(|m| match m.len() <= MAX_MODEL_LEN {
                true => m.clone(),
                false => Arc::from(bounded(m, MAX_MODEL_LEN)),
            });
        if !span.is_disabled() {
            let name = match &request_model {
                Some(m) => format!("{operation} {m}"),
                None => operation.to_owned(),
            };
            span.record("otel.name", name);
            span.record("gen_ai.operation.name", operation);
            span.record("gen_ai.provider.name", provider.gen_ai_name());
            if let Some(m) = &request_model {
                span.record("gen_ai.request.model", &**m);
            }
            if let Some(n) = meta.max_output_tokens {
                span.record("gen_ai.request.max_tokens", int(n));
            }
            if meta.json {
                span.record("gen_ai.request.stream", meta.stream);
            }
            if let Some((host, port)) = &server {
                span.record("server.address", &**host);
                span.record("server.port", i64::from(*port));
            }
        }
        Box::new(Call {
            span,
            start: Instant::now(),
            provider,
            operation,
            dialect,
            request_model,
            response_model: None,
            response_id: false,
            server,
            first_chunk: None,
            last_chunk: None,
            error: None,
            reader: Reader::None,
            max_answer_body,
            metrics,
            #[cfg(feature = "metrics")]
            chunk_histogram: None,
        })
    }

    /// The response head arrived: returns whether its body is to be watched.
    fn head(
        &mut self,
        status: http::StatusCode,
        headers: &HeaderMap,
        verdict: &Classification,
    ) -> bool {
        if !self.span.is_disabled() {
            self.span
                .record("http.response.status_code", i64::from(status.as_u16()));
            for name in ["x-request-id", "request-id"] {
                if let Some(id) = headers.get(name).and_then(|v| v.to_str().ok()) {
                    let id = bounded(id, MAX_ID_LEN);
                    match name {
                        "x-request-id" => self.span.record("http.response.header.x-request-id", id),
                        _ => self.span.record("http.response.header.request-id", id),
                    };
                }
            }
        }
        if let Some(kind) = verdict.kind {
            self.error = Some(kind_name(Some(kind)));
            return false;
        }
        if !status.is_success() || status == http::StatusCode::NO_CONTENT {
            return false;
        }
        self.reader = if is_event_stream(headers) {
            Reader::Sse(Box::new(StreamScanner::new(self.dialect)))
        } else if self.max_answer_body > 0 {
            Reader::Json(Vec::new())
        } else {
            Reader::None
        };
        true
    }

    /// A frame of the answer's data (`last`: the answer ends with it).
    fn data(&mut self, chunk: &[u8], last: bool) {
        let mut identity = None;
        match &mut self.reader {
            Reader::None | Reader::Overflow => {}
            Reader::Sse(scanner) => {
                let facts = if self.response_id && self.response_model.is_some() {
                    scanner.feed(chunk)
                } else {
                    let (mut id, mut model) = (None, None);
                    let facts = scanner.feed_with(chunk, |_, data| {
                        if id.is_none() && model.is_none() {
                            let (i, m) = response_identity(data);
                            id = i.map(|s| bounded(&s, MAX_ID_LEN).to_owned());
                            model = m.map(|s| bounded(&s, MAX_ID_LEN).to_owned());
                        }
                    });
                    identity = Some((id, model));
                    facts
                };
                if let Some(c) = &facts.error {
                    self.error = Some(kind_name(c.kind));
                }
            }
            Reader::Json(buf) => {
                if buf.is_empty() && last {
                    if chunk.len() <= self.max_answer_body {
                        let (id, model) = response_identity(chunk);
                        identity = Some((
                            id.map(|s| bounded(&s, MAX_ID_LEN).to_owned()),
                            model.map(|s| bounded(&s, MAX_ID_LEN).to_owned()),
                        ));
                        let usage = Usage::from_json(chunk);
                        let finish = FinishReason::of_answer(chunk);
                        self.reader = Reader::None;
                        self.answer(identity.take());
                        self.settle(usage, finish);
                    } else {
                        self.reader = Reader::Overflow;
                    }
                } else if buf.len().saturating_add(chunk.len()) <= self.max_answer_body {
                    buf.extend_from_slice(chunk);
                } else {
                    self.reader = Reader::Overflow;
                }
            }
        }
        self.answer(identity);
        if matches!(self.reader, Reader::Sse(_)) {
            self.chunk(Instant::now());
        }
    }

    /// The id and model the answer named, the first time it names them.
    fn answer(&mut self, identity: Option<(Option<String>, Option<String>)>) {
        let Some((id, model)) = identity else { return };
        if let Some(id) = id.filter(|_| !self.response_id) {
            self.response_id = true;
            self.span.record("gen_ai.response.id", id.as_str());
        }
        if let Some(model) = model.filter(|_| self.response_model.is_none()) {
            self.span.record("gen_ai.response.model", model.as_str());
            self.response_model = Some(model.into_boxed_str());
        }
    }

    /// A chunk of a stream arrived at `now`.
    fn chunk(&mut self, now: Instant) {
        match self.last_chunk {
            None => {
                self.first_chunk = Some(now);
                let ttfc = now.saturating_duration_since(self.start).as_secs_f64();
                self.span
                    .record("gen_ai.response.time_to_first_chunk", ttfc);
                #[cfg(feature = "metrics")]
                if self.metrics {
                    let labels = self.labels(None);
                    ::metrics::histogram!(TIME_TO_FIRST_CHUNK, labels.clone()).record(ttfc);
                    self.chunk_histogram =
                        Some(::metrics::histogram!(TIME_PER_OUTPUT_CHUNK, labels));
                }
            }
            Some(_last) =>
            {
                #[cfg(feature = "metrics")]
                if let Some(h) = &self.chunk_histogram {
                    h.record(now.saturating_duration_since(_last).as_secs_f64());
                }
            }
        }
        self.last_chunk = Some(now);
    }

    /// The usage and finish reason are known (or never will be).
    fn settle(&mut self, usage: Option<Usage>, finish: Option<FinishReason>) {
        if let Some(u) = usage {
            self.span
                .record("gen_ai.usage.input_tokens", int(u.input_tokens));
            self.span
                .record("gen_ai.usage.output_tokens", int(u.output_tokens));
            #[cfg(feature = "metrics")]
            if self.metrics {
                for (ty, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
                    let mut labels = self.labels(None);
                    labels.push(::metrics::Label::new("gen_ai.token.type", ty));
                    ::metrics::histogram!(TOKEN_USAGE, labels).record(n as f64);
                }
            }
        }
        if let Some(f) = finish {
            self.span.record(
                "gen_ai.response.finish_reasons",
                format!("[\"{}\"]", f.as_str()),
            );
        }
    }

    /// The answer ended (or failed, or was dropped): the span ends with this.
    fn end(mut self: Box<Self>) {
        match std::mem::replace(&mut self.reader, Reader::None) {
            Reader::Sse(mut scanner) => {
                scanner.finish();
                self.settle(scanner.usage(), scanner.finish_reason());
            }
            Reader::Json(buf) if !buf.is_empty() => {
                let (id, model) = response_identity(&buf);
                let identity = (
                    id.map(|s| bounded(&s, MAX_ID_LEN).to_owned()),
                    model.map(|s| bounded(&s, MAX_ID_LEN).to_owned()),
                );
                self.answer(Some(identity));
                self.settle(Usage::from_json(&buf), FinishReason::of_answer(&buf));
            }
            _ => {}
        }
        if let Some(e) = self.error {
            self.span.record("error.type", e);
            self.span.record("otel.status_code", "error");
        }
        #[cfg(feature = "metrics")]
        if self.metrics {
            let secs = self.start.elapsed().as_secs_f64();
            let labels = self.labels(self.error);
            ::metrics::histogram!(OPERATION_DURATION, labels).record(secs);
        }
    }

    #[cfg(feature = "metrics")]
    fn labels(&self, error: Option<&'static str>) -> Vec<::metrics::Label> {
        use ::metrics::Label;
        let mut labels = Vec::with_capacity(8);
        labels.push(Label::new("gen_ai.operation.name", self.operation));
        labels.push(Label::new(
            "gen_ai.provider.name",
            self.provider.gen_ai_name(),
        ));
        if let Some(m) = &self.request_model {
            labels.push(Label::new("gen_ai.request.model", label_values::model(m)));
        }
        if let Some(m) = &self.response_model {
            labels.push(Label::new("gen_ai.response.model", label_values::model(m)));
        }
        if let Some((host, port)) = &self.server {
            labels.push(Label::new("server.address", label_values::server(host)));
            labels.push(Label::new("server.port", label_values::port(*port)));
        }
        if let Some(e) = error {
            labels.push(Label::new("error.type", e));
        }
        labels
    }
}

/// The request's server address and port: the URI's host (else the `Host` header's) and
/// its port, else the scheme's (443, 80); `None` for a relative URI with no `Host`.
fn server_of<B>(req: &Request<B>) -> Option<(Box<str>, u16)> {
    let uri = req.uri();
    if let Some(host) = uri.host() {
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })?;
        return Some((bounded(host, 253).into(), port));
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (h, p.parse().ok()?),
        _ => (host, 80),
    };
    Some((bounded(name, 253).into(), port))
}

pin_project! {
    /// The response future of [`Telemetry`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Box<Call>>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("traced", &self.call.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TelemetryBody<ResB>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_mut() else {
            let res = ready!(this.inner.poll(cx)).map_err(Into::into)?;
            return Poll::Ready(Ok(res.map(TelemetryBody::bare)));
        };
        let out = {
            let _in = call.span.enter();
            ready!(this.inner.poll(cx))
        };
        let mut call = this.call.take().expect("checked above");
        match out {
            Ok(res) => {
                let watch = call.head(res.status(), res.headers(), &Classification::of(&res));
                if !watch {
                    call.end();
                    return Poll::Ready(Ok(res.map(TelemetryBody::bare)));
                }
                Poll::Ready(Ok(res.map(|b| TelemetryBody {
                    inner: b,
                    call: Some(call),
                })))
            }
            Err(e) => {
                let e: BoxError = e.into();
                call.error = Some(error_type(&*e));
                call.end();
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project! {
    /// The response body of [`Telemetry`]: the inner body, frame for frame. When the call
    /// is traced (or measured) it reads the answer on the way for its id, model, usage and
    /// finish reason, and ends the call's span when the answer ends, fails or is dropped.
    pub struct TelemetryBody<B> {
        #[pin]
        inner: B,
        call: Option<Box<Call>>,
    }

    impl<B> PinnedDrop for TelemetryBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.end();
            }
        }
    }
}

impl<B> TelemetryBody<B> {
    fn bare(inner: B) -> Self {
        TelemetryBody { inner, call: None }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> fmt::Debug for TelemetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryBody")
            .field("traced", &self.call.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Body for TelemetryBody<B>
where
    B: Body,
    B::Data: AsRef<[u8]>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let Some(call) = this.call.as_mut() else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        let frame = {
            let _in = call.span.enter();
            ready!(this.inner.as_mut().poll_frame(cx))
        };
        match frame {
            Some(Ok(frame)) => {
                let end = this.inner.is_end_stream();
                if let Some(data) = frame.data_ref().filter(|d| !d.as_ref().is_empty()) {
                    call.data(data.as_ref(), end);
                }
                if end {
                    if let Some(call) = this.call.take() {
                        call.end();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                let mut call = this.call.take().expect("checked above");
                call.error = Some(error_type(&*e));
                call.end();
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.end();
                }
                Poll::Ready(None)
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the GenAI metrics are recorded: the `metrics` feature, turned on by
/// `describe_metrics`.
#[inline]
fn metrics_on() -> bool {
    #[cfg(feature = "metrics")]
    {
        label_values::ON.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "metrics"))]
    {
        false
    }
}

/// Describes the four GenAI client histograms (unit and help text) to the `metrics`
/// recorder in force, and turns their recording on, for every [`Telemetry`] service in
/// the process. Call it once, after installing your recorder (an exporter's `install`);
/// until then no GenAI metric is recorded, and a stack costs nothing for them (tracing a
/// call is decided apart, by its subscriber).
///
/// The `metrics` facade has no histogram buckets: give your exporter [`BUCKETS`], the
/// boundaries the GenAI conventions recommend.
///
/// ```
/// use metrics_util::debugging::DebuggingRecorder;
///
/// let recorder = DebuggingRecorder::new();
/// let snapshotter = recorder.snapshotter();
/// metrics::with_local_recorder(&recorder, tower_ai_core::telemetry::describe_metrics);
/// let described = snapshotter.snapshot().into_vec();
/// # let _ = described;
/// ```
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe_metrics() {
    use ::metrics::{describe_histogram, Unit};
    describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "GenAI operation duration."
    );
    describe_histogram!(
        TOKEN_USAGE,
        Unit::Count,
        "Number of input and output tokens used."
    );
    describe_histogram!(
        TIME_TO_FIRST_CHUNK,
        Unit::Seconds,
        "Time to receive the first chunk of a streamed answer, from the call."
    );
    describe_histogram!(
        TIME_PER_OUTPUT_CHUNK,
        Unit::Seconds,
        "Time per output chunk of a streamed answer, after the first one."
    );
    label_values::ON.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The bounded label values of the metrics.
#[cfg(feature = "metrics")]
mod label_values {
    use std::collections::HashSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex, OnceLock};

    use ::metrics::SharedString;

    use super::{MAX_MODEL_LABELS, MAX_SERVER_LABELS};

    pub(super) static ON: AtomicBool = AtomicBool::new(false);

    type Set = Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>;

    fn intern(set: &'static OnceLock<Set>, cap: usize, value: &str) -> SharedString {
        let set = set.get_or_init(Default::default);
        let mut set = set.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = set.get(value) {
            return SharedString::from(v.clone());
        }
        if set.len() >= cap {
            return SharedString::const_str("_OTHER");
        }
        let v: Arc<str> = Arc::from(value);
        set.insert(v.clone());
        SharedString::from(v)
    }

    pub(super) fn model(m: &str) -> SharedString {
        static MODELS: OnceLock<Set> = OnceLock::new();
        intern(&MODELS, MAX_MODEL_LABELS, m)
    }

    pub(super) fn server(host: &str) -> SharedString {
        static SERVERS: OnceLock<Set> = OnceLock::new();
        intern(&SERVERS, MAX_SERVER_LABELS, host)
    }

    pub(super) fn port(port: u16) -> SharedString {
        match port {
            443 => SharedString::const_str("443"),
            80 => SharedString::const_str("80"),
            p => SharedString::from(p.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_from_uri_and_host() {
        let req = Request::post("https://api.openai.com/v1/chat/completions")
            .body(())
            .unwrap();
        assert_eq!(server_of(&req), Some(("api.openai.com".into(), 443)));
        let req = Request::post("http://127.0.0.1:8080/v1/messages")
            .body(())
            .unwrap();
        assert_eq!(server_of(&req), Some(("127.0.0.1".into(), 8080)));
        let req = Request::post("/v1/messages")
            .header("host", "proxy.local:9000")
            .body(())
            .unwrap();
        assert_eq!(server_of(&req), Some(("proxy.local".into(), 9000)));
        let req = Request::post("/v1/messages").body(()).unwrap();
        assert_eq!(server_of(&req), None);
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn model_and_server_labels_are_capped() {
        assert_eq!(&*label_values::model("cap-test-0"), "cap-test-0");
        for i in 1..MAX_MODEL_LABELS + 10 {
            label_values::model(&format!("cap-test-{i}"));
        }
        assert_eq!(&*label_values::model("one-more"), "_OTHER");
        assert_eq!(&*label_values::model("cap-test-0"), "cap-test-0", "kept");
        for i in 0..MAX_SERVER_LABELS + 1 {
            label_values::server(&format!("host-{i}"));
        }
        assert_eq!(&*label_values::server("one-more"), "_OTHER");
        assert_eq!(&*label_values::port(8080), "8080");
    }

    #[test]
    fn bounded_cuts_at_a_character() {
        assert_eq!(bounded("héllo", 2), "h");
        assert_eq!(bounded("abc", 10), "abc");
    }

    #[test]
    fn operation_names() {
        assert_eq!(operation_name(Provider::Anthropic, "/v1/messages"), "chat");
        assert_eq!(operation_name(Provider::OpenAi, "/v1/responses"), "chat");
        assert_eq!(
            operation_name(Provider::OpenAi, "/v1/completions"),
            "text_completion"
        );
        assert_eq!(
            operation_name(Provider::Gemini, "/v1beta/models/m:generateContent"),
            "generate_content"
        );
        assert_eq!(operation_name(Provider::Generic, "/x"), "chat");
    }
}
