//! The tower-ai stack over reqwest, through a small adapter service.
//!
//! The layers are written against `tower::Service<http::Request<B>>`, so any HTTP client
//! fits under them once it speaks `http` types. reqwest speaks them at its edges
//! (`reqwest::Request: TryFrom<http::Request<_>>`, `http::Response<reqwest::Body>: From<reqwest::Response>`),
//! and the adapter below is all it takes.
//!
//! To show the layers at work, the simulated provider has its primary model down: the call
//! is answered 503 (`server_is_overloaded`), classified as `Overloaded`, retried once by
//! `AiRetry` (after a jittered backoff), and then sent by `ModelFallback` to a smaller
//! model, all inside one `oneshot`.
//!
//! By default it talks to the tower-ai simulator on a loopback port; set `OPENAI_BASE_URL`
//! (and `OPENAI_API_KEY`, `OPENAI_MODEL`) for another OpenAI-compatible server. reqwest is
//! built here without TLS (no `rustls` feature), so the URL must be `http://`; enable one
//! of reqwest's TLS features for a public provider.
//!
//! Run with:
//!
//! ```text
//! cargo run --example reqwest_client
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, Request, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai::fallback::{FallbackChain, Route, Served};
use tower_ai::prelude::*;
use tower_ai::sim::{ModelSpec, Scenario, Simulator};
use tower_ai::Usage;

/// The adapter: `http::Request<AiBody>` in, `http::Response<reqwest::Body>` out.
#[derive(Clone, Debug)]
struct ReqwestService(reqwest::Client);

impl Service<Request<AiBody>> for ReqwestService {
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    // reqwest does not name its response future, so it is boxed here (one allocation per
    // call, next to the many reqwest makes anyway).
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(())) // reqwest's pool takes any number of requests
    }

    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        // A replayable body goes over as shared bytes (no copy), a streamed one as a stream.
        let req = req.map(|body| match body.as_bytes() {
            Some(bytes) => reqwest::Body::from(bytes.clone()),
            None => reqwest::Body::wrap(body),
        });
        let client = self.0.clone();
        Box::pin(async move {
            let req = reqwest::Request::try_from(req)?;
            Ok(client.execute(req).await?.into())
        })
    }
}

/// The tower-ai stack over reqwest: [`AiStack`] in its recommended order, with the
/// account's limits and a fallback model.
fn stack(
    client: reqwest::Client,
    fallback_model: &str,
) -> Result<
    impl Service<
            Request<AiBody>,
            Response = Response<impl http_body::Body<Data = bytes::Bytes, Error = BoxError>>,
            Error = BoxError,
        > + Clone,
    BoxError,
> {
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model(fallback_model))
        .build()?;
    let stack = AiStack::new()
        // 2 attempts per model (the default is 3): the primary is tried twice, then the
        // fallback model answers.
        .retry(AiRetryLayer::new(2))
        .budget(TokenBudgetLayer::new(500, 200_000))
        .fallback(ModelFallbackLayer::new(chain));
    Ok(ServiceBuilder::new()
        .ai_stack(stack)
        .service(ReqwestService(client)))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The primary model is down for the next hour; the small one answers.
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(12))
            .outage("gpt-4o", Duration::ZERO, Duration::from_secs(3600))
            .build()?,
    );
    let (base, api_key, model, simulated) = match std::env::var("OPENAI_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("OPENAI_API_KEY").unwrap_or_default(),
            std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o".into()),
            None,
        ),
        Err(_) => {
            let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            (
                format!("{}/v1", server.url()),
                "sk-simulated".into(),
                "gpt-4o".into(),
                Some(server),
            )
        }
    };
    if base.starts_with("https://") {
        return Err("built without TLS: use an http:// OPENAI_BASE_URL (see the header)".into());
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let ai = stack(client, "gpt-4o-mini")?;
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hello, reqwest"}]});
    let req = Request::post(format!("{base}/chat/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {api_key}"))
        .body(AiBody::from(body.to_string()))?;

    let res = ai.oneshot(req).await?;
    let status = res.status();
    let fallback = Served::get(&res).and_then(|s| s.model.clone());
    let bytes = res.into_body().collect().await?.to_bytes();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let answer: Value = serde_json::from_slice(&bytes)?;
    let usage = Usage::from_json(&bytes).ok_or("no usage in the answer")?;
    println!("answer: {}", answer["choices"][0]["message"]["content"]);
    match &fallback {
        Some(model) => println!("served by the fallback model {model}"),
        None => println!("served by the primary model {model}"),
    }
    println!(
        "usage:  {} in, {} out",
        usage.input_tokens, usage.output_tokens
    );
    assert!(usage.output_tokens > 0, "no usage");

    if simulated.is_some() {
        // What reached the provider: the primary's two 503s, then the fallback's answer.
        let stats = sim.stats();
        println!("simulator saw {} calls: {:?}", stats.total, stats.by_status);
        assert_eq!((stats.count(503), stats.count(200)), (2, 1));
        assert_eq!(fallback.as_deref(), Some("gpt-4o-mini"));
    }
    Ok(())
}
