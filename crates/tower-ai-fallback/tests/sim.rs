//! ModelFallback against the simulator: a mixed chain (same-endpoint model rewrite, then
//! an Anthropic-dialect provider reached through a user rewrite of the OpenAI body), with
//! the bodies checked byte for byte by the simulator's digests.

use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::{Layer, ServiceExt};
use tower_ai_core::{AiBody, BoxError, ClassifiedBody, ClassifyLayer, ReplayBody};
use tower_ai_fallback::{rewrite_model, FallbackChain, ModelFallbackLayer, Route, Served};
use tower_ai_sim::{digest, Dialect, Fault, Latency, ModelSpec, Outcome, Scenario, Simulator};

type ResBody = ClassifiedBody<tower_ai_sim::SimBody>;

fn openai_sim() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(7)
            .model(ModelSpec::new("gpt-a").context_window(64))
            .model(ModelSpec::new("gpt-a-mini"))
            .model(ModelSpec::new("gpt-a-long").context_window(1_000_000))
            .outage("gpt-a", Duration::ZERO, Duration::from_secs(3600))
            .fault(Fault::status(500).model("gpt-a-mini"))
            .latency(Latency::fixed(Duration::from_millis(300)))
            .build()
            .unwrap(),
    )
}

fn anthropic_sim() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(8)
            .model(ModelSpec::new("claude-b").completion_tokens(12))
            .latency(Latency::fixed(Duration::from_millis(500)))
            .build()
            .unwrap(),
    )
}

/// OpenAI Chat Completions → Anthropic Messages: system messages move to `system`,
/// `max_tokens` is required, the model is mapped, the path and headers change.
fn openai_to_anthropic(req: &mut Request<AiBody>) -> Result<(), BoxError> {
    let body: Value = serde_json::from_slice(req.body().bytes().ok_or("body not in memory")?)?;
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for m in body["messages"].as_array().ok_or("no messages")? {
        match m["role"].as_str() {
            Some("system") => system.push(m["content"].as_str().unwrap_or_default().to_owned()),
            _ => messages.push(json!({"role": m["role"], "content": m["content"]})),
        }
    }
    let mut out = json!({
        "model": "claude-b",
        "max_tokens": body.get("max_tokens").and_then(Value::as_u64).unwrap_or(1024),
        "messages": messages,
    });
    if !system.is_empty() {
        out["system"] = Value::String(system.join("\n"));
    }
    *req.body_mut() = AiBody::from(serde_json::to_vec(&out)?);
    *req.uri_mut() = "https://api.anthropic.com/v1/messages".parse()?;
    let headers = req.headers_mut();
    headers.remove(http::header::AUTHORIZATION);
    headers.insert("x-api-key", "sk-ant-test".parse()?);
    headers.insert("anthropic-version", "2023-06-01".parse()?);
    headers.remove(http::header::CONTENT_LENGTH);
    Ok(())
}

const BODY: &str = r#"{"model":"gpt-a","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is a \"model\"?"}],"max_tokens":50,  "temperature":0.2}"#;

fn request() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .header("content-type", "application/json")
        .body(AiBody::from(BODY))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn mixed_chain_openai_then_anthropic() {
    let openai = openai_sim();
    let anthropic = anthropic_sim();
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(Route::primary("openai-a"))
        .route(Route::model("gpt-a-mini"))
        .route(
            Route::service("anthropic", ClassifyLayer::new().layer(anthropic.service()))
                .rewrite(openai_to_anthropic),
        )
        .build()
        .unwrap();
    let svc = ModelFallbackLayer::new(chain).layer(ClassifyLayer::new().layer(openai.service()));

    let start = tokio::time::Instant::now();
    let res: Response<ResBody> = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    let served = Served::get(&res).unwrap().clone();
    assert_eq!((&*served.route, served.index), ("anthropic", 2));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let msg: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(msg["type"], "message", "an Anthropic answer: {msg}");
    // Two failed OpenAI calls (error latency) and one Anthropic call (500 ms).
    assert!(start.elapsed() >= Duration::from_millis(500));

    let calls = openai.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].model.as_deref(), Some("gpt-a"));
    assert_eq!(calls[0].outcome, Outcome::Outage);
    assert_eq!(
        calls[0].body_digest,
        digest(BODY.as_bytes()),
        "first route: the body as sent"
    );
    assert_eq!(calls[1].model.as_deref(), Some("gpt-a-mini"));
    assert_eq!(calls[1].outcome, Outcome::Fault);
    let rewritten = rewrite_model(BODY.as_bytes(), "gpt-a-mini").unwrap();
    assert_eq!(
        calls[1].body_digest,
        digest(&rewritten),
        "only the model value changed"
    );
    assert_eq!(calls[1].body_len, BODY.len() + "-mini".len());

    let calls = anthropic.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].dialect, Dialect::Anthropic);
    assert_eq!(calls[0].path, "/v1/messages");
    assert_eq!(calls[0].model.as_deref(), Some("claude-b"));
    assert_eq!(calls[0].outcome, Outcome::Success);
}

#[tokio::test(start_paused = true)]
async fn context_window_fallback_against_the_simulator() {
    let long = format!(
        r#"{{"model":"gpt-a","messages":[{{"role":"user","content":"{}"}}],"max_tokens":10}}"#,
        "lorem ipsum ".repeat(100)
    );
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-a").context_window(64))
            .model(ModelSpec::new("gpt-a-mini").context_window(64))
            .model(ModelSpec::new("gpt-a-long").context_window(1_000_000))
            .build()
            .unwrap(),
    );
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(Route::primary("small").context_window(64))
        .route(Route::model("gpt-a-mini").context_window(64))
        .route(Route::model("gpt-a-long").context_window(1_000_000))
        .build()
        .unwrap();
    let svc = ModelFallbackLayer::new(chain).layer(ClassifyLayer::new().layer(sim.service()));
    let req = Request::post("/v1/chat/completions")
        .body(AiBody::from(long.clone()))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(&*Served::get(&res).unwrap().route, "gpt-a-long");
    let calls = sim.calls();
    let models: Vec<_> = calls.iter().map(|c| c.model.clone().unwrap()).collect();
    assert_eq!(
        models,
        ["gpt-a", "gpt-a-long"],
        "the same-size model was skipped"
    );
    assert_eq!(calls[0].outcome, Outcome::ContextLengthExceeded);
    assert_eq!(
        calls[1].body_digest,
        digest(&rewrite_model(long.as_bytes(), "gpt-a-long").unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn served_names_the_model_the_cross_provider_route_sent() {
    let openai = openai_sim();
    let anthropic = anthropic_sim();
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(Route::primary("openai-a"))
        .route(
            Route::service("anthropic", ClassifyLayer::new().layer(anthropic.service()))
                .rewrite(openai_to_anthropic),
        )
        .build()
        .unwrap();
    let svc = ModelFallbackLayer::new(chain).layer(ClassifyLayer::new().layer(openai.service()));
    let res = svc.oneshot(request()).await.unwrap();
    let served = Served::get(&res).unwrap();
    assert_eq!(
        (&*served.route, served.model.as_deref()),
        ("anthropic", Some("claude-b"))
    );
}

/// A simulator whose model (or deployment) `down` is in an outage and `up` answers.
fn outage_sim(down: &str, up: &str) -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(9)
            .model(ModelSpec::new(down))
            .model(ModelSpec::new(up).completion_tokens(5))
            .outage(down, Duration::ZERO, Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn gemini_routes_rewrite_the_model_in_the_path_and_keep_the_query() {
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"Hi"}]}]}"#;
    for (verb, sse) in [
        ("streamGenerateContent?alt=sse", true),
        ("generateContent", false),
    ] {
        let sim = outage_sim("gemini-a", "gemini-b");
        let chain = FallbackChain::<AiBody, ResBody>::builder()
            .route(Route::primary("primary"))
            .route(Route::model("gemini-b"))
            .build()
            .unwrap();
        let svc = ModelFallbackLayer::new(chain).layer(ClassifyLayer::new().layer(sim.service()));
        let req = Request::post(format!(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-a:{verb}"
        ))
        .header("x-goog-api-key", "test")
        .body(AiBody::from(body))
        .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200, "{verb}");
        let served = Served::get(&res).unwrap().clone();
        assert_eq!(
            (&*served.route, served.model.as_deref()),
            ("gemini-b", Some("gemini-b"))
        );
        let streamed = res
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        assert_eq!(streamed, sse, "{verb}: alt=sse kept");
        let calls = sim.calls();
        let seen: Vec<_> = calls
            .iter()
            .map(|c| (c.path.as_str(), c.model.as_deref(), c.outcome))
            .collect();
        let method = verb.split('?').next().unwrap();
        assert_eq!(
            seen,
            [
                (
                    &*format!("/v1beta/models/gemini-a:{method}"),
                    Some("gemini-a"),
                    Outcome::Outage
                ),
                (
                    &*format!("/v1beta/models/gemini-b:{method}"),
                    Some("gemini-b"),
                    Outcome::Success
                ),
            ]
        );
        assert_eq!(
            calls[1].body_digest,
            digest(body.as_bytes()),
            "a body without a model is sent as it is"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn azure_routes_call_the_fallback_deployment() {
    let sim = outage_sim("prod-4o", "prod-4o-mini");
    let chain = FallbackChain::<AiBody, ResBody>::builder()
        .route(Route::primary("primary"))
        .route(Route::model("prod-4o-mini"))
        .build()
        .unwrap();
    let svc = ModelFallbackLayer::new(chain).layer(ClassifyLayer::new().layer(sim.service()));
    // Azure ignores a body's model (the deployment decides); some clients send one.
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#;
    let req = Request::post(
        "https://res.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
    )
    .header("api-key", "test")
    .body(AiBody::from(body))
    .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let served = Served::get(&res).unwrap();
    assert_eq!(served.model.as_deref(), Some("prod-4o-mini"));
    let calls = sim.calls();
    let seen: Vec<_> = calls
        .iter()
        .map(|c| (c.path.as_str(), c.model.as_deref(), c.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "/openai/deployments/prod-4o/chat/completions",
                Some("prod-4o"),
                Outcome::Outage
            ),
            (
                "/openai/deployments/prod-4o-mini/chat/completions",
                Some("prod-4o-mini"),
                Outcome::Success
            ),
        ],
        "the fallback deployment is the one called"
    );
    assert_eq!(
        calls[1].body_digest,
        digest(&rewrite_model(body.as_bytes(), "prod-4o-mini").unwrap()),
        "the body's model follows the deployment"
    );
}
