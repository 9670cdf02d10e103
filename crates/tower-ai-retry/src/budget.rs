//! The retry budget: retries may be at most a fraction of recent calls, plus a floor.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ConfigError;

/// Number of time slots the budget's window is cut into.
const SLOTS: usize = 10;
/// Deposit stripes: each OS thread writes to its own, so concurrent callers do not fight
/// over one cache line.
const STRIPES: usize = 8;

/// A budget for retries shared by every clone of a layer (and of anything the budget is
/// cloned into): over the last `ttl`, retries may be at most `ratio` × calls plus
/// `min_per_sec` × `ttl`.
///
/// Like tower's `TpsBudget`, but lock-free where it matters: a call deposits with one
/// atomic add into a per-thread stripe of time slots (no lock, no contention between
/// threads); only a *retry* takes a short `std::sync::Mutex` to add up the window and
/// withdraw, so the success path never waits on a lock.
///
/// During a total outage, a budget of ratio `r` bounds the upstream calls to about
/// `(1 + r) × offered + min_per_sec × elapsed` instead of `max_attempts × offered`.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_retry::RetryBudget;
/// let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2).unwrap();
/// let shared = budget.clone(); // same budget
/// # let _ = shared;
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    start: Instant,
    slot_nanos: u64,
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
    stripes: [Stripe; STRIPES],
    withdrawn: Mutex<[(u64, u64); SLOTS]>,
}

/// One stripe of deposit slots, each packing `epoch` (high 32 bits) and a count.
#[repr(align(128))]
struct Stripe([AtomicU64; SLOTS]);

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("ratio", &self.inner.ratio)
            .finish()
    }
}

impl Default for RetryBudget {
    /// Ten seconds, a floor of 10 retries per second, retries up to 20 % of calls
    /// (tower's defaults).
    fn default() -> Self {
        RetryBudget::build(Duration::from_secs(10), 10, 0.2)
    }
}

fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl RetryBudget {
    /// A budget over a window of `ttl` (1 s to 60 s) allowing `min_per_sec` retries per
    /// second whatever the traffic, plus `ratio` retries per call made (0.2 = 20 %).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a `ttl` outside 1–60 s, a `ratio` that is negative, not finite
    /// or above 1000, a floor above 1,000,000/s, or a budget that allows no retry at all.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, ConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "retry budget ttl",
                format!("{ttl:?} is outside 1 s..=60 s"),
            ));
        }
        if !ratio.is_finite() || !(0.0..=1000.0).contains(&ratio) {
            return Err(ConfigError::new(
                "retry budget ratio",
                format!("{ratio} is not a number in 0..=1000"),
            ));
        }
        if min_per_sec > 1_000_000 {
            return Err(ConfigError::new(
                "retry budget min_per_sec",
                format!("{min_per_sec} retries per second is absurd (max 1,000,000)"),
            ));
        }
        if ratio == 0.0 && min_per_sec == 0 {
            return Err(ConfigError::new(
                "retry budget",
                "ratio 0 and min_per_sec 0 allow no retry at all; use max_attempts(1) to turn retries off".into(),
            ));
        }
        Ok(RetryBudget::build(ttl, min_per_sec, ratio))
    }

    fn build(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        let slot_nanos = (ttl.as_nanos() / SLOTS as u128).max(1) as u64;
        RetryBudget {
            inner: Arc::new(Inner {
                start: Instant::now(),
                slot_nanos,
                ttl,
                min_per_sec,
                ratio,
                stripes: std::array::from_fn(|_| {
                    Stripe(std::array::from_fn(|_| AtomicU64::new(0)))
                }),
                withdrawn: Mutex::new([(0, 0); SLOTS]),
            }),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // +1 so that a slot never written (0) never matches a live epoch.
        (now.saturating_duration_since(self.inner.start).as_nanos()
            / u128::from(self.inner.slot_nanos)) as u64
            + 1
    }

    /// Records one call (the first attempt of a logical call). Lock-free.
    pub fn deposit(&self, now: Instant) {
        let epoch = self.epoch(now);
        let tag = (epoch & 0xffff_ffff) << 32;
        let slot = &self.inner.stripes[stripe_index()].0[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            if cur & !0xffff_ffff == tag {
                slot.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match slot.compare_exchange_weak(cur, tag | 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Calls deposited in the live window.
    fn deposits(&self, epoch: u64) -> u64 {
        let oldest = epoch.saturating_sub(SLOTS as u64 - 1);
        let mut sum = 0;
        for stripe in &self.inner.stripes {
            for slot in &stripe.0 {
                let v = slot.load(Ordering::Relaxed);
                let e = v >> 32;
                let live = (oldest & 0xffff_ffff..=epoch & 0xffff_ffff).contains(&e) && e != 0;
                if live {
                    sum += v & 0xffff_ffff;
                }
            }
        }
        sum
    }

    fn balance(&self, epoch: u64, withdrawn: &[(u64, u64); SLOTS]) -> f64 {
        let oldest = epoch.saturating_sub(SLOTS as u64 - 1);
        let w: u64 = withdrawn
            .iter()
            .filter(|(e, _)| *e >= oldest && *e != 0)
            .map(|(_, n)| n)
            .sum();
        let floor = f64::from(self.inner.min_per_sec) * self.inner.ttl.as_secs_f64();
        floor + self.inner.ratio * self.deposits(epoch) as f64 - w as f64
    }

    /// Takes one retry from the budget if it has one. Takes a short lock (retry path only).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let mut guard = self
            .inner
            .withdrawn
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.balance(epoch, &guard) < 1.0 {
            return false;
        }
        let slot = &mut guard[epoch as usize % SLOTS];
        if slot.0 != epoch {
            *slot = (epoch, 0);
        }
        slot.1 += 1;
        true
    }

    /// Retries the budget would allow now (rounded down).
    pub fn remaining(&self, now: Instant) -> u64 {
        let epoch = self.epoch(now);
        let guard = self
            .inner
            .withdrawn
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.balance(epoch, &guard).max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_ratio_and_expiry() {
        let b = RetryBudget::new(Duration::from_secs(10), 1, 0.5).unwrap();
        let now = Instant::now();
        // floor: 1/s × 10 s
        assert_eq!(b.remaining(now), 10);
        for _ in 0..10 {
            b.deposit(now);
        }
        assert_eq!(b.remaining(now), 15);
        for _ in 0..15 {
            assert!(b.try_withdraw(now));
        }
        assert!(!b.try_withdraw(now));
        // everything ages out after the ttl
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.remaining(Instant::now()), 10);
    }

    #[test]
    fn rejects_nonsense() {
        assert!(RetryBudget::new(Duration::ZERO, 1, 0.1).is_err());
        assert!(RetryBudget::new(Duration::from_secs(10), 1, f64::NAN).is_err());
        assert!(RetryBudget::new(Duration::from_secs(10), 1, -1.0).is_err());
        let e = RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap_err();
        assert!(e.to_string().contains("allow no retry"), "{e}");
    }
}
