//! A streamed answer is judged at its body's end: a provider that sends the role chunk
//! and then fails every stream trips the breaker; a stream read to its clean end is a
//! success; one the caller drops early counts for nothing; a half-open probe resolves at
//! its body's end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_ai_circuit_breaker::{BreakerBody, CircuitBreakerLayer, CircuitState};
use tower_ai_core::keys::Key;
use tower_ai_core::{AiError, BoxError, Classification, ErrorKind, Provider, StallPhase};

const ROLE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// How a stream ends after its role chunk.
#[derive(Clone, Copy, Debug)]
enum End {
    /// `[DONE]`, then EOF.
    Clean,
    /// A first-content stall, as StallDetector reports it.
    Stall,
    /// An in-stream `error` event of this kind, as StallDetector reports it.
    InStream(ErrorKind),
    /// A connection reset.
    Reset,
}

/// A role chunk, then `end`.
struct Stream {
    parts: VecDeque<&'static str>,
    end: Option<End>,
}

impl Body for Stream {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.parts.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(p.as_bytes())))));
        }
        Poll::Ready(match self.end.take() {
            None | Some(End::Clean) => None,
            Some(End::Stall) => Some(Err(Box::new(AiError::Stalled {
                phase: StallPhase::FirstContent,
                after: Duration::from_secs(30),
                bytes_received: ROLE.len() as u64,
            }))),
            Some(End::InStream(kind)) => Some(Err(Box::new(AiError::Provider {
                classification: Classification::failure(kind, Provider::OpenAi),
            }))),
            Some(End::Reset) => Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by peer",
            )))),
        })
    }
    fn is_end_stream(&self) -> bool {
        false
    }
}

type Svc = tower::util::BoxCloneSyncService<Request<String>, Response<Stream>, BoxError>;

/// A provider streaming each answer as `script` says (its head always a 200).
fn provider(script: Arc<Mutex<End>>) -> Svc {
    Svc::new(service_fn(move |_r: Request<String>| {
        let end = *script.lock().unwrap();
        let parts = match end {
            End::Clean => VecDeque::from([ROLE, DONE]),
            _ => VecDeque::from([ROLE]),
        };
        let res = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .body(Stream {
                parts,
                end: Some(end),
            })
            .unwrap();
        std::future::ready(Ok::<_, BoxError>(res))
    }))
}

fn req() -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#.to_owned())
        .unwrap()
}

fn key() -> Key {
    tower_ai_core::keys::KeyFn::<String>::key(&tower_ai_core::keys::HostModel, &req()).unwrap()
}

/// Reads a body to its end or its error.
async fn read(body: BreakerBody<Stream>) -> Result<(), BoxError> {
    let mut body = body;
    while let Some(f) = body.frame().await {
        f?;
    }
    Ok(())
}

fn layer() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(Duration::from_secs(10))
        .half_open_probes(1)
        .half_open_successes(1)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn streams_that_fail_after_the_role_chunk_trip_the_breaker() {
    for end in [
        End::Stall,
        End::InStream(ErrorKind::Overloaded),
        End::InStream(ErrorKind::ServerError),
        End::Reset,
    ] {
        let layer = layer();
        let handle = layer.handle();
        let svc = layer.layer(provider(Arc::new(Mutex::new(end))));
        for _ in 0..5 {
            let res = svc.clone().oneshot(req()).await.unwrap();
            assert_eq!(res.status(), 200, "the head is a success");
            assert!(res.body().is_pending(), "judged at the body's end");
            assert!(read(res.into_body()).await.is_err());
        }
        let m = handle.metrics(key()).unwrap();
        assert_eq!(m.state, CircuitState::Open, "{end:?}: {m:?}");
        let err = svc.clone().oneshot(req()).await.unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<AiError>(),
                Some(AiError::CircuitOpen { .. })
            ),
            "{end:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn clean_streams_succeed_rate_limits_and_dropped_bodies_count_for_nothing() {
    let script = Arc::new(Mutex::new(End::Clean));
    let layer = layer();
    let handle = layer.handle();
    let svc = layer.layer(provider(script.clone()));
    for _ in 0..3 {
        let res = svc.clone().oneshot(req()).await.unwrap();
        read(res.into_body()).await.unwrap();
    }
    let m = handle.metrics(key()).unwrap();
    assert_eq!((m.calls, m.failures), (3, 0), "three clean ends");

    // A head whose body is still held: nothing yet.
    *script.lock().unwrap() = End::Stall;
    let held = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.metrics(key()).unwrap().calls, 3);
    // Dropped before its end: neither a success nor a failure.
    let mut body = held.into_body();
    body.frame().await.unwrap().unwrap(); // the role chunk
    drop(body);
    let m = handle.metrics(key()).unwrap();
    assert_eq!((m.calls, m.failures), (3, 0), "a dropped body is ignored");

    // An in-stream rate limit says nothing of the provider's health.
    *script.lock().unwrap() = End::InStream(ErrorKind::RateLimited);
    for _ in 0..5 {
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert!(read(res.into_body()).await.is_err());
    }
    let m = handle.metrics(key()).unwrap();
    assert_eq!((m.calls, m.failures, m.state), (3, 0, CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_streamed_probe_resolves_at_its_body_end() {
    let script = Arc::new(Mutex::new(End::Stall));
    let layer = layer();
    let handle = layer.handle();
    let mut svc = layer.layer(provider(script.clone()));
    for _ in 0..5 {
        let res = svc.clone().oneshot(req()).await.unwrap();
        let _ = read(res.into_body()).await;
    }
    assert_eq!(handle.state(key()), CircuitState::Open);
    tokio::time::advance(Duration::from_secs(11)).await;

    // The probe's head is a 200; its body stalls: the breaker opens again at the stall.
    let probe = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(handle.state(key()), CircuitState::HalfOpen);
    let refused = svc.clone().oneshot(req()).await.unwrap_err();
    assert!(
        matches!(
            refused.downcast_ref::<AiError>(),
            Some(AiError::CircuitOpen { .. })
        ),
        "the one probe is in flight until its body ends"
    );
    assert!(read(probe.into_body()).await.is_err());
    assert_eq!(handle.state(key()), CircuitState::Open);

    // A probe dropped before its body's end gives its permit back and decides nothing.
    tokio::time::advance(Duration::from_secs(30)).await;
    *script.lock().unwrap() = End::Clean;
    let probe = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.state(key()), CircuitState::HalfOpen);
    drop(probe);
    assert_eq!(handle.state(key()), CircuitState::HalfOpen);
    // The next probe streams to its clean end: closed.
    let probe = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.state(key()), CircuitState::HalfOpen);
    read(probe.into_body()).await.unwrap();
    assert_eq!(handle.state(key()), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_non_streamed_answer_is_still_judged_at_its_head() {
    let layer = layer();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_r: Request<String>| async {
        Ok::<_, BoxError>(Response::new(String::from("{}")))
    }));
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert!(!res.body().is_pending());
    assert_eq!(
        handle.metrics(key()).unwrap().calls,
        1,
        "before the body is read"
    );
    drop(res);
    assert_eq!(handle.metrics(key()).unwrap().calls, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_timed_to_its_head_and_judged_at_its_end() {
    let head_delay = Arc::new(Mutex::new(Duration::from_secs(2)));
    let delay = head_delay.clone();
    let provider = service_fn(move |_r: Request<String>| {
        let delay = *delay.lock().unwrap();
        async move {
            tokio::time::sleep(delay).await;
            let res = Response::builder()
                .header("content-type", "text/event-stream")
                .body(Stream {
                    parts: VecDeque::from([ROLE, DONE]),
                    end: Some(End::Clean),
                })
                .unwrap();
            Ok::<_, BoxError>(res)
        }
    });
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .slow_calls(Duration::from_secs(1), 0.75)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(provider);
    // Two quick heads whose bodies take a minute: not slow.
    *head_delay.lock().unwrap() = Duration::from_millis(10);
    for _ in 0..2 {
        let res = svc.clone().oneshot(req()).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        read(res.into_body()).await.unwrap();
    }
    // Two late heads: slow, recorded at their bodies' ends.
    *head_delay.lock().unwrap() = Duration::from_secs(2);
    for i in 0..2 {
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(handle.metrics(key()).unwrap().slow_calls, i, "not yet");
        read(res.into_body()).await.unwrap();
    }
    let m = handle.metrics(key()).unwrap();
    assert_eq!((m.calls, m.failures, m.slow_calls), (4, 0, 2));
    assert_eq!(m.state, CircuitState::Closed, "2 slow of 4: under 0.75");
}

#[test]
fn the_body_adds_two_words() {
    // An outcome pending travels as the two-word ticket.
    assert_eq!(
        std::mem::size_of::<BreakerBody<()>>(),
        2 * std::mem::size_of::<usize>()
    );
}
