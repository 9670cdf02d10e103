//! OpenAI chat completions through the tower-ai stack over a hyper-util client: one answer
//! in a single JSON body, then one streamed piece by piece, with its token usage.
//!
//! By default it starts the tower-ai simulator on a loopback port and talks to it. Set
//! `OPENAI_BASE_URL` (and `OPENAI_API_KEY`, `OPENAI_MODEL`) to talk to an OpenAI-compatible
//! server instead. This example is built without TLS, so the URL must be `http://`: a local
//! server (Ollama, vLLM, llama.cpp, a LiteLLM proxy); for `https://api.openai.com/v1` give
//! the client a TLS connector such as `hyper-rustls`'s `HttpsConnector`.
//!
//! Run with:
//!
//! ```text
//! cargo run --example openai_chat
//! OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_MODEL=llama3.2 cargo run --example openai_chat
//! ```
//!
//! It exits non-zero if an answer is empty or reports no usage.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http::{header, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai::core::sse::{SseItem, SseParser};
use tower_ai::core::stream::{StreamDialect, StreamScanner};
use tower_ai::fallback::{FallbackChain, Route};
use tower_ai::prelude::*;
use tower_ai::sim::{Latency, ModelSpec, Scenario, Simulator};
use tower_ai::Usage;

/// The tower-ai stack over a plain HTTP client: [`AiStack`], which puts every layer in the
/// recommended order (outermost first):
///
/// ```text
/// ModelFallback → AiRetry → CircuitBreaker → TokenBudget → RetryAfterAware → StallDetector → Classify → client
/// ```
///
/// Its defaults: up to 3 attempts per model, honouring Retry-After, never after a stream
/// began; a circuit breaker per model that keeps failing; a cooldown gate, so when the
/// provider says "come back in 20 s" every caller waits together; first-byte, idle and
/// total deadlines on streams, truncation an error; one classification per response, next
/// to the wire. Added here: the two layers only you can configure, the account's limits and
/// a fallback model.
fn stack(
    client: Client<HttpConnector, AiBody>,
    fallback_model: &str,
) -> Result<
    impl Service<
            Request<AiBody>,
            Response = Response<impl Body<Data = bytes::Bytes, Error = BoxError>>,
            Error = BoxError,
        > + Clone,
    BoxError,
> {
    // If the model is overloaded or out of quota, ask a smaller one (same endpoint).
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model(fallback_model))
        .build()?;
    let stack = AiStack::new()
        // Stay inside the account's limits (500 requests, 200 000 tokens a minute) instead
        // of learning them from 429s.
        .budget(TokenBudgetLayer::new(500, 200_000))
        .fallback(ModelFallbackLayer::new(chain));
    Ok(ServiceBuilder::new().ai_stack(stack).service(client))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A simulated provider on loopback, unless a real one is configured.
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(24))
            .latency(Latency::fixed(Duration::from_millis(50)))
            .token_interval(Latency::fixed(Duration::from_millis(10)))
            .build()?,
    );
    let (base, api_key, model, _server) = match std::env::var("OPENAI_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("OPENAI_API_KEY").unwrap_or_default(),
            std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into()),
            None,
        ),
        Err(_) => {
            let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let base = format!("{}/v1", server.url());
            (base, "sk-simulated".into(), "gpt-4o".into(), Some(server))
        }
    };
    if base.starts_with("https://") {
        return Err("built without TLS: use an http:// OPENAI_BASE_URL (see the header)".into());
    }
    println!("talking to {base} (model {model})");

    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let ai = stack(client, "gpt-4o-mini")?;
    let request = |body: Value| {
        Request::post(format!("{base}/chat/completions"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {api_key}"))
            .body(AiBody::from(body.to_string()))
    };
    let messages = json!([{"role": "user", "content": "Say hello to Tower in one sentence."}]);

    // 1. Non-streamed: one JSON body.
    let res = ai
        .clone()
        .oneshot(request(json!({"model": model, "messages": messages}))?)
        .await?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let answer: Value = serde_json::from_slice(&bytes)?;
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    let usage = Usage::from_json(&bytes).ok_or("no usage in the answer")?;
    println!("answer: {text}");
    println!(
        "usage:  {} in, {} out",
        usage.input_tokens, usage.output_tokens
    );
    assert!(!text.is_empty(), "empty answer");
    assert!(usage.input_tokens > 0 && usage.output_tokens > 0);

    // 2. Streamed: print the text as it arrives, then the usage from the last chunk.
    let body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let res = ai.oneshot(request(body)?).await?;
    assert!(
        res.status().is_success(),
        "stream refused: {}",
        res.status()
    );
    let mut body = std::pin::pin!(res.into_body());
    let (mut sse, mut scanner) = (
        SseParser::new(),
        StreamScanner::new(StreamDialect::OpenAiChat),
    );
    let mut streamed = String::new();
    print!("stream: ");
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame?.into_data() else {
            continue;
        };
        scanner.feed(&chunk); // usage, finish reason, in-stream errors
        sse.feed(&chunk, |item| {
            let SseItem::Event { data, .. } = item else {
                return;
            };
            let Ok(event) = serde_json::from_slice::<Value>(data) else {
                return;
            }; // [DONE]
            if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
                print!("{piece}");
                streamed.push_str(piece);
            }
        });
        std::io::stdout().flush()?;
    }
    println!();
    let usage = scanner.usage().ok_or("the stream reported no usage")?;
    println!(
        "usage:  {} in, {} out, finish reason {:?}",
        usage.input_tokens,
        usage.output_tokens,
        scanner.finish_reason()
    );
    assert!(!streamed.is_empty(), "empty stream");
    assert!(scanner.terminal_seen(), "the stream ended without [DONE]");
    assert!(usage.output_tokens > 0);
    Ok(())
}
