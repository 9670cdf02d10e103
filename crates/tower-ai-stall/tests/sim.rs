//! StallDetector against the simulated provider: in process on a paused clock (timing,
//! every dialect), over real HTTP on 127.0.0.1 with a hyper-util client (wire behaviour,
//! real clock, short waits), and under AiRetry.

mod support;

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::stream::FinishReason;
use tower_ai_core::{AiBody, AiError, BoxError, ClassifyLayer, ErrorKind, StallPhase};
use tower_ai_retry::AiRetryLayer;
use tower_ai_sim::{
    Latency, ModelSpec, Scenario, ScenarioBuilder, Simulator, StreamFault, StreamFaultKind,
};
use tower_ai_stall::{StallConfig, StallDetectorLayer, StreamEnd, StreamOutcome};

use support::read_body;

const MS: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug)]
enum Dialect {
    OpenAi,
    Anthropic,
    Gemini,
}
const DIALECTS: [Dialect; 3] = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini];

/// A streamed request of `dialect` for `model`, with `max_tokens`.
fn request(base: &str, dialect: Dialect, max_tokens: u32) -> Request<AiBody> {
    let (path, body) = match dialect {
        Dialect::OpenAi => (
            "/v1/chat/completions".to_owned(),
            format!(
                r#"{{"model":"m","stream":true,"max_tokens":{max_tokens},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Tell me a story"}}]}}"#
            ),
        ),
        Dialect::Anthropic => (
            "/v1/messages".to_owned(),
            format!(
                r#"{{"model":"m","stream":true,"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Tell me a story"}}]}}"#
            ),
        ),
        Dialect::Gemini => (
            "/v1beta/models/m:streamGenerateContent?alt=sse".to_owned(),
            format!(
                r#"{{"contents":[{{"parts":[{{"text":"Tell me a story"}}]}}],"generationConfig":{{"maxOutputTokens":{max_tokens}}}}}"#
            ),
        ),
    };
    Request::post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(AiBody::from(body))
        .unwrap()
}

fn scenario() -> ScenarioBuilder {
    Scenario::builder()
        .seed(7)
        .wall_clock(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .default_model(ModelSpec::new("*").completion_tokens(12))
        .token_interval(Latency::fixed(Duration::from_millis(50)))
}

/// What the simulator's body says without any detector: read until it ends, fails, or
/// pauses for longer than `quiet` (a stall).
async fn bare_bytes(sim: &Simulator, req: Request<AiBody>, quiet: Duration) -> Vec<u8> {
    let res = sim.service().oneshot(req).await.unwrap();
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(quiet, body.frame()).await {
        if let Ok(d) = frame.into_data() {
            out.extend_from_slice(&d);
        }
    }
    out
}

// ---------------------------------------------------------------- in process, paused clock

#[tokio::test(start_paused = true)]
async fn stall_after_tokens_ends_with_stalled_at_the_idle_deadline() {
    let fault = StreamFault::StallAfterTokens {
        tokens: 4,
        probability: 1.0,
    };
    for dialect in DIALECTS {
        let build = || Simulator::new(scenario().stream_fault(fault).build().unwrap());
        let expected =
            bare_bytes(&build(), request("", dialect, 100), Duration::from_secs(5)).await;
        assert!(!expected.is_empty());

        let sim = build();
        let idle = Duration::from_secs(2);
        let svc = ServiceBuilder::new()
            .layer(StallDetectorLayer::builder().idle(idle).build().unwrap())
            .layer(ClassifyLayer::new())
            .service(sim.service());
        let t0 = Instant::now();
        let res = svc.oneshot(request("", dialect, 100)).await.unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = read_body(res.into_body()).await;
        // Four tokens 50 ms apart, the last at 200 ms; then the idle deadline.
        let at = t0.elapsed();
        assert!(
            at >= Duration::from_millis(2200) && at <= Duration::from_millis(2210),
            "{dialect:?}: stalled at {at:?}"
        );
        let (phase, after, bytes) = read.stall();
        assert_eq!((phase, after), (StallPhase::Idle, idle), "{dialect:?}");
        assert_eq!(
            read.bytes(),
            expected,
            "{dialect:?}: the bytes before the stall, intact"
        );
        assert_eq!(bytes, expected.len() as u64);
        let summary = outcome.get().unwrap();
        assert_eq!(summary.end, StreamEnd::Stalled(StallPhase::Idle));
        assert!(summary.content_seen);
        assert_eq!(
            sim.calls()[0].stream_fault,
            Some(StreamFaultKind::StallAfterTokens(4))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stall_before_the_first_token_fails_the_call() {
    let sim = Simulator::new(
        scenario()
            .stream_fault(StreamFault::StallBeforeFirstToken { probability: 1.0 })
            .build()
            .unwrap(),
    );
    let first_byte = Duration::from_secs(10);
    let svc = ServiceBuilder::new()
        .layer(
            StallDetectorLayer::builder()
                .first_byte(first_byte)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let t0 = Instant::now();
    let err = svc
        .oneshot(request("", Dialect::Anthropic, 100))
        .await
        .unwrap_err();
    assert!(t0.elapsed() >= first_byte && t0.elapsed() <= first_byte + 5 * MS);
    match err.downcast_ref::<AiError>() {
        Some(AiError::Stalled {
            phase: StallPhase::FirstByte,
            after,
            bytes_received: 0,
        }) => assert_eq!(*after, first_byte),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn error_events_of_each_dialect_end_the_body_typed() {
    let fault = StreamFault::ErrorEventAfterTokens {
        tokens: 3,
        probability: 1.0,
    };
    for dialect in DIALECTS {
        let build = || Simulator::new(scenario().stream_fault(fault).build().unwrap());
        let expected =
            bare_bytes(&build(), request("", dialect, 100), Duration::from_secs(5)).await;
        let sim = build();
        let svc = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .layer(ClassifyLayer::new())
            .service(sim.service());
        let res = svc.oneshot(request("", dialect, 100)).await.unwrap();
        let read = read_body(res.into_body()).await;
        assert_eq!(
            read.bytes(),
            expected,
            "{dialect:?}: every byte up to the error event"
        );
        match read.ai_error() {
            AiError::Provider { classification } => {
                assert_eq!(classification.status, 200);
                let kind = classification.kind.unwrap();
                assert!(kind.is_retryable(), "{dialect:?}: {kind:?}");
                assert!(matches!(
                    kind,
                    ErrorKind::Overloaded | ErrorKind::ServerError
                ));
            }
            other => panic!("{dialect:?}: {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn clean_streams_and_max_tokens_truncation_in_each_dialect() {
    for dialect in DIALECTS {
        for (max_tokens, truncated) in [(100, false), (5, true)] {
            let sim = Simulator::new(scenario().build().unwrap());
            let svc = ServiceBuilder::new()
                .layer(StallDetectorLayer::new())
                .layer(ClassifyLayer::new())
                .service(sim.service());
            let res = svc.oneshot(request("", dialect, max_tokens)).await.unwrap();
            let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
            let read = read_body(res.into_body()).await;
            assert!(read.error.is_none(), "{dialect:?}: {:?}", read.error);
            let s = outcome.get().unwrap();
            assert_eq!(s.end, StreamEnd::Complete, "{dialect:?}");
            assert_eq!(
                s.truncated_by_model(),
                truncated,
                "{dialect:?} {max_tokens}"
            );
            let want = if truncated {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            assert_eq!(s.finish_reason, Some(want), "{dialect:?}");
            assert_eq!(sim.calls()[0].truncated, truncated);
            let usage = s.usage.unwrap_or_else(|| panic!("{dialect:?}: no usage"));
            assert_eq!(
                usage.output_tokens,
                u64::from(sim.calls()[0].completion_tokens)
            );
        }
    }
}

// ---------------------------------------------------------------- with AiRetry

#[tokio::test(start_paused = true)]
async fn a_stall_before_the_first_byte_is_retried_and_the_caller_gets_the_whole_answer() {
    // Half of the streams stall before their first byte. The draw is seeded: take the
    // first seed whose first stream stalls (the assertions below hold for any seed).
    for seed in 0..16 {
        let sim = Simulator::new(
            scenario()
                .seed(seed)
                .stream_fault(StreamFault::StallBeforeFirstToken { probability: 0.5 })
                .build()
                .unwrap(),
        );
        let svc = ServiceBuilder::new()
            .layer(
                AiRetryLayer::builder()
                    .max_attempts(8)
                    .seed(1)
                    .build()
                    .unwrap(),
            )
            .layer(
                StallDetectorLayer::builder()
                    .first_byte(Duration::from_secs(5))
                    .build()
                    .unwrap(),
            )
            .layer(ClassifyLayer::new())
            .service(sim.service());
        let t0 = Instant::now();
        let res = svc
            .oneshot(request("", Dialect::OpenAi, 100))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = read_body(res.into_body()).await;
        assert!(read.error.is_none(), "{:?}", read.error);
        let s = outcome.get().unwrap();
        assert!(s.is_complete() && s.terminal_seen);
        assert_eq!(s.usage.unwrap().output_tokens, 12);

        let calls = sim.calls();
        let (last, stalled) = calls.split_last().unwrap();
        assert!(stalled
            .iter()
            .all(|c| c.stream_fault == Some(StreamFaultKind::StallBeforeFirstToken)));
        assert_eq!(last.stream_fault, None);
        if stalled.is_empty() {
            continue;
        }
        // Each stalled attempt cost its first-byte deadline, not the simulator's 1 h stall.
        assert!(
            t0.elapsed() < Duration::from_secs(5 * 8 + 60),
            "{:?}",
            t0.elapsed()
        );
        assert!(calls.iter().all(|c| c.body_digest == calls[0].body_digest));
        return;
    }
    panic!("no seed made the first stream stall");
}
#[tokio::test(start_paused = true)]
async fn a_stall_after_content_is_not_retried() {
    let sim = Simulator::new(
        scenario()
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 2,
                probability: 1.0,
            })
            .build()
            .unwrap(),
    );
    let svc = ServiceBuilder::new()
        .layer(AiRetryLayer::new(4))
        .layer(
            StallDetectorLayer::builder()
                .idle(Duration::from_secs(3))
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let res = svc
        .oneshot(request("", Dialect::OpenAi, 100))
        .await
        .unwrap();
    let read = read_body(res.into_body()).await;
    assert_eq!(read.stall().0, StallPhase::Idle);
    assert_eq!(sim.calls().len(), 1, "bytes reached the caller: no replay");
}

// ---------------------------------------------------------------- over real HTTP

#[tokio::test]
async fn loopback_stall_after_tokens_ends_with_stalled_within_the_idle_deadline() {
    let build = || {
        Simulator::new(
            scenario()
                .token_interval(Latency::fixed(Duration::from_millis(10)))
                .stream_fault(StreamFault::StallAfterTokens {
                    tokens: 5,
                    probability: 1.0,
                })
                .stall_duration(STALL)
                .build()
                .unwrap(),
        )
    };
    // The simulator's stall, and how long the test waits for anything: bounds only a hang
    // reaches, however loaded the machine (this test runs on the real clock).
    const STALL: Duration = Duration::from_secs(60);
    const PATIENCE: Duration = Duration::from_secs(30);
    // The bytes the simulator sends before its stall, read in process from an identical
    // scenario (same seed, same wall clock, first call), on a paused clock of its own so
    // that a loaded machine cannot cut the read short.
    let expected = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async move {
                bare_bytes(
                    &build(),
                    request("", Dialect::OpenAi, 100),
                    Duration::from_millis(300),
                )
                .await
            })
    })
    .join()
    .unwrap();
    assert!(expected.windows(7).filter(|w| w == b"content").count() >= 5);

    let sim = build();
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let idle = Duration::from_millis(200);
    let svc = ServiceBuilder::new()
        .layer(StallDetectorLayer::builder().idle(idle).build().unwrap())
        .layer(ClassifyLayer::new())
        .service(client);
    let res = tokio::time::timeout(
        PATIENCE,
        svc.oneshot(request(&server.url(), Dialect::OpenAi, 100)),
    )
    .await
    .expect("a head, not a hang")
    .unwrap();
    assert_eq!(res.status(), 200);

    let mut body = std::pin::pin!(res.into_body());
    let mut bytes = Vec::new();
    // When the poll that brought the last data began: the detector restarted its idle
    // timer inside that poll, so the stall cannot be reported less than `idle` after it
    // (timers never fire early), however late this task runs.
    let mut last_data_poll = Instant::now();
    let err: BoxError = loop {
        let poll_start = Instant::now();
        match tokio::time::timeout(PATIENCE, body.frame()).await {
            Err(_) => panic!("no stall detected within {PATIENCE:?}"),
            Ok(None) => panic!("the body ended cleanly"),
            Ok(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    bytes.extend_from_slice(&d);
                    last_data_poll = poll_start;
                }
            }
            Ok(Some(Err(e))) => break e,
        }
    };
    let quiet = last_data_poll.elapsed();
    match err.downcast_ref::<AiError>() {
        Some(AiError::Stalled {
            phase: StallPhase::Idle,
            after,
            bytes_received,
        }) => {
            assert_eq!(*after, idle);
            assert_eq!(*bytes_received, bytes.len() as u64);
        }
        other => panic!("expected an idle stall, got {other:?} ({err})"),
    }
    // Real clock: never early (see `last_data_poll`); late by as much as the machine's
    // load, but the simulator's stall lasts a minute, so a stall reported before that is
    // the idle deadline's and not the stream's next event (the error's fields say so too).
    assert!(
        quiet >= idle && quiet < STALL,
        "stall reported {quiet:?} after the last byte; idle deadline {idle:?}"
    );
    assert_eq!(
        bytes, expected,
        "the bytes before the stall, intact over the wire"
    );
    server.shutdown_with_grace(Duration::ZERO).await;
}

#[tokio::test]
async fn loopback_clean_stream_passes_through() {
    let sim = Simulator::new(
        scenario()
            .token_interval(Latency::fixed(Duration::from_millis(2)))
            .build()
            .unwrap(),
    );
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let svc = ServiceBuilder::new()
        .layer(StallDetectorLayer::with_config(StallConfig::default()))
        .layer(ClassifyLayer::new())
        .service(client);
    for dialect in DIALECTS {
        let res: Response<_> = tokio::time::timeout(
            Duration::from_secs(5),
            svc.clone().oneshot(request(&server.url(), dialect, 100)),
        )
        .await
        .unwrap()
        .unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let body = res.into_body();
        assert!(!body.is_end_stream());
        let bytes: Bytes = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert!(!bytes.is_empty());
        let s = outcome.get().unwrap();
        assert!(s.is_complete(), "{dialect:?}: {s:?}");
        assert_eq!(s.bytes_received, bytes.len() as u64);
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------- cut streams, first content

#[tokio::test(start_paused = true)]
async fn a_stream_cut_without_its_terminal_marker_is_truncated_in_each_dialect() {
    // The simulator ends the body cleanly after two tokens: no `[DONE]`, no
    // `message_stop`, no Gemini `finishReason`.
    for dialect in DIALECTS {
        let sim = Simulator::new(
            scenario()
                .stream_fault(StreamFault::CutAfterTokens {
                    tokens: 2,
                    probability: 1.0,
                })
                .build()
                .unwrap(),
        );
        let svc = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .layer(ClassifyLayer::new())
            .service(sim.service());
        let res = svc.oneshot(request("", dialect, 100)).await.unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = read_body(res.into_body()).await;
        assert!(
            matches!(read.ai_error(), AiError::Truncated { .. }),
            "{dialect:?}: {:?}",
            read.error
        );
        let s = outcome.get().unwrap();
        assert_eq!(s.end, StreamEnd::Truncated, "{dialect:?}");
        assert!(s.content_seen && !s.terminal_seen && !s.is_complete());
        assert_eq!(
            sim.calls()[0].stream_fault,
            Some(StreamFaultKind::CutAfterTokens(2))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_reset_mid_stream_is_a_body_error_in_each_dialect() {
    for dialect in DIALECTS {
        let sim = Simulator::new(
            scenario()
                .stream_fault(StreamFault::ResetAfterTokens {
                    tokens: 2,
                    probability: 1.0,
                })
                .build()
                .unwrap(),
        );
        let svc = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .layer(ClassifyLayer::new())
            .service(sim.service());
        let res = svc.oneshot(request("", dialect, 100)).await.unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = read_body(res.into_body()).await;
        assert!(read.error.is_some(), "{dialect:?}");
        assert_eq!(
            outcome.get().unwrap().end,
            StreamEnd::BodyError,
            "{dialect:?}"
        );
    }
}

/// A StallDetector holding the response until the first content, under AiRetry.
fn first_content_stack(
    sim: &Simulator,
    hold: bool,
) -> impl tower::Service<
    Request<AiBody>,
    Response = Response<impl Body<Data = Bytes, Error = BoxError>>,
    Error = BoxError,
> {
    ServiceBuilder::new()
        .layer(
            AiRetryLayer::builder()
                .max_attempts(8)
                .seed(1)
                .build()
                .unwrap(),
        )
        .layer(
            StallDetectorLayer::builder()
                .first_byte(Duration::from_secs(5))
                .first_content(Duration::from_secs(5))
                .await_first_content(hold)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(sim.service())
}

#[tokio::test(start_paused = true)]
async fn a_first_token_stall_after_the_role_chunk_is_retried_when_the_head_is_held() {
    // Half of the streams send their preamble (OpenAI's role chunk, Anthropic's
    // message_start and ping, Gemini has none) and then nothing. Seeded: take the first
    // seed whose first stream stalls.
    for seed in 0..16 {
        for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
            let build = || {
                Simulator::new(
                    scenario()
                        .seed(seed)
                        .stream_fault(StreamFault::StallAfterTokens {
                            tokens: 0,
                            probability: 0.5,
                        })
                        .build()
                        .unwrap(),
                )
            };
            let sim = build();
            let t0 = Instant::now();
            let res = first_content_stack(&sim, true)
                .oneshot(request("", dialect, 100))
                .await
                .unwrap();
            let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
            let read = read_body(res.into_body()).await;
            assert!(read.error.is_none(), "{dialect:?}: {:?}", read.error);
            let s = outcome.get().unwrap();
            assert!(s.is_complete() && s.terminal_seen, "{dialect:?}: {s:?}");
            let calls = sim.calls();
            let (last, stalled) = calls.split_last().unwrap();
            assert_eq!(last.stream_fault, None);
            if stalled.is_empty() {
                continue;
            }
            assert!(stalled
                .iter()
                .all(|c| c.stream_fault == Some(StreamFaultKind::StallAfterTokens(0))));
            // Each stalled attempt cost the first-content deadline.
            assert!(t0.elapsed() >= Duration::from_secs(5) * stalled.len() as u32);
            // The caller got one whole answer: no preamble of a stalled attempt in it.
            let text = String::from_utf8(read.bytes()).unwrap();
            let starts = match dialect {
                Dialect::Anthropic => text.matches("event: message_start").count(),
                _ => text.matches("\"role\":\"assistant\"").count(),
            };
            assert_eq!(starts, 1, "{dialect:?}: {text}");

            // Without holding the head, the same first stream reaches the caller and its
            // stall ends the body after the preamble: no retry.
            let sim = build();
            let res = first_content_stack(&sim, false)
                .oneshot(request("", dialect, 100))
                .await
                .unwrap();
            let read = read_body(res.into_body()).await;
            assert_eq!(read.stall().0, StallPhase::FirstContent);
            assert_eq!(sim.calls().len(), 1);
            return;
        }
    }
    panic!("no seed made the first stream stall");
}

#[tokio::test(start_paused = true)]
async fn a_held_preamble_is_bounded() {
    // A preamble larger than the bound is handed on as it is: the stall then ends the
    // body, as without the option.
    let sim = Simulator::new(
        scenario()
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 0,
                probability: 1.0,
            })
            .build()
            .unwrap(),
    );
    let svc = ServiceBuilder::new()
        .layer(
            StallDetectorLayer::builder()
                .first_byte(Duration::from_secs(5))
                .first_content(Duration::from_secs(5))
                .await_first_content(true)
                .max_preamble(16)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let res = svc
        .oneshot(request("", Dialect::Anthropic, 100))
        .await
        .unwrap();
    let read = read_body(res.into_body()).await;
    assert_eq!(read.stall().0, StallPhase::FirstContent);
    assert!(read.bytes().starts_with(b"event: message_start"));
}

// ---------------------------------------------------------------- cut streams over real HTTP

#[tokio::test]
async fn loopback_a_gemini_stream_closed_without_finish_reason_is_truncated() {
    for (fault, want) in [
        (
            StreamFault::CutAfterTokens {
                tokens: 2,
                probability: 1.0,
            },
            StreamEnd::Truncated,
        ),
        (
            StreamFault::ResetAfterTokens {
                tokens: 2,
                probability: 1.0,
            },
            StreamEnd::BodyError,
        ),
    ] {
        let sim = Simulator::new(scenario().stream_fault(fault).build().unwrap());
        let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
        let svc = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .layer(ClassifyLayer::new())
            .service(client);
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            svc.oneshot(request(&server.url(), Dialect::Gemini, 100)),
        )
        .await
        .unwrap()
        .unwrap();
        let outcome = res.extensions().get::<StreamOutcome>().cloned().unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), read_body(res.into_body()))
            .await
            .unwrap();
        assert!(read.error.is_some(), "{fault:?}");
        if want == StreamEnd::Truncated {
            assert!(matches!(read.ai_error(), AiError::Truncated { .. }));
        }
        let s = outcome.get().unwrap();
        assert_eq!(s.end, want, "{fault:?}");
        assert!(s.content_seen && !s.terminal_seen);
        server.shutdown_with_grace(Duration::ZERO).await;
    }
}

#[tokio::test]
async fn loopback_a_first_token_stall_is_an_error_of_the_call_when_the_head_is_held() {
    let sim = Simulator::new(
        scenario()
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 0,
                probability: 1.0,
            })
            .stall_duration(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let first_content = Duration::from_millis(300);
    let svc = ServiceBuilder::new()
        .layer(
            StallDetectorLayer::builder()
                .first_byte(first_content)
                .first_content(first_content)
                .await_first_content(true)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(client);
    let t0 = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        svc.oneshot(request(&server.url(), Dialect::OpenAi, 100)),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap_err();
    let at = t0.elapsed();
    match err.downcast_ref::<AiError>() {
        Some(AiError::Stalled {
            phase: StallPhase::FirstContent,
            after,
            bytes_received,
        }) => {
            assert_eq!(*after, first_content);
            assert!(*bytes_received > 0, "the role chunk arrived, and was held");
        }
        other => panic!("expected a first-content stall of the call, got {other:?} ({err})"),
    }
    assert_eq!(ErrorKind::of_error(&*err), ErrorKind::Stalled);
    // Real clock: never early; late by as much as the machine's load, but well before
    // the simulator's one-minute stall would end.
    assert!(
        at >= first_content && at < Duration::from_secs(30),
        "{at:?}"
    );
    server.shutdown_with_grace(Duration::ZERO).await;
}
