//! What AiRetry reports through `tracing`: one span per logical call (its method, and the
//! attempts made once it ends) and one event per attempt, with the status, the kind of
//! failure, the wait chosen and where that wait came from; a final event says why the
//! retries stopped.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::ClassifyLayer;
use tower_ai_retry::AiRetryLayer;
use tower_ai_sim::testing::{Recorded, TraceLog};
use tower_test::mock;

fn request() -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap()
}

fn resp(status: u16, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

/// One call through AiRetry → Classify → a mock answering `answers` in turn.
async fn call(layer: &AiRetryLayer, answers: Vec<Response<Full<Bytes>>>) -> u16 {
    let (svc, mut handle) = mock::pair::<Request<String>, Response<Full<Bytes>>>();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(ClassifyLayer::new())
        .service(svc);
    let task = tokio::spawn(svc.oneshot(request()));
    for answer in answers {
        let (_, send) = handle.next_request().await.expect("an attempt");
        send.send_response(answer);
    }
    task.await.unwrap().unwrap().status().as_u16()
}

/// The spans named `ai_retry`, with their indices in the log.
fn retry_spans(log: &TraceLog) -> Vec<(usize, Recorded)> {
    log.spans()
        .into_iter()
        .enumerate()
        .filter(|(_, s)| s.name == "ai_retry")
        .collect()
}

fn events_of(log: &TraceLog, span: usize) -> Vec<Recorded> {
    log.events()
        .into_iter()
        .filter(|e| e.parent == Some(span))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_span_per_call_and_one_event_per_attempt() {
    let log = TraceLog::default();
    let _guard = log.install();
    let layer = AiRetryLayer::builder().no_budget().seed(3).build().unwrap();

    let answers = vec![
        resp(429, &[("retry-after-ms", "250")]),
        resp(503, &[]),
        resp(200, &[]),
    ];
    assert_eq!(call(&layer, answers).await, 200);
    assert_eq!(call(&layer, vec![resp(200, &[])]).await, 200);

    let spans = retry_spans(&log);
    assert_eq!(spans.len(), 2, "one span per logical call: {spans:#?}");
    let (first, span) = &spans[0];
    assert_eq!(span.field("http.request.method"), Some("POST"));
    assert_eq!(span.field("attempts"), Some("3"));
    assert_eq!(spans[1].1.field("attempts"), Some("1"));

    let events = events_of(&log, *first);
    assert_eq!(events.len(), 3, "one event per attempt: {events:#?}");
    let e = &events[0];
    assert_eq!(e.message(), Some("ai_retry retrying"));
    assert_eq!(e.field("attempt"), Some("1"));
    assert_eq!(e.field("http.response.status_code"), Some("429"));
    assert_eq!(e.field("error.type"), Some("rate_limited"));
    assert_eq!(
        e.field("wait_ms"),
        Some("250"),
        "the provider's wait, as given"
    );
    assert_eq!(e.field("wait.source"), Some("retry-after-ms"));
    let e = &events[1];
    assert_eq!(e.message(), Some("ai_retry retrying"));
    assert_eq!(e.field("attempt"), Some("2"));
    assert_eq!(e.field("http.response.status_code"), Some("503"));
    assert_eq!(e.field("wait.source"), Some("backoff"));
    let backoff: u64 = e.field("wait_ms").unwrap().parse().unwrap();
    assert!(backoff > 0, "a backoff was waited");
    let e = &events[2];
    assert_eq!(e.message(), Some("ai_retry attempt succeeded"));
    assert_eq!(e.field("attempt"), Some("3"));
    assert_eq!(e.field("http.response.status_code"), Some("200"));
}

#[tokio::test(start_paused = true)]
async fn the_last_event_says_why_retrying_stopped() {
    let log = TraceLog::default();
    let _guard = log.install();
    let layer = AiRetryLayer::builder()
        .no_budget()
        .max_attempts(2)
        .seed(3)
        .build()
        .unwrap();
    // Not worth retrying: sent once.
    assert_eq!(call(&layer, vec![resp(400, &[])]).await, 400);
    // Worth retrying, but the attempts run out.
    assert_eq!(
        call(&layer, vec![resp(500, &[]), resp(500, &[])]).await,
        500
    );

    let spans = retry_spans(&log);
    assert_eq!(spans.len(), 2);
    let once = events_of(&log, spans[0].0);
    assert_eq!(once.len(), 1, "{once:#?}");
    assert_eq!(once[0].message(), Some("ai_retry stopped"));
    assert_eq!(once[0].field("error.type"), Some("bad_request"));
    assert_eq!(once[0].field("stop"), Some("not_retryable"));
    assert_eq!(spans[0].1.field("attempts"), Some("1"));

    let twice = events_of(&log, spans[1].0);
    assert_eq!(twice.len(), 2, "{twice:#?}");
    assert_eq!(twice[0].message(), Some("ai_retry retrying"));
    assert_eq!(twice[1].message(), Some("ai_retry stopped"));
    assert_eq!(twice[1].field("attempt"), Some("2"));
    assert_eq!(twice[1].field("error.type"), Some("server_error"));
    assert_eq!(twice[1].field("stop"), Some("max_attempts"));
    assert_eq!(spans[1].1.field("attempts"), Some("2"));
}
