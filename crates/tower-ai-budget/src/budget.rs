//! The budget's state: per-key windows, in-flight counts and FIFO wait queues.
//!
//! Three paths admit a request:
//!
//! - **The fast path** (budgets that count no tokens or money): one compare-and-swap on the
//!   key's [`KeyFast`] word, which holds the requests in flight and a small batch of
//!   *permits* the locked path granted. No lock, no clock read, no allocation.
//! - **The locked path** (everything else, and whenever the fast path has no permit): the
//!   lock, for a few dozen instructions (look the key up, move its windows to now, compare,
//!   add). It reads the clock, counts the permits the fast path used since the last grant
//!   (*flushes* them into the window), decides, and grants a new batch if the key is far
//!   from its limits and nobody waits.
//!
//! - **Leases** (budgets that count tokens or money, without a concurrency limit): a
//!   thread's stripe admits and settles requests of a key far from its limits from a
//!   chunk of its windows the locked path lent it (see `lease.rs`).
//!
//! No lock is held across an `.await`, no waker is woken under the lock, and nothing on
//! either path allocates once a key exists.
//!
//! # Why a batch needs no clock, and what it costs
//!
//! A fast admission is counted in the minute window when its batch is flushed, at a time
//! no earlier than the admission itself, and until then it counts as used in every check.
//! So no admission is ever missing from a check made within a minute of it: the window
//! still never admits more than its limit in any minute, whatever the clock does (a paused
//! `tokio` clock included). The price is that a batch is counted from its flush rather
//! than from each of its admissions: one batch (the one that spans the start of the
//! minute being looked at) may still be counted when an exact log would have let it go.
//! A batch is at most [`FAST_BATCH_DIVISOR`]th of the limit (and at most
//! [`FAST_BATCH_MAX`]), and batches are granted only up to the soft-limit line, so the
//! window may count up to that many requests more than an exact log, never fewer; a
//! request limit under [`FAST_BATCH_DIVISOR`] gets no batches at all.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;
use tower_ai_core::keys::{Key, KeyMap};
use tower_ai_core::{BudgetLimit, RateLimitInfo, RequestMeta, Usage};

use crate::config::{Limits, NanoPrice, PriceOf, WhenFull};
use crate::lease::{Lease, LeaseConfig, PendingCount, Refund, Stripe, WINDOWS};
use crate::window::{Spec, Window, WindowMut};

/// Seconds per slot and slots per window (see `window.rs` for the accuracy this gives).
const MINUTE: (u64, usize) = (1, 60);
const HOUR: (u64, usize) = (60, 60);
const DAY: (u64, usize) = (900, 96);

/// The key new keys share while the map is full of keys with something to lose (see
/// [`TokenBudgetLayer::overflow_key`](crate::TokenBudgetLayer::overflow_key)).
pub(crate) fn overflow_key() -> Key {
    static KEY: std::sync::OnceLock<Key> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| Key::of("tower-ai-budget: overflow key"))
}

/// A batch of fast permits is at most this fraction of the request limit...
pub(crate) const FAST_BATCH_DIVISOR: u64 = 32;
/// ... and at most this many requests.
pub(crate) const FAST_BATCH_MAX: u64 = 1024;

/// The [`KeyFast`] word: requests in flight in the low 32 bits, fast permits in the next
/// 31, and a flag saying the key's queue is not empty in the top bit.
const IN_FLIGHT_MASK: u64 = u32::MAX as u64;
const PERMIT_ONE: u64 = 1 << 32;
const PERMIT_MAX: u64 = (1 << 31) - 1;
const PERMIT_MASK: u64 = PERMIT_MAX << 32;
const WAITERS: u64 = 1 << 63;

fn permits(word: u64) -> u64 {
    (word & PERMIT_MASK) >> 32
}

fn in_flight(word: u64) -> u32 {
    (word & IN_FLIGHT_MASK) as u32
}

/// What one key shares with the fast path: one atomic word (24 bytes in all).
///
/// Without a concurrency limit (*split* mode: nothing is in flight to count) the word is
/// the permits alone, as a signed count taken by one atomic subtraction (no
/// compare-and-swap loop to retry under contention): a value at or below zero means none
/// is left. Whether a budget is split is the same for all its keys (`in_flight_max` is
/// `None`), so the word does not say it.
///
/// It is not padded to a cache line of its own: that took 128 bytes per key, every key,
/// to spare two hot keys on two threads the chance of sharing a line; the contention that
/// is sure to happen, many threads on one key, is on this one word either way.
pub(crate) struct KeyFast {
    word: AtomicU64,
    key: Key,
    budget: Weak<Budget>,
}

impl fmt::Debug for KeyFast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.word.load(Ordering::Relaxed);
        f.debug_struct("KeyFast")
            .field("key", &self.key)
            .field("word", &format_args!("{w:#x}"))
            .finish()
    }
}

impl KeyFast {
    /// Admits a request on the fast path: takes a permit and, with a concurrency limit
    /// (`in_flight_max`: the most requests in flight after this one), a place in flight.
    /// `false`: no permit, or too many in flight; take the locked path.
    #[inline]
    pub(crate) fn try_acquire(&self, in_flight_max: Option<u32>) -> bool {
        if in_flight_max.is_none() {
            // Split: the word is the permits alone.
            return (self.word.fetch_sub(1, Ordering::AcqRel) as i64) > 0;
        }
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            if cur & PERMIT_MASK == 0 {
                return false;
            }
            let mut new = cur - PERMIT_ONE;
            if let Some(max) = in_flight_max {
                if in_flight(cur) >= max {
                    return false;
                }
                new += 1;
            }
            match self
                .word
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(w) => cur = w,
            }
        }
    }

    /// Takes a place in flight if fewer than `max` are; otherwise marks the key as having
    /// waiters, in the same atomic step, so a release racing with this either frees the
    /// place seen here or sees the mark (and wakes the queue). Returns the number in
    /// flight with this request, or `None`.
    fn acquire_or_mark(&self, max: u32) -> Option<u32> {
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let n = in_flight(cur);
            let new = if n < max { cur + 1 } else { cur | WAITERS };
            if new == cur {
                return None;
            }
            match self
                .word
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return (n < max).then_some(n + 1),
                Err(w) => cur = w,
            }
        }
    }

    /// Gives back a place in flight; wakes the head of the key's queue if it has one.
    #[inline]
    pub(crate) fn release(&self) {
        let prev = self.word.fetch_sub(1, Ordering::AcqRel);
        if prev & WAITERS != 0 {
            self.wake_queue();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_queue(&self) {
        if let Some(budget) = self.budget.upgrade() {
            budget.wake_head(self.key);
        }
    }

    fn in_flight(&self, split: bool) -> u32 {
        if split {
            0
        } else {
            in_flight(self.word.load(Ordering::Acquire))
        }
    }

    /// The fast permits not taken yet.
    fn permits_left(&self, split: bool) -> u64 {
        let w = self.word.load(Ordering::Acquire);
        if split {
            (w as i64).max(0) as u64
        } else {
            permits(w)
        }
    }

    /// Takes the permits not taken yet back; how many there were.
    fn take_permits(&self, split: bool) -> u64 {
        if split {
            (self.word.swap(0, Ordering::AcqRel) as i64).max(0) as u64
        } else {
            permits(self.word.fetch_and(!PERMIT_MASK, Ordering::AcqRel))
        }
    }

    /// Gives `n` permits (there are none).
    fn give_permits(&self, split: bool, n: u64) {
        if split {
            self.word.store(n, Ordering::Release);
        } else {
            self.word.fetch_add(n << 32, Ordering::AcqRel);
        }
    }
}

/// A service clone's cache of the last key it used, for the fast path.
pub(crate) type Cached = Option<(Key, Arc<KeyFast>)>;

/// What the fast path may do under a budget's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastConfig {
    /// Whether requests may be admitted without the lock at all (no token or money limit).
    pub(crate) enabled: bool,
    /// Whether responses are read for the provider's rate-limit headers (a copy of the
    /// limits' flag, at hand on the fast path).
    pub(crate) sync_from_headers: bool,
    /// With a concurrency limit: the most requests in flight after a fast admission (the
    /// limit, or just under its soft-limit line, which the locked path crosses and reports).
    pub(crate) in_flight_max: Option<u32>,
    /// Permits per batch, with a request limit.
    batch: u64,
    /// The most requests the minute window may hold once a batch is spent (the limit, or
    /// just under its soft-limit line).
    rpm_line: u64,
}

impl FastConfig {
    fn of(l: &Limits) -> Self {
        let line = |max: u64| match l.soft_limit {
            Some(f) => ((max as f64 * f).ceil() as u64).saturating_sub(1).min(max),
            None => max,
        };
        FastConfig {
            enabled: !l.counts_tokens() && l.store.is_none(),
            sync_from_headers: l.sync_from_headers,
            in_flight_max: l
                .max_concurrent
                .map(|m| u32::try_from(line(u64::from(m))).unwrap_or(m)),
            batch: l
                .requests_per_minute
                .map_or(PERMIT_MAX, |n| (n / FAST_BATCH_DIVISOR).min(FAST_BATCH_MAX)),
            rpm_line: l.requests_per_minute.map_or(0, line),
        }
    }
}

/// What prices a request for a spend cap.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PriceBy<'a> {
    /// The request's model.
    Model,
    /// An Azure OpenAI deployment (`None`: the request names none).
    Deployment(Option<&'a str>),
}

/// The deployment of an Azure OpenAI path (`/openai/deployments/{deployment}/…`).
pub(crate) fn azure_deployment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    Some(&rest[..rest.find('/').unwrap_or(rest.len())]).filter(|d| !d.is_empty())
}

/// What one request costs the budget, computed before the call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    /// Tokens reserved: input estimate + max output (saturating).
    pub(crate) tokens: u64,
    /// Money reserved, in nano-units.
    pub(crate) spend: u64,
    /// The model's price, to cost the actual usage later.
    pub(crate) price: NanoPrice,
}

/// What an admitted request with tokens or money reserved holds until it finishes: its
/// place in its key's table of reservations (small, so the response body that carries
/// it stays small to move).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    pub(crate) key: Key,
    slot: u32,
}

/// A reservation, kept by its key until it finishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserve {
    pub(crate) secs: u64,
    pub(crate) tokens: u64,
    pub(crate) spend: u64,
    pub(crate) price: NanoPrice,
    pub(crate) concurrency: bool,
}

impl Reserve {
    /// The reservation of a request of `cost` made in second `secs`, holding a concurrency
    /// place or not.
    pub(crate) fn of(cost: &Cost, secs: u64, concurrency: bool) -> Self {
        Reserve {
            secs,
            tokens: cost.tokens,
            spend: cost.spend,
            price: cost.price,
            concurrency,
        }
    }

    /// The tokens and money it cost, as `finish` says.
    pub(crate) fn settled(&self, finish: Finish) -> (u64, u64) {
        match finish {
            Finish::Keep => (self.tokens, self.spend),
            Finish::Refund => (0, 0),
            Finish::Used(u) => (u.total(), self.price.cost(u.input_tokens, u.output_tokens)),
            Finish::AtLeast(u) => (
                u.total().max(self.tokens),
                self.price
                    .cost(u.input_tokens, u.output_tokens)
                    .max(self.spend),
            ),
        }
    }
}

/// What an admitted request holds until it finishes.
#[derive(Debug)]
pub(crate) enum Hold {
    /// Nothing to give back (a request limit alone).
    Nothing,
    /// A place in flight, given back with one atomic step.
    Permit(Arc<KeyFast>),
    /// Tokens and money (and maybe a place in flight), settled under the lock.
    Reserved(Reservation),
}

/// How a request ended, for its reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// No usage is known (stream cut, body dropped, future dropped in flight): keep the
    /// whole reservation.
    Keep,
    /// The provider said what it used: replace the reservation with it.
    Used(Usage),
    /// The response did not reach its end (a stream cut before its terminal event, a body
    /// dropped early): what it reported so far may be less than it will bill, so the
    /// larger of that usage and the reservation is kept, tokens and money each.
    AtLeast(Usage),
    /// The call failed (error response, transport error): give back tokens and money.
    Refund,
}

/// A soft-limit crossing to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Soft {
    pub(crate) limit: BudgetLimit,
    pub(crate) used: u64,
    pub(crate) max: u64,
}

/// How long a request waits for the budget, and what its caller's deadline says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    /// When it stops waiting: the earlier of `max_wait` from its call and `serve_by`.
    pub(crate) give_up: Instant,
    /// Its [`Deadline`](tower_ai_core::Deadline) less the expected service time, if it
    /// carries one: the last start that can still be answered in time.
    pub(crate) serve_by: Option<Instant>,
    /// Its `Deadline`, if it carries one.
    pub(crate) deadline: Option<Instant>,
}

impl Patience {
    /// The patience of a request called at `now`: `max_wait`, its deadline and the
    /// expected service time.
    pub(crate) fn new(
        now: Instant,
        max_wait: Duration,
        deadline: Option<Instant>,
        expected_service: Duration,
    ) -> Self {
        let own = now.checked_add(max_wait).unwrap_or(now);
        let serve_by = deadline.map(|d| d.checked_sub(expected_service).unwrap_or(now).max(now));
        Patience {
            give_up: serve_by.map_or(own, |s| own.min(s)),
            serve_by,
            deadline,
        }
    }

    /// The `retry_after` of a refusal, for a request that would fit at `at` (`None`: not
    /// known). When it would fit too late for its caller's deadline, the wait runs at
    /// least to that deadline: no retry before it could be answered in time, so a retry
    /// layer that honours deadlines (AiRetry) stops instead of waiting for a slot it
    /// cannot use. Later than when capacity comes by at most the expected service time.
    pub(crate) fn retry_after(&self, at: Option<Instant>, now: Instant) -> Duration {
        let Some(at) = at else {
            return Duration::ZERO;
        };
        let at = match (self.serve_by, self.deadline) {
            (Some(s), Some(d)) if at >= s => at.max(d),
            _ => at,
        };
        at.saturating_duration_since(now)
    }
}

/// The verdict on a request.
#[derive(Debug)]
pub(crate) enum Decision {
    /// It fits and is counted.
    Admitted { hold: Hold, soft: Option<Soft> },
    /// It waits, with ticket `ticket`, for `limit`; it may fit at `until` (`None`: when
    /// something is released, or when it reaches the head of the queue).
    Wait {
        /// The key whose queue it waits in: the request's, or the overflow key.
        key: Key,
        ticket: u64,
        limit: BudgetLimit,
        until: Option<Instant>,
    },
    /// Refused; `retry_after: None` means it can never fit.
    Reject {
        limit: BudgetLimit,
        retry_after: Option<Duration>,
    },
}

/// The shared state of one layer.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) limits: Arc<Limits>,
    pub(crate) fast: FastConfig,
    epoch: Instant,
    /// Seconds after a key's last touch by which all of its windows have emptied.
    horizon: u64,
    /// The shape of each window a key holds, in the order of [`KeyState::windows`].
    specs: Box<[Spec]>,
    me: Weak<Budget>,
    keys: Mutex<Keys>,
    /// How leases are cut, when the budget lends them (see `lease.rs`).
    lease: Option<LeaseConfig>,
    /// The stripes leases are lent to (none without leases).
    stripes: Box<[Arc<Stripe>]>,
    /// Refunds waiting in the stripes.
    pending_out: Arc<PendingCount>,
}

#[derive(Debug, Default)]
struct Keys {
    map: KeyMap<Box<KeyState>>,
    /// The map's table for its bound: see [`Table`].
    table: Table,
    next_ticket: u64,
    /// Every key, in the order of the second it was last touched (its `last_secs`), oldest
    /// first: eviction looks only at the front, so it is amortised O(1). Kept lazily: an
    /// entry whose second is not its key's `last_secs` any more is stale and skipped.
    touched: VecDeque<(Key, u64)>,
    /// Requests waiting in all queues.
    waiters: usize,
    /// Requests sent to the overflow key since the budget was made.
    overflowed: u64,
    /// The reservations of every key not yet finished.
    reserved: Reservations,
}

/// Reservations not yet finished, of all keys together (`None`: a free slot, listed in
/// `free`): the table is as large as the most requests held at once, and an idle key
/// keeps none of it.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    slots: Vec<Option<(Key, Reserve)>>,
    free: Vec<u32>,
    held: usize,
}

impl Reservations {
    /// Keeps a reservation; its slot.
    pub(crate) fn reserve(&mut self, key: Key, r: Reserve) -> u32 {
        self.held += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some((key, r));
                slot
            }
            None => {
                self.slots.push(Some((key, r)));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Takes `key`'s reservation in `slot` back out.
    fn take(&mut self, key: Key, slot: u32) -> Option<Reserve> {
        let entry = self.slots.get(slot as usize)?;
        if !entry.is_some_and(|(k, _)| k == key) {
            return None;
        }
        self.take_slot(slot).map(|(_, r)| r)
    }

    /// Takes the reservation in `slot` back out, with its key.
    pub(crate) fn take_slot(&mut self, slot: u32) -> Option<(Key, Reserve)> {
        let (key, r) = self.slots.get_mut(slot as usize)?.take()?;
        self.held = self.held.saturating_sub(1);
        if self.held == 0 {
            // Keep the memory for the next ones, unless a burst left a lot of it.
            self.slots.clear();
            self.free.clear();
            if self.slots.capacity() > 1024 {
                self.slots.shrink_to(64);
                self.free.shrink_to(64);
            }
        } else {
            self.free.push(slot);
        }
        Some((key, r))
    }

    /// Reservations of `key` held.
    pub(crate) fn of(&self, key: Key) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|(k, _)| *k == key)
            .count()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<(Key, Reserve)>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }
}

/// A key's state: 56 bytes, its windows (16 bytes each while few of their slots hold
/// anything) and, when the fast path is used, its [`KeyFast`].
#[derive(Debug)]
struct KeyState {
    /// The windows the budget limits, in the order requests, tokens, spend per hour,
    /// spend per day (those of `kinds`, the budget's `specs` in the same order), out of
    /// line: an idle key's entry stays small.
    windows: Box<[Window]>,
    /// In-flight count, fast permits and the waiters flag: only when the budget has a
    /// fast path or a concurrency limit (see [`Budget::keeps_fast`]).
    fast: Option<Arc<KeyFast>>,
    /// Requests waiting, nothing on the heap while nobody waits.
    queue: Queue,
    last_secs: u64,
    /// Fast permits granted since the last flush (at most [`PERMIT_MAX`]).
    granted: u32,
    /// Reservations not yet finished (in [`Keys::reserved`]): a key holding any is never
    /// evicted.
    held: u32,
    /// Which windows `windows` holds: bit [`RPM`], [`TPM`], [`HOUR_SPEND`], [`DAY_SPEND`].
    kinds: u8,
    /// Whether the fast word holds the permits alone (no concurrency limit).
    split: bool,
    blocked_on: BudgetLimit,
    /// Stripes holding a lease of this key (see `lease.rs`).
    leases: u8,
}

/// A key's queue of waiters: nothing on the heap while nobody waits (made by the first
/// waiter, let go when the last one leaves).
// Boxed on purpose: 8 bytes in every key's entry instead of a `VecDeque`'s 32.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct Queue(Option<Box<VecDeque<Ticket>>>);

impl Queue {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.capacity())
    }

    fn front(&self) -> Option<&Ticket> {
        self.0.as_ref()?.front()
    }

    fn front_mut(&mut self) -> Option<&mut Ticket> {
        self.0.as_mut()?.front_mut()
    }

    fn iter(&self) -> impl Iterator<Item = &Ticket> {
        self.0.iter().flat_map(|q| q.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Ticket> {
        self.0.iter_mut().flat_map(|q| q.iter_mut())
    }

    fn push_back(&mut self, t: Ticket) {
        self.0.get_or_insert_default().push_back(t);
    }

    fn pop_front(&mut self) -> Option<Ticket> {
        let t = self.0.as_mut()?.pop_front();
        self.let_go_if_empty();
        t
    }

    fn retain(&mut self, f: impl FnMut(&Ticket) -> bool) {
        if let Some(q) = &mut self.0 {
            q.retain(f);
        }
        self.let_go_if_empty();
    }

    fn let_go_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }
}

#[derive(Debug)]
struct Ticket {
    id: u64,
    waker: Option<Waker>,
    /// What it will take of the token and money windows (for the predicted start of
    /// those behind it).
    tokens: u64,
    spend: u64,
}

impl Ticket {
    fn new(id: u64, waker: Option<&Waker>, cost: &Cost) -> Self {
        Ticket {
            id,
            waker: waker.cloned(),
            tokens: cost.tokens,
            spend: cost.spend,
        }
    }

    /// What it takes of `limit`.
    fn amount(&self, limit: BudgetLimit) -> u64 {
        match limit {
            BudgetLimit::RequestsPerMinute => 1,
            BudgetLimit::TokensPerMinute => self.tokens,
            _ => self.spend,
        }
    }
}

/// Bits of [`KeyState::kinds`].
const RPM: u8 = 0;
const TPM: u8 = 1;
const HOUR_SPEND: u8 = 2;
const DAY_SPEND: u8 = 3;

/// The limits of `l` that have a window, in the order of [`KeyState::windows`], with
/// their bit and shape.
fn configured(l: &Limits) -> impl Iterator<Item = (u8, u64, (u64, usize))> {
    [
        (RPM, l.requests_per_minute, MINUTE),
        (TPM, l.tokens_per_minute, MINUTE),
        (HOUR_SPEND, l.spend_per_hour, HOUR),
        (DAY_SPEND, l.spend_per_day, DAY),
    ]
    .into_iter()
    .filter_map(|(bit, limit, shape)| limit.map(|limit| (bit, limit, shape)))
}

impl KeyState {
    fn new(l: &Limits, specs: &[Spec], key: Key, budget: &Weak<Budget>, secs: u64) -> Self {
        let mut kinds = 0;
        let windows = configured(l)
            .map(|(bit, _, _)| {
                kinds |= 1 << bit;
                Window::new()
            })
            .collect();
        let mut st = KeyState {
            windows,
            fast: Budget::keeps_fast(l).then(|| {
                Arc::new(KeyFast {
                    word: AtomicU64::new(0),
                    key,
                    budget: budget.clone(),
                })
            }),
            queue: Queue::default(),
            last_secs: secs,
            granted: 0,
            held: 0,
            kinds,
            // The fast path's admission decides it (see `FastConfig::in_flight_max`).
            split: l.max_concurrent.is_none(),
            blocked_on: BudgetLimit::RequestsPerMinute,
            leases: 0,
        };
        // A new key's windows start at its first second (no slot before it is counted).
        st.advance(specs, secs);
        st
    }

    fn windows<'a>(&'a mut self, specs: &'a [Spec]) -> [(Option<WindowMut<'a>>, BudgetLimit); 4] {
        let kinds = self.kinds;
        let mut it = self
            .windows
            .iter_mut()
            .zip(specs)
            .map(|(window, spec)| WindowMut { spec, window });
        let mut next = |bit: u8| {
            if kinds & (1 << bit) != 0 {
                it.next()
            } else {
                None
            }
        };
        [
            (next(RPM), BudgetLimit::RequestsPerMinute),
            (next(TPM), BudgetLimit::TokensPerMinute),
            (next(HOUR_SPEND), BudgetLimit::SpendPerHour),
            (next(DAY_SPEND), BudgetLimit::SpendPerDay),
        ]
    }

    /// The position of window `bit` in `windows`, if the budget has it.
    fn index(&self, bit: u8) -> Option<usize> {
        (self.kinds & (1 << bit) != 0)
            .then(|| (self.kinds & ((1 << bit) - 1)).count_ones() as usize)
    }

    fn window(&self, bit: u8) -> Option<&Window> {
        self.windows.get(self.index(bit)?)
    }

    fn window_mut<'a>(&'a mut self, specs: &'a [Spec], bit: u8) -> Option<WindowMut<'a>> {
        let i = self.index(bit)?;
        Some(WindowMut {
            spec: specs.get(i)?,
            window: self.windows.get_mut(i)?,
        })
    }

    /// Moves every window to `secs`.
    fn advance(&mut self, specs: &[Spec], secs: u64) {
        for (w, spec) in self.windows.iter_mut().zip(specs) {
            w.advance(spec, secs);
        }
    }

    fn permits_left(&self) -> u64 {
        self.fast.as_ref().map_or(0, |f| f.permits_left(self.split))
    }

    fn in_flight(&self) -> u32 {
        self.fast.as_ref().map_or(0, |f| f.in_flight(self.split))
    }

    /// Fast permits used since the last grant (not yet in the window).
    fn pending(&self) -> u64 {
        u64::from(self.granted).saturating_sub(self.permits_left())
    }

    /// Takes back the permits not used and counts the used ones in the window's current
    /// slot (call after [`advance`](Self::advance)). Afterwards the fast path has no permit
    /// until [`grant`](Self::grant).
    fn flush(&mut self, specs: &[Spec]) -> u64 {
        if self.granted == 0 {
            return 0;
        }
        let left = self.fast.as_ref().map_or(0, |f| f.take_permits(self.split));
        let used = u64::from(self.granted).saturating_sub(left);
        self.granted = 0;
        if let Some(mut w) = self.window_mut(specs, RPM) {
            w.add(used);
        }
        used
    }

    /// Grants the fast path a batch of permits if nobody waits and the minute window is
    /// far enough from its line (call after [`flush`](Self::flush), under the lock).
    fn grant(&mut self, fast: &FastConfig) {
        if !fast.enabled || !self.queue.is_empty() || self.granted != 0 {
            return;
        }
        let n = match self.window(RPM) {
            Some(w) => fast.batch.min(fast.rpm_line.saturating_sub(w.used())),
            None => fast.batch,
        };
        let n = n.min(PERMIT_MAX);
        if let (Some(f), true) = (&self.fast, n > 0) {
            self.granted = n as u32;
            f.give_permits(self.split, n);
        }
    }

    /// Sets the waiters flag to whether the queue holds anyone (only a concurrency limit
    /// reads it: in split mode the word is the permits alone).
    fn sync_waiters(&self) {
        let Some(fast) = self.fast.as_ref().filter(|_| !self.split) else {
            return;
        };
        let set = fast.word.load(Ordering::Acquire) & WAITERS != 0;
        if self.queue.is_empty() && set {
            fast.word.fetch_and(!WAITERS, Ordering::AcqRel);
        } else if !self.queue.is_empty() && !set {
            fast.word.fetch_or(WAITERS, Ordering::AcqRel);
        }
    }

    fn removable(&self) -> bool {
        self.held == 0 && self.in_flight() == 0 && self.queue.is_empty()
    }

    /// Whether every window is empty (after [`advance`](Self::advance) and
    /// [`flush`](Self::flush)).
    fn is_empty(&self) -> bool {
        self.windows.iter().all(|w| w.used() == 0)
    }

    /// Records a touch at `secs` (in `touched`, once per second at most).
    fn touch(&mut self, key: Key, secs: u64, touched: &mut VecDeque<(Key, u64)>) {
        if secs > self.last_secs {
            self.last_secs = secs;
            touched.push_back((key, secs));
        }
    }

    fn head_waker(&mut self) -> Option<Waker> {
        self.queue.front_mut().and_then(|t| t.waker.take())
    }

    /// Takes a lease back: its windows keep what it admitted, in the slot it was lent in.
    fn give_back(&mut self, specs: &[Spec], lease: &Lease) {
        self.leases = self.leases.saturating_sub(1);
        for (i, (w, spec)) in self.windows.iter_mut().zip(specs).enumerate() {
            WindowMut { spec, window: w }.correct(lease.secs, lease.granted[i], lease.used[i]);
        }
    }

    /// Takes what settled requests gave back off the slot they were admitted in.
    fn refund(&mut self, specs: &[Spec], r: &Refund) {
        for (i, (w, spec)) in self.windows.iter_mut().zip(specs).enumerate() {
            WindowMut { spec, window: w }.correct(r.secs, r.amounts[i], 0);
        }
    }
}

/// Takes every lease and refund of `key` back from every stripe (the key is near a line,
/// or going): its windows then hold exactly what was admitted.
fn reclaim(
    stripes: &[Arc<Stripe>],
    specs: &[Spec],
    pending_out: &PendingCount,
    key: Key,
    st: &mut KeyState,
) {
    let mut n = 0;
    for stripe in stripes {
        let mut s = stripe.lock();
        for l in s.leases.iter_mut() {
            if let Some(lease) = l.take_if(|l| l.key == key) {
                st.give_back(specs, &lease);
            }
        }
        for p in s.pending.iter_mut() {
            if let Some(r) = p.take_if(|r| r.key == key) {
                st.refund(specs, &r);
                n += 1;
            }
        }
    }
    if n > 0 {
        pending_out.0.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The cost of `limit` for a request of `cost`.
fn amount(limit: BudgetLimit, cost: &Cost) -> u64 {
    match limit {
        BudgetLimit::RequestsPerMinute => 1,
        BudgetLimit::TokensPerMinute => cost.tokens,
        _ => cost.spend,
    }
}

impl Budget {
    pub(crate) fn new(limits: Arc<Limits>) -> Arc<Self> {
        // The keys, and the overflow key.
        let limits_max_keys = limits.max_keys.saturating_add(1);
        let stripes = LeaseConfig::stripes();
        let lease = LeaseConfig::of(&limits, stripes);
        let pending_out = Arc::new(PendingCount::default());
        Arc::new_cyclic(|me| Budget {
            stripes: match lease {
                Some(cfg) => (0..stripes)
                    .map(|_| Arc::new(Stripe::new(me.clone(), cfg, pending_out.clone(), &limits)))
                    .collect(),
                None => Box::default(),
            },
            lease,
            pending_out,
            fast: FastConfig::of(&limits),
            horizon: horizon(&limits),
            specs: configured(&limits)
                .map(|(_, limit, (slot, n))| Spec::new(limit, slot, n))
                .collect(),
            limits,
            epoch: Instant::now(),
            me: me.clone(),
            keys: Mutex::new(Keys {
                table: Table::for_keys(limits_max_keys),
                ..Keys::default()
            }),
        })
    }

    /// Whether keys need a [`KeyFast`]: for the fast path's permits, or to count requests
    /// in flight.
    fn keeps_fast(l: &Limits) -> bool {
        FastConfig::of(l).enabled || l.max_concurrent.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Keys> {
        // Nothing under the lock can panic half-way through an update (saturating math,
        // no user code), so a poisoned lock still holds consistent state.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn instant(&self, secs: u64) -> Instant {
        self.epoch + Duration::from_secs(secs)
    }

    /// What a request costs. `Err(limit)`: a spend cap cannot price its model and the
    /// policy is to reject.
    pub(crate) fn cost_of(
        &self,
        meta: Option<&RequestMeta>,
        by: PriceBy<'_>,
    ) -> Result<Cost, BudgetLimit> {
        let l = &*self.limits;
        let Some(meta) = meta else {
            return Ok(Cost::default());
        };
        let output = meta.max_output_tokens.unwrap_or(l.default_output_tokens);
        let mut cost = Cost {
            tokens: meta.reserve_tokens(l.default_output_tokens),
            spend: 0,
            price: NanoPrice::default(),
        };
        if l.counts_spend() {
            let price = match by {
                PriceBy::Model => l.prices.of(meta.model()),
                PriceBy::Deployment(d) => l.prices.of_deployment(d),
            };
            match price {
                PriceOf::Known(p) => {
                    cost.price = p;
                    cost.spend = p.cost(meta.input_tokens_estimate, output);
                }
                PriceOf::Unknown => {
                    return Err(if l.spend_per_hour.is_some() {
                        BudgetLimit::SpendPerHour
                    } else {
                        BudgetLimit::SpendPerDay
                    })
                }
            }
        }
        Ok(cost)
    }

    /// The fast-path state of `key`, if the key is held (no clock read).
    pub(crate) fn fast_of(&self, key: Key) -> Option<Arc<KeyFast>> {
        self.lock().map.get(&key).and_then(|st| st.fast.clone())
    }

    /// Whether the budget lends leases (see `lease.rs`).
    #[inline]
    pub(crate) fn leases(&self) -> bool {
        self.lease.is_some()
    }

    /// Admits a request of `key` at `now` from the lease of the calling thread's stripe,
    /// if it holds one with room (no lock but the stripe's): the stripe and the
    /// reservation's slot in it. `stripe` is [`stripe_index`](crate::lease::stripe_index).
    #[inline]
    pub(crate) fn lease_admit(
        &self,
        key: Key,
        cost: &Cost,
        now: Instant,
        stripe: usize,
    ) -> Option<(&Arc<Stripe>, u32)> {
        let cfg = self.lease.as_ref()?;
        let stripe = self.stripes.get(stripe & cfg.mask)?;
        let slot = stripe.admit(key, self.secs(now), &cfg.amounts(cost), cost)?;
        Some((stripe, slot))
    }

    /// Lends stripe `i` a lease of `key` at second `secs` (after the locked path admitted a
    /// request taking `amounts`), if the key is far from every line; first gives back
    /// what the stripe holds of the key, its refunds, and (when it holds no room for
    /// another lease) its oldest lease.
    fn lend(
        &self,
        keys: &mut Keys,
        cfg: &LeaseConfig,
        key: Key,
        secs: u64,
        i: usize,
        amounts: &[u64; WINDOWS],
    ) {
        let Some(stripe) = self.stripes.get(i & cfg.mask) else {
            return;
        };
        let mut s = stripe.lock();
        let refunds = s.take_pending();
        let mut n = 0;
        for r in refunds.iter().flatten() {
            n += 1;
            if let Some(st) = keys.map.get_mut(&r.key) {
                st.refund(&self.specs, r);
            }
        }
        if n > 0 {
            self.pending_out.0.fetch_sub(n, Ordering::AcqRel);
        }
        let place = match s
            .leases
            .iter()
            .position(|l| l.is_some_and(|l| l.key == key))
        {
            Some(p) => p,
            None => match s.leases.iter().position(Option::is_none) {
                Some(p) => p,
                None => {
                    // The oldest goes back to its key.
                    s.leases
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, l)| l.map_or(0, |l| l.secs))
                        .map_or(0, |(p, _)| p)
                }
            },
        };
        if let Some(old) = s.leases[place].take() {
            if let Some(st) = keys.map.get_mut(&old.key) {
                st.give_back(&self.specs, &old);
            }
        }
        let Some(st) = keys.map.get_mut(&key) else {
            return;
        };
        if !cfg.chunk_holds(amounts)
            || !cfg.roomy(st.windows.iter().map(Window::used), &[0; WINDOWS])
        {
            return;
        }
        for (w, (spec, &c)) in st.windows.iter_mut().zip(self.specs.iter().zip(&cfg.chunk)) {
            WindowMut { spec, window: w }.add(c);
        }
        st.leases = st.leases.saturating_add(1);
        s.leases[place] = Some(Lease {
            key,
            secs,
            granted: cfg.chunk,
            used: [0; WINDOWS],
        });
    }

    /// Takes refunds off their keys' windows (a stripe's, when it held too many).
    pub(crate) fn apply_refunds<'a>(&self, refunds: impl Iterator<Item = &'a Refund>) {
        let mut keys = self.lock();
        let mut n = 0;
        for r in refunds {
            n += 1;
            if let Some(st) = keys.map.get_mut(&r.key) {
                st.refund(&self.specs, r);
            }
        }
        self.pending_out.0.fetch_sub(n, Ordering::AcqRel);
    }

    /// Replaces what a request reserved in the slot of second `secs` with what it used,
    /// window by window (a charge its lease could not take).
    pub(crate) fn correct(
        &self,
        key: Key,
        secs: u64,
        reserved: &[u64; WINDOWS],
        actual: &[u64; WINDOWS],
    ) {
        let mut keys = self.lock();
        if let Some(st) = keys.map.get_mut(&key) {
            for (i, (w, spec)) in st.windows.iter_mut().zip(self.specs.iter()).enumerate() {
                WindowMut { spec, window: w }.correct(secs, reserved[i], actual[i]);
            }
        }
    }

    /// Decides on a request on the locked path: see [`Decision`]. `ticket` is the
    /// caller's place in the queue once it has one; `waker` is woken when it may fit;
    /// `patience` says when a waiting caller gives up (`None` in reject mode); `cache`,
    /// if given, is pointed at the key's fast-path state.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_admit(
        &self,
        key: Key,
        cost: &Cost,
        now: Instant,
        ticket: Option<u64>,
        waker: Option<&Waker>,
        patience: Option<Patience>,
        cache: Option<&mut Cached>,
        stripe: Option<usize>,
    ) -> Decision {
        let secs = self.secs(now);
        let l = &*self.limits;
        let mut to_wake = None;
        let requested = key;
        let decision = {
            let mut keys = self.lock();
            let keys = &mut *keys;
            let (key_held, st) = entry(
                &mut keys.map,
                &mut keys.table,
                &mut keys.touched,
                &mut keys.overflowed,
                key,
                l,
                &self.specs,
                &self.me,
                (&self.stripes, &self.pending_out),
                secs,
                self.horizon,
            );
            let key = key_held;
            st.touch(key, secs, &mut keys.touched);
            st.advance(&self.specs, secs);
            st.flush(&self.specs);
            // Near a line, the key's leases and refunds come back first: decided exactly.
            if let Some(cfg) = &self.lease {
                if (st.leases > 0 || self.pending_out.0.load(Ordering::Acquire) > 0)
                    && !cfg.roomy(st.windows.iter().map(Window::used), &cfg.amounts(cost))
                {
                    reclaim(&self.stripes, &self.specs, &self.pending_out, key, st);
                }
            }
            if let Some(cache) = cache {
                match &st.fast {
                    // Sent to the overflow key: not cached, so the key gets its own state
                    // as soon as there is room.
                    _ if key_held != key => *cache = None,
                    Some(fast)
                        if !cache
                            .as_ref()
                            .is_some_and(|(k, f)| *k == key && Arc::ptr_eq(f, fast)) =>
                    {
                        *cache = Some((key, fast.clone()));
                    }
                    _ => {}
                }
            }
            let queued_before = st.queue.len();
            let room = st.queue.len() < l.max_waiters_per_key && keys.waiters < l.max_waiters;
            // A new request behind others is refused at once when its predicted start
            // is after it gives up.
            let late = patience.map(|p| p.give_up.saturating_duration_since(self.epoch));
            let decision = decide(
                st,
                l,
                &self.specs,
                cost,
                secs,
                ticket,
                waker,
                room,
                late,
                &mut keys.next_ticket,
                &mut to_wake,
            );
            let decision = match decision {
                Verdict::Admit(soft) => Decision::Admitted {
                    hold: match &st.fast {
                        _ if l.counts_tokens() => {
                            st.held += 1;
                            let slot = keys
                                .reserved
                                .reserve(key, Reserve::of(cost, secs, l.max_concurrent.is_some()));
                            Hold::Reserved(Reservation { key, slot })
                        }
                        Some(fast) if l.max_concurrent.is_some() => Hold::Permit(fast.clone()),
                        _ => Hold::Nothing,
                    },
                    soft,
                },
                Verdict::Never(limit) => Decision::Reject {
                    limit,
                    retry_after: None,
                },
                Verdict::Queued { ticket, limit } => Decision::Wait {
                    key,
                    ticket,
                    limit,
                    until: None,
                },
                Verdict::Full { limit } => Decision::Reject {
                    limit,
                    retry_after: Some(Duration::ZERO),
                },
                Verdict::Late { limit, at } => Decision::Reject {
                    limit,
                    retry_after: Some(patience.map_or(Duration::ZERO, |p| {
                        p.retry_after(Some(self.instant(at)), now)
                    })),
                },
                Verdict::Blocked { limit, at } => {
                    let until = at.map(|s| self.instant(s));
                    let retry_after = Some(until.map_or(Duration::ZERO, |u| u - now));
                    match (l.when_full, patience) {
                        (WhenFull::Reject, _) | (_, None) => {
                            Decision::Reject { limit, retry_after }
                        }
                        (WhenFull::Wait { .. }, Some(patience)) => {
                            let retry_after = Some(patience.retry_after(until, now));
                            if until.is_some_and(|u| u > patience.give_up) {
                                // It cannot fit before its deadline: no point waiting.
                                if let Some(id) = ticket {
                                    st.queue.retain(|t| t.id != id);
                                    to_wake = st.head_waker();
                                }
                                Decision::Reject { limit, retry_after }
                            } else if ticket.is_none() && !room {
                                // The queues are full: refused at once.
                                Decision::Reject { limit, retry_after }
                            } else {
                                let id = match ticket {
                                    Some(id) => {
                                        if let Some(t) = st.queue.front_mut() {
                                            t.waker = waker.cloned();
                                        }
                                        id
                                    }
                                    None => {
                                        keys.next_ticket += 1;
                                        st.queue.push_back(Ticket::new(
                                            keys.next_ticket,
                                            waker,
                                            cost,
                                        ));
                                        keys.next_ticket
                                    }
                                };
                                st.blocked_on = limit;
                                Decision::Wait {
                                    key,
                                    ticket: id,
                                    limit,
                                    until,
                                }
                            }
                        }
                    }
                }
            };
            st.sync_waiters();
            st.grant(&self.fast);
            keys.waiters = keys
                .waiters
                .saturating_add(st.queue.len())
                .saturating_sub(queued_before);
            if let (Some(cfg), Some(i), None, Decision::Admitted { .. }) =
                (&self.lease, stripe, ticket, &decision)
            {
                if key_held == requested && st.queue.is_empty() {
                    self.lend(keys, cfg, key, secs, i, &cfg.amounts(cost));
                }
            }
            decision
        };
        if let Some(w) = to_wake {
            w.wake();
        }
        decision
    }

    /// Gives up a place in the queue (a waiting future was dropped or timed out).
    pub(crate) fn cancel(&self, key: Key, ticket: u64) {
        let to_wake = {
            let mut keys = self.lock();
            let keys = &mut *keys;
            let Some(st) = keys.map.get_mut(&key) else {
                return;
            };
            let was_head = st.queue.front().is_some_and(|t| t.id == ticket);
            let before = st.queue.len();
            st.queue.retain(|t| t.id != ticket);
            keys.waiters = keys
                .waiters
                .saturating_add(st.queue.len())
                .saturating_sub(before);
            st.sync_waiters();
            // No clock here: the windows as of their last move hold at least what they
            // hold now, so a grant from them is on the safe side.
            st.grant(&self.fast);
            if was_head {
                st.head_waker()
            } else {
                None
            }
        };
        if let Some(w) = to_wake {
            w.wake();
        }
    }

    /// Wakes the head of `key`'s queue (a place in flight was given back).
    fn wake_head(&self, key: Key) {
        let to_wake = self.lock().map.get_mut(&key).and_then(|st| st.head_waker());
        if let Some(w) = to_wake {
            w.wake();
        }
    }

    /// Ends a reservation: corrects its tokens and money as `finish` says, releases its
    /// place in flight, and wakes the head of the queue.
    pub(crate) fn finish(&self, reservation: Reservation, finish: Finish) {
        #[cfg(feature = "metrics")]
        let settled;
        let to_wake = {
            let mut keys = self.lock();
            let keys = &mut *keys;
            let Some(st) = keys.map.get_mut(&reservation.key) else {
                return;
            };
            let Some(r) = keys.reserved.take(reservation.key, reservation.slot) else {
                return;
            };
            st.held = st.held.saturating_sub(1);
            let (tokens, spend) = r.settled(finish);
            for (w, limit) in st.windows(&self.specs) {
                match (w, limit) {
                    (None, _) | (_, BudgetLimit::RequestsPerMinute) => {}
                    (Some(mut w), BudgetLimit::TokensPerMinute) => {
                        w.correct(r.secs, r.tokens, tokens)
                    }
                    (Some(mut w), _) => w.correct(r.secs, r.spend, spend),
                }
            }
            if let (true, Some(fast)) = (r.concurrency, &st.fast) {
                fast.word.fetch_sub(1, Ordering::AcqRel);
            }
            #[cfg(feature = "metrics")]
            {
                settled = (r.tokens, tokens, spend);
            }
            st.head_waker()
        };
        #[cfg(feature = "metrics")]
        crate::meter::settled(settled.0, settled.1, settled.2);
        if let Some(w) = to_wake {
            w.wake();
        }
    }

    /// Tightens the minute windows of `key` so they never believe more remains than the
    /// provider's headers say.
    pub(crate) fn observe(&self, key: Key, info: &RateLimitInfo, now: Instant) {
        let secs = self.secs(now);
        let mut keys = self.lock();
        let keys = &mut *keys;
        let Some(st) = keys.map.get_mut(&key) else {
            return;
        };
        st.touch(key, secs, &mut keys.touched);
        st.advance(&self.specs, secs);
        st.flush(&self.specs);
        for (w, limit) in st.windows(&self.specs) {
            let remaining = match limit {
                BudgetLimit::RequestsPerMinute => info.requests.remaining,
                BudgetLimit::TokensPerMinute => info.tokens.remaining,
                _ => None,
            };
            if let (Some(mut w), Some(remaining)) = (w, remaining) {
                w.raise_to(w.limit().saturating_sub(remaining));
            }
        }
        st.grant(&self.fast);
    }

    /// The number of keys held.
    pub(crate) fn key_count(&self) -> usize {
        self.lock().map.len()
    }

    /// Counts and memory of all keys (walks every key under the lock).
    pub(crate) fn stats(&self) -> BudgetStats {
        use std::mem::size_of;
        let keys = self.lock();
        // hashbrown: one control byte per bucket besides the entry.
        let table = keys.map.capacity() * (size_of::<(Key, Box<KeyState>)>() + 1)
            + keys.map.len() * size_of::<KeyState>();
        // An `Arc<KeyFast>`: two counts, then the value at its alignment.
        let fast = size_of::<KeyFast>() + std::mem::align_of::<KeyFast>().max(16);
        let per_key: usize = keys
            .map
            .values()
            .map(|st| {
                let windows: usize = st
                    .windows
                    .iter()
                    .map(|w| size_of::<Window>() + w.heap_bytes())
                    .sum();
                windows
                    + st.fast.as_ref().map_or(0, |_| fast)
                    + st.queue
                        .0
                        .as_ref()
                        .map_or(0, |_| size_of::<VecDeque<Ticket>>())
                    + st.queue.capacity() * size_of::<Ticket>()
            })
            .sum();
        BudgetStats {
            keys: keys.map.len(),
            waiters: keys.waiters,
            overflowed: keys.overflowed,
            approx_bytes: table
                + per_key
                + keys.reserved.heap_bytes()
                + self
                    .stripes
                    .iter()
                    .map(|s| s.lock().reserved.heap_bytes())
                    .sum::<usize>()
                + keys.touched.capacity() * size_of::<(Key, u64)>(),
        }
    }

    /// What the budget holds for a key, or `None` if it is not held.
    pub(crate) fn key_state(&self, key: Key) -> Option<KeySnapshot> {
        let mut keys = self.lock();
        let st = keys.map.get_mut(&key)?;
        // The key's leases and refunds come back, so that its windows say what was
        // admitted; its reservations held in the stripes count as held.
        let mut held = st.held;
        if self.lease.is_some() {
            reclaim(&self.stripes, &self.specs, &self.pending_out, key, st);
            for stripe in self.stripes.iter() {
                let n = stripe.lock().reserved.of(key);
                held = held.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
        let in_flight = st.in_flight();
        Some(KeySnapshot {
            in_flight,
            // Without tokens or money, what a request holds is its place in flight.
            held: if self.fast.enabled { in_flight } else { held },
            waiting: st.queue.len(),
            requests: st
                .window(RPM)
                .map(|w| w.used().saturating_add(st.pending())),
            tokens: st.window(TPM).map(Window::used),
            spend_hour: st.window(HOUR_SPEND).map(Window::used),
            spend_day: st.window(DAY_SPEND).map(Window::used),
        })
    }
}

/// What a budget holds in all (see
/// [`TokenBudgetLayer::stats`](crate::TokenBudgetLayer::stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStats {
    /// Keys held (the overflow key included, when held).
    pub keys: usize,
    /// Requests waiting in all queues.
    pub waiters: usize,
    /// Requests sent to the overflow key since the layer was built, because the map was
    /// full of keys with something to lose.
    pub overflowed: u64,
    /// The heap and table memory the keys take, in bytes: the map's table (at its
    /// capacity), each key's windows, fast-path state, reservation table and queue, and
    /// the touch log that orders eviction. Counted from sizes and capacities (an
    /// allocator's own overhead per allocation is not included).
    pub approx_bytes: usize,
}

/// What a budget holds for one key (see
/// [`TokenBudgetLayer::snapshot`](crate::TokenBudgetLayer::snapshot)). Window totals are as
/// of the key's last update, plus the requests admitted since without the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// Requests in flight (counted only with a concurrency limit).
    pub in_flight: u32,
    /// Admitted requests whose reservation is not yet settled (without a token or money
    /// limit: the requests in flight).
    pub held: u32,
    /// Requests waiting in the key's queue.
    pub waiting: usize,
    /// Requests in the minute window, if limited.
    pub requests: Option<u64>,
    /// Tokens in the minute window, if limited.
    pub tokens: Option<u64>,
    /// Money in the hour window (nano-units of the currency), if capped.
    pub spend_hour: Option<u64>,
    /// Money in the day window (nano-units of the currency), if capped.
    pub spend_day: Option<u64>,
}

enum Verdict {
    Admit(Option<Soft>),
    Never(BudgetLimit),
    Queued {
        ticket: u64,
        limit: BudgetLimit,
    },
    /// It would queue, but the queues are full.
    Full {
        limit: BudgetLimit,
    },
    /// It would queue, but it would reach the head and fit only at second `at`, after it
    /// gives up.
    Late {
        limit: BudgetLimit,
        at: u64,
    },
    Blocked {
        limit: BudgetLimit,
        at: Option<u64>,
    },
}

/// Decides on a request; the key's windows are already at `secs` and flushed.
#[allow(clippy::too_many_arguments)]
fn decide(
    st: &mut KeyState,
    l: &Limits,
    specs: &[Spec],
    cost: &Cost,
    secs: u64,
    ticket: Option<u64>,
    waker: Option<&Waker>,
    room: bool,
    late: Option<Duration>,
    next_ticket: &mut u64,
    to_wake: &mut Option<Waker>,
) -> Verdict {
    // A request larger than a whole limit never fits: refuse it first, queue or not.
    let never = st.windows(specs).into_iter().find_map(|(w, limit)| {
        w.filter(|w| w.never_fits(amount(limit, cost)))
            .map(|_| limit)
    });
    if let Some(limit) = never {
        if let Some(id) = ticket {
            let was_head = st.queue.front().is_some_and(|t| t.id == id);
            st.queue.retain(|t| t.id != id);
            if was_head {
                *to_wake = st.head_waker();
            }
        }
        return Verdict::Never(limit);
    }
    // FIFO: only the head of the queue (or anyone, when nobody waits) may be admitted.
    let is_head = match ticket {
        Some(id) => st.queue.front().is_some_and(|t| t.id == id),
        None => st.queue.is_empty(),
    };
    if !is_head {
        let id = match ticket {
            Some(id) => {
                if let Some(t) = st.queue.iter_mut().find(|t| t.id == id) {
                    t.waker = waker.cloned();
                }
                id
            }
            None if !room => {
                return Verdict::Full {
                    limit: st.blocked_on,
                }
            }
            None => {
                if let Some(late) = late {
                    if let Some((limit, at)) = predicted_start(st, specs, cost, secs) {
                        // At its give-up time exactly is too late: the timer that ends
                        // its wait may fire before the one that admits those ahead of it.
                        if Duration::from_secs(at) >= late {
                            return Verdict::Late { limit, at };
                        }
                    }
                }
                *next_ticket += 1;
                st.queue.push_back(Ticket::new(*next_ticket, waker, cost));
                *next_ticket
            }
        };
        return Verdict::Queued {
            ticket: id,
            limit: st.blocked_on,
        };
    }
    let mut blocked: Option<(BudgetLimit, Option<u64>)> = None;
    for (w, limit) in st.windows(specs) {
        if let Some(w) = w {
            let c = amount(limit, cost);
            if !w.fits(c) {
                let at = w.fits_at(c, secs);
                if blocked.is_none_or(|(_, t)| at > t) {
                    blocked = Some((limit, at));
                }
            }
        }
    }
    let mut in_flight = None;
    if let (Some(max), None) = (l.max_concurrent, blocked) {
        // A concurrency limit always gives keys their fast state (`Budget::keeps_fast`).
        match st.fast.as_ref().and_then(|f| f.acquire_or_mark(max)) {
            Some(n) => in_flight = Some(n),
            None => blocked = Some((BudgetLimit::Concurrency, None)),
        }
    }
    if let Some((limit, at)) = blocked {
        return Verdict::Blocked { limit, at };
    }
    let mut soft = None;
    let threshold = l.soft_limit;
    for (w, limit) in st.windows(specs) {
        if let Some(mut w) = w {
            let before = w.used();
            w.add(amount(limit, cost));
            if let (Some(f), None) = (threshold, soft) {
                let line = (w.limit() as f64 * f).ceil() as u64;
                if before < line && w.used() >= line {
                    soft = Some(Soft {
                        limit,
                        used: w.used(),
                        max: w.limit(),
                    });
                }
            }
        }
    }
    if let (Some(max), Some(n)) = (l.max_concurrent, in_flight) {
        if soft.is_none()
            && threshold.is_some_and(|f| {
                let line = (f64::from(max) * f).ceil() as u32;
                n == line
            })
        {
            soft = Some(Soft {
                limit: BudgetLimit::Concurrency,
                used: u64::from(n),
                max: u64::from(max),
            });
        }
    }
    if ticket.is_some() {
        st.queue.pop_front();
        *to_wake = st.head_waker();
    }
    Verdict::Admit(soft)
}

/// When a new request would start behind the key's queue, as the windows tell it: the
/// latest of each window's [`Window::start_of`] for the queue's costs then its own, and
/// the window that decides it. `None` when no window is short (a concurrency limit alone
/// tells no time). Amortised over a call that queues: O(queue + slots) per window.
fn predicted_start(
    st: &KeyState,
    specs: &[Spec],
    cost: &Cost,
    secs: u64,
) -> Option<(BudgetLimit, u64)> {
    let queue = &st.queue;
    let kinds = st.kinds;
    let mut it = st.windows.iter().zip(specs);
    let mut latest: Option<(BudgetLimit, u64)> = None;
    for (bit, limit) in [
        (RPM, BudgetLimit::RequestsPerMinute),
        (TPM, BudgetLimit::TokensPerMinute),
        (HOUR_SPEND, BudgetLimit::SpendPerHour),
        (DAY_SPEND, BudgetLimit::SpendPerDay),
    ] {
        if kinds & (1 << bit) == 0 {
            continue;
        }
        let Some((w, spec)) = it.next() else { break };
        let amounts = queue
            .iter()
            .map(|t| t.amount(limit))
            .chain(std::iter::once(amount(limit, cost)));
        // `None`: it can never fit, which `decide` refuses before this.
        let at = w.start_of(spec, amounts, secs).unwrap_or(u64::MAX);
        if at > secs && latest.is_none_or(|(_, t)| at > t) {
            latest = Some((limit, at));
        }
    }
    latest
}

/// The key's state, created when missing, and the key it is held under: `key`, or the
/// overflow key when the map is full and no key in it can be forgotten without loss.
#[allow(clippy::too_many_arguments)]
fn entry<'a>(
    map: &'a mut KeyMap<Box<KeyState>>,
    table: &mut Table,
    touched: &mut VecDeque<(Key, u64)>,
    overflowed: &mut u64,
    key: Key,
    l: &Limits,
    specs: &[Spec],
    budget: &Weak<Budget>,
    (stripes, pending_out): (&[Arc<Stripe>], &PendingCount),
    secs: u64,
    horizon: u64,
) -> (Key, &'a mut KeyState) {
    let mut key = key;
    // Keep memory to the keys that hold something: a few expired keys go with every
    // locked call (one look at the front when none has expired).
    evict_expired(map, touched, stripes, pending_out, specs, secs, horizon, 4);
    if map.len() >= l.max_keys && !map.contains_key(&key) {
        evict_expired(
            map,
            touched,
            stripes,
            pending_out,
            specs,
            secs,
            horizon,
            usize::MAX,
        );
        let overflow = overflow_key();
        if map.len() >= l.max_keys && key != overflow {
            key = overflow;
            *overflowed += 1;
            // Logged at the 1st, 2nd, 4th, 8th… overflow: a flood of new keys cannot
            // flood the log.
            if overflowed.is_power_of_two() {
                tracing::warn!(
                    budget.keys = map.len(),
                    budget.overflowed = *overflowed,
                    "token budget full of keys with something to lose: new keys share the overflow key"
                );
            }
        }
    }
    // Compact the touch log when stale entries outnumber the keys (amortised O(1)).
    if touched.len() > 2 * map.len() + 64 {
        let map = &*map;
        touched.retain(|(k, s)| map.get(k).is_some_and(|st| st.last_secs == *s));
    }
    table.keep(map);
    let st = map.entry(key).or_insert_with(|| {
        touched.push_back((key, secs));
        Box::new(KeyState::new(l, specs, key, budget, secs))
    });
    (key, st)
}

/// The table a map of at most `keys` keys needs, and what keeps it there.
///
/// A map at its bound that forgets a key for each new one fills its table with deleted
/// slots, and a std `HashMap` more than half full then doubles its table rather than
/// rehash it in place: twice the bytes per key, for nothing. [`Table::keep`] rehashes it
/// back into the size its bound needs instead. The bound has an eighth of room on top,
/// so that a rehash clears at least that many slots (a map whose bound is just its
/// table's capacity would otherwise rehash on nearly every new key).
#[derive(Debug, Default, Clone, Copy)]
struct Table {
    /// Keys the table is sized for.
    keys: usize,
    /// A capacity this large is a table grown past what `keys` need: a table grows by
    /// doubling at least, and the one sized for `keys` holds fewer than twice as many
    /// (std's holds 7/8 of its power-of-two buckets). Raised past the sized table's
    /// capacity after a rehash, should that ever be larger.
    grown: usize,
}

impl Table {
    fn for_keys(keys: usize) -> Table {
        let keys = keys.saturating_add(keys / 8);
        Table {
            keys,
            grown: keys.saturating_mul(2).max(8),
        }
    }

    /// Makes room for one more key in `map` without a table larger than its bound
    /// needs. The room is what `entry` reserves anyway: a table with room is left alone
    /// (two loads and a comparison).
    #[inline]
    fn keep<V>(&mut self, map: &mut KeyMap<V>) {
        map.reserve(1);
        if map.capacity() >= self.grown {
            map.shrink_to(self.keys);
            self.grown = self.grown.max(map.capacity().saturating_add(1));
        }
    }
}

/// Forgets keys with nothing to lose, oldest touch first, looking at no more than `steps`
/// entries of the touch log: a key is forgotten only when nothing is in flight, waiting
/// or reserved, and every window has emptied (it was last touched more than a window's
/// length ago), so its state is the same as a new key's. A key whose windows have passed
/// but that is still busy (a long stream in flight, fast permits used since its last
/// update) is touched again and looked at a window later. Each entry is looked at once
/// per window length, so eviction costs amortised O(1) per call, whatever the map holds.
#[allow(clippy::too_many_arguments)]
fn evict_expired(
    map: &mut KeyMap<Box<KeyState>>,
    touched: &mut VecDeque<(Key, u64)>,
    stripes: &[Arc<Stripe>],
    pending_out: &PendingCount,
    specs: &[Spec],
    secs: u64,
    horizon: u64,
    steps: usize,
) {
    let mut evicted = 0usize;
    for _ in 0..steps {
        let Some(&(k, s)) = touched.front() else {
            break;
        };
        if secs < s.saturating_add(horizon) {
            // Every entry behind it was touched later.
            break;
        }
        touched.pop_front();
        let Some(st) = map.get_mut(&k) else {
            continue;
        };
        if st.last_secs != s {
            continue; // stale: the key was touched again later
        }
        st.advance(specs, secs);
        // Fast permits used since the last update count now: the key stays.
        let used = st.flush(specs);
        if st.leases > 0 && used == 0 && st.removable() {
            // Its leases were lent a window ago or more: given back, they change no slot
            // still in its windows.
            reclaim(stripes, specs, pending_out, k, st);
        }
        if used == 0 && st.removable() && st.is_empty() {
            map.remove(&k);
            evicted += 1;
        } else {
            st.touch(k, secs, touched);
        }
    }
    if evicted > 0 {
        tracing::trace!(
            budget.keys = map.len(),
            budget.evicted = evicted,
            "token budget forgot keys whose windows have passed"
        );
    }
}

/// Seconds after which every window of a key last touched at `t` has emptied.
fn horizon(l: &Limits) -> u64 {
    let len = |(slot, n): (u64, usize)| slot * (n as u64 + 1);
    let mut h = 0;
    if l.requests_per_minute.is_some() || l.tokens_per_minute.is_some() {
        h = len(MINUTE);
    }
    if l.spend_per_hour.is_some() {
        h = h.max(len(HOUR));
    }
    if l.spend_per_day.is_some() {
        h = h.max(len(DAY));
    }
    // A budget of concurrency alone has no window: a key may go once idle.
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenBudgetLayer;

    fn budget(
        f: impl FnOnce(crate::TokenBudgetBuilder) -> crate::TokenBudgetBuilder,
    ) -> Arc<Budget> {
        let layer = f(TokenBudgetLayer::builder()).build().unwrap();
        Budget::new(layer.budget().limits.clone())
    }

    fn tokens(n: u64) -> Cost {
        Cost {
            tokens: n,
            ..Cost::default()
        }
    }

    fn admit(b: &Budget, k: Key, cost: &Cost, now: Instant) -> Decision {
        b.try_admit(k, cost, now, None, None, None, None, None)
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_then_reconcile() {
        let b = budget(|b| b.tokens_per_minute(1000).reject());
        let k = Key::of("k");
        let now = Instant::now();
        let Decision::Admitted {
            hold: Hold::Reserved(r),
            ..
        } = admit(&b, k, &tokens(800), now)
        else {
            panic!("should fit")
        };
        assert!(matches!(
            admit(&b, k, &tokens(300), now),
            Decision::Reject {
                limit: BudgetLimit::TokensPerMinute,
                retry_after: Some(_)
            }
        ));
        b.finish(
            r,
            Finish::Used(Usage {
                input_tokens: 100,
                output_tokens: 50,
            }),
        );
        let s = b.key_state(k).expect("the key is held");
        assert_eq!(
            (s.in_flight, s.held, s.waiting, s.tokens),
            (0, 0, 0, Some(150))
        );
        assert!(matches!(
            admit(&b, k, &tokens(850), now),
            Decision::Admitted { .. }
        ));
        assert!(matches!(
            admit(&b, k, &tokens(1001), now),
            Decision::Reject {
                retry_after: None,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_keeps_memory_bounded_and_spares_busy_keys() {
        let b = budget(|b| {
            b.requests_per_minute(10)
                .max_concurrent(5)
                .max_keys(100)
                .reject()
        });
        let now = Instant::now();
        let busy = Key::of("busy");
        let Decision::Admitted {
            hold: Hold::Permit(held),
            ..
        } = admit(&b, busy, &Cost::default(), now)
        else {
            panic!()
        };
        for i in 0..10_000u32 {
            if let Decision::Admitted {
                hold: Hold::Permit(p),
                ..
            } = admit(&b, Key::of(&i), &Cost::default(), now)
            {
                p.release();
            }
            // Every key's window holds its request: none can be forgotten, so the keys
            // past 100 share the overflow key.
            assert!(b.key_count() <= 101);
        }
        assert_eq!(b.stats().overflowed, 10_000 - 99);
        assert_eq!(
            b.key_state(busy).map(|s| s.in_flight),
            Some(1),
            "busy key kept"
        );
        held.release();
    }

    #[tokio::test(start_paused = true)]
    async fn fast_batches_are_counted_and_never_outlive_their_key() {
        // 64 RPM: batches of 2, granted up to the soft line (ceil(0.5 × 64) - 1 = 31).
        let b = budget(|b| {
            b.requests_per_minute(64)
                .max_concurrent(3)
                .soft_limit(0.5)
                .max_keys(1)
                .reject()
        });
        let k = Key::of("k");
        let mut cache: Cached = None;
        let now = Instant::now();
        let Decision::Admitted {
            hold: Hold::Permit(first),
            ..
        } = b.try_admit(
            k,
            &Cost::default(),
            now,
            None,
            None,
            None,
            Some(&mut cache),
            None,
        )
        else {
            panic!()
        };
        let fast = cache.as_ref().map(|(_, f)| f.clone()).expect("cached");
        assert!(Arc::ptr_eq(&fast, &first));
        let max = b.fast.in_flight_max;
        assert_eq!(
            max,
            Some(1),
            "the soft line of 3 in flight is 2: fast up to 1"
        );
        assert!(
            !fast.try_acquire(max),
            "one in flight already: the locked path decides"
        );
        first.release();
        assert!(fast.try_acquire(max));
        fast.release();
        assert!(fast.try_acquire(max));
        fast.release();
        assert!(!fast.try_acquire(max), "a batch is 64 / 32 = 2 permits");
        let s = b.key_state(k).unwrap();
        assert_eq!(
            (s.requests, s.in_flight, s.held),
            (Some(3), 0, 0),
            "pending permits count"
        );
        // Fast permits used since the key's last update count when it is next looked at
        // (their time is not known): a day later the key stays one window more, and
        // another key shares the overflow key (max_keys 1).
        let later = now + Duration::from_secs(25 * 3600);
        let Decision::Admitted {
            hold: Hold::Permit(other),
            ..
        } = admit(&b, Key::of("other"), &Cost::default(), later)
        else {
            panic!()
        };
        other.release();
        assert_eq!(b.key_state(k).and_then(|s| s.requests), Some(2));
        assert_eq!(b.stats().overflowed, 1);
        // A window later it is forgotten: its cached state admits no more.
        let later = later + Duration::from_secs(61);
        assert!(matches!(
            admit(&b, Key::of("third"), &Cost::default(), later),
            Decision::Admitted { .. }
        ));
        assert!(b.key_state(k).is_none());
        assert!(b.key_state(Key::of("third")).is_some());
        assert!(!fast.try_acquire(max));
        assert_eq!(fast.permits_left(false), 0);
    }

    /// A token budget far from its limit, its lease chunk, and a request of `COST`.
    fn leasing() -> (Arc<Budget>, u64) {
        let b = budget(|b| b.tokens_per_minute(1 << 20).reject());
        let chunk = b.lease.expect("a token budget lends leases").chunk[0];
        assert!(chunk >= COST, "chunk {chunk}");
        (b, chunk)
    }

    const COST: u64 = 100;

    fn admit_on(b: &Budget, k: Key, cost: &Cost, now: Instant, stripe: usize) -> Decision {
        b.try_admit(k, cost, now, None, None, None, None, Some(stripe))
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_admits_its_stripe_for_its_second() {
        let (b, chunk) = leasing();
        let k = Key::of("k");
        let now = Instant::now();
        assert!(
            b.lease_admit(k, &tokens(COST), now, 0).is_none(),
            "no lease yet"
        );
        assert!(matches!(
            admit_on(&b, k, &tokens(COST), now, 0),
            Decision::Admitted { .. }
        ));
        // The lease: chunk / COST requests, on stripe 0 only, in this second only.
        let mut slots = Vec::new();
        while let Some((stripe, slot)) = b.lease_admit(k, &tokens(COST), now, 0) {
            slots.push((stripe.clone(), slot));
        }
        assert_eq!(slots.len() as u64, chunk / COST);
        assert!(
            b.lease_admit(k, &tokens(COST), now, 1).is_none(),
            "another stripe"
        );
        assert!(b
            .lease_admit(Key::of("other"), &tokens(COST), now, 0)
            .is_none());
        // Settled in the same second: the refunds go back into the lease, which admits
        // again.
        for (stripe, slot) in slots.drain(..) {
            stripe.finish(slot, Finish::Refund);
        }
        assert!(b.lease_admit(k, &tokens(COST), now, 0).is_some());
        let later = now + Duration::from_secs(1);
        assert!(
            b.lease_admit(k, &tokens(COST), later, 0).is_none(),
            "a second later"
        );
        let s = b.key_state(k).unwrap();
        assert_eq!(
            (s.tokens, s.held),
            (Some(2 * COST), 2),
            "exact once taken back (the first, through the lock, not settled here)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn near_the_limit_leases_and_refunds_come_back_before_deciding() {
        let (b, chunk) = leasing();
        let limit = 1 << 20;
        let k = Key::of("k");
        let now = Instant::now();
        // Stripe 0 holds a lease; one request admitted from it, settled a second later
        // with a refund of all of it (kept in the stripe: its lease is over).
        admit_on(&b, k, &tokens(COST), now, 0);
        let (stripe, slot) = b.lease_admit(k, &tokens(COST), now, 0).unwrap();
        let stripe = stripe.clone();
        let later = now + Duration::from_secs(1);
        admit_on(&b, k, &tokens(COST), later, 1);
        stripe.finish(slot, Finish::Refund);
        // Counted now: two requests, stripe 0's chunk (lent at 0), stripe 1's (at 1), and
        // the refund not yet taken off. A request of all that truly remains fits.
        let rest = limit - 2 * COST;
        assert!(rest + 2 * COST + 2 * chunk > limit);
        let Decision::Admitted {
            hold: Hold::Reserved(_),
            soft: None,
        } = admit_on(&b, k, &tokens(rest), later, 2)
        else {
            panic!("refused with room")
        };
        assert!(
            b.lease_admit(k, &tokens(1), later, 1).is_none(),
            "leases taken back"
        );
        assert!(matches!(
            admit_on(&b, k, &tokens(1), later, 1),
            Decision::Reject {
                limit: BudgetLimit::TokensPerMinute,
                retry_after: Some(_)
            }
        ));
        assert_eq!(b.key_state(k).unwrap().tokens, Some(limit));
    }

    #[tokio::test(start_paused = true)]
    async fn no_lease_near_a_line_nor_for_a_request_larger_than_a_chunk() {
        let (b, chunk) = leasing();
        let now = Instant::now();
        let big = Key::of("big");
        admit_on(&b, big, &tokens(chunk + 1), now, 0);
        assert!(
            b.lease_admit(big, &tokens(1), now, 0).is_none(),
            "chunk too small"
        );
        let full = Key::of("full");
        admit_on(&b, full, &tokens((1 << 20) - 4 * chunk), now, 0);
        admit_on(&b, full, &tokens(1), now, 0);
        assert!(
            b.lease_admit(full, &tokens(1), now, 0).is_none(),
            "near the limit"
        );
        // With a concurrency limit every request is counted in flight: no leases.
        let b = budget(|b| b.tokens_per_minute(1 << 20).max_concurrent(100).reject());
        assert!(b.lease.is_none());
    }
}
