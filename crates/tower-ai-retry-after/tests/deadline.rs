//! RetryAfterAware refuses at once, with `CoolingDown { until }`, a request whose
//! `Deadline` comes before the cooldown ends. Paused clock, tower-test mock.

use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiError, Deadline};
use tower_ai_retry_after::RetryAfterAwareLayer;
use tower_test::mock;

const S: Duration = Duration::from_secs(1);

fn request(deadline: Option<Duration>) -> Request<String> {
    let mut req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap();
    if let Some(d) = deadline {
        Deadline::set(&mut req, Deadline::after(d));
    }
    req
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_that_ends_past_the_deadline_is_refused_at_once() {
    let layer = RetryAfterAwareLayer::builder()
        .release_spread(Duration::ZERO)
        .seed(1)
        .build()
        .unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);

    // The provider asks for 30 s.
    let first = tokio::spawn(svc.clone().oneshot(request(None)));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(
        Response::builder()
            .status(429)
            .header("retry-after", "30")
            .body("{}".to_owned())
            .unwrap(),
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 429);
    let learned = Instant::now();

    // 10 s left: refused now, saying when capacity comes back.
    let t0 = Instant::now();
    let err = tokio::time::timeout(S, svc.clone().oneshot(request(Some(10 * S))))
        .await
        .expect("refused at once, not held")
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    match AiError::find(&*err) {
        Some(AiError::CoolingDown { until, .. }) => assert_eq!(*until, learned + 30 * S),
        other => panic!("expected CoolingDown, got {other:?}"),
    }

    // 60 s left: it waits for the cooldown's end and goes.
    let waiter = tokio::spawn(svc.clone().oneshot(request(Some(60 * S))));
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(learned.elapsed(), 30 * S);
    send.send_response(Response::new("{}".to_owned()));
    assert_eq!(waiter.await.unwrap().unwrap().status(), 200);
}
