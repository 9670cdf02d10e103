//! AiRetry never starts a wait or an attempt that cannot finish before the request's
//! `Deadline`. Paused clock, tower-test mock under Classify.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiError, BoxError, ClassifyLayer, Deadline, StallPhase};
use tower_ai_retry::{AiRetryLayer, Backoff, Jitter, OnExhausted, RetryStop, StopReason};
use tower_ai_sim::testing::TraceLog;
use tower_test::mock;

type Handle = mock::Handle<Request<String>, Response<Full<Bytes>>>;
type Answer = Result<Response<Full<Bytes>>, BoxError>;

const S: Duration = Duration::from_secs(1);

fn request(deadline: Option<Duration>) -> Request<String> {
    let mut req = Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap();
    if let Some(d) = deadline {
        Deadline::set(&mut req, Deadline::after(d));
    }
    req
}

fn resp(status: u16, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

/// Backoff 1, 2, 4, 8 s without jitter, 5 attempts.
fn layer() -> AiRetryLayer {
    AiRetryLayer::builder()
        .no_budget()
        .max_attempts(5)
        .backoff(Backoff::new(S, 2.0, 60 * S, Jitter::None))
        .build()
        .unwrap()
}

/// One call through `layer` → Classify → a mock answering `answer(n)`; returns the
/// instants (from the call) of the attempts and the result.
async fn run(
    layer: AiRetryLayer,
    req: Request<String>,
    answer: impl Fn(usize) -> Answer,
) -> (Vec<Duration>, Result<StatusAndStop, BoxError>) {
    let (svc, mut handle): (_, Handle) = mock::pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(svc);
    let t0 = Instant::now();
    let task = tokio::spawn(svc.oneshot(req));
    let mut seen = Vec::new();
    let served = async {
        let mut n = 0;
        while let Some((_, send)) = handle.next_request().await {
            seen.push(t0.elapsed());
            match answer(n) {
                Ok(r) => send.send_response(r),
                Err(e) => send.send_error(e),
            }
            n += 1;
        }
    };
    let (_, res) = tokio::join!(served, task);
    let res = res.unwrap().map(|r| StatusAndStop {
        status: r.status().as_u16(),
        stop: r.extensions().get::<RetryStop>().copied(),
        at: t0.elapsed(),
    });
    (seen, res)
}

#[derive(Debug)]
struct StatusAndStop {
    status: u16,
    stop: Option<RetryStop>,
    at: Duration,
}

#[tokio::test(start_paused = true)]
async fn a_backoff_that_would_end_past_the_deadline_is_not_started() {
    // Without a deadline: attempts at 0, 1, 3, 7, 15 s.
    let (seen, _) = run(layer(), request(None), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen, [Duration::ZERO, S, 3 * S, 7 * S, 15 * S]);

    // Deadline 7 s: after the attempt at 3 s the 4 s wait would end at 7 s, when no
    // attempt can be answered in time any more.
    let (seen, res) = run(layer(), request(Some(7 * S)), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen, [Duration::ZERO, S, 3 * S]);
    let res = res.unwrap();
    assert_eq!(res.status, 502, "the last answer");
    assert_eq!(res.at, 3 * S, "no wait was started");
    assert_eq!(
        res.stop,
        Some(RetryStop {
            attempts: 3,
            reason: StopReason::RequestDeadline
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_deadline_ends_retrying_at_once() {
    let (seen, res) = run(layer(), request(Some(20 * S)), |_| {
        Ok(resp(429, &[("retry-after", "30")]))
    })
    .await;
    assert_eq!(seen, [Duration::ZERO]);
    let res = res.unwrap();
    assert_eq!((res.status, res.at), (429, Duration::ZERO));
    assert_eq!(res.stop.unwrap().reason, StopReason::RequestDeadline);

    // The same wait inside the deadline is honoured.
    let (seen, _) = run(layer(), request(Some(40 * S)), |n| {
        Ok(if n == 0 {
            resp(429, &[("retry-after", "30")])
        } else {
            resp(200, &[])
        })
    })
    .await;
    assert_eq!(seen, [Duration::ZERO, 30 * S]);
}

#[tokio::test(start_paused = true)]
async fn a_stall_that_used_the_whole_deadline_is_not_retried() {
    // What StallDetector returns when the request's deadline ends the wait.
    let stalled = || -> BoxError {
        Box::new(AiError::Stalled {
            phase: StallPhase::Total,
            after: 10 * S,
            bytes_received: 0,
        })
    };
    let (svc, mut handle): (_, Handle) = mock::pair();
    let svc = ServiceBuilder::new()
        .layer(layer())
        .layer(ClassifyLayer::new())
        .service(svc);
    let t0 = Instant::now();
    let task = tokio::spawn(svc.oneshot(request(Some(10 * S))));
    let (_, send) = handle.next_request().await.unwrap();
    tokio::time::sleep(10 * S).await;
    send.send_error(stalled());
    // A second attempt would reach the mock; the call must end instead.
    let err = tokio::select! {
        res = task => res.unwrap().unwrap_err(),
        Some(_) = handle.next_request() => panic!("a second attempt after the deadline"),
    };
    assert_eq!(t0.elapsed(), 10 * S);
    assert!(matches!(
        AiError::find(&*err),
        Some(AiError::Stalled { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_stop_event_says_it_was_the_deadline_and_on_exhausted_error_applies() {
    let log = TraceLog::default();
    let _guard = log.install();
    let (_, res) = run(layer(), request(Some(2 * S)), |_| Ok(resp(503, &[]))).await;
    assert_eq!(
        res.unwrap().stop.unwrap().reason,
        StopReason::RequestDeadline
    );
    let stopped: Vec<_> = log
        .events()
        .into_iter()
        .filter(|e| e.message() == Some("ai_retry stopped"))
        .collect();
    assert_eq!(stopped.len(), 1, "{stopped:#?}");
    assert_eq!(stopped[0].field("stop"), Some("request_deadline"));

    let strict = AiRetryLayer::builder()
        .no_budget()
        .max_attempts(5)
        .backoff(Backoff::new(S, 2.0, 60 * S, Jitter::None))
        .on_exhausted(OnExhausted::Error)
        .build()
        .unwrap();
    let (seen, res) = run(strict, request(Some(2 * S)), |_| Ok(resp(503, &[]))).await;
    assert_eq!(seen, [Duration::ZERO, S]);
    assert!(matches!(
        AiError::find(&*res.unwrap_err()),
        Some(AiError::RetriesExhausted { attempts: 2, .. })
    ));
}

/// A per-request [`RetryLimits`](tower_ai_core::overrides::RetryLimits) replaces the
/// layer's most attempts for that request only (within 1..=100).
#[tokio::test(start_paused = true)]
async fn a_requests_retry_limits_override_the_layers() {
    use tower_ai_core::overrides::RetryLimits;
    let with = |n: u32| {
        let mut req = request(None);
        req.extensions_mut()
            .insert(RetryLimits::new().max_attempts(n));
        req
    };
    // The layer's 5 attempts; 1 (no retry) and 2 for requests that say so.
    let (seen, _) = run(layer(), request(None), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen.len(), 5);
    let (seen, res) = run(layer(), with(1), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen, [Duration::ZERO]);
    assert_eq!(
        res.unwrap().stop.map(|s| s.reason),
        Some(StopReason::MaxAttempts)
    );
    let (seen, _) = run(layer(), with(2), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen, [Duration::ZERO, S]);
    // More than the layer's, up to its ceiling of 100: 7 attempts.
    let (seen, _) = run(layer(), with(7), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen.len(), 7);
    // Zero is taken as 1.
    let (seen, _) = run(layer(), with(0), |_| Ok(resp(502, &[]))).await;
    assert_eq!(seen.len(), 1);
}
