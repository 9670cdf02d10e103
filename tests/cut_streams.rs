//! Over loopback HTTP (hyper-util's client and the simulator's server on 127.0.0.1): a
//! stream cut after content is charged at least its reservation, and a provider whose
//! streams fail after the role chunk opens the circuit breaker. Real clock, short waits.

use std::time::Duration;

use bytes::Buf;
use http::Request;
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use tower_ai::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_ai::prelude::*;
use tower_ai::stall::StallDetectorLayer;
use tower_ai_core::keys::{Global, HostModel, KeyFn};
use tower_ai_core::StallPhase;
use tower_ai_sim::{
    Latency, ModelSpec, Scenario, ScenarioBuilder, SimServer, Simulator, StreamFault,
};

fn scenario(model: &str) -> ScenarioBuilder {
    Scenario::builder()
        .seed(3)
        .model(ModelSpec::new(model).completion_tokens(40))
        .latency(Latency::fixed(Duration::from_millis(5)))
        .token_interval(Latency::fixed(Duration::from_millis(2)))
        .stall_duration(Duration::from_millis(150))
}

async fn serve(sim: &Simulator) -> SimServer {
    sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn anthropic(server: &SimServer) -> Request<AiBody> {
    Request::post(format!("{}/v1/messages", server.url()))
        .header("content-type", "application/json")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(AiBody::from(
            r#"{"model":"claude-x","max_tokens":4000,"stream":true,"messages":[{"role":"user","content":"Tell me a long story."}]}"#,
        ))
        .unwrap()
}

fn openai(server: &SimServer) -> Request<AiBody> {
    Request::post(format!("{}/v1/chat/completions", server.url()))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(AiBody::from(
            r#"{"model":"gpt-x","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap()
}

/// Reads a body to its end; `Err` with the error that ended it.
async fn read<B>(body: B) -> Result<Vec<u8>, BoxError>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Err(_) => panic!("the body neither ended nor failed within 5 s"),
            Ok(None) => return Ok(bytes),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(f))) => {
                if let Ok(mut d) = f.into_data() {
                    while d.has_remaining() {
                        let chunk = d.chunk();
                        bytes.extend_from_slice(chunk);
                        let n = chunk.len();
                        d.advance(n);
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn over_loopback_an_anthropic_stream_cut_after_content_keeps_its_reservation() {
    let sim = Simulator::new(
        scenario("claude-x")
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 5,
                probability: 1.0,
            })
            .build()
            .unwrap(),
    );
    let server = serve(&sim).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let stall = StallDetectorLayer::builder()
        .idle(Duration::from_millis(60))
        .build()
        .unwrap();
    // Two ways the stream ends: the simulator cuts the connection after its stall (the
    // client's body fails), or StallDetector gives up first (a `Stalled` error).
    for with_stall in [false, true] {
        let budget = TokenBudgetLayer::builder()
            .tokens_per_minute(1_000_000)
            .build()
            .unwrap();
        let res = if with_stall {
            let svc = budget.layer(stall.layer(ClassifyLayer::new().layer(client.clone())));
            svc.oneshot(anthropic(&server))
                .await
                .unwrap()
                .map(|b| b.boxed())
        } else {
            let svc = budget.layer(ClassifyLayer::new().layer(client.clone()));
            let res = svc.oneshot(anthropic(&server)).await.unwrap();
            res.map(|b| b.map_err(Into::<BoxError>::into).boxed())
        };
        assert_eq!(res.status(), 200);
        let key = KeyFn::<AiBody>::key(&Global, &anthropic(&server)).unwrap();
        let reserved = budget.snapshot(key).unwrap().tokens.unwrap();
        assert!(reserved > 4000, "input estimate + max_tokens: {reserved}");
        let err = read(res.into_body()).await.unwrap_err();
        if with_stall {
            assert!(
                matches!(err.downcast_ref::<AiError>(), Some(AiError::Stalled { .. })),
                "{err}"
            );
        }
        let s = budget.snapshot(key).unwrap();
        assert_eq!(s.held, 0, "settled");
        // message_start said 1 output token and the input: the old settlement.
        assert!(
            s.tokens.unwrap() >= reserved,
            "settled {} < reserved {reserved} (stall detector: {with_stall})",
            s.tokens.unwrap()
        );
    }
    server.shutdown_with_grace(Duration::ZERO).await;
}

#[tokio::test]
async fn over_loopback_streams_that_fail_after_the_role_chunk_open_the_breaker() {
    let faults = [
        // The role chunk, then the dialect's in-stream error event.
        StreamFault::ErrorEventAfterTokens {
            tokens: 0,
            probability: 1.0,
        },
        // The role chunk, then silence: StallDetector's first-content deadline.
        StreamFault::StallAfterTokens {
            tokens: 0,
            probability: 1.0,
        },
    ];
    for fault in faults {
        // The simulator's silence outlasts the first-content deadline.
        let sim = Simulator::new(
            scenario("gpt-x")
                .stream_fault(fault)
                .stall_duration(Duration::from_secs(3))
                .build()
                .unwrap(),
        );
        let server = serve(&sim).await;
        let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
        let breaker = CircuitBreakerLayer::builder()
            .count_window(10)
            .minimum_calls(3)
            .failure_rate(0.5)
            .open_duration(Duration::from_secs(60))
            .build()
            .unwrap();
        let handle = breaker.handle();
        let stall = StallDetectorLayer::builder()
            .first_byte(Duration::from_millis(250))
            .first_content(Duration::from_millis(300))
            .build()
            .unwrap();
        let svc = breaker.layer(stall.layer(ClassifyLayer::new().layer(client)));
        for i in 0..3 {
            let res = svc.clone().oneshot(openai(&server)).await.unwrap();
            assert_eq!(res.status(), 200, "{fault:?}: the head is a success");
            let err = read(res.into_body()).await.unwrap_err();
            let kind = ErrorKind::of_error(&*err);
            match fault {
                StreamFault::StallAfterTokens { .. } => assert!(
                    matches!(
                        err.downcast_ref::<AiError>(),
                        Some(AiError::Stalled {
                            phase: StallPhase::FirstContent,
                            ..
                        })
                    ),
                    "call {i}: {err}"
                ),
                _ => assert!(
                    matches!(kind, ErrorKind::Overloaded | ErrorKind::ServerError),
                    "call {i}: {err} ({kind})"
                ),
            }
        }
        let key = KeyFn::<AiBody>::key(&HostModel, &openai(&server)).unwrap();
        let m = handle.metrics(key).unwrap();
        assert_eq!(m.state, CircuitState::Open, "{fault:?}: {m:?}");
        let calls = sim.calls().len();
        let err = svc.clone().oneshot(openai(&server)).await.unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<AiError>(),
                Some(AiError::CircuitOpen { .. })
            ),
            "{fault:?}: {err}"
        );
        assert_eq!(sim.calls().len(), calls, "refused without a call");
        server.shutdown_with_grace(Duration::ZERO).await;
    }
}
