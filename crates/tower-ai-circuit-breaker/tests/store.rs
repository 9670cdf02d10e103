//! The store seam on a paused clock, with an in-memory shared state standing in for Redis
//! (answering at once through the sink): two layers (two replicas) share a breaker.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::ServiceExt;
use tower_ai_circuit_breaker::store::{BreakerSink, BreakerStore, SharedState};
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState, TransitionReason};
use tower_ai_core::keys::Key;

use support::{rig, Do, Got, Rig, FAIL, OK};

#[derive(Debug, Clone, Copy)]
enum St {
    Open(Instant),
    Half { permits: u32, successes: u32 },
}

#[derive(Debug, Default)]
struct State {
    states: HashMap<String, St>,
    tracked: HashMap<String, Vec<(Key, BreakerSink)>>,
    most_permits: u32,
    probes_asked: u32,
    down: bool,
}

#[derive(Debug, Clone, Default)]
struct Memory(Arc<Mutex<State>>);

impl Memory {
    /// Answers with `f`'s state, after the lock is let go.
    fn answer(&self, key: Key, sink: &BreakerSink, f: impl FnOnce(&mut State) -> SharedState) {
        let state = {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.down {
                SharedState::Unavailable
            } else {
                f(&mut s)
            }
        };
        sink.apply(key, state);
    }
}

impl BreakerStore for Memory {
    fn opened(&self, key: Key, label: &str, open_for: Duration, sink: &BreakerSink) {
        let targets = {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.down {
                drop(s);
                sink.apply(key, SharedState::Unavailable);
                return;
            }
            let until = Instant::now() + open_for;
            let until = match s.states.get(label) {
                Some(St::Open(u)) => until.max(*u),
                _ => until,
            };
            s.states.insert(label.to_owned(), St::Open(until));
            s.tracked.get(label).cloned().unwrap_or_default()
        };
        // Pushed to every replica at once (Redis: at the next refresh).
        for (k, sink) in targets {
            sink.apply(k, SharedState::Open(open_for));
        }
    }

    fn probe(&self, key: Key, label: &str, max: u32, sink: &BreakerSink) {
        self.answer(key, sink, |s| {
            s.probes_asked += 1;
            let now = Instant::now();
            let st = match s.states.get(label).copied() {
                None => return SharedState::Closed,
                Some(St::Open(u)) if now < u => return SharedState::Open(u - now),
                Some(St::Open(_)) => St::Half {
                    permits: 0,
                    successes: 0,
                },
                Some(half) => half,
            };
            let St::Half { permits, successes } = st else {
                unreachable!()
            };
            if permits >= max {
                s.states.insert(label.to_owned(), st);
                return SharedState::Busy(Duration::from_millis(50));
            }
            s.most_permits = s.most_permits.max(permits + 1);
            s.states.insert(
                label.to_owned(),
                St::Half {
                    permits: permits + 1,
                    successes,
                },
            );
            SharedState::Granted
        });
    }

    fn probe_done(&self, key: Key, label: &str, success: bool, needed: u32, sink: &BreakerSink) {
        self.answer(key, sink, |s| match s.states.get(label).copied() {
            None => SharedState::Closed,
            Some(St::Open(u)) => SharedState::Open(u.saturating_duration_since(Instant::now())),
            Some(St::Half { permits, successes }) => {
                let successes = successes + u32::from(success);
                if successes >= needed {
                    s.states.remove(label);
                    return SharedState::Closed;
                }
                s.states.insert(
                    label.to_owned(),
                    St::Half {
                        permits: permits.saturating_sub(1),
                        successes,
                    },
                );
                SharedState::HalfOpen
            }
        });
    }

    fn track(&self, key: Key, label: &str, sink: &BreakerSink) {
        self.0
            .lock()
            .unwrap()
            .tracked
            .entry(label.to_owned())
            .or_default()
            .push((key, sink.clone()));
    }
}

fn replica(store: &Memory) -> Rig {
    rig(CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(10))
        .half_open_probes(1)
        .half_open_successes(1)
        .store(store.clone()))
}

#[tokio::test(start_paused = true)]
async fn an_opening_is_shared_and_one_probe_across_replicas_closes_both() {
    let store = Memory::default();
    let (a, b) = (replica(&store), replica(&store));
    assert_eq!(b.call("m", OK).await, Got::Status(200)); // b tracks the key
    assert_eq!(a.call("m", FAIL).await, Got::Status(500));
    assert_eq!(a.state("m"), CircuitState::Open);
    // b opened from the shared state, without a call to the provider.
    assert_eq!(b.state("m"), CircuitState::Open);
    assert_eq!(b.reasons(), [TransitionReason::Shared]);
    let hits = b.hits();
    assert_eq!(b.call("m", OK).await, Got::Open);
    assert_eq!(b.hits(), hits);

    tokio::time::advance(Duration::from_secs(10)).await;
    // a's open period ends: it asks for the permit (granted at once here, so its call
    // still finds the permit asked, not yet held: refused), then probes.
    assert_eq!(a.call("m", OK).await, Got::Open);
    assert_eq!(a.state("m"), CircuitState::HalfOpen);
    // b finds the only permit taken: refused, and told to look again in 50 ms.
    assert_eq!(b.call("m", OK).await, Got::Open);
    assert_eq!(b.state("m"), CircuitState::Open);
    // a's probe succeeds: the store closes, and a with it.
    assert_eq!(a.call("m", OK).await, Got::Status(200));
    assert_eq!(a.state("m"), CircuitState::Closed);
    // b asks again, finds it closed.
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(b.call("m", OK).await, Got::Open);
    assert_eq!(b.state("m"), CircuitState::Closed);
    assert_eq!(b.call("m", OK).await, Got::Status(200));
    assert_eq!(
        store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .most_permits,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_that_is_down_is_decided_around() {
    let store = Memory::default();
    let a = replica(&store);
    assert_eq!(a.call("m", FAIL).await, Got::Status(500));
    store.0.lock().unwrap_or_else(|e| e.into_inner()).down = true;
    tokio::time::advance(Duration::from_secs(10)).await;
    // The permit cannot be asked: half-open on the replica's own permits.
    assert_eq!(a.call("m", OK).await, Got::Open);
    assert_eq!(a.state("m"), CircuitState::HalfOpen);
    assert_eq!(a.call("m", OK).await, Got::Status(200));
    assert_eq!(a.state("m"), CircuitState::Closed);
}

fn replica_with(store: &Memory, probes: u32) -> Rig {
    rig(CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(10))
        .half_open_probes(probes)
        .half_open_successes(1)
        .store(store.clone()))
}

#[tokio::test(start_paused = true)]
async fn a_busy_answer_is_not_asked_again_at_every_call() {
    let store = Memory::default();
    let (a, b) = (replica_with(&store, 2), replica_with(&store, 2));
    assert_eq!(b.call("m", OK).await, Got::Status(200));
    assert_eq!(a.call("m", FAIL).await, Got::Status(500));
    tokio::time::advance(Duration::from_secs(10)).await;
    // One permit each, each probe in flight for 1 s.
    let slow = Do::Late(200, 1_000);
    assert_eq!(a.call("m", OK).await, Got::Open);
    let mut pa = tokio_test::task::spawn(a.svc.clone().oneshot(support::req("m", slow)));
    assert!(pa.poll().is_pending());
    assert_eq!(b.call("m", OK).await, Got::Open);
    let mut pb = tokio_test::task::spawn(b.svc.clone().oneshot(support::req("m", slow)));
    assert!(pb.poll().is_pending());
    assert_eq!(
        store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .probes_asked,
        2
    );
    // b wants a second permit: told both are out, it does not ask again before 50 ms.
    for _ in 0..5 {
        assert_eq!(b.call("m", OK).await, Got::Open);
    }
    assert_eq!(
        store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .probes_asked,
        3
    );
    assert_eq!(
        store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .most_permits,
        2
    );
    drop((pa, pb));
}

#[tokio::test(start_paused = true)]
async fn an_opening_the_store_never_knew_is_probed_in_process() {
    let store = Memory::default();
    let a = replica(&store);
    store.0.lock().unwrap_or_else(|e| e.into_inner()).down = true;
    assert_eq!(a.call("m", FAIL).await, Got::Status(500));
    store.0.lock().unwrap_or_else(|e| e.into_inner()).down = false;
    tokio::time::advance(Duration::from_secs(10)).await;
    // The store, which never heard of the opening, would say "closed": the breaker
    // probes on its own instead of closing without a probe.
    assert_eq!(a.call("m", FAIL).await, Got::Status(500));
    assert_eq!(a.state("m"), CircuitState::Open);
    assert_eq!(
        store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .probes_asked,
        0
    );
}
