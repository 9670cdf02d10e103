//! Exponential backoff with jitter: the wait before a retry when the provider named none.

use std::time::Duration;

use tower_ai_core::duration::secs_f64;

/// How a computed backoff is randomised, so that clients that failed together do not
/// retry together.
///
/// With `d = min(cap, base × multiplier^retry)` (retry = 0 for the first retry):
///
/// | mode | wait |
/// |---|---|
/// | `Full` | uniform in `[0, d]` |
/// | `Equal` | `d/2` + uniform in `[0, d/2]` |
/// | `Decorrelated` | `min(cap, uniform in [base, max(base, previous × multiplier)])` (the previous wait, not `d`) |
/// | `None` | `d` exactly |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, d]` (the default; spreads best).
    #[default]
    Full,
    /// Half fixed, half random.
    Equal,
    /// Each wait drawn from `[base, previous × multiplier]`, capped.
    Decorrelated,
    /// No randomness.
    None,
}

/// Exponential backoff: `base`, `multiplier`, a `cap` on one wait, and the [`Jitter`].
///
/// Used only when the provider asked for no wait; a provider's wait is used as given.
/// Default: base 500 ms, multiplier 2, cap 8 s, full jitter (the official SDKs' numbers,
/// with full instead of their subtractive jitter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub(crate) base: Duration,
    pub(crate) multiplier: f64,
    pub(crate) cap: Duration,
    pub(crate) jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            multiplier: 2.0,
            cap: Duration::from_secs(8),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// A backoff from `base`, growing by `multiplier` per retry up to `cap`, with `jitter`.
    /// Checked when the [`AiRetryConfig`](crate::AiRetryConfig) is built.
    pub fn new(base: Duration, multiplier: f64, cap: Duration, jitter: Jitter) -> Self {
        Backoff {
            base,
            multiplier,
            cap,
            jitter,
        }
    }

    /// The first wait, before jitter.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The growth factor per retry.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The longest single wait.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter mode.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The un-jittered wait before retry number `retry` (0-based), capped.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let f = self.multiplier.powi(retry.min(1_000) as i32);
        // Infinite or huge saturates (then capped); NaN (unreachable: the builder checks
        // the multiplier) gives the cap.
        secs_f64(self.base.as_secs_f64() * f).map_or(self.cap, |d| d.min(self.cap))
    }

    /// The wait before retry number `retry` (0-based), drawing from `rng`; `previous` is
    /// the last backoff wait of this call (used by [`Jitter::Decorrelated`]).
    pub fn wait(
        &self,
        retry: u32,
        previous: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        let d = self.ceiling(retry);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => uniform(rng, Duration::ZERO, d),
            Jitter::Equal => {
                let half = d / 2;
                half + uniform(rng, Duration::ZERO, d - half)
            }
            Jitter::Decorrelated => {
                let prev = previous.unwrap_or(self.base);
                let hi = mul(prev, self.multiplier).max(self.base).min(self.cap);
                uniform(rng, self.base.min(self.cap), hi)
            }
        }
    }
}

/// `d * f`, saturating; zero for a NaN or negative product (unreachable: the builder
/// checks the multiplier). Callers clamp the result to `[base, cap]`.
fn mul(d: Duration, f: f64) -> Duration {
    secs_f64(d.as_secs_f64() * f).unwrap_or_default()
}

/// Uniform in `[lo, hi]` at nanosecond resolution.
fn uniform(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    let lo_n = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_n = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX).max(lo_n);
    Duration::from_nanos(rng.u64(lo_n..=hi_n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(b: Backoff, n: u32, seed: u64) -> Vec<Duration> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut prev = None;
        (0..n)
            .map(|i| {
                let w = b.wait(i, prev, &mut rng);
                prev = Some(w);
                w
            })
            .collect()
    }

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn no_jitter_is_exponential_and_capped() {
        let b = Backoff::new(
            Duration::from_millis(500),
            2.0,
            Duration::from_secs(8),
            Jitter::None,
        );
        assert_eq!(seq(b, 7, 1), ms(&[500, 1000, 2000, 4000, 8000, 8000, 8000]));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(8));
    }

    #[test]
    fn jitter_modes_stay_in_their_ranges() {
        for seed in 0..200 {
            for (i, w) in seq(
                Backoff::new(
                    Duration::from_millis(100),
                    2.0,
                    Duration::from_secs(1),
                    Jitter::Full,
                ),
                6,
                seed,
            )
            .into_iter()
            .enumerate()
            {
                let d = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
                assert!(w <= d, "full {w:?} > {d:?}");
            }
            for (i, w) in seq(
                Backoff::new(
                    Duration::from_millis(100),
                    2.0,
                    Duration::from_secs(1),
                    Jitter::Equal,
                ),
                6,
                seed,
            )
            .into_iter()
            .enumerate()
            {
                let d = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
                assert!(w >= d / 2 && w <= d, "equal {w:?} vs {d:?}");
            }
            let mut prev = Duration::from_millis(100);
            for w in seq(
                Backoff::new(
                    Duration::from_millis(100),
                    3.0,
                    Duration::from_secs(2),
                    Jitter::Decorrelated,
                ),
                8,
                seed,
            ) {
                assert!(
                    w >= Duration::from_millis(100) && w <= (prev * 3).min(Duration::from_secs(2))
                );
                prev = w;
            }
        }
    }

    #[test]
    fn seeded_sequences_are_reproducible() {
        let b = Backoff::new(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(10),
            Jitter::Full,
        );
        assert_eq!(seq(b, 5, 7), seq(b, 5, 7));
        assert_ne!(seq(b, 5, 7), seq(b, 5, 8));
    }
}
