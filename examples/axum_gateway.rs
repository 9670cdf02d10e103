//! An OpenAI-compatible gateway built with axum: `POST /v1/chat/completions`, streamed or
//! not, forwarded to an upstream provider through the tower-ai stack, with a token budget
//! per client API key protecting the gateway itself.
//!
//! Two stacks, two jobs:
//! - the **upstream** stack sits on the gateway's HTTP client and keeps the gateway's one
//!   provider account healthy (its limits, classification, fallback);
//! - the **gateway** budget sits in front of it, keyed by the caller's API key (hashed,
//!   never stored), so one noisy client gets OpenAI-style 429s with `retry-after` instead
//!   of eating everyone's upstream quota.
//!
//! Streams pass through untouched: the SSE bytes the upstream sends are the bytes the
//! client reads. A stream the upstream stops feeding is cut by the StallDetector with an
//! error, so the client's connection is reset mid-stream: its SDK raises, instead of
//! taking a truncated answer for a whole one. Any OpenAI SDK works against it (`examples/axum_gateway_sdk_test.py`
//! checks the official Python one, `.ci/sdk-test.sh` runs that check).
//!
//! By default the upstream is the tower-ai simulator on a loopback port; set
//! `OPENAI_BASE_URL` and `OPENAI_API_KEY` for another upstream (`http://` only: this example
//! is built without TLS; add a TLS connector such as `hyper-rustls` for a public provider).
//!
//! Run with:
//!
//! ```text
//! cargo run --example axum_gateway                      # self-test: serve, call, check, exit
//! cargo run --example axum_gateway -- --port 3000       # serve until Ctrl-C
//! cargo run --example axum_gateway -- --serve-for-test  # print the base URL, serve until stdin closes
//! ```
//!
//! Then, for example: `curl -N localhost:3000/v1/chat/completions -H 'authorization: Bearer
//! sk-me' -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}'`

use std::future::IntoFuture as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai::core::keys::ApiKeyHash;
use tower_ai::fallback::{FallbackChain, Route};
use tower_ai::prelude::*;
use tower_ai::sim::{Latency, ModelSpec, Scenario, Simulator};

/// Requests per minute each client API key may send through the gateway.
const CLIENT_RPM: u64 = 5;

/// What the axum handler calls: the gateway budget over the upstream stack.
type Gateway = BoxCloneSyncService<Request<AiBody>, Response, BoxError>;

/// The upstream stack on the gateway's HTTP client: [`AiStack`] in its recommended order,
/// with the gateway's provider account limits and a fallback model.
fn upstream_stack(
    client: Client<HttpConnector, AiBody>,
) -> Result<BoxCloneSyncService<Request<AiBody>, Response, BoxError>, BoxError> {
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model("gpt-4o-mini"))
        .build()?;
    let stack = AiStack::new()
        // The gateway's provider account: stay inside its limits.
        .budget(TokenBudgetLayer::new(500, 200_000))
        .fallback(ModelFallbackLayer::new(chain));
    let svc = ServiceBuilder::new()
        .map_response(|res: http::Response<_>| res.map(Body::new))
        .ai_stack(stack)
        .service(client);
    Ok(BoxCloneSyncService::new(svc))
}

/// The gateway: a budget per client API key, then the request re-addressed to the upstream
/// with the gateway's own credentials, then the upstream stack.
fn gateway(
    upstream_base: &str,
    upstream_key: &str,
    client: Client<HttpConnector, AiBody>,
) -> Result<Gateway, BoxError> {
    let per_client = TokenBudgetLayer::builder()
        .key_fn(ApiKeyHash)
        .requests_per_minute(CLIENT_RPM)
        .tokens_per_minute(50_000)
        .reject() // answer 429 at once; the client's SDK knows how to wait
        .build()?;
    let uri: Uri = format!("{upstream_base}/chat/completions").parse()?;
    let auth = HeaderValue::from_str(&format!("Bearer {upstream_key}"))?;
    let svc = ServiceBuilder::new()
        .map_response(|res: http::Response<_>| res.map(Body::new))
        .layer(per_client)
        .map_request(move |mut req: Request<AiBody>| {
            *req.uri_mut() = uri.clone();
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
            req
        })
        .service(upstream_stack(client)?);
    Ok(BoxCloneSyncService::new(svc))
}

async fn chat_completions(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = |v: &&HeaderValue| {
        v.as_bytes()
            .strip_prefix(b"Bearer ")
            .is_some_and(|k| !k.trim_ascii().is_empty())
    };
    let Some(key) = headers.get(header::AUTHORIZATION).filter(bearer) else {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing bearer API key",
        );
    };
    let mut req = Request::new(AiBody::from(body));
    *req.method_mut() = http::Method::POST;
    req.headers_mut().insert(header::AUTHORIZATION, key.clone());
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match gateway.oneshot(req).await {
        // Status, content type, rate-limit headers and body (JSON or SSE) as the upstream sent them.
        Ok(mut res) => {
            for hop in [
                header::CONNECTION,
                header::TRANSFER_ENCODING,
                header::CONTENT_LENGTH,
            ] {
                res.headers_mut().remove(hop);
            }
            res
        }
        Err(err) => match AiError::find(&*err) {
            Some(AiError::BudgetExceeded {
                retry_after: Some(wait),
                ..
            }) => {
                let mut res = openai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    &err.to_string(),
                );
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                res.headers_mut()
                    .insert(header::RETRY_AFTER, secs.max(1).into());
                res
            }
            Some(AiError::BudgetExceeded {
                retry_after: None, ..
            }) => openai_error(
                StatusCode::BAD_REQUEST,
                "request_too_large",
                &err.to_string(),
            ),
            _ => openai_error(StatusCode::BAD_GATEWAY, "upstream_error", &err.to_string()),
        },
    }
}

/// An error in OpenAI's shape, so SDKs raise their usual exception types.
fn openai_error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "requests"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve_for_test = args.iter().any(|a| a == "--serve-for-test");
    let port: Option<u16> = match args.iter().position(|a| a == "--port") {
        Some(i) => Some(args.get(i + 1).ok_or("--port needs a number")?.parse()?),
        None => None,
    };

    // The upstream: a simulated provider on loopback, unless a real one is configured.
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(16))
            .token_interval(Latency::fixed(Duration::from_millis(5)))
            .build()?,
    );
    let (upstream, upstream_key, _sim_server) = match std::env::var("OPENAI_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("OPENAI_API_KEY")?,
            None,
        ),
        Err(_) => {
            let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            (
                format!("{}/v1", server.url()),
                "sk-upstream".to_owned(),
                Some(server),
            )
        }
    };
    if upstream.starts_with("https://") {
        return Err("built without TLS: use an http:// OPENAI_BASE_URL (see the header)".into());
    }

    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(gateway(&upstream, &upstream_key, client.clone())?);
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))))
            .await?;
    let base = format!("http://{}/v1", listener.local_addr()?);

    if serve_for_test || port.is_some() {
        if serve_for_test {
            println!("{base}"); // the test script reads this line
        } else {
            eprintln!("gateway on {base} (upstream {upstream}); Ctrl-C stops it");
        }
        std::io::stdout().flush()?;
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal(serve_for_test))
            .await?;
        return Ok(());
    }

    // Self-test: serve in the background and call the gateway like any client would.
    let server = tokio::spawn(axum::serve(listener, app).into_future());
    self_test(&base, client).await?;
    server.abort();
    println!("ok");
    Ok(())
}

/// Ctrl-C or SIGTERM; with `stdin` also the end of standard input (so the gateway dies with
/// the script that started it, however that script ends).
async fn stop_signal(stdin: bool) {
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    if stdin {
        // A plain thread: a blocking read must not hold the runtime open at exit.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = eof_tx.send(());
        });
    }
    let eof = async move {
        if eof_rx.await.is_err() {
            std::future::pending::<()>().await; // no stdin watcher
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = eof => {}
    }
}

/// Calls the gateway as a client: one JSON answer, one stream, then one key past its budget.
async fn self_test(base: &str, client: Client<HttpConnector, AiBody>) -> Result<(), BoxError> {
    let call = |key: &str, body: Value| {
        let req = Request::post(format!("{base}/chat/completions"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(AiBody::from(body.to_string()));
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let status = res.status();
            let retry_after = res.headers().get(header::RETRY_AFTER).cloned();
            let bytes = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, retry_after, bytes))
        }
    };
    let messages = json!([{"role": "user", "content": "Hello, gateway"}]);

    let (status, _, bytes) =
        call("sk-alice", json!({"model": "gpt-4o", "messages": messages})).await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let answer: Value = serde_json::from_slice(&bytes)?;
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    println!("answer: {text}");
    assert!(!text.is_empty() && answer["usage"]["completion_tokens"].as_u64() > Some(0));

    let stream = json!({"model": "gpt-4o", "messages": messages, "stream": true});
    let (status, _, bytes) = call("sk-alice", stream).await?;
    assert_eq!(status, StatusCode::OK);
    let sse = String::from_utf8_lossy(&bytes);
    let chunks = sse.lines().filter(|l| l.starts_with("data: {")).count();
    println!("stream: {chunks} chunks");
    assert!(
        chunks > 1 && sse.contains("data: [DONE]"),
        "not an SSE stream: {sse}"
    );

    // Bob may send CLIENT_RPM requests a minute; Alice's two calls do not count against him.
    let short = json!({"model": "gpt-4o", "max_tokens": 5, "messages": messages});
    for _ in 0..CLIENT_RPM {
        assert_eq!(call("sk-bob", short.clone()).await?.0, StatusCode::OK);
    }
    let (status, retry_after, bytes) = call("sk-bob", short.clone()).await?;
    println!(
        "bob's request {}: {status}, retry-after {retry_after:?}",
        CLIENT_RPM + 1
    );
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after.is_some());
    let error: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        call("sk-carol", short.clone()).await?.0,
        StatusCode::OK,
        "carol has her own budget"
    );
    assert_eq!(
        call("", short).await?.0,
        StatusCode::UNAUTHORIZED,
        "no key, no service"
    );
    Ok(())
}
