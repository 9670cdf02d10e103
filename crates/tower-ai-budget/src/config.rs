//! The budget's configuration, its builder and the price table.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_ai_core::keys::Global;

use crate::event::BudgetListener;
use crate::layer::TokenBudgetLayer;
use crate::store::{BudgetStore, StoreLimits, Stored};

/// Output tokens reserved for a request that names no `max_tokens`: 1024. The reservation is
/// corrected to the actual usage once the response says it.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 1024;
/// Default longest wait for a request that does not fit yet: 10 s.
///
/// Shorter than the time most callers will wait for an answer, for requests that do not
/// say their [`Deadline`](tower_ai_core::Deadline): a queue longer than that spends the
/// provider's capacity on requests whose callers have already given up (the overload
/// scenario in `benches/scenarios.rs`, before requests carried their caller's deadline,
/// served 38 % of capacity to callers in time with 60 s, 94 % with 10 s). When requests
/// carry their deadline, a `max_wait` as long as the longest deadline and an
/// [`expected_service`](TokenBudgetBuilder::expected_service) serve 100 % there (see
/// [Queue discipline](crate#queue-discipline)). Raise it for batch work that has no caller
/// waiting.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);
/// Default most keys held (besides the overflow key): 10 000.
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// Default largest non-streamed response body copied to read its usage: 1 MiB.
pub const DEFAULT_MAX_USAGE_BODY: usize = 1024 * 1024;
/// Default most requests waiting in one key's queue: 256. A queue longer than what the
/// key's limits can admit within `max_wait` only holds requests that will time out (256
/// is 10 s of a 1,536-requests-a-minute limit).
pub const DEFAULT_MAX_WAITERS_PER_KEY: usize = 256;
/// Default most requests waiting in all queues of a budget: 4,096. Each waiter holds its
/// request (body included) until it is sent or refused.
pub const DEFAULT_MAX_WAITERS: usize = 4096;
/// The longest `max_wait` accepted: one day.
pub const MAX_WAIT_CEILING: Duration = Duration::from_secs(24 * 3600);

/// What to do with a request that does not fit the budget now (but would later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait in the response future, in FIFO order per key, until it fits; give up with
    /// [`BudgetExceeded`](tower_ai_core::AiError::BudgetExceeded) after `max_wait`, or at
    /// once when the budget can already tell it will not fit within `max_wait`.
    Wait {
        /// The longest wait.
        max_wait: Duration,
    },
    /// Refuse at once with [`BudgetExceeded`](tower_ai_core::AiError::BudgetExceeded),
    /// saying when it would fit.
    Reject,
}

impl Default for WhenFull {
    fn default() -> Self {
        WhenFull::Wait {
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

/// The price of one model, in any currency, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    /// Price of a million input (prompt) tokens.
    pub input_per_million: f64,
    /// Price of a million output (completion) tokens.
    pub output_per_million: f64,
}

impl ModelPrice {
    /// A price per million input and output tokens.
    pub const fn per_million(input: f64, output: f64) -> Self {
        ModelPrice {
            input_per_million: input,
            output_per_million: output,
        }
    }
}

/// What a spend cap does with a request for a model the [`PriceTable`] does not list (or a
/// request with no model at all).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum UnknownModel {
    /// Refuse it at once with `BudgetExceeded { limit: SpendPerHour | SpendPerDay,
    /// retry_after: None }`: a cap that cannot price a request cannot be enforced. The
    /// default, because the point of a cap is that nothing gets past it uncounted.
    #[default]
    Reject,
    /// Price it as this model.
    Assume(ModelPrice),
    /// Let it through at no cost (it still counts against request and token limits).
    Free,
}

/// Prices per model, for spend caps.
///
/// Models are matched by exact name first, then by the longest listed name the model
/// starts with followed by `-`, so `"gpt-4o"` also prices `"gpt-4o-2024-08-06"`.
///
/// # Azure OpenAI
///
/// On Azure the deployment, not the body's `model`, decides which model runs (and the
/// body is written by the caller), so an Azure request is priced by its deployment: the
/// `{deployment}` of `/openai/deployments/{deployment}/…`, or, on the v1 API
/// (`/openai/v1/…`), the body's `model`, which names the deployment there. The deployment
/// is looked up in the [`deployment`](Self::deployment) prices first, then as a model
/// name (deployments are often named after their model; the operator names them, not the
/// caller), then priced by the [`UnknownModel`] policy. The body's `model` never prices a
/// request to `/openai/deployments/…`.
///
/// ```
/// use tower_ai_budget::{ModelPrice, PriceTable, UnknownModel};
/// let prices = PriceTable::new()
///     .model("gpt-4o", 2.50, 10.00)
///     .model("claude-sonnet-4-5", 3.00, 15.00)
///     .unknown(UnknownModel::Assume(ModelPrice::per_million(15.0, 75.0)));
/// # let _ = prices;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    models: HashMap<Box<str>, ModelPrice>,
    deployments: HashMap<Box<str>, ModelPrice>,
    unknown: UnknownModel,
}

impl PriceTable {
    /// An empty table; unknown models are rejected.
    pub fn new() -> Self {
        PriceTable::default()
    }

    /// Adds (or replaces) a model's price per million input and output tokens.
    pub fn model(mut self, name: impl Into<Box<str>>, input: f64, output: f64) -> Self {
        self.models
            .insert(name.into(), ModelPrice::per_million(input, output));
        self
    }

    /// Adds (or replaces) the price of an Azure OpenAI deployment, per million input and
    /// output tokens: what requests to it cost whatever `model` their body names (see
    /// [Azure OpenAI](#azure-openai)).
    ///
    /// ```
    /// use tower_ai_budget::PriceTable;
    /// let prices = PriceTable::new()
    ///     .model("gpt-4o", 2.50, 10.00)
    ///     .deployment("prod-chat", 2.50, 10.00); // a gpt-4o deployment
    /// # let _ = prices;
    /// ```
    pub fn deployment(mut self, name: impl Into<Box<str>>, input: f64, output: f64) -> Self {
        self.deployments
            .insert(name.into(), ModelPrice::per_million(input, output));
        self
    }

    /// What to do with models the table does not list (default [`UnknownModel::Reject`]).
    pub fn unknown(mut self, policy: UnknownModel) -> Self {
        self.unknown = policy;
        self
    }
}

/// A price in nano-units of the currency per token, as the budget counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct NanoPrice {
    pub(crate) input: u64,
    pub(crate) output: u64,
}

impl NanoPrice {
    /// Nano-units of currency for `input` and `output` tokens (saturating).
    pub(crate) fn cost(&self, input: u64, output: u64) -> u64 {
        input
            .saturating_mul(self.input)
            .saturating_add(output.saturating_mul(self.output))
    }
}

/// Money as the budget counts it: nano-units (1e-9) of the currency. A price of $X per
/// million tokens is `X × 1000` nano-units per token.
pub(crate) fn to_nanos(units: f64) -> u64 {
    let n = units * 1e9;
    if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n.round() as u64
    }
}

#[derive(Debug)]
pub(crate) enum PriceOf {
    Known(NanoPrice),
    Unknown,
}

#[derive(Debug, Default)]
pub(crate) struct Prices {
    models: HashMap<Box<str>, NanoPrice>,
    deployments: HashMap<Box<str>, NanoPrice>,
    unknown: Option<NanoPrice>,
}

impl Prices {
    pub(crate) fn of(&self, model: Option<&str>) -> PriceOf {
        let found = model.and_then(|m| {
            self.models.get(m).copied().or_else(|| {
                // Longest listed name that is a dated/suffixed prefix of the model.
                self.models
                    .iter()
                    .filter(|(k, _)| {
                        m.len() > k.len() && m.starts_with(&***k) && m.as_bytes()[k.len()] == b'-'
                    })
                    .max_by_key(|(k, _)| k.len())
                    .map(|(_, p)| *p)
            })
        });
        match found.or(self.unknown) {
            Some(p) => PriceOf::Known(p),
            None => PriceOf::Unknown,
        }
    }

    /// The price of a request to an Azure deployment: its own price, else its name as a
    /// model, else the unknown-model policy.
    pub(crate) fn of_deployment(&self, deployment: Option<&str>) -> PriceOf {
        match deployment.and_then(|d| self.deployments.get(d)) {
            Some(p) => PriceOf::Known(*p),
            None => self.of(deployment),
        }
    }
}

/// The validated limits a budget enforces.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) requests_per_minute: Option<u64>,
    pub(crate) tokens_per_minute: Option<u64>,
    pub(crate) max_concurrent: Option<u32>,
    pub(crate) spend_per_hour: Option<u64>,
    pub(crate) spend_per_day: Option<u64>,
    pub(crate) prices: Prices,
    pub(crate) when_full: WhenFull,
    pub(crate) default_output_tokens: u64,
    pub(crate) soft_limit: Option<f64>,
    pub(crate) sync_from_headers: bool,
    pub(crate) max_keys: usize,
    pub(crate) max_usage_body: usize,
    pub(crate) max_waiters_per_key: usize,
    pub(crate) max_waiters: usize,
    pub(crate) max_event: usize,
    /// The shared store that decides instead of the in-process state, if any.
    pub(crate) store: Option<Stored>,
    pub(crate) expected_service: Duration,
}

impl Limits {
    /// Whether the request's token estimate is needed.
    pub(crate) fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.counts_spend()
    }
    pub(crate) fn counts_spend(&self) -> bool {
        self.spend_per_hour.is_some() || self.spend_per_day.is_some()
    }
}

/// A configuration that makes no sense, found by [`TokenBudgetBuilder::build`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No limit is set: the budget would do nothing.
    #[error("no limit set: set at least one of requests_per_minute, tokens_per_minute, max_concurrent, spend_per_hour, spend_per_day")]
    NoLimit,
    /// A limit of zero would refuse everything.
    #[error("{0} must be greater than zero (leave it unset for no limit)")]
    Zero(&'static str),
    /// A money amount or price that is negative, NaN or infinite.
    #[error("{what} must be a finite, non-negative amount, got {value}")]
    BadAmount {
        /// Which setting.
        what: String,
        /// The value given.
        value: f64,
    },
    /// A soft-limit threshold outside (0, 1].
    #[error("soft_limit must be in (0, 1], got {0}")]
    BadSoftLimit(f64),
    /// A wait longer than [`MAX_WAIT_CEILING`] or zero.
    #[error("max_wait must be between 1 ms and {MAX_WAIT_CEILING:?}, got {0:?}")]
    BadMaxWait(Duration),
    /// A spend cap with nothing to price requests: every request would be refused.
    #[error("a spend cap needs prices: add models to the PriceTable or set an UnknownModel policy other than Reject")]
    NoPrices,
}

/// Builds a [`TokenBudgetLayer`]; see [`TokenBudgetLayer::builder`].
///
/// `K` is the key function ([`Global`] by default), `L` the event listener (`()`, none).
pub struct TokenBudgetBuilder<K = Global, L = ()> {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    max_concurrent: Option<u32>,
    spend_per_hour: Option<f64>,
    spend_per_day: Option<f64>,
    prices: PriceTable,
    when_full: WhenFull,
    default_output_tokens: u64,
    soft_limit: Option<f64>,
    sync_from_headers: bool,
    max_keys: usize,
    max_usage_body: usize,
    max_waiters_per_key: usize,
    max_waiters: usize,
    max_event: usize,
    store: Option<Arc<dyn BudgetStore>>,
    expected_service: Duration,
    key_fn: K,
    listener: L,
}

impl<K, L> fmt::Debug for TokenBudgetBuilder<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudgetBuilder")
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("max_concurrent", &self.max_concurrent)
            .field("spend_per_hour", &self.spend_per_hour)
            .field("spend_per_day", &self.spend_per_day)
            .field("when_full", &self.when_full)
            .field("store", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for TokenBudgetBuilder {
    fn default() -> Self {
        TokenBudgetBuilder {
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
            spend_per_hour: None,
            spend_per_day: None,
            prices: PriceTable::new(),
            when_full: WhenFull::default(),
            default_output_tokens: DEFAULT_OUTPUT_TOKENS,
            soft_limit: None,
            sync_from_headers: false,
            max_keys: DEFAULT_MAX_KEYS,
            max_usage_body: DEFAULT_MAX_USAGE_BODY,
            max_waiters_per_key: DEFAULT_MAX_WAITERS_PER_KEY,
            max_waiters: DEFAULT_MAX_WAITERS,
            max_event: tower_ai_core::sse::DEFAULT_MAX_EVENT,
            store: None,
            expected_service: Duration::ZERO,
            key_fn: Global,
            listener: (),
        }
    }
}

impl<K, L> TokenBudgetBuilder<K, L> {
    /// Requests admitted per sliding minute.
    pub fn requests_per_minute(mut self, n: u64) -> Self {
        self.requests_per_minute = Some(n);
        self
    }

    /// Tokens admitted per sliding minute: a request reserves its input estimate plus its
    /// `max_tokens` (or [`default_output_tokens`](Self::default_output_tokens)) before the
    /// call, corrected to its actual usage after.
    pub fn tokens_per_minute(mut self, n: u64) -> Self {
        self.tokens_per_minute = Some(n);
        self
    }

    /// Requests in flight at once (from the call until the response body ends or is
    /// dropped).
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.max_concurrent = Some(n);
        self
    }

    /// Money spent per sliding hour, in the price table's currency.
    pub fn spend_per_hour(mut self, amount: f64) -> Self {
        self.spend_per_hour = Some(amount);
        self
    }

    /// Money spent per sliding day, in the price table's currency.
    pub fn spend_per_day(mut self, amount: f64) -> Self {
        self.spend_per_day = Some(amount);
        self
    }

    /// The prices spend caps use.
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// What to do with a request that does not fit now (default: wait up to 10 s).
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Wait up to `max_wait` for a request to fit (the default, with 10 s).
    pub fn wait(self, max_wait: Duration) -> Self {
        self.when_full(WhenFull::Wait { max_wait })
    }

    /// How long a request takes once sent, for a request that carries a
    /// [`Deadline`](tower_ai_core::Deadline) (default zero). In wait mode such a request
    /// waits only while it can still be *answered* by its deadline: it is refused at once
    /// when its predicted start (when the budget will have room for it and for everyone
    /// queued before it) is later than `deadline - expected_service`, and a waiter gives
    /// up then. Set it to the latency most answers take (a p99), so that no capacity goes
    /// to answers that arrive after their caller gave up; see
    /// [Queue discipline](crate#queue-discipline). Requests without a deadline are not
    /// affected (they wait up to `max_wait`).
    pub fn expected_service(mut self, d: Duration) -> Self {
        self.expected_service = d;
        self
    }

    /// Refuse at once a request that does not fit.
    pub fn reject(self) -> Self {
        self.when_full(WhenFull::Reject)
    }

    /// Output tokens reserved for a request that names no `max_tokens` (default
    /// [`DEFAULT_OUTPUT_TOKENS`]).
    pub fn default_output_tokens(mut self, n: u64) -> Self {
        self.default_output_tokens = n;
        self
    }

    /// Emit a [`BudgetEvent::SoftLimit`](crate::BudgetEvent::SoftLimit) (and a `tracing`
    /// warning) when an admitted request takes a limit past this fraction of it (e.g.
    /// `0.8`). Off by default.
    pub fn soft_limit(mut self, fraction: f64) -> Self {
        self.soft_limit = Some(fraction);
        self
    }

    /// Correct the budget's view from the provider's rate-limit headers
    /// (`x-ratelimit-*`, `anthropic-ratelimit-*`): when the provider says more of a minute
    /// limit is used than the budget counted (other clients share the account), the
    /// budget counts that much. It only ever tightens. Off by default.
    pub fn sync_from_headers(mut self, on: bool) -> Self {
        self.sync_from_headers = on;
        self
    }

    /// Keys held at most (default [`DEFAULT_MAX_KEYS`]), besides the overflow key.
    ///
    /// A key is forgotten only when it has nothing to lose: nothing in flight, waiting or
    /// reserved, and every window emptied. While the map is full of keys that still hold
    /// something, a new key shares the *overflow key*: one more set of the same limits,
    /// shared by every key that found no room (see the [crate docs](crate#keys)).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The most requests waiting in one key's queue (default
    /// [`DEFAULT_MAX_WAITERS_PER_KEY`]); one more is refused at once with
    /// `BudgetExceeded`.
    pub fn max_waiters_per_key(mut self, n: usize) -> Self {
        self.max_waiters_per_key = n;
        self
    }

    /// The most requests waiting in all queues (default [`DEFAULT_MAX_WAITERS`]); one
    /// more is refused at once with `BudgetExceeded`.
    pub fn max_waiters(mut self, n: usize) -> Self {
        self.max_waiters = n;
        self
    }

    /// Largest non-streamed response body copied to read its usage (default 1 MiB). A
    /// larger body passes through untouched and keeps its reservation.
    pub fn max_usage_body(mut self, bytes: usize) -> Self {
        self.max_usage_body = bytes;
        self
    }

    /// Largest SSE event of a streamed response read whole for its usage (default 4 MiB,
    /// [`DEFAULT_MAX_EVENT`](tower_ai_core::sse::DEFAULT_MAX_EVENT)); the scanner holds at
    /// most this much of one event. A larger event (an OpenAI Responses
    /// `response.completed` with a generated image inline, a Gemini chunk with inline
    /// data) is not read whole, but its name and the start of its data still tell a
    /// terminal event or an error, and the end of its data (its last 16 KiB, less for a
    /// bound under 32 KiB) the usage object these events end with (OpenAI's `usage`,
    /// Gemini's `usageMetadata`), so the stream is judged as it ended and settles on that
    /// usage. Only when a large event shows no usage at its end (an OpenAI Chat chunk with
    /// a large delta, whose usage comes in a chunk of its own) is the reservation kept as
    /// the floor, since what it held is not known. Raise it when such events matter for
    /// the count.
    pub fn max_event(mut self, bytes: usize) -> Self {
        self.max_event = bytes;
        self
    }

    /// Keeps the budget's state in a shared store instead of this process (e.g.
    /// `tower-ai-redis`'s `RedisBudget`, so several replicas share one set of limits). The
    /// store decides every admission (and its own fall-back when its backend is down);
    /// the layer still estimates each request and reads its usage from the response, and
    /// tells the store what the request cost when its body ends. Without a store (the
    /// default) the in-process state decides, on the same paths as before.
    ///
    /// With a store, a refused request in wait mode is asked about again when the store
    /// says it may fit (every 10 ms for a concurrency limit, whose time no replica knows;
    /// there is no queue across replicas), and
    /// [`sync_from_headers`](Self::sync_from_headers) and soft-limit events are not applied.
    pub fn store(mut self, store: impl BudgetStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The key function: [`Global`] (the default: one budget for everything through the
    /// layer), [`ApiKeyHash`](tower_ai_core::keys::ApiKeyHash) (one per API key),
    /// [`HostModel`](tower_ai_core::keys::HostModel) (one per provider and model), or a
    /// closure (tenants).
    pub fn key_fn<K2>(self, key_fn: K2) -> TokenBudgetBuilder<K2, L> {
        TokenBudgetBuilder {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
            spend_per_hour: self.spend_per_hour,
            spend_per_day: self.spend_per_day,
            prices: self.prices,
            when_full: self.when_full,
            default_output_tokens: self.default_output_tokens,
            soft_limit: self.soft_limit,
            sync_from_headers: self.sync_from_headers,
            max_keys: self.max_keys,
            max_usage_body: self.max_usage_body,
            max_waiters_per_key: self.max_waiters_per_key,
            max_waiters: self.max_waiters,
            max_event: self.max_event,
            store: self.store,
            expected_service: self.expected_service,
            key_fn,
            listener: self.listener,
        }
    }

    /// The event listener (a `Fn(&BudgetEvent)` or anything implementing
    /// [`BudgetListener`]).
    pub fn listener<L2: BudgetListener>(self, listener: L2) -> TokenBudgetBuilder<K, L2> {
        TokenBudgetBuilder {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
            spend_per_hour: self.spend_per_hour,
            spend_per_day: self.spend_per_day,
            prices: self.prices,
            when_full: self.when_full,
            default_output_tokens: self.default_output_tokens,
            soft_limit: self.soft_limit,
            sync_from_headers: self.sync_from_headers,
            max_keys: self.max_keys,
            max_usage_body: self.max_usage_body,
            max_waiters_per_key: self.max_waiters_per_key,
            max_waiters: self.max_waiters,
            max_event: self.max_event,
            store: self.store,
            expected_service: self.expected_service,
            key_fn: self.key_fn,
            listener,
        }
    }

    /// Validates the configuration and builds the layer (and its shared state).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when no limit is set, a limit is zero, an amount is negative or not
    /// finite, the soft limit is outside (0, 1], `max_wait` is zero or over a day, or a spend
    /// cap has no way to price requests.
    pub fn build(self) -> Result<TokenBudgetLayer<K, L>, ConfigError> {
        let limits = self.validate()?;
        Ok(TokenBudgetLayer::from_parts(
            Arc::new(limits),
            self.key_fn,
            self.listener,
        ))
    }

    fn validate(&self) -> Result<Limits, ConfigError> {
        if self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.max_concurrent.is_none()
            && self.spend_per_hour.is_none()
            && self.spend_per_day.is_none()
        {
            return Err(ConfigError::NoLimit);
        }
        let nonzero = |v: Option<u64>, what| match v {
            Some(0) => Err(ConfigError::Zero(what)),
            _ => Ok(()),
        };
        nonzero(self.requests_per_minute, "requests_per_minute")?;
        nonzero(self.tokens_per_minute, "tokens_per_minute")?;
        nonzero(self.max_concurrent.map(u64::from), "max_concurrent")?;
        nonzero(Some(self.max_keys as u64), "max_keys")?;
        nonzero(Some(self.max_waiters_per_key as u64), "max_waiters_per_key")?;
        nonzero(Some(self.max_waiters as u64), "max_waiters")?;
        let amount = |what: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(ConfigError::BadAmount {
                    what: what.to_owned(),
                    value: v,
                })
            }
        };
        let cap = |what: &'static str, v: Option<f64>| -> Result<Option<u64>, ConfigError> {
            match v {
                None => Ok(None),
                Some(v) => {
                    let n = to_nanos(amount(what, v)?);
                    if n == 0 {
                        return Err(ConfigError::Zero(what));
                    }
                    Ok(Some(n))
                }
            }
        };
        let spend_per_hour = cap("spend_per_hour", self.spend_per_hour)?;
        let spend_per_day = cap("spend_per_day", self.spend_per_day)?;
        // $X per million tokens = X × 1000 nano-units per token.
        let nano = |name: &str, p: &ModelPrice| -> Result<NanoPrice, ConfigError> {
            Ok(NanoPrice {
                input: to_nanos(
                    amount(&format!("input price of {name}"), p.input_per_million)? / 1e6,
                ),
                output: to_nanos(
                    amount(&format!("output price of {name}"), p.output_per_million)? / 1e6,
                ),
            })
        };
        let mut models = HashMap::with_capacity(self.prices.models.len());
        for (name, p) in &self.prices.models {
            models.insert(name.clone(), nano(name, p)?);
        }
        let mut deployments = HashMap::with_capacity(self.prices.deployments.len());
        for (name, p) in &self.prices.deployments {
            deployments.insert(name.clone(), nano(name, p)?);
        }
        let unknown = match &self.prices.unknown {
            UnknownModel::Reject => None,
            UnknownModel::Assume(p) => Some(nano("unknown models", p)?),
            UnknownModel::Free => Some(NanoPrice::default()),
        };
        if (spend_per_hour.is_some() || spend_per_day.is_some())
            && models.is_empty()
            && deployments.is_empty()
            && unknown.is_none()
        {
            return Err(ConfigError::NoPrices);
        }
        if let Some(s) = self.soft_limit {
            if !(s > 0.0 && s <= 1.0) {
                return Err(ConfigError::BadSoftLimit(s));
            }
        }
        if let WhenFull::Wait { max_wait } = self.when_full {
            if max_wait < Duration::from_millis(1) || max_wait > MAX_WAIT_CEILING {
                return Err(ConfigError::BadMaxWait(max_wait));
            }
        }
        Ok(Limits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
            spend_per_hour,
            spend_per_day,
            prices: Prices {
                models,
                deployments,
                unknown,
            },
            when_full: self.when_full,
            default_output_tokens: self.default_output_tokens,
            soft_limit: self.soft_limit,
            sync_from_headers: self.sync_from_headers,
            max_keys: self.max_keys,
            max_usage_body: self.max_usage_body,
            max_waiters_per_key: self.max_waiters_per_key,
            max_waiters: self.max_waiters,
            max_event: self.max_event,
            store: self.store.clone().map(|store| Stored {
                store,
                limits: StoreLimits {
                    requests_per_minute: self.requests_per_minute,
                    tokens_per_minute: self.tokens_per_minute,
                    max_concurrent: self.max_concurrent,
                    spend_per_hour,
                    spend_per_day,
                    max_wait: match self.when_full {
                        WhenFull::Wait { max_wait } => Some(max_wait),
                        WhenFull::Reject => None,
                    },
                },
            }),
            // An absurd value is clamped (a day is longer than any call), never refused.
            expected_service: self.expected_service.min(MAX_WAIT_CEILING),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_says_what_is_wrong() {
        let b = || TokenBudgetLayer::builder();
        assert_eq!(b().build().unwrap_err(), ConfigError::NoLimit);
        assert_eq!(
            b().requests_per_minute(0).build().unwrap_err(),
            ConfigError::Zero("requests_per_minute")
        );
        assert!(matches!(
            b().spend_per_day(f64::NAN).build().unwrap_err(),
            ConfigError::BadAmount { .. }
        ));
        assert_eq!(
            b().spend_per_day(10.0).build().unwrap_err(),
            ConfigError::NoPrices
        );
        assert!(b()
            .spend_per_day(10.0)
            .prices(PriceTable::new().unknown(UnknownModel::Free))
            .build()
            .is_ok());
        assert!(matches!(
            b().spend_per_day(10.0)
                .prices(PriceTable::new().model("m", -1.0, 1.0))
                .build()
                .unwrap_err(),
            ConfigError::BadAmount { .. }
        ));
        assert_eq!(
            b().tokens_per_minute(5)
                .soft_limit(1.5)
                .build()
                .unwrap_err(),
            ConfigError::BadSoftLimit(1.5)
        );
        assert!(matches!(
            b().tokens_per_minute(5)
                .wait(Duration::from_secs(7 * 24 * 3600))
                .build()
                .unwrap_err(),
            ConfigError::BadMaxWait(_)
        ));
        let e = b().max_concurrent(0).build().unwrap_err();
        assert!(e.to_string().contains("max_concurrent"), "{e}");
    }

    #[test]
    fn prices_match_exactly_then_by_dated_prefix() {
        let limits = TokenBudgetLayer::builder()
            .spend_per_day(1.0)
            .prices(
                PriceTable::new()
                    .model("gpt-4o", 2.5, 10.0)
                    .model("gpt-4o-mini", 0.15, 0.6),
            )
            .validate()
            .unwrap();
        let p = |m: Option<&str>| match limits.prices.of(m) {
            PriceOf::Known(p) => Some(p),
            PriceOf::Unknown => None,
        };
        assert_eq!(
            p(Some("gpt-4o")),
            Some(NanoPrice {
                input: 2500,
                output: 10_000
            })
        );
        assert_eq!(p(Some("gpt-4o-mini-2024-07-18")).unwrap().input, 150);
        assert_eq!(p(Some("gpt-4o-2024-08-06")).unwrap().input, 2500);
        assert_eq!(p(Some("gpt-4")), None);
        assert_eq!(p(None), None);
        assert_eq!(
            NanoPrice {
                input: 2500,
                output: 10_000
            }
            .cost(1_000_000, 0),
            to_nanos(2.5)
        );
        assert_eq!(
            NanoPrice {
                input: u64::MAX,
                output: 1
            }
            .cost(2, 2),
            u64::MAX
        );
    }
}
