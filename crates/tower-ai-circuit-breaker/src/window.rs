//! The sliding windows: call counts striped per thread (the hot path), and the rarer bad
//! calls (failures, slow calls) kept under the breaker's lock.
//!
//! A success in the closed state adds one to a counter in the calling thread's *stripe*, a
//! cache line no other thread writes, so two tasks on two cores do not fight over it. Bad
//! calls are rare while closed (many of them open the breaker), so they take the breaker's
//! lock, are recorded exactly, and trigger an evaluation that sums the stripes.
//!
//! - Count window (last N calls): each stripe counts its calls since the window's reset;
//!   the window's total is their sum. A bad call is recorded with its position (the total
//!   just after it), and is in the window while `total - position < N`.
//! - Time window (buckets of `length / buckets`): each stripe has one counter per bucket,
//!   tagged with the bucket's tick; a bucket is reused (zeroed, then re-tagged) under the
//!   breaker's lock when a new tick reaches it. Bad calls live in a ring of the same ticks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::config::Window;

/// Stripes per breaker: the available parallelism rounded up to a power of two, at most 16.
pub(crate) fn stripe_count() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, 16)
            .next_power_of_two()
    })
}

thread_local! {
    /// The calling thread's stripe, once it has one (`usize::MAX` until then).
    static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The calling thread's stripe (threads take stripes round-robin on first use).
#[inline]
pub(crate) fn thread_stripe() -> usize {
    match STRIPE.try_with(std::cell::Cell::get) {
        Ok(v) if v != usize::MAX => v,
        _ => assign_stripe(),
    }
}

/// Gives the calling thread stripe `s` (tests that need two threads on two stripes).
#[cfg(test)]
pub(crate) fn pin_thread_stripe(s: usize) {
    assert!(s < stripe_count());
    STRIPE.with(|c| c.set(s));
}

#[cold]
fn assign_stripe() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let v = NEXT.fetch_add(1, Ordering::Relaxed) & (stripe_count() - 1);
    let _ = STRIPE.try_with(|c| c.set(v));
    v
}

#[derive(Debug, Default)]
struct Bucket {
    /// The bucket's tick + 1 (0 = never used).
    tick: AtomicU64,
    calls: AtomicU64,
}

const PER_LINE: usize = 8;

/// Eight buckets on their own 128-byte line pair, so stripes never share a line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct BucketLine([Bucket; PER_LINE]);

/// Call counts, striped per thread.
#[derive(Debug)]
pub(crate) enum Calls {
    /// A count window: each thread stripe's lane counts its own calls (`own` in the
    /// methods below, the lane's counter), on the lane's own cache lines, and the
    /// breaker sums the lanes; nothing is held here, so a key a single thread calls
    /// holds one counter, not one per stripe.
    Count,
    /// Boxed: a count window's breaker (the default) does not carry its size.
    Time(Box<TimeCalls>),
}

/// A time window's buckets, per stripe.
#[derive(Debug)]
pub(crate) struct TimeCalls {
    lines: Box<[BucketLine]>,
    lines_per_stripe: usize,
    buckets: u64,
}

impl Calls {
    pub(crate) fn new(window: Window, stripes: usize) -> Calls {
        match window {
            Window::Count { .. } => Calls::Count,
            Window::Time { buckets, .. } => {
                let per = (buckets as usize).div_ceil(PER_LINE);
                Calls::Time(Box::new(TimeCalls {
                    lines: (0..stripes * per).map(|_| BucketLine::default()).collect(),
                    lines_per_stripe: per,
                    buckets: u64::from(buckets),
                }))
            }
        }
    }

    #[inline]
    fn bucket(lines: &[BucketLine], per: usize, buckets: u64, stripe: usize, tick: u64) -> &Bucket {
        let j = (tick % buckets) as usize;
        &lines[stripe * per + j / PER_LINE].0[j % PER_LINE]
    }

    /// Adds one call to `stripe` (whose count-window counter is `own`) at `tick` without
    /// a lock. False when the bucket belongs to an older tick and must be reused first
    /// ([`add_locked`](Self::add_locked)).
    #[inline]
    pub(crate) fn try_add(&self, own: &AtomicU64, stripe: usize, tick: u64) -> bool {
        match self {
            Calls::Count => {
                own.fetch_add(1, Ordering::Relaxed);
                true
            }
            Calls::Time(t) => {
                let TimeCalls {
                    lines,
                    lines_per_stripe,
                    buckets,
                } = &**t;
                let b = Self::bucket(lines, *lines_per_stripe, *buckets, stripe, tick);
                if b.tick.load(Ordering::Acquire) == tick + 1 {
                    b.calls.fetch_add(1, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Adds one call, reusing the bucket if needed. Caller holds the breaker's lock (the
    /// only place buckets are re-tagged). Returns whether a bucket was reused.
    pub(crate) fn add_locked(&self, own: &AtomicU64, stripe: usize, tick: u64) -> bool {
        match self {
            Calls::Count => {
                self.try_add(own, stripe, tick);
                false
            }
            Calls::Time(t) => {
                let TimeCalls {
                    lines,
                    lines_per_stripe,
                    buckets,
                } = &**t;
                let b = Self::bucket(lines, *lines_per_stripe, *buckets, stripe, tick);
                let seen = b.tick.load(Ordering::Acquire);
                let rotated = seen != tick + 1;
                if rotated {
                    if seen > tick + 1 {
                        // A call completing late, after its bucket was reused: it belongs
                        // to history already gone. Count it in the current bucket instead.
                        b.calls.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    // Zero first, then publish the tick: a lock-free adder that sees the new
                    // tick adds after the zeroing.
                    b.calls.store(0, Ordering::Relaxed);
                    b.tick.store(tick + 1, Ordering::Release);
                }
                b.calls.fetch_add(1, Ordering::Relaxed);
                rotated
            }
        }
    }

    /// Calls in the window at `tick` (for a count window: every call since the reset,
    /// the sum of the lanes' counters, `lanes`).
    pub(crate) fn total(&self, tick: u64, lanes: impl FnOnce() -> u64) -> u64 {
        match self {
            Calls::Count => lanes(),
            Calls::Time(t) => {
                let TimeCalls { lines, buckets, .. } = &**t;
                let lo = (tick + 1).saturating_sub(*buckets); // oldest tick + 1 - 1
                lines
                    .iter()
                    .flat_map(|l| l.0.iter())
                    .filter(|b| {
                        let t = b.tick.load(Ordering::Acquire);
                        t > lo && t <= tick + 1
                    })
                    .map(|b| b.calls.load(Ordering::Relaxed))
                    .sum()
            }
        }
    }

    /// Empties the window (`lanes` zeroes a count window's lane counters).
    pub(crate) fn reset(&self, lanes: impl FnOnce()) {
        match self {
            Calls::Count => lanes(),
            Calls::Time(t) => t.lines.iter().flat_map(|l| l.0.iter()).for_each(|b| {
                b.tick.store(0, Ordering::Relaxed);
                b.calls.store(0, Ordering::Relaxed);
            }),
        }
    }
}

/// Failures and slow calls, exact, under the breaker's lock.
#[derive(Debug)]
pub(crate) enum Bad {
    /// (position, failure, slow), oldest first; at most `size` entries.
    Count {
        size: u64,
        calls: VecDeque<(u64, bool, bool)>,
    },
    /// (tick + 1, failures, slow) per bucket.
    Time {
        buckets: u64,
        ring: Vec<(u64, u64, u64)>,
    },
}

/// What a window holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Bad {
    pub(crate) fn new(window: Window) -> Bad {
        match window {
            Window::Count { calls } => Bad::Count {
                size: u64::from(calls),
                calls: VecDeque::new(),
            },
            Window::Time { buckets, .. } => Bad::Time {
                buckets: u64::from(buckets),
                ring: vec![(0, 0, 0); buckets as usize],
            },
        }
    }

    /// Records a bad call at `at`: its position (count window) or tick (time window).
    pub(crate) fn add(&mut self, at: u64, failure: bool, slow: bool) {
        match self {
            Bad::Count { size, calls } => {
                while calls.len() as u64 >= *size {
                    calls.pop_front();
                }
                calls.push_back((at, failure, slow));
            }
            Bad::Time { buckets, ring } => {
                let slot = &mut ring[(at % *buckets) as usize];
                if slot.0 != at + 1 {
                    *slot = (at + 1, 0, 0);
                }
                slot.1 += u64::from(failure);
                slot.2 += u64::from(slow);
            }
        }
    }

    /// The window's stats, given the striped call total (`calls`) and the current tick.
    pub(crate) fn stats(&mut self, calls: u64, tick: u64) -> Stats {
        match self {
            Bad::Count { size, calls: q } => {
                let oldest = calls.saturating_sub(*size); // positions <= oldest have left
                while q.front().is_some_and(|c| c.0 <= oldest) {
                    q.pop_front();
                }
                let (f, s) = q
                    .iter()
                    .fold((0, 0), |(f, s), c| (f + u64::from(c.1), s + u64::from(c.2)));
                Stats {
                    calls: calls.min(*size),
                    failures: f,
                    slow: s,
                }
            }
            Bad::Time { buckets, ring } => {
                let lo = (tick + 1).saturating_sub(*buckets);
                let (f, s) = ring
                    .iter()
                    .filter(|b| b.0 > lo && b.0 <= tick + 1)
                    .fold((0, 0), |(f, s), b| (f + b.1, s + b.2));
                Stats {
                    calls,
                    failures: f,
                    slow: s,
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn reset(&mut self) {
        match self {
            Bad::Count { calls, .. } => calls.clear(),
            Bad::Time { ring, .. } => ring.iter_mut().for_each(|b| *b = (0, 0, 0)),
        }
    }

    /// Whether it records no bad call at all (after [`stats`](Self::stats), which drops
    /// those that left a count window). A time window's record is kept until the window
    /// is reset: its buckets are told apart by tick only when read.
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Bad::Count { calls, .. } => calls.is_empty(),
            Bad::Time { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn count_window_keeps_the_last_n_calls() {
        let w = Window::Count { calls: 4 };
        let calls = Calls::new(w, 2);
        let lanes = [AtomicU64::new(0), AtomicU64::new(0)];
        let total = || lanes.iter().map(|l| l.load(Ordering::Relaxed)).sum::<u64>();
        let mut bad = Bad::new(w);
        // F S S F S S : with N = 4 the first failure leaves after the 5th call.
        for (i, fail) in [true, false, false, true, false, false]
            .into_iter()
            .enumerate()
        {
            calls.add_locked(&lanes[i % 2], i % 2, 0);
            if fail {
                bad.add(calls.total(0, total), true, false);
            }
            let st = bad.stats(calls.total(0, total), 0);
            let want = match i {
                0..=2 => 1,
                3 => 2,
                _ => 1,
            };
            assert_eq!(st.failures, want, "after call {i}");
            assert_eq!(st.calls, (i as u64 + 1).min(4));
        }
        calls.reset(|| lanes.iter().for_each(|l| l.store(0, Ordering::Relaxed)));
        bad.reset();
        assert_eq!(bad.stats(calls.total(0, total), 0), Stats::default());
    }

    #[test]
    fn time_window_drops_whole_buckets() {
        let w = Window::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        };
        let calls = Calls::new(w, 4);
        let mut bad = Bad::new(w);
        let own = AtomicU64::new(0); // a count window's counter: a time window leaves it be
        assert!(
            !calls.try_add(&own, 1, 3),
            "a fresh bucket must be tagged first"
        );
        assert!(calls.add_locked(&own, 1, 3));
        assert!(calls.try_add(&own, 1, 3));
        assert!(calls.add_locked(&own, 2, 3));
        bad.add(3, true, false);
        assert_eq!(calls.total(3, || 0), 3);
        assert_eq!(
            bad.stats(calls.total(12, || 0), 12),
            Stats {
                calls: 3,
                failures: 1,
                slow: 0
            }
        );
        // tick 13: bucket 3 left the window (ticks 4..=13 remain).
        assert_eq!(calls.total(13, || 0), 0);
        assert_eq!(bad.stats(0, 13).failures, 0);
        // reusing bucket slot 3 for tick 13 zeroes it.
        assert!(calls.add_locked(&own, 1, 13));
        assert_eq!(calls.total(13, || 0), 1);
        // a late call for an older tick lands in the current bucket.
        assert!(!calls.add_locked(&own, 1, 3));
        assert_eq!(calls.total(13, || 0), 2);
    }

    #[test]
    fn stripes_are_powers_of_two_and_lines_do_not_overlap() {
        assert!(stripe_count().is_power_of_two());
        assert!(thread_stripe() < stripe_count());
        assert_eq!(std::mem::align_of::<BucketLine>(), 128);
    }
}
