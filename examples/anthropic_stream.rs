//! Streaming Anthropic Messages with a stall detector and a usage-based token budget.
//!
//! A tokens-per-minute budget has to reserve what a request *may* cost (its prompt estimate
//! plus `max_tokens`) before the call, because the real cost is only known at the end of
//! the stream. This example streams one answer, shows the reservation while it streams, and
//! shows it replaced by the usage Anthropic reports in the stream's `message_delta`. A second
//! request that does not fit beside the first one's reservation waits, and is admitted the
//! moment the first stream's usage frees the difference.
//!
//! The StallDetector watches every stream: with the simulator, a third stream goes quiet
//! after three tokens and ends with `AiError::Stalled` after the idle deadline (1 s here),
//! instead of hanging or ending in a clean-looking, truncated EOF. Its summary of each
//! stream (how it ended, stop reason, usage) is in the response's `StreamOutcome`.
//!
//! By default it starts the tower-ai simulator on a loopback port and talks to it. Set
//! `ANTHROPIC_BASE_URL` (and `ANTHROPIC_API_KEY`, `ANTHROPIC_MODEL`) to talk to another
//! server. The example is built without TLS, so the URL must be `http://`; for
//! `https://api.anthropic.com` give the client a TLS connector such as `hyper-rustls`.
//!
//! Run with:
//!
//! ```text
//! cargo run --example anthropic_stream
//! ```
//!
//! It exits non-zero if a stream is empty, reports no usage, is not caught stalling, or
//! the budget misbehaves.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai::budget::{BudgetEvent, BudgetListener};
use tower_ai::core::keys::{Global, KeyFn};
use tower_ai::core::sse::{SseItem, SseParser};
use tower_ai::prelude::*;
use tower_ai::sim::{Latency, ModelSpec, Scenario, Simulator, StreamFault};
use tower_ai::stall::{StreamOutcome, StreamSummary};

const MAX_TOKENS: u64 = 1000;
const TOKENS_PER_MINUTE: u64 = 1500;
/// A simulated model whose streams go quiet after three tokens.
const STALLING_MODEL: &str = "claude-stalls";

/// The tower-ai stack over a plain HTTP client: [`AiStack`] in its recommended order, with
/// this example's token budget and stall deadlines (no ModelFallback: this example is about
/// one model's stream).
fn stack<L>(
    client: Client<HttpConnector, AiBody>,
    budget: TokenBudgetLayer<Global, L>,
    idle: Duration,
) -> Result<
    impl Service<
            Request<AiBody>,
            Response = Response<impl Body<Data = bytes::Bytes, Error = BoxError> + Send>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send,
    BoxError,
>
where
    L: BudgetListener,
{
    // A stream that goes quiet for `idle` ends with `AiError::Stalled`, never a clean EOF;
    // before its first byte that is an error AiRetry can retry.
    let stall = StallDetectorLayer::builder()
        .first_byte(Duration::from_secs(30))
        .idle(idle)
        .total(Duration::from_secs(600))
        .build()?;
    let stack = AiStack::new().budget(budget).stall(stall);
    Ok(ServiceBuilder::new().ai_stack(stack).service(client))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(24))
            .token_interval(Latency::fixed(Duration::from_millis(20)))
            .stream_fault_for(
                STALLING_MODEL,
                StreamFault::StallAfterTokens {
                    tokens: 3,
                    probability: 1.0,
                },
            )
            .build()?,
    );
    let (base, api_key, model, simulated) = match std::env::var("ANTHROPIC_BASE_URL") {
        Ok(base) => (
            base.trim_end_matches('/').to_owned(),
            std::env::var("ANTHROPIC_API_KEY").unwrap_or_default(),
            std::env::var("ANTHROPIC_MODEL").unwrap_or_else(|_| "claude-sonnet-4-5".into()),
            None,
        ),
        Err(_) => {
            let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            (
                server.url(),
                "sk-ant-simulated".into(),
                "claude-sonnet-4-5".into(),
                Some(server),
            )
        }
    };
    if base.starts_with("https://") {
        return Err("built without TLS: use an http:// ANTHROPIC_BASE_URL (see the header)".into());
    }
    println!("talking to {base} (model {model})");

    // One budget for the account; the listener tells us when a request has to wait.
    let waiting = Arc::new(Notify::new());
    let (events, seen) = std::sync::mpsc::channel();
    let budget = TokenBudgetLayer::builder()
        .tokens_per_minute(TOKENS_PER_MINUTE)
        // Wait up to 90 s: without usage, the reservation would free when the minute ends.
        .wait(Duration::from_secs(90))
        .listener({
            let waiting = waiting.clone();
            move |event: &BudgetEvent| {
                if let BudgetEvent::Waiting { .. } = event {
                    waiting.notify_one();
                }
                let _ = events.send(*event);
            }
        })
        .build()?;
    let tokens_held = {
        let budget = budget.clone();
        move || {
            let key = Global
                .key(&Request::new(()))
                .expect("Global always has a key");
            budget.snapshot(key).and_then(|s| s.tokens).unwrap_or(0)
        }
    };
    // Real providers pause longer between tokens than the simulator does.
    let idle = Duration::from_secs(if simulated.is_some() { 1 } else { 30 });
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let ai = stack(client, budget, idle)?;
    let request = |model: &str, prompt: &str| {
        let body = json!({
            "model": model,
            "max_tokens": MAX_TOKENS,
            "stream": true,
            "messages": [{"role": "user", "content": prompt}],
        });
        Request::post(format!("{base}/v1/messages"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-api-key", &api_key)
            .header("anthropic-version", "2023-06-01")
            .body(AiBody::from(body.to_string()))
    };

    let res = ai
        .clone()
        .oneshot(request(&model, "Tell me about Tower.")?)
        .await?;
    assert!(
        res.status().is_success(),
        "stream refused: {}",
        res.status()
    );
    let reserved = tokens_held();
    println!(
        "reserved while streaming: {reserved} tokens (prompt estimate + max_tokens {MAX_TOKENS})"
    );
    assert!(reserved > MAX_TOKENS);

    // A second request does not fit beside that reservation (TPM 1500)...
    let second = tokio::spawn(ai.clone().oneshot(request(&model, "And about tower-ai?")?));
    tokio::time::timeout(Duration::from_secs(5), waiting.notified())
        .await
        .map_err(|_| "the second request should have waited for the budget")?;

    // ...until the first stream ends with its real usage.
    let (text, summary) = print_stream(res).await?;
    let usage = summary.usage.ok_or("the stream reported no usage")?;
    let used = usage.input_tokens + usage.output_tokens;
    println!(
        "usage: {} in + {} out = {used} tokens, stop reason {:?}",
        usage.input_tokens, usage.output_tokens, summary.finish_reason
    );
    assert!(!text.is_empty(), "empty stream");
    assert!(
        summary.is_complete(),
        "the stream did not end cleanly: {summary:?}"
    );
    assert!(usage.output_tokens > 0);

    // The second request went through as soon as the reservation was corrected.
    let res = tokio::time::timeout(Duration::from_secs(10), second).await???;
    let (_, summary) = print_stream(res).await?;
    let second_usage = summary.usage.ok_or("the second stream reported no usage")?;
    let second_used = second_usage.input_tokens + second_usage.output_tokens;
    let events: Vec<BudgetEvent> = seen.try_iter().collect();
    println!("budget events: {events:?}");
    assert!(matches!(
        events[..],
        [BudgetEvent::Waiting { .. }, BudgetEvent::Admitted { .. }]
    ));
    let held = tokens_held();
    println!(
        "budget now holds {held} tokens: the two answers' real usage ({used} + {second_used})"
    );
    assert_eq!(
        held,
        used + second_used,
        "reservations should be replaced by usage"
    );

    // A stream that goes quiet after three tokens (the simulator can script that; a real
    // provider does it when it likes) ends with a typed error, not a silent EOF.
    if simulated.is_some() {
        let res = ai.oneshot(request(STALLING_MODEL, "Hello?")?).await?;
        let err = print_stream(res)
            .await
            .expect_err("the stall should end the stream");
        println!("\nstalled stream: {err}");
        assert!(
            matches!(AiError::find(&*err), Some(AiError::Stalled { .. })),
            "{err:?}"
        );
    }
    Ok(())
}

/// Prints a Messages stream's text as it arrives; returns the text and how the stream
/// ended (from the StallDetector), or the error that ended it.
async fn print_stream<B>(res: Response<B>) -> Result<(String, StreamSummary), BoxError>
where
    B: Body<Data = bytes::Bytes, Error = BoxError>,
{
    let outcome = res
        .extensions()
        .get::<StreamOutcome>()
        .cloned()
        .ok_or("not a stream")?;
    let mut body = std::pin::pin!(res.into_body());
    let mut sse = SseParser::new();
    let mut text = String::new();
    print!("stream: ");
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame?.into_data() else {
            continue;
        };
        sse.feed(&chunk, |item| {
            let SseItem::Event {
                event: "content_block_delta",
                data,
            } = item
            else {
                return;
            };
            let Ok(delta) = serde_json::from_slice::<Value>(data) else {
                return;
            };
            if let Some(piece) = delta["delta"]["text"].as_str() {
                print!("{piece}");
                text.push_str(piece);
            }
        });
        std::io::stdout().flush()?;
    }
    println!();
    let summary = outcome
        .get()
        .cloned()
        .ok_or("the stream ended without a summary")?;
    Ok((text, summary))
}
