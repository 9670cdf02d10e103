//! The breaker's configuration, validated once in [`CircuitBreakerConfigBuilder::build`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_ai_core::ErrorKind;

/// Which calls the failure and slow-call rates are measured over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Window {
    /// The last `calls` recorded calls (exact, call by call).
    Count {
        /// How many calls.
        calls: u32,
    },
    /// The calls completed in the last `length`, kept in `buckets` buckets of
    /// `length / buckets` each: a bucket leaves the window whole, so the window covers
    /// between `length - length/buckets` and `length` of history.
    Time {
        /// How far back.
        length: Duration,
        /// Into how many buckets `length` is cut.
        buckets: u32,
    },
}

/// Which [`ErrorKind`]s count as failures of the provider.
///
/// The default, [`ErrorKind::is_breaker_failure`], counts overload, server errors,
/// timeouts, connection failures and stalls; rate limits, quota exhaustion and client
/// errors describe the caller, not the provider's health, and are *ignored*: they do
/// not count as a call at all (neither a failure nor a success).
#[derive(Clone, Default)]
pub struct FailurePolicy(PolicyInner);

#[derive(Clone, Default)]
enum PolicyInner {
    #[default]
    BreakerFailures,
    Kinds(Vec<ErrorKind>),
    Predicate(Arc<dyn Fn(ErrorKind) -> bool + Send + Sync>),
}

impl FailurePolicy {
    /// Exactly these kinds are failures.
    pub fn kinds(kinds: impl IntoIterator<Item = ErrorKind>) -> Self {
        FailurePolicy(PolicyInner::Kinds(kinds.into_iter().collect()))
    }

    /// Kinds for which `f` returns true are failures.
    pub fn predicate(f: impl Fn(ErrorKind) -> bool + Send + Sync + 'static) -> Self {
        FailurePolicy(PolicyInner::Predicate(Arc::new(f)))
    }

    /// Whether a call that ended in `kind` counts as a failure (otherwise it is ignored).
    pub fn is_failure(&self, kind: ErrorKind) -> bool {
        match &self.0 {
            PolicyInner::BreakerFailures => kind.is_breaker_failure(),
            PolicyInner::Kinds(v) => v.contains(&kind),
            PolicyInner::Predicate(f) => f(kind),
        }
    }
}

impl fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            PolicyInner::BreakerFailures => f.write_str("FailurePolicy(is_breaker_failure)"),
            PolicyInner::Kinds(v) => f.debug_tuple("FailurePolicy").field(v).finish(),
            PolicyInner::Predicate(_) => f.write_str("FailurePolicy(<predicate>)"),
        }
    }
}

/// Slow-call detection: a call whose response head took longer than `threshold` is slow,
/// and the breaker opens when slow calls reach `rate` of the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowCalls {
    /// A call taking longer than this (strictly) is slow; calls are timed to the
    /// microsecond.
    pub threshold: Duration,
    /// The slow-call rate (0, 1] at which the breaker opens.
    pub rate: f64,
}

/// A validated circuit-breaker configuration. Build one with
/// [`CircuitBreakerConfig::builder`]; [`Default`] gives the values listed there.
#[derive(Debug, Clone)]
pub struct CircuitBreakerConfig {
    pub(crate) window: Window,
    pub(crate) failure_rate: f64,
    pub(crate) slow: Option<SlowCalls>,
    pub(crate) minimum_calls: u32,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) open_duration: Duration,
    pub(crate) open_multiplier: f64,
    pub(crate) max_open_duration: Duration,
    pub(crate) half_open_probes: u32,
    pub(crate) half_open_successes: u32,
    pub(crate) failure: FailurePolicy,
    pub(crate) max_keys: usize,
    pub(crate) idle_timeout: Duration,
    /// The shared state, if any (`None`: in-process only, the default).
    pub(crate) store: Option<std::sync::Arc<dyn crate::store::BreakerStore>>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            window: Window::Count { calls: 50 },
            failure_rate: 0.5,
            slow: None,
            minimum_calls: 10,
            consecutive_failures: None,
            open_duration: Duration::from_secs(30),
            open_multiplier: 1.0,
            max_open_duration: Duration::from_secs(30),
            half_open_probes: 1,
            half_open_successes: 2,
            failure: FailurePolicy::default(),
            max_keys: 1024,
            idle_timeout: Duration::from_secs(600),
            store: None,
        }
    }
}

impl CircuitBreakerConfig {
    /// A builder starting from the defaults: a count window of the last 50 calls, open at
    /// a 50 % failure rate once 10 calls were seen, no slow-call or consecutive-failure
    /// trip, open for 30 s (not growing), then 1 probe at a time and 2 successes to close;
    /// failures per [`ErrorKind::is_breaker_failure`]; at most 1024 keys, idle ones
    /// forgotten after 10 minutes.
    pub fn builder() -> CircuitBreakerConfigBuilder {
        CircuitBreakerConfigBuilder {
            config: CircuitBreakerConfig::default(),
            max_open: None,
        }
    }

    /// The window rates are measured over.
    pub fn window(&self) -> Window {
        self.window
    }

    /// The failure rate at which the breaker opens.
    pub fn failure_rate(&self) -> f64 {
        self.failure_rate
    }

    /// Slow-call detection, if on.
    pub fn slow_calls(&self) -> Option<SlowCalls> {
        self.slow
    }

    /// Calls the window must hold before its rates are judged.
    pub fn minimum_calls(&self) -> u32 {
        self.minimum_calls
    }

    /// Consecutive failures that open the breaker whatever the rates, if set.
    pub fn consecutive_failures(&self) -> Option<u32> {
        self.consecutive_failures
    }

    /// How long the breaker stays open after opening from closed.
    pub fn open_duration(&self) -> Duration {
        self.open_duration
    }

    /// The open duration after the `reopens`-th failed probe in a row (0 = first opening):
    /// `open_duration × multiplier^reopens`, at most `max_open_duration`.
    pub fn open_duration_after(&self, reopens: u32) -> Duration {
        if self.open_multiplier == 1.0 || reopens == 0 {
            return self.open_duration;
        }
        let exp = i32::try_from(reopens).unwrap_or(i32::MAX);
        let secs = self.open_duration.as_secs_f64() * self.open_multiplier.powi(exp);
        let cap = self.max_open_duration.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.max_open_duration
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// Probes admitted at once in half-open.
    pub fn half_open_probes(&self) -> u32 {
        self.half_open_probes
    }

    /// Successful probes that close the breaker.
    pub fn half_open_successes(&self) -> u32 {
        self.half_open_successes
    }

    /// What counts as a failure.
    pub fn failure_policy(&self) -> &FailurePolicy {
        &self.failure
    }

    /// The most keys tracked at once.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// How long a key may go unused before it is forgotten.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
}

/// Builds a [`CircuitBreakerConfig`]; every value is checked in [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct CircuitBreakerConfigBuilder {
    config: CircuitBreakerConfig,
    /// `open_backoff`'s cap; unset, the open duration (fixed). Resolved in `build`, so
    /// the order of `open_duration` and `open_backoff` does not matter.
    max_open: Option<Duration>,
}

/// The longest duration any setting takes (open durations, windows, thresholds, the
/// idle timeout): 7 days. Longer ones are refused by
/// [`build`](CircuitBreakerConfigBuilder::build), so every deadline the breaker computes
/// fits a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest count window, in calls (each key keeps up to one entry per failed or slow
/// call of its window).
pub const MAX_WINDOW_CALLS: u64 = 1_000_000;

/// The largest `max_keys`.
pub const MAX_KEYS: u64 = 100_000_000;

impl CircuitBreakerConfigBuilder {
    /// Measure over the last `calls` calls (default 50).
    pub fn count_window(mut self, calls: u32) -> Self {
        self.config.window = Window::Count { calls };
        self
    }

    /// Measure over the calls of the last `length`, in `buckets` buckets.
    pub fn time_window(mut self, length: Duration, buckets: u32) -> Self {
        self.config.window = Window::Time { length, buckets };
        self
    }

    /// Open when failures reach this fraction of the window's calls, in (0, 1] (default 0.5).
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.config.failure_rate = rate;
        self
    }

    /// Count calls taking longer than `threshold` as slow, and open when slow calls reach
    /// `rate` of the window (off by default: long generations are normal for AI calls).
    /// A slow probe in half-open reopens the breaker.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.config.slow = Some(SlowCalls { threshold, rate });
        self
    }

    /// Judge rates only once the window holds this many calls (default 10).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// Also open after `n` failures in a row, whatever the window says (off by default).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.config.consecutive_failures = Some(n);
        self
    }

    /// Stay open this long before probing (default 30 s).
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.config.open_duration = d;
        self
    }

    /// Grow the open duration by `multiplier` each time a probe fails again, up to `max`
    /// (default: fixed).
    pub fn open_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.config.open_multiplier = multiplier;
        self.max_open = Some(max);
        self
    }

    /// Probes admitted at once in half-open (default 1); others are rejected, not queued.
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.config.half_open_probes = n;
        self
    }

    /// Successful probes needed to close (default 2).
    pub fn half_open_successes(mut self, n: u32) -> Self {
        self.config.half_open_successes = n;
        self
    }

    /// What counts as a failure (default [`ErrorKind::is_breaker_failure`]).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.config.failure = policy;
        self
    }

    /// Exactly these kinds count as failures.
    pub fn failure_kinds(self, kinds: impl IntoIterator<Item = ErrorKind>) -> Self {
        self.failure_policy(FailurePolicy::kinds(kinds))
    }

    /// Track at most this many keys (default 1024); idle keys, then the least recently
    /// used, make room for new ones.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.config.max_keys = n;
        self
    }

    /// Forget a key unused for this long (default 10 minutes).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.config.idle_timeout = d;
        self
    }

    /// Shares the breakers' state with other replicas through `store` (e.g.
    /// tower-ai-redis's `RedisBreakers`): a breaker opened here opens in every replica,
    /// and half-open probes across the replicas stay within
    /// [`half_open_probes`](Self::half_open_probes). The failure window stays per
    /// replica. Without it (the default) the state is in-process and the call path is
    /// unchanged. See [`crate::store`].
    pub fn store(mut self, store: impl crate::store::BreakerStore) -> Self {
        self.config.store = Some(std::sync::Arc::new(store));
        self
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first value that makes no sense.
    pub fn build(self) -> Result<CircuitBreakerConfig, ConfigError> {
        let mut c = self.config;
        c.max_open_duration = self.max_open.unwrap_or(c.open_duration);
        let too_long = |what, value: Duration| {
            if value > MAX_DURATION {
                Err(ConfigError::TooLong {
                    what,
                    value,
                    max: MAX_DURATION,
                })
            } else {
                Ok(())
            }
        };
        too_long("open_duration", c.open_duration)?;
        too_long("max_open_duration", c.max_open_duration)?;
        too_long("idle_timeout", c.idle_timeout)?;
        if let Window::Time { length, .. } = c.window {
            too_long("time window", length)?;
        }
        if let Some(s) = c.slow {
            too_long("slow_calls threshold", s.threshold)?;
        }
        let too_many = |what, value: u64, max: u64| {
            if value > max {
                Err(ConfigError::TooMany { what, value, max })
            } else {
                Ok(())
            }
        };
        if let Window::Count { calls } = c.window {
            too_many("count window", u64::from(calls), MAX_WINDOW_CALLS)?;
        }
        too_many("max_keys", c.max_keys as u64, MAX_KEYS)?;
        match c.window {
            Window::Count { calls: 0 } => return Err(ConfigError::EmptyWindow),
            Window::Count { calls } if c.minimum_calls > calls => {
                return Err(ConfigError::MinimumCallsAboveWindow {
                    minimum: c.minimum_calls,
                    window: calls,
                })
            }
            Window::Time { buckets: 0, .. } => return Err(ConfigError::EmptyWindow),
            Window::Time { length, buckets } => {
                if buckets > 3600 {
                    return Err(ConfigError::TooManyBuckets(buckets));
                }
                if length / buckets < Duration::from_millis(1) {
                    return Err(ConfigError::BucketTooShort { length, buckets });
                }
            }
            Window::Count { .. } => {}
        }
        check_rate("failure_rate", c.failure_rate)?;
        if let Some(s) = c.slow {
            check_rate("slow_calls rate", s.rate)?;
            if s.threshold.is_zero() {
                return Err(ConfigError::Zero("slow_calls threshold"));
            }
        }
        if c.minimum_calls == 0 {
            return Err(ConfigError::Zero("minimum_calls"));
        }
        if c.consecutive_failures == Some(0) {
            return Err(ConfigError::Zero("consecutive_failures"));
        }
        if c.open_duration.is_zero() {
            return Err(ConfigError::Zero("open_duration"));
        }
        if !(c.open_multiplier.is_finite() && c.open_multiplier >= 1.0) {
            return Err(ConfigError::Multiplier(c.open_multiplier));
        }
        if c.max_open_duration < c.open_duration {
            return Err(ConfigError::MaxOpenBelowOpen {
                open: c.open_duration,
                max: c.max_open_duration,
            });
        }
        if c.half_open_probes == 0 {
            return Err(ConfigError::Zero("half_open_probes"));
        }
        if c.half_open_successes == 0 {
            return Err(ConfigError::Zero("half_open_successes"));
        }
        if c.max_keys == 0 {
            return Err(ConfigError::Zero("max_keys"));
        }
        if c.idle_timeout.is_zero() {
            return Err(ConfigError::Zero("idle_timeout"));
        }
        Ok(c)
    }
}

fn check_rate(what: &'static str, rate: f64) -> Result<(), ConfigError> {
    if rate > 0.0 && rate <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::Rate { what, rate })
    }
}

/// A configuration value that makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A window of zero calls or zero buckets.
    #[error("the window must hold at least one call and one bucket")]
    EmptyWindow,
    /// More than 3600 buckets.
    #[error("{0} buckets is too many (at most 3600)")]
    TooManyBuckets(u32),
    /// Buckets shorter than a millisecond.
    #[error("a time window of {length:?} in {buckets} buckets makes buckets under 1 ms")]
    BucketTooShort {
        /// Window length.
        length: Duration,
        /// Buckets.
        buckets: u32,
    },
    /// `minimum_calls` larger than a count window: the rates could never be judged.
    #[error("minimum_calls ({minimum}) is larger than the count window ({window} calls)")]
    MinimumCallsAboveWindow {
        /// The minimum.
        minimum: u32,
        /// The window.
        window: u32,
    },
    /// A rate outside (0, 1].
    #[error("{what} must be in (0, 1], got {rate}")]
    Rate {
        /// Which rate.
        what: &'static str,
        /// The value given.
        rate: f64,
    },
    /// A value that must not be zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// An open-duration multiplier below 1 or not finite.
    #[error("the open-duration multiplier must be finite and at least 1, got {0}")]
    Multiplier(f64),
    /// A duration above its bound ([`MAX_DURATION`]).
    #[error("{what} of {value:?} is longer than the {max:?} allowed")]
    TooLong {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// The bound.
        max: Duration,
    },
    /// A count above its bound.
    #[error("{what} of {value} is more than the {max} allowed")]
    TooMany {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The bound.
        max: u64,
    },
    /// A cap below the base open duration.
    #[error("max open duration {max:?} is shorter than the open duration {open:?}")]
    MaxOpenBelowOpen {
        /// The base.
        open: Duration,
        /// The cap.
        max: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_build_and_bad_values_are_named() {
        assert!(CircuitBreakerConfig::builder().build().is_ok());
        let e = CircuitBreakerConfig::builder()
            .failure_rate(1.5)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("failure_rate"), "{e}");
        assert_eq!(
            CircuitBreakerConfig::builder()
                .count_window(5)
                .minimum_calls(6)
                .build()
                .unwrap_err(),
            ConfigError::MinimumCallsAboveWindow {
                minimum: 6,
                window: 5
            }
        );
        assert!(CircuitBreakerConfig::builder()
            .time_window(Duration::from_millis(5), 10)
            .build()
            .is_err());
        assert!(CircuitBreakerConfig::builder()
            .open_backoff(0.5, Duration::from_secs(60))
            .build()
            .is_err());
        assert!(CircuitBreakerConfig::builder()
            .open_backoff(f64::NAN, Duration::from_secs(60))
            .build()
            .is_err());
        assert!(CircuitBreakerConfig::builder()
            .half_open_probes(0)
            .build()
            .is_err());
    }

    #[test]
    fn open_duration_grows_to_its_cap() {
        let c = CircuitBreakerConfig::builder()
            .open_duration(Duration::from_secs(2))
            .open_backoff(2.0, Duration::from_secs(10))
            .build()
            .unwrap();
        let d: Vec<u64> = (0..5).map(|n| c.open_duration_after(n).as_secs()).collect();
        assert_eq!(d, [2, 4, 8, 10, 10]);
        assert_eq!(c.open_duration_after(u32::MAX), Duration::from_secs(10));
        let fixed = CircuitBreakerConfig::builder()
            .open_duration(Duration::from_secs(7))
            .build()
            .unwrap();
        assert_eq!(fixed.open_duration_after(9), Duration::from_secs(7));
    }

    #[test]
    fn open_duration_and_backoff_in_either_order() {
        let a = CircuitBreakerConfig::builder()
            .open_backoff(2.0, Duration::from_secs(60))
            .open_duration(Duration::from_secs(120))
            .build();
        assert!(
            matches!(a, Err(ConfigError::MaxOpenBelowOpen { .. })),
            "{a:?}"
        );
        let b = CircuitBreakerConfig::builder()
            .open_duration(Duration::from_secs(120))
            .open_backoff(2.0, Duration::from_secs(60))
            .build();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));

        let a = CircuitBreakerConfig::builder()
            .open_backoff(2.0, Duration::from_secs(60))
            .open_duration(Duration::from_secs(5))
            .build()
            .unwrap();
        let b = CircuitBreakerConfig::builder()
            .open_duration(Duration::from_secs(5))
            .open_backoff(2.0, Duration::from_secs(60))
            .build()
            .unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let d: Vec<u64> = (0..6).map(|n| a.open_duration_after(n).as_secs()).collect();
        assert_eq!(d, [5, 10, 20, 40, 60, 60]);
        // Without a backoff the cap follows the open duration, whatever it was before.
        let fixed = CircuitBreakerConfig::builder()
            .open_duration(Duration::from_secs(90))
            .build()
            .unwrap();
        assert_eq!(fixed.open_duration_after(3), Duration::from_secs(90));
        // A cap below the open duration is refused in either order, also without growth.
        for (first_backoff, mult) in [(true, 1.0), (false, 1.0), (true, 2.0), (false, 2.0)] {
            let b = CircuitBreakerConfig::builder();
            let b = if first_backoff {
                b.open_backoff(mult, Duration::from_secs(5))
                    .open_duration(Duration::from_secs(10))
            } else {
                b.open_duration(Duration::from_secs(10))
                    .open_backoff(mult, Duration::from_secs(5))
            };
            assert!(
                matches!(b.build(), Err(ConfigError::MaxOpenBelowOpen { .. })),
                "backoff first: {first_backoff}, multiplier {mult}"
            );
        }
    }

    #[test]
    fn failure_policies() {
        let d = FailurePolicy::default();
        assert!(d.is_failure(ErrorKind::Overloaded));
        assert!(!d.is_failure(ErrorKind::RateLimited));
        let k = FailurePolicy::kinds([ErrorKind::RateLimited]);
        assert!(k.is_failure(ErrorKind::RateLimited) && !k.is_failure(ErrorKind::ServerError));
        let p = FailurePolicy::predicate(|k| k == ErrorKind::Timeout);
        assert!(p.is_failure(ErrorKind::Timeout) && !p.is_failure(ErrorKind::Connection));
    }
}
