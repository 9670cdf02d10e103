//! A five-minute scenario on a paused clock: deterministic, and fast in real time.
//!
//! Reproduce the figure with
//! `cargo test -p tower-ai-sim --test paused_clock -- --nocapture`.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::time::{sleep_until, Instant};
use tower_ai_sim::{CallRecord, Fault, Latency, ModelSpec, Scenario, Simulator};

fn scenario() -> Scenario {
    Scenario::builder()
        .seed(42)
        .model(ModelSpec::new("gpt-4o").completion_tokens(20))
        .rpm_limit(100)
        .tpm_limit(40_000)
        .fault(Fault::status(529).probability(0.05))
        .fault(Fault::status(503).between(Duration::from_secs(120), Duration::from_secs(150)))
        .latency(Latency::uniform(
            Duration::from_millis(200),
            Duration::from_millis(900),
        ))
        .error_latency(Latency::fixed(Duration::from_millis(50)))
        .token_interval(Latency::fixed(Duration::from_millis(20)))
        .build()
        .unwrap()
}

/// 600 requests, one every 500 ms, half streamed; every response read to the end.
async fn five_minutes() -> (Vec<CallRecord>, Duration) {
    let sim = Simulator::new(scenario());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..600u32 {
        sleep_until(start + Duration::from_millis(500) * i).await;
        let sim = sim.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = chat("gpt-4o", "Tell me something in twenty tokens.");
            body["stream"] = json!(i % 2 == 0);
            let (parts, _) = read(send_json(&sim, OPENAI, &body).await).await;
            parts.status.as_u16()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (sim.calls(), start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn five_minute_scenario_is_fast_and_deterministic() {
    let real = std::time::Instant::now();
    let (calls, virtual_time) = five_minutes().await;
    let took = real.elapsed();
    println!(
        "5-minute scenario: {} calls, {:?} virtual, {:?} real",
        calls.len(),
        virtual_time,
        took
    );
    assert_eq!(calls.len(), 600);
    assert!(virtual_time >= Duration::from_secs(299));
    // Five virtual minutes did not take five real ones: a bound no loaded machine reaches
    // (typically tens of ms), and still far below the 300 s a real clock would take.
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // 100 per minute admitted: windows 0..4 each get 100 of their 120 requests.
    let limited = calls.iter().filter(|c| c.status == 429).count();
    assert_eq!(limited, 5 * 20);
    // The burst: no request in [120 s, 150 s) succeeded, and most got its 503
    // (the random 529, checked first, takes a few).
    let burst: Vec<_> = calls
        .iter()
        .filter(|c| c.at >= Duration::from_secs(120) && c.at < Duration::from_secs(150))
        .collect();
    assert_eq!(burst.len(), 60);
    assert!(burst.iter().all(|c| c.status != 200));
    assert!(burst.iter().filter(|c| c.status == 503).count() >= 50);
    assert_eq!(
        calls.iter().filter(|c| c.status == 503).count(),
        burst.iter().filter(|c| c.status == 503).count()
    );
    assert!(calls.iter().any(|c| c.status == 529));

    // Same seed, same clock: the same run.
    let (again, _) = five_minutes().await;
    assert_eq!(calls, again);
}
