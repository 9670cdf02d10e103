//! The GenAI client metrics of `TelemetryLayer` (metrics-util's debugging recorder) after
//! calls through `AiStack` against the simulator, in-process on a paused clock. Apart from
//! tests/telemetry.rs: `describe_metrics` turns the metrics on for the whole process.

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use tower::{Layer, ServiceExt};
use tower_ai::prelude::*;
use tower_ai::telemetry;
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

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

/// The debugging recorder, local to this thread while the guard lives, with the GenAI
/// metrics described (and so turned on).
fn recorder() -> (DebuggingRecorder, Snapshotter) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    (recorder, snapshotter)
}

type Series = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn find<'a>(
    series: &'a Series,
    name: &str,
    labels: &[(&str, &str)],
) -> &'a (
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
) {
    let matching: Vec<_> = series
        .iter()
        .filter(|(k, ..)| k.key().name() == name)
        .filter(|(k, ..)| {
            labels
                .iter()
                .all(|(lk, lv)| k.key().labels().any(|l| l.key() == *lk && l.value() == *lv))
        })
        .collect();
    assert_eq!(matching.len(), 1, "{name} {labels:?} in {series:#?}");
    matching[0]
}

fn label_keys(key: &CompositeKey) -> Vec<String> {
    let mut keys: Vec<_> = key.key().labels().map(|l| l.key().to_owned()).collect();
    keys.sort();
    keys
}

fn histogram(v: &DebugValue) -> Vec<f64> {
    match v {
        DebugValue::Histogram(values) => values.iter().map(|v| v.into_inner()).collect(),
        other => panic!("not a histogram: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn metrics_of_a_chat_call_and_of_a_stream() {
    let (recorder, snapshotter) = recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    telemetry::describe_metrics();
    let sim = sim(Scenario::builder());
    let ai = AiStack::seeded(1).layer(sim.service());
    let res = ai.clone().oneshot(chat("gpt-4o", false)).await.unwrap();
    res.into_body().collect().await.unwrap();
    let res = ai.clone().oneshot(anthropic_stream()).await.unwrap();
    let mut body = res.into_body();
    let mut chunks = 0;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().data_ref().is_some_and(|d| !d.is_empty()) {
            chunks += 1;
        }
    }
    let series: Series = snapshotter.snapshot().into_vec();

    // Duration: one per call, in seconds, labelled as the conventions say.
    let openai = [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "openai"),
        ("gen_ai.request.model", "gpt-4o"),
        ("gen_ai.response.model", "gpt-4o"),
        ("server.address", "api.openai.com"),
        ("server.port", "443"),
    ];
    let (key, unit, description, value) = find(&series, telemetry::OPERATION_DURATION, &openai);
    assert_eq!(key.kind(), MetricKind::Histogram);
    assert_eq!(*unit, Some(metrics::Unit::Seconds));
    assert!(description.is_some());
    assert_eq!(
        label_keys(key),
        [
            "gen_ai.operation.name",
            "gen_ai.provider.name",
            "gen_ai.request.model",
            "gen_ai.response.model",
            "server.address",
            "server.port"
        ]
    );
    let secs = histogram(value);
    assert_eq!(secs.len(), 1);
    assert!((0.4..2.0).contains(&secs[0]), "{secs:?}");

    // Token usage: input and output, as counts.
    let (key, unit, _, value) = find(
        &series,
        telemetry::TOKEN_USAGE,
        &[
            ("gen_ai.provider.name", "openai"),
            ("gen_ai.token.type", "output"),
        ],
    );
    assert_eq!(key.kind(), MetricKind::Histogram);
    assert_eq!(*unit, Some(metrics::Unit::Count));
    assert_eq!(histogram(value), [12.0]);
    let (_, _, _, value) = find(
        &series,
        telemetry::TOKEN_USAGE,
        &[
            ("gen_ai.provider.name", "anthropic"),
            ("gen_ai.token.type", "input"),
        ],
    );
    assert_eq!(histogram(value).len(), 1);

    // Time to first chunk and per chunk: the stream only.
    let anthropic = [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "anthropic"),
        ("gen_ai.request.model", "claude-sonnet-4-5"),
        ("gen_ai.response.model", "claude-sonnet-4-5"),
        ("server.address", "api.anthropic.com"),
    ];
    let (key, unit, _, value) = find(&series, telemetry::TIME_TO_FIRST_CHUNK, &anthropic);
    assert_eq!(key.kind(), MetricKind::Histogram);
    assert_eq!(*unit, Some(metrics::Unit::Seconds));
    let ttfc = histogram(value);
    assert_eq!(ttfc.len(), 1);
    assert!((0.4..0.5).contains(&ttfc[0]), "{ttfc:?}");
    let (_, unit, _, value) = find(&series, telemetry::TIME_PER_OUTPUT_CHUNK, &anthropic);
    assert_eq!(*unit, Some(metrics::Unit::Seconds));
    let per_chunk = histogram(value);
    assert_eq!(per_chunk.len(), chunks - 1, "every chunk after the first");
    assert!(
        per_chunk.iter().any(|s| (0.049..0.051).contains(s)),
        "{per_chunk:?}"
    );
    assert!(
        series
            .iter()
            .filter(|(k, ..)| k.key().name() == telemetry::TIME_TO_FIRST_CHUNK)
            .all(|(k, ..)| k.key().labels().all(|l| l.value() != "openai")),
        "no chunk metrics for a non-streamed answer"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failed_call_is_timed_with_its_error_type() {
    let (recorder, snapshotter) = recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    telemetry::describe_metrics();
    let sim = sim(Scenario::builder().quota_exhausted_for("gpt-4o"));
    let ai = AiStack::seeded(1).layer(sim.service());
    let res = ai.oneshot(chat("gpt-4o", false)).await.unwrap();
    assert_eq!(res.status(), 429);
    let series: Series = snapshotter.snapshot().into_vec();
    let (key, _, _, value) = find(
        &series,
        telemetry::OPERATION_DURATION,
        &[("error.type", "quota_exhausted")],
    );
    assert!(label_keys(key).contains(&"gen_ai.request.model".to_owned()));
    assert!(!label_keys(key).contains(&"gen_ai.response.model".to_owned()));
    assert_eq!(histogram(value).len(), 1);
    assert!(
        series
            .iter()
            .all(|(k, ..)| k.key().name() != telemetry::TOKEN_USAGE),
        "no usage for an error"
    );
}
