//! Property test: random outcomes and time steps, the breaker against a simple reference
//! model of the same rules (evaluated after every recorded call, windows kept as plain
//! lists). Calls to other keys in between (`Op::Churn`) move the thread's cache past the
//! key's lane, so the breaker lets the lane go and makes a new one: its window must read
//! the same (calls, failures and slow calls compared after every step).

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::*;
use tokio::time::Instant;
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState};

#[derive(Debug, Clone, Copy)]
struct Params {
    /// Some(n): count window of n calls; None: time window.
    count: Option<u32>,
    time_len_ms: u64,
    buckets: u32,
    minimum: u32,
    rate: f64,
    slow_rate: Option<f64>,
    consecutive: Option<u32>,
    open_ms: u64,
    multiplier: f64,
    max_open_ms: u64,
    successes: u32,
}

const SLOW_MS: u64 = 1_000;

fn params() -> impl Strategy<Value = Params> {
    (
        prop_oneof![(1u32..9).prop_map(Some), Just(None)],
        (1u64..6).prop_map(|s| s * 1_000),
        1u32..6,
        1u32..9,
        prop_oneof![Just(0.2), Just(0.5), Just(1.0)],
        prop_oneof![Just(None), Just(Some(0.5)), Just(Some(1.0))],
        prop_oneof![Just(None), (1u32..4).prop_map(Some)],
        (1u64..5).prop_map(|s| s * 1_000),
        prop_oneof![Just(1.0), Just(2.0)],
        1u32..4,
    )
        .prop_map(
            |(
                count,
                time_len_ms,
                buckets,
                minimum,
                rate,
                slow_rate,
                consecutive,
                open_ms,
                multiplier,
                successes,
            )| {
                Params {
                    count,
                    time_len_ms,
                    buckets,
                    minimum: count.map_or(minimum, |n| minimum.min(n)),
                    rate,
                    slow_rate,
                    consecutive,
                    open_ms,
                    multiplier,
                    max_open_ms: open_ms * 3,
                    successes,
                }
            },
        )
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// 0 = 200, 1 = 500, 2 = 429; taking `ms`.
    Call(u8, u64),
    Advance(u64),
    /// One successful call to each of this many other keys.
    Churn(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, prop_oneof![Just(0u64), Just(400), Just(1_500)]).prop_map(|(o, ms)| Op::Call(o, ms)),
        1 => (1u64..4_000).prop_map(Op::Advance),
        1 => (1u8..40).prop_map(Op::Churn),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MState {
    Closed,
    Open { until: Duration },
    HalfOpen { successes: u32 },
}

/// The reference: the rules as written in the docs, nothing clever.
struct Model {
    p: Params,
    state: MState,
    /// (completion time, failure, slow) of the calls recorded since the last reset.
    calls: Vec<(Duration, bool, bool)>,
    consecutive: u32,
    reopens: u32,
}

impl Model {
    fn open_for(&self) -> Duration {
        let ms = self.p.open_ms as f64 * self.p.multiplier.powi(self.reopens as i32);
        Duration::from_millis((ms as u64).min(self.p.max_open_ms))
    }

    fn open(&mut self, now: Duration, from_half_open: bool) {
        self.reopens = if from_half_open { self.reopens + 1 } else { 0 };
        self.state = MState::Open {
            until: now + self.open_for(),
        };
        self.calls.clear();
        self.consecutive = 0;
    }

    /// Admission at `now`: None = rejected, Some(probe).
    fn admit(&mut self, now: Duration) -> Option<bool> {
        match self.state {
            MState::Closed => Some(false),
            MState::Open { until } if now < until => None,
            MState::Open { .. } => {
                self.state = MState::HalfOpen { successes: 0 };
                Some(true)
            }
            MState::HalfOpen { .. } => Some(true),
        }
    }

    fn record(&mut self, probe: bool, outcome: u8, took_ms: u64, now: Duration) {
        let slow = self.p.slow_rate.is_some() && took_ms > SLOW_MS;
        let failure = outcome == 1;
        if outcome == 2 {
            return; // ignored
        }
        if probe {
            let MState::HalfOpen { successes } = self.state else {
                unreachable!()
            };
            if failure || slow {
                self.open(now, true);
            } else if successes + 1 >= self.p.successes {
                self.state = MState::Closed;
                self.calls.clear();
                self.consecutive = 0;
                self.reopens = 0;
            } else {
                self.state = MState::HalfOpen {
                    successes: successes + 1,
                };
            }
            return;
        }
        self.calls.push((now, failure, slow));
        self.consecutive = if failure { self.consecutive + 1 } else { 0 };
        let (n, f, s) = self.window(now);
        let trip = self.p.consecutive.is_some_and(|k| self.consecutive >= k)
            || (n >= u64::from(self.p.minimum)
                && (f as f64 / n as f64 >= self.p.rate
                    || self.p.slow_rate.is_some_and(|r| s as f64 / n as f64 >= r)));
        if trip {
            self.open(now, false);
        }
    }

    /// (calls, failures, slow calls) in the window at `now`.
    fn window(&self, now: Duration) -> (u64, u64, u64) {
        let window: Vec<_> = match self.p.count {
            Some(n) => self.calls.iter().rev().take(n as usize).collect(),
            None => {
                let bucket =
                    (Duration::from_millis(self.p.time_len_ms) / self.p.buckets).as_nanos();
                let tick = now.as_nanos() / bucket;
                self.calls
                    .iter()
                    .filter(|c| c.0.as_nanos() / bucket + u128::from(self.p.buckets) > tick)
                    .collect()
            }
        };
        (
            window.len() as u64,
            window.iter().filter(|c| c.1).count() as u64,
            window.iter().filter(|c| c.2).count() as u64,
        )
    }

    fn public_state(&self) -> CircuitState {
        match self.state {
            MState::Closed => CircuitState::Closed,
            MState::Open { .. } => CircuitState::Open,
            MState::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

async fn run(p: Params, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut b = CircuitBreakerLayer::builder()
        .minimum_calls(p.minimum)
        .failure_rate(p.rate)
        .open_duration(Duration::from_millis(p.open_ms))
        .open_backoff(p.multiplier, Duration::from_millis(p.max_open_ms))
        .half_open_probes(1)
        .half_open_successes(p.successes);
    b = match p.count {
        Some(n) => b.count_window(n),
        None => b.time_window(Duration::from_millis(p.time_len_ms), p.buckets),
    };
    if let Some(r) = p.slow_rate {
        b = b.slow_calls(Duration::from_millis(SLOW_MS), r);
    }
    if let Some(k) = p.consecutive {
        b = b.consecutive_failures(k);
    }
    let r = rig(b);
    let t0 = Instant::now();
    let mut m = Model {
        p,
        state: MState::Closed,
        calls: Vec::new(),
        consecutive: 0,
        reopens: 0,
    };
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            Op::Churn(n) => {
                for k in 0..n {
                    prop_assert_eq!(r.call(&format!("other-{k}"), OK).await, Got::Status(200));
                }
            }
            Op::Call(outcome, ms) => {
                let start = Instant::now() - t0;
                let admitted = m.admit(start);
                let what = match outcome {
                    0 => Do::Late(200, ms),
                    1 => Do::Late(500, ms),
                    _ => Do::Late(429, ms),
                };
                let got = r.call("m", what).await;
                let end = Instant::now() - t0;
                prop_assert_eq!(
                    got == Got::Open,
                    admitted.is_none(),
                    "op {}: {:?} at {:?}, model {:?}",
                    i,
                    op,
                    start,
                    m.state
                );
                if let Some(probe) = admitted {
                    m.record(probe, outcome, ms, end);
                }
            }
        }
        prop_assert_eq!(r.state("m"), m.public_state(), "after op {}: {:?}", i, op);
        let key = r.handle.key_of(&req("m", OK)).unwrap();
        if let (MState::Closed, Some(got)) = (m.state, r.handle.metrics(key)) {
            let want = m.window(Instant::now() - t0);
            prop_assert_eq!(
                (got.calls, got.failures, got.slow_calls),
                want,
                "window after op {}: {:?}",
                i,
                op
            );
        }
        if let MState::Open { until } = m.state {
            prop_assert_eq!(r.handle.metrics(key).unwrap().open_until, Some(t0 + until));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn breaker_matches_the_reference_model(p in params(), ops in prop::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(p, ops))?;
    }
}
