//! One key's breaker: the closed/open/half-open state machine, without Tower.
//!
//! The state is one atomic word, `generation << 3 | state`. A call admitted in the closed
//! state remembers the word; its outcome is recorded only if the word is unchanged when it
//! completes, so a slow call admitted before the breaker opened cannot count against a
//! later state. Closed admission is one atomic load; every other state, and every bad
//! outcome, goes through a `std::sync::Mutex` held for a few instructions (never across an
//! `.await`, never while a listener runs).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tower_ai_core::keys::Key;

use crate::clock;
use crate::config::{CircuitBreakerConfig, Window};
use crate::event::{CircuitEvent, CircuitState, Emitter, TransitionReason};
use crate::registry::Lane;
use crate::store::{BreakerSink, SharedState};
use crate::window::{self, Bad, Ring, Stats, StripeCalls};

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const FORCED_CLOSED: u64 = 4;

/// The `until` reported for a forced-open key (it stays open until the handle says).
const FORCED_UNTIL: Duration = Duration::from_secs(24 * 3600);

fn code_state(w: u64) -> CircuitState {
    match w & 7 {
        CLOSED => CircuitState::Closed,
        OPEN => CircuitState::Open,
        HALF_OPEN => CircuitState::HalfOpen,
        FORCED_OPEN => CircuitState::ForcedOpen,
        _ => CircuitState::ForcedClosed,
    }
}

/// Whether a call admitted under state word `w` is a half-open probe (holds a permit):
/// only the half-open state admits probes, and it admits nothing else.
#[inline]
pub(crate) fn is_probe(w: u64) -> bool {
    w & 7 == HALF_OPEN
}

/// What [`Core::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Send it; record the outcome against `word`. `probe`: it holds a half-open permit.
    Pass { word: u64, probe: bool },
    /// Send it, record nothing (forced closed).
    Untracked,
    /// Refuse it.
    Reject { until: Instant },
}

/// How a call ended, as the breaker judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    /// Neither (a rate limit, a client error): not counted at all.
    Ignored,
}

/// A snapshot of one key, for the handle.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// The key.
    pub key: Key,
    /// Its label.
    pub label: Arc<str>,
    /// Its state.
    pub state: CircuitState,
    /// Calls in the window (closed state; 0 otherwise, the window restarts on closing).
    pub calls: u64,
    /// Failures in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// When an open breaker starts probing.
    pub open_until: Option<Instant>,
    /// Probes in flight (half-open).
    pub probes_in_flight: u32,
    /// Times this key's breaker opened.
    pub times_opened: u64,
    /// Calls refused.
    pub rejected: u64,
}

impl Metrics {
    /// Failures / calls, once there are calls.
    pub fn failure_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.failures as f64 / self.calls as f64)
    }

    /// Slow calls / calls, once there are calls.
    pub fn slow_call_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.slow_calls as f64 / self.calls as f64)
    }
}

/// What a breaker keeps under its lock. Idle and closed with no bad call in its window,
/// a key holds only this struct's three words: its lanes and the rest are made when
/// needed and let go when no longer.
#[derive(Debug)]
struct Inner {
    /// The lanes of the thread stripes calling this key, at most one per stripe
    /// ([`Core::lane`]); `None` (no allocation) once every lane was let go.
    /// Boxed: one word in every key's breaker, where a `Vec` would take three.
    #[allow(clippy::box_collection)]
    lanes: Option<Box<Vec<LaneRef>>>,
    /// What lanes since let go counted: a count window's calls since its reset; a time
    /// window's calls if they fall in one bucket ([`window::inline_add`]; more go to
    /// `more`'s ring).
    left: u64,
    /// Everything else, made by the first bad call, opening, refusal or forced state,
    /// and let go once it holds nothing ([`Core::tidy`]).
    more: Option<Box<More>>,
}

/// A breaker's reference to one of its lanes.
#[derive(Debug)]
enum LaneRef {
    /// Held while the key is in its registry: let go (its counts moved into the
    /// breaker) once nothing else holds it ([`Core::release`]).
    Owned(Arc<Lane>),
    /// The registry forgot the key while a call or a service still held this lane: its
    /// counts are read while it lives.
    Detached(Weak<Lane>),
}

/// The part of a breaker's locked state an idle closed key does without.
#[derive(Debug, Default)]
struct More {
    /// The window's failures and slow calls: made by the first one, let go when the
    /// window has none left (a breaker that only ever succeeded keeps none).
    bad: Option<Bad>,
    /// A time window's calls counted by lanes since let go.
    ring: Ring,
    /// Calls refused.
    rejected: u64,
    /// Times opened.
    opened: u64,
    /// When an open breaker starts probing (nanoseconds since the epoch).
    open_until: u64,
    in_flight: u32,
    successes: u32,
    reopens: u32,
    /// With a shared store: the probe permits the store granted this replica (half-open
    /// admits probes up to this many instead of `half_open_probes`).
    granted: u32,
    /// With a shared store: no permit is asked before this time (nanoseconds since the
    /// epoch), after the store said every permit was out.
    next_ask: u64,
    /// With a shared store: a probe permit has been asked for and not answered yet.
    asking: bool,
    /// With a shared store that could not answer: probing on in-process permits.
    local_probes: bool,
}

impl More {
    /// Whether it holds nothing a fresh one would not.
    fn is_blank(&self) -> bool {
        self.bad.is_none()
            && self.ring.is_empty()
            && self.rejected == 0
            && self.opened == 0
            && self.open_until == 0
            && self.in_flight == 0
            && self.successes == 0
            && self.reopens == 0
            && self.granted == 0
            && self.next_ask == 0
            && !self.asking
            && !self.local_probes
    }

    /// Forgets the probes of the last half-open state.
    fn reset_probes(&mut self) {
        self.in_flight = 0;
        self.successes = 0;
        self.granted = 0;
        self.local_probes = false;
        self.next_ask = 0;
    }
}

impl Inner {
    /// The rest of the locked state, made if needed.
    fn more(&mut self) -> &mut More {
        self.more.get_or_insert_with(Box::default)
    }

    /// The rest of the locked state as it reads (a blank one if there is none).
    fn peek(&self) -> &More {
        static BLANK: std::sync::OnceLock<More> = std::sync::OnceLock::new();
        self.more
            .as_deref()
            .unwrap_or_else(|| BLANK.get_or_init(More::default))
    }

    /// Lets go of the rest of the locked state once it holds nothing.
    fn tidy(&mut self) {
        if self.more.as_ref().is_some_and(|m| m.is_blank()) {
            self.more = None;
        }
    }

    /// Forgets the probes of the last half-open state.
    fn reset_probes(&mut self) {
        if let Some(m) = &mut self.more {
            m.reset_probes();
        }
    }
}

/// Keeps a time window's bucket (`tick1`: its tick + 1) of a lane let go: in `inline`
/// while it is the window's only one, else in the ring of `more`.
fn keep_bucket(
    inline: &mut u64,
    more: &mut Option<Box<More>>,
    buckets: u64,
    tick1: u64,
    calls: u64,
) {
    if let Some(m) = more.as_deref_mut().filter(|m| !m.ring.is_empty()) {
        return m.ring.add(buckets, tick1, calls);
    }
    if let Err((t0, c0)) = window::inline_add(inline, buckets, tick1, calls) {
        let ring = &mut more.get_or_insert_with(Box::default).ring;
        if t0 != 0 {
            ring.add(buckets, t0, c0);
        }
        ring.add(buckets, tick1, calls);
        *inline = 0;
    }
}

/// A state change to announce once the lock is released.
#[derive(Debug)]
struct Change {
    from: CircuitState,
    to: CircuitState,
    reason: TransitionReason,
    at: Instant,
    until: Option<Instant>,
}

/// What every breaker of a layer shares, held once by its registry: one pointer in each
/// breaker instead of a copy of each field (48 bytes).
#[derive(Debug)]
pub(crate) struct Shared {
    cfg: Arc<CircuitBreakerConfig>,
    epoch: Instant,
    emitter: Emitter,
    /// Where the shared store answers (`None`: no store, the default).
    sink: Option<BreakerSink>,
    bucket_nanos: u64,
    /// A time window's buckets (0: a count window).
    buckets: u64,
}

impl Shared {
    pub(crate) fn new(
        cfg: Arc<CircuitBreakerConfig>,
        epoch: Instant,
        emitter: Emitter,
        sink: Option<BreakerSink>,
    ) -> Arc<Shared> {
        let (bucket_nanos, buckets) = match cfg.window {
            Window::Time { length, buckets } => (
                u64::try_from((length / buckets).as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1),
                u64::from(buckets),
            ),
            Window::Count { .. } => (u64::MAX, 0),
        };
        Arc::new(Shared {
            cfg,
            epoch,
            emitter,
            sink,
            bucket_nanos,
            buckets,
        })
    }
}

/// One key's breaker.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) key: Key,
    pub(crate) label: Arc<str>,
    shared: Arc<Shared>,
    /// `cfg.slow.is_some()`, kept here for the hot path (no second pointer to follow).
    times_calls: bool,
    /// `cfg.consecutive_failures.is_some()`, likewise.
    counts_consecutive: bool,
    state: AtomicU64,
    armed: AtomicBool,
    consecutive: AtomicU32,
    /// Seconds since the epoch at the last use, + 1 (saturating: 136 years).
    last_used: AtomicU32,
    /// Set by closed-state successes (which read no clock); turned into `last_used` by
    /// the registry's sweep.
    used: AtomicBool,
    pub(crate) evicted: AtomicBool,
    inner: Mutex<Inner>,
}

impl Core {
    pub(crate) fn new(key: Key, label: Arc<str>, shared: Arc<Shared>, now: Instant) -> Core {
        let cfg = &shared.cfg;
        let core = Core {
            key,
            label,
            times_calls: cfg.slow.is_some(),
            counts_consecutive: cfg.consecutive_failures.is_some(),
            state: AtomicU64::new(CLOSED),
            armed: AtomicBool::new(false),
            consecutive: AtomicU32::new(0),
            last_used: AtomicU32::new(0),
            used: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                lanes: None,
                left: 0,
                more: None,
            }),
            shared,
        };
        core.touch(now);
        #[cfg(feature = "metrics")]
        crate::meter::created(&core);
        core
    }

    /// Where this breaker's events go.
    #[cfg(feature = "metrics")]
    pub(crate) fn emitter(&self) -> &Emitter {
        &self.shared.emitter
    }

    /// Thread stripe `stripe`'s lane to this breaker: the one it holds, else made (the
    /// registry's lookup, off the hot path). Held until nothing else holds it
    /// ([`release`](Self::release)) or [`detach`](Self::detach).
    pub(crate) fn lane(self: &Arc<Self>, stripe: usize) -> Arc<Lane> {
        let mut g = self.lock();
        let found = g.lanes.iter().flat_map(|v| v.iter()).find_map(|r| match r {
            LaneRef::Owned(l) if l.stripe == stripe => Some(l.clone()),
            _ => None,
        });
        if let Some(l) = found {
            return l;
        }
        let lane = Arc::new(Lane {
            core: self.clone(),
            stripe,
            calls: StripeCalls::new(self.shared.cfg.window),
        });
        g.lanes
            // Most keys are called from one thread: room for one lane, not four.
            .get_or_insert_with(|| Box::new(Vec::with_capacity(1)))
            .push(LaneRef::Owned(lane.clone()));
        lane
    }

    /// Drops `lane`, a reference to one of this breaker's lanes, and lets go of every
    /// lane the breaker alone holds now (moving its counts into the breaker), so that a
    /// key nobody calls holds no lane.
    pub(crate) fn release(&self, lane: Arc<Lane>) {
        let mut g = self.lock();
        drop(lane); // under the lock: no lane of ours can be cloned meanwhile
        self.release_locked(&mut g);
    }

    /// Lets go of the lanes only the breaker holds (under its lock: nothing else can
    /// clone them, so a lane found unique stays so, and no call adds to it any more).
    fn release_locked(&self, g: &mut Inner) {
        let buckets = self.shared.buckets;
        let Inner { lanes, left, more } = g;
        let Some(list) = lanes else { return };
        list.retain_mut(|r| {
            let LaneRef::Owned(l) = r else { return true };
            // Unique: no weak reference is ever made to an owned lane (detach makes them).
            let Some(lane) = Arc::get_mut(l) else {
                return true;
            };
            match lane.calls {
                StripeCalls::Count(_) => lane.calls.drain(left, |_, _| {}),
                StripeCalls::Time { .. } => lane
                    .calls
                    .drain(&mut 0, |t, c| keep_bucket(left, more, buckets, t, c)),
            }
            false
        });
        if list.is_empty() {
            *lanes = None;
        }
        g.tidy();
    }

    /// Lets go of the lanes: the registry forgot this key. Lanes a call or a service
    /// still holds go on counting into it.
    pub(crate) fn detach(&self) {
        #[cfg(feature = "metrics")]
        crate::meter::forgotten(self, self.state());
        let mut g = self.lock();
        self.release_locked(&mut g);
        // The rest are held by calls or services, which go on counting into them.
        let kept: Vec<_> = g
            .lanes
            .iter_mut()
            .flat_map(|v| v.iter_mut())
            .filter_map(|r| match r {
                LaneRef::Owned(l) => {
                    let weak = LaneRef::Detached(Arc::downgrade(l));
                    match std::mem::replace(r, weak) {
                        LaneRef::Owned(l) => Some(l),
                        LaneRef::Detached(_) => None,
                    }
                }
                LaneRef::Detached(_) => None,
            })
            .collect();
        drop(g);
        drop(kept); // after the lock: a lane's drop may drop a breaker
    }

    /// Applies `f` to every lane alive (a detached lane outlives its registry entry only
    /// while a call or a service holds it).
    fn each_lane(g: &Inner, mut f: impl FnMut(&Lane)) {
        for r in g.lanes.iter().flat_map(|v| v.iter()) {
            match r {
                LaneRef::Owned(l) => f(l),
                LaneRef::Detached(w) => {
                    if let Some(l) = w.upgrade() {
                        f(&l);
                    }
                }
            }
        }
    }

    /// Calls in the window at `tick`: the lanes' and what lanes let go left.
    fn total(&self, g: &mut Inner, tick: u64) -> u64 {
        let buckets = self.shared.buckets;
        let mut n = if buckets > 0 {
            let ring = g.more.as_mut().map_or(0, |m| m.ring.total(buckets, tick));
            g.tidy();
            ring + window::inline_total(&mut g.left, buckets, tick)
        } else {
            g.left
        };
        Self::each_lane(g, |l| n += l.calls.total(tick));
        n
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave `Inner` inconsistent in a way that matters more
        // than refusing service would: carry on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `t` as nanoseconds since the breaker's epoch (0 before it).
    #[inline]
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.shared.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        let d = Duration::from_nanos(nanos);
        self.shared
            .epoch
            .checked_add(d)
            .unwrap_or(self.shared.epoch)
    }

    #[inline]
    fn tick(&self, nanos: u64) -> u64 {
        nanos / self.shared.bucket_nanos
    }

    /// Marks the key as used at `now` (seconds granularity: written once a second at most).
    #[inline]
    fn touch(&self, now: Instant) {
        let s = u32::try_from(self.nanos(now) / 1_000_000_000 + 1).unwrap_or(u32::MAX);
        if self.last_used.load(Ordering::Relaxed) != s {
            self.last_used.store(s, Ordering::Relaxed);
        }
    }

    /// Marks the key as used without a clock read: a flag written once per sweep at most.
    #[inline]
    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Seconds since the epoch at the last use, + 1.
    pub(crate) fn last_used(&self) -> u64 {
        u64::from(self.last_used.load(Ordering::Relaxed))
    }

    /// How long the key has gone unused, as of `now`. A use seen only through the
    /// flag counts as a use at `now`: never early, at worst one sweep late.
    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        if self.used.swap(false, Ordering::Relaxed) {
            self.touch(now);
        }
        let now_s = self.nanos(now) / 1_000_000_000 + 1;
        Duration::from_secs(now_s.saturating_sub(self.last_used()))
    }

    pub(crate) fn is_forced(&self) -> bool {
        matches!(
            self.state.load(Ordering::Relaxed) & 7,
            FORCED_OPEN | FORCED_CLOSED
        )
    }

    /// Whether recording a closed-state success needs the time: time windows bucket by
    /// it. (Slow-call detection reads the clock itself, at start and end.)
    #[inline]
    pub(crate) fn success_needs_clock(&self) -> bool {
        matches!(self.shared.cfg.window, Window::Time { .. })
    }

    /// Whether slow-call detection needs the call's start time.
    #[inline]
    pub(crate) fn times_calls(&self) -> bool {
        self.times_calls
    }

    /// Whether the call took longer than the slow-call threshold.
    #[inline]
    pub(crate) fn is_slow(&self, took: Duration) -> bool {
        self.shared.cfg.slow.is_some_and(|s| took > s.threshold)
    }

    pub(crate) fn config(&self) -> &CircuitBreakerConfig {
        &self.shared.cfg
    }

    /// Decides whether a call may go. Closed: one atomic load, no clock read. Other
    /// states read the clock through `clock`.
    #[inline]
    pub(crate) fn admit(&self, clock: impl FnOnce() -> Instant) -> Admit {
        let w = self.state.load(Ordering::Acquire);
        match w & 7 {
            CLOSED => Admit::Pass {
                word: w,
                probe: false,
            },
            FORCED_CLOSED => Admit::Untracked,
            _ => self.admit_slow(clock()),
        }
    }

    #[cold]
    fn admit_slow(&self, now: Instant) -> Admit {
        let mut g = self.lock();
        let mut w = self.state.load(Ordering::Acquire);
        let mut change = None;
        let mut ask = false;
        let open_until = g.peek().open_until;
        let decision = match w & 7 {
            FORCED_OPEN => Admit::Reject {
                until: now + FORCED_UNTIL,
            },
            OPEN if self.nanos(now) < open_until => Admit::Reject {
                until: self.instant(open_until),
            },
            _ => {
                // With a shared store, probes need the store's permits (unless it could
                // not answer): an ended open duration asks for one, and refuses until it
                // comes (a half-open breaker refuses, not queues, calls beyond its
                // permits).
                let shared = self.shared.sink.is_some() && !g.peek().local_probes;
                let can_ask = !g.peek().asking && self.nanos(now) >= g.peek().next_ask;
                if w & 7 == OPEN {
                    if shared {
                        ask = can_ask;
                    } else {
                        change = Some(self.half_open_locked(&mut g, now));
                        // With a store, probing without it (it could not be reached).
                        g.more().local_probes = self.shared.sink.is_some();
                        w = self.state.load(Ordering::Acquire);
                    }
                }
                let permits = if shared {
                    g.peek().granted
                } else {
                    self.shared.cfg.half_open_probes
                };
                if shared
                    && w & 7 == HALF_OPEN
                    && g.peek().in_flight >= g.peek().granted
                    && g.peek().granted < self.shared.cfg.half_open_probes
                {
                    ask = can_ask;
                }
                if ask {
                    g.more().asking = true;
                }
                match w & 7 {
                    // Open, its duration ended, waiting for the store's permit.
                    OPEN if shared => Admit::Reject {
                        until: self.instant(open_until).max(now),
                    },
                    HALF_OPEN if g.peek().in_flight < permits => {
                        g.more().in_flight += 1;
                        Admit::Pass {
                            word: w,
                            probe: true,
                        }
                    }
                    CLOSED => Admit::Pass {
                        word: w,
                        probe: false,
                    },
                    FORCED_CLOSED => Admit::Untracked,
                    OPEN => Admit::Reject {
                        until: self.instant(open_until),
                    },
                    FORCED_OPEN => Admit::Reject {
                        until: now + FORCED_UNTIL,
                    },
                    // Half-open with every probe out: a permit frees when one completes.
                    _ => Admit::Reject { until: now },
                }
            }
        };
        if let Admit::Reject { .. } = decision {
            g.more().rejected += 1;
        }
        g.tidy();
        drop(g);
        if let Some(c) = change {
            self.announce(c);
        }
        if ask {
            self.ask_probe();
        }
        self.touch(now);
        if let Admit::Reject { until } = decision {
            #[cfg(feature = "metrics")]
            crate::meter::rejected(code_state(self.state.load(Ordering::Relaxed)));
            self.shared.emitter.emit(&CircuitEvent::Rejected {
                key: self.key,
                label: self.label.clone(),
                state: code_state(self.state.load(Ordering::Relaxed)),
                until,
            });
        }
        decision
    }

    /// Records a plain success (not a probe, not timed) of a call admitted with `word`,
    /// through `lane` (the calling thread stripe's): in a closed count window, one atomic
    /// add to the lane's counter and a few loads of lines no call writes. The same as
    /// [`record`](Self::record) with `Verdict::Success`.
    #[inline(always)]
    pub(crate) fn record_success(&self, lane: &Lane, word: u64) {
        let StripeCalls::Count(own) = &lane.calls else {
            return self.record(lane, word, false, Verdict::Success, false, None);
        };
        self.mark_used();
        if self.state.load(Ordering::Acquire) != word {
            return; // admitted under an earlier state: says nothing about this one
        }
        if self.counts_consecutive && self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        own.fetch_add(1, Ordering::Relaxed);
        if self.armed.load(Ordering::Relaxed) {
            self.record_armed_success(lane, word);
        }
    }

    /// A success counted while the window holds bad calls but too few calls to judge: it
    /// may be the call that reaches the minimum.
    #[cold]
    #[inline(never)]
    fn record_armed_success(&self, lane: &Lane, word: u64) {
        let now = clock::now();
        self.touch(now);
        self.record_locked(lane, word, 0, false, false, true, now);
    }

    /// Records a completed call admitted with `word`, through `lane`; `now`
    /// is `Some` when the caller read the clock already. A closed-state success in a
    /// count window reads no clock.
    #[inline(never)]
    pub(crate) fn record(
        &self,
        lane: &Lane,
        word: u64,
        probe: bool,
        verdict: Verdict,
        slow: bool,
        now: Option<Instant>,
    ) {
        if probe {
            let now = now.unwrap_or_else(clock::now);
            self.touch(now);
            return self.record_probe(word, verdict, slow, now);
        }
        self.mark_used();
        if self.state.load(Ordering::Acquire) != word {
            return; // admitted under an earlier state: says nothing about this one
        }
        let failure = match verdict {
            Verdict::Ignored => return,
            Verdict::Failure => true,
            Verdict::Success => false,
        };
        let mut now = now;
        let tick = if self.success_needs_clock() {
            self.tick(self.nanos(*now.get_or_insert_with(clock::now)))
        } else {
            0
        };
        let mut added = false;
        if !failure && !slow {
            if self.shared.cfg.consecutive_failures.is_some()
                && self.consecutive.load(Ordering::Relaxed) != 0
            {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            added = lane.calls.try_add(tick);
            if added && !self.armed.load(Ordering::Relaxed) {
                return; // the common case: a success cannot raise a rate
            }
        }
        let now = now.unwrap_or_else(clock::now);
        self.touch(now);
        self.record_locked(lane, word, tick, failure, slow, added, now);
    }

    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn record_locked(
        &self,
        lane: &Lane,
        word: u64,
        tick: u64,
        failure: bool,
        slow: bool,
        added: bool,
        now: Instant,
    ) {
        let mut g = self.lock();
        if self.state.load(Ordering::Acquire) != word {
            return;
        }
        if !added {
            lane.calls.add_locked(tick);
        }
        if failure || slow {
            let at = match self.shared.cfg.window {
                Window::Count { .. } => self.total(&mut g, tick),
                Window::Time { .. } => tick,
            };
            let window = self.shared.cfg.window;
            g.more()
                .bad
                .get_or_insert_with(|| Bad::new(window))
                .add(at, failure, slow);
        }
        let consecutive = if failure {
            self.consecutive
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        } else {
            self.consecutive.store(0, Ordering::Relaxed);
            0
        };
        let calls = self.total(&mut g, tick);
        let st = self.window_stats(&mut g, calls, tick);
        let cfg = &self.shared.cfg;
        let rate = |n: u64| n as f64 / st.calls as f64;
        let reason = if cfg.consecutive_failures.is_some_and(|k| consecutive >= k) {
            Some(TransitionReason::ConsecutiveFailures(consecutive))
        } else if st.calls >= u64::from(cfg.minimum_calls) && rate(st.failures) >= cfg.failure_rate
        {
            Some(TransitionReason::FailureRate {
                rate: rate(st.failures),
                calls: st.calls,
            })
        } else if st.calls >= u64::from(cfg.minimum_calls)
            && cfg.slow.is_some_and(|s| rate(st.slow) >= s.rate)
        {
            Some(TransitionReason::SlowCallRate {
                rate: rate(st.slow),
                calls: st.calls,
            })
        } else {
            None
        };
        // While the window holds bad calls but too few calls to judge, every success must
        // look again: the one that reaches the minimum may find the rate too high.
        let armed = reason.is_none()
            && st.calls < u64::from(cfg.minimum_calls)
            && st.failures + st.slow > 0;
        self.armed.store(armed, Ordering::Relaxed);
        let change = reason.map(|r| self.open_locked(&mut g, now, r));
        drop(g);
        if let Some(c) = change {
            self.announce(c);
        }
    }

    #[cold]
    fn record_probe(&self, word: u64, verdict: Verdict, slow: bool, now: Instant) {
        let mut g = self.lock();
        if self.state.load(Ordering::Acquire) != word {
            return; // forced or reset meanwhile: permits were reset with it
        }
        g.more().in_flight = g.more().in_flight.saturating_sub(1);
        // On a permit of the shared store, the store counts the successes of every
        // replica and closes (its answer closes this breaker); a failure opens here and
        // is shared as any opening is.
        let shared = self.shared.sink.is_some() && !g.more().local_probes;
        if shared {
            g.more().granted = g.more().granted.saturating_sub(1);
        }
        let mut report = None;
        let change = match (verdict, slow) {
            (Verdict::Ignored, _) => {
                report = Some(false);
                None
            }
            (Verdict::Failure, _) | (Verdict::Success, true) => {
                Some(self.open_locked(&mut g, now, TransitionReason::ProbeFailed))
            }
            (Verdict::Success, false) => {
                g.more().successes += 1;
                if shared {
                    report = Some(true);
                    None
                } else {
                    (g.more().successes >= self.shared.cfg.half_open_successes)
                        .then(|| self.close_locked(&mut g, now, TransitionReason::ProbesSucceeded))
                }
            }
        };
        drop(g);
        if let Some(c) = change {
            self.announce(c);
        }
        if let (true, Some(success)) = (shared, report) {
            self.report_probe(success);
        }
    }

    /// Asks the shared store for a probe permit (its answer comes through the sink).
    #[cold]
    fn ask_probe(&self) {
        if let (Some(store), Some(sink)) = (&self.shared.cfg.store, &self.shared.sink) {
            store.probe(
                self.key,
                &self.label,
                self.shared.cfg.half_open_probes,
                sink,
            );
        }
    }

    /// Tells the shared store how a probe on its permit ended.
    #[cold]
    fn report_probe(&self, success: bool) {
        if let (Some(store), Some(sink)) = (&self.shared.cfg.store, &self.shared.sink) {
            store.probe_done(
                self.key,
                &self.label,
                success,
                self.shared.cfg.half_open_successes,
                sink,
            );
        }
    }

    /// Applies what the shared store says of this key (an answer, or a state it read).
    pub(crate) fn apply_shared(&self, state: SharedState, now: Instant) {
        let mut g = self.lock();
        let w = self.state.load(Ordering::Acquire);
        let code = w & 7;
        if matches!(code, FORCED_OPEN | FORCED_CLOSED) {
            if let Some(m) = &mut g.more {
                m.asking = false;
            }
            return; // the handle's word wins over the replicas'
        }
        let mut give_back = false;
        let change = match state {
            SharedState::Granted => {
                g.more().asking = false;
                match code {
                    OPEN if self.nanos(now) >= g.peek().open_until => {
                        let c = self.half_open_locked(&mut g, now);
                        g.more().granted = 1;
                        Some(c)
                    }
                    HALF_OPEN if !g.peek().local_probes => {
                        g.more().granted += 1;
                        None
                    }
                    _ => {
                        give_back = true;
                        None
                    }
                }
            }
            SharedState::Busy(retry) => {
                g.more().asking = false;
                // Other replicas hold every permit: look again later, not at every call.
                let at = now.checked_add(retry).unwrap_or(now);
                g.more().next_ask = self.nanos(at);
                if code == OPEN {
                    let m = g.more();
                    m.open_until = m.open_until.max(self.nanos(at));
                }
                None
            }
            SharedState::Open(left) => {
                g.more().asking = false;
                let until = now.checked_add(left).unwrap_or(now);
                match code {
                    OPEN => {
                        let m = g.more();
                        m.open_until = m.open_until.max(self.nanos(until));
                        None
                    }
                    _ if left.is_zero() => None,
                    _ => Some(self.open_shared_locked(&mut g, now, until)),
                }
            }
            SharedState::Closed => {
                g.more().asking = false;
                match code {
                    OPEN | HALF_OPEN => {
                        Some(self.close_locked(&mut g, now, TransitionReason::Shared))
                    }
                    _ => None,
                }
            }
            SharedState::HalfOpen => None,
            SharedState::Unavailable => {
                g.more().asking = false;
                match code {
                    // Decided in-process: probe on this replica's own permits.
                    OPEN if self.nanos(now) >= g.peek().open_until => {
                        let c = self.half_open_locked(&mut g, now);
                        g.more().local_probes = true;
                        Some(c)
                    }
                    // The opening could not be shared: the store does not know it, so it
                    // would answer "closed" at its end; this replica probes on its own.
                    OPEN => {
                        g.more().local_probes = true;
                        None
                    }
                    HALF_OPEN => {
                        g.more().local_probes = true;
                        (g.more().successes >= self.shared.cfg.half_open_successes).then(|| {
                            self.close_locked(&mut g, now, TransitionReason::ProbesSucceeded)
                        })
                    }
                    _ => None,
                }
            }
        };
        g.tidy();
        drop(g);
        if let Some(c) = change {
            self.announce(c);
        }
        if give_back {
            self.report_probe(false);
        }
    }

    /// Opens until `until` because another replica's breaker opened (not shared again).
    fn open_shared_locked(&self, g: &mut Inner, now: Instant, until: Instant) -> Change {
        g.more().open_until = self.nanos(until);
        self.reset_window(g);
        g.reset_probes();
        g.more().opened += 1;
        let (from, to) = self.set_state(OPEN);
        Change {
            from,
            to,
            reason: TransitionReason::Shared,
            at: now,
            until: Some(until),
        }
    }

    /// A probe's future was dropped before it completed: give its permit back.
    pub(crate) fn release_probe(&self, word: u64) {
        let mut g = self.lock();
        if self.state.load(Ordering::Acquire) == word {
            g.more().in_flight = g.more().in_flight.saturating_sub(1);
            if self.shared.sink.is_some() && !g.more().local_probes {
                g.more().granted = g.more().granted.saturating_sub(1);
                drop(g);
                self.report_probe(false);
            }
        }
    }

    fn set_state(&self, code: u64) -> (CircuitState, CircuitState) {
        let w = self.state.load(Ordering::Acquire);
        let next = ((w >> 3) + 1) << 3 | code;
        self.state.store(next, Ordering::Release);
        (code_state(w), code_state(next))
    }

    /// What the window holds, given its call total; lets go of the bad calls' record
    /// once none is left in the window.
    fn window_stats(&self, g: &mut Inner, calls: u64, tick: u64) -> Stats {
        let Some(bad) = g.more.as_mut().and_then(|m| m.bad.as_mut()) else {
            return Stats {
                calls: match self.shared.cfg.window {
                    Window::Count { calls: size } => calls.min(u64::from(size)),
                    Window::Time { .. } => calls,
                },
                failures: 0,
                slow: 0,
            };
        };
        let st = bad.stats(calls, tick);
        if bad.is_empty(tick) {
            g.more().bad = None;
            g.tidy();
        }
        st
    }

    fn reset_window(&self, g: &mut Inner) {
        Self::each_lane(g, |l| l.calls.reset());
        g.left = 0;
        if let Some(m) = &mut g.more {
            m.bad = None;
            m.ring = Ring::default();
        }
        self.consecutive.store(0, Ordering::Relaxed);
        self.armed.store(false, Ordering::Relaxed);
    }

    fn open_locked(&self, g: &mut Inner, now: Instant, reason: TransitionReason) -> Change {
        let from_half_open = self.state.load(Ordering::Acquire) & 7 == HALF_OPEN;
        let m = g.more();
        m.reopens = if from_half_open {
            m.reopens.saturating_add(1)
        } else {
            0
        };
        let reopens = m.reopens;
        // At most 7 days (the config's bound), so the sum fits any clock; checked all
        // the same, so no configuration can make a trip panic.
        let until = now
            .checked_add(self.shared.cfg.open_duration_after(reopens))
            .unwrap_or(now);
        g.more().open_until = self.nanos(until);
        self.reset_window(g);
        g.reset_probes();
        g.more().opened += 1;
        let (from, to) = self.set_state(OPEN);
        Change {
            from,
            to,
            reason,
            at: now,
            until: Some(until),
        }
    }

    fn half_open_locked(&self, g: &mut Inner, now: Instant) -> Change {
        g.reset_probes();
        let (from, to) = self.set_state(HALF_OPEN);
        Change {
            from,
            to,
            reason: TransitionReason::OpenElapsed,
            at: now,
            until: None,
        }
    }

    fn close_locked(&self, g: &mut Inner, now: Instant, reason: TransitionReason) -> Change {
        self.reset_window(g);
        g.reset_probes();
        if let Some(m) = &mut g.more {
            m.reopens = 0;
        }
        g.tidy();
        let (from, to) = self.set_state(CLOSED);
        Change {
            from,
            to,
            reason,
            at: now,
            until: None,
        }
    }

    /// Forces the state (the handle's force_open / force_closed / reset).
    pub(crate) fn force(&self, to: CircuitState, now: Instant) {
        let mut g = self.lock();
        let change = match to {
            CircuitState::ForcedOpen | CircuitState::Open => {
                if let Some(m) = &mut g.more {
                    m.in_flight = 0;
                }
                let (from, to) = self.set_state(FORCED_OPEN);
                Change {
                    from,
                    to,
                    reason: TransitionReason::Forced,
                    at: now,
                    until: Some(now + FORCED_UNTIL),
                }
            }
            CircuitState::ForcedClosed => {
                self.reset_window(&mut g);
                if let Some(m) = &mut g.more {
                    m.in_flight = 0;
                }
                g.tidy();
                let (from, to) = self.set_state(FORCED_CLOSED);
                Change {
                    from,
                    to,
                    reason: TransitionReason::Forced,
                    at: now,
                    until: None,
                }
            }
            _ => self.close_locked(&mut g, now, TransitionReason::Reset),
        };
        drop(g);
        self.touch(now);
        self.announce(change);
    }

    fn announce(&self, c: Change) {
        if matches!(c.to, CircuitState::Closed) {
            tracing::info!(circuit.key = %self.label, circuit.from = c.from.as_str(), circuit.to = c.to.as_str(), reason = ?c.reason, "circuit state changed");
        } else {
            tracing::warn!(circuit.key = %self.label, circuit.from = c.from.as_str(), circuit.to = c.to.as_str(), reason = ?c.reason, "circuit state changed");
        }
        #[cfg(feature = "metrics")]
        crate::meter::transition(self, c.from, c.to, !self.evicted.load(Ordering::Relaxed));
        // An opening decided here is shared (one decided elsewhere is already).
        if let (CircuitState::Open, Some(until), Some(store), Some(sink)) =
            (c.to, c.until, &self.shared.cfg.store, &self.shared.sink)
        {
            if c.reason != TransitionReason::Shared {
                store.opened(
                    self.key,
                    &self.label,
                    until.saturating_duration_since(c.at),
                    sink,
                );
            }
        }
        self.shared.emitter.emit(&CircuitEvent::StateChanged {
            key: self.key,
            label: self.label.clone(),
            from: c.from,
            to: c.to,
            reason: c.reason,
            at: c.at,
            until: c.until,
        });
    }

    /// The state word (generation and state) as stored.
    #[inline]
    pub(crate) fn word(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    /// The state as stored (an open breaker whose duration ended stays `Open` until the
    /// next call moves it to half-open).
    pub(crate) fn state(&self) -> CircuitState {
        code_state(self.state.load(Ordering::Acquire))
    }

    /// Whether a call arriving at `now` would be admitted (takes no permit).
    pub(crate) fn would_admit(&self, now: Instant) -> bool {
        let w = self.state.load(Ordering::Acquire);
        match w & 7 {
            CLOSED | FORCED_CLOSED => true,
            FORCED_OPEN => false,
            OPEN => self.nanos(now) >= self.lock().peek().open_until,
            _ => self.lock().peek().in_flight < self.shared.cfg.half_open_probes,
        }
    }

    /// When an open breaker starts probing.
    #[cfg(test)]
    pub(crate) fn open_until(&self) -> Option<Instant> {
        match self.state.load(Ordering::Acquire) & 7 {
            OPEN => Some(self.instant(self.lock().peek().open_until)),
            _ => None,
        }
    }

    pub(crate) fn metrics(&self, now: Instant) -> Metrics {
        let mut g = self.lock();
        let tick = self.tick(self.nanos(now));
        let calls = self.total(&mut g, tick);
        let st = self.window_stats(&mut g, calls, tick);
        let st = match self.state.load(Ordering::Acquire) & 7 {
            CLOSED => st,
            _ => Stats::default(),
        };
        Metrics {
            key: self.key,
            label: self.label.clone(),
            state: self.state(),
            calls: st.calls,
            failures: st.failures,
            slow_calls: st.slow,
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            open_until: match self.state.load(Ordering::Acquire) & 7 {
                OPEN => Some(self.instant(g.peek().open_until)),
                _ => None,
            },
            probes_in_flight: g.peek().in_flight,
            times_opened: g.peek().opened,
            rejected: g.peek().rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A breaker, a lane to it (stripe 0), and the states it announced.
    fn core(
        cfg: CircuitBreakerConfig,
        now: Instant,
    ) -> (Arc<Lane>, Arc<StdMutex<Vec<CircuitState>>>) {
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s = seen.clone();
        let emitter = Emitter::new(move |e: &CircuitEvent| {
            if let CircuitEvent::StateChanged { to, .. } = e {
                s.lock().unwrap().push(*to);
            }
        });
        let c = Arc::new(Core::new(
            Key::of("k"),
            "k".into(),
            Shared::new(Arc::new(cfg), now, emitter, None),
            now,
        ));
        (c.lane(0), seen)
    }

    /// Counted over the last 4 calls, open once half of them failed.
    fn last_four() -> crate::config::CircuitBreakerConfigBuilder {
        CircuitBreakerConfig::builder()
            .count_window(4)
            .minimum_calls(4)
            .failure_rate(0.5)
    }

    fn call(lane: &Lane, now: Instant, v: Verdict) -> bool {
        match lane.core.admit(|| now) {
            Admit::Pass { word, probe } => {
                lane.core.record(lane, word, probe, v, false, Some(now));
                true
            }
            Admit::Untracked => true,
            Admit::Reject { .. } => false,
        }
    }

    #[test]
    fn the_record_of_bad_calls_is_kept_only_while_the_window_holds_one() {
        let t0 = Instant::now();
        let (lane, _) = core(last_four().build().unwrap(), t0);
        let c = &lane.core;
        let bad = || c.lock().peek().bad.is_some();
        assert!(call(&lane, t0, Verdict::Success));
        assert!(!bad(), "successes alone record no bad call");
        assert_eq!(
            c.lock().lanes.as_ref().map(|v| v.capacity()),
            Some(1),
            "one lane, room for one"
        );
        assert!(c.lock().more.is_none(), "nothing else");
        assert!(call(&lane, t0, Verdict::Failure));
        assert!(bad());
        for _ in 0..3 {
            assert!(call(&lane, t0, Verdict::Success));
        }
        assert!(bad(), "the failure is one of the last 4 calls");
        let m = c.metrics(t0);
        assert_eq!((m.calls, m.failures), (4, 1));
        assert!(call(&lane, t0, Verdict::Success));
        let m = c.metrics(t0);
        assert_eq!((m.calls, m.failures), (4, 0), "the failure left the window");
        assert!(!bad(), "and its record went with it");
        assert_eq!(c.state(), CircuitState::Closed);
    }

    /// What an idle key's breaker is: eleven words (an idle closed key keeps no lane,
    /// no record of bad calls and no probing state; 168 bytes when it kept them all).
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn a_breaker_is_eleven_words() {
        assert_eq!(std::mem::size_of::<Core>(), 88);
    }

    #[test]
    fn a_lane_only_its_breaker_holds_is_let_go_with_its_counts() {
        let t0 = Instant::now();
        let (lane, _) = core(last_four().build().unwrap(), t0);
        let c = lane.core.clone();
        let other = c.lane(1);
        for v in [Verdict::Success, Verdict::Failure] {
            assert!(call(&lane, t0, v));
        }
        assert!(call(&other, t0, Verdict::Success));
        let held = other.clone();
        c.release(other);
        assert_eq!(
            c.lock().lanes.as_ref().unwrap().len(),
            2,
            "stripe 1's is held"
        );
        c.release(held);
        c.release(lane);
        assert!(c.lock().lanes.is_none(), "no lane left");
        let m = c.metrics(t0);
        assert_eq!((m.calls, m.failures), (3, 1), "their calls are");
        // The window goes on from there: S F S, then S F through a new lane.
        let lane = c.lane(0);
        assert!(call(&lane, t0, Verdict::Success));
        assert_eq!(c.state(), CircuitState::Closed, "1 failure in 4");
        assert!(call(&lane, t0, Verdict::Failure));
        assert_eq!(c.state(), CircuitState::Open, "F S S F: 2 in 4");
    }

    #[test]
    fn a_time_lane_let_go_leaves_its_buckets_until_they_leave_the_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let cfg = || {
            CircuitBreakerConfig::builder()
                .time_window(Duration::from_secs(10), 10)
                .minimum_calls(4)
                .failure_rate(0.5)
                .build()
                .unwrap()
        };
        // S F S in seconds 0, 1, 2, through a lane then let go.
        let let_go = |lane: Arc<Lane>| {
            for (i, v) in [Verdict::Success, Verdict::Failure, Verdict::Success]
                .into_iter()
                .enumerate()
            {
                assert!(call(&lane, t0 + s * i as u32, v));
            }
            let c = lane.core.clone();
            c.release(lane);
            assert!(c.lock().lanes.is_none());
            c
        };
        let c = let_go(core(cfg(), t0).0);
        assert_eq!(c.metrics(t0 + s * 9).calls, 3);
        assert_eq!(c.metrics(t0 + s * 10).calls, 2, "second 0 left");
        let lane = c.lane(0);
        assert!(call(&lane, t0 + s * 10, Verdict::Success));
        assert_eq!(c.state(), CircuitState::Closed, "F S S: 3 calls");
        assert!(call(&lane, t0 + s * 10, Verdict::Failure));
        assert_eq!(c.state(), CircuitState::Open, "F S S F: 2 of 4");

        let c = let_go(core(cfg(), t0).0);
        assert!(c.lock().more.is_some(), "the ring and the failure");
        assert_eq!(c.metrics(t0 + s * 12).calls, 0);
        assert!(
            c.lock().more.is_none(),
            "both left the window, and were let go"
        );
    }

    #[test]
    fn full_cycle_without_tower() {
        let t0 = Instant::now();
        let cfg = last_four()
            .open_duration(Duration::from_secs(10))
            .open_backoff(2.0, Duration::from_secs(25))
            .half_open_successes(1)
            .build()
            .unwrap();
        let (lane, seen) = core(cfg, t0);
        let c = &lane.core;
        assert!(call(&lane, t0, Verdict::Failure));
        assert!(call(&lane, t0, Verdict::Failure));
        assert!(call(&lane, t0, Verdict::Success));
        assert_eq!(c.state(), CircuitState::Closed, "3 calls < minimum 4");
        assert!(call(&lane, t0, Verdict::Success)); // 2/4 = 50 %
        assert_eq!(c.state(), CircuitState::Open);
        assert!(!call(&lane, t0 + Duration::from_secs(9), Verdict::Success));
        // probe fails: open again for 20 s
        let t1 = t0 + Duration::from_secs(10);
        assert!(call(&lane, t1, Verdict::Failure));
        assert_eq!(c.open_until(), Some(t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        assert!(call(&lane, t2, Verdict::Failure));
        assert_eq!(c.open_until(), Some(t2 + Duration::from_secs(25)), "capped");
        let t3 = t2 + Duration::from_secs(25);
        assert!(call(&lane, t3, Verdict::Success));
        assert_eq!(c.state(), CircuitState::Closed);
        use CircuitState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            [Open, HalfOpen, Open, HalfOpen, Open, HalfOpen, Closed]
        );
        assert_eq!(c.metrics(t3).times_opened, 3);
    }

    #[test]
    fn stale_outcomes_are_not_counted() {
        let t0 = Instant::now();
        let cfg = CircuitBreakerConfig::builder()
            .consecutive_failures(1)
            .build()
            .unwrap();
        let (lane, _) = core(cfg, t0);
        let c = &lane.core;
        let Admit::Pass { word: old, .. } = c.admit(|| t0) else {
            panic!()
        };
        assert!(call(&lane, t0, Verdict::Failure));
        assert_eq!(c.state(), CircuitState::Open);
        c.force(CircuitState::Closed, t0);
        c.record(&lane, old, false, Verdict::Failure, false, Some(t0));
        assert_eq!(
            c.state(),
            CircuitState::Closed,
            "an outcome from before the reset"
        );
    }
}
