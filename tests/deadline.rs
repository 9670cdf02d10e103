//! The default stack's end-to-end deadline: a non-streamed call whose provider never
//! answers is a bounded error, in-process against the simulator on a paused clock.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_ai::prelude::*;
use tower_ai_core::StallPhase;
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

const MIN: Duration = Duration::from_secs(60);

/// A provider that takes ten hours to answer: never, for any caller.
fn silent() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-4o").latency(Latency::fixed(600 * MIN)))
            .build()
            .unwrap(),
    )
}

fn request() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap()
}

/// Sends one request through `stack` to the silent provider: how long the caller
/// waited, the error, and the calls the provider saw.
async fn hang(stack: AiStack, req: Request<AiBody>) -> (Duration, BoxError, usize) {
    let sim = silent();
    let svc = stack.layer(sim.service());
    let t0 = Instant::now();
    let err = svc
        .oneshot(req)
        .await
        .expect_err("the provider never answers");
    (t0.elapsed(), err, sim.calls().len())
}

/// Cut at the caller's deadline: not a stall of the provider's.
fn cut_at_deadline(err: &BoxError) -> bool {
    matches!(
        AiError::find(&**err),
        Some(AiError::DeadlineExceeded { sent: true, .. })
    )
}

fn stalled_total(err: &BoxError) -> bool {
    matches!(
        AiError::find(&**err),
        Some(AiError::Stalled {
            phase: StallPhase::Total,
            ..
        })
    )
}

#[tokio::test(start_paused = true)]
async fn the_default_stack_bounds_a_call_to_a_silent_provider_at_ten_minutes() {
    let (waited, err, calls) = hang(AiStack::seeded(1), request()).await;
    println!("default stack: failed after {waited:?}, {calls} call(s)");
    assert_eq!(waited, 10 * MIN);
    assert_eq!(calls, 1, "a call cut at the deadline is not retried");
    assert!(cut_at_deadline(&err), "{err}");
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_same_call_hangs_for_an_hour() {
    // What the default stack did before it had a deadline: three attempts of
    // StallDetector's 20-minute total, with backoff between them.
    let (waited, err, calls) = hang(AiStack::seeded(1).no_deadline(), request()).await;
    println!("no deadline: failed after {waited:?}, {calls} call(s)");
    assert_eq!(calls, 3);
    assert!(waited >= 60 * MIN, "{waited:?}");
    assert!(stalled_total(&err), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_callers_timeout_header_or_deadline_shortens_it() {
    let mut req = request();
    req.headers_mut()
        .insert("x-stainless-timeout", "30".parse().unwrap());
    let (waited, err, calls) = hang(AiStack::seeded(1), req).await;
    assert_eq!((waited, calls), (30 * Duration::from_secs(1), 1));
    assert!(cut_at_deadline(&err), "{err}");

    let mut req = request();
    Deadline::set(&mut req, Deadline::after(2 * MIN));
    let (waited, _, _) = hang(AiStack::seeded(1).deadline(5 * MIN), req).await;
    assert_eq!(waited, 2 * MIN);

    let (waited, _, _) = hang(AiStack::seeded(1).deadline(5 * MIN), request()).await;
    assert_eq!(waited, 5 * MIN);
}

/// ModelFallback near the deadline: a route whose budget cannot admit the request before
/// its caller's deadline refuses at once (TokenBudget's predicted start), AiRetry does not
/// wait with a fallback route behind it, and the next route serves: no wait on a route
/// that would pass the deadline.
#[tokio::test(start_paused = true)]
async fn under_fallback_a_budget_wait_past_the_deadline_moves_on_to_the_next_route() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-4o"))
            .model(ModelSpec::new("gpt-4o-mini"))
            .latency(Latency::fixed(Duration::from_secs(1)))
            .build()
            .unwrap(),
    );
    // One request a minute per model (HostModel: the routes do not share a window).
    let budget = TokenBudgetLayer::builder()
        .key_fn(tower_ai_core::keys::HostModel)
        .requests_per_minute(1)
        .wait(5 * MIN)
        .build()
        .unwrap();
    let svc = AiStack::seeded(1)
        .budget(budget)
        .fallback(ModelFallbackLayer::models(["gpt-4o-mini"]).unwrap())
        .layer(sim.service());
    // gpt-4o's minute is used.
    assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);

    // 10 s left: gpt-4o's next slot is a minute away, so the request goes to gpt-4o-mini
    // at once instead of waiting.
    let mut req = request();
    req.headers_mut()
        .insert("x-stainless-timeout", "10".parse().unwrap());
    let t0 = Instant::now();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(t0.elapsed(), Duration::from_secs(1), "one call's latency");
    let models: Vec<_> = sim.calls().into_iter().filter_map(|c| c.model).collect();
    assert_eq!(models, ["gpt-4o", "gpt-4o-mini"]);
}

/// The kind of the error's `AiError`, by name.
fn kind(err: &BoxError) -> Option<&'static str> {
    AiError::find(&**err).map(|e| e.kind().as_str())
}

/// A request whose deadline was spent before it reached the call (waiting for a budget,
/// a cooldown or a retry above it) is not sent: the provider sees no call, and the caller
/// gets the deadline's error at once, not a stall.
#[tokio::test(start_paused = true)]
async fn a_request_whose_deadline_is_spent_is_not_sent() {
    let sim = silent();
    let svc = AiStack::seeded(1).layer(sim.service());
    let mut req = request();
    Deadline::set(&mut req, Deadline::after(Duration::from_secs(3)));
    // The caller's three seconds go by before the stack gets the request.
    tokio::time::advance(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    let err = svc.oneshot(req).await.expect_err("no time left");
    assert_eq!(sim.calls().len(), 0, "the provider saw the call: {err}");
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(kind(&err), Some("deadline_exceeded"), "{err}");
}

/// Calls cut at their caller's deadline say nothing about the provider: ten of them do not
/// open the circuit (the default breaker opens at 50% of at least 10 calls), where ten
/// stalls of StallDetector's own head deadline do.
#[tokio::test(start_paused = true)]
async fn cuts_at_the_callers_deadline_do_not_open_the_breaker_where_stalls_do() {
    const N: usize = 10;
    let stall = || {
        StallDetectorLayer::builder()
            .unary_head(Duration::from_secs(2))
            .build()
            .unwrap()
    };
    let stack = |sim: &Simulator| {
        tower::ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new())
            .layer(stall())
            .service(sim.service())
    };

    // Each caller gives up after 1 s, before the detector's 2 s head deadline.
    let sim = silent();
    let svc = stack(&sim);
    let mut cuts = Vec::new();
    for _ in 0..N {
        let mut req = request();
        Deadline::set(&mut req, Deadline::after(Duration::from_secs(1)));
        let err = svc.clone().oneshot(req).await.expect_err("never answers");
        cuts.push(kind(&err));
    }
    let err = svc.clone().oneshot(request()).await.expect_err("stalls");
    assert_eq!(
        sim.calls().len(),
        N + 1,
        "the circuit opened on the callers' deadlines: {err}"
    );
    assert_eq!(kind(&err), Some("stalled"), "{err}");
    assert_eq!(cuts, [Some("deadline_exceeded"); N]);

    // The same provider stalling past the detector's head deadline, with no caller's
    // deadline in the way: the circuit opens.
    let sim = silent();
    let svc = stack(&sim);
    for i in 0..N {
        let err = svc.clone().oneshot(request()).await.expect_err("stalls");
        assert_eq!(kind(&err), Some("stalled"), "call {i}: {err}");
    }
    let err = svc.clone().oneshot(request()).await.expect_err("open");
    assert!(
        matches!(AiError::find(&*err), Some(AiError::CircuitOpen { .. })),
        "{err}"
    );
    assert_eq!(sim.calls().len(), N);
}
