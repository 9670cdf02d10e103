//! Every transition on a paused clock, through the Tower service.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::{advance, Instant};
use tower::{Service, ServiceExt};
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState, Metrics, TransitionReason};
use tower_ai_core::{AiError, ErrorKind};

use CircuitState::*;

fn base() -> tower_ai_circuit_breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(Duration::from_secs(10))
        .half_open_successes(2)
}

async fn trip(r: &Rig, model: &str) {
    for _ in 0..5 {
        assert_eq!(r.call(model, FAIL).await, Got::Status(500));
    }
    assert_eq!(r.state(model), Open);
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_by_failure_rate_after_minimum_calls() {
    let r = rig(base());
    for what in [OK, FAIL, FAIL, OK] {
        r.call("a", what).await;
    }
    // 2 of 4 failed (50 %) but the window holds fewer than 5 calls.
    assert_eq!(r.state("a"), Closed);
    let m: Metrics = r
        .handle
        .metrics(r.handle.key_of(&req("a", OK)).unwrap())
        .unwrap();
    assert_eq!((m.calls, m.failures), (4, 2));
    assert_eq!(m.failure_rate(), Some(0.5));
    // The fifth call is a success: 2/5 = 40 %, still closed; a failure then makes 3/6.
    r.call("a", OK).await;
    assert_eq!(r.state("a"), Closed);
    r.call("a", FAIL).await;
    assert_eq!(r.state("a"), Open);
    let hits = r.hits();
    assert_eq!(r.call("a", OK).await, Got::Open);
    assert_eq!(r.hits(), hits, "a refused call must not reach the provider");
    assert_eq!(r.transitions(), [(Closed, Open)]);
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_is_reached_by_a_success() {
    // Failures before the minimum, then the success that reaches it finds 4/5 = 80 %.
    let r = rig(base());
    for _ in 0..4 {
        r.call("a", FAIL).await;
    }
    assert_eq!(r.state("a"), Closed, "4 calls < minimum 5");
    r.call("a", OK).await;
    assert_eq!(r.state("a"), Open);
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_by_slow_call_rate() {
    let r = rig(base().slow_calls(Duration::from_secs(20), 0.6));
    for _ in 0..2 {
        assert_eq!(r.call("a", Do::Late(200, 25_000)).await, Got::Status(200));
    }
    // exactly the threshold is not slow
    r.call("a", Do::Late(200, 20_000)).await;
    r.call("a", OK).await;
    assert_eq!(r.state("a"), Closed);
    r.call("a", Do::Late(200, 21_000)).await; // 3 slow of 5 = 60 %
    assert_eq!(r.state("a"), Open);
    assert_eq!(
        r.reasons(),
        [TransitionReason::SlowCallRate {
            rate: 0.6,
            calls: 5
        }]
    );
    let m = r.handle.all_metrics();
    assert_eq!(m[0].times_opened, 1);
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_by_consecutive_failures() {
    let r = rig(base()
        .failure_rate(1.0)
        .minimum_calls(10)
        .consecutive_failures(3));
    for what in [FAIL, FAIL, OK, FAIL, FAIL, LIMITED] {
        r.call("a", what).await;
    }
    // a 429 between failures neither counts nor breaks the run
    assert_eq!(r.state("a"), Closed);
    r.call("a", Do::Reset).await; // a connection reset is a failure too
    assert_eq!(r.state("a"), Open);
    assert_eq!(r.reasons(), [TransitionReason::ConsecutiveFailures(3)]);
}

#[tokio::test(start_paused = true)]
async fn rate_limits_and_client_errors_never_trip_it() {
    let r = rig(base().consecutive_failures(2));
    for what in [
        LIMITED,
        Do::Status(400),
        Do::Status(401),
        Do::Status(404),
        LIMITED,
    ] {
        for _ in 0..20 {
            r.call("a", what).await;
        }
    }
    assert_eq!(r.state("a"), Closed);
    assert_eq!(r.hits(), 100);
    let m = r.handle.all_metrics();
    assert_eq!(m[0].calls, 0, "ignored outcomes are not calls");
}

#[tokio::test(start_paused = true)]
async fn open_to_half_open_after_the_duration_then_closed() {
    let r = rig(base());
    trip(&r, "a").await;
    let key = r.handle.key_of(&req("a", OK)).unwrap();
    let until = r.handle.metrics(key).unwrap().open_until.unwrap();
    assert_eq!(until - Instant::now(), Duration::from_secs(10));
    match r.svc.clone().oneshot(req("a", OK)).await {
        Err(e) => match e.downcast_ref::<AiError>() {
            Some(AiError::CircuitOpen { key, until: u }) => {
                assert_eq!(key, "api.openai.com/a");
                assert_eq!(*u, until);
                assert_eq!(
                    e.downcast_ref::<AiError>().unwrap().kind(),
                    ErrorKind::Overloaded
                );
            }
            other => panic!("{other:?}"),
        },
        Ok(_) => panic!("admitted while open"),
    }
    advance(Duration::from_millis(9_999)).await;
    assert!(r.handle.is_open(key));
    assert_eq!(r.call("a", OK).await, Got::Open, "not yet");
    advance(Duration::from_millis(1)).await;
    assert!(!r.handle.is_open(key), "due to probe");
    let hits = r.hits();
    assert_eq!(r.call("a", OK).await, Got::Status(200), "now");
    assert_eq!(r.state("a"), HalfOpen);
    assert_eq!(r.call("a", OK).await, Got::Status(200));
    assert_eq!(r.state("a"), Closed, "two successful probes close it");
    assert_eq!(r.hits(), hits + 2);
    assert_eq!(
        r.transitions(),
        [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
    );
    // closing starts an empty window
    let m = r.handle.metrics(key).unwrap();
    assert_eq!((m.calls, m.failures), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn half_open_failure_reopens_for_longer_up_to_the_cap() {
    let r = rig(base().open_backoff(3.0, Duration::from_secs(60)));
    trip(&r, "a").await;
    let key = r.handle.key_of(&req("a", OK)).unwrap();
    for want in [30, 60, 60] {
        let until = r.handle.metrics(key).unwrap().open_until.unwrap();
        tokio::time::sleep_until(until).await;
        assert_eq!(r.call("a", Do::Status(529)).await, Got::Status(529));
        assert_eq!(r.state("a"), Open);
        let next = r.handle.metrics(key).unwrap().open_until.unwrap();
        assert_eq!(next - Instant::now(), Duration::from_secs(want));
    }
    // after a close the duration starts again from the base
    tokio::time::sleep(Duration::from_secs(60)).await;
    r.call("a", OK).await;
    r.call("a", OK).await;
    assert_eq!(r.state("a"), Closed);
    trip(&r, "a").await;
    let until = r.handle.metrics(key).unwrap().open_until.unwrap();
    assert_eq!(until - Instant::now(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_a_bounded_number_of_probes_and_rejects_the_rest() {
    let r = rig(base().half_open_probes(2).half_open_successes(2));
    trip(&r, "a").await;
    advance(Duration::from_secs(10)).await;
    let hits = r.hits();
    let mut p1 = tokio_test::task::spawn(r.svc.clone().oneshot(req("a", Do::Late(200, 1_000))));
    let mut p2 = tokio_test::task::spawn(r.svc.clone().oneshot(req("a", Do::Late(200, 1_000))));
    tokio_test::assert_pending!(p1.poll());
    tokio_test::assert_pending!(p2.poll());
    // a third is refused at once, not queued
    assert_eq!(r.call("a", OK).await, Got::Open);
    assert_eq!(r.hits(), hits + 2);
    // a probe dropped before it completes gives its permit back
    drop(p2);
    assert_eq!(r.call("a", OK).await, Got::Status(200));
    assert_eq!(r.state("a"), HalfOpen, "one success of two");
    advance(Duration::from_secs(1)).await;
    assert!(p1.await.is_ok());
    assert_eq!(r.state("a"), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_429_probe_neither_closes_nor_reopens() {
    let r = rig(base().half_open_successes(1));
    trip(&r, "a").await;
    advance(Duration::from_secs(10)).await;
    assert_eq!(r.call("a", LIMITED).await, Got::Status(429));
    assert_eq!(r.state("a"), HalfOpen);
    assert_eq!(r.call("a", OK).await, Got::Status(200));
    assert_eq!(r.state("a"), Closed);
}

#[tokio::test(start_paused = true)]
async fn keys_are_isolated() {
    let r = rig(base());
    trip(&r, "a").await;
    for _ in 0..20 {
        assert_eq!(r.call("b", OK).await, Got::Status(200));
    }
    assert_eq!(r.call("a", OK).await, Got::Open);
    assert_eq!(r.state("b"), Closed);
    assert_eq!(r.handle.key_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let r = rig(base().time_window(Duration::from_secs(10), 10));
    for _ in 0..4 {
        r.call("a", FAIL).await;
    }
    // 11 s later those failures have left the window: 1 failure of 5 calls
    advance(Duration::from_secs(11)).await;
    for what in [FAIL, OK, OK, OK, OK] {
        r.call("a", what).await;
    }
    assert_eq!(r.state("a"), Closed);
    // within 10 s, 3 more failures: 4 of 8
    for _ in 0..3 {
        r.call("a", FAIL).await;
    }
    assert_eq!(r.state("a"), Open);
}

#[tokio::test(start_paused = true)]
async fn a_call_admitted_before_opening_does_not_count_after() {
    let r = rig(base().consecutive_failures(1).half_open_successes(1));
    let late = tokio::spawn(r.svc.clone().oneshot(req("a", Do::Late(500, 20_000))));
    tokio::task::yield_now().await;
    r.call("a", FAIL).await;
    assert_eq!(r.state("a"), Open);
    advance(Duration::from_secs(10)).await;
    assert_eq!(r.call("a", OK).await, Got::Status(200));
    assert_eq!(r.state("a"), Closed);
    // the slow failure admitted under the first closed period completes now
    assert_eq!(late.await.unwrap().unwrap().status(), 500);
    assert_eq!(r.state("a"), Closed);
}

#[tokio::test(start_paused = true)]
async fn handle_forces_and_resets() {
    let r = rig(base());
    let key = r.handle.key_of(&req("a", OK)).unwrap();
    r.handle.force_open(key);
    assert!(r.handle.is_open(key));
    assert_eq!(r.call("a", OK).await, Got::Open);
    assert_eq!(r.hits(), 0);
    r.handle.force_closed(key);
    for _ in 0..20 {
        r.call("a", FAIL).await;
    }
    assert_eq!(r.state("a"), ForcedClosed, "forced closed never trips");
    r.handle.reset(key);
    assert_eq!(r.state("a"), Closed);
    trip(&r, "a").await;
    r.handle.reset_all();
    assert_eq!(r.call("a", OK).await, Got::Status(200));
    assert_eq!(
        r.transitions(),
        [
            (Closed, ForcedOpen),
            (ForcedOpen, ForcedClosed),
            (ForcedClosed, Closed),
            (Closed, Open),
            (Open, Closed)
        ]
    );
    assert!(r.handle.forget(key));
    assert_eq!(r.handle.key_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_passes_ungated() {
    let layer = CircuitBreakerLayer::builder()
        .key_fn(|r: &http::Request<String>| {
            (r.uri().path() != "/health").then(|| tower_ai_core::keys::Key::of("k"))
        })
        .consecutive_failures(1)
        .build()
        .unwrap();
    let (inner, hits) = provider();
    let mut svc = tower::Layer::layer(&layer, inner);
    let mut health = req("a", FAIL);
    *health.uri_mut() = "http://x/health".parse().unwrap();
    let res = svc.ready().await.unwrap().call(health).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(layer.handle().key_count(), 0);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
