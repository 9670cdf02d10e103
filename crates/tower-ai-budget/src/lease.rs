//! Leases: the budget's windows lent out in small chunks to *stripes*, so that requests on
//! different threads are admitted and settled without writing to any memory another
//! thread writes on every call.
//!
//! A budget that counts tokens or money has a few stripes (twice the cores, at least 4, at
//! most 64), each a lock of its own on a cache line of its own. A thread uses one stripe
//! (the threads are dealt out to the stripes in turn as they first call). Once the locked
//! path has admitted a request of a key that is far from all of its limits, it lends the
//! thread's stripe a *lease* of that key: a chunk of each window (1/32 of the window's
//! line, shared among the stripes), added to the window's current slot at once. Requests
//! of that key on that thread are then admitted from the lease, under the stripe's lock
//! alone, while it has room and the second it was lent in lasts; their reservations are
//! kept in the stripe, and settled there: a refund goes back into the lease while it
//! lasts, or waits in the stripe (a few at a time, merged per key and second) for the next
//! time the stripe goes to the budget's lock.
//!
//! # Why the limits hold exactly
//!
//! A lease is counted in full in its key's windows, in the slot of the second it was lent
//! in, from the moment it is lent until it is given back; it admits only within that
//! second, and never more than it holds. So every admission is counted in the window at
//! least as early and as much as the locked path would have counted it: the window never
//! admits more than its limit in any interval of its length, as before.
//!
//! Its unused part is counted as used until it is given back, which only matters near a
//! limit. So leases are lent only while each window has room for this chunk and one more
//! per stripe below its line (the soft-limit line when one is set); and the locked path,
//! before it decides on a request that would bring a key within that distance of a line,
//! takes back every lease and waiting refund of that key from every stripe. Near its
//! limits a key is therefore decided exactly as without leases: the same refusals, the
//! same waits, the same soft-limit events. A chunk smaller than the request the lease
//! would be lent after is not lent at all (a limit too small for leases to help is
//! decided on the locked path, request by request, as before).
//!
//! Locks: the budget's lock may take a stripe's (to lend, or take back), never the other way
//! round: a stripe's lock is let go before its settlement goes to the budget.
//!
//! A charge above a request's reservation (the provider used more than estimated) that
//! its lease cannot absorb is applied under the budget's lock at once, as before: only
//! refunds wait.

// Leases keep parallel arrays (granted, used, amounts) per window: indexing them together
// reads better than zipping three or four iterators.
#![allow(clippy::needless_range_loop)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

use crate::budget::{Budget, Cost, Finish, Reservations, Reserve, FAST_BATCH_DIVISOR};
use crate::config::Limits;

/// Leases a stripe holds at once (of different keys).
pub(crate) const LEASES: usize = 2;
/// Refunds a stripe keeps before it gives them to the budget.
pub(crate) const PENDING: usize = 8;
/// The most windows a key has.
pub(crate) const WINDOWS: usize = 4;

/// The index of this thread's stripe (before masking): threads are dealt out in turn.
#[inline]
pub(crate) fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

/// How leases are cut for a budget's windows (in the order of its keys' windows).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseConfig {
    /// Windows a key has.
    pub(crate) n: usize,
    /// The limit of each window.
    pub(crate) kinds: [BudgetLimit; WINDOWS],
    /// A lease's chunk of each window.
    pub(crate) chunk: [u64; WINDOWS],
    /// The line leases stay below: the soft-limit line, or the limit.
    pub(crate) line: [u64; WINDOWS],
    /// Room kept below the line beside a chunk: one chunk per stripe.
    pub(crate) margin: [u64; WINDOWS],
    /// Stripes - 1 (a power of two, less one).
    pub(crate) mask: usize,
}

impl LeaseConfig {
    /// The stripes a budget gets: twice the cores, at least 4, at most 64.
    pub(crate) fn stripes() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_mul(2).next_power_of_two().clamp(4, 64)
    }

    /// Leases for `l`, cut for `stripes` stripes; `None` when they do not apply: a budget
    /// that counts no tokens or money (it has its fast path), one with a concurrency limit
    /// (every request is counted in flight), or one kept in a store.
    pub(crate) fn of(l: &Limits, stripes: usize) -> Option<Self> {
        if !l.counts_tokens() || l.max_concurrent.is_some() || l.store.is_some() {
            return None;
        }
        let line = |max: u64| match l.soft_limit {
            Some(f) => ((max as f64 * f).ceil() as u64).saturating_sub(1).min(max),
            None => max,
        };
        let mut cfg = LeaseConfig {
            n: 0,
            kinds: [BudgetLimit::RequestsPerMinute; WINDOWS],
            chunk: [0; WINDOWS],
            line: [0; WINDOWS],
            margin: [0; WINDOWS],
            mask: stripes.saturating_sub(1),
        };
        let per = FAST_BATCH_DIVISOR.saturating_mul(stripes as u64);
        for (limit, max) in [
            (BudgetLimit::RequestsPerMinute, l.requests_per_minute),
            (BudgetLimit::TokensPerMinute, l.tokens_per_minute),
            (BudgetLimit::SpendPerHour, l.spend_per_hour),
            (BudgetLimit::SpendPerDay, l.spend_per_day),
        ] {
            let Some(max) = max else { continue };
            let i = cfg.n;
            cfg.kinds[i] = limit;
            cfg.line[i] = line(max);
            cfg.chunk[i] = cfg.line[i] / per;
            cfg.margin[i] = cfg.chunk[i].saturating_mul(stripes as u64);
            cfg.n += 1;
        }
        Some(cfg)
    }

    /// What a request of `cost` takes of each window.
    #[inline]
    pub(crate) fn amounts(&self, cost: &Cost) -> [u64; WINDOWS] {
        self.amounts_of(cost.tokens, cost.spend)
    }

    /// What `tokens` and `spend` take of each window (a request counts 1 in the request
    /// window).
    #[inline]
    pub(crate) fn amounts_of(&self, tokens: u64, spend: u64) -> [u64; WINDOWS] {
        let mut a = [0; WINDOWS];
        for (a, kind) in a.iter_mut().zip(&self.kinds[..self.n]) {
            *a = match kind {
                BudgetLimit::RequestsPerMinute => 1,
                BudgetLimit::TokensPerMinute => tokens,
                _ => spend,
            };
        }
        a
    }

    /// Whether windows holding `used` have room for `extra`, a chunk and the margin below
    /// their lines: far from every limit, where leases may be out.
    pub(crate) fn roomy(&self, used: impl Iterator<Item = u64>, extra: &[u64; WINDOWS]) -> bool {
        used.zip(0..self.n).all(|(u, i)| {
            u.saturating_add(extra[i])
                .saturating_add(self.chunk[i])
                .saturating_add(self.margin[i])
                <= self.line[i]
        })
    }

    /// Whether a chunk can hold a request taking `amounts` (else a lease would not help).
    pub(crate) fn chunk_holds(&self, amounts: &[u64; WINDOWS]) -> bool {
        (0..self.n).all(|i| self.chunk[i] >= amounts[i] && self.chunk[i] > 0)
    }
}

/// A key's chunk of each window, lent to a stripe for one second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    pub(crate) key: Key,
    /// The second (since the budget's epoch) it was lent in, and admits in.
    pub(crate) secs: u64,
    pub(crate) granted: [u64; WINDOWS],
    pub(crate) used: [u64; WINDOWS],
}

/// What settled requests of one key admitted in one second gave back, not yet taken off
/// the key's windows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refund {
    pub(crate) key: Key,
    pub(crate) secs: u64,
    pub(crate) amounts: [u64; WINDOWS],
}

/// What a stripe holds.
#[derive(Debug, Default)]
pub(crate) struct StripeState {
    pub(crate) leases: [Option<Lease>; LEASES],
    pub(crate) pending: [Option<Refund>; PENDING],
    /// The reservations of requests admitted from this stripe's leases, not yet settled.
    pub(crate) reserved: Reservations,
}

impl StripeState {
    /// Takes the refunds out.
    pub(crate) fn take_pending(&mut self) -> [Option<Refund>; PENDING] {
        std::mem::take(&mut self.pending)
    }
}

/// One stripe: its lock on a cache line of its own (two, for CPUs that fetch lines in
/// pairs), and what its settlements need.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Stripe {
    state: Mutex<StripeState>,
    pub(crate) budget: Weak<Budget>,
    pub(crate) cfg: LeaseConfig,
    /// Refunds waiting in all stripes of the budget.
    pub(crate) pending_out: Arc<PendingCount>,
    pub(crate) max_usage_body: usize,
    pub(crate) max_event: usize,
}

/// A count on a cache line of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct PendingCount(pub(crate) AtomicUsize);

impl Stripe {
    pub(crate) fn new(
        budget: Weak<Budget>,
        cfg: LeaseConfig,
        pending_out: Arc<PendingCount>,
        l: &Limits,
    ) -> Self {
        Stripe {
            state: Mutex::default(),
            budget,
            cfg,
            pending_out,
            max_usage_body: l.max_usage_body,
            max_event: l.max_event,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, StripeState> {
        // Nothing under the lock can panic half-way through an update.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request of `key` taking `amounts` at second `secs` from this stripe's lease,
    /// if it holds one of the key lent in that second with room: the reservation's slot.
    #[inline]
    pub(crate) fn admit(
        &self,
        key: Key,
        secs: u64,
        amounts: &[u64; WINDOWS],
        cost: &Cost,
    ) -> Option<u32> {
        let n = self.cfg.n;
        let mut s = self.lock();
        let lease = s
            .leases
            .iter_mut()
            .flatten()
            .find(|l| l.key == key && l.secs == secs)?;
        if (0..n).any(|i| lease.used[i].saturating_add(amounts[i]) > lease.granted[i]) {
            return None;
        }
        for i in 0..n {
            lease.used[i] += amounts[i];
        }
        Some(s.reserved.reserve(key, Reserve::of(cost, secs, false)))
    }

    /// Settles the reservation in `slot` as `finish` says: into the lease it came from
    /// while that lasts, else a refund kept here (given to the budget when the stripe
    /// holds [`PENDING`] of them), else (a charge the lease cannot take) under the
    /// budget's lock at once.
    pub(crate) fn finish(&self, slot: u32, finish: Finish) {
        let n = self.cfg.n;
        let mut flush = None;
        let charge = {
            let mut s = self.lock();
            let Some((key, r)) = s.reserved.take_slot(slot) else {
                return;
            };
            if finish == Finish::Keep {
                // It cost what it reserved: the lease already counts that.
                return;
            }
            let (tokens, spend) = r.settled(finish);
            let reserved = self.cfg.amounts_of(r.tokens, r.spend);
            let mut actual = self.cfg.amounts_of(tokens, spend);
            // The request window counts the request whatever it used.
            for i in 0..n {
                if self.cfg.kinds[i] == BudgetLimit::RequestsPerMinute {
                    actual[i] = reserved[i];
                }
            }
            if reserved == actual {
                return;
            }
            let lease = s
                .leases
                .iter_mut()
                .flatten()
                .find(|l| l.key == key && l.secs == r.secs);
            let refund = (0..n).all(|i| actual[i] <= reserved[i]);
            match lease {
                // Into a lease of the key lent in the request's second: the one that
                // admitted it, or a later one of the same second (which may then admit
                // what this request gave back: the slot holds both, so its sum is exact).
                // A lease that admitted less than the reservation (a later one) cannot
                // take it without losing some of it: the refund waits instead.
                Some(l)
                    if (0..n).all(|i| {
                        l.used[i] >= reserved[i]
                            && (l.used[i] - reserved[i]).saturating_add(actual[i]) <= l.granted[i]
                    }) =>
                {
                    for i in 0..n {
                        l.used[i] = (l.used[i] - reserved[i]).saturating_add(actual[i]);
                    }
                    None
                }
                _ if refund => {
                    let mut amounts = [0; WINDOWS];
                    for i in 0..n {
                        amounts[i] = reserved[i] - actual[i];
                    }
                    let pending = &mut s.pending;
                    if let Some(p) = pending
                        .iter_mut()
                        .flatten()
                        .find(|p| p.key == key && p.secs == r.secs)
                    {
                        for i in 0..n {
                            p.amounts[i] = p.amounts[i].saturating_add(amounts[i]);
                        }
                    } else {
                        self.pending_out.0.fetch_add(1, Ordering::AcqRel);
                        let free = pending.iter().position(Option::is_none);
                        let free = match free {
                            Some(i) => i,
                            None => {
                                flush = Some(s.take_pending());
                                0
                            }
                        };
                        s.pending[free] = Some(Refund {
                            key,
                            secs: r.secs,
                            amounts,
                        });
                    }
                    None
                }
                _ => Some((key, r.secs, reserved, actual)),
            }
        };
        if flush.is_none() && charge.is_none() {
            return;
        }
        let Some(budget) = self.budget.upgrade() else {
            return;
        };
        if let Some(refunds) = flush {
            budget.apply_refunds(refunds.iter().flatten());
        }
        if let Some((key, secs, reserved, actual)) = charge {
            budget.correct(key, secs, &reserved, &actual);
        }
    }
}
