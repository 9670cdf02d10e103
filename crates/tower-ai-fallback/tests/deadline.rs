//! ModelFallback near the request's deadline: a later route that cannot answer in time is
//! not started. Against the simulator, on a paused clock.

use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_ai_core::{AiBody, AiError, ClassifiedBody, ClassifyLayer, Deadline, ErrorKind};
use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route, Served};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

type ResBody = ClassifiedBody<tower_ai_sim::SimBody>;

const S: Duration = Duration::from_secs(1);

/// Model "a" answers 503 after 8 s (an outage slow to say so); "b" is fine.
fn sim() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(3)
            .model(ModelSpec::new("a"))
            .model(ModelSpec::new("b").completion_tokens(5))
            .latency(Latency::fixed(S))
            .error_latency(Latency::fixed(8 * S))
            .outage("a", Duration::ZERO, Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
}

fn request(deadline: Duration) -> Request<AiBody> {
    let mut req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(
            r#"{"model":"a","messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap();
    Deadline::set(&mut req, Deadline::after(deadline));
    req
}

fn chain(degraded: bool) -> FallbackChain<AiBody, ResBody> {
    let b = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .min_route_time(5 * S);
    let b = if degraded {
        b.route(Route::degraded_static(
            "busy",
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"busy"}"#,
        ))
    } else {
        b
    };
    b.build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_route_that_cannot_answer_before_the_deadline_is_not_started() {
    // 10 s left: "a" fails at 8 s, leaving 2 s, less than the 5 s a route needs: "b" is
    // not called, and the caller has its answer at 8 s instead of a call nobody waits for.
    let sim = sim();
    let svc =
        ModelFallbackLayer::new(chain(false)).layer(ClassifyLayer::new().layer(sim.service()));
    let t0 = Instant::now();
    let err = svc.oneshot(request(10 * S)).await.unwrap_err();
    assert_eq!(t0.elapsed(), 8 * S);
    assert_eq!(sim.calls().len(), 1, "only the first route was called");
    let Some(AiError::AllRoutesFailed { failures }) = AiError::find(&*err) else {
        panic!("{err}")
    };
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert_eq!(failures[1].route, "b");
    assert_eq!(failures[1].classification.kind, Some(ErrorKind::Timeout));

    // 30 s left: "b" has time, and serves.
    let sim = self::sim();
    let svc =
        ModelFallbackLayer::new(chain(false)).layer(ClassifyLayer::new().layer(sim.service()));
    let res = svc.oneshot(request(30 * S)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(&*Served::get(&res).unwrap().route, "b");
    assert_eq!(sim.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_degraded_route_still_answers_when_no_call_can() {
    let sim = sim();
    let svc = ModelFallbackLayer::new(chain(true)).layer(ClassifyLayer::new().layer(sim.service()));
    let t0 = Instant::now();
    let res = svc.oneshot(request(10 * S)).await.unwrap();
    assert_eq!(t0.elapsed(), 8 * S);
    assert_eq!(res.status(), 503);
    assert_eq!(&*Served::get(&res).unwrap().route, "busy");
    assert_eq!(sim.calls().len(), 1);
}
