//! AiRetry's configuration and its validating builder.

use std::time::Duration;

use http::HeaderName;

use crate::backoff::{Backoff, Jitter};
use crate::budget::RetryBudget;
use crate::layer::AiRetryLayer;

/// A configuration value that makes no sense, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: String) -> Self {
        ConfigError { field, reason }
    }

    /// The setting that was rejected.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// What the caller gets when retries end on a failure that could have been retried
/// (attempts used up, deadline, budget, or a requested wait above the maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnExhausted {
    /// The provider's last response, unchanged (a 429 stays a 429 with its body), with a
    /// [`RetryStop`](crate::RetryStop) and its [`Classification`](tower_ai_core::Classification)
    /// in its extensions. The default.
    #[default]
    ReturnLast,
    /// An [`AiError::RetriesExhausted`](tower_ai_core::AiError::RetriesExhausted) with
    /// the attempts made, the last classification and (when that was the reason) the
    /// wait that was too long. The last response's body is dropped.
    Error,
}

/// AiRetry's settings. Build with [`AiRetryConfig::builder`]; the default is 3 attempts,
/// [`Backoff::default`], provider waits up to 60 s, no overall deadline, a
/// [`RetryBudget::default`], an `idempotency-key` header, an `x-stainless-retry-count`
/// header, and an open circuit below returned at once (not waited out).
#[derive(Debug, Clone)]
pub struct AiRetryConfig {
    pub(crate) max_attempts: u32,
    pub(crate) max_elapsed: Option<Duration>,
    pub(crate) backoff: Backoff,
    pub(crate) max_wait: Duration,
    pub(crate) on_exhausted: OnExhausted,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) idempotency_header: Option<HeaderName>,
    pub(crate) attempt_header: Option<HeaderName>,
    pub(crate) seed: Option<u64>,
    pub(crate) wait_on_open_circuit: bool,
}

impl Default for AiRetryConfig {
    fn default() -> Self {
        AiRetryConfig {
            max_attempts: 3,
            max_elapsed: None,
            backoff: Backoff::default(),
            max_wait: Duration::from_secs(60),
            on_exhausted: OnExhausted::ReturnLast,
            budget: Some(RetryBudget::default()),
            idempotency_header: Some(HeaderName::from_static("idempotency-key")),
            attempt_header: Some(HeaderName::from_static("x-stainless-retry-count")),
            seed: None,
            wait_on_open_circuit: false,
        }
    }
}

impl AiRetryConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> AiRetryConfigBuilder {
        AiRetryConfigBuilder::default()
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The deadline across attempts and waits, if any.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The longest provider-requested wait that is honoured.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The backoff used when the provider asks for no wait.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The retry budget, if any.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The idempotency-key header's name, if one is sent.
    pub fn idempotency_header(&self) -> Option<&HeaderName> {
        self.idempotency_header.as_ref()
    }

    /// The attempt-number header's name, if one is sent.
    pub fn attempt_header(&self) -> Option<&HeaderName> {
        self.attempt_header.as_ref()
    }
}

/// A header name in the builder: a checked one (the static defaults), or one a caller
/// gave, parsed by `build`.
#[derive(Debug, Clone)]
enum Header {
    Name(HeaderName),
    Given(String),
}

/// Builds an [`AiRetryConfig`] (or directly an [`AiRetryLayer`]), checking every value.
#[derive(Debug, Clone)]
pub struct AiRetryConfigBuilder {
    cfg: AiRetryConfig,
    /// Header names: the defaults are static (no allocation, no refcount); a caller's
    /// name is kept as given until `build` checks it.
    idempotency: Option<Header>,
    attempt: Option<Header>,
    budget: Option<(Duration, u32, f64)>,
}

impl Default for AiRetryConfigBuilder {
    fn default() -> Self {
        AiRetryConfigBuilder {
            cfg: AiRetryConfig {
                budget: None,
                ..AiRetryConfig::default()
            },
            idempotency: Some(Header::Name(HeaderName::from_static("idempotency-key"))),
            attempt: Some(Header::Name(HeaderName::from_static(
                "x-stainless-retry-count",
            ))),
            budget: Some((Duration::from_secs(10), 10, 0.2)),
        }
    }
}

impl AiRetryConfigBuilder {
    /// Attempts in all, the first included (1 = no retry; at most 100). Default 3.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.cfg.max_attempts = n;
        self
    }

    /// A deadline across all attempts and waits, measured from the call: no wait is
    /// started that would end at or after it. Default: none.
    pub fn max_elapsed(mut self, d: Duration) -> Self {
        self.cfg.max_elapsed = Some(d);
        self
    }

    /// The backoff used when the provider asks for no wait.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.cfg.backoff = b;
        self
    }

    /// The jitter of the backoff (keeps base, multiplier and cap).
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.cfg.backoff.jitter = j;
        self
    }

    /// The longest wait a provider may ask for (Retry-After and friends). A longer one
    /// ends the retries at once instead of sleeping for it. Default 60 s.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.cfg.max_wait = d;
        self
    }

    /// What the caller gets when retries run out. Default [`OnExhausted::ReturnLast`].
    pub fn on_exhausted(mut self, o: OnExhausted) -> Self {
        self.cfg.on_exhausted = o;
        self
    }

    /// A retry budget over `ttl` with a floor of `min_per_sec` retries per second plus
    /// `ratio` retries per call. Default 10 s, 10/s, 0.2.
    pub fn budget(mut self, ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        self.budget = Some((ttl, min_per_sec, ratio));
        self.cfg.budget = None;
        self
    }

    /// Use an existing budget (shared with other layers that hold it).
    pub fn shared_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = None;
        self.cfg.budget = Some(budget);
        self
    }

    /// No retry budget: only attempts and deadline limit retries.
    pub fn no_budget(mut self) -> Self {
        self.budget = None;
        self.cfg.budget = None;
        self
    }

    /// The idempotency-key header's name (default `idempotency-key`), or `None` to send
    /// none. Never sent on GET or HEAD; a key the caller set is kept.
    pub fn idempotency_header(mut self, name: Option<&str>) -> Self {
        self.idempotency = name.map(|n| Header::Given(n.to_owned()));
        self
    }

    /// The attempt-number header's name (default `x-stainless-retry-count`, `"0"` on
    /// the first attempt, as the official SDKs send), or `None`.
    pub fn attempt_header(mut self, name: Option<&str>) -> Self {
        self.attempt = name.map(|n| Header::Given(n.to_owned()));
        self
    }

    /// Whether a `CircuitOpen { until }` refusal from a breaker below is waited out like a
    /// provider's requested wait (within `max_wait` and the deadline). Default: no, the
    /// refusal is returned at once: the breaker has judged the provider sick, and its job
    /// is to fail fast. Waiting suits batch work with no caller watching the clock.
    pub fn wait_on_open_circuit(mut self, wait: bool) -> Self {
        self.cfg.wait_on_open_circuit = wait;
        self
    }

    /// Seed of the random numbers (jitter, idempotency keys), for reproducible runs.
    /// Default: from entropy.
    ///
    /// The layer draws its numbers from [fastrand](https://docs.rs/fastrand)'s small
    /// non-cryptographic generator (jitter needs speed and a seed, not secrecy: an
    /// idempotency key only has to differ between requests), one per service made from
    /// the layer, each seeded from this seed in turn. A program that keeps its own
    /// generator, say a `rand` `StdRng` seeded once so that a whole run can be replayed,
    /// brings it in through this seed: draw one `u64` from it for each layer it builds.
    ///
    /// ```
    /// use tower_ai_retry::AiRetryLayer;
    ///
    /// // The program's own generator (with rand: `let seed: u64 = rng.random();`).
    /// let mut program_rng = fastrand::Rng::with_seed(2024);
    /// let retry = AiRetryLayer::builder()
    ///     .max_attempts(4)
    ///     .seed(program_rng.u64(..))
    ///     .build()?;
    /// # let _ = retry;
    /// // The same program seed gives the same layer seed, hence the same jitter and keys.
    /// # Ok::<(), tower_ai_retry::ConfigError>(())
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.cfg.seed = Some(seed);
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting: zero or more than 100 attempts; a zero or
    /// over-a-day deadline; a zero base, a cap below the base or over an hour, a
    /// multiplier below 1, above 100 or not finite; a zero or over-a-day `max_wait`; a
    /// header name that is not a valid header name; a nonsensical budget.
    pub fn build_config(self) -> Result<AiRetryConfig, ConfigError> {
        let mut cfg = self.cfg;
        const DAY: Duration = Duration::from_secs(86_400);
        if cfg.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                "must be at least 1 (1 = no retry)".into(),
            ));
        }
        if cfg.max_attempts > 100 {
            return Err(ConfigError::new(
                "max_attempts",
                format!("{} is absurd (at most 100)", cfg.max_attempts),
            ));
        }
        if let Some(d) = cfg.max_elapsed {
            if d.is_zero() || d > DAY {
                return Err(ConfigError::new(
                    "max_elapsed",
                    format!("{d:?} is outside (0, 1 day]"),
                ));
            }
        }
        let b = cfg.backoff;
        if b.base.is_zero() {
            return Err(ConfigError::new(
                "backoff base",
                "must be longer than zero (a zero base retries in a tight loop)".into(),
            ));
        }
        if b.cap < b.base || b.cap > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "backoff cap",
                format!(
                    "{:?} must be between the base ({:?}) and 1 hour",
                    b.cap, b.base
                ),
            ));
        }
        if !b.multiplier.is_finite() || !(1.0..=100.0).contains(&b.multiplier) {
            return Err(ConfigError::new(
                "backoff multiplier",
                format!("{} is not in 1..=100", b.multiplier),
            ));
        }
        if cfg.max_wait.is_zero() || cfg.max_wait > DAY {
            return Err(ConfigError::new(
                "max_wait",
                format!("{:?} is outside (0, 1 day]", cfg.max_wait),
            ));
        }
        let header = |field: &'static str,
                      name: Option<Header>|
         -> Result<Option<HeaderName>, ConfigError> {
            name.map(|h| match h {
                Header::Name(n) => Ok(n),
                Header::Given(n) => HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                    ConfigError::new(field, format!("{n:?} is not a valid header name"))
                }),
            })
            .transpose()
        };
        cfg.idempotency_header = header("idempotency_header", self.idempotency)?;
        cfg.attempt_header = header("attempt_header", self.attempt)?;
        if let Some((ttl, min, ratio)) = self.budget {
            cfg.budget = Some(RetryBudget::new(ttl, min, ratio)?);
        }
        Ok(cfg)
    }

    /// Checks the settings and makes the layer.
    ///
    /// # Errors
    ///
    /// As [`build_config`](Self::build_config).
    pub fn build(self) -> Result<AiRetryLayer, ConfigError> {
        Ok(AiRetryLayer::with_config(self.build_config()?))
    }
}
