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
use crate::window::{stripe_count, Bad, Calls, Stats};

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

#[derive(Debug)]
struct Inner {
    /// The lanes of the thread stripes that called this key, one per stripe, made on the
    /// stripe's first call ([`Core::lane`]): a count window's calls are their counters.
    /// Each is also owned while the key is in its registry ([`Core::detach`] lets go of
    /// them, a lane owning its breaker).
    lanes: Vec<(Weak<Lane>, Option<Arc<Lane>>)>,
    /// The window's failures and slow calls: made by the first one, let go when the
    /// window has none left (a breaker that only ever succeeded keeps none).
    bad: Option<Box<Bad>>,
    in_flight: u32,
    successes: u32,
    reopens: u32,
    opened: u64,
    /// With a shared store: a probe permit has been asked for and not answered yet.
    asking: bool,
    /// With a shared store: the probe permits the store granted this replica (half-open
    /// admits probes up to this many instead of `half_open_probes`).
    granted: u32,
    /// With a shared store that could not answer: probing on in-process permits.
    local_probes: bool,
    /// With a shared store: no permit is asked before this time (nanoseconds since the
    /// epoch), after the store said every permit was out.
    next_ask: u64,
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
}

impl Shared {
    pub(crate) fn new(
        cfg: Arc<CircuitBreakerConfig>,
        epoch: Instant,
        emitter: Emitter,
        sink: Option<BreakerSink>,
    ) -> Arc<Shared> {
        let bucket_nanos = match cfg.window {
            Window::Time { length, buckets } => u64::try_from((length / buckets).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            Window::Count { .. } => u64::MAX,
        };
        Arc::new(Shared {
            cfg,
            epoch,
            emitter,
            sink,
            bucket_nanos,
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
    open_until: AtomicU64,
    armed: AtomicBool,
    consecutive: AtomicU32,
    last_used: AtomicU64,
    /// Set by closed-state successes (which read no clock); turned into `last_used` by
    /// the registry's sweep.
    used: AtomicBool,
    pub(crate) evicted: AtomicBool,
    rejected: AtomicU64,
    calls: Calls,
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
            open_until: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            consecutive: AtomicU32::new(0),
            last_used: AtomicU64::new(0),
            used: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            calls: Calls::new(cfg.window, stripe_count()),
            inner: Mutex::new(Inner {
                lanes: Vec::new(),
                bad: None,
                in_flight: 0,
                successes: 0,
                reopens: 0,
                opened: 0,
                asking: false,
                granted: 0,
                local_probes: false,
                next_ask: 0,
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

    /// Thread stripe `stripe`'s lane to this breaker, made on the stripe's first call
    /// (the registry's lookup, off the hot path) and kept until [`detach`](Self::detach).
    pub(crate) fn lane(self: &Arc<Self>, stripe: usize) -> Arc<Lane> {
        let mut g = self.lock();
        if let Some(l) = g
            .lanes
            .iter()
            .find_map(|(_, l)| l.as_ref().filter(|l| l.stripe == stripe))
        {
            return l.clone();
        }
        let lane = Arc::new(Lane {
            core: self.clone(),
            stripe,
            calls: AtomicU64::new(0),
        });
        if g.lanes.capacity() == 0 {
            // Most keys are called from one thread: room for one lane, not four.
            g.lanes.reserve_exact(1);
        }
        g.lanes.push((Arc::downgrade(&lane), Some(lane.clone())));
        lane
    }

    /// Lets go of the lanes: the registry forgot this key. Lanes a call or a service
    /// still holds go on counting into it.
    pub(crate) fn detach(&self) {
        #[cfg(feature = "metrics")]
        crate::meter::forgotten(self, self.state());
        let kept: Vec<_> = self
            .lock()
            .lanes
            .iter_mut()
            .filter_map(|(_, l)| l.take())
            .collect();
        drop(kept); // after the lock: a lane's drop may drop a breaker
    }

    /// The lanes alive (a lane outlives its registry entry only while a call or a
    /// service holds it).
    fn live_lanes(g: &Inner) -> impl Iterator<Item = Arc<Lane>> + '_ {
        g.lanes.iter().filter_map(|(l, _)| l.upgrade())
    }

    /// Calls in the window at `tick`.
    fn total(&self, g: &Inner, tick: u64) -> u64 {
        self.calls.total(tick, || {
            Self::live_lanes(g)
                .map(|l| l.calls.load(Ordering::Relaxed))
                .sum()
        })
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
        let s = self.nanos(now) / 1_000_000_000 + 1;
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
        self.last_used.load(Ordering::Relaxed)
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
        let w = self.state.load(Ordering::Acquire);
        let decision = match w & 7 {
            FORCED_OPEN => Admit::Reject {
                until: now + FORCED_UNTIL,
            },
            OPEN if self.nanos(now) < self.open_until.load(Ordering::Acquire) => Admit::Reject {
                until: self.instant(self.open_until.load(Ordering::Acquire)),
            },
            _ => {
                let mut g = self.lock();
                let mut w = self.state.load(Ordering::Acquire);
                let mut change = None;
                // With a shared store, probes need the store's permits (unless it could
                // not answer): an ended open duration asks for one, and refuses until it
                // comes (a half-open breaker refuses, not queues, calls beyond its
                // permits).
                let shared = self.shared.sink.is_some() && !g.local_probes;
                let can_ask = !g.asking && self.nanos(now) >= g.next_ask;
                let mut ask = false;
                if w & 7 == OPEN && self.nanos(now) >= self.open_until.load(Ordering::Acquire) {
                    if shared {
                        ask = can_ask;
                    } else {
                        change = Some(self.half_open_locked(&mut g, now));
                        // With a store, probing without it (it could not be reached).
                        g.local_probes = self.shared.sink.is_some();
                        w = self.state.load(Ordering::Acquire);
                    }
                }
                let permits = if shared {
                    g.granted
                } else {
                    self.shared.cfg.half_open_probes
                };
                if shared
                    && w & 7 == HALF_OPEN
                    && g.in_flight >= g.granted
                    && g.granted < self.shared.cfg.half_open_probes
                {
                    ask = can_ask;
                }
                if ask {
                    g.asking = true;
                }
                let d = match w & 7 {
                    // Open, its duration ended, waiting for the store's permit.
                    OPEN if shared => Admit::Reject {
                        until: self
                            .instant(self.open_until.load(Ordering::Acquire))
                            .max(now),
                    },
                    HALF_OPEN if g.in_flight < permits => {
                        g.in_flight += 1;
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
                        until: self.instant(self.open_until.load(Ordering::Acquire)),
                    },
                    FORCED_OPEN => Admit::Reject {
                        until: now + FORCED_UNTIL,
                    },
                    // Half-open with every probe out: a permit frees when one completes.
                    _ => Admit::Reject { until: now },
                };
                drop(g);
                if let Some(c) = change {
                    self.announce(c);
                }
                if ask {
                    self.ask_probe();
                }
                d
            }
        };
        self.touch(now);
        if let Admit::Reject { until } = decision {
            self.rejected.fetch_add(1, Ordering::Relaxed);
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
        let Calls::Count = &self.calls else {
            return self.record(lane, word, false, Verdict::Success, false, None);
        };
        self.mark_used();
        if self.state.load(Ordering::Acquire) != word {
            return; // admitted under an earlier state: says nothing about this one
        }
        if self.counts_consecutive && self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        lane.calls.fetch_add(1, Ordering::Relaxed);
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
            added = self.calls.try_add(&lane.calls, lane.stripe, tick);
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
            self.calls.add_locked(&lane.calls, lane.stripe, tick);
        }
        if failure || slow {
            let at = match self.shared.cfg.window {
                Window::Count { .. } => self.total(&g, tick),
                Window::Time { .. } => tick,
            };
            let window = self.shared.cfg.window;
            g.bad
                .get_or_insert_with(|| Box::new(Bad::new(window)))
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
        let calls = self.total(&g, tick);
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
        g.in_flight = g.in_flight.saturating_sub(1);
        // On a permit of the shared store, the store counts the successes of every
        // replica and closes (its answer closes this breaker); a failure opens here and
        // is shared as any opening is.
        let shared = self.shared.sink.is_some() && !g.local_probes;
        if shared {
            g.granted = g.granted.saturating_sub(1);
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
                g.successes += 1;
                if shared {
                    report = Some(true);
                    None
                } else {
                    (g.successes >= self.shared.cfg.half_open_successes)
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
            g.asking = false;
            return; // the handle's word wins over the replicas'
        }
        let mut give_back = false;
        let change = match state {
            SharedState::Granted => {
                g.asking = false;
                match code {
                    OPEN if self.nanos(now) >= self.open_until.load(Ordering::Acquire) => {
                        let c = self.half_open_locked(&mut g, now);
                        g.granted = 1;
                        Some(c)
                    }
                    HALF_OPEN if !g.local_probes => {
                        g.granted += 1;
                        None
                    }
                    _ => {
                        give_back = true;
                        None
                    }
                }
            }
            SharedState::Busy(retry) => {
                g.asking = false;
                // Other replicas hold every permit: look again later, not at every call.
                let at = now.checked_add(retry).unwrap_or(now);
                g.next_ask = self.nanos(at);
                if code == OPEN {
                    self.open_until.fetch_max(self.nanos(at), Ordering::AcqRel);
                }
                None
            }
            SharedState::Open(left) => {
                g.asking = false;
                let until = now.checked_add(left).unwrap_or(now);
                match code {
                    OPEN => {
                        self.open_until
                            .fetch_max(self.nanos(until), Ordering::AcqRel);
                        None
                    }
                    _ if left.is_zero() => None,
                    _ => Some(self.open_shared_locked(&mut g, now, until)),
                }
            }
            SharedState::Closed => {
                g.asking = false;
                match code {
                    OPEN | HALF_OPEN => {
                        Some(self.close_locked(&mut g, now, TransitionReason::Shared))
                    }
                    _ => None,
                }
            }
            SharedState::HalfOpen => None,
            SharedState::Unavailable => {
                g.asking = false;
                match code {
                    // Decided in-process: probe on this replica's own permits.
                    OPEN if self.nanos(now) >= self.open_until.load(Ordering::Acquire) => {
                        let c = self.half_open_locked(&mut g, now);
                        g.local_probes = true;
                        Some(c)
                    }
                    // The opening could not be shared: the store does not know it, so it
                    // would answer "closed" at its end; this replica probes on its own.
                    OPEN => {
                        g.local_probes = true;
                        None
                    }
                    HALF_OPEN => {
                        g.local_probes = true;
                        (g.successes >= self.shared.cfg.half_open_successes).then(|| {
                            self.close_locked(&mut g, now, TransitionReason::ProbesSucceeded)
                        })
                    }
                    _ => None,
                }
            }
        };
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
        self.open_until.store(self.nanos(until), Ordering::Release);
        self.reset_window(g);
        g.in_flight = 0;
        g.successes = 0;
        g.granted = 0;
        g.local_probes = false;
        g.next_ask = 0;
        g.opened += 1;
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
            g.in_flight = g.in_flight.saturating_sub(1);
            if self.shared.sink.is_some() && !g.local_probes {
                g.granted = g.granted.saturating_sub(1);
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
        let Some(bad) = g.bad.as_mut() else {
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
        if st.failures == 0 && st.slow == 0 && bad.is_empty() {
            g.bad = None;
        }
        st
    }

    fn reset_window(&self, g: &mut Inner) {
        self.calls
            .reset(|| Self::live_lanes(g).for_each(|l| l.calls.store(0, Ordering::Relaxed)));
        g.bad = None;
        self.consecutive.store(0, Ordering::Relaxed);
        self.armed.store(false, Ordering::Relaxed);
    }

    fn open_locked(&self, g: &mut Inner, now: Instant, reason: TransitionReason) -> Change {
        let from_half_open = self.state.load(Ordering::Acquire) & 7 == HALF_OPEN;
        g.reopens = if from_half_open {
            g.reopens.saturating_add(1)
        } else {
            0
        };
        // At most 7 days (the config's bound), so the sum fits any clock; checked all
        // the same, so no configuration can make a trip panic.
        let until = now
            .checked_add(self.shared.cfg.open_duration_after(g.reopens))
            .unwrap_or(now);
        self.open_until.store(self.nanos(until), Ordering::Release);
        self.reset_window(g);
        g.in_flight = 0;
        g.successes = 0;
        g.granted = 0;
        g.local_probes = false;
        g.next_ask = 0;
        g.opened += 1;
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
        g.in_flight = 0;
        g.successes = 0;
        g.granted = 0;
        g.local_probes = false;
        g.next_ask = 0;
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
        g.reopens = 0;
        g.in_flight = 0;
        g.successes = 0;
        g.granted = 0;
        g.local_probes = false;
        g.next_ask = 0;
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
                g.in_flight = 0;
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
                g.in_flight = 0;
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
            OPEN => self.nanos(now) >= self.open_until.load(Ordering::Acquire),
            _ => self.lock().in_flight < self.shared.cfg.half_open_probes,
        }
    }

    /// When an open breaker starts probing.
    pub(crate) fn open_until(&self) -> Option<Instant> {
        match self.state.load(Ordering::Acquire) & 7 {
            OPEN => Some(self.instant(self.open_until.load(Ordering::Acquire))),
            _ => None,
        }
    }

    pub(crate) fn metrics(&self, now: Instant) -> Metrics {
        let mut g = self.lock();
        let tick = self.tick(self.nanos(now));
        let calls = self.total(&g, tick);
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
            open_until: self.open_until(),
            probes_in_flight: g.in_flight,
            times_opened: g.opened,
            rejected: self.rejected.load(Ordering::Relaxed),
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
        let cfg = CircuitBreakerConfig::builder()
            .count_window(4)
            .minimum_calls(4)
            .failure_rate(0.5)
            .build()
            .unwrap();
        let (lane, _) = core(cfg, t0);
        let c = &lane.core;
        let bad = || c.lock().bad.is_some();
        assert!(call(&lane, t0, Verdict::Success));
        assert!(!bad(), "successes alone record no bad call");
        assert_eq!(c.lock().lanes.capacity(), 1, "one lane, room for one");
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

    #[test]
    fn full_cycle_without_tower() {
        let t0 = Instant::now();
        let cfg = CircuitBreakerConfig::builder()
            .count_window(4)
            .minimum_calls(4)
            .failure_rate(0.5)
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
