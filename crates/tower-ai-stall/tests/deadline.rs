//! StallDetector honours the request's `Deadline`: its total deadline is the earlier of
//! its own and the request's. Paused clock, tower-test mock.

mod support;

use std::time::Duration;

use http::{Request, Response};
use tokio::time::{advance, Instant};
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
use tower_ai_core::{AiError, BoxError, Deadline, StallPhase};
use tower_ai_stall::{StallDetector, StallDetectorLayer};
use tower_test::mock;

use support::*;

const S: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
const OAI_TOKEN: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";

type Mock = mock::Mock<Request<&'static str>, Response<ChanBody>>;
type Handle = mock::Handle<Request<&'static str>, Response<ChanBody>>;

fn service(layer: StallDetectorLayer) -> (mock::Spawn<StallDetector<Mock>>, Handle) {
    mock::spawn_layer(layer)
}

fn stalled(err: &BoxError) -> (StallPhase, Duration) {
    match err.downcast_ref::<AiError>() {
        Some(AiError::Stalled { phase, after, .. }) => (*phase, *after),
        other => panic!("expected Stalled, got {other:?} ({err})"),
    }
}

fn with_deadline(mut req: Request<&'static str>, after: Duration) -> Request<&'static str> {
    Deadline::set(&mut req, Deadline::after(after));
    req
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_never_answers_ends_at_the_requests_deadline() {
    // The default detector: a non-streamed call waits up to its 20-minute total.
    let (mut svc, mut handle) = service(StallDetectorLayer::new());
    assert_ready_ok!(svc.poll_ready());
    let t0 = Instant::now();
    let mut fut = task::spawn(svc.call(with_deadline(unary(OPENAI), 30 * S)));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(30 * S - MS).await;
    assert_pending!(fut.poll());
    advance(MS).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(t0.elapsed(), 30 * S);
    // The caller's deadline, not a stall of the provider's: a breaker does not count it.
    assert!(
        matches!(
            err.downcast_ref::<AiError>(),
            Some(AiError::DeadlineExceeded {
                sent: true,
                bytes_received: 0
            })
        ),
        "{err}"
    );
    let kind = AiError::find(&*err).unwrap().kind();
    assert_eq!(kind, tower_ai_core::ErrorKind::DeadlineExceeded);
    assert!(!kind.is_breaker_failure() && !kind.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn a_later_request_deadline_leaves_the_detectors_own() {
    let layer = StallDetectorLayer::with_config(
        tower_ai_stall::StallConfig::none()
            .to_builder()
            .total(60 * S)
            .build_config()
            .unwrap(),
    );
    let (mut svc, mut handle) = service(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_deadline(unary(OPENAI), 3600 * S)));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(60 * S).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(stalled(&err), (StallPhase::Total, 60 * S));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_keeps_talking_ends_at_the_requests_deadline() {
    let (tx, body) = chan();
    tokio::spawn(async move {
        for _ in 0..100 {
            tx.send(OAI_TOKEN);
            tokio::time::sleep(S).await;
        }
    });
    let (mut svc, mut handle) = service(StallDetectorLayer::new());
    assert_ready_ok!(svc.poll_ready());
    let t0 = Instant::now();
    let fut = svc.call(with_deadline(streamed(OPENAI), 10 * S));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(sse(body));
    let res = fut.await.unwrap();
    let read = read_body(res.into_body()).await;
    assert!(
        t0.elapsed() >= 10 * S && t0.elapsed() <= 10 * S + 5 * MS,
        "{:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            read.ai_error(),
            AiError::DeadlineExceeded { sent: true, bytes_received } if *bytes_received > 0
        ),
        "{:?}",
        read.ai_error()
    );
    assert!(read.frames.len() >= 10, "{}", read.frames.len());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_already_past_is_not_sent() {
    let (mut svc, mut handle) = service(StallDetectorLayer::new());
    assert_ready_ok!(svc.poll_ready());
    let mut req = unary(OPENAI);
    Deadline::set(&mut req, Deadline::at(Instant::now()));
    let mut fut = task::spawn(svc.call(req));
    let err = assert_ready_err!(fut.poll());
    assert!(
        matches!(
            err.downcast_ref::<AiError>(),
            Some(AiError::DeadlineExceeded { sent: false, .. })
        ),
        "{err}"
    );
    // Not sent: the inner service was never called.
    let mut next = task::spawn(handle.next_request());
    assert_pending!(next.poll());
}

/// A per-request [`StallDeadlines`](tower_ai_core::overrides::StallDeadlines) replaces the
/// layer's deadlines for that request only: a long answer gets a longer total.
#[tokio::test(start_paused = true)]
async fn a_requests_stall_deadlines_override_the_layers() {
    use tower_ai_core::overrides::StallDeadlines;
    let layer = StallDetectorLayer::new();
    const MIN: Duration = Duration::from_secs(60);

    // The layer's 20-minute total.
    let (mut svc, mut handle) = service(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(unary(OPENAI)));
    assert_pending!(fut.poll());
    let _pending = handle.next_request().await.unwrap();
    advance(20 * MIN).await;
    assert_eq!(
        stalled(&assert_ready_err!(fut.poll())),
        (StallPhase::Total, 20 * MIN)
    );

    // 40 minutes for this request (a long answer; a zero idle is ignored): still waiting
    // at 20 minutes, cut at 40.
    let (mut svc, mut handle) = service(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut req = unary(OPENAI);
    req.extensions_mut()
        .insert(StallDeadlines::new().total(40 * MIN).idle(Duration::ZERO));
    let mut fut = task::spawn(svc.call(req));
    assert_pending!(fut.poll());
    let _pending = handle.next_request().await.unwrap();
    advance(20 * MIN).await;
    assert_pending!(fut.poll());
    advance(20 * MIN).await;
    assert_eq!(
        stalled(&assert_ready_err!(fut.poll())),
        (StallPhase::Total, 40 * MIN)
    );
}
