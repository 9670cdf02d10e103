//! What a server answers its callers for each refusal, against the real layers and the
//! simulator on a paused clock: the `retry-after` an `ErrorReply` gives is the layer's
//! own prediction, and it is truthful (waiting exactly that long gets the request in).

use std::time::Duration;

use http::Request;
use tower::{Layer, ServiceExt};
use tower_ai::circuit_breaker::CircuitBreakerLayer;
use tower_ai::prelude::*;
use tower_ai::retry_after::RetryAfterAwareLayer;
use tower_ai::{ErrorDialect, ErrorReply};
use tower_ai_sim::{Fault, Scenario, Simulator};

fn chat() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .body(AiBody::from(
            r#"{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap()
}

fn sim(scenario: Scenario) -> Simulator {
    Simulator::new(scenario)
}

/// The answer a server gives for `err`, with its `retry-after` in seconds.
fn answer(err: &BoxError) -> (u16, &'static str, Option<u64>, serde_json::Value) {
    let reply = ErrorReply::from_error(&**err);
    let res = reply.to_response(ErrorDialect::OpenAi);
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = serde_json::from_str(res.body()).unwrap();
    (res.status().as_u16(), reply.code, retry_after, body)
}

#[tokio::test(start_paused = true)]
async fn a_budget_refusal_is_a_429_whose_retry_after_is_when_it_fits() {
    let sim = sim(Scenario::builder().build().unwrap());
    let budget = TokenBudgetLayer::builder()
        .requests_per_minute(2)
        .reject()
        .build()
        .unwrap();
    let svc = budget.layer(ClassifyLayer::new().layer(sim.service()));
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 200);
    }
    let err = svc.clone().oneshot(chat()).await.unwrap_err();
    let (status, code, retry_after, body) = answer(&err);
    assert_eq!((status, code), (429, "budget_exceeded"));
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let wait = retry_after.expect("a retry-after");
    assert!((1..=61).contains(&wait), "{wait}");

    // A second before the predicted time it still does not fit; at it, it does.
    tokio::time::advance(Duration::from_secs(wait - 1)).await;
    assert!(svc.clone().oneshot(chat()).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_a_503_whose_retry_after_is_the_half_open_time() {
    let sim = sim(Scenario::builder()
        .fault(Fault::status(500).between(Duration::ZERO, Duration::from_secs(1)))
        .build()
        .unwrap());
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(30))
        .build()
        .unwrap();
    let svc = breaker.layer(ClassifyLayer::new().layer(sim.service()));
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 500);
    }
    let err = svc.clone().oneshot(chat()).await.unwrap_err();
    let (status, code, retry_after, body) = answer(&err);
    assert_eq!((status, code, retry_after), (503, "circuit_open", Some(30)));
    assert_eq!(body["error"]["code"], "circuit_open");
    assert_eq!(sim.calls().len(), 2, "refused without a call");

    tokio::time::advance(Duration::from_secs(29)).await;
    let err = svc.clone().oneshot(chat()).await.unwrap_err();
    assert_eq!(answer(&err).2, Some(1), "the wait counts down");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 200);
    assert_eq!(sim.calls().len(), 3, "the half-open probe went out");
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_is_a_429_whose_retry_after_is_the_providers_wait() {
    let sim = sim(Scenario::builder()
        .fault(
            Fault::status(429)
                .between(Duration::ZERO, Duration::from_millis(500))
                .retry_after(Duration::from_secs(7)),
        )
        .build()
        .unwrap());
    let gate = RetryAfterAwareLayer::builder()
        .fail_fast()
        .release_spread(Duration::ZERO)
        .build()
        .unwrap();
    let svc = gate.layer(ClassifyLayer::new().layer(sim.service()));
    assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 429);
    let err = svc.clone().oneshot(chat()).await.unwrap_err();
    let (status, code, retry_after, _) = answer(&err);
    assert_eq!((status, code, retry_after), (429, "cooling_down", Some(7)));
    assert_eq!(sim.calls().len(), 1, "refused without a call");

    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 200);
}

/// `respond::handle_error` fits axum's `HandleErrorLayer`: a stack's error becomes the
/// OpenAI-shaped answer of the table, served by a real router.
#[tokio::test(start_paused = true)]
async fn handle_error_fits_axums_handle_error_layer() {
    use axum::error_handling::HandleErrorLayer;
    use axum::Router;
    use tower::ServiceBuilder;

    let failing = tower::service_fn(|_req: axum::extract::Request| async {
        Err::<axum::response::Response, BoxError>(Box::new(AiError::Stalled {
            phase: tower_ai::core::StallPhase::FirstByte,
            after: Duration::from_secs(10),
            bytes_received: 0,
        }))
    });
    let app = Router::new().route_service(
        "/v1/chat/completions",
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(tower_ai::core::respond::handle_error))
            .service(failing),
    );
    let req = Request::post("/v1/chat/completions")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 504);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "stalled");
}
