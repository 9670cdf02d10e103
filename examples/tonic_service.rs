//! A tonic gRPC service whose handler calls an AI API through the tower-ai stack.
//!
//! `Assistant/Ask` takes a prompt and answers with the model's text and token usage. The
//! handler turns it into an OpenAI chat completion and sends it through the stack; a token
//! budget *per calling tenant* (the `x-tenant` metadata) gates it, and a refusal becomes the
//! gRPC status a gRPC client expects: `RESOURCE_EXHAUSTED` with a `retry-after` entry.
//!
//! Why the per-tenant budget lives in the handler's stack and not as a layer on the tonic
//! server: `TokenBudget` counts *tokens*, estimated from the JSON request body the handler
//! builds (prompt plus `max_tokens`) and corrected from the usage in the answer. On the
//! gRPC side it would see protobuf frames in a body that may stream, and could count
//! requests only. Request-count and connection limits on the server are plain Tower
//! (`Server::builder().concurrency_limit_per_connection(..)`, `.layer(..)`), used below.
//!
//! No protoc and no build script: the messages derive `prost::Message` by hand, and the
//! service is wired with tonic's codegen-free `tonic::server::Grpc` / `tonic::client::Grpc`
//! and `tonic_prost::ProstCodec`, which is what `tonic-build` would generate from
//!
//! ```proto
//! package tower_ai.example;
//! service Assistant { rpc Ask(AskRequest) returns (AskReply); }
//! message AskRequest { string prompt = 1; string model = 2; }
//! message AskReply { string text = 1; uint64 input_tokens = 2; uint64 output_tokens = 3; }
//! ```
//!
//! The AI API is the tower-ai simulator on a loopback port, or `OPENAI_BASE_URL` /
//! `OPENAI_API_KEY` (`http://` only: this example is built without TLS).
//!
//! Run with:
//!
//! ```text
//! cargo run --example tonic_service
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, Request, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::NamedService;
use tonic::transport::{server::TcpIncoming, Endpoint, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tonic_types::StatusExt as _;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai::core::keys::Key;
use tower_ai::prelude::*;
use tower_ai::sim::{ModelSpec, Scenario, Simulator};
use tower_ai::telemetry::TelemetryBody;
use tower_ai::{ErrorReply, Usage};

#[derive(Clone, PartialEq, prost::Message)]
struct AskRequest {
    #[prost(string, tag = "1")]
    prompt: String,
    #[prost(string, tag = "2")]
    model: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AskReply {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint64, tag = "2")]
    input_tokens: u64,
    #[prost(uint64, tag = "3")]
    output_tokens: u64,
}

const ASK: &str = "/tower_ai.example.Assistant/Ask";

/// Who is calling: read from the gRPC metadata, keys the budget.
#[derive(Clone, Debug)]
struct Tenant(String);

/// The AI client the handler calls: the tower-ai stack as one boxed service.
type Ai = BoxCloneSyncService<Request<AiBody>, Response<AiResponseBody>, BoxError>;
type AiResponseBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// The tower-ai stack over a plain HTTP client: [`AiStack`] in its recommended order, with
/// a budget keyed by tenant (no ModelFallback: the caller names the model).
fn stack(client: Client<HttpConnector, AiBody>) -> Result<Ai, BoxError> {
    // Per tenant: 2 requests and 20 000 tokens a minute, refused at once beyond that.
    let per_tenant = TokenBudgetLayer::builder()
        .key_fn(|req: &Request<AiBody>| req.extensions().get::<Tenant>().map(|t| Key::of(&t.0)))
        .requests_per_minute(2)
        .tokens_per_minute(20_000)
        .reject()
        .build()?;
    let svc = ServiceBuilder::new()
        .map_response(|res: Response<_>| res.map(|b: TelemetryBody<_>| b.boxed_unsync()))
        .ai_stack(AiStack::new().budget(per_tenant))
        .service(client);
    Ok(BoxCloneSyncService::new(svc))
}

/// The `Ask` handler: gRPC message in, chat completion through the stack, gRPC message out.
async fn ask(
    ai: Ai,
    upstream: Arc<Upstream>,
    req: tonic::Request<AskRequest>,
) -> Result<tonic::Response<AskReply>, Status> {
    let tenant = req
        .metadata()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned();
    let AskRequest { prompt, model } = req.into_inner();
    let body = json!({"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": prompt}]});
    let mut http_req = Request::post(&upstream.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {}", upstream.key))
        .body(AiBody::from(body.to_string()))
        .map_err(|e| Status::internal(e.to_string()))?;
    http_req.extensions_mut().insert(Tenant(tenant));

    let res = ai.oneshot(http_req).await.map_err(to_status)?;
    let status = res.status();
    let classification = Classification::of(&res).into_owned();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(to_status)?
        .to_bytes();
    if !status.is_success() {
        // The provider's error answer, as a gRPC status (the classification was read by
        // the stack; the body is not passed on).
        return Err(ErrorReply::from_classification(&classification).to_status());
    }
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|e| Status::internal(e.to_string()))?;
    let usage = Usage::from_value(&answer).unwrap_or_default();
    Ok(tonic::Response::new(AskReply {
        text: answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
    }))
}

/// A refusal or failure of the stack as a gRPC status: `RESOURCE_EXHAUSTED` for a budget
/// refusal, `UNAVAILABLE` for an open circuit, `DEADLINE_EXCEEDED` for a stall, …, with
/// `google.rpc.RetryInfo` when the layer knows when to come back (see
/// `tower_ai::core::respond`).
fn to_status(err: BoxError) -> Status {
    ErrorReply::from_error(&*err).to_status()
}

#[derive(Debug)]
struct Upstream {
    url: String,
    key: String,
}

/// The gRPC service, written out as `tonic-build` would generate it.
#[derive(Clone)]
struct AssistantServer {
    ai: Ai,
    upstream: Arc<Upstream>,
}

impl NamedService for AssistantServer {
    const NAME: &'static str = "tower_ai.example.Assistant";
}

impl<B> Service<Request<B>> for AssistantServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.uri().path() != ASK {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let (ai, upstream) = (self.ai.clone(), self.upstream.clone());
        let handler = tower::service_fn(move |req| ask(ai.clone(), upstream.clone(), req));
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<AskReply, AskRequest>::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(12))
            .build()?,
    );
    let (base, key, _sim_server) = match std::env::var("OPENAI_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("OPENAI_API_KEY")?,
            None,
        ),
        Err(_) => {
            let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            (
                format!("{}/v1", server.url()),
                "sk-simulated".to_owned(),
                Some(server),
            )
        }
    };
    if base.starts_with("https://") {
        return Err("built without TLS: use an http:// OPENAI_BASE_URL (see the header)".into());
    }
    let model = std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into());

    // The gRPC server on loopback.
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let assistant = AssistantServer {
        ai: stack(client)?,
        upstream: Arc::new(Upstream {
            url: format!("{base}/chat/completions"),
            key,
        }),
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .concurrency_limit_per_connection(32)
            .timeout(Duration::from_secs(120))
            .add_service(assistant)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                drop(stopped.await)
            }),
    );
    println!("gRPC server on {addr}");

    // A client: one call, as generated client code would make it.
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut call = async |tenant: &str| {
        let mut req = tonic::Request::new(AskRequest {
            prompt: "What is Tower?".into(),
            model: model.clone(),
        });
        req.metadata_mut()
            .insert("x-tenant", tenant.parse().expect("ascii"));
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            req,
            PathAndQuery::from_static(ASK),
            ProstCodec::<AskRequest, AskReply>::default(),
        )
        .await
    };
    let reply = call("acme").await?.into_inner();
    println!(
        "reply: {:?} ({} tokens in, {} out)",
        reply.text, reply.input_tokens, reply.output_tokens
    );
    assert!(!reply.text.is_empty(), "empty answer");
    assert!(
        reply.input_tokens > 0 && reply.output_tokens > 0,
        "no usage"
    );

    // The per-tenant budget, seen from gRPC: acme's third call this minute is refused.
    call("acme").await?;
    let refused = call("acme").await.expect_err("over acme's budget");
    println!(
        "acme's third call: {:?} {:?}, RetryInfo {:?}",
        refused.code(),
        refused.message(),
        refused.get_error_details().retry_info()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    let delay = details.retry_info().and_then(|r| r.retry_delay);
    assert!(
        delay.is_some_and(|d| d.as_secs() >= 1),
        "RetryInfo: {delay:?}"
    );
    assert_eq!(
        details.error_info().map(|i| i.reason.as_str()),
        Some("budget_exceeded")
    );
    assert!(
        call("globex").await.is_ok(),
        "another tenant has its own budget"
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}
