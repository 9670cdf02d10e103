//! RetryAfterAware's configuration and its validating builder.

use std::time::Duration;

use std::sync::Arc;

use crate::cooldown::Tuning;
use crate::layer::RetryAfterAwareLayer;
use crate::store::CooldownStore;

/// Default most requests waiting for one key's cooldown: 256.
pub const DEFAULT_MAX_WAITERS_PER_KEY: usize = 256;
/// Default most requests waiting for cooldowns in all: 4,096. Each waiter holds its
/// request (body included) until it is sent or refused.
pub const DEFAULT_MAX_WAITERS: usize = 4096;

/// A configuration value that makes no sense, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: String) -> Self {
        ConfigError { field, reason }
    }

    /// The setting that was rejected.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// What a request for a key that is cooling down does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnCooldown {
    /// Wait in the response future until the cooldown ends (the default), unless the
    /// wait would be longer than `max_wait`: then fail at once with
    /// [`AiError::CoolingDown`](tower_ai_core::AiError::CoolingDown).
    Wait {
        /// The longest wait accepted, measured from the call. Default 60 s.
        max_wait: Duration,
    },
    /// Fail at once with [`AiError::CoolingDown`](tower_ai_core::AiError::CoolingDown).
    FailFast,
}

impl Default for OnCooldown {
    fn default() -> Self {
        OnCooldown::Wait {
            max_wait: Duration::from_secs(60),
        }
    }
}

/// RetryAfterAware's settings. See [`CooldownConfigBuilder`] for each one's default.
#[derive(Debug, Clone)]
pub struct CooldownConfig {
    pub(crate) on_cooldown: OnCooldown,
    pub(crate) release_spread: Duration,
    pub(crate) tuning: Tuning,
    pub(crate) seed: Option<u64>,
    /// The shared state, if any (`None`: in-process only, the default).
    pub(crate) store: Option<Arc<dyn CooldownStore>>,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        CooldownConfig {
            on_cooldown: OnCooldown::default(),
            release_spread: Duration::from_millis(250),
            tuning: Tuning {
                max_cooldown: Duration::from_secs(120),
                pace_below: 16,
                reset_margin: Duration::ZERO,
                recheck: Duration::from_millis(250),
                idle: Duration::from_secs(600),
                max_keys: 10_000,
                max_waiters_per_key: DEFAULT_MAX_WAITERS_PER_KEY,
                max_waiters: DEFAULT_MAX_WAITERS,
            },
            seed: None,
            store: None,
        }
    }
}

impl CooldownConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> CooldownConfigBuilder {
        CooldownConfigBuilder {
            cfg: CooldownConfig::default(),
        }
    }

    /// What a request does during a cooldown.
    pub fn on_cooldown(&self) -> OnCooldown {
        self.on_cooldown
    }
}

/// Builds a [`CooldownConfig`] (or directly a [`RetryAfterAwareLayer`]), checking every value.
#[derive(Debug, Clone)]
pub struct CooldownConfigBuilder {
    cfg: CooldownConfig,
}

impl CooldownConfigBuilder {
    /// Wait during a cooldown (up to `max_wait` from the call), the default with 60 s.
    pub fn wait(mut self, max_wait: Duration) -> Self {
        self.cfg.on_cooldown = OnCooldown::Wait { max_wait };
        self
    }

    /// Fail at once with `AiError::CoolingDown` during a cooldown.
    pub fn fail_fast(mut self) -> Self {
        self.cfg.on_cooldown = OnCooldown::FailFast;
        self
    }

    /// When a cooldown ends and the capacity behind it is unknown (a bare
    /// `Retry-After`), waiters are released at random over this window, not all at
    /// once. Default 250 ms. (When the headers give the bucket's size, waiters are
    /// released at once up to that capacity, and the rest keep waiting.)
    pub fn release_spread(mut self, d: Duration) -> Self {
        self.cfg.release_spread = d;
        self
    }

    /// The longest cooldown learned from one response; longer requests are cut to it
    /// (a hostile `Retry-After: 99999999` cannot stop a key for days). Default 120 s.
    pub fn max_cooldown(mut self, d: Duration) -> Self {
        self.cfg.tuning.max_cooldown = d;
        self
    }

    /// Start counting a key's sends against the provider's remaining requests once the
    /// headers show at most this many left (or at most 10 % of the limit). Default 16.
    pub fn pace_below(mut self, n: u64) -> Self {
        self.cfg.tuning.pace_below = n;
        self
    }

    /// Added to reset times read from rate-limit headers (measured from when the request
    /// was sent, as the provider stamps them when it admits it). Default 0.
    pub fn reset_margin(mut self, d: Duration) -> Self {
        self.cfg.tuning.reset_margin = d;
        self
    }

    /// How soon a request held for lack of capacity, with no refill time known yet,
    /// looks again. Default 250 ms.
    pub fn recheck(mut self, d: Duration) -> Self {
        self.cfg.tuning.recheck = d;
        self
    }

    /// Keys with no cooldown unseen for this long are evicted. Default 10 min.
    pub fn idle(mut self, d: Duration) -> Self {
        self.cfg.tuning.idle = d;
        self
    }

    /// The most keys kept (idle ones are evicted first, then the least recently seen of
    /// those without a running cooldown; a running cooldown is never evicted).
    /// Default 10,000.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.cfg.tuning.max_keys = n;
        self
    }

    /// The most requests waiting for one key's cooldown (default
    /// [`DEFAULT_MAX_WAITERS_PER_KEY`]); one more fails at once with
    /// `AiError::CoolingDown`.
    pub fn max_waiters_per_key(mut self, n: usize) -> Self {
        self.cfg.tuning.max_waiters_per_key = n;
        self
    }

    /// The most requests waiting for cooldowns in all (default [`DEFAULT_MAX_WAITERS`]);
    /// one more fails at once with `AiError::CoolingDown`.
    pub fn max_waiters(mut self, n: usize) -> Self {
        self.cfg.tuning.max_waiters = n;
        self
    }

    /// Shares cooldowns with other replicas through `store` (e.g. tower-ai-redis's
    /// `RedisCooldowns`): a cooldown learned here is published, and a request the local
    /// state lets go is checked against the shared state as the store says (every
    /// admission, or from a copy it refreshes). Without it (the default) the state is
    /// in-process and nothing on the call path changes. See [`crate::store`].
    pub fn store(mut self, store: impl CooldownStore) -> Self {
        self.cfg.store = Some(Arc::new(store));
        self
    }

    /// Seed of the release spread's random numbers. Default: from entropy.
    pub fn seed(mut self, seed: u64) -> Self {
        self.cfg.seed = Some(seed);
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting: a zero or over-a-day `max_wait` or
    /// `max_cooldown`; a release spread over 60 s; a zero or over-a-minute `recheck`;
    /// a zero `max_keys` or more than 10 million; an `idle` under 1 s or over a week; a
    /// reset margin over 60 s; a zero `max_waiters_per_key` or `max_waiters`, or more than
    /// 10 million.
    pub fn build_config(self) -> Result<CooldownConfig, ConfigError> {
        let c = &self.cfg;
        const DAY: Duration = Duration::from_secs(86_400);
        if let OnCooldown::Wait { max_wait } = c.on_cooldown {
            if max_wait.is_zero() || max_wait > DAY {
                return Err(ConfigError::new(
                    "max_wait",
                    format!("{max_wait:?} is outside (0, 1 day]; use fail_fast() not to wait"),
                ));
            }
        }
        let t = &c.tuning;
        if t.max_cooldown.is_zero() || t.max_cooldown > DAY {
            return Err(ConfigError::new(
                "max_cooldown",
                format!("{:?} is outside (0, 1 day]", t.max_cooldown),
            ));
        }
        if c.release_spread > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "release_spread",
                format!("{:?} is over 60 s", c.release_spread),
            ));
        }
        if t.recheck.is_zero() || t.recheck > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "recheck",
                format!("{:?} is outside (0, 60 s]", t.recheck),
            ));
        }
        if t.max_keys == 0 || t.max_keys > 10_000_000 {
            return Err(ConfigError::new(
                "max_keys",
                format!("{} is outside 1..=10,000,000", t.max_keys),
            ));
        }
        if t.idle < Duration::from_secs(1) || t.idle > 7 * DAY {
            return Err(ConfigError::new(
                "idle",
                format!("{:?} is outside [1 s, 1 week]", t.idle),
            ));
        }
        for (field, n) in [
            ("max_waiters_per_key", t.max_waiters_per_key),
            ("max_waiters", t.max_waiters),
        ] {
            if n == 0 || n > 10_000_000 {
                return Err(ConfigError::new(
                    field,
                    format!("{n} is outside 1..=10,000,000"),
                ));
            }
        }
        if t.reset_margin > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "reset_margin",
                format!("{:?} is over 60 s", t.reset_margin),
            ));
        }
        Ok(self.cfg)
    }

    /// Checks the settings and makes the layer (key: provider host + model).
    ///
    /// # Errors
    ///
    /// As [`build_config`](Self::build_config).
    pub fn build(self) -> Result<RetryAfterAwareLayer, ConfigError> {
        Ok(RetryAfterAwareLayer::with_config(self.build_config()?))
    }
}
