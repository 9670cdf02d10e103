//! An OpenAI-compatible gateway built with axum: `POST /v1/chat/completions`, streamed or
//! not, forwarded to an upstream provider through the tower-ai stack, with the gateway's
//! own clients authenticated against a configured set of API keys and a token budget per
//! client key protecting the gateway itself.
//!
//! Two stacks, two jobs:
//! - the **upstream** stack sits on the gateway's HTTP client and keeps the gateway's one
//!   provider account healthy (its limits, classification, fallback);
//! - the **gateway** budget sits in front of it, keyed by the caller's API key (hashed,
//!   never stored), so one noisy client gets OpenAI-style 429s with `retry-after` instead
//!   of eating everyone's upstream quota. Only keys the gateway knows get that far
//!   (`GATEWAY_CLIENT_KEYS`, comma-separated, or `GATEWAY_CLIENT_KEYS_FILE`, one key a
//!   line; without either, the demo keys `sk-alice`, `sk-bob`, `sk-carol` and the SDK
//!   test's): an unknown key is a 401, so rotating made-up keys buys no fresh budget.
//!
//! It answers like OpenAI's own server: every non-2xx (its own 401, 404, 405, 413 and the
//! stack's refusals, mapped by [`ErrorReply`]) is an OpenAI error body with a stable
//! `code`; a budget or cooldown refusal is a 429 with `retry-after`, so the official SDKs
//! wait and retry by themselves; the client's own timeout (the SDKs' `x-stainless-timeout`
//! / `x-stainless-read-timeout`, `grpc-timeout`) is the request's deadline, so what cannot
//! be done before it is refused at once rather than held past it; a provider's quota error reaches the caller as it is
//! (never as a fallback model's answer on the same account); `x-tower-ai-route` and
//! `x-tower-ai-model` name the route and model that served an answer.
//!
//! Streams pass through untouched: the SSE bytes the upstream sends are the bytes the
//! client reads. A stream the upstream stops feeding is cut by the StallDetector with an
//! error, so the client's connection is reset mid-stream: its SDK raises, instead of
//! taking a truncated answer for a whole one; the gateway logs the cut at `warn` with its
//! reason and the upstream's request id. Any OpenAI SDK works against it (`examples/axum_gateway_sdk_test.py`
//! checks the official Python one, `.ci/sdk-test.sh` runs that check).
//!
//! Two more endpoints, for operators (unauthenticated: serve them on a private interface or
//! put them behind your own auth):
//! - `GET /metrics`: every layer's metrics in Prometheus' text format
//!   (`metrics-exporter-prometheus`; names and labels in the README, "Metrics"), with the
//!   recommended bucket boundaries for the wait histograms;
//! - `GET /health`: the upstream circuit breakers' state per key and the keys cooling down
//!   after a provider's 429, as JSON; `"status"` is `"degraded"` while any breaker is not
//!   closed or any key cools down.
//!
//! By default the upstream is the tower-ai simulator on a loopback port; set
//! `OPENAI_BASE_URL` and `OPENAI_API_KEY` for another upstream (`http://` only: this example
//! is built without TLS; add a TLS connector such as `hyper-rustls` for a public provider).
//!
//! **Several replicas** (opt-in): with `TOWER_AI_REDIS_URL` set (e.g.
//! `redis://127.0.0.1:6379/`), the upstream TokenBudget, RetryAfterAware and CircuitBreaker
//! and the per-client budgets keep their state in Redis (`tower-ai-redis`), so replicas of
//! the gateway behind a load balancer share one account limit, one cooldown per model, one
//! breaker per model, and one budget per client key, instead of each holding its own.
//! Every replica must then be given the same `TOWER_AI_KEY_SEED` (a secret, 16 hex digits:
//! `openssl rand -hex 8`): client budgets are keyed by a seeded hash of the client's key, and
//! replicas seeded alike name a client alike. More settings, all optional:
//! `TOWER_AI_REDIS_MODE` (`strict`, the default: a round trip to admit and one to settle;
//! `leased`: each replica takes 5% chunks of the account's limits and reads the cooldowns
//! every 500 ms), `TOWER_AI_REDIS_TIMEOUT_MS` (how long an admission waits for Redis before
//! deciding in-process at the limit ÷ replicas; default 20). The account's limits:
//! `GATEWAY_UPSTREAM_RPM` and `GATEWAY_UPSTREAM_TPM` (default 1,000 and 1,000,000),
//! `GATEWAY_UPSTREAM_BURST` (`requests,tokens` beyond the steady pace; Redis mode, default a
//! sixtieth of each limit) and `GATEWAY_UPSTREAM_MINUTE_MS` (the length of the limits'
//! "minute" in Redis mode, for tests; default 60,000); each client key's:
//! `GATEWAY_CLIENT_RPM` and `GATEWAY_CLIENT_CONCURRENT` (default 300 and 4).
//! `cargo run --example replicas -- --gateways target/debug/examples/axum_gateway` (or
//! `.ci/replicas-test.sh`) runs four replicas of this gateway against one simulated
//! account, with and without Redis.
//!
//! Run with:
//!
//! ```text
//! cargo run --example axum_gateway                      # self-test: serve, call, check, exit
//! cargo run --example axum_gateway -- --port 3000       # serve until Ctrl-C
//! cargo run --example axum_gateway -- --serve-for-test  # print the base URL, serve until stdin closes
//! ```
//!
//! With the simulator as upstream, a few model names are scripted for the tests:
//! `quota-model` (429 `insufficient_quota`), `down-model` (503: served by the fallback
//! model), `locked-model` (401: the upstream refuses the gateway's key, a 502 to the
//! client), `slow-model` (one token a second), `stall-model` (a stream that stops after
//! two tokens: cut after 2 s of silence).
//!
//! Then, for example: `curl -N localhost:3000/v1/chat/completions -H 'authorization: Bearer
//! sk-me' -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}'`

use std::collections::HashSet;
use std::future::IntoFuture as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request as AxumRequest, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer, CircuitState};
use tower_ai::core::check_model;
use tower_ai::core::keys::{self, ApiKeyHash, Global};
use tower_ai::core::meter::WAIT_BUCKETS;
use tower_ai::fallback::{FallbackChain, Route, Served};
use tower_ai::prelude::*;
use tower_ai::redis::{RedisBreakers, RedisBudget, RedisCooldowns, RedisStore};
use tower_ai::retry_after::RetryAfterAwareLayer;
use tower_ai::sim::{Fault, Latency, ModelSpec, Scenario, Simulator, StreamFault};
use tower_ai::{ErrorDialect, ErrorReply};

/// Requests per minute each client API key may send through the gateway
/// (`GATEWAY_CLIENT_RPM`).
const CLIENT_RPM: u64 = 300;
/// Requests (streams included, until they end) each client API key may have in flight
/// (`GATEWAY_CLIENT_CONCURRENT`).
const CLIENT_CONCURRENT: u32 = 4;
/// Tokens per minute each client API key may use.
const CLIENT_TPM: u64 = 200_000;
/// The upstream account's requests and tokens per minute (`GATEWAY_UPSTREAM_RPM`,
/// `GATEWAY_UPSTREAM_TPM`).
const UPSTREAM_RPM: u64 = 1_000;
const UPSTREAM_TPM: u64 = 1_000_000;
/// How long an idle upstream connection is kept in the pool.
const UPSTREAM_IDLE: Duration = Duration::from_secs(90);
/// The demo client keys, when none are configured.
const DEMO_KEYS: &[&str] = &[
    "sk-alice",
    "sk-bob",
    "sk-carol",
    "sk-sdk-test",
    "sk-sdk-noisy",
    "sk-sdk-burst",
];

/// Names the route that served an answer.
const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-tower-ai-route");
/// Names the model that served an answer.
const MODEL_HEADER: HeaderName = HeaderName::from_static("x-tower-ai-model");

/// What the axum handler calls: the gateway budget over the upstream stack.
type Gateway = BoxCloneSyncService<Request<AiBody>, Response, BoxError>;

#[derive(Clone)]
struct App {
    gateway: Gateway,
    keys: Arc<ClientKeys>,
    health: Health,
}

/// What `/health` reads: the upstream stack's breakers and cooldown gate.
#[derive(Clone)]
struct Health {
    breakers: CircuitBreakerHandle,
    cooldowns: RetryAfterAwareLayer,
}

/// The API keys the gateway's clients may use.
struct ClientKeys(HashSet<Box<[u8]>>);

impl ClientKeys {
    /// From `GATEWAY_CLIENT_KEYS_FILE` (one key a line, `#` comments), else
    /// `GATEWAY_CLIENT_KEYS` (comma-separated), else the demo keys.
    fn from_env() -> Result<Self, BoxError> {
        let text = match (
            std::env::var("GATEWAY_CLIENT_KEYS_FILE"),
            std::env::var("GATEWAY_CLIENT_KEYS"),
        ) {
            (Ok(path), _) => std::fs::read_to_string(&path)
                .map_err(|e| format!("GATEWAY_CLIENT_KEYS_FILE {path}: {e}"))?,
            (_, Ok(list)) => list.replace(',', "\n"),
            _ => DEMO_KEYS.join("\n"),
        };
        let keys: HashSet<Box<[u8]>> = text
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty() && !k.starts_with('#'))
            .map(|k| k.as_bytes().into())
            .collect();
        if keys.is_empty() {
            return Err("no client API keys configured".into());
        }
        Ok(ClientKeys(keys))
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.0.contains(key)
    }
}

/// The gateway's limits and where their state lives, from the environment (see the header).
struct Config {
    upstream_rpm: u64,
    upstream_tpm: u64,
    client_rpm: u64,
    client_concurrent: u32,
    /// `Some` in Redis mode.
    shared: Option<Shared>,
}

/// Redis mode: the store every replica's layers share, and how.
struct Shared {
    store: RedisStore,
    leased: bool,
    minute: Duration,
    burst: Option<(u64, u64)>,
}

/// `name` as a number, or `default` when it is not set.
fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}: not a number: {v:?}").into()),
        Err(_) => Ok(default),
    }
}

impl Config {
    /// Reads the settings; in Redis mode also seeds this process's keys, before any key is
    /// made (so call it first).
    fn from_env() -> Result<Self, BoxError> {
        let shared = match std::env::var("TOWER_AI_REDIS_URL") {
            Err(_) => None,
            Ok(url) => {
                // Client budgets are keyed by a seeded hash of the client's API key: the
                // replicas must hash alike to share them.
                let seed = std::env::var("TOWER_AI_KEY_SEED").map_err(|_| {
                    "TOWER_AI_REDIS_URL needs TOWER_AI_KEY_SEED, the same secret on every replica (16 hex digits: openssl rand -hex 8)"
                })?;
                let seed = u64::from_str_radix(seed.trim(), 16)
                    .map_err(|_| "TOWER_AI_KEY_SEED: 16 hex digits (openssl rand -hex 8)")?;
                keys::set_seed(seed).map_err(|e| format!("TOWER_AI_KEY_SEED: {e}"))?;
                let leased = match std::env::var("TOWER_AI_REDIS_MODE").as_deref() {
                    Err(_) | Ok("strict") => false,
                    Ok("leased") => true,
                    Ok(other) => {
                        return Err(
                            format!("TOWER_AI_REDIS_MODE: strict or leased, not {other:?}").into(),
                        )
                    }
                };
                let timeout = env_num(
                    "TOWER_AI_REDIS_TIMEOUT_MS",
                    RedisStore::DEFAULT_RESPONSE_TIMEOUT.as_millis() as u64,
                )?;
                // No I/O yet: the connection is made on first use, and the gateway starts
                // (deciding in-process) while Redis is down. The URL is not logged: it may
                // hold a password.
                let client = ::redis::Client::open(url.as_str())
                    .map_err(|e| format!("TOWER_AI_REDIS_URL: not a Redis URL ({:?})", e.kind()))?;
                let store = RedisStore::builder()
                    .response_timeout(Duration::from_millis(timeout))
                    .build(client);
                let burst = match std::env::var("GATEWAY_UPSTREAM_BURST") {
                    Err(_) => None,
                    Ok(v) => {
                        let parsed = v.split_once(',').and_then(|(r, t)| {
                            Some((r.trim().parse().ok()?, t.trim().parse().ok()?))
                        });
                        Some(parsed.ok_or("GATEWAY_UPSTREAM_BURST: requests,tokens")?)
                    }
                };
                Some(Shared {
                    store,
                    leased,
                    minute: Duration::from_millis(env_num("GATEWAY_UPSTREAM_MINUTE_MS", 60_000)?),
                    burst,
                })
            }
        };
        Ok(Config {
            upstream_rpm: env_num("GATEWAY_UPSTREAM_RPM", UPSTREAM_RPM)?.max(1),
            upstream_tpm: env_num("GATEWAY_UPSTREAM_TPM", UPSTREAM_TPM)?.max(1),
            client_rpm: env_num("GATEWAY_CLIENT_RPM", CLIENT_RPM)?.max(1),
            client_concurrent: env_num("GATEWAY_CLIENT_CONCURRENT", CLIENT_CONCURRENT)?.max(1),
            shared,
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is matched without
/// regard to case (RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// The upstream stack on the gateway's HTTP client: [`AiStack`] in its recommended order,
/// with the gateway's provider account limits and a fallback model on the same account.
fn upstream_stack(
    client: Client<HttpConnector, AiBody>,
    stall_idle: Option<Duration>,
    config: &Config,
) -> Result<(Gateway, Health), BoxError> {
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model("gpt-4o-mini"))
        // Every answer names its route (in `Served`), the first route's too.
        .mark_primary(true)
        .build()?;
    // Every request goes upstream with the gateway's own key: one provider account, so a
    // provider's 429 is that account's, and the default per-model cooldown (HostModel)
    // holding back every client is right. A proxy that forwards each client's own key
    // would key its cooldowns per tenant instead:
    // `.retry_after(RetryAfterAwareLayer::new().key_fn(ApiKeyHostModel))`.
    // The gate's state is shared by its clones: one goes into the stack, one to /health.
    // In Redis mode, the cooldowns and the breakers' state are every replica's: a 429 or an
    // open circuit met by one replica holds the others too.
    let (cooldowns, breaker) = match &config.shared {
        None => (RetryAfterAwareLayer::new(), CircuitBreakerLayer::new()),
        Some(shared) => {
            let cooldowns = if shared.leased {
                RedisCooldowns::leased(shared.store.clone())
            } else {
                RedisCooldowns::strict(shared.store.clone())
            };
            (
                RetryAfterAwareLayer::builder().store(cooldowns).build()?,
                CircuitBreakerLayer::builder()
                    .store(RedisBreakers::new(shared.store.clone()))
                    .build()?,
            )
        }
    };
    // The gateway's provider account: stay inside its limits. One budget for the account
    // (`Global`), not one per model (`HostModel`): the fallback route's gpt-4o-mini goes
    // out on the same account, so a request the primary route could not afford must not
    // find a fresh budget on the fallback's model. (A provider whose limits are per model,
    // as OpenAI's are, would rather key by `HostModel` with each model's own limit.) In
    // Redis mode the key is `global` under the hash tag `upstream`: one limit for every
    // replica.
    let budget = TokenBudgetLayer::builder()
        .key_fn(Global)
        .requests_per_minute(config.upstream_rpm)
        .tokens_per_minute(config.upstream_tpm);
    let budget = match &config.shared {
        None => budget.build()?,
        Some(shared) => {
            let mut store = RedisBudget::builder(shared.store.clone())
                .hash_tag("upstream")
                .minute(shared.minute);
            if let Some((requests, tokens)) = shared.burst {
                store = store.burst(requests, tokens);
            }
            if shared.leased {
                store = store.leased(0.05);
            }
            // Refused at once, with a retry-after the client's SDK waits for, rather than
            // held: a replica's waiting queue is its own (there is no queue across
            // replicas), and its waiters would each ask Redis again at the time it gives,
            // all together. Without Redis the budget queues, first come first served.
            budget.reject().store(store.build()).build()?
        }
    };
    let mut stack = AiStack::new()
        .circuit_breaker(breaker)
        .retry_after(cooldowns.clone())
        .budget(budget)
        .fallback(ModelFallbackLayer::new(chain));
    if let Some(idle) = stall_idle {
        stack = stack.stall(StallDetectorLayer::builder().idle(idle).build()?);
    }
    let health = Health {
        breakers: stack.breaker_handle(),
        cooldowns,
    };
    let svc = ServiceBuilder::new()
        .map_response(|res: http::Response<_>| res.map(Body::new))
        .ai_stack(stack)
        .service(client);
    Ok((BoxCloneSyncService::new(svc), health))
}

/// The gateway: a budget per client API key, then the request re-addressed to the upstream
/// with the gateway's own credentials, then the upstream stack.
fn gateway(
    upstream_base: &str,
    upstream_key: &str,
    client: Client<HttpConnector, AiBody>,
    stall_idle: Option<Duration>,
    config: &Config,
) -> Result<(Gateway, Health), BoxError> {
    // Answer 429 at once: the client's SDK knows how to wait.
    let per_client = TokenBudgetLayer::builder()
        .key_fn(ApiKeyHash)
        .requests_per_minute(config.client_rpm)
        .max_concurrent(config.client_concurrent)
        .tokens_per_minute(CLIENT_TPM)
        .reject();
    // In Redis mode a client's budget is shared by every replica (its key's label is the
    // same on each, seeded alike), under its own hash tag: its limits are not the account's.
    // Decided strictly: a budget with a concurrency limit is, in either mode. Its burst is
    // a whole minute's limits, as the in-process budget allows at once (Redis's default, a
    // sixtieth, would pace a client's few concurrent requests: each reserves its
    // `max_tokens`, 1,024 when it names none).
    let per_client = match &config.shared {
        None => per_client.build()?,
        Some(shared) => per_client
            .store(
                RedisBudget::builder(shared.store.clone())
                    .hash_tag("clients")
                    .burst(config.client_rpm, CLIENT_TPM)
                    .build(),
            )
            .build()?,
    };
    let (upstream, health) = upstream_stack(client, stall_idle, config)?;
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
        .service(upstream);
    Ok((BoxCloneSyncService::new(svc), health))
}

/// `GET /metrics`: the layers' metrics in Prometheus' text exposition format.
async fn metrics(
    State((prometheus, cooldowns)): State<(PrometheusHandle, RetryAfterAwareLayer)>,
) -> Response {
    // Cooldowns end with nothing to record it: count the keys still cooling now.
    cooldowns.cooling();
    // Without the exporter's HTTP listener nothing drains the histograms in the
    // background: do it before each scrape.
    prometheus.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        prometheus.render(),
    )
        .into_response()
}

/// `GET /health`: the upstream breakers' state per key and the keys cooling down.
async fn health(State(app): State<App>) -> Response {
    let now = tokio::time::Instant::now();
    let ms = |t: tokio::time::Instant| t.saturating_duration_since(now).as_millis() as u64;
    let breakers: Vec<Value> = app
        .health
        .breakers
        .all_metrics()
        .into_iter()
        .map(|m| {
            json!({
                "key": &*m.label,
                "state": m.state.as_str(),
                "open_for_ms": m.open_until.map(ms),
                "times_opened": m.times_opened,
                "rejected": m.rejected,
            })
        })
        .collect();
    let cooling: Vec<Value> = app
        .health
        .cooldowns
        .cooling()
        .into_iter()
        .map(|c| {
            json!({
                "key": format!("{:016x}", c.key.as_u64()),
                "for_ms": ms(c.until),
                "waiters": c.waiters,
            })
        })
        .collect();
    let degraded = !cooling.is_empty()
        || app
            .health
            .breakers
            .all_metrics()
            .iter()
            .any(|m| m.state != CircuitState::Closed);
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "circuit_breakers": breakers,
        "cooldowns": cooling,
    }))
    .into_response()
}

/// The Prometheus recorder, installed for the whole process: every layer records into it.
fn install_metrics() -> Result<PrometheusHandle, BoxError> {
    let mut prometheus = PrometheusBuilder::new()
        // `_total` on counters and the unit on names (`..._wait_seconds`), as Prometheus
        // recommends.
        .with_recommended_naming(true)
        .set_buckets_for_metric(Matcher::Prefix("tower_ai.".to_owned()), WAIT_BUCKETS)?;
    // The GenAI client histograms (`gen_ai.client.*`) with the buckets the OpenTelemetry
    // GenAI conventions recommend.
    for (name, buckets) in tower_ai::telemetry::BUCKETS {
        prometheus = prometheus.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)?;
    }
    let prometheus = prometheus.install_recorder()?;
    // Help text and units, for the metrics recorded from now on.
    tower_ai::describe_metrics();
    Ok(prometheus)
}

async fn chat_completions(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(token) = bearer(&headers) else {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing API key: send `Authorization: Bearer <key>`",
        );
    };
    if !app.keys.contains(token) {
        // The key is not repeated: it may be someone's real key sent to the wrong place.
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "unknown API key",
        );
    }
    let mut req = Request::new(AiBody::from(body));
    *req.method_mut() = http::Method::POST;
    // The client's (known) key: the per-client budget hashes it.
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The client's own timeout (the official OpenAI SDKs send it: x-stainless-timeout,
    // x-stainless-read-timeout; gRPC-style clients grpc-timeout) is the request's deadline:
    // every layer then refuses at once what it cannot do before the client gives up (a
    // 429 with retry-after the SDK can act on) instead of holding it past its timeout.
    if let Some(timeout) = Deadline::header_timeout(&headers) {
        Deadline::set(&mut req, Deadline::after(timeout));
    }
    // An absurd model name (a 1 MiB one, say) is a 400 before it reaches the budget or
    // any per-model state (AiRetry would refuse it too, further in).
    if let Err(err) = check_model(&req) {
        return err
            .reply()
            .to_response(ErrorDialect::OpenAi)
            .into_response();
    }
    match app.gateway.oneshot(req).await {
        // Status, content type, rate-limit headers and body (JSON or SSE) as the upstream sent them.
        Ok(res) => forward(res),
        Err(err) => {
            let reply = ErrorReply::from_error(&*err);
            if reply.status.is_server_error() {
                tracing::warn!(
                    status = reply.status.as_u16(),
                    code = reply.code,
                    "{}",
                    reply.message
                );
            }
            reply.to_response(ErrorDialect::OpenAi).into_response()
        }
    }
}

/// The upstream's answer, on its way to the client: hop-by-hop headers dropped, the
/// serving route named, a non-retryable error marked so, and a cut stream logged.
fn forward(mut res: Response) -> Response {
    for hop in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
    ] {
        res.headers_mut().remove(hop);
    }
    if let Some(served) = res.extensions().get::<Served>().cloned() {
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&served.route) {
            h.insert(ROUTE_HEADER, v);
        }
        if let Some(v) = served
            .model
            .as_deref()
            .and_then(|m| HeaderValue::from_str(m).ok())
        {
            h.insert(MODEL_HEADER, v);
        }
    }
    if matches!(res.status().as_u16(), 401 | 403 | 407) {
        // The upstream refused the gateway's own credentials: not the client's to fix, and
        // the provider's text may quote (part of) the gateway's key. A 502 of our own.
        let reply = ErrorReply::from_classification(&Classification::of(&res));
        tracing::warn!(status = res.status().as_u16(), "{}", reply.message);
        return reply.to_response(ErrorDialect::OpenAi).into_response();
    }
    if !res.status().is_success() && !res.headers().contains_key("x-should-retry") {
        // A quota error passed through: the SDK should not retry what no retry fixes.
        let c = Classification::of(&res);
        if c.kind.is_some() && !c.is_retryable() {
            res.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
    }
    let request_id = res
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    res.map(move |body| {
        Body::new(body.map_err(move |err| {
            let reply = ErrorReply::from_error(&err);
            let reason = AiError::find(&err).map_or_else(|| err.to_string(), |e| e.to_string());
            tracing::warn!(
                request_id = %request_id,
                code = reply.code,
                reason = %reason,
                "stream cut: the client gets a reset connection"
            );
            err
        }))
    })
}

/// An error in OpenAI's shape, so SDKs raise their usual exception types.
fn openai_error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// Every answer the router makes itself (404, 405, an extractor's 413 or 415) in OpenAI's
/// error shape: a non-2xx that is not JSON already is rewritten.
async fn openai_errors(req: AxumRequest, next: Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let res = next.run(req).await;
    let status = res.status();
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || json {
        return res;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("unknown_url", format!("Invalid URL ({what})")),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", format!("Method not allowed ({what})"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => (
            "request_too_large",
            "the request body is larger than the gateway accepts".to_owned(),
        ),
        s => (
            "invalid_request",
            format!("{} ({what})", s.canonical_reason().unwrap_or("error")),
        ),
    };
    let mut out = openai_error(status, code, &message);
    if let Some(allow) = res.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// The simulated upstream, with the scripted models the tests use.
fn simulator() -> Result<Simulator, BoxError> {
    Ok(Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(16))
            .model(
                ModelSpec::new("slow-model")
                    .completion_tokens(60)
                    .token_interval(Latency::fixed(Duration::from_secs(1))),
            )
            .quota_exhausted_for("quota-model")
            .fault(Fault::status(503).model("down-model"))
            .fault(Fault::status(401).model("locked-model"))
            .stream_fault_for(
                "stall-model",
                StreamFault::StallAfterTokens {
                    tokens: 2,
                    probability: 1.0,
                },
            )
            .token_interval(Latency::fixed(Duration::from_millis(5)))
            .build()?,
    ))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve_for_test = args.iter().any(|a| a == "--serve-for-test");
    let port: Option<u16> = match args.iter().position(|a| a == "--port") {
        Some(i) => Some(args.get(i + 1).ok_or("--port needs a number")?.parse()?),
        None => None,
    };

    // Warnings (a stream cut, an upstream failure) on stderr.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    // First: in Redis mode it seeds the keys, which must happen before any key is made.
    let config = Config::from_env()?;

    // The upstream: a simulated provider on loopback, unless a real one is configured.
    let (upstream, upstream_key, _sim_server) = match std::env::var("OPENAI_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("OPENAI_API_KEY")?,
            None,
        ),
        Err(_) => {
            let server = simulator()?
                .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await?;
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
    // The simulator's stall-model goes quiet: cut it after 2 s rather than the default.
    let stall_idle = _sim_server.as_ref().map(|_| Duration::from_secs(2));

    // Idle upstream connections are closed after a while (the pool needs a timer for it).
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(UPSTREAM_IDLE)
        .pool_timer(TokioTimer::new())
        .build_http::<AiBody>();
    let prometheus = install_metrics()?;
    let (gateway, health_state) = gateway(
        &upstream,
        &upstream_key,
        client.clone(),
        stall_idle,
        &config,
    )?;
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .with_state((prometheus, health_state.cooldowns.clone()));
    let app = App {
        gateway,
        keys: Arc::new(ClientKeys::from_env()?),
        health: health_state,
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/health", get(health))
        .with_state(app)
        .merge(ops)
        .layer(middleware::from_fn(openai_errors));
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

/// Calls the gateway as a client: one JSON answer, one stream, a fallback, a key at its
/// concurrency limit, and the gateway's own refusals.
async fn self_test(base: &str, client: Client<HttpConnector, AiBody>) -> Result<(), BoxError> {
    let send = |auth: &str, body: Value| {
        let req = Request::post(format!("{base}/chat/completions"))
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(AiBody::from(body.to_string()));
        let client = client.clone();
        async move { Ok::<_, BoxError>(client.request(req?).await?) }
    };
    let call = |key: &str, body: Value| {
        let res = send(&format!("Bearer {key}"), body);
        async move {
            let res = res.await?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, BoxError>((parts.status, parts.headers, bytes))
        }
    };
    let messages = json!([{"role": "user", "content": "Hello, gateway"}]);

    let (status, headers, bytes) =
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
    assert_eq!(headers[ROUTE_HEADER], "primary");

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

    // The primary model is down: the fallback answers, and says so.
    let (status, headers, _) = call(
        "sk-alice",
        json!({"model": "down-model", "messages": messages}),
    )
    .await?;
    println!(
        "down-model: {status}, served by {:?}",
        headers.get(ROUTE_HEADER)
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[ROUTE_HEADER], "gpt-4o-mini");
    assert_eq!(headers[MODEL_HEADER], "gpt-4o-mini");

    // Out of credit on the account: the quota error itself, not the fallback's answer.
    let (status, headers, bytes) = call(
        "sk-alice",
        json!({"model": "quota-model", "messages": messages}),
    )
    .await?;
    let error: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(headers["x-should-retry"], "false");

    // The upstream refuses the gateway's own key: a 502, without the provider's text.
    let (status, _, bytes) = call(
        "sk-alice",
        json!({"model": "locked-model", "messages": messages}),
    )
    .await?;
    let error: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error["error"]["code"], "upstream_unauthorized");

    // Bob may have CLIENT_CONCURRENT requests in flight; slow streams hold their places.
    let slow = json!({"model": "slow-model", "stream": true, "messages": messages});
    let mut held = Vec::new();
    for _ in 0..CLIENT_CONCURRENT {
        let res = send("Bearer sk-bob", slow.clone()).await?;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let (status, headers, bytes) = call("sk-bob", slow.clone()).await?;
    println!(
        "bob's request {}: {status}, retry-after {:?}",
        CLIENT_CONCURRENT + 1,
        headers.get(header::RETRY_AFTER)
    );
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key(header::RETRY_AFTER));
    let error: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(error["error"]["code"], "budget_exceeded");
    let short = json!({"model": "gpt-4o", "max_tokens": 5, "messages": messages});
    assert_eq!(
        call("sk-carol", short.clone()).await?.0,
        StatusCode::OK,
        "carol has her own budget"
    );
    drop(held);

    // The gateway's own refusals, in OpenAI's shape.
    let (status, _, bytes) = call("sk-mallory", short.clone()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "unknown key");
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes)?["error"]["code"],
        "invalid_api_key"
    );
    let res = send("bearer sk-alice", short.clone()).await?;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the scheme is case-insensitive"
    );
    let huge = json!({"model": "m".repeat(1 << 20), "messages": messages});
    let (status, _, bytes) = call("sk-alice", huge).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes)?["error"]["code"],
        "model_too_long"
    );
    let req = Request::get(format!("{base}/nowhere")).body(AiBody::from(""))?;
    let res = client.request(req).await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let bytes = res.into_body().collect().await?.to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes)?["error"]["code"],
        "unknown_url"
    );

    // The operators' endpoints: the calls above in the metrics, the breakers in /health.
    let root = base.trim_end_matches("/v1");
    let get = |path: &str| {
        let req = Request::get(format!("{root}{path}")).body(AiBody::from(""));
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let status = res.status();
            let bytes = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, String::from_utf8_lossy(&bytes).into_owned()))
        }
    };
    let (status, text) = get("/metrics").await?;
    assert_eq!(status, StatusCode::OK);
    for series in [
        // down-model's answer, from the fallback route
        r#"tower_ai_fallback_served_total{route="gpt-4o-mini"} 1"#,
        // bob's request over his concurrency limit
        r#"tower_ai_budget_refused_total{limit="concurrency"} 1"#,
        // down-model's 503s, retried after a backoff before the fallback
        r#"tower_ai_retry_retries_total{error_type="overloaded",wait_source="backoff"} 2"#,
    ] {
        assert!(text.contains(series), "no `{series}` in /metrics:\n{text}");
    }
    println!(
        "/metrics: {} series",
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
    let (status, text) = get("/health").await?;
    assert_eq!(status, StatusCode::OK);
    let health: Value = serde_json::from_str(&text)?;
    let breakers = health["circuit_breakers"].as_array().map_or(0, Vec::len);
    println!("/health: {}, {breakers} breaker(s)", health["status"]);
    assert!(breakers > 0, "{health}");
    Ok(())
}
