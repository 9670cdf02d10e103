//! The sliding windows: call counts striped per thread (the hot path), and the rarer bad
//! calls (failures, slow calls) kept under the breaker's lock.
//!
//! A success in the closed state adds one to a counter in the calling thread's *stripe*, a
//! cache line no other thread writes, so two tasks on two cores do not fight over it. Bad
//! calls are rare while closed (many of them open the breaker), so they take the breaker's
//! lock, are recorded exactly, and trigger an evaluation that sums the stripes.
//!
//! A stripe's counters ([`StripeCalls`]) live in its lane to the key, which exists only
//! while something other than the breaker holds it (a thread's cache, a service, a call):
//! when the breaker alone holds it, the lane is let go and its counts move into the
//! breaker (a count window's into one number, a time window's into one word while they
//! fall in one bucket, [`inline_add`], else into a [`Ring`] kept until its buckets age
//! out). An idle key holds no counter line.
//!
//! - Count window (last N calls): each stripe counts its calls since the window's reset;
//!   the window's total is their sum and what lanes let go left. A bad call is recorded
//!   with its position (the total just after it), and is in the window while
//!   `total - position < N`.
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

/// One thread stripe's share of one breaker's window, held by the stripe's lane (which
/// is made on the stripe's first call to the key and let go once nothing but the
/// breaker holds it: [`Core::lane`](crate::breaker::Core::lane)). Only that stripe's
/// threads add to it, on the lane's own cache lines.
#[derive(Debug)]
pub(crate) enum StripeCalls {
    /// A count window: the stripe's calls since the window's reset (the breaker sums
    /// its lanes and what lanes let go left it).
    Count(AtomicU64),
    /// A time window: the stripe's buckets, each tagged with its tick.
    Time {
        lines: Box<[BucketLine]>,
        buckets: u64,
    },
}

impl StripeCalls {
    pub(crate) fn new(window: Window) -> StripeCalls {
        match window {
            Window::Count { .. } => StripeCalls::Count(AtomicU64::new(0)),
            Window::Time { buckets, .. } => StripeCalls::Time {
                lines: (0..(buckets as usize).div_ceil(PER_LINE))
                    .map(|_| BucketLine::default())
                    .collect(),
                buckets: u64::from(buckets),
            },
        }
    }

    #[inline]
    fn bucket(lines: &[BucketLine], buckets: u64, tick: u64) -> &Bucket {
        let j = (tick % buckets) as usize;
        &lines[j / PER_LINE].0[j % PER_LINE]
    }

    /// Adds one call at `tick` without a lock. False when the bucket belongs to an older
    /// tick and must be reused first ([`add_locked`](Self::add_locked)).
    #[inline]
    pub(crate) fn try_add(&self, tick: u64) -> bool {
        match self {
            StripeCalls::Count(own) => {
                own.fetch_add(1, Ordering::Relaxed);
                true
            }
            StripeCalls::Time { lines, buckets } => {
                let b = Self::bucket(lines, *buckets, tick);
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
    pub(crate) fn add_locked(&self, tick: u64) -> bool {
        match self {
            StripeCalls::Count(_) => {
                self.try_add(tick);
                false
            }
            StripeCalls::Time { lines, buckets } => {
                let b = Self::bucket(lines, *buckets, tick);
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

    /// The stripe's calls in the window at `tick` (a count window: since the reset).
    pub(crate) fn total(&self, tick: u64) -> u64 {
        match self {
            StripeCalls::Count(own) => own.load(Ordering::Relaxed),
            StripeCalls::Time { lines, buckets } => {
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

    /// Empties the stripe's share.
    pub(crate) fn reset(&self) {
        match self {
            StripeCalls::Count(own) => own.store(0, Ordering::Relaxed),
            StripeCalls::Time { lines, .. } => {
                lines.iter().flat_map(|l| l.0.iter()).for_each(|b| {
                    b.tick.store(0, Ordering::Relaxed);
                    b.calls.store(0, Ordering::Relaxed);
                })
            }
        }
    }

    /// Empties the stripe's share into `count` (a count window) or `bucket` (a time
    /// window: called with each bucket's tick + 1 and calls): its lane is being let go,
    /// and no other thread holds it.
    pub(crate) fn drain(&mut self, count: &mut u64, mut bucket: impl FnMut(u64, u64)) {
        use std::mem::take;
        match self {
            StripeCalls::Count(own) => *count += take(own.get_mut()),
            StripeCalls::Time { lines, .. } => {
                for b in lines.iter_mut().flat_map(|l| l.0.iter_mut()) {
                    let (t, c) = (take(b.tick.get_mut()), take(b.calls.get_mut()));
                    if t != 0 && c != 0 {
                        bucket(t, c);
                    }
                }
            }
        }
    }
}

/// The bits of an inline bucket's calls ([`inline_add`]).
const INLINE_CALL_BITS: u32 = 24;
const INLINE_CALLS: u64 = (1 << INLINE_CALL_BITS) - 1;

/// Keeps a time window's bucket of lanes let go (`tick1`: its tick + 1) in one word,
/// `inline`: the tick + 1 in the upper 40 bits, the calls in the lower 24 (0: none), as
/// long as the window holds no other bucket kept so (an idle key that was called within
/// one bucket keeps no ring). `Err` with the bucket kept so far (its tick + 1 and calls,
/// or zeros) when both must go to a [`Ring`] instead.
pub(crate) fn inline_add(
    inline: &mut u64,
    buckets: u64,
    tick1: u64,
    calls: u64,
) -> Result<(), (u64, u64)> {
    let fits = |t: u64, c: u64| t >> (64 - INLINE_CALL_BITS) == 0 && c <= INLINE_CALLS;
    let pack = |t: u64, c: u64| (t << INLINE_CALL_BITS) | c;
    if *inline == 0 {
        return if fits(tick1, calls) {
            *inline = pack(tick1, calls);
            Ok(())
        } else {
            Err((0, 0))
        };
    }
    let (t0, c0) = (*inline >> INLINE_CALL_BITS, *inline & INLINE_CALLS);
    if t0 == tick1 && fits(tick1, c0 + calls) {
        *inline = pack(tick1, c0 + calls);
        Ok(())
    } else if t0.saturating_add(buckets) <= tick1 && fits(tick1, calls) {
        // The kept bucket is out of any window that holds this one.
        *inline = pack(tick1, calls);
        Ok(())
    } else if tick1.saturating_add(buckets) <= t0 {
        // This one is out of any window that holds the kept one (a ring drops it too).
        Ok(())
    } else {
        Err((t0, c0))
    }
}

/// The calls of the bucket kept in `inline` ([`inline_add`]) in a window of `buckets`
/// at `tick`; forgets it once it is older than the window.
pub(crate) fn inline_total(inline: &mut u64, buckets: u64, tick: u64) -> u64 {
    if *inline == 0 {
        return 0;
    }
    let (t, c) = (*inline >> INLINE_CALL_BITS, *inline & INLINE_CALLS);
    if t <= (tick + 1).saturating_sub(buckets) {
        *inline = 0;
        0
    } else if t <= tick + 1 {
        c
    } else {
        0
    }
}

/// A time window's calls counted by lanes that were let go, once they fall in more than
/// one bucket of the window ([`inline_add`]): (tick + 1, calls) per bucket, let go once
/// every bucket it holds is older than the window.
#[derive(Debug, Default)]
pub(crate) struct Ring(Option<Box<[(u64, u64)]>>);

impl Ring {
    pub(crate) fn add(&mut self, buckets: u64, tick1: u64, calls: u64) {
        let ring = self
            .0
            .get_or_insert_with(|| vec![(0, 0); buckets as usize].into_boxed_slice());
        let slot = &mut ring[((tick1 - 1) % buckets) as usize];
        if slot.0 == tick1 {
            slot.1 += calls;
        } else if slot.0 < tick1 {
            // The slot's older tick is out of any window that holds this one.
            *slot = (tick1, calls);
        }
    }

    /// Calls in a window of `buckets` at `tick`; lets go of the ring once every bucket
    /// it holds is older than the window (ticks only grow: none comes back).
    pub(crate) fn total(&mut self, buckets: u64, tick: u64) -> u64 {
        let Some(ring) = &self.0 else { return 0 };
        let lo = (tick + 1).saturating_sub(buckets);
        if ring.iter().all(|b| b.0 <= lo) {
            self.0 = None;
            return 0;
        }
        ring.iter()
            .filter(|b| b.0 > lo && b.0 <= tick + 1)
            .map(|b| b.1)
            .sum()
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
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

    /// Whether it records no bad call the window at `tick` holds or will hold (after
    /// [`stats`](Self::stats), which drops those that left a count window): a time
    /// window's buckets older than the window never come back into it.
    pub(crate) fn is_empty(&self, tick: u64) -> bool {
        match self {
            Bad::Count { calls, .. } => calls.is_empty(),
            Bad::Time { buckets, ring } => {
                let lo = (tick + 1).saturating_sub(*buckets);
                ring.iter().all(|b| b.0 <= lo)
            }
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
        let mut lanes = [StripeCalls::new(w), StripeCalls::new(w)];
        let mut left = 0;
        let total =
            |lanes: &[StripeCalls], left: u64| left + lanes.iter().map(|l| l.total(0)).sum::<u64>();
        let mut bad = Bad::new(w);
        // F S S F S S : with N = 4 the first failure leaves after the 5th call; the
        // second lane is let go after the 4th, its calls still counted.
        for (i, fail) in [true, false, false, true, false, false]
            .into_iter()
            .enumerate()
        {
            lanes[i % 2].add_locked(0);
            if i == 3 {
                lanes[1].drain(&mut left, |_, _| {});
                assert_eq!(lanes[1].total(0), 0);
                assert_eq!(left, 2);
            }
            if fail {
                bad.add(total(&lanes, left), true, false);
            }
            let st = bad.stats(total(&lanes, left), 0);
            let want = match i {
                0..=2 => 1,
                3 => 2,
                _ => 1,
            };
            assert_eq!(st.failures, want, "after call {i}");
            assert_eq!(st.calls, (i as u64 + 1).min(4));
        }
        lanes.iter().for_each(StripeCalls::reset);
        bad.reset();
        assert_eq!(bad.stats(total(&lanes, 0), 0), Stats::default());
    }

    #[test]
    fn time_window_drops_whole_buckets() {
        let w = Window::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        };
        let (a, b) = (StripeCalls::new(w), StripeCalls::new(w));
        let mut bad = Bad::new(w);
        assert!(!a.try_add(3), "a fresh bucket must be tagged first");
        assert!(a.add_locked(3));
        assert!(a.try_add(3));
        assert!(b.add_locked(3));
        bad.add(3, true, false);
        let total = |t| a.total(t) + b.total(t);
        assert_eq!(total(3), 3);
        assert_eq!(
            bad.stats(total(12), 12),
            Stats {
                calls: 3,
                failures: 1,
                slow: 0
            }
        );
        assert!(!bad.is_empty(12));
        // tick 13: bucket 3 left the window (ticks 4..=13 remain).
        assert_eq!(total(13), 0);
        assert_eq!(bad.stats(0, 13).failures, 0);
        assert!(bad.is_empty(13));
        // reusing bucket slot 3 for tick 13 zeroes it.
        assert!(a.add_locked(13));
        assert_eq!(total(13), 1);
        // a late call for an older tick lands in the current bucket.
        assert!(!a.add_locked(3));
        assert_eq!(total(13), 2);
    }

    #[test]
    fn a_time_lane_let_go_leaves_its_buckets_until_they_age_out() {
        let w = Window::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        };
        let mut a = StripeCalls::new(w);
        let b = StripeCalls::new(w);
        for t in [2, 3, 3, 11] {
            a.add_locked(t);
        }
        b.add_locked(3);
        let mut ring = Ring::default();
        let mut count = 0;
        a.drain(&mut count, |t, c| ring.add(10, t, c));
        assert_eq!((count, a.total(11)), (0, 0));
        // slot 1 holds tick 11 (tick 1 never came); ticks 2..=11 are in the window.
        assert_eq!(ring.total(10, 11) + b.total(11), 5);
        assert_eq!(ring.total(10, 12) + b.total(12), 4, "tick 2 left");
        assert_eq!(ring.total(10, 13), 1, "tick 3 left");
        assert!(!ring.is_empty());
        assert_eq!(ring.total(10, 21), 0, "tick 11 left");
        assert!(ring.is_empty(), "and the ring with it");
    }

    #[test]
    fn one_bucket_is_kept_inline_until_a_second_of_the_window_comes() {
        let mut k = 0;
        assert_eq!(inline_add(&mut k, 10, 4, 2), Ok(()));
        assert_eq!(inline_add(&mut k, 10, 4, 3), Ok(()));
        assert_eq!(inline_total(&mut k, 10, 3), 5);
        assert_eq!(inline_total(&mut k, 10, 2), 0, "a later bucket");
        assert_eq!(inline_add(&mut k, 10, 20, 1), Ok(()), "the kept one left");
        assert_eq!(inline_total(&mut k, 10, 19), 1);
        assert_eq!(
            inline_add(&mut k, 10, 5, 9),
            Ok(()),
            "older than the window: dropped"
        );
        assert_eq!(inline_total(&mut k, 10, 19), 1);
        assert_eq!(
            inline_add(&mut k, 10, 15, 1),
            Err((20, 1)),
            "two in one window"
        );
        assert_eq!(
            inline_add(&mut k, 10, 20, INLINE_CALLS),
            Err((20, 1)),
            "too many"
        );
        let mut big = 0;
        assert_eq!(
            inline_add(&mut big, 10, 1 << 40, 1),
            Err((0, 0)),
            "too late"
        );
        assert_eq!(inline_total(&mut k, 10, 28), 1);
        assert_eq!(inline_total(&mut k, 10, 29), 0, "tick 19 left");
        assert_eq!(k, 0, "and was forgotten");
    }

    #[test]
    fn stripes_are_powers_of_two_and_lines_do_not_overlap() {
        assert!(stripe_count().is_power_of_two());
        assert!(thread_stripe() < stripe_count());
        assert_eq!(std::mem::align_of::<BucketLine>(), 128);
    }
}
