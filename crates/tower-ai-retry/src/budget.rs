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
/// An [`AiRetry`](crate::AiRetry) instance that serves many calls counts its deposits
/// locally and adds them in batches of up to 16, each batch into the time slot of its
/// first call (read from the clock once per batch), and at once as soon as a retry has
/// been asked of the budget since the batch began (and when the instance is dropped).
/// So the count seen by a retry may miss the last calls of other instances, never counts
/// a call for longer than the window, and is exact again after one more call per
/// instance once retries are happening. An instance's first call deposits at once (a
/// clone made for one call never holds a deposit back).
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
    /// Withdrawals asked for so far (on the retry path only): when it moves, instances
    /// that hold deposits back add them at their next call.
    asked: Padded,
    withdrawn: Mutex<[(u64, u64); SLOTS]>,
}

/// A counter on a cache line of its own: read on every call, written only by retries.
#[repr(align(128))]
struct Padded(AtomicU64);

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
                asked: Padded(AtomicU64::new(0)),
                withdrawn: Mutex::new([(0, 0); SLOTS]),
            }),
        }
    }

    /// The time slot of `now`: 1 for the budget's first slot, then one per slot.
    pub(crate) fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.inner.start);
        // u64 nanoseconds (584 years) divide much faster than u128.
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        // +1 so that a slot never written (0) never matches a live epoch.
        nanos / self.inner.slot_nanos + 1
    }

    /// Withdrawals asked for so far (a counter, for instances that batch deposits).
    pub(crate) fn asked(&self) -> u64 {
        self.inner.asked.0.load(Ordering::Relaxed)
    }

    /// Records one call (the first attempt of a logical call). Lock-free.
    pub fn deposit(&self, now: Instant) {
        self.add(self.epoch(now), 1);
    }

    /// Records `n` calls in the time slot `epoch`. A slot that has since been reused
    /// for a later epoch means `epoch` has left the window: the calls no longer count.
    pub(crate) fn add(&self, epoch: u64, n: u32) {
        let e = epoch & 0xffff_ffff;
        let tag = e << 32;
        let slot = &self.inner.stripes[stripe_index()].0[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let held = cur >> 32;
            if held == e {
                slot.fetch_add(u64::from(n), Ordering::Relaxed);
                return;
            }
            // Epochs compared on 32 bits with wrap-around (2^32 slots of at least
            // 100 ms: 13 years).
            if held != 0 && (held.wrapping_sub(e) as u32 as i32) > 0 {
                return;
            }
            match slot.compare_exchange_weak(
                cur,
                tag | u64::from(n),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
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
        self.inner.asked.0.fetch_add(1, Ordering::Relaxed);
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

    #[tokio::test(start_paused = true)]
    async fn a_late_batch_counts_in_its_own_slot_or_not_at_all() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        let then = b.epoch(Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        b.add(then, 4);
        assert_eq!(b.remaining(Instant::now()), 4);
        // Expires with its own slot, 10 s after `then`, not 10 s after it was added.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.remaining(Instant::now()), 0);
        // A batch from a slot since reused by a later epoch is dropped, not counted anew.
        b.deposit(Instant::now());
        b.add(then, 4);
        assert_eq!(b.remaining(Instant::now()), 1);
        // Every withdrawal asked for moves the counter, granted or not.
        let asked = b.asked();
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
        assert_eq!(b.asked(), asked + 2);
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
