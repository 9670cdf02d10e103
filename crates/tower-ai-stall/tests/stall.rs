//! StallDetector on a paused clock, against a tower-test mock whose response bodies the
//! tests feed chunk by chunk.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::time::{advance, Instant};
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
use tower_ai_core::stream::FinishReason;
use tower_ai_core::{AiError, BoxError, ErrorKind, StallPhase, Usage};
use tower_ai_stall::{
    StallBody, StallConfig, StallConfigBuilder, StallDetector, StallDetectorLayer, StreamEnd,
    StreamOutcome,
};
use tower_test::mock;

use support::*;

const S: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

type Mock = mock::Mock<Request<&'static str>, Response<ChanBody>>;
type Handle = mock::Handle<Request<&'static str>, Response<ChanBody>>;

/// A config with every deadline off: each test turns on what it tests.
fn cfg() -> StallConfigBuilder {
    StallConfig::none().to_builder()
}

fn service(config: StallConfigBuilder) -> (mock::Spawn<StallDetector<Mock>>, Handle) {
    let layer = StallDetectorLayer::with_config(config.build_config().unwrap());
    mock::spawn_layer(layer)
}

/// Expected within a timer tick of `at`.
#[track_caller]
fn assert_at(actual: Duration, at: Duration) {
    assert!(
        actual >= at && actual <= at + 5 * MS,
        "ended at {actual:?}, expected {at:?}"
    );
}

fn stalled(err: &BoxError) -> (StallPhase, Duration, u64) {
    match err.downcast_ref::<AiError>() {
        Some(AiError::Stalled {
            phase,
            after,
            bytes_received,
        }) => (*phase, *after, *bytes_received),
        other => panic!("expected Stalled, got {other:?} ({err})"),
    }
}

/// Calls the service with `req`, answers `res`, and awaits the response.
async fn call(
    config: StallConfigBuilder,
    req: Request<&'static str>,
    res: Response<ChanBody>,
) -> Result<Response<StallBody<ChanBody>>, BoxError> {
    let (mut svc, mut handle) = service(config);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(req);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(res);
    fut.await
}

/// One step of a stream the tests script.
#[derive(Clone, Copy)]
enum Step {
    Wait(Duration),
    Send(&'static str),
    /// Keep the connection open, send nothing, forever.
    Hang,
    /// Fail the body (a reset connection).
    Fail,
}
use Step::*;

/// Plays `steps` into `tx` on the (paused) clock; the body ends after the last step unless
/// it is `Hang`.
fn play(tx: Tx, steps: &[Step]) {
    let steps = steps.to_vec();
    tokio::spawn(async move {
        for step in steps {
            match step {
                Wait(d) => tokio::time::sleep(d).await,
                Send(s) => {
                    tx.send(s);
                }
                Hang => std::future::pending::<()>().await,
                Fail => tx.fail(reset()),
            }
        }
    });
}

/// The bytes the script sends.
fn sent(steps: &[Step]) -> Vec<u8> {
    steps
        .iter()
        .filter_map(|s| match s {
            Send(s) => Some(s.as_bytes()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

// Dialect fixtures (shapes from docs/protocols.md#openai-chat-stream,
// docs/protocols.md#anthropic-stream and docs/protocols.md#gemini-stream).
const OAI_ROLE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
const OAI_TOKEN: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const OAI_LENGTH: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n";
const OAI_USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":30,\"total_tokens\":44}}\n\n";
const OAI_DONE: &str = "data: [DONE]\n\n";
const OAI_ERROR: &str = "data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
const COMMENT: &str = ": OPENROUTER PROCESSING\n\n";

const ANT_START: &str = "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude\", \"stop_reason\": null, \"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\n";
const ANT_PING: &str = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
const ANT_DELTA: &str = "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n";
const ANT_MAX_TOKENS: &str = "event: message_delta\ndata: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"max_tokens\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\n";
const ANT_STOP: &str = "event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n";
const ANT_ERROR: &str = "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";

const GEM_TOKEN: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hi\"}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 10,\"totalTokenCount\": 10}}\r\n\r\n";
const GEM_MAX: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" there\"}],\"role\": \"model\"},\"finishReason\": \"MAX_TOKENS\"}],\"usageMetadata\": {\"promptTokenCount\": 10,\"candidatesTokenCount\": 49,\"totalTokenCount\": 59}}\r\n\r\n";
const GEM_STOP: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" there\"}],\"role\": \"model\"},\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 10,\"candidatesTokenCount\": 2,\"totalTokenCount\": 12}}\r\n\r\n";
const GEM_ERROR: &str = "data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded. Please try again later.\", \"status\": \"UNAVAILABLE\"}}\r\n\r\n";

const RESP_DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"delta\":\"Hi\"}\n\n";
const RESP_DONE: &str = "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":5,\"output_tokens\":7,\"total_tokens\":12}}}\n\n";
const RESP_FAILED: &str = "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":9,\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n";

const LLAMA_ERROR: &str = "error: {\"code\":400,\"message\":\"the request exceeds the available context size, try increasing it\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";

// ---------------------------------------------------------------- before the head

#[tokio::test(start_paused = true)]
async fn head_deadline_is_a_retryable_error_of_the_call() {
    let (mut svc, mut handle) = service(cfg().head(5 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(streamed(OPENAI)));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(5 * S - MS).await;
    assert_pending!(fut.poll());
    advance(2 * MS).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(stalled(&err), (StallPhase::Head, 5 * S, 0));
    assert_eq!(ErrorKind::of_error(&*err), ErrorKind::Stalled);
}

#[tokio::test(start_paused = true)]
async fn a_stream_true_body_gets_the_streamed_head_deadline_without_accept_or_meta() {
    // The defaults (as `AiStack::new()` has them): no `accept` header, no RequestMeta,
    // only `"stream": true` in the body. The head deadline is the streamed one (60 s),
    // not the 20-minute total.
    let (mut svc, mut handle) = service(StallConfig::default().to_builder());
    assert_ready_ok!(svc.poll_ready());
    let req = Request::post(OPENAI)
        .body(r#"{"model":"gpt-4o","messages":[],"stream":true}"#)
        .unwrap();
    let mut fut = task::spawn(svc.call(req));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(tower_ai_stall::DEFAULT_HEAD - MS).await;
    assert_pending!(fut.poll());
    advance(2 * MS).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(
        stalled(&err),
        (StallPhase::Head, tower_ai_stall::DEFAULT_HEAD, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn unary_requests_wait_for_their_head_until_the_total_deadline() {
    // A non-streamed answer's head comes only once it is generated: the streamed head
    // deadline does not apply, the total deadline does.
    let (mut svc, mut handle) = service(cfg().head(5 * S).total(600 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(unary(OPENAI)));
    // Deadlines run from the first poll (a client sends nothing before it).
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(599 * S).await;
    assert_pending!(fut.poll());
    advance(S + MS).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(stalled(&err), (StallPhase::Total, 600 * S, 0));

    // With `unary_head` set, it applies to them.
    let (mut svc, mut handle) = service(cfg().head(5 * S).unary_head(120 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(unary(OPENAI)));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    advance(119 * S).await;
    assert_pending!(fut.poll());
    advance(S + MS).await;
    assert_eq!(stalled(&assert_ready_err!(fut.poll())).0, StallPhase::Head);
}

#[tokio::test(start_paused = true)]
async fn a_head_in_time_is_passed_on_and_inner_errors_unchanged() {
    let (mut svc, mut handle) = service(cfg().head(5 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(streamed(OPENAI)));
    let (_req, send) = handle.next_request().await.unwrap();
    advance(4 * S).await;
    let (tx, body) = chan();
    tx.send(OAI_TOKEN);
    send.send_response(sse(body));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), 200);
    // No later deadline is armed: nothing fires after the head deadline.
    drop(tx);
    let read = read_body(res.into_body()).await;
    assert_eq!(read.bytes(), OAI_TOKEN.as_bytes());

    let (mut svc, mut handle) = service(cfg().head(5 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(streamed(OPENAI)));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("connect refused"));
    let err = assert_ready_err!(fut.poll());
    assert!(err.downcast_ref::<std::io::Error>().is_some(), "{err}");
}

// ---------------------------------------------------------------- before the first byte

#[tokio::test(start_paused = true)]
async fn first_byte_stall_is_an_error_of_the_call_by_default() {
    let (mut svc, mut handle) = service(cfg().first_byte(10 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(streamed(ANTHROPIC)));
    let (_req, send) = handle.next_request().await.unwrap();
    advance(2 * S).await;
    let (tx, body) = chan();
    send.send_response(sse(body));
    // The head arrived, but the future holds it until the first byte.
    assert_pending!(fut.poll());
    advance(10 * S - MS).await;
    assert_pending!(fut.poll());
    advance(2 * MS).await;
    let err = assert_ready_err!(fut.poll());
    assert_eq!(stalled(&err), (StallPhase::FirstByte, 10 * S, 0));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn first_byte_in_time_is_delivered_whole_and_not_copied() {
    let (mut svc, mut handle) = service(cfg().first_byte(10 * S));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(streamed(ANTHROPIC)));
    let (_req, send) = handle.next_request().await.unwrap();
    let (tx, body) = chan();
    send.send_response(sse(body));
    assert_pending!(fut.poll());
    advance(9 * S).await;
    let first = tx.send(ANT_START);
    let res = assert_ready_ok!(fut.poll());
    let second = tx.send(ANT_DELTA);
    let third = tx.send(ANT_STOP);
    drop(tx);
    let read = read_body(res.into_body()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    // The very same buffers, in order: zero copies.
    assert_eq!(read.frames.len(), 3);
    for (got, sent) in read.frames.iter().zip([first, second, third]) {
        assert_eq!(got.as_ptr(), sent.as_ptr());
        assert_eq!(got, &sent);
    }
}

#[tokio::test(start_paused = true)]
async fn first_byte_stall_is_a_body_error_when_not_awaited() {
    let config = cfg().first_byte(10 * S).await_first_byte(false);
    let t0 = Instant::now();
    let (tx, body) = chan();
    let res = call(config, streamed(OPENAI), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert_at(t0.elapsed(), 10 * S);
    assert_eq!(read.stall(), (StallPhase::FirstByte, 10 * S, 0));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn failures_before_any_byte_are_errors_of_the_call() {
    // A connection cut before the first byte: a transport error, retryable.
    let (tx, body) = chan();
    tx.fail(reset());
    let err = call(cfg(), streamed(OPENAI), sse(body)).await.unwrap_err();
    match err.downcast_ref::<AiError>() {
        Some(AiError::Transport { kind, .. }) => assert_eq!(*kind, ErrorKind::Connection),
        other => panic!("{other:?}"),
    }
    // An empty stream: truncated, nothing delivered.
    let (tx, body) = chan();
    drop(tx);
    let err = call(cfg(), streamed(OPENAI), sse(body)).await.unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::Truncated { bytes_received: 0 })
    ));
    // An error event as the very first chunk (overloaded before any token).
    let (tx, body) = chan();
    tx.send(ANT_ERROR);
    let err = call(cfg(), streamed(ANTHROPIC), sse(body))
        .await
        .unwrap_err();
    let ai = err.downcast_ref::<AiError>().unwrap();
    assert_eq!(ai.kind(), ErrorKind::Overloaded);
}

// ---------------------------------------------------------------- in the body

#[tokio::test(start_paused = true)]
async fn first_content_deadline_counts_pings_as_life_not_content() {
    let config = cfg().first_content(30 * S).idle(5 * S);
    let steps = [
        Send(ANT_START),
        Wait(4 * S),
        Send(ANT_PING),
        Wait(4 * S),
        Send(ANT_PING),
        Wait(4 * S),
        Send(ANT_PING),
        Hang,
    ];
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let res = call(config, streamed(ANTHROPIC), sse(body)).await.unwrap();
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    let read = read_body(res.into_body()).await;
    // Idle (5 s) does not apply before the first content; the first-content deadline does.
    assert_at(t0.elapsed(), 30 * S);
    let (phase, after, bytes) = read.stall();
    assert_eq!((phase, after), (StallPhase::FirstContent, 30 * S));
    assert_eq!(read.bytes(), sent(&steps));
    assert_eq!(bytes, sent(&steps).len() as u64);
    let summary = outcome.get().unwrap();
    assert_eq!(summary.end, StreamEnd::Stalled(StallPhase::FirstContent));
    assert!(!summary.content_seen);
}

#[tokio::test(start_paused = true)]
async fn idle_gap_after_content_ends_the_body_with_stalled() {
    let config = cfg().first_content(60 * S).idle(10 * S);
    let steps = [
        Send(OAI_ROLE),
        Wait(3 * S),
        Send(OAI_TOKEN),
        Wait(9 * S),
        Send(OAI_TOKEN),
        Wait(9 * S),
        Send(OAI_TOKEN),
        Hang,
    ];
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let res = call(config, streamed(OPENAI), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    // Last token at 21 s, then silence: stalled at 31 s, not before.
    assert_at(t0.elapsed(), 31 * S);
    assert_eq!(
        read.stall(),
        (StallPhase::Idle, 10 * S, sent(&steps).len() as u64)
    );
    assert_eq!(
        read.bytes(),
        sent(&steps),
        "every byte before the stall, unchanged"
    );
    assert_eq!(
        ErrorKind::of_error(&**read.error.as_ref().unwrap()),
        ErrorKind::Stalled
    );
}

#[tokio::test(start_paused = true)]
async fn idle_counts_from_the_first_byte_without_a_first_content_deadline() {
    let config = cfg().idle(10 * S);
    let steps = [Wait(2 * S), Send(OAI_ROLE), Hang];
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let res = call(config, streamed(OPENAI), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert_at(t0.elapsed(), 12 * S);
    assert_eq!(read.stall().0, StallPhase::Idle);
}

#[tokio::test(start_paused = true)]
async fn liveness_resets_idle_when_asked_and_only_then() {
    let steps = [
        Send(ANT_START),
        Send(ANT_DELTA),
        Wait(4 * S),
        Send(ANT_PING),
        Wait(4 * S),
        Send(COMMENT),
        Wait(4 * S),
        Send(ANT_PING),
        Wait(4 * S),
        Send(ANT_PING),
        Wait(4 * S),
        Send(ANT_DELTA),
        Send(ANT_STOP),
    ];
    // Pings every 4 s keep a 6 s idle deadline from firing: the stream completes.
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let config = cfg().idle(6 * S).liveness_resets_idle(true);
    let res = call(config, streamed(ANTHROPIC), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_at(t0.elapsed(), 20 * S);
    assert_eq!(read.bytes(), sent(&steps));

    // Pings do not count as progress: 6 s after the first delta, stalled.
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let config = cfg().idle(6 * S).liveness_resets_idle(false);
    let res = call(config, streamed(ANTHROPIC), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert_at(t0.elapsed(), 6 * S);
    assert_eq!(read.stall().0, StallPhase::Idle);
    assert_eq!(
        read.bytes(),
        sent(&steps[..4]),
        "bytes before the stall, unchanged"
    );
}

#[tokio::test(start_paused = true)]
async fn total_deadline_bounds_a_stream_that_keeps_talking() {
    let mut steps = vec![Send(OAI_ROLE)];
    for _ in 0..100 {
        steps.extend([Wait(S), Send(OAI_TOKEN)]);
    }
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let config = cfg().idle(5 * S).total(30 * S);
    let res = call(config, streamed(OPENAI), sse(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert_at(t0.elapsed(), 30 * S);
    let (phase, after, bytes) = read.stall();
    assert_eq!((phase, after), (StallPhase::Total, 30 * S));
    assert_eq!(bytes, read.bytes().len() as u64);
    // 29 or 30 tokens got through (the one at 30 s races the deadline), all intact.
    assert!(read.frames.len() >= 30, "{}", read.frames.len());
    assert!(sent(&steps).starts_with(&read.bytes()));
}

#[tokio::test(start_paused = true)]
async fn a_quiet_connection_after_the_terminal_event_ends_cleanly() {
    let steps = [Send(OAI_TOKEN), Send(OAI_DONE), Hang];
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let config = cfg().idle(5 * S).total(60 * S);
    let res = call(config, streamed(OPENAI), sse(body)).await.unwrap();
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    let read = read_body(res.into_body()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    // Idle no longer applies; the total deadline ends the wait for EOF, cleanly.
    assert_at(t0.elapsed(), 60 * S);
    assert!(outcome.get().unwrap().is_complete());
}

#[tokio::test(start_paused = true)]
async fn a_body_error_passes_through() {
    let steps = [Send(OAI_TOKEN), Wait(S), Fail];
    let (tx, body) = chan();
    play(tx, &steps);
    let res = call(cfg().idle(5 * S), streamed(OPENAI), sse(body))
        .await
        .unwrap();
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    let read = read_body(res.into_body()).await;
    assert_eq!(read.bytes(), OAI_TOKEN.as_bytes());
    assert!(read
        .error
        .as_ref()
        .unwrap()
        .downcast_ref::<std::io::Error>()
        .is_some());
    assert_eq!(outcome.get().unwrap().end, StreamEnd::BodyError);
}

#[tokio::test(start_paused = true)]
async fn non_streamed_responses_get_only_the_total_deadline() {
    // A JSON body that trickles: no idle or first-content deadline applies to it.
    let config = cfg()
        .first_byte(S)
        .first_content(2 * S)
        .idle(2 * S)
        .total(100 * S);
    let steps = [Wait(50 * S), Send("{\"id\":"), Wait(40 * S), Send("\"x\"}")];
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &steps);
    let res = call(config, unary(OPENAI), json(body)).await.unwrap();
    // A JSON answer's outcome says only why the model stopped (here it did not say).
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    let read = read_body(res.into_body()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_eq!(outcome.get().unwrap().finish_reason, None);
    assert_at(t0.elapsed(), 90 * S);
    assert_eq!(read.bytes(), sent(&steps));

    // And the total deadline does apply.
    let t0 = Instant::now();
    let (tx, body) = chan();
    play(tx, &[Send("{\"id\":"), Hang]);
    let res = call(config, unary(OPENAI), json(body)).await.unwrap();
    let read = read_body(res.into_body()).await;
    assert_at(t0.elapsed(), 100 * S);
    assert_eq!(read.stall(), (StallPhase::Total, 100 * S, 6));
    assert_eq!(read.bytes(), b"{\"id\":");
}

#[tokio::test(start_paused = true)]
async fn an_error_status_is_not_read_as_a_stream() {
    // A 529 with an SSE content type (a misconfigured proxy): not scanned, no outcome.
    let (tx, body) = chan();
    tx.send(ANT_ERROR);
    drop(tx);
    let res = Response::builder()
        .status(529)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap();
    let res = call(
        StallConfig::default().to_builder(),
        streamed(ANTHROPIC),
        res,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 529);
    assert!(res.extensions().get::<StreamOutcome>().is_none());
    let read = read_body(res.into_body()).await;
    assert!(read.error.is_none());
    assert_eq!(read.bytes(), ANT_ERROR.as_bytes());
}

// ---------------------------------------------------------------- mid-stream errors

/// Plays `steps` as a stream of the dialect at `uri` and checks that every byte before and
/// including the error chunk arrives unchanged, then an `AiError::Provider` with status 200.
async fn mid_stream_error(uri: &str, steps: &[Step]) -> tower_ai_core::Classification {
    let (tx, body) = chan();
    play(tx, steps);
    let config = StallConfig::default().to_builder();
    let res = call(config, streamed(uri), sse(body)).await.unwrap();
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    let read = read_body(res.into_body()).await;
    assert_eq!(
        read.bytes(),
        sent(steps),
        "bytes up to the error chunk, unchanged"
    );
    let classification = match read.ai_error() {
        AiError::Provider { classification } => classification.clone(),
        other => panic!("expected Provider, got {other:?}"),
    };
    assert_eq!(classification.status, 200);
    assert!(matches!(
        outcome.get().unwrap().end,
        StreamEnd::ProviderError(k) if k == classification.kind
    ));
    classification
}

#[tokio::test(start_paused = true)]
async fn openai_error_inside_a_200_stream() {
    let steps = [
        Send(OAI_ROLE),
        Send(OAI_TOKEN),
        Wait(S),
        Send(OAI_ERROR),
        Hang,
    ];
    let c = mid_stream_error(OPENAI, &steps).await;
    assert_eq!(c.kind, Some(ErrorKind::ServerError));
}

#[tokio::test(start_paused = true)]
async fn anthropic_error_event_inside_a_200_stream() {
    let steps = [
        Send(ANT_START),
        Send(ANT_DELTA),
        Send(ANT_PING),
        Send(ANT_ERROR),
        Hang,
    ];
    let c = mid_stream_error(ANTHROPIC, &steps).await;
    assert_eq!(c.kind, Some(ErrorKind::Overloaded));
}

#[tokio::test(start_paused = true)]
async fn gemini_error_inside_a_200_stream() {
    let steps = [Send(GEM_TOKEN), Send(GEM_ERROR), Hang];
    let c = mid_stream_error(GEMINI, &steps).await;
    assert!(c.kind.is_some_and(|k| k.is_retryable()), "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_error_field_inside_a_200_stream() {
    // A strict SSE parser drops the `error:` line and sees a clean `[DONE]`.
    let steps = [Send(OAI_TOKEN), Send(LLAMA_ERROR)];
    let c = mid_stream_error(LLAMA, &steps).await;
    assert_eq!(c.kind, Some(ErrorKind::ContextLengthExceeded));
}

#[tokio::test(start_paused = true)]
async fn openai_responses_failed_event() {
    let steps = [Send(RESP_DELTA), Send(RESP_FAILED), Hang];
    let c = mid_stream_error(RESPONSES, &steps).await;
    assert_eq!(c.kind, Some(ErrorKind::ServerError));
}

#[tokio::test(start_paused = true)]
async fn an_error_split_across_chunks_is_found_where_it_completes() {
    let (a, b) = OAI_ERROR.split_at(30);
    let a: &'static str = Box::leak(a.to_owned().into_boxed_str());
    let b: &'static str = Box::leak(b.to_owned().into_boxed_str());
    let steps = [Send(OAI_TOKEN), Send(a), Wait(S), Send(b), Hang];
    let c = mid_stream_error(OPENAI, &steps).await;
    assert_eq!(c.kind, Some(ErrorKind::ServerError));
}

// ---------------------------------------------------------------- terminal markers

async fn ends(uri: &str, steps: &[Step], config: StallConfigBuilder) -> (Read, StreamOutcome) {
    let (tx, body) = chan();
    play(tx, steps);
    let res = call(config, streamed(uri), sse(body)).await.unwrap();
    let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
    (read_body(res.into_body()).await, outcome)
}

#[tokio::test(start_paused = true)]
async fn each_dialect_ends_cleanly_with_its_terminal_marker() {
    for (uri, steps) in [
        (
            OPENAI,
            &[Send(OAI_ROLE), Send(OAI_TOKEN), Send(OAI_DONE)][..],
        ),
        (
            ANTHROPIC,
            &[Send(ANT_START), Send(ANT_DELTA), Send(ANT_STOP)][..],
        ),
        (RESPONSES, &[Send(RESP_DELTA), Send(RESP_DONE)][..]),
        // Gemini's marker is the finishReason on its last candidate chunk.
        (GEMINI, &[Send(GEM_TOKEN), Send(GEM_STOP)][..]),
    ] {
        let (read, outcome) = ends(uri, steps, StallConfig::default().to_builder()).await;
        assert!(read.error.is_none(), "{uri}: {:?}", read.error);
        assert_eq!(read.bytes(), sent(steps));
        let s = outcome.get().unwrap();
        assert_eq!(s.end, StreamEnd::Complete, "{uri}");
        assert!(s.content_seen);
        assert!(s.terminal_seen, "{uri}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_before_its_terminal_marker_is_truncated() {
    for (uri, steps) in [
        (OPENAI, &[Send(OAI_ROLE), Send(OAI_TOKEN)][..]),
        (ANTHROPIC, &[Send(ANT_START), Send(ANT_DELTA)][..]),
        (RESPONSES, &[Send(RESP_DELTA)][..]),
        // A Gemini stream that closes cleanly with no finishReason (a proxy closing the
        // connection mid-answer) was cut.
        (GEMINI, &[Send(GEM_TOKEN)][..]),
    ] {
        let (read, outcome) = ends(uri, steps, StallConfig::default().to_builder()).await;
        assert_eq!(read.bytes(), sent(steps), "{uri}");
        let n = sent(steps).len() as u64;
        assert!(
            matches!(read.ai_error(), AiError::Truncated { bytes_received } if *bytes_received == n),
            "{uri}: {:?}",
            read.error
        );
        assert_eq!(read.ai_error().kind(), ErrorKind::Stalled);
        assert_eq!(outcome.get().unwrap().end, StreamEnd::Truncated);

        // Configurable: off, the same stream ends cleanly.
        let config = StallConfig::default().to_builder().require_terminal(false);
        let (read, _) = ends(uri, steps, config).await;
        assert!(read.error.is_none(), "{uri}: {:?}", read.error);
    }
}

/// A `'static` copy of `s` (the scripted steps hold `&'static str`).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[tokio::test(start_paused = true)]
async fn an_oversized_terminal_or_error_event_is_recognised_whatever_its_size() {
    // A 5 MiB `response.completed` (an image-generation result inline) over the default
    // 4 MiB bound: whole and paid for, so Complete, every byte delivered.
    let image = "A".repeat(5 << 20);
    let done = leak(format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{{\"status\":\"completed\",\"output\":[{{\"type\":\"image_generation_call\",\"result\":\"{image}\"}}],\"usage\":{{\"input_tokens\":5,\"output_tokens\":7,\"total_tokens\":12}}}}}}\n\n"
    ));
    let (a, b) = done.split_at(1 << 20);
    let steps = [Send(RESP_DELTA), Send(a), Send(b)];
    let (read, outcome) = ends(RESPONSES, &steps, StallConfig::default().to_builder()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_eq!(read.bytes().len(), sent(&steps).len());
    let s = outcome.get().unwrap();
    assert_eq!((s.end, s.terminal_seen), (StreamEnd::Complete, true));
    assert_eq!(s.finish_reason, Some(FinishReason::Stop));
    // The usage ends the event: read from the end kept of it.
    let usage = Some(Usage {
        input_tokens: 5,
        output_tokens: 7,
    });
    assert_eq!(s.usage, usage);

    // A 5 MiB Gemini chunk (a generated image inline) whose `finishReason` and
    // `usageMetadata` follow the image: the stream's terminal marker, read from the end
    // of the chunk, so Complete (it read as cut when only the chunk's start was kept).
    let gem = leak(format!(
        "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"inlineData\": {{\"mimeType\": \"image/png\", \"data\": \"{image}\"}}}}],\"role\": \"model\"}},\"finishReason\": \"STOP\",\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 9,\"candidatesTokenCount\": 1290,\"totalTokenCount\": 1299}},\"modelVersion\": \"gemini-2.5-flash-image\"}}\r\n\r\n"
    ));
    let (a, b) = gem.split_at(3 << 20);
    let gem_steps = [Send(GEM_TOKEN), Send(a), Send(b)];
    let (read, outcome) = ends(GEMINI, &gem_steps, StallConfig::default().to_builder()).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_eq!(read.bytes().len(), sent(&gem_steps).len());
    let s = outcome.get().unwrap();
    assert_eq!((s.end, s.terminal_seen), (StreamEnd::Complete, true));
    assert_eq!(s.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        s.usage,
        Some(Usage {
            input_tokens: 9,
            output_tokens: 1290
        })
    );

    // The bound is configurable: raised over the event, it is read whole (usage too).
    let config = StallConfig::default().to_builder().max_event(8 << 20);
    assert_eq!(config.build_config().unwrap().max_event(), 8 << 20);
    let (read, outcome) = ends(RESPONSES, &steps, config).await;
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_eq!(outcome.get().unwrap().usage, usage);

    // An error event over a (small) bound is still an in-stream error.
    let err = leak(format!(
        "event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"{}\"}}}}\n\n",
        "x".repeat(4096)
    ));
    let steps = [Send(ANT_START), Send(ANT_DELTA), Send(err), Hang];
    let config = StallConfig::default().to_builder().max_event(1024);
    let (read, outcome) = ends(ANTHROPIC, &steps, config).await;
    assert!(
        matches!(read.ai_error(), AiError::Provider { .. }),
        "{:?}",
        read.error
    );
    assert!(matches!(
        outcome.get().unwrap().end,
        StreamEnd::ProviderError(_)
    ));
}

// ---------------------------------------------------------------- model truncation

#[tokio::test(start_paused = true)]
async fn truncation_by_the_token_limit_is_reported_in_each_dialect() {
    let cases: [(&str, &[Step], Option<Usage>); 3] = [
        (
            OPENAI,
            &[
                Send(OAI_ROLE),
                Send(OAI_TOKEN),
                Send(OAI_LENGTH),
                Send(OAI_USAGE),
                Send(OAI_DONE),
            ],
            Some(Usage {
                input_tokens: 14,
                output_tokens: 30,
            }),
        ),
        (
            ANTHROPIC,
            &[
                Send(ANT_START),
                Send(ANT_DELTA),
                Send(ANT_MAX_TOKENS),
                Send(ANT_STOP),
            ],
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15,
            }),
        ),
        (
            GEMINI,
            &[Send(GEM_TOKEN), Send(GEM_MAX)],
            Some(Usage {
                input_tokens: 10,
                output_tokens: 49,
            }),
        ),
    ];
    for (uri, steps, usage) in cases {
        let (read, outcome) = ends(uri, steps, StallConfig::default().to_builder()).await;
        // The stream itself is whole: no error, every byte.
        assert!(read.error.is_none(), "{uri}: {:?}", read.error);
        assert_eq!(read.bytes(), sent(steps));
        let s = outcome.get().unwrap();
        assert_eq!(s.end, StreamEnd::Complete);
        assert_eq!(s.finish_reason, Some(FinishReason::Length), "{uri}");
        assert!(s.truncated_by_model());
        assert!(!s.is_complete());
        assert_eq!(s.usage, usage, "{uri}");
    }
    // A natural stop is not a truncation.
    let (_, outcome) = ends(
        ANTHROPIC,
        &[Send(ANT_START), Send(ANT_DELTA), Send(ANT_STOP)],
        StallConfig::default().to_builder(),
    )
    .await;
    assert!(!outcome.get().unwrap().truncated_by_model());
}

#[tokio::test(start_paused = true)]
async fn truncation_of_a_non_streamed_json_answer_is_reported_like_a_stream() {
    let log = tower_ai_sim::testing::TraceLog::default();
    let _guard = log.install();
    let cut = |s: &str| -> usize {
        log.events()
            .iter()
            .filter(|e| {
                e.level == tracing::Level::WARN
                    && e.message() == Some("answer truncated at the output-token limit")
                    && e.field("gen_ai.usage.output_tokens") == Some(s)
            })
            .count()
    };
    let gemini_unary =
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent";
    let cases: [(&str, &str, Option<FinishReason>, u64); 6] = [
        (
            OPENAI,
            r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"{\"finish_reason\":\"stop\""},"finish_reason":"length"}],"usage":{"prompt_tokens":14,"completion_tokens":31,"total_tokens":45}}"#,
            Some(FinishReason::Length),
            31,
        ),
        (
            ANTHROPIC,
            r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hel"}],"model":"claude","stop_reason":"max_tokens","stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":32}}"#,
            Some(FinishReason::Length),
            32,
        ),
        (
            gemini_unary,
            r#"{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"},"finishReason":"MAX_TOKENS","index":0}],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":33,"totalTokenCount":43}}"#,
            Some(FinishReason::Length),
            33,
        ),
        (
            RESPONSES,
            r#"{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[],"usage":{"input_tokens":5,"output_tokens":34,"total_tokens":39}}"#,
            Some(FinishReason::Length),
            34,
        ),
        // Natural stops: reported, not warned about.
        (
            OPENAI,
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":35,"total_tokens":36}}"#,
            Some(FinishReason::Stop),
            35,
        ),
        (
            RESPONSES,
            r#"{"id":"resp_1","object":"response","status":"completed","incomplete_details":null,"output":[],"usage":{"input_tokens":5,"output_tokens":36,"total_tokens":41}}"#,
            Some(FinishReason::Stop),
            36,
        ),
    ];
    for (uri, answer, finish, output) in cases {
        // In one frame, and in two (the answer copied to be read at its end).
        for split in [answer.len(), answer.len() / 2] {
            let (a, b) = answer.split_at(split);
            let steps = [Send(leak(a.to_owned())), Send(leak(b.to_owned()))];
            let (tx, body) = chan();
            play(tx, &steps);
            let res = call(cfg(), unary(uri), json(body)).await.unwrap();
            let outcome = res.extensions().get::<StreamOutcome>().cloned();
            let outcome = outcome.expect("a JSON answer has an outcome in its extensions");
            let read = read_body(res.into_body()).await;
            assert!(read.error.is_none());
            assert_eq!(read.bytes(), answer.as_bytes());
            let s = outcome.get().expect("read at the body's end");
            assert_eq!(s.finish_reason, finish, "{uri}: {answer}");
            assert_eq!(s.usage.map(|u| u.output_tokens), Some(output));
            assert_eq!(s.truncated_by_model(), finish == Some(FinishReason::Length));
        }
        let want = if finish == Some(FinishReason::Length) {
            2
        } else {
            0
        };
        assert_eq!(cut(&output.to_string()), want, "{uri}: {:#?}", log.events());
    }
    // An answer over the bound is passed on unread, in one frame or several.
    let (_, answer, _, _) = cases[0];
    for split in [answer.len(), answer.len() / 2] {
        let (a, b) = answer.split_at(split);
        let steps = [Send(leak(a.to_owned())), Send(leak(b.to_owned()))];
        let (tx, body) = chan();
        play(tx, &steps);
        let res = call(cfg().max_event(64), unary(OPENAI), json(body))
            .await
            .unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = read_body(res.into_body()).await;
        assert_eq!(read.bytes(), answer.as_bytes());
        let s = outcome.get().unwrap();
        assert_eq!((s.finish_reason, s.usage), (None, None));
    }
}

// ---------------------------------------------------------------- body contract

#[tokio::test(start_paused = true)]
async fn end_of_stream_and_size_hint_are_forwarded() {
    let full = http_body_util::Full::new(Bytes::from_static(b"{\"ok\":true}"));
    let svc = tower::service_fn(move |_req: Request<&'static str>| {
        let full = full.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full)
                    .unwrap(),
            )
        }
    });
    let mut svc = tower::ServiceBuilder::new()
        .layer(StallDetectorLayer::new())
        .service(svc);
    use tower::{Service, ServiceExt};
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(unary(OPENAI))
        .await
        .unwrap();
    let body = res.into_body();
    assert_eq!(body.size_hint().exact(), Some(11));
    assert!(!body.is_end_stream());
    let mut body = Box::pin(body);
    use http_body_util::BodyExt;
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "{\"ok\":true}");
    assert!(body.is_end_stream());
    assert!(body.frame().await.is_none());

    // An SSE body read ahead counts its first frame in the hint, and is not at its end
    // until its end was judged.
    let (tx, body) = chan();
    tx.send(OAI_TOKEN);
    let res = call(cfg(), streamed(OPENAI), sse(body)).await.unwrap();
    let body = res.into_body();
    assert!(body.size_hint().lower() >= OAI_TOKEN.len() as u64);
    assert!(!body.is_end_stream());
    assert!(body.outcome().is_some());
    drop(tx);
    let read = read_body(body).await;
    assert!(matches!(read.ai_error(), AiError::Truncated { .. }));
}

#[test]
fn services_and_bodies_are_send_sync_static() {
    fn assert_send_sync<T: std::marker::Send + Sync + 'static>() {}
    assert_send_sync::<StallDetectorLayer>();
    assert_send_sync::<StallDetector<Mock>>();
    assert_send_sync::<StallBody<ChanBody>>();
    assert_send_sync::<
        tower_ai_stall::future::ResponseFuture<
            mock::future::ResponseFuture<Response<ChanBody>>,
            ChanBody,
        >,
    >();
    assert_send_sync::<StreamOutcome>();
    fn assert_unpin<T: Unpin>() {}
    assert_unpin::<StallBody<ChanBody>>();
}

// ---------------------------------------------------------------- what is traced

#[tokio::test(start_paused = true)]
async fn truncations_stalls_and_in_stream_errors_are_warned_about() {
    let log = tower_ai_sim::testing::TraceLog::default();
    let _guard = log.install();
    let warnings = |message: &str| -> Vec<tower_ai_sim::testing::Recorded> {
        log.events()
            .into_iter()
            .filter(|e| e.level == tracing::Level::WARN && e.message() == Some(message))
            .collect()
    };

    // Cut by the token limit: one warning, with the provider, the reason and the usage.
    let steps = [
        Send(OAI_ROLE),
        Send(OAI_TOKEN),
        Send(OAI_LENGTH),
        Send(OAI_USAGE),
        Send(OAI_DONE),
    ];
    ends(OPENAI, &steps, StallConfig::default().to_builder()).await;
    let cut = warnings("answer truncated at the output-token limit");
    assert_eq!(cut.len(), 1, "{:#?}", log.events());
    assert_eq!(cut[0].field("gen_ai.provider.name"), Some("openai"));
    assert_eq!(
        cut[0].field("gen_ai.system"),
        None,
        "the attribute's current name only"
    );
    assert_eq!(
        cut[0].field("gen_ai.response.finish_reasons"),
        Some("length")
    );
    assert_eq!(cut[0].field("gen_ai.usage.input_tokens"), Some("14"));
    assert_eq!(cut[0].field("gen_ai.usage.output_tokens"), Some("30"));

    // A stall after content: the phase, and how many bytes had arrived.
    let steps = [Send(ANT_START), Send(ANT_DELTA), Hang];
    let (read, _) = ends(ANTHROPIC, &steps, cfg().idle(5 * S)).await;
    assert_eq!(read.stall().0, StallPhase::Idle);
    let stalled = warnings("stream stalled");
    assert_eq!(stalled.len(), 1, "{:#?}", log.events());
    assert_eq!(stalled[0].field("gen_ai.provider.name"), Some("anthropic"));
    assert_eq!(stalled[0].field("error.type"), Some("stalled"));
    assert_eq!(stalled[0].field("stall.phase"), Some("Idle"));
    assert_eq!(stalled[0].field("stall.after_ms"), Some("5000"));
    let bytes = (ANT_START.len() + ANT_DELTA.len()).to_string();
    assert_eq!(stalled[0].field("bytes_received"), Some(bytes.as_str()));

    // An error event inside a 200 stream: its kind.
    let steps = [Send(ANT_START), Send(ANT_DELTA), Send(ANT_ERROR)];
    ends(ANTHROPIC, &steps, StallConfig::default().to_builder()).await;
    let errors = warnings("provider error inside the stream");
    assert_eq!(errors.len(), 1, "{:#?}", log.events());
    assert_eq!(errors[0].field("gen_ai.provider.name"), Some("anthropic"));
    assert_eq!(errors[0].field("error.type"), Some("overloaded"));
    // The provider by its name in the OpenTelemetry GenAI conventions, as the core's span.
    let steps = [Send(GEM_TOKEN), Send(GEM_ERROR)];
    ends(GEMINI, &steps, StallConfig::default().to_builder()).await;
    let errors = warnings("provider error inside the stream");
    assert_eq!(errors.len(), 2, "{:#?}", log.events());
    assert_eq!(errors[1].field("gen_ai.provider.name"), Some("gcp.gemini"));
    // A natural end warns about nothing.
    let before = log.events().len();
    let steps = [Send(ANT_START), Send(ANT_DELTA), Send(ANT_STOP)];
    ends(ANTHROPIC, &steps, StallConfig::default().to_builder()).await;
    assert!(log.events()[before..]
        .iter()
        .all(|e| e.level != tracing::Level::WARN));
}
