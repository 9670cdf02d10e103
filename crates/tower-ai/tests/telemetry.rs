//! The GenAI client span of `TelemetryLayer`, as OpenTelemetry exports it
//! (tracing-opentelemetry into the SDK's in-memory exporter), after calls through
//! `AiStack` against the simulator, in-process on a paused clock.

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::{Layer, Service, ServiceExt};
use tower_ai::prelude::*;
use tower_ai::telemetry;
use tower_ai_sim::{Fault, Latency, ModelSpec, Scenario, Simulator, StreamFault};
use tracing_subscriber::layer::SubscriberExt;

/// A `tracing` subscriber exporting every span to an in-memory OpenTelemetry exporter,
/// the default on this thread while it lives.
struct Otel {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Otel {
    fn install() -> Otel {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tower-ai-test")));
        let guard = tracing::subscriber::set_default(subscriber);
        Otel {
            exporter,
            provider,
            _guard: guard,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().unwrap();
        self.exporter.get_finished_spans().unwrap()
    }

    /// The one GenAI client span exported.
    fn gen_ai_span(&self) -> SpanData {
        let mut spans: Vec<_> = self
            .spans()
            .into_iter()
            .filter(|s| attr(s, "gen_ai.operation.name").is_some())
            .collect();
        assert_eq!(
            spans.len(),
            1,
            "one GenAI span per logical call: {spans:#?}"
        );
        spans.pop().unwrap()
    }
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn str_attr(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(Value::String(s)) => s.as_str().to_owned(),
        other => panic!("{key}: {other:?} in {:#?}", span.attributes),
    }
}

fn int_attr(span: &SpanData, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::I64(n)) => *n,
        other => panic!("{key}: {other:?} in {:#?}", span.attributes),
    }
}

fn chat(model: &str, stream: bool) -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(format!(
            r#"{{"model":"{model}","stream":{stream},"max_tokens":64,"messages":[{{"role":"user","content":"Hello"}}]}}"#
        )))
        .unwrap()
}

fn anthropic_stream() -> Request<AiBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .body(AiBody::from(
            r#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}"#,
        ))
        .unwrap()
}

fn sim(scenario: tower_ai_sim::ScenarioBuilder) -> Simulator {
    Simulator::new(
        scenario
            .model(ModelSpec::new("gpt-4o").completion_tokens(12))
            .model(ModelSpec::new("claude-sonnet-4-5").completion_tokens(12))
            .latency(Latency::Fixed(Duration::from_millis(400)))
            .token_interval(Latency::Fixed(Duration::from_millis(50)))
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_plain_openai_chat_call_is_one_client_span() {
    let otel = Otel::install();
    let sim = sim(Scenario::builder());
    let ai = AiStack::seeded(1).layer(sim.service());
    let res = ai.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        otel.spans()
            .iter()
            .all(|s| attr(s, "gen_ai.operation.name").is_none()),
        "the span lasts until the answer is read"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "chat gpt-4o");
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(span.status, Status::Unset);
    assert_eq!(str_attr(&span, "gen_ai.operation.name"), "chat");
    assert_eq!(str_attr(&span, "gen_ai.provider.name"), "openai");
    assert_eq!(str_attr(&span, "gen_ai.request.model"), "gpt-4o");
    assert_eq!(int_attr(&span, "gen_ai.request.max_tokens"), 64);
    assert_eq!(
        attr(&span, "gen_ai.request.stream"),
        Some(&Value::Bool(false))
    );
    assert_eq!(str_attr(&span, "gen_ai.response.model"), "gpt-4o");
    assert_eq!(
        str_attr(&span, "gen_ai.response.id"),
        answer["id"].as_str().unwrap()
    );
    assert!(str_attr(&span, "gen_ai.response.id").starts_with("chatcmpl-"));
    assert_eq!(
        str_attr(&span, "gen_ai.response.finish_reasons"),
        r#"["stop"]"#
    );
    assert_eq!(
        int_attr(&span, "gen_ai.usage.input_tokens"),
        answer["usage"]["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(int_attr(&span, "gen_ai.usage.output_tokens"), 12);
    assert_eq!(str_attr(&span, "server.address"), "api.openai.com");
    assert_eq!(int_attr(&span, "server.port"), 443);
    assert_eq!(int_attr(&span, "http.response.status_code"), 200);
    assert!(str_attr(&span, "http.response.header.x-request-id").starts_with("req_sim"));
    assert_eq!(attr(&span, "error.type"), None);
    assert_eq!(attr(&span, "gen_ai.response.time_to_first_chunk"), None);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_anthropic_stream_span_ends_with_the_stream() {
    let otel = Otel::install();
    let sim = sim(Scenario::builder());
    let ai = AiStack::seeded(1).layer(sim.service());
    let start = tokio::time::Instant::now();
    let res = ai.oneshot(anthropic_stream()).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        frame.unwrap();
        frames += 1;
        if frames == 2 {
            assert!(
                otel.spans()
                    .iter()
                    .all(|s| attr(s, "gen_ai.operation.name").is_none()),
                "no span before the stream ends"
            );
        }
    }
    assert!(frames > 2, "{frames} frames");
    let streamed_for = start.elapsed();

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "chat claude-sonnet-4-5");
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(str_attr(&span, "gen_ai.provider.name"), "anthropic");
    assert_eq!(
        attr(&span, "gen_ai.request.stream"),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        str_attr(&span, "gen_ai.response.model"),
        "claude-sonnet-4-5"
    );
    assert!(str_attr(&span, "gen_ai.response.id").starts_with("msg_"));
    assert_eq!(
        str_attr(&span, "gen_ai.response.finish_reasons"),
        r#"["stop"]"#
    );
    assert!(int_attr(&span, "gen_ai.usage.input_tokens") > 0);
    assert_eq!(int_attr(&span, "gen_ai.usage.output_tokens"), 12);
    assert!(str_attr(&span, "http.response.header.request-id").starts_with("req_sim"));
    let ttfc = match attr(&span, "gen_ai.response.time_to_first_chunk") {
        Some(Value::F64(s)) => *s,
        other => panic!("time to first chunk: {other:?}"),
    };
    assert!(
        (0.4..streamed_for.as_secs_f64()).contains(&ttfc),
        "first chunk after the 400 ms latency, before the end: {ttfc}"
    );
    assert_eq!(attr(&span, "error.type"), None);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_gemini_stream_names_its_response_and_provider() {
    let otel = Otel::install();
    let sim =
        sim(Scenario::builder().model(ModelSpec::new("gemini-2.5-flash").completion_tokens(7)));
    let ai = AiStack::seeded(1).layer(sim.service());
    let req = Request::post(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    )
    .body(AiBody::from(
        r#"{"contents":[{"role":"user","parts":[{"text":"Hello"}]}]}"#,
    ))
    .unwrap();
    let res = ai.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "generate_content gemini-2.5-flash");
    assert_eq!(str_attr(&span, "gen_ai.operation.name"), "generate_content");
    assert_eq!(str_attr(&span, "gen_ai.provider.name"), "gcp.gemini");
    assert_eq!(str_attr(&span, "gen_ai.response.model"), "gemini-2.5-flash");
    assert!(!str_attr(&span, "gen_ai.response.id").is_empty());
    assert_eq!(
        attr(&span, "gen_ai.request.stream"),
        Some(&Value::Bool(true))
    );
    assert_eq!(int_attr(&span, "gen_ai.usage.output_tokens"), 7);
    assert_eq!(
        str_attr(&span, "gen_ai.response.finish_reasons"),
        r#"["stop"]"#
    );
    assert!(matches!(
        attr(&span, "gen_ai.response.time_to_first_chunk"),
        Some(Value::F64(_))
    ));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_retried_call_is_one_span_with_its_attempts_inside() {
    let otel = Otel::install();
    // The first request (t = 0) gets a 429 asking for 2 s; the retry at 2 s gets a 200.
    let sim = sim(Scenario::builder().fault(
        Fault::status(429)
            .between(Duration::ZERO, Duration::from_secs(1))
            .retry_after(Duration::from_secs(2)),
    ));
    let ai = AiStack::seeded(1).layer(sim.service());
    let res = ai.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(sim.calls().len(), 2, "one retry");

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "chat gpt-4o");
    assert_eq!(attr(&span, "error.type"), None, "the call succeeded");
    assert_eq!(int_attr(&span, "http.response.status_code"), 200);

    // AiRetry's span is a child of the call's span, and holds the attempts' events.
    let spans = otel.spans();
    let retry = spans
        .iter()
        .find(|s| s.name == "ai_retry")
        .expect("AiRetry's span");
    assert_eq!(retry.parent_span_id, span.span_context.span_id());
    assert_eq!(
        retry.span_context.trace_id(),
        span.span_context.trace_id(),
        "one trace"
    );
    let events: Vec<_> = retry.events.iter().map(|e| e.name.to_string()).collect();
    assert!(
        events.iter().any(|e| e.contains("ai_retry retrying")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("ai_retry attempt succeeded")),
        "{events:?}"
    );
    let retried = retry
        .events
        .iter()
        .find(|e| e.name.contains("ai_retry retrying"))
        .unwrap();
    assert!(
        retried
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "error.type" && kv.value.as_str() == "rate_limited"),
        "{:?}",
        retried.attributes
    );
    assert!(
        retried
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "request_id" && kv.value.as_str().starts_with("req_sim")),
        "each attempt's answer names its request id: {:?}",
        retried.attributes
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_fallback_is_inside_the_span_and_names_the_serving_model() {
    let otel = Otel::install();
    let sim = sim(Scenario::builder()
        .model(ModelSpec::new("gpt-4o-mini").completion_tokens(5))
        .outage("gpt-4o", Duration::ZERO, Duration::from_secs(600)));
    let ai = AiStack::seeded(1)
        .fallback(ModelFallbackLayer::models(["gpt-4o-mini"]).unwrap())
        .layer(sim.service());
    let res = ai.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    let models: Vec<_> = sim.calls().into_iter().filter_map(|c| c.model).collect();
    assert_eq!(models.last().map(String::as_str), Some("gpt-4o-mini"));

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "chat gpt-4o", "named by the model asked for");
    assert_eq!(str_attr(&span, "gen_ai.request.model"), "gpt-4o");
    assert_eq!(str_attr(&span, "gen_ai.response.model"), "gpt-4o-mini");
    assert_eq!(int_attr(&span, "gen_ai.usage.output_tokens"), 5);
    assert_eq!(attr(&span, "error.type"), None);
    // ModelFallback's event is the span's own; each route's AiRetry span is its child.
    assert!(
        span.events.iter().any(|e| e.name == "route failed"),
        "{:?}",
        span.events
    );
    let spans = otel.spans();
    let retries: Vec<_> = spans.iter().filter(|s| s.name == "ai_retry").collect();
    assert_eq!(retries.len(), 2, "one AiRetry span per route");
    assert!(retries
        .iter()
        .all(|r| r.parent_span_id == span.span_context.span_id()));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_error_response_sets_error_type_and_the_request_id() {
    let otel = Otel::install();
    let sim = sim(Scenario::builder().quota_exhausted_for("gpt-4o"));
    let ai = AiStack::seeded(1).layer(sim.service());
    let res = ai.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 429);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    drop(res);

    let span = otel.gen_ai_span();
    assert_eq!(span.name, "chat gpt-4o");
    assert_eq!(str_attr(&span, "error.type"), "quota_exhausted");
    assert!(
        matches!(span.status, Status::Error { .. }),
        "{:?}",
        span.status
    );
    assert_eq!(int_attr(&span, "http.response.status_code"), 429);
    assert_eq!(
        str_attr(&span, "http.response.header.x-request-id"),
        request_id
    );
    assert_eq!(attr(&span, "gen_ai.usage.input_tokens"), None);
}

/// The events of every span exported that carry `key`, by message, with its value.
fn events_with(otel: &Otel, key: &str) -> Vec<(String, String)> {
    otel.spans()
        .iter()
        .flat_map(|s| s.events.iter())
        .filter_map(|e| {
            let kv = e.attributes.iter().find(|kv| kv.key.as_str() == key)?;
            Some((e.name.to_string(), kv.value.to_string()))
        })
        .collect()
}

/// The layers' own events (Classify's reading of an error response, StallDetector's of a
/// stream) name the provider as the span does: `gen_ai.provider.name`, with its name in
/// the conventions (`gcp.gemini`), not the older `gen_ai.system`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_layers_events_name_the_provider_as_the_span_does() {
    let gemini = |path: &str| {
        Request::post(format!(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:{path}"
        ))
        .body(AiBody::from(
            r#"{"contents":[{"role":"user","parts":[{"text":"Hello"}]}]}"#,
        ))
        .unwrap()
    };
    let flash = || ModelSpec::new("gemini-2.5-flash").completion_tokens(7);
    // An error response, read by Classify.
    let otel = Otel::install();
    let provider = sim(Scenario::builder()
        .model(flash())
        .quota_exhausted_for("gemini-2.5-flash"));
    let ai = AiStack::seeded(1).layer(provider.service());
    let res = ai.oneshot(gemini("generateContent")).await.unwrap();
    assert_eq!(res.status(), 429);
    drop(res);
    let named = events_with(&otel, "gen_ai.provider.name");
    let classified = ("classified provider error".into(), "gcp.gemini".into());
    assert!(named.contains(&classified), "{named:?}");
    assert_eq!(events_with(&otel, "gen_ai.system"), Vec::new());
    drop(otel);

    // An error event inside a stream, read by StallDetector.
    let otel = Otel::install();
    let provider =
        sim(Scenario::builder()
            .model(flash())
            .stream_fault(StreamFault::ErrorEventAfterTokens {
                tokens: 3,
                probability: 1.0,
            }));
    let ai = AiStack::seeded(1).layer(provider.service());
    let res = ai
        .oneshot(gemini("streamGenerateContent?alt=sse"))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap_err();
    let named = events_with(&otel, "gen_ai.provider.name");
    let in_stream = (
        "provider error inside the stream".into(),
        "gcp.gemini".into(),
    );
    assert!(named.contains(&in_stream), "{named:?}");
    assert_eq!(events_with(&otel, "gen_ai.system"), Vec::new());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stream_that_fails_half_way_ends_its_span_with_the_error() {
    for (fault, expected) in [
        (
            StreamFault::CutAfterTokens {
                tokens: 3,
                probability: 1.0,
            },
            "truncated",
        ),
        (
            StreamFault::ErrorEventAfterTokens {
                tokens: 3,
                probability: 1.0,
            },
            "overloaded",
        ),
    ] {
        let otel = Otel::install();
        let sim = sim(Scenario::builder().stream_fault(fault));
        let ai = AiStack::seeded(1).layer(sim.service());
        let res = ai.oneshot(anthropic_stream()).await.unwrap();
        assert_eq!(res.status(), 200);
        let err = res.into_body().collect().await.unwrap_err();
        let span = otel.gen_ai_span();
        assert_eq!(str_attr(&span, "error.type"), expected, "{err}");
        assert!(matches!(span.status, Status::Error { .. }));
        assert_eq!(int_attr(&span, "http.response.status_code"), 200);
        assert!(str_attr(&span, "gen_ai.response.id").starts_with("msg_"));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failed_call_sets_error_type_from_the_error() {
    let otel = Otel::install();
    let sim = sim(Scenario::builder());
    let ai = AiStack::seeded(1).layer(sim.service());
    let long = "m".repeat(1000);
    let err = ai.oneshot(chat(&long, false)).await.unwrap_err();
    assert!(matches!(
        AiError::find(&*err),
        Some(AiError::ModelTooLong { .. })
    ));
    let span = otel.gen_ai_span();
    assert_eq!(str_attr(&span, "error.type"), "model_too_long");
    assert!(matches!(span.status, Status::Error { .. }));
    assert!(
        str_attr(&span, "gen_ai.request.model").len() <= 256,
        "a model name is bounded in the span too"
    );
    assert_eq!(attr(&span, "http.response.status_code"), None);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nothing_is_traced_without_a_subscriber() {
    // No subscriber: the stack behaves as before and the response says nothing of it.
    let sim = sim(Scenario::builder());
    let mut ai = AiStack::seeded(1).layer(sim.service());
    let res = ServiceExt::<Request<AiBody>>::ready(&mut ai)
        .await
        .unwrap()
        .call(chat("gpt-4o", false))
        .await
        .unwrap();
    assert!(
        format!("{:?}", res.body()).contains("traced: false"),
        "{:?}",
        res.body()
    );
    res.into_body().collect().await.unwrap();
}

#[test]
fn the_recommended_buckets() {
    assert_eq!(telemetry::DURATION_BUCKETS[0], 0.01);
    assert_eq!(telemetry::DURATION_BUCKETS[13], 81.92);
    assert!(telemetry::DURATION_BUCKETS
        .windows(2)
        .all(|w| w[1] == 2.0 * w[0]));
    assert!(telemetry::TOKEN_BUCKETS
        .windows(2)
        .all(|w| w[1] == 4.0 * w[0]));
    assert_eq!(telemetry::TOKEN_BUCKETS[13], 67108864.0);
    let names: Vec<_> = telemetry::BUCKETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "gen_ai.client.operation.duration",
            "gen_ai.client.token.usage",
            "gen_ai.client.operation.time_to_first_chunk",
            "gen_ai.client.operation.time_per_output_chunk"
        ]
    );
}
