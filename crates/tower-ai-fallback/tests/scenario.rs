//! Scenario: model A is down for the first 60 virtual seconds, model B is healthy.
//! Stack, outermost first: ModelFallback → AiRetry → CircuitBreaker → Classify → simulator,
//! in process on a paused clock.
//!
//! Run with `cargo test -p tower-ai-fallback --test scenario -- --nocapture` for the report.

use std::time::Duration;

use http::Request;
use tower::{Layer, ServiceExt};
use tower_ai_circuit_breaker::CircuitBreakerLayer;
use tower_ai_core::{AiBody, ClassifiedBody, ClassifyLayer};
use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route};
use tower_ai_retry::{AiRetryLayer, Backoff, Jitter};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

type ResBody = tower_ai_circuit_breaker::BreakerBody<ClassifiedBody<tower_ai_sim::SimBody>>;

const B_LATENCY: Duration = Duration::from_millis(400);
const OUTAGE: Duration = Duration::from_secs(60);
const OPEN_FOR: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Outcome {
    start: Duration,
    latency: Duration,
    status: Option<u16>,
    route: String,
}

struct Report {
    total: usize,
    served: usize,
    open_from: Duration,
    during: usize,
    mean_added: Duration,
    max_added: Duration,
    slow_during: usize,
    a_calls_down: usize,
    a_calls: usize,
    after: usize,
    back_on_a: usize,
    b_served: usize,
}

/// Runs the scenario; with `skip`, route A carries a `skip_if` that asks the breaker's
/// handle, so an open route is not even called.
async fn run(skip: bool) -> Report {
    let sim = Simulator::new(
        Scenario::builder()
            .seed(1)
            .model(ModelSpec::new("model-a").latency(Latency::fixed(Duration::from_millis(300))))
            .model(ModelSpec::new("model-b").latency(Latency::fixed(B_LATENCY)))
            .token_interval(Latency::ZERO)
            .error_latency(Latency::fixed(Duration::from_millis(50)))
            .outage("model-a", Duration::ZERO, OUTAGE)
            .build()
            .unwrap(),
    );
    // Opens after 3 failures in a row, for 10 s; one probe at a time when half-open.
    let breaker = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(3)
        .consecutive_failures(3)
        .failure_rate(0.5)
        .open_duration(OPEN_FOR)
        .half_open_probes(1)
        .half_open_successes(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut a = Route::primary("a");
    if skip {
        a = a.skip_if(move |req| handle.is_open_for(req));
    }
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(a)
        .route(Route::model("model-b"))
        .build()
        .unwrap();
    let routes = chain.clone();
    let breaker = breaker.layer(ClassifyLayer::new().layer(sim.service()));
    // AiRetry returns a `CircuitOpen` refusal at once (it does not wait for the circuit to
    // half-open unless told to), so ModelFallback moves on to model B without delay.
    let retry = AiRetryLayer::builder()
        .max_attempts(3)
        .max_wait(Duration::from_secs(5))
        .backoff(Backoff::new(
            Duration::from_millis(200),
            2.0,
            Duration::from_secs(2),
            Jitter::None,
        ))
        .seed(1)
        .build()
        .unwrap();
    let svc = ModelFallbackLayer::new(chain).layer(retry.layer(breaker));

    // One request every 250 ms for 90 s, each on its own task.
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..360u64 {
        tokio::time::sleep_until(t0 + Duration::from_millis(250 * i)).await;
        let svc = svc.clone();
        let routes = routes.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post("https://api.openai.com/v1/chat/completions")
                .body(AiBody::from(
                    r#"{"model":"model-a","messages":[{"role":"user","content":"Hi"}]}"#,
                ))
                .unwrap();
            let start = tokio::time::Instant::now();
            let res = svc.oneshot(req).await;
            Outcome {
                start: start - t0,
                latency: start.elapsed(),
                status: res.as_ref().ok().map(|r| r.status().as_u16()),
                route: res
                    .as_ref()
                    .map_or("error".to_owned(), |r| routes.served(r).route.to_string()),
            }
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }

    let calls = sim.calls();
    let is_a = |c: &&tower_ai_sim::CallRecord| c.model.as_deref() == Some("model-a");
    let open_from = outcomes
        .iter()
        .filter(|o| o.start < OUTAGE && o.route == "model-b")
        .find(|o| o.latency <= B_LATENCY + Duration::from_millis(1))
        .map(|o| o.start)
        .expect("A's circuit opened");
    let during: Vec<_> = outcomes
        .iter()
        .filter(|o| o.start >= open_from && o.start + Duration::from_secs(1) < OUTAGE)
        .collect();
    let added: Vec<Duration> = during
        .iter()
        .map(|o| o.latency.saturating_sub(B_LATENCY))
        .collect();
    let after: Vec<_> = outcomes
        .iter()
        .filter(|o| o.start >= OUTAGE + OPEN_FOR + Duration::from_secs(1))
        .collect();
    let r = Report {
        total: outcomes.len(),
        served: outcomes.iter().filter(|o| o.status == Some(200)).count(),
        open_from,
        during: during.len(),
        mean_added: added.iter().sum::<Duration>() / added.len() as u32,
        max_added: added.iter().max().copied().unwrap_or_default(),
        slow_during: during.iter().filter(|o| o.latency > B_LATENCY).count(),
        a_calls_down: calls.iter().filter(is_a).filter(|c| c.at < OUTAGE).count(),
        a_calls: calls.iter().filter(is_a).count(),
        after: after.len(),
        back_on_a: after.iter().filter(|o| o.route == "a").count(),
        b_served: outcomes.iter().filter(|o| o.route == "model-b").count(),
    };
    println!(
        "== A down 0-60 s, B healthy ({B_LATENCY:?}), 1 request / 250 ms for 90 s; skip_if on the breaker: {skip}"
    );
    println!(
        "served: {}/{} ({:.1}%), by B: {}",
        r.served,
        r.total,
        100.0 * r.served as f64 / r.total as f64,
        r.b_served
    );
    println!(
        "A's circuit open (first request served by B at B's own latency) at t = {:?}",
        r.open_from
    );
    println!(
        "after that, while A is down: {} requests, added latency mean {:?}, max {:?}; {} slower than B alone",
        r.during, r.mean_added, r.max_added, r.slow_during
    );
    println!(
        "calls that reached A while down: {} (A calls in total: {})",
        r.a_calls_down, r.a_calls
    );
    println!(
        "served by A again after recovery (requests started >= 71 s): {}/{}",
        r.back_on_a, r.after
    );
    r
}

#[tokio::test(start_paused = true)]
async fn model_a_down_for_60s_b_healthy_with_breaker_skip() {
    let r = run(true).await;
    assert_eq!(r.served, r.total, "every request served");
    assert!(
        r.open_from < Duration::from_secs(2),
        "opened early: {:?}",
        r.open_from
    );
    // A is called 3 times to open the circuit, then once per open period by a probe
    // (and that probe's retry is refused by the breaker).
    assert!(r.a_calls_down <= 3 + 6, "{}", r.a_calls_down);
    // Once open, a request costs B's latency alone, except the probes.
    assert!(r.slow_during <= 6, "{}", r.slow_during);
    assert!(
        r.mean_added <= Duration::from_millis(10),
        "{:?}",
        r.mean_added
    );
    assert!(r.back_on_a > r.after / 2, "A serves again after its outage");
}

#[tokio::test(start_paused = true)]
async fn model_a_down_for_60s_b_healthy_refusals_only() {
    // Without the skip predicate every request goes through AiRetry to the breaker,
    // which refuses; AiRetry waits on a refusal whose `until` is within its max_wait.
    let r = run(false).await;
    assert_eq!(r.served, r.total, "every request served");
    assert!(r.a_calls_down <= 3 + 6, "{}", r.a_calls_down);
}
