//! Every layer's metrics (feature `metrics`), after scripted scenarios against the
//! simulator in-process on a paused clock, read from `metrics-util`'s debugging
//! recorder: each metric's name, type, unit and labels, and its value.
#![cfg(feature = "metrics")]

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_ai::budget::TokenBudgetLayer;
use tower_ai::circuit_breaker::{CircuitBreakerLayer, CircuitEvent, CircuitState};
use tower_ai::core::keys::Key;
use tower_ai::core::meter::{metrics, MAX_KEY_LABELS, OTHER, WAIT_BUCKETS};
use tower_ai::fallback::{FallbackChain, Route};
use tower_ai::prelude::*;
use tower_ai::retry_after::RetryAfterAwareLayer;
use tower_ai_sim::{Fault, Latency, ModelSpec, Scenario, Simulator, StreamFault};

/// One recorded series: kind, name, labels (sorted), unit, value.
#[derive(Debug, PartialEq)]
struct Series {
    kind: MetricKind,
    name: String,
    labels: Vec<(String, String)>,
    unit: Option<metrics::Unit>,
    value: DebugValue,
}

fn snapshot(s: &Snapshotter) -> Vec<Series> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, unit, _, value)| {
            let (kind, key) = ck.into_parts();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            Series {
                kind,
                name: key.name().to_owned(),
                labels,
                unit,
                value,
            }
        })
        .collect()
}

/// The series named `name` with exactly these labels.
fn find<'a>(all: &'a [Series], name: &str, labels: &[(&str, &str)]) -> Option<&'a Series> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    all.iter().find(|s| s.name == name && s.labels == want)
}

#[track_caller]
fn counter(all: &[Series], name: &str, labels: &[(&str, &str)]) -> u64 {
    let s = find(all, name, labels)
        .unwrap_or_else(|| panic!("no counter {name} {labels:?} in {all:#?}"));
    assert_eq!(s.kind, MetricKind::Counter, "{name}");
    assert_eq!(s.unit, Some(metrics::Unit::Count), "{name}'s unit");
    match s.value {
        DebugValue::Counter(n) => n,
        ref v => panic!("{name}: {v:?}"),
    }
}

#[track_caller]
fn gauge(all: &[Series], name: &str, labels: &[(&str, &str)]) -> f64 {
    let s =
        find(all, name, labels).unwrap_or_else(|| panic!("no gauge {name} {labels:?} in {all:#?}"));
    assert_eq!(s.kind, MetricKind::Gauge, "{name}");
    match s.value {
        DebugValue::Gauge(v) => v.into_inner(),
        ref v => panic!("{name}: {v:?}"),
    }
}

#[track_caller]
fn histogram(all: &[Series], name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let s = find(all, name, labels)
        .unwrap_or_else(|| panic!("no histogram {name} {labels:?} in {all:#?}"));
    assert_eq!(s.kind, MetricKind::Histogram, "{name}");
    assert_eq!(s.unit, Some(metrics::Unit::Seconds), "{name}'s unit");
    match &s.value {
        DebugValue::Histogram(v) => v.iter().map(|f| f.into_inner()).collect(),
        v => panic!("{name}: {v:?}"),
    }
}

/// A recorder for this test's thread (the paused runtime runs every task on it), with
/// the layers' descriptions (units) given to it.
fn recorder() -> (DebuggingRecorder, Snapshotter) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    (recorder, snapshotter)
}

fn chat(model: &str, stream: bool) -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(format!(
            r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Hi"}}]}}"#
        )))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_429_then_200_records_one_retry_waiting_on_retry_after() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    tower_ai::describe_metrics();
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-4o"))
            .fault(
                Fault::status(429)
                    .retry_after(Duration::from_secs(2))
                    .between(Duration::ZERO, Duration::from_millis(500)),
            )
            .build()
            .unwrap(),
    );
    let svc = AiStack::seeded(1).layer(sim.service());
    let res = svc.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(sim.calls().len(), 2);

    let all = snapshot(&snap);
    let retries = [
        ("error_type", "rate_limited"),
        ("wait_source", "retry-after"),
    ];
    assert_eq!(counter(&all, "tower_ai.retry.retries", &retries), 1);
    assert_eq!(
        histogram(
            &all,
            "tower_ai.retry.wait",
            &[("wait_source", "retry-after")]
        ),
        [2.0]
    );
    assert_eq!(
        counter(
            &all,
            "tower_ai.retry.calls",
            &[("outcome", "success"), ("retried", "true")]
        ),
        1
    );
    assert_eq!(counter(&all, "tower_ai.retry.attempts", &[]), 2);
    // RetryAfterAware learned the provider's wait from the 429.
    assert_eq!(counter(&all, "tower_ai.retry_after.cooldowns", &[]), 1);
    // Nothing else retried, nothing was refused.
    assert!(all
        .iter()
        .filter(|s| s.name == "tower_ai.retry.retries")
        .all(|s| s
            .labels
            .contains(&("wait_source".into(), "retry-after".into()))));
    assert!(all.iter().all(|s| !s.name.contains("refus")), "{all:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_tripped_breaker_moves_its_gauge_and_counts_one_transition() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    tower_ai::describe_metrics();
    let sim = Simulator::new(
        Scenario::builder()
            .fault(Fault::status(500))
            .build()
            .unwrap(),
    );
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = layer.handle();
    // Two subscribers at run time, each sees the change.
    let mut first = handle.subscribe();
    let mut second = handle.subscribe();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(sim.service());
    for _ in 0..2 {
        let res = svc.clone().oneshot(chat("gpt-4o", false)).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    let err = svc
        .clone()
        .oneshot(chat("gpt-4o", false))
        .await
        .unwrap_err();
    assert!(
        matches!(AiError::find(&*err), Some(AiError::CircuitOpen { .. })),
        "{err}"
    );

    for rx in [&mut first, &mut second] {
        match rx.try_recv().unwrap() {
            CircuitEvent::StateChanged {
                from, to, label, ..
            } => {
                assert_eq!((from, to), (CircuitState::Closed, CircuitState::Open));
                assert_eq!(&*label, "api.openai.com/gpt-4o");
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one change, rejections not sent");
    }
    // The snapshot a health endpoint serves.
    let states: Vec<_> = handle
        .all_metrics()
        .into_iter()
        .map(|m| (m.label.to_string(), m.state))
        .collect();
    assert_eq!(
        states,
        [("api.openai.com/gpt-4o".to_owned(), CircuitState::Open)]
    );

    let all = snapshot(&snap);
    let key = ("key", "api.openai.com/gpt-4o");
    let state = "tower_ai.circuit_breaker.state";
    assert_eq!(gauge(&all, state, &[key, ("state", "open")]), 1.0);
    assert_eq!(gauge(&all, state, &[key, ("state", "closed")]), 0.0);
    let gauge_unit = find(&all, state, &[key, ("state", "open")]).unwrap().unit;
    assert_eq!(gauge_unit, Some(metrics::Unit::Count));
    assert_eq!(
        counter(
            &all,
            "tower_ai.circuit_breaker.transitions",
            &[key, ("from", "closed"), ("to", "open")]
        ),
        1
    );
    assert_eq!(
        all.iter()
            .filter(|s| s.name == "tower_ai.circuit_breaker.transitions")
            .count(),
        1
    );
    assert_eq!(
        counter(
            &all,
            "tower_ai.circuit_breaker.rejected",
            &[("state", "open")]
        ),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_keys_past_the_cap_are_folded_into_other() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    let layer = CircuitBreakerLayer::new();
    let handle = layer.handle();
    let extra = 6;
    for i in 0..MAX_KEY_LABELS + extra {
        handle.force_open(Key::of(&format!("host/model-{i}")));
    }
    let all = snapshot(&snap);
    let state = "tower_ai.circuit_breaker.state";
    let named = all
        .iter()
        .filter(|s| s.name == state && !s.labels.contains(&("key".into(), OTHER.into())))
        .filter(|s| s.labels.contains(&("state".into(), "forced_open".into())))
        .count();
    assert_eq!(named, MAX_KEY_LABELS);
    assert_eq!(
        gauge(&all, state, &[("key", OTHER), ("state", "forced_open")]),
        extra as f64
    );
    assert_eq!(
        gauge(&all, state, &[("key", OTHER), ("state", "closed")]),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn budget_refusals_and_waits_count_by_dimension() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    tower_ai::describe_metrics();
    let sim = Simulator::new(Scenario::builder().build().unwrap());
    // Reject mode: one request a minute; the second is refused.
    let reject = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .reject()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(reject).service(sim.service());
    assert_eq!(
        svc.clone()
            .oneshot(chat("gpt-4o", false))
            .await
            .unwrap()
            .status(),
        200
    );
    let err = svc
        .clone()
        .oneshot(chat("gpt-4o", false))
        .await
        .unwrap_err();
    assert!(matches!(
        AiError::find(&*err),
        Some(AiError::BudgetExceeded { .. })
    ));
    // Wait mode, counting tokens: the second request waits for the minute to pass.
    let wait = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .tokens_per_minute(100_000)
        .wait(Duration::from_secs(120))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(wait).service(sim.service());
    for _ in 0..2 {
        let res = svc.clone().oneshot(chat("gpt-4o", false)).await.unwrap();
        res.into_body().collect().await.unwrap();
    }

    let all = snapshot(&snap);
    assert_eq!(
        counter(
            &all,
            "tower_ai.budget.refused",
            &[("limit", "requests_per_minute")]
        ),
        1
    );
    assert_eq!(
        counter(
            &all,
            "tower_ai.budget.queued",
            &[("limit", "requests_per_minute")]
        ),
        1
    );
    assert_eq!(
        counter(&all, "tower_ai.budget.admitted", &[("waited", "false")]),
        2
    );
    assert_eq!(
        counter(&all, "tower_ai.budget.admitted", &[("waited", "true")]),
        1
    );
    let waited = histogram(&all, "tower_ai.budget.queue_wait", &[]);
    assert_eq!(waited.len(), 1);
    assert!((59.0..=61.0).contains(&waited[0]), "{waited:?}");
    // Two answers settled on their usage: less than the reservations (which count the
    // default output allowance), and more than nothing.
    let reserved = counter(&all, "tower_ai.budget.tokens", &[("stage", "reserved")]);
    let settled = counter(&all, "tower_ai.budget.tokens", &[("stage", "settled")]);
    assert!(settled > 0 && settled < reserved, "{settled} of {reserved}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_counts_by_phase_and_a_fallback_by_trigger_and_route() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    tower_ai::describe_metrics();
    let sim = Simulator::new(
        Scenario::builder()
            .token_interval(Latency::fixed(Duration::from_millis(10)))
            .stream_fault_for(
                "stall-model",
                StreamFault::StallAfterTokens {
                    tokens: 2,
                    probability: 1.0,
                },
            )
            .fault(Fault::status(503).model("down-model"))
            .build()
            .unwrap(),
    );
    let stall = StallDetectorLayer::builder()
        .idle(Duration::from_secs(2))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(stall).service(sim.service());
    let res = svc.oneshot(chat("stall-model", true)).await.unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    assert!(
        matches!(AiError::find(&*err), Some(AiError::Stalled { .. })),
        "{err}"
    );

    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model("gpt-4o-mini"))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new(chain))
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let res = svc.oneshot(chat("down-model", false)).await.unwrap();
    assert_eq!(res.status(), 200);

    let all = snapshot(&snap);
    assert_eq!(
        counter(&all, "tower_ai.stall.stalls", &[("phase", "idle")]),
        1
    );
    assert_eq!(
        counter(
            &all,
            "tower_ai.fallback.fallbacks",
            &[("trigger", "overloaded")]
        ),
        1
    );
    assert_eq!(
        counter(
            &all,
            "tower_ai.fallback.served",
            &[("route", "gpt-4o-mini")]
        ),
        1
    );
    assert!(find(&all, "tower_ai.fallback.served", &[("route", "primary")]).is_none());
}

#[tokio::test(start_paused = true)]
async fn cooldown_refusals_count_by_reason_and_the_cooling_snapshot_sets_its_gauge() {
    let (rec, snap) = recorder();
    let _g = metrics::set_default_local_recorder(&rec);
    tower_ai::describe_metrics();
    let sim = Simulator::new(
        Scenario::builder()
            .fault(
                Fault::status(429)
                    .retry_after(Duration::from_secs(30))
                    .between(Duration::ZERO, Duration::from_secs(1)),
            )
            .build()
            .unwrap(),
    );
    let gate: RetryAfterAwareLayer = RetryAfterAwareLayer::builder().fail_fast().build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(gate.clone())
        .layer(ClassifyLayer::new())
        .service(sim.service());
    assert_eq!(
        svc.clone()
            .oneshot(chat("gpt-4o", false))
            .await
            .unwrap()
            .status(),
        429
    );
    let err = svc
        .clone()
        .oneshot(chat("gpt-4o", false))
        .await
        .unwrap_err();
    assert!(
        matches!(AiError::find(&*err), Some(AiError::CoolingDown { .. })),
        "{err}"
    );
    let cooling = gate.cooling();
    assert_eq!(cooling.len(), 1);
    assert_eq!(
        cooling[0].until - tokio::time::Instant::now(),
        Duration::from_secs(30)
    );

    let all = snapshot(&snap);
    assert_eq!(counter(&all, "tower_ai.retry_after.cooldowns", &[]), 1);
    assert_eq!(
        counter(
            &all,
            "tower_ai.retry_after.refusals",
            &[("reason", "fail_fast")]
        ),
        1
    );
    assert_eq!(gauge(&all, "tower_ai.retry_after.keys_cooling", &[]), 1.0);
}

#[test]
fn the_wait_buckets_cover_milliseconds_to_minutes_in_order() {
    assert!(WAIT_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    assert!(WAIT_BUCKETS[0] <= 0.01 && *WAIT_BUCKETS.last().unwrap() >= 300.0);
}
