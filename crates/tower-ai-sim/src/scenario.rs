//! The script a [`Simulator`](crate::Simulator) follows: limits, faults, outages,
//! latencies and stream misbehaviour.
//!
//! A [`Scenario`] is built with [`Scenario::builder`] (validated by
//! [`ScenarioBuilder::build`]) or read from JSON with [`Scenario::from_json`].
//! Every time in a scenario is a [`Duration`] measured from the moment the
//! simulator was created (its *t = 0*), on `tokio`'s clock.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::dialect::Dialect;

/// Default context window of a model the scenario does not name (tokens).
pub const DEFAULT_CONTEXT_WINDOW: u64 = 128_000;
/// Default number of completion tokens a model generates for every request.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// Default length of a rate-limit window (the providers count per minute).
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(60);
/// Default time a stalled stream holds its connection before the body ends with an error.
pub const DEFAULT_STALL_DURATION: Duration = Duration::from_secs(3600);
/// Default largest request body accepted (Anthropic's Messages limit, 32 MB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Longest model name accepted; longer names get a 400 in the dialect's shape.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// A latency distribution, sampled from the scenario's seeded RNG.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_sim::Latency;
/// let fixed = Latency::fixed(Duration::from_millis(300));
/// let spread = Latency::uniform(Duration::from_millis(100), Duration::from_secs(2));
/// assert_ne!(fixed, spread);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Always the same duration.
    Fixed(Duration),
    /// Uniformly distributed in `[min, max]` (nanosecond resolution).
    Uniform {
        /// Shortest sample.
        min: Duration,
        /// Longest sample (must be `>= min`, checked by [`ScenarioBuilder::build`]).
        max: Duration,
    },
}

impl Latency {
    /// No latency at all.
    pub const ZERO: Latency = Latency::Fixed(Duration::ZERO);

    /// Always `d`.
    pub const fn fixed(d: Duration) -> Self {
        Latency::Fixed(d)
    }

    /// Uniform in `[min, max]`.
    pub const fn uniform(min: Duration, max: Duration) -> Self {
        Latency::Uniform { min, max }
    }

    pub(crate) fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let lo = clamp_nanos(min);
                let hi = clamp_nanos(max).max(lo);
                Duration::from_nanos(rng.u64(lo..=hi))
            }
        }
    }

    fn validate(&self, what: &'static str) -> Result<(), ScenarioError> {
        match *self {
            Latency::Uniform { min, max } if min > max => Err(ScenarioError::InvalidLatency {
                what,
                reason: format!("uniform min {min:?} is greater than max {max:?}"),
            }),
            _ => Ok(()),
        }
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency::ZERO
    }
}

fn clamp_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What the simulator knows about one model.
///
/// Models the scenario does not name are served with the scenario's default
/// spec (see [`ScenarioBuilder::default_model`]) unless
/// [`ScenarioBuilder::strict_models`] is set, in which case they get the
/// dialect's 404 "model not found".
///
/// ```
/// use std::time::Duration;
/// use tower_ai_sim::{Latency, ModelSpec};
/// let small = ModelSpec::new("small-model")
///     .context_window(8_192)
///     .completion_tokens(50)
///     .latency(Latency::fixed(Duration::from_millis(200)));
/// assert_eq!(small.name(), "small-model");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub(crate) name: String,
    pub(crate) context_window: u64,
    pub(crate) completion_tokens: u32,
    pub(crate) latency: Option<Latency>,
    pub(crate) token_interval: Option<Latency>,
}

impl ModelSpec {
    /// A model with the default context window (128 000) and 16 completion tokens.
    pub fn new(name: impl Into<String>) -> Self {
        ModelSpec {
            name: name.into(),
            context_window: DEFAULT_CONTEXT_WINDOW,
            completion_tokens: DEFAULT_COMPLETION_TOKENS,
            latency: None,
            token_interval: None,
        }
    }

    /// Largest prompt (in estimated tokens) the model accepts; larger prompts get
    /// the dialect's context-length 400.
    pub fn context_window(mut self, tokens: u64) -> Self {
        self.context_window = tokens;
        self
    }

    /// How many tokens the model generates when `max_tokens` does not cut it short.
    pub fn completion_tokens(mut self, tokens: u32) -> Self {
        self.completion_tokens = tokens;
        self
    }

    /// Time to response head for this model, overriding [`ScenarioBuilder::latency`].
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = Some(latency);
        self
    }

    /// Gap between streamed tokens for this model, overriding
    /// [`ScenarioBuilder::token_interval`].
    pub fn token_interval(mut self, interval: Latency) -> Self {
        self.token_interval = Some(interval);
        self
    }

    /// The model's name, as it appears in requests.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's context window in tokens.
    pub fn context_window_tokens(&self) -> u64 {
        self.context_window
    }

    /// The number of tokens the model generates.
    pub fn completion_token_count(&self) -> u32 {
        self.completion_tokens
    }
}

/// A scripted error response: an HTTP status in the dialect's own error shape.
///
/// A fault fires with its probability (default 1.0: always) for requests that
/// arrive inside its time window (default: always) and ask for its model
/// (default: any model). Faults are checked in the order they were added; the
/// first that fires answers the request. A request a fault answers has already
/// been counted by the rate limiter, as on the real services.
///
/// Bodies per status and dialect: 500 (`server_error` / `api_error` /
/// `INTERNAL`), 502, 503 (`service_unavailable_error` + `server_is_overloaded` /
/// `api_error` / `UNAVAILABLE`), 504 (`timeout_error` / `DEADLINE_EXCEEDED`),
/// 529 (`overloaded_error` / `UNAVAILABLE`), 429 (a transient rate limit), any
/// other 4xx/5xx a generic error of that status.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_sim::Fault;
/// // 10 % of all requests answer 529.
/// let random = Fault::status(529).probability(0.1);
/// // Every request between t = 10 s and t = 20 s answers 503, asking for a 2 s wait.
/// let burst = Fault::status(503)
///     .between(Duration::from_secs(10), Duration::from_secs(20))
///     .retry_after(Duration::from_secs(2));
/// // Only "model-a" fails.
/// let one_model = Fault::status(500).model("model-a");
/// # let _ = (random, burst, one_model);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub(crate) status: u16,
    pub(crate) probability: f64,
    pub(crate) window: Option<(Duration, Duration)>,
    pub(crate) model: Option<String>,
    pub(crate) retry_after: Option<Duration>,
}

impl Fault {
    /// A fault answering `status` (400..=599) to every matching request.
    pub fn status(status: u16) -> Self {
        Fault {
            status,
            probability: 1.0,
            window: None,
            model: None,
            retry_after: None,
        }
    }

    /// Fire with probability `p` in `[0, 1]` (drawn from the seeded RNG).
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }

    /// Only for requests arriving in `[from, until)` since the simulator's start.
    pub fn between(mut self, from: Duration, until: Duration) -> Self {
        self.window = Some((from, until));
        self
    }

    /// Only for requests for this model.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Ask the client to wait this long: `retry-after` (integer seconds, rounded
    /// up) for OpenAI and Anthropic, plus `retry-after-ms` for Azure, and a
    /// `RetryInfo.retryDelay` in Gemini's body. A scripted 429 without it
    /// waits 1 s.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub(crate) fn matches(&self, at: Duration, model: &str) -> bool {
        let in_window = self
            .window
            .is_none_or(|(from, until)| at >= from && at < until);
        let for_model = self.model.as_deref().is_none_or(|m| m == model);
        in_window && for_model
    }
}

/// A way a successful (HTTP 200) stream misbehaves after its head was sent.
///
/// Stream faults apply only to streamed requests. Each is drawn with its
/// probability, in the order they were added; the first that fires shapes the
/// stream. "Tokens" are content events (one token each). When `tokens` is at
/// least the number of tokens the answer has, the stall or error comes after
/// the last content event and before the finishing events, so the stream
/// still never ends cleanly.
///
/// A stall keeps the body pending (the connection stays open, nothing is
/// sent, no CPU is used) for [`ScenarioBuilder::stall_duration`], then the
/// body ends with a [`SimBodyError`](crate::SimBodyError) (over HTTP: the
/// connection is cut without a terminating chunk).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StreamFault {
    /// Headers are sent, then not a single body byte.
    StallBeforeFirstToken {
        /// Chance in `[0, 1]` that a stream gets this fault.
        probability: f64,
    },
    /// The stream's preamble and `tokens` content events are sent, then nothing.
    StallAfterTokens {
        /// Content events sent before the stall.
        tokens: u32,
        /// Chance in `[0, 1]` that a stream gets this fault.
        probability: f64,
    },
    /// After `tokens` content events, the dialect's mid-stream error event
    /// (OpenAI `data: {"error":…}`, Anthropic `event: error` with
    /// `overloaded_error`, Gemini `data: {"error":…}` UNAVAILABLE), then the
    /// body ends (no `[DONE]`, no `message_stop`).
    ErrorEventAfterTokens {
        /// Content events sent before the error event.
        tokens: u32,
        /// Chance in `[0, 1]` that a stream gets this fault.
        probability: f64,
    },
    /// The stream's preamble and `tokens` content events are sent, then the body ends
    /// cleanly without the dialect's terminal marker (no `[DONE]`, no `message_stop`, no
    /// `response.completed`, no Gemini `finishReason`): a proxy or a load balancer closing
    /// the connection mid-answer. Over HTTP the chunked body is terminated properly.
    CutAfterTokens {
        /// Content events sent before the end.
        tokens: u32,
        /// Chance in `[0, 1]` that a stream gets this fault.
        probability: f64,
    },
    /// The stream's preamble and `tokens` content events are sent, then the body fails
    /// at once with a [`SimBodyError`](crate::SimBodyError) (over HTTP: the connection is
    /// reset, without a terminating chunk).
    ResetAfterTokens {
        /// Content events sent before the reset.
        tokens: u32,
        /// Chance in `[0, 1]` that a stream gets this fault.
        probability: f64,
    },
}

impl StreamFault {
    pub(crate) fn probability(&self) -> f64 {
        match *self {
            StreamFault::StallBeforeFirstToken { probability }
            | StreamFault::StallAfterTokens { probability, .. }
            | StreamFault::ErrorEventAfterTokens { probability, .. }
            | StreamFault::CutAfterTokens { probability, .. }
            | StreamFault::ResetAfterTokens { probability, .. } => probability,
        }
    }
}

/// A window of time in which a model answers only its dialect's overload error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outage {
    pub(crate) model: String,
    pub(crate) from: Duration,
    pub(crate) until: Duration,
    pub(crate) status: Option<u16>,
}

/// Why a scenario was rejected by [`ScenarioBuilder::build`] or [`Scenario::from_json`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// A probability outside `[0, 1]` (or NaN).
    #[error("{what}: probability {value} is not in [0, 1]")]
    InvalidProbability {
        /// Which setting.
        what: String,
        /// The value given.
        value: f64,
    },
    /// A latency distribution that makes no sense.
    #[error("{what}: {reason}")]
    InvalidLatency {
        /// Which setting.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A time window whose end is not after its start, or an empty rate window.
    #[error("{what}: {reason}")]
    InvalidWindow {
        /// Which setting.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A limit of zero (use an outage or a fault to refuse everything).
    #[error("{what} must be at least 1")]
    ZeroLimit {
        /// Which limit.
        what: &'static str,
    },
    /// A fault or outage status outside 400..=599.
    #[error("status {status} is not an HTTP error status (400..=599)")]
    InvalidStatus {
        /// The status given.
        status: u16,
    },
    /// A model spec that makes no sense (empty or duplicate name, zero context window).
    #[error("model {name:?}: {reason}")]
    InvalidModel {
        /// The model's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A scenario file that is not valid JSON of the expected shape.
    #[error("scenario JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A scenario file that could not be read.
    #[error("reading scenario file: {0}")]
    Io(#[from] std::io::Error),
}

/// A validated script for a [`Simulator`](crate::Simulator).
///
/// ```
/// use std::time::Duration;
/// use tower_ai_sim::{Fault, Latency, ModelSpec, Scenario, StreamFault};
/// let scenario = Scenario::builder()
///     .seed(42)
///     .model(ModelSpec::new("gpt-4o").context_window(128_000).completion_tokens(20))
///     .rpm_limit(60)
///     .tpm_limit(40_000)
///     .quota_exhausted_after(1000)
///     .fault(Fault::status(529).probability(0.1))
///     .fault(Fault::status(503).between(Duration::from_secs(10), Duration::from_secs(20)))
///     .outage("model-a", Duration::from_secs(0), Duration::from_secs(60))
///     .latency(Latency::fixed(Duration::from_secs(1)))
///     .error_latency(Latency::fixed(Duration::from_millis(50)))
///     .token_interval(Latency::fixed(Duration::from_millis(20)))
///     .stream_fault(StreamFault::StallAfterTokens { tokens: 3, probability: 0.05 })
///     .build()?;
/// # let _ = scenario;
/// # Ok::<(), tower_ai_sim::ScenarioError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Scenario {
    pub(crate) seed: u64,
    pub(crate) models: Vec<ModelSpec>,
    pub(crate) default_model: ModelSpec,
    pub(crate) strict_models: bool,
    pub(crate) rpm_limit: Option<u64>,
    pub(crate) tpm_limit: Option<u64>,
    pub(crate) rate_window: Duration,
    pub(crate) quota_after: Option<u64>,
    pub(crate) quota_models: Vec<String>,
    pub(crate) faults: Vec<Fault>,
    pub(crate) outages: Vec<Outage>,
    pub(crate) latency: Latency,
    pub(crate) error_latency: Latency,
    pub(crate) token_interval: Latency,
    pub(crate) stream_faults: Vec<(Option<String>, StreamFault)>,
    pub(crate) stall_duration: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) wall_clock: Option<SystemTime>,
}

impl Default for Scenario {
    /// A well-behaved provider: no limits, no faults, no latency, seed 0.
    fn default() -> Self {
        Scenario {
            seed: 0,
            models: Vec::new(),
            default_model: ModelSpec::new("*"),
            strict_models: false,
            rpm_limit: None,
            tpm_limit: None,
            rate_window: DEFAULT_RATE_WINDOW,
            quota_after: None,
            quota_models: Vec::new(),
            faults: Vec::new(),
            outages: Vec::new(),
            latency: Latency::ZERO,
            error_latency: Latency::ZERO,
            token_interval: Latency::ZERO,
            stream_faults: Vec::new(),
            stall_duration: DEFAULT_STALL_DURATION,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            wall_clock: None,
        }
    }
}

impl Scenario {
    /// Start building a scenario (everything off: a well-behaved provider).
    pub fn builder() -> ScenarioBuilder {
        ScenarioBuilder {
            scenario: Scenario::default(),
        }
    }

    /// Read a scenario from JSON. Durations are strings such as `"1s"`,
    /// `"250ms"`, `"1h"`, or numbers of milliseconds; a latency is a duration
    /// (fixed) or `{"min": …, "max": …}` (uniform). Unknown fields are errors.
    ///
    /// ```
    /// use tower_ai_sim::Scenario;
    /// let scenario = Scenario::from_json(r#"{
    ///     "seed": 7,
    ///     "models": [{"name": "gpt-4o", "context_window": 128000, "completion_tokens": 20}],
    ///     "rpm_limit": 60,
    ///     "faults": [{"status": 529, "probability": 0.1},
    ///                {"status": 503, "from": "10s", "until": "20s"}],
    ///     "outages": [{"model": "model-a", "from": "0s", "until": "60s"}],
    ///     "latency": {"min": "100ms", "max": "300ms"},
    ///     "token_interval": 20,
    ///     "stream_faults": [{"kind": "stall_after_tokens", "tokens": 3, "probability": 0.5},
    ///                       {"kind": "cut_after_tokens", "tokens": 2, "probability": 0.1},
    ///                       {"kind": "reset_after_tokens", "tokens": 2, "probability": 0.1}]
    /// }"#)?;
    /// # let _ = scenario;
    /// # Ok::<(), tower_ai_sim::ScenarioError>(())
    /// ```
    pub fn from_json(json: &str) -> Result<Scenario, ScenarioError> {
        let file: crate::scenario_file::ScenarioFile = serde_json::from_str(json)?;
        file.into_builder().build()
    }

    /// Read a scenario from a JSON file (see [`Scenario::from_json`]).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)?;
        Scenario::from_json(&text)
    }

    /// The RNG seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The requests-per-window limit, if any.
    pub fn rpm_limit(&self) -> Option<u64> {
        self.rpm_limit
    }

    /// The tokens-per-window limit, if any.
    pub fn tpm_limit(&self) -> Option<u64> {
        self.tpm_limit
    }

    /// The length of a rate-limit window (60 s unless changed).
    pub fn rate_window(&self) -> Duration {
        self.rate_window
    }

    /// The spec used for `model`: the named one, or the default spec.
    pub fn model_spec(&self, model: &str) -> Option<&ModelSpec> {
        match self.models.iter().find(|m| m.name == model) {
            Some(spec) => Some(spec),
            None if self.strict_models => None,
            None => Some(&self.default_model),
        }
    }

    pub(crate) fn outage_for(&self, model: &str, at: Duration) -> Option<&Outage> {
        self.outages
            .iter()
            .find(|o| o.model == model && at >= o.from && at < o.until)
    }

    pub(crate) fn overload_status(dialect: Dialect) -> u16 {
        match dialect {
            Dialect::Anthropic => 529,
            Dialect::OpenAi | Dialect::AzureOpenAi | Dialect::Gemini => 503,
        }
    }
}

/// Builds a [`Scenario`]; see [`Scenario::builder`].
#[derive(Debug, Clone)]
pub struct ScenarioBuilder {
    scenario: Scenario,
}

impl ScenarioBuilder {
    /// Seed of the RNG that draws faults, latencies and stream faults (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.scenario.seed = seed;
        self
    }

    /// Describe a model (context window, completion tokens, latency).
    pub fn model(mut self, spec: ModelSpec) -> Self {
        self.scenario.models.push(spec);
        self
    }

    /// The spec for models not described with [`model`](Self::model) (its name is ignored).
    pub fn default_model(mut self, spec: ModelSpec) -> Self {
        self.scenario.default_model = spec;
        self
    }

    /// Answer 404 "model not found" (in the dialect's shape) to models not
    /// described with [`model`](Self::model). Off by default.
    pub fn strict_models(mut self, strict: bool) -> Self {
        self.scenario.strict_models = strict;
        self
    }

    /// Requests admitted per rate window (fixed windows aligned to t = 0).
    ///
    /// Requests beyond the limit get the dialect's 429 with `retry-after`
    /// equal to the whole seconds (rounded up) until the window ends.
    /// Requests refused by the limiter do not use up capacity; requests it
    /// admits do, even if a scripted fault then answers them.
    pub fn rpm_limit(mut self, requests: u64) -> Self {
        self.scenario.rpm_limit = Some(requests);
        self
    }

    /// Tokens admitted per rate window; a request costs its prompt estimate plus
    /// the completion tokens it will get. A request that alone costs more than
    /// the limit gets a 429 that retrying can never fix (OpenAI's "Request too
    /// large", with no `retry-after`).
    pub fn tpm_limit(mut self, tokens: u64) -> Self {
        self.scenario.tpm_limit = Some(tokens);
        self
    }

    /// Length of a rate-limit window (default 60 s).
    pub fn rate_window(mut self, window: Duration) -> Self {
        self.scenario.rate_window = window;
        self
    }

    /// After `successes` successful (HTTP 200) calls, every request gets the
    /// dialect's non-retryable quota 429 (OpenAI `insufficient_quota`,
    /// Anthropic `enforced_spend_limit_reached` without `retry-after`, Gemini
    /// a `…PerDay…` quota violation).
    pub fn quota_exhausted_after(mut self, successes: u64) -> Self {
        self.scenario.quota_after = Some(successes);
        self
    }

    /// Every request for `model` gets the dialect's non-retryable quota 429 (as
    /// [`quota_exhausted_after`](Self::quota_exhausted_after), for one model only: a
    /// model billed to an account whose credit is gone).
    pub fn quota_exhausted_for(mut self, model: impl Into<String>) -> Self {
        self.scenario.quota_models.push(model.into());
        self
    }

    /// Add a scripted error (see [`Fault`]).
    pub fn fault(mut self, fault: Fault) -> Self {
        self.scenario.faults.push(fault);
        self
    }

    /// `model` answers only its dialect's overload error (Anthropic 529,
    /// OpenAI and Gemini 503) for requests arriving in `[from, until)`.
    pub fn outage(self, model: impl Into<String>, from: Duration, until: Duration) -> Self {
        self.outage_inner(model.into(), from, until, None)
    }

    /// Like [`outage`](Self::outage), with a chosen status (e.g. 500 or 502).
    pub fn outage_with_status(
        self,
        model: impl Into<String>,
        from: Duration,
        until: Duration,
        status: u16,
    ) -> Self {
        self.outage_inner(model.into(), from, until, Some(status))
    }

    fn outage_inner(
        mut self,
        model: String,
        from: Duration,
        until: Duration,
        status: Option<u16>,
    ) -> Self {
        self.scenario.outages.push(Outage {
            model,
            from,
            until,
            status,
        });
        self
    }

    /// Time from a request's arrival to a success's response head. For a
    /// non-streamed success the token intervals are added (the whole answer
    /// must be generated before the head is sent).
    pub fn latency(mut self, latency: Latency) -> Self {
        self.scenario.latency = latency;
        self
    }

    /// Time from a request's arrival to an error's response head.
    pub fn error_latency(mut self, latency: Latency) -> Self {
        self.scenario.error_latency = latency;
        self
    }

    /// Gap before each streamed token (and per token of a non-streamed answer).
    pub fn token_interval(mut self, interval: Latency) -> Self {
        self.scenario.token_interval = interval;
        self
    }

    /// Add a stream fault for every model.
    pub fn stream_fault(mut self, fault: StreamFault) -> Self {
        self.scenario.stream_faults.push((None, fault));
        self
    }

    /// Add a stream fault for one model only.
    pub fn stream_fault_for(mut self, model: impl Into<String>, fault: StreamFault) -> Self {
        self.scenario
            .stream_faults
            .push((Some(model.into()), fault));
        self
    }

    /// How long a stall holds the connection before the body ends with an error (default 1 h).
    pub fn stall_duration(mut self, duration: Duration) -> Self {
        self.scenario.stall_duration = duration;
        self
    }

    /// Largest request body accepted; larger bodies get 413 (default 32 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.scenario.max_body_bytes = bytes;
        self
    }

    /// Wall-clock time of the simulator's t = 0, for `date` headers, RFC 3339
    /// resets and `created` fields. Default: the real time when the simulator
    /// is created, truncated to whole seconds. Set it for byte-stable output.
    pub fn wall_clock(mut self, start: SystemTime) -> Self {
        self.scenario.wall_clock = Some(start);
        self
    }

    /// Check the scenario and finish it.
    ///
    /// # Errors
    ///
    /// [`ScenarioError`] for a probability outside `[0, 1]`, a uniform latency
    /// with `min > max`, a time window that ends before it starts, a zero
    /// limit, window or context, a status outside 400..=599, or a duplicate
    /// or empty model name.
    pub fn build(self) -> Result<Scenario, ScenarioError> {
        let s = self.scenario;
        if s.rpm_limit == Some(0) {
            return Err(ScenarioError::ZeroLimit { what: "rpm_limit" });
        }
        if s.tpm_limit == Some(0) {
            return Err(ScenarioError::ZeroLimit { what: "tpm_limit" });
        }
        if s.rate_window.is_zero() {
            return Err(ScenarioError::InvalidWindow {
                what: "rate_window".into(),
                reason: "must be longer than zero".into(),
            });
        }
        s.latency.validate("latency")?;
        s.error_latency.validate("error_latency")?;
        s.token_interval.validate("token_interval")?;
        let mut specs: Vec<&ModelSpec> = s.models.iter().collect();
        specs.push(&s.default_model);
        for (i, m) in specs.iter().enumerate() {
            let is_default = i == specs.len() - 1;
            if !is_default {
                if m.name.is_empty() {
                    return Err(ScenarioError::InvalidModel {
                        name: m.name.clone(),
                        reason: "empty name",
                    });
                }
                if s.models[..i].iter().any(|o| o.name == m.name) {
                    return Err(ScenarioError::InvalidModel {
                        name: m.name.clone(),
                        reason: "described twice",
                    });
                }
            }
            if m.context_window == 0 {
                return Err(ScenarioError::InvalidModel {
                    name: m.name.clone(),
                    reason: "context window of zero",
                });
            }
            if let Some(l) = &m.latency {
                l.validate("model latency")?;
            }
            if let Some(l) = &m.token_interval {
                l.validate("model token_interval")?;
            }
        }
        for f in &s.faults {
            check_status(f.status)?;
            check_probability(&format!("fault {}", f.status), f.probability)?;
            if let Some((from, until)) = f.window {
                check_window(&format!("fault {}", f.status), from, until)?;
            }
        }
        for o in &s.outages {
            if let Some(status) = o.status {
                check_status(status)?;
            }
            check_window(&format!("outage of {}", o.model), o.from, o.until)?;
        }
        for (_, f) in &s.stream_faults {
            check_probability("stream fault", f.probability())?;
        }
        Ok(s)
    }
}

fn check_status(status: u16) -> Result<(), ScenarioError> {
    if (400..=599).contains(&status) {
        Ok(())
    } else {
        Err(ScenarioError::InvalidStatus { status })
    }
}

fn check_probability(what: &str, value: f64) -> Result<(), ScenarioError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ScenarioError::InvalidProbability {
            what: what.to_owned(),
            value,
        })
    }
}

fn check_window(what: &str, from: Duration, until: Duration) -> Result<(), ScenarioError> {
    if until > from {
        Ok(())
    } else {
        Err(ScenarioError::InvalidWindow {
            what: what.to_owned(),
            reason: format!("ends ({until:?}) before it starts ({from:?})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nonsense() {
        assert!(matches!(
            Scenario::builder()
                .fault(Fault::status(500).probability(1.5))
                .build(),
            Err(ScenarioError::InvalidProbability { .. })
        ));
        assert!(matches!(
            Scenario::builder()
                .fault(Fault::status(500).probability(f64::NAN))
                .build(),
            Err(ScenarioError::InvalidProbability { .. })
        ));
        assert!(matches!(
            Scenario::builder().fault(Fault::status(200)).build(),
            Err(ScenarioError::InvalidStatus { status: 200 })
        ));
        assert!(matches!(
            Scenario::builder().rpm_limit(0).build(),
            Err(ScenarioError::ZeroLimit { .. })
        ));
        assert!(matches!(
            Scenario::builder()
                .latency(Latency::uniform(
                    Duration::from_secs(2),
                    Duration::from_secs(1)
                ))
                .build(),
            Err(ScenarioError::InvalidLatency { .. })
        ));
        assert!(matches!(
            Scenario::builder()
                .outage("m", Duration::from_secs(5), Duration::from_secs(5))
                .build(),
            Err(ScenarioError::InvalidWindow { .. })
        ));
        assert!(matches!(
            Scenario::builder()
                .model(ModelSpec::new("a"))
                .model(ModelSpec::new("a"))
                .build(),
            Err(ScenarioError::InvalidModel { .. })
        ));
        assert!(matches!(
            Scenario::builder()
                .model(ModelSpec::new("a").context_window(0))
                .build(),
            Err(ScenarioError::InvalidModel { .. })
        ));
    }

    #[test]
    fn uniform_latency_stays_in_range_and_is_seeded() {
        let l = Latency::uniform(Duration::from_millis(10), Duration::from_millis(20));
        let mut a = fastrand::Rng::with_seed(1);
        let mut b = fastrand::Rng::with_seed(1);
        for _ in 0..1000 {
            let x = l.sample(&mut a);
            assert!(x >= Duration::from_millis(10) && x <= Duration::from_millis(20));
            assert_eq!(x, l.sample(&mut b));
        }
    }

    #[test]
    fn fault_matching() {
        let f = Fault::status(503)
            .between(Duration::from_secs(10), Duration::from_secs(20))
            .model("a");
        assert!(!f.matches(Duration::from_secs(9), "a"));
        assert!(f.matches(Duration::from_secs(10), "a"));
        assert!(!f.matches(Duration::from_secs(10), "b"));
        assert!(!f.matches(Duration::from_secs(20), "a"));
    }
}
