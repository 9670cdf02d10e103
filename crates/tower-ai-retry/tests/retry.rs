//! AiRetry on a paused clock against `tower_test::mock` (under `ClassifyLayer`, as in a
//! real stack).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, AiError, BoxError, Classification, ClassifyLayer, ErrorKind};
use tower_ai_retry::{AiRetryLayer, Backoff, Jitter, OnExhausted, RetryStop, StopReason};
use tower_test::mock;

type Handle = mock::Handle<Request<String>, Response<Full<Bytes>>>;
type Call =
    tokio::task::JoinHandle<Result<Response<tower_ai_core::ClassifiedBody<Full<Bytes>>>, BoxError>>;

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

fn request() -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .body(BODY.to_owned())
        .unwrap()
}

fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// Spawns one call through `layer` → Classify → mock; returns the task and the handle.
fn spawn_call(layer: AiRetryLayer, req: Request<String>) -> (Call, Handle) {
    let (svc, handle) = mock::pair::<Request<String>, Response<Full<Bytes>>>();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(svc);
    (tokio::spawn(svc.oneshot(req)), handle)
}

/// Answers every request with `answer(n)` and records when each arrived.
async fn serve_all(
    mut handle: Handle,
    answer: impl Fn(usize) -> Response<Full<Bytes>>,
) -> Vec<(Duration, Request<String>)> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut n = 0;
    while let Some((req, send)) = handle.next_request().await {
        seen.push((t0.elapsed(), req));
        send.send_response(answer(n));
        n += 1;
    }
    seen
}

fn gaps(seen: &[(Duration, Request<String>)]) -> Vec<Duration> {
    seen.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

async fn body_of(res: Response<tower_ai_core::ClassifiedBody<Full<Bytes>>>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_is_honoured_to_the_millisecond_and_never_undercut() {
    let layer = AiRetryLayer::builder().no_budget().seed(1).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<Full<Bytes>>>();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(svc);
    tokio_test::assert_ready_ok!(tokio_test::task::spawn(()).enter(|cx, _| {
        use tower::Service;
        svc.poll_ready(cx)
    }));
    let mut fut = tokio_test::task::spawn(tower::Service::call(&mut svc, request()));
    tokio_test::assert_pending!(fut.poll());
    let (first, send) = handle.next_request().await.unwrap();
    send.send_response(resp(
        429,
        &[("retry-after-ms", "1234"), ("retry-after", "2")],
        "{}",
    ));
    tokio_test::assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_millis(1233)).await;
    tokio_test::assert_pending!(fut.poll());
    assert!(
        handle.poll_request().is_pending(),
        "retried before retry-after-ms elapsed"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    tokio_test::assert_pending!(fut.poll());
    let (second, send) = handle.next_request().await.unwrap();
    // Same bytes, same idempotency key, attempt numbers 0 then 1.
    assert_eq!(second.body(), BODY);
    assert_eq!(
        first.headers()["idempotency-key"],
        second.headers()["idempotency-key"]
    );
    assert_eq!(first.headers()["idempotency-key"].len(), 32);
    assert_eq!(first.headers()["x-stainless-retry-count"], "0");
    assert_eq!(second.headers()["x-stainless-retry-count"], "1");
    send.send_response(resp(200, &[], "ok"));
    let res = tokio_test::assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), 200);
    assert_eq!(body_of(res).await, "ok");
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_and_http_date_are_used_as_given() {
    let layer = AiRetryLayer::builder()
        .no_budget()
        .max_attempts(3)
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let seen = serve_all(handle, |n| match n {
        0 => resp(503, &[("retry-after", "7")], "busy"),
        1 => resp(
            429,
            &[
                ("retry-after", "Wed, 21 Oct 2015 07:28:03 GMT"),
                ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
            ],
            "{}",
        ),
        _ => resp(200, &[], "done"),
    });
    let (seen, res) = tokio::join!(seen, task);
    assert_eq!(
        gaps(&seen),
        vec![Duration::from_secs(7), Duration::from_secs(3)]
    );
    assert_eq!(res.unwrap().unwrap().status(), 200);
}

/// One run of 5 attempts against 500s without a requested wait: the backoff's waits.
async fn waits(jitter: Jitter, seed: u64) -> Vec<Duration> {
    let layer = AiRetryLayer::builder()
        .no_budget()
        .max_attempts(5)
        .backoff(Backoff::new(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(1),
            jitter,
        ))
        .seed(seed)
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let (seen, res) = tokio::join!(serve_all(handle, |_| resp(500, &[], "oops")), task);
    let res = res.unwrap().unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop {
            attempts: 5,
            reason: StopReason::MaxAttempts
        })
    );
    assert_eq!(seen.len(), 5);
    gaps(&seen)
}

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|m| Duration::from_millis(*m)).collect()
}

fn rounded(v: Vec<Duration>) -> Vec<u64> {
    v.iter().map(|d| d.as_millis() as u64).collect()
}

#[tokio::test(start_paused = true)]
async fn exact_wait_sequences_per_jitter_mode() {
    assert_eq!(waits(Jitter::None, 42).await, ms(&[100, 200, 400, 800]));
    // Seeded: the same sequence every run (the paused clock resolves to the millisecond).
    let full = rounded(waits(Jitter::Full, 42).await);
    let equal = rounded(waits(Jitter::Equal, 42).await);
    let decorrelated = rounded(waits(Jitter::Decorrelated, 42).await);
    println!("full {full:?} equal {equal:?} decorrelated {decorrelated:?}");
    assert_eq!(full, GOLDEN_FULL);
    assert_eq!(equal, GOLDEN_EQUAL);
    assert_eq!(decorrelated, GOLDEN_DECORRELATED);
    assert_eq!(rounded(waits(Jitter::Full, 42).await), full);
    assert_ne!(rounded(waits(Jitter::Full, 43).await), full);
    // Each within its mode's range.
    let ceil = [100u64, 200, 400, 800];
    for (i, w) in full.iter().enumerate() {
        assert!(*w <= ceil[i]);
    }
    for (i, w) in equal.iter().enumerate() {
        assert!(*w >= ceil[i] / 2 && *w <= ceil[i]);
    }
    let mut prev = 100;
    for w in &decorrelated {
        assert!(*w >= 100 && *w <= (prev * 2).min(1000), "{w} after {prev}");
        prev = *w;
    }
}

// Recorded with seed 42 (base 100 ms, multiplier 2, cap 1 s); a change in how the RNG
// is drawn shows up here.
const GOLDEN_FULL: [u64; 4] = [64, 110, 172, 49];
const GOLDEN_EQUAL: [u64; 4] = [82, 155, 286, 425];
const GOLDEN_DECORRELATED: [u64; 4] = [164, 224, 250, 125];

#[tokio::test(start_paused = true)]
async fn non_retryable_classes_are_sent_exactly_once() {
    let quota = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let too_large = r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 31538. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    let cases: Vec<(u16, &str)> = vec![
        (429, quota),
        (429, too_large),
        (
            400,
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#,
        ),
        (
            401,
            r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
        ),
        (403, "forbidden"),
        (
            404,
            r#"{"error":{"message":"The model does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        ),
        (422, "unprocessable"),
    ];
    for (status, body) in cases {
        let layer = AiRetryLayer::builder().max_attempts(5).build().unwrap();
        let (task, handle) = spawn_call(layer, request());
        let body_owned = body.to_owned();
        let (seen, res) = tokio::join!(
            serve_all(handle, move |_| resp(
                status,
                &[("retry-after", "1")],
                &body_owned
            )),
            task
        );
        assert_eq!(seen.len(), 1, "status {status} was retried");
        let res = res.unwrap().unwrap();
        assert_eq!(res.status(), status);
        assert_eq!(
            res.extensions().get::<RetryStop>().unwrap().reason,
            StopReason::NotRetryable
        );
        // The caller gets the provider's body whole.
        assert_eq!(body_of(res).await, body);
    }
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_is_obeyed() {
    let layer = AiRetryLayer::builder().max_attempts(5).build().unwrap();
    let (task, handle) = spawn_call(layer, request());
    let (seen, res) = tokio::join!(
        serve_all(handle, |_| resp(500, &[("x-should-retry", "false")], "{}")),
        task
    );
    assert_eq!(seen.len(), 1);
    assert_eq!(res.unwrap().unwrap().status(), 500);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_never_exceeded() {
    // Backoff 1, 2, 4, 8 s without jitter; deadline 10 s: attempts at 0, 1, 3, 7, and
    // the next wait (8 s) would cross it.
    let layer = AiRetryLayer::builder()
        .no_budget()
        .max_attempts(10)
        .max_elapsed(Duration::from_secs(10))
        .backoff(Backoff::new(
            Duration::from_secs(1),
            2.0,
            Duration::from_secs(60),
            Jitter::None,
        ))
        .build()
        .unwrap();
    let start = Instant::now();
    let (task, handle) = spawn_call(layer.clone(), request());
    let (seen, res) = tokio::join!(serve_all(handle, |_| resp(502, &[], "bad gateway")), task);
    let at: Vec<u64> = seen.iter().map(|(t, _)| t.as_secs()).collect();
    assert_eq!(at, vec![0, 1, 3, 7]);
    assert!(start.elapsed() <= Duration::from_secs(10));
    let res = res.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<RetryStop>().unwrap().reason,
        StopReason::Deadline
    );

    // Provider waits of 3 s: attempts at 0, 3, 6, 9 s; 12 s would cross.
    let start = Instant::now();
    let (task, handle) = spawn_call(layer, request());
    let (seen, _) = tokio::join!(
        serve_all(handle, |_| resp(429, &[("retry-after", "3")], "{}")),
        task
    );
    let at: Vec<u64> = seen.iter().map(|(t, _)| t.as_secs()).collect();
    assert_eq!(at, vec![0, 3, 6, 9]);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn a_wait_above_max_ends_retries_at_once_with_the_wait_attached() {
    // Default: the last response as it is, with RetryStop and a classification whose wait
    // exceeds the maximum.
    let layer = AiRetryLayer::builder()
        .max_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let start = Instant::now();
    let (seen, res) = tokio::join!(
        serve_all(handle, |_| resp(429, &[("retry-after", "45")], "slow down")),
        task
    );
    assert_eq!(seen.len(), 1);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "slept for a wait it refused"
    );
    let res = res.unwrap().unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.extensions().get::<RetryStop>().unwrap().reason,
        StopReason::WaitTooLong
    );
    let c = res.extensions().get::<Classification>().unwrap();
    let w = c.wait.unwrap();
    assert!(w.exceeds_max());
    assert_eq!(w.requested, Duration::from_secs(45));
    assert_eq!(w.delay, Duration::from_secs(30));
    assert_eq!(body_of(res).await, "slow down");

    // Error mode: RetriesExhausted carrying the wait.
    let layer = AiRetryLayer::builder()
        .max_wait(Duration::from_secs(30))
        .on_exhausted(OnExhausted::Error)
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let (_, res) = tokio::join!(
        serve_all(handle, |_| resp(429, &[("retry-after", "45")], "{}")),
        task
    );
    let err = res.unwrap().unwrap_err();
    match err.downcast_ref::<AiError>() {
        Some(AiError::RetriesExhausted {
            attempts: 1,
            last,
            wait: Some(w),
        }) => {
            assert!(w.exceeds_max());
            assert_eq!(last.kind, Some(ErrorKind::RateLimited));
        }
        other => panic!("unexpected {other:?}"),
    }

    // Error mode, attempts used up: wait is None.
    let layer = AiRetryLayer::builder()
        .max_attempts(2)
        .on_exhausted(OnExhausted::Error)
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let (seen, res) = tokio::join!(
        serve_all(handle, |_| resp(503, &[("retry-after", "1")], "{}")),
        task
    );
    assert_eq!(seen.len(), 2);
    assert!(matches!(
        res.unwrap().unwrap_err().downcast_ref::<AiError>(),
        Some(AiError::RetriesExhausted {
            attempts: 2,
            wait: None,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn max_wait_above_classifys_default_max_is_honoured() {
    // Classify clamps its `delay` to its own 120 s default and flags the wait as
    // exceeding it; AiRetry's own max_wait (300 s) alone decides.
    let layer = AiRetryLayer::builder()
        .max_wait(Duration::from_secs(300))
        .no_budget()
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let start = Instant::now();
    let (seen, res) = tokio::join!(
        serve_all(handle, |n| match n {
            0 => resp(429, &[("retry-after", "200")], "slow down"),
            _ => resp(200, &[], "{}"),
        }),
        task
    );
    assert_eq!(seen.len(), 2, "the 200 s wait was refused");
    assert_eq!(gaps(&seen), vec![Duration::from_secs(200)]);
    assert_eq!(start.elapsed(), Duration::from_secs(200));
    let res = res.unwrap().unwrap();
    assert_eq!(res.status(), 200);

    // Above our max_wait it is still refused at once, the wait clamped to our maximum.
    let layer = AiRetryLayer::builder()
        .max_wait(Duration::from_secs(300))
        .build()
        .unwrap();
    let (task, handle) = spawn_call(layer, request());
    let start = Instant::now();
    let (seen, res) = tokio::join!(
        serve_all(handle, |_| resp(429, &[("retry-after", "400")], "{}")),
        task
    );
    assert_eq!(seen.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
    let res = res.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<RetryStop>().unwrap().reason,
        StopReason::WaitTooLong
    );
    let w = res
        .extensions()
        .get::<Classification>()
        .unwrap()
        .wait
        .unwrap();
    assert!(w.exceeds_max());
    assert_eq!(w.requested, Duration::from_secs(400));
    assert_eq!(w.delay, Duration::from_secs(300));
}

#[tokio::test(start_paused = true)]
async fn hostile_retry_after_values_never_panic_or_sleep_unbounded() {
    for (value, expect_retry) in [
        ("-5", true),
        ("inf", false),
        ("NaN", true),
        ("99999999999999999999", false),
        ("1e400", false),
        ("Mon, 99 Foo 2015 99:99:99 GMT", true),
        ("\u{7f}garbage", true),
        ("0", true),
        ("", true),
    ] {
        let layer = AiRetryLayer::builder()
            .max_attempts(2)
            .max_wait(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut b = Response::builder().status(429);
        if let Ok(v) = http::HeaderValue::from_bytes(value.as_bytes()) {
            b = b.header("retry-after", v);
        }
        let proto = b.body(()).unwrap();
        let headers = proto.headers().clone();
        let (task, handle) = spawn_call(layer, request());
        let start = Instant::now();
        let (seen, res) = tokio::join!(
            serve_all(handle, move |_| {
                let mut r = resp(429, &[], "{}");
                *r.headers_mut() = headers.clone();
                r
            }),
            task
        );
        let res = res.unwrap().unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(seen.len() == 2, expect_retry, "retry-after {value:?}");
        // Retried ones backed off (≤ 0.5 s with the default full jitter); refused ones at once.
        assert!(
            start.elapsed() <= Duration::from_millis(500),
            "{value:?} slept {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn missing_and_non_json_bodies_are_retried_and_delivered_whole() {
    let html = "<html><body>502 Bad Gateway</body></html>";
    let layer = AiRetryLayer::builder().max_attempts(3).build().unwrap();
    let (task, handle) = spawn_call(layer, request());
    let (seen, res) = tokio::join!(
        serve_all(handle, move |n| match n {
            0 => resp(500, &[], ""),
            _ => resp(502, &[("content-type", "text/html")], html),
        }),
        task
    );
    assert_eq!(seen.len(), 3);
    let res = res.unwrap().unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(body_of(res).await, html);

    // A request with an empty body is replayed as it is.
    let layer = AiRetryLayer::builder().max_attempts(2).build().unwrap();
    let req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(String::new())
        .unwrap();
    let (task, handle) = spawn_call(layer, req);
    let (seen, _) = tokio::join!(serve_all(handle, |_| resp(503, &[], "")), task);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].1.body(), "");
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_unknown_errors_are_not() {
    let layer = AiRetryLayer::builder().max_attempts(3).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer.clone()).service(svc);
    let task = tokio::spawn(svc.oneshot(request()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new("fine".to_owned()));
    assert_eq!(task.await.unwrap().unwrap().into_body(), "fine");

    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let task = tokio::spawn(svc.oneshot(request()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("some application error");
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "some application error");
    assert!(handle.next_request().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn cooling_down_refusals_are_waited_out_until_their_end() {
    let layer = AiRetryLayer::builder().max_attempts(2).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(request()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(AiError::CoolingDown {
        key: "k".into(),
        until: start + Duration::from_millis(2500),
    });
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    send.send_response(Response::new("ok".to_owned()));
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_unreplayable_body_is_sent_once() {
    let layer = AiRetryLayer::builder().max_attempts(5).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<AiBody>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let stream = AiBody::streaming(Full::new(Bytes::from_static(b"{}")));
    let req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(stream)
        .unwrap();
    let task = tokio::spawn(svc.oneshot(req));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(
        Response::builder()
            .status(503)
            .body("down".to_owned())
            .unwrap(),
    );
    let res = task.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.extensions().get::<RetryStop>().unwrap().reason,
        StopReason::NotReplayable
    );
    assert!(handle.next_request().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn idempotency_key_rules() {
    let layer = AiRetryLayer::builder().max_attempts(1).build().unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer.clone()).service(svc);
    // GET: none.
    let get = Request::get("https://api.openai.com/v1/models")
        .body(String::new())
        .unwrap();
    let t = tokio::spawn(svc.clone().oneshot(get));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(req.headers().get("idempotency-key").is_none());
    assert_eq!(req.headers()["x-stainless-retry-count"], "0");
    send.send_response(Response::new(String::new()));
    t.await.unwrap().unwrap();
    // The caller's own key is kept.
    let mut own = request();
    own.headers_mut()
        .insert("idempotency-key", "mine".parse().unwrap());
    let t = tokio::spawn(svc.clone().oneshot(own));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["idempotency-key"], "mine");
    send.send_response(Response::new(String::new()));
    t.await.unwrap().unwrap();
    // Two calls, two keys; turned off, none.
    let a = tokio::spawn(svc.clone().oneshot(request()));
    let (ra, sa) = handle.next_request().await.unwrap();
    sa.send_response(Response::new(String::new()));
    let b = tokio::spawn(svc.clone().oneshot(request()));
    let (rb, sb) = handle.next_request().await.unwrap();
    sb.send_response(Response::new(String::new()));
    assert_ne!(
        ra.headers()["idempotency-key"],
        rb.headers()["idempotency-key"]
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let off = AiRetryLayer::builder()
        .idempotency_header(None)
        .attempt_header(None)
        .build()
        .unwrap();
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let t = tokio::spawn(
        ServiceBuilder::new()
            .layer(off)
            .service(svc)
            .oneshot(request()),
    );
    let (req, send) = handle.next_request().await.unwrap();
    assert!(req.headers().get("idempotency-key").is_none());
    assert!(req.headers().get("x-stainless-retry-count").is_none());
    send.send_response(Response::new(String::new()));
    t.await.unwrap().unwrap();
}

#[test]
fn the_builder_rejects_zero_and_absurd_values() {
    let err = |b: tower_ai_retry::AiRetryConfigBuilder| b.build().unwrap_err().to_string();
    assert_eq!(
        err(AiRetryLayer::builder().max_attempts(0)),
        "invalid max_attempts: must be at least 1 (1 = no retry)"
    );
    assert!(err(AiRetryLayer::builder().max_attempts(1000)).contains("absurd"));
    assert!(
        err(AiRetryLayer::builder().max_elapsed(Duration::ZERO)).starts_with("invalid max_elapsed")
    );
    assert!(err(AiRetryLayer::builder().backoff(Backoff::new(
        Duration::ZERO,
        2.0,
        Duration::from_secs(1),
        Jitter::Full
    )))
    .contains("tight loop"));
    assert!(err(AiRetryLayer::builder().backoff(Backoff::new(
        Duration::from_secs(2),
        2.0,
        Duration::from_secs(1),
        Jitter::Full
    )))
    .starts_with("invalid backoff cap"));
    assert!(err(AiRetryLayer::builder().backoff(Backoff::new(
        Duration::from_secs(1),
        f64::NAN,
        Duration::from_secs(5),
        Jitter::Full
    )))
    .starts_with("invalid backoff multiplier"));
    assert!(err(AiRetryLayer::builder().backoff(Backoff::new(
        Duration::from_secs(1),
        0.5,
        Duration::from_secs(5),
        Jitter::Full
    )))
    .starts_with("invalid backoff multiplier"));
    assert!(err(AiRetryLayer::builder().max_wait(Duration::ZERO)).starts_with("invalid max_wait"));
    assert!(
        err(AiRetryLayer::builder().max_wait(Duration::from_secs(10 * 86_400)))
            .starts_with("invalid max_wait")
    );
    assert!(
        err(AiRetryLayer::builder().idempotency_header(Some("bad header")))
            .contains("not a valid header name")
    );
    assert!(
        err(AiRetryLayer::builder().budget(Duration::from_secs(10), 0, 0.0))
            .contains("allow no retry")
    );
    assert!(
        err(AiRetryLayer::builder().budget(Duration::from_secs(3600), 1, 0.1))
            .starts_with("invalid retry budget ttl")
    );
    assert!(AiRetryLayer::builder().build().is_ok());
    let cfg = AiRetryLayer::builder()
        .attempt_header(Some("X-Attempt"))
        .build_config()
        .unwrap();
    assert_eq!(cfg.attempt_header().map(|h| h.as_str()), Some("x-attempt"));
    assert_eq!(
        AiRetryLayer::builder()
            .build_config()
            .unwrap()
            .idempotency_header()
            .map(|h| h.as_str()),
        Some("idempotency-key")
    );
}

#[tokio::test(start_paused = true)]
async fn an_absurd_model_name_is_refused_before_any_call() {
    // Issue #16: a 1 MiB model name went down the stack and into every per-key label.
    let body = format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(1 << 20));
    let req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(body)
        .unwrap();
    let (call, mut handle) = spawn_call(AiRetryLayer::new(3), req);
    let err = call.await.unwrap().unwrap_err();
    match err.downcast_ref::<AiError>() {
        Some(e @ AiError::ModelTooLong { len, max }) => {
            assert_eq!((*len, *max), (1 << 20, 256));
            assert_eq!(e.kind(), ErrorKind::BadRequest);
            assert!(e.to_string().len() < 100, "{e}");
        }
        other => panic!("expected ModelTooLong, got {other:?}"),
    }
    // Nothing reached the wire; a 256-byte name still goes.
    assert!(handle.next_request().await.is_none());
    let ok = format!(r#"{{"model":"{}"}}"#, "m".repeat(256));
    let (call, mut handle) = spawn_call(
        AiRetryLayer::new(3),
        Request::post("https://api.openai.com/v1/chat/completions")
            .body(ok)
            .unwrap(),
    );
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(200, &[], "{}"));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}
