//! AiRetry under ModelFallback's shared attempt budget (tower-ai-core's `AttemptBudget`).

use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiError, AttemptBudget, ClassifyLayer};
use tower_ai_retry::{AiRetryLayer, RetryStop, StopReason};
use tower_test::mock;

fn request(budget: Option<&AttemptBudget>) -> Request<String> {
    let mut req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap();
    if let Some(b) = budget {
        req.extensions_mut().insert(b.clone());
    }
    req
}

#[tokio::test(start_paused = true)]
async fn retries_stop_where_the_reserve_for_later_routes_begins() {
    // ModelFallback's protocol: it paid the first attempt and reserved 2 units for later
    // routes, out of 4. AiRetry may retry once (4 - 1 - 2), not the 4 times it is allowed.
    let budget = AttemptBudget::new(4);
    assert!(budget.try_acquire());
    budget.set_reserved(2);
    let layer = AiRetryLayer::builder().max_attempts(5).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(svc);
    let task = tokio::spawn(svc.oneshot(request(Some(&budget))));
    let mut calls = 0;
    while let Some((_, send)) = handle.next_request().await {
        calls += 1;
        send.send_response(Response::builder().status(500).body(String::new()).unwrap());
        if calls > 5 {
            break;
        }
    }
    let res = task.await.unwrap().unwrap();
    assert_eq!(calls, 2, "one first attempt and one retry");
    let stop = res.extensions().get::<RetryStop>().unwrap();
    assert_eq!(stop.reason, StopReason::AttemptBudget);
    assert_eq!(
        budget.remaining(),
        2,
        "the reserve is intact for the later routes"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_not_waited_on_when_a_fallback_can_serve() {
    let budget = AttemptBudget::new(4);
    assert!(budget.try_acquire());
    budget.set_reserved(1);
    let layer = AiRetryLayer::builder().max_attempts(3).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(request(Some(&budget))));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(AiError::CircuitOpen {
        key: "api.openai.com/gpt-4o".into(),
        until: start + Duration::from_secs(30),
    });
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::CircuitOpen { .. })
    ));
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "returned at once, for the next route"
    );
    drop(handle);

    // Without a fallback behind it, an open circuit is still returned at once by default
    // (the breaker's job is to fail fast)...
    let layer = AiRetryLayer::builder().max_attempts(2).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(request(None)));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(AiError::CircuitOpen {
        key: "k".into(),
        until: start + Duration::from_secs(3),
    });
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::CircuitOpen { .. })
    ));
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(handle);

    // ...and waited out when asked to.
    let layer = AiRetryLayer::builder()
        .max_attempts(2)
        .wait_on_open_circuit(true)
        .build()
        .unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(request(None)));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(AiError::CircuitOpen {
        key: "k".into(),
        until: start + Duration::from_secs(3),
    });
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    send.send_response(Response::new("ok".to_owned()));
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_retry_budget_refuses_spends_no_attempt_unit() {
    // Issue #16: the attempt unit was taken before the retry budget refused, so a retry
    // that never happened still cost a later route its call.
    let budget = AttemptBudget::new(4);
    assert!(budget.try_acquire());
    budget.set_reserved(1);
    // A retry budget that cannot afford a retry: 1 % of one call is no retry.
    let layer = AiRetryLayer::builder()
        .max_attempts(3)
        .budget(Duration::from_secs(10), 0, 0.01)
        .build()
        .unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(svc);
    let task = tokio::spawn(svc.oneshot(request(Some(&budget))));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(500).body(String::new()).unwrap());
    let res = task.await.unwrap().unwrap();
    let stop = res.extensions().get::<RetryStop>().unwrap();
    assert_eq!(stop.reason, StopReason::Budget);
    assert_eq!(stop.attempts, 1);
    assert_eq!(
        budget.remaining(),
        3,
        "the refused retry took no unit from the attempt budget"
    );
}
