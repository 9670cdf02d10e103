//! The issue's scenario, in process on a paused clock against the simulator:
//! 60 requests per fixed 60 s window (aligned to t = 0; beyond that a 429 with
//! `retry-after` = seconds to the window's reset), a success takes 1 s and a 429 50 ms;
//! one new request every 500 ms for 300 s (600 requests), each with a 30 s end-to-end
//! deadline (`tokio::time::timeout`). The best possible is 358 successes with no wasted
//! call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, ClassifyLayer};
use tower_ai_retry::AiRetryLayer;
use tower_ai_retry_after::RetryAfterAwareLayer;
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

const BODY: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Summarise the news"}]}"#;

type Call =
    Arc<dyn Fn(Request<AiBody>) -> Pin<Box<dyn Future<Output = Option<u16>> + Send>> + Send + Sync>;

fn simulator() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(11)
            .model(ModelSpec::new("gpt-4o").completion_tokens(10))
            .rpm_limit(60)
            .rate_window(Duration::from_secs(60))
            .latency(Latency::fixed(Duration::from_secs(1)))
            .error_latency(Latency::fixed(Duration::from_millis(50)))
            .build()
            .unwrap(),
    )
}

#[derive(Debug)]
struct Row {
    name: &'static str,
    successes: usize,
    upstream: u64,
    rate_limited: u64,
}

impl Row {
    fn pct_429(&self) -> f64 {
        100.0 * self.rate_limited as f64 / self.upstream.max(1) as f64
    }
    fn per_request(&self) -> f64 {
        self.upstream as f64 / 600.0
    }
}

async fn run(name: &'static str, sim: &Simulator, call: Call) -> Row {
    let mut tasks = Vec::with_capacity(600);
    for _ in 0..600 {
        let req = Request::post("https://api.openai.com/v1/chat/completions")
            .header("content-type", "application/json")
            .body(AiBody::from(BODY))
            .unwrap();
        let fut = call(req);
        tasks.push(tokio::spawn(async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(30), fut).await,
                Ok(Some(200))
            )
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut successes = 0;
    for t in tasks {
        successes += usize::from(t.await.unwrap());
    }
    let stats = sim.stats();
    Row {
        name,
        successes,
        upstream: stats.total,
        rate_limited: stats.count(429),
    }
}

fn status_of<T, E>(r: Result<http::Response<T>, E>) -> Option<u16> {
    r.ok().map(|r| r.status().as_u16())
}

#[tokio::test(start_paused = true)]
async fn rate_limited_provider_scenario() {
    let mut rows = Vec::new();

    // Bare: one call each.
    let sim = simulator();
    let svc = ServiceBuilder::new()
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let call: Call = Arc::new(move |req| {
        let svc = svc.clone();
        Box::pin(async move { status_of(svc.oneshot(req).await) })
    });
    rows.push(run("bare", &sim, call).await);

    // A naive loop: up to 3 retries after 1, 2, 4 s on any non-200, ignoring retry-after.
    let sim = simulator();
    let svc = sim.service();
    let call: Call = Arc::new(move |req: Request<AiBody>| {
        let svc = svc.clone();
        Box::pin(async move {
            let bytes = bytes::Bytes::from_static(BODY.as_bytes());
            let mut last = None;
            for (i, backoff) in [0u64, 1, 2, 4].into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_secs(backoff)).await;
                }
                let mut r = Request::new(AiBody::from(bytes.clone()));
                *r.uri_mut() = req.uri().clone();
                *r.method_mut() = req.method().clone();
                last = status_of(svc.clone().oneshot(r).await);
                if last == Some(200) {
                    break;
                }
            }
            last
        })
    });
    rows.push(run("naive 3-retry loop (1/2/4 s)", &sim, call).await);

    // The client budgets 29 s for waiting: the 30 s deadline minus one success (1 s).
    let retry = || {
        AiRetryLayer::builder()
            .max_attempts(4)
            .max_elapsed(Duration::from_secs(29))
            .max_wait(Duration::from_secs(60))
            .seed(5)
            .build()
            .unwrap()
    };

    // AiRetry alone.
    let sim = simulator();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let call: Call = Arc::new(move |req| {
        let svc = svc.clone();
        Box::pin(async move { status_of(svc.oneshot(req).await) })
    });
    rows.push(run("AiRetry", &sim, call).await);

    // AiRetry + RetryAfterAware.
    let sim = simulator();
    let gate = RetryAfterAwareLayer::builder()
        .wait(Duration::from_secs(29))
        .seed(9)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(gate)
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let call: Call = Arc::new(move |req| {
        let svc = svc.clone();
        Box::pin(async move { status_of(svc.oneshot(req).await) })
    });
    rows.push(run("AiRetry + RetryAfterAware", &sim, call).await);

    println!("\n| client | successes | upstream calls | answered 429 | calls/request |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} ({:.1} %) | {:.3} |",
            r.name,
            r.successes,
            r.upstream,
            r.rate_limited,
            r.pct_429(),
            r.per_request()
        );
    }

    let bare = &rows[0];
    assert_eq!(bare.upstream, 600);
    let naive = &rows[1];
    assert!(
        naive.upstream > 1_000,
        "the naive loop should hammer the limit: {naive:?}"
    );
    let alone = &rows[2];
    assert!(
        alone.upstream < naive.upstream,
        "AiRetry alone should send fewer upstream calls than the naive loop: {alone:?} vs {naive:?}"
    );
    assert!(
        alone.successes >= bare.successes,
        "AiRetry alone should serve at least as many as bare: {alone:?} vs {bare:?}"
    );
    let best = &rows[3];
    assert!(best.successes >= 355, "{best:?}");
    assert!(best.pct_429() <= 2.0, "{best:?}");
    assert!(best.per_request() <= 0.61, "{best:?}");
    assert!(
        best.successes <= 358,
        "more than the provider can serve? {best:?}"
    );
}
