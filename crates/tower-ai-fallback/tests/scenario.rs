//! Scenario: model A is down for the first 60 virtual seconds, model B is healthy.
//! Stack, outermost first: ModelFallback → retry → circuit breaker → Classify → simulator,
//! in process on a paused clock.
//!
//! Run with `cargo test -p tower-ai-fallback --test scenario -- --nocapture` for the report.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_ai_core::{
    model_of, try_clone_request, AiBody, AiError, BoxError, Classification, ClassifiedBody,
    ClassifyLayer,
};
use tower_ai_fallback::{AttemptBudget, FallbackChain, ModelFallbackLayer, Route};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

type ResBody = ClassifiedBody<tower_ai_sim::SimBody>;
type Res = Response<ResBody>;
type BoxFut = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

const B_LATENCY: Duration = Duration::from_millis(400);
const OUTAGE: Duration = Duration::from_secs(60);

/// Stand-ins for AiRetry and CircuitBreaker with their documented behaviour (the real
/// crates had not landed when this scenario was written): the breaker opens a model's
/// circuit after 3 consecutive breaker failures for 10 s and refuses with
/// `AiError::CircuitOpen`; the retry layer makes up to 3 attempts, 200 ms apart, on
/// retryable verdicts, drawing each retry from the request's `AttemptBudget`.
mod standins {
    use super::*;

    #[derive(Clone)]
    pub(super) struct Breaker<S> {
        pub(super) inner: S,
        pub(super) state: Arc<Mutex<HashMap<String, (u32, Option<tokio::time::Instant>)>>>,
    }

    impl<S> Service<Request<AiBody>> for Breaker<S>
    where
        S: Service<Request<AiBody>, Response = Res, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send,
    {
        type Response = Res;
        type Error = BoxError;
        type Future = BoxFut;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, req: Request<AiBody>) -> BoxFut {
            let key = model_of(&req).map(|m| m.into_owned()).unwrap_or_default();
            let now = tokio::time::Instant::now();
            let open_until = self.state.lock().unwrap().get(&key).and_then(|s| s.1);
            if let Some(until) = open_until.filter(|u| *u > now) {
                return Box::pin(async move {
                    Err(Box::new(AiError::CircuitOpen { key, until }) as BoxError)
                });
            }
            let fut = self.inner.call(req);
            let state = self.state.clone();
            Box::pin(async move {
                let res = fut.await;
                let failed = match &res {
                    Ok(r) => Classification::of(r)
                        .kind
                        .is_some_and(|k| k.is_breaker_failure()),
                    Err(_) => true,
                };
                let mut st = state.lock().unwrap();
                let e = st.entry(key).or_insert((0, None));
                if failed {
                    e.0 += 1;
                    if e.0 >= 3 {
                        e.1 = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                    }
                } else {
                    *e = (0, None);
                }
                res
            })
        }
    }

    #[derive(Clone)]
    pub(super) struct Retry<S> {
        pub(super) inner: S,
    }

    impl<S> Service<Request<AiBody>> for Retry<S>
    where
        S: Service<Request<AiBody>, Response = Res, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send,
    {
        type Response = Res;
        type Error = BoxError;
        type Future = BoxFut;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, req: Request<AiBody>) -> BoxFut {
            let inner = self.inner.clone();
            Box::pin(async move {
                let budget = AttemptBudget::of(&req).cloned();
                let mut attempt = 1;
                loop {
                    let copy = try_clone_request(&req).ok_or("not replayable")?;
                    let res = inner.clone().oneshot(copy).await;
                    let retry = match &res {
                        Ok(r) => Classification::of(r).is_retryable(),
                        Err(e) => !matches!(AiError::find(&**e), Some(AiError::CircuitOpen { .. })),
                    };
                    if !retry
                        || attempt >= 3
                        || !budget.as_ref().is_none_or(AttemptBudget::try_acquire_retry)
                    {
                        return res;
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        }
    }
}

#[derive(Debug)]
struct Outcome {
    start: Duration,
    latency: Duration,
    status: Option<u16>,
    route: String,
}

#[tokio::test(start_paused = true)]
async fn model_a_down_for_60s_b_healthy() {
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
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(Route::primary("a"))
        .route(Route::model("model-b"))
        .build()
        .unwrap();
    let routes = chain.clone();
    let breaker = standins::Breaker {
        inner: ClassifyLayer::new().layer(sim.service()),
        state: Arc::default(),
    };
    let svc = ModelFallbackLayer::new(chain).layer(standins::Retry { inner: breaker });

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

    let total = outcomes.len();
    let served = outcomes.iter().filter(|o| o.status == Some(200)).count();
    let calls = sim.calls();
    let a_calls_down: Vec<_> = calls
        .iter()
        .filter(|c| c.model.as_deref() == Some("model-a") && c.at < OUTAGE)
        .collect();
    let first_refusal_free = outcomes
        .iter()
        .filter(|o| o.start < OUTAGE && o.route == "model-b")
        .find(|o| o.latency <= B_LATENCY + Duration::from_millis(1))
        .map(|o| o.start);
    let open_from = first_refusal_free.expect("A's circuit opened");
    let during: Vec<_> = outcomes
        .iter()
        .filter(|o| o.start >= open_from && o.start + Duration::from_secs(1) < OUTAGE)
        .collect();
    let added: Vec<Duration> = during
        .iter()
        .map(|o| o.latency.saturating_sub(B_LATENCY))
        .collect();
    let mean_added = added.iter().sum::<Duration>() / added.len() as u32;
    let max_added = added.iter().max().copied().unwrap();
    let slow_during = during.iter().filter(|o| o.latency > B_LATENCY).count();
    let after: Vec<_> = outcomes
        .iter()
        .filter(|o| o.start >= OUTAGE + Duration::from_secs(11))
        .collect();
    let back_on_a = after.iter().filter(|o| o.route == "a").count();

    println!("== ModelFallback scenario: model A down 0-60 s, B healthy ({B_LATENCY:?}), one request / 250 ms for 90 s");
    println!(
        "served: {served}/{total} ({:.1}%)",
        100.0 * served as f64 / total as f64
    );
    println!(
        "A's circuit open (first request served by B at B's own latency) at t = {open_from:?}"
    );
    println!(
        "after the circuit opened, while A is down: {} requests, added latency mean {mean_added:?}, max {max_added:?}; {slow_during} slower than B alone (half-open probes)",
        during.len()
    );
    println!(
        "calls that reached A while down: {} (of {} A calls in total)",
        a_calls_down.len(),
        calls
            .iter()
            .filter(|c| c.model.as_deref() == Some("model-a"))
            .count()
    );
    println!(
        "requests served by A again after recovery (started ≥ 71 s): {back_on_a}/{}",
        after.len()
    );
    let mut first = outcomes
        .iter()
        .take(4)
        .map(|o| format!("{:?}@{:?}->{}", o.latency, o.start, o.route))
        .collect::<Vec<_>>();
    first.truncate(4);
    println!(
        "first requests (latency@start->route): {}",
        first.join(", ")
    );

    assert_eq!(served, total, "every request served");
    assert!(
        open_from < Duration::from_secs(2),
        "opened early: {open_from:?}"
    );
    assert!(
        a_calls_down.len() <= 3 + 2 * 6,
        "A is called only to open the circuit and by half-open probes: {}",
        a_calls_down.len()
    );
    // Once open, a request costs B's latency alone; only the half-open probe (one per
    // 10 s open period) pays A's error latency and one retry wait.
    assert!(
        slow_during <= 6,
        "{slow_during} requests slower than B alone"
    );
    assert!(max_added <= Duration::from_millis(250), "{max_added:?}");
    assert!(mean_added <= Duration::from_millis(10), "{mean_added:?}");
    assert!(
        back_on_a > after.len() / 2,
        "A serves again after its outage"
    );
    let b_served: usize = outcomes.iter().filter(|o| o.route == "model-b").count();
    assert!(b_served >= 230, "{b_served}");
}
