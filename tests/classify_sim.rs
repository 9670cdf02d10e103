//! The classifier (tower-ai-core) against the simulator (tower-ai-sim). The two were
//! written apart from the same provider facts (docs/protocols.md), sharing no code: where
//! they agree, both read the providers' real shapes the same way.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_ai_core::stream::{FinishReason, StreamDialect, StreamScanner};
use tower_ai_core::{
    Classification, ClassifyLayer, ErrorKind, Provider, RequestMeta, Usage, WaitSource,
};
use tower_ai_sim::{Fault, ModelSpec, Scenario, Simulator, StreamFault};

const DIALECTS: [(&str, Provider); 3] = [
    ("/v1/chat/completions", Provider::OpenAi),
    ("/v1/messages", Provider::Anthropic),
    ("/v1beta/models/m:generateContent", Provider::Gemini),
];

fn body_for(path: &str, stream: bool, text: &str) -> String {
    if path.contains(":generate") || path.contains(":streamGenerate") {
        format!(r#"{{"contents":[{{"role":"user","parts":[{{"text":"{text}"}}]}}]}}"#)
    } else if path == "/v1/messages" {
        format!(
            r#"{{"model":"m","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"{text}"}}]}}"#
        )
    } else {
        format!(
            r#"{{"model":"m","stream":{stream},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"{text}"}}]}}"#
        )
    }
}

async fn send(
    sim: &Simulator,
    path: &str,
    body: String,
) -> http::Response<tower_ai_core::ClassifiedBody<tower_ai_sim::SimBody>> {
    let req = Request::post(path)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    ClassifyLayer::new()
        .layer(sim.service())
        .oneshot(req)
        .await
        .unwrap()
}

fn verdict<B>(res: &http::Response<B>) -> Classification {
    Classification::of(res).into_owned()
}

#[tokio::test(start_paused = true)]
async fn rate_limits_are_retryable_with_the_providers_wait() {
    for (path, provider) in DIALECTS {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m"))
                .rpm_limit(1)
                .build()
                .unwrap(),
        );
        assert_eq!(
            send(&sim, path, body_for(path, false, "hi")).await.status(),
            200
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        let res = send(&sim, path, body_for(path, false, "hi")).await;
        let c = verdict(&res);
        assert_eq!(c.provider, provider);
        assert_eq!(c.kind, Some(ErrorKind::RateLimited), "{path}");
        assert!(c.is_retryable(), "{path}");
        let w = c.wait.unwrap_or_else(|| panic!("{path}: no wait"));
        let expected = if provider == Provider::Gemini {
            WaitSource::RetryInfo
        } else {
            WaitSource::RetryAfter
        };
        assert_eq!(w.source, expected, "{path}");
        // 20 s (plus the first call's latency) into a 60 s window: about 40 s left.
        assert!(
            (Duration::from_secs(38)..=Duration::from_secs(41)).contains(&w.delay),
            "{path}: {:?}",
            w.delay
        );
        if provider != Provider::Gemini {
            assert_eq!(c.rate_limit.requests.remaining, Some(0), "{path}");
            assert!(c.rate_limit.exhausted_for().is_some(), "{path}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn quota_exhaustion_is_never_retryable() {
    for (path, _) in DIALECTS {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m"))
                .quota_exhausted_after(0)
                .build()
                .unwrap(),
        );
        let res = send(&sim, path, body_for(path, false, "hi")).await;
        assert_eq!(res.status(), 429, "{path}");
        let c = verdict(&res);
        assert_eq!(c.kind, Some(ErrorKind::QuotaExhausted), "{path}");
        assert!(!c.is_retryable(), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn outages_faults_and_context_length() {
    for (path, _) in DIALECTS {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m").context_window(50))
                .outage("m", Duration::from_secs(0), Duration::from_secs(10))
                .fault(Fault::status(500).between(Duration::from_secs(20), Duration::from_secs(30)))
                .fault(Fault::status(504).between(Duration::from_secs(40), Duration::from_secs(50)))
                .build()
                .unwrap(),
        );
        let c = verdict(&send(&sim, path, body_for(path, false, "hi")).await);
        assert_eq!(c.kind, Some(ErrorKind::Overloaded), "{path}: outage");
        assert!(c.kind.unwrap().is_breaker_failure());
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(20)).await;
        assert_eq!(
            verdict(&send(&sim, path, body_for(path, false, "hi")).await).kind,
            Some(ErrorKind::ServerError),
            "{path}"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(
            verdict(&send(&sim, path, body_for(path, false, "hi")).await).kind,
            Some(ErrorKind::Timeout),
            "{path}"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        let long = "x".repeat(400);
        let c = verdict(&send(&sim, path, body_for(path, false, &long)).await);
        assert_eq!(c.kind, Some(ErrorKind::ContextLengthExceeded), "{path}");
        assert!(c.kind.unwrap().is_fallback_trigger() && !c.is_retryable());
    }
}

#[tokio::test(start_paused = true)]
async fn estimates_and_usage_agree_with_the_provider() {
    for (path, _) in DIALECTS {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m").completion_tokens(7))
                .build()
                .unwrap(),
        );
        let body = body_for(
            path,
            false,
            "What is the capital of France? Answer briefly.",
        );
        let meta = RequestMeta::parse(path, body.as_bytes());
        let res = send(&sim, path, body).await;
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let usage = Usage::from_json(&bytes).unwrap_or_else(|| panic!("{path}: no usage"));
        let call = &sim.calls()[0];
        assert_eq!(usage.input_tokens, call.prompt_tokens, "{path}");
        assert_eq!(usage.output_tokens, 7, "{path}");
        // The estimate counts the same text; it may also count short role strings.
        let diff = meta.input_tokens_estimate.abs_diff(call.prompt_tokens);
        assert!(
            diff <= 2,
            "{path}: estimate {} vs provider {}",
            meta.input_tokens_estimate,
            call.prompt_tokens
        );
    }
}

const STREAM_PATHS: [(&str, StreamDialect); 3] = [
    ("/v1/chat/completions", StreamDialect::OpenAiChat),
    ("/v1/messages", StreamDialect::Anthropic),
    (
        "/v1beta/models/m:streamGenerateContent?alt=sse",
        StreamDialect::Gemini,
    ),
];

async fn scan(
    sim: &Simulator,
    path: &str,
    dialect: StreamDialect,
) -> (StreamScanner, Option<Classification>) {
    let res = send(sim, path, body_for(path, true, "hello there")).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut s = StreamScanner::new(dialect);
    let mut err = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            err = err.or(s.feed(&data).error);
        }
    }
    err = err.or(s.finish().error);
    (s, err)
}

#[tokio::test(start_paused = true)]
async fn streams_end_with_terminal_usage_and_finish_reason() {
    for (path, dialect) in STREAM_PATHS {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m").completion_tokens(5))
                .build()
                .unwrap(),
        );
        let (s, err) = scan(&sim, path, dialect).await;
        assert!(err.is_none(), "{path}");
        assert!(s.content_seen(), "{path}");
        assert_eq!(s.terminal_seen(), dialect.has_terminal_marker(), "{path}");
        assert_eq!(s.finish_reason(), Some(FinishReason::Stop), "{path}");
        let u = s.usage().unwrap_or_else(|| panic!("{path}: no usage"));
        assert_eq!(
            (u.input_tokens, u.output_tokens),
            (sim.calls()[0].prompt_tokens, 5),
            "{path}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn mid_stream_errors_are_typed_by_the_error_not_the_200() {
    let expected = [
        ErrorKind::ServerError,
        ErrorKind::Overloaded,
        ErrorKind::Overloaded,
    ];
    for ((path, dialect), kind) in STREAM_PATHS.into_iter().zip(expected) {
        let sim = Simulator::new(
            Scenario::builder()
                .model(ModelSpec::new("m").completion_tokens(9))
                .stream_fault(StreamFault::ErrorEventAfterTokens {
                    tokens: 2,
                    probability: 1.0,
                })
                .build()
                .unwrap(),
        );
        let (s, err) = scan(&sim, path, dialect).await;
        let err = err.unwrap_or_else(|| panic!("{path}: no error seen"));
        assert_eq!(err.kind, Some(kind), "{path}");
        assert!(s.content_seen() && !s.terminal_seen(), "{path}");
    }
}
