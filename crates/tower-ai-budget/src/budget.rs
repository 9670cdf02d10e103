//! The budget's state: per-key windows, in-flight counts and FIFO wait queues, behind one
//! short-held lock.
//!
//! Every operation takes the lock once, for a few dozen instructions: look the key up,
//! move its windows to now, compare, add. No lock is held across an `.await`, no waker is
//! woken under the lock, and nothing on the admit path allocates once a key exists.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;
use tower_ai_core::keys::{Key, KeyMap};
use tower_ai_core::{BudgetLimit, RateLimitInfo, RequestMeta, Usage};

use crate::config::{Limits, NanoPrice, PriceOf, WhenFull};
use crate::window::Window;

/// Seconds per slot and slots per window (see `window.rs` for the accuracy this gives).
const MINUTE: (u64, usize) = (1, 60);
const HOUR: (u64, usize) = (60, 60);
const DAY: (u64, usize) = (900, 96);
/// A key whose windows have all emptied is idle after this long: the longest window plus
/// its extra slot.
const IDLE_SECS: u64 = 24 * 3600 + 900;

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

/// What an admitted request holds until it finishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    pub(crate) key: Key,
    secs: u64,
    tokens: u64,
    spend: u64,
    price: NanoPrice,
    concurrency: bool,
}

/// How a request ended, for its reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// No usage is known (stream cut, body dropped, future dropped in flight): keep the
    /// whole reservation.
    Keep,
    /// The provider said what it used: replace the reservation with it.
    Used(Usage),
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

/// The verdict on a request.
#[derive(Debug)]
pub(crate) enum Decision {
    /// It fits and is counted. `None`: nothing to give back later.
    Admitted {
        reservation: Option<Reservation>,
        soft: Option<Soft>,
    },
    /// It waits, with ticket `ticket`, for `limit`; it may fit at `until` (`None`: when
    /// something is released, or when it reaches the head of the queue).
    Wait {
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
    pub(crate) limits: std::sync::Arc<Limits>,
    epoch: Instant,
    keys: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    map: KeyMap<KeyState>,
    next_ticket: u64,
}

#[derive(Debug)]
struct KeyState {
    rpm: Option<Window>,
    tpm: Option<Window>,
    hour: Option<Window>,
    day: Option<Window>,
    in_flight: u32,
    /// Reservations not yet finished: a key holding any is never evicted.
    held: u32,
    queue: VecDeque<Ticket>,
    blocked_on: BudgetLimit,
    last_secs: u64,
}

#[derive(Debug)]
struct Ticket {
    id: u64,
    waker: Option<Waker>,
}

impl KeyState {
    fn new(l: &Limits, secs: u64) -> Self {
        let w = |limit: Option<u64>, (slot, n): (u64, usize)| {
            limit.map(|limit| {
                let mut w = Window::new(limit, slot, n);
                w.advance(secs);
                w
            })
        };
        KeyState {
            rpm: w(l.requests_per_minute, MINUTE),
            tpm: w(l.tokens_per_minute, MINUTE),
            hour: w(l.spend_per_hour, HOUR),
            day: w(l.spend_per_day, DAY),
            in_flight: 0,
            held: 0,
            queue: VecDeque::new(),
            blocked_on: BudgetLimit::RequestsPerMinute,
            last_secs: secs,
        }
    }

    fn windows(&mut self) -> [(Option<&mut Window>, BudgetLimit); 4] {
        [
            (self.rpm.as_mut(), BudgetLimit::RequestsPerMinute),
            (self.tpm.as_mut(), BudgetLimit::TokensPerMinute),
            (self.hour.as_mut(), BudgetLimit::SpendPerHour),
            (self.day.as_mut(), BudgetLimit::SpendPerDay),
        ]
    }

    fn removable(&self) -> bool {
        self.held == 0 && self.in_flight == 0 && self.queue.is_empty()
    }

    fn head_waker(&mut self) -> Option<Waker> {
        self.queue.front_mut().and_then(|t| t.waker.take())
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
    pub(crate) fn new(limits: std::sync::Arc<Limits>) -> Self {
        Budget {
            limits,
            epoch: Instant::now(),
            keys: Mutex::new(Keys::default()),
        }
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
    pub(crate) fn cost_of(&self, meta: Option<&RequestMeta>) -> Result<Cost, BudgetLimit> {
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
            match l.prices.of(meta.model()) {
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

    /// Decides on a request: see [`Decision`]. `ticket` is the caller's place in the
    /// queue once it has one; `waker` is woken when it may fit; `deadline` is when a
    /// waiting caller gives up (`None` in reject mode).
    pub(crate) fn try_admit(
        &self,
        key: Key,
        cost: &Cost,
        now: Instant,
        ticket: Option<u64>,
        waker: Option<&Waker>,
        deadline: Option<Instant>,
    ) -> Decision {
        let secs = self.secs(now);
        let l = &*self.limits;
        let mut to_wake = None;
        let decision = {
            let mut keys = self.lock();
            let keys = &mut *keys;
            let st = entry(&mut keys.map, key, l, secs);
            st.last_secs = secs;
            let decision = decide(
                st,
                l,
                cost,
                secs,
                ticket,
                waker,
                &mut keys.next_ticket,
                &mut to_wake,
            );
            match decision {
                Verdict::Admit(soft) => Decision::Admitted {
                    reservation: l.needs_release().then_some(Reservation {
                        key,
                        secs,
                        tokens: cost.tokens,
                        spend: cost.spend,
                        price: cost.price,
                        concurrency: l.max_concurrent.is_some(),
                    }),
                    soft,
                },
                Verdict::Never(limit) => Decision::Reject {
                    limit,
                    retry_after: None,
                },
                Verdict::Queued { ticket, limit } => Decision::Wait {
                    ticket,
                    limit,
                    until: None,
                },
                Verdict::Blocked { limit, at } => {
                    let until = at.map(|s| self.instant(s));
                    let retry_after = Some(until.map_or(Duration::ZERO, |u| u - now));
                    match (l.when_full, deadline) {
                        (WhenFull::Reject, _) | (_, None) => {
                            Decision::Reject { limit, retry_after }
                        }
                        (WhenFull::Wait { .. }, Some(deadline)) => {
                            if until.is_some_and(|u| u > deadline) {
                                // It cannot fit before its deadline: no point waiting.
                                if let Some(id) = ticket {
                                    st.queue.retain(|t| t.id != id);
                                    to_wake = st.head_waker();
                                }
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
                                        st.queue.push_back(Ticket {
                                            id: keys.next_ticket,
                                            waker: waker.cloned(),
                                        });
                                        keys.next_ticket
                                    }
                                };
                                st.blocked_on = limit;
                                Decision::Wait {
                                    ticket: id,
                                    limit,
                                    until,
                                }
                            }
                        }
                    }
                }
            }
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
            let Some(st) = keys.map.get_mut(&key) else {
                return;
            };
            let was_head = st.queue.front().is_some_and(|t| t.id == ticket);
            st.queue.retain(|t| t.id != ticket);
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

    /// Ends a reservation: corrects its tokens and money as `finish` says, releases its
    /// concurrency permit, and wakes the head of the queue.
    pub(crate) fn finish(&self, r: &Reservation, finish: Finish) {
        let to_wake = {
            let mut keys = self.lock();
            let Some(st) = keys.map.get_mut(&r.key) else {
                return;
            };
            let (tokens, spend) = match finish {
                Finish::Keep => (r.tokens, r.spend),
                Finish::Refund => (0, 0),
                Finish::Used(u) => (u.total(), r.price.cost(u.input_tokens, u.output_tokens)),
            };
            if let Some(w) = st.tpm.as_mut() {
                w.correct(r.secs, r.tokens, tokens);
            }
            for w in [st.hour.as_mut(), st.day.as_mut()].into_iter().flatten() {
                w.correct(r.secs, r.spend, spend);
            }
            if r.concurrency {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            st.held = st.held.saturating_sub(1);
            st.head_waker()
        };
        if let Some(w) = to_wake {
            w.wake();
        }
    }

    /// Tightens the minute windows of `key` so they never believe more remains than the
    /// provider's headers say.
    pub(crate) fn observe(&self, key: Key, info: &RateLimitInfo, now: Instant) {
        let secs = self.secs(now);
        let mut keys = self.lock();
        let Some(st) = keys.map.get_mut(&key) else {
            return;
        };
        for (w, remaining) in [
            (st.rpm.as_mut(), info.requests.remaining),
            (st.tpm.as_mut(), info.tokens.remaining),
        ] {
            if let (Some(w), Some(remaining)) = (w, remaining) {
                w.advance(secs);
                w.raise_to(w.limit().saturating_sub(remaining));
            }
        }
    }

    /// The number of keys held.
    pub(crate) fn key_count(&self) -> usize {
        self.lock().map.len()
    }

    /// What the budget holds for a key, or `None` if it is not held.
    pub(crate) fn key_state(&self, key: Key) -> Option<KeySnapshot> {
        let keys = self.lock();
        let st = keys.map.get(&key)?;
        Some(KeySnapshot {
            in_flight: st.in_flight,
            held: st.held,
            waiting: st.queue.len(),
            requests: st.rpm.as_ref().map(Window::used),
            tokens: st.tpm.as_ref().map(Window::used),
            spend_hour: st.hour.as_ref().map(Window::used),
            spend_day: st.day.as_ref().map(Window::used),
        })
    }
}

/// What a budget holds for one key (see
/// [`TokenBudgetLayer::snapshot`](crate::TokenBudgetLayer::snapshot)). Window totals are as
/// of the key's last update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// Requests in flight (counted only with a concurrency limit).
    pub in_flight: u32,
    /// Admitted requests whose reservation is not yet settled.
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
    Queued { ticket: u64, limit: BudgetLimit },
    Blocked { limit: BudgetLimit, at: Option<u64> },
}

#[allow(clippy::too_many_arguments)]
fn decide(
    st: &mut KeyState,
    l: &Limits,
    cost: &Cost,
    secs: u64,
    ticket: Option<u64>,
    waker: Option<&Waker>,
    next_ticket: &mut u64,
    to_wake: &mut Option<Waker>,
) -> Verdict {
    // A request larger than a whole limit never fits: refuse it first, queue or not.
    let never = st.windows().into_iter().find_map(|(w, limit)| {
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
            None => {
                *next_ticket += 1;
                st.queue.push_back(Ticket {
                    id: *next_ticket,
                    waker: waker.cloned(),
                });
                *next_ticket
            }
        };
        return Verdict::Queued {
            ticket: id,
            limit: st.blocked_on,
        };
    }
    let mut blocked: Option<(BudgetLimit, Option<u64>)> = None;
    for (w, limit) in st.windows() {
        if let Some(w) = w {
            w.advance(secs);
            let c = amount(limit, cost);
            if !w.fits(c) {
                let at = w.fits_at(c, secs);
                if blocked.is_none_or(|(_, t)| at > t) {
                    blocked = Some((limit, at));
                }
            }
        }
    }
    if let Some(max) = l.max_concurrent {
        if st.in_flight >= max && blocked.is_none() {
            blocked = Some((BudgetLimit::Concurrency, None));
        }
    }
    if let Some((limit, at)) = blocked {
        return Verdict::Blocked { limit, at };
    }
    let mut soft = None;
    let threshold = l.soft_limit;
    for (w, limit) in st.windows() {
        if let Some(w) = w {
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
    if let Some(max) = l.max_concurrent {
        st.in_flight += 1;
        if soft.is_none()
            && threshold.is_some_and(|f| {
                let line = (f64::from(max) * f).ceil() as u32;
                st.in_flight == line
            })
        {
            soft = Some(Soft {
                limit: BudgetLimit::Concurrency,
                used: u64::from(st.in_flight),
                max: u64::from(max),
            });
        }
    }
    if l.needs_release() {
        st.held += 1;
    }
    if ticket.is_some() {
        st.queue.pop_front();
        *to_wake = st.head_waker();
    }
    Verdict::Admit(soft)
}

/// The key's state, created (evicting idle keys if the map is full) when missing.
fn entry<'a>(map: &'a mut KeyMap<KeyState>, key: Key, l: &Limits, secs: u64) -> &'a mut KeyState {
    if map.len() >= l.max_keys && !map.contains_key(&key) {
        evict(map, l.max_keys, secs);
    }
    map.entry(key).or_insert_with(|| KeyState::new(l, secs))
}

/// Makes room: first every key that holds nothing and whose windows have all emptied
/// (lossless), then, if that is not enough, the least recently used keys that hold nothing,
/// down to 90 % of `max_keys` (their window history is forgotten). Keys with requests in
/// flight or waiting are never evicted, so memory stays bounded by `max_keys` plus the
/// requests in flight.
fn evict(map: &mut KeyMap<KeyState>, max_keys: usize, secs: u64) {
    map.retain(|_, st| !(st.removable() && secs.saturating_sub(st.last_secs) > IDLE_SECS));
    if map.len() < max_keys {
        return;
    }
    let target = max_keys - max_keys / 10 - 1;
    let mut idle: Vec<(u64, Key)> = map
        .iter()
        .filter(|(_, st)| st.removable())
        .map(|(k, st)| (st.last_secs, *k))
        .collect();
    idle.sort_unstable();
    let excess = map.len().saturating_sub(target);
    for (_, k) in idle.into_iter().take(excess) {
        map.remove(&k);
    }
    tracing::debug!(
        keys = map.len(),
        "token budget evicted least recently used keys"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenBudgetLayer;

    fn budget(f: impl FnOnce(crate::TokenBudgetBuilder) -> crate::TokenBudgetBuilder) -> Budget {
        let layer = f(TokenBudgetLayer::builder()).build().unwrap();
        Budget::new(layer.budget().limits.clone())
    }

    fn tokens(n: u64) -> Cost {
        Cost {
            tokens: n,
            ..Cost::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_then_reconcile() {
        let b = budget(|b| b.tokens_per_minute(1000).reject());
        let k = Key::of("k");
        let now = Instant::now();
        let Decision::Admitted {
            reservation: Some(r),
            ..
        } = b.try_admit(k, &tokens(800), now, None, None, None)
        else {
            panic!("should fit")
        };
        assert!(matches!(
            b.try_admit(k, &tokens(300), now, None, None, None),
            Decision::Reject {
                limit: BudgetLimit::TokensPerMinute,
                retry_after: Some(_)
            }
        ));
        b.finish(
            &r,
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
            b.try_admit(k, &tokens(850), now, None, None, None),
            Decision::Admitted { .. }
        ));
        assert!(matches!(
            b.try_admit(k, &tokens(1001), now, None, None, None),
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
            reservation: Some(held),
            ..
        } = b.try_admit(busy, &Cost::default(), now, None, None, None)
        else {
            panic!()
        };
        for i in 0..10_000u32 {
            let d = b.try_admit(Key::of(&i), &Cost::default(), now, None, None, None);
            if let Decision::Admitted {
                reservation: Some(r),
                ..
            } = d
            {
                b.finish(&r, Finish::Keep);
            }
            assert!(b.key_count() <= 100);
        }
        assert_eq!(
            b.key_state(busy).map(|s| s.in_flight),
            Some(1),
            "busy key kept"
        );
        b.finish(&held, Finish::Keep);
    }
}
