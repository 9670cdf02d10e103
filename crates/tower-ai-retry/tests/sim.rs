//! AiRetry against the simulator: in process (budget during an outage) and over real
//! loopback HTTP (Retry-After then success, body byte-for-byte).

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, ClassifyLayer};
use tower_ai_retry::{AiRetryLayer, Jitter};
use tower_ai_sim::{Fault, ModelSpec, Scenario, Simulator};

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hi"}]}"#;

fn request(uri: &str) -> Request<AiBody> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(AiBody::from(BODY))
        .unwrap()
}

/// Offers 1,000 calls (one every 10 ms) to a model that is down the whole time, with 3
/// attempts per call; returns upstream calls / offered calls. Each call through a clone
/// of its own, or (`one_instance`) all through one instance, which batches its budget
/// deposits.
async fn outage_amplification(layer: AiRetryLayer, one_instance: bool) -> f64 {
    let sim = Simulator::new(
        Scenario::builder()
            .seed(7)
            .model(ModelSpec::new("gpt-4o"))
            .outage("gpt-4o", Duration::ZERO, Duration::from_secs(3600))
            .build()
            .unwrap(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let offered = 1_000;
    let mut tasks = Vec::with_capacity(offered);
    for _ in 0..offered {
        let req = request("/v1/chat/completions");
        tasks.push(if one_instance {
            let fut = ServiceExt::<Request<AiBody>>::ready(&mut svc)
                .await
                .unwrap()
                .call(req);
            tokio::spawn(fut)
        } else {
            tokio::spawn(svc.clone().oneshot(req))
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), 503);
    }
    sim.stats().total as f64 / offered as f64
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_during_a_total_outage() {
    let unbudgeted = outage_amplification(
        AiRetryLayer::builder()
            .max_attempts(3)
            .no_budget()
            .seed(1)
            .build()
            .unwrap(),
        false,
    )
    .await;
    // 10 s window, floor 1 retry/s, 10 % of calls.
    let budgeted = |one_instance| {
        outage_amplification(
            AiRetryLayer::builder()
                .max_attempts(3)
                .budget(Duration::from_secs(10), 1, 0.1)
                .seed(1)
                .build()
                .unwrap(),
            one_instance,
        )
    };
    let per_clone = budgeted(false).await;
    let one_instance = budgeted(true).await;
    println!(
        "outage amplification (upstream calls / offered calls): no budget {unbudgeted:.3}, \
         budget(10 s, 1/s, 10 %) {per_clone:.3} (a clone per call), {one_instance:.3} (one instance)"
    );
    assert_eq!(unbudgeted, 3.0);
    // 1,000 calls over 10 s: about 0.1 × 1000 + 1/s × 10 s = 110 retries (the window
    // slides by 1 s slots, so a few more as the first slots expire). One instance holds
    // deposits back in batches until retries begin, then adds each at its next call.
    for budgeted in [per_clone, one_instance] {
        assert!(budgeted <= 1.13, "amplification {budgeted}");
        assert!(
            budgeted >= 1.05,
            "the budget allowed almost no retry: {budgeted}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_429_with_retry_after_then_200_over_real_http() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let sim = Simulator::new(
        Scenario::builder()
            .seed(3)
            .model(ModelSpec::new("gpt-4o").completion_tokens(8))
            .fault(
                Fault::status(429)
                    .between(Duration::ZERO, Duration::from_millis(500))
                    .retry_after(Duration::from_secs(1)),
            )
            .build()
            .unwrap(),
    );
    let server = sim.serve(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let svc = ServiceBuilder::new()
        .layer(
            AiRetryLayer::builder()
                .max_attempts(3)
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(client);
    let url = format!("{}/v1/chat/completions", server.url());
    let started = std::time::Instant::now();
    // A real socket, so the real clock: a bound only a hang reaches on a loaded machine.
    let res = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(request(&url)))
        .await
        .expect("no answer within 60 s")
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(res.status(), 200);
    let length: usize = res.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Bytes = res.into_body().collect().await.unwrap().to_bytes();
    // The caller got the 200's body whole, exactly as announced.
    assert_eq!(body.len(), length);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["usage"]["completion_tokens"], 8);
    // Retry-After: 1 was honoured (a real clock: at least 1 s).
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    // The simulator saw the identical body twice: 429, then 200.
    let calls = sim.calls();
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    for c in &calls {
        assert_eq!(c.body_digest, tower_ai_sim::digest(BODY.as_bytes()));
        assert_eq!(c.body_len, BODY.len());
    }
    assert!(calls[1].at - calls[0].at >= Duration::from_secs(1));
}
