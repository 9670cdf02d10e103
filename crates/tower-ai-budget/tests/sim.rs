//! Scenario against the simulator: a provider limited to 60 RPM and 40,000 TPM, offered
//! twice that load for 5 virtual minutes, with and without TokenBudget at the same limits.
//!
//! Run with `cargo test -p tower-ai-budget --test sim -- --nocapture` to see the figures.

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{AiBody, AiError};
use tower_ai_sim::{Latency, ModelSpec, Outcome, Scenario, Simulator};

const RPM: u64 = 60;
const TPM: u64 = 40_000;
const MINUTES: u64 = 5;
/// The simulator's prompt estimate of the request below: 1864 bytes of text / 4.
const PROMPT: u64 = 466;
const COMPLETION: u32 = 200;
const MAX_TOKENS: u64 = 256;

#[derive(Debug, Default)]
struct Report {
    offered: u64,
    calls: u64,
    served: u64,
    rate_limited: u64,
    refused_by_budget: u64,
    served_tokens: u64,
}

fn request() -> Request<AiBody> {
    let content = "z".repeat(1864);
    let body = format!(
        r#"{{"model":"gpt-4o","max_tokens":{MAX_TOKENS},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    Request::post("http://sim.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(AiBody::from(body))
        .unwrap()
}

/// Requests sent at twice the provider's capacity (2 per second) for five minutes.
async fn run(with_budget: bool) -> Report {
    let sim = Simulator::new(
        Scenario::builder()
            .seed(7)
            .model(ModelSpec::new("gpt-4o").completion_tokens(COMPLETION))
            .rpm_limit(RPM)
            .tpm_limit(TPM)
            .latency(Latency::fixed(Duration::from_millis(800)))
            .build()
            .unwrap(),
    );
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(RPM)
        .tokens_per_minute(TPM)
        .wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let budgeted = layer.layer(sim.service());
    let offered = 2 * RPM * MINUTES;
    let mut tasks = Vec::new();
    for _ in 0..offered {
        let task = if with_budget {
            let svc = budgeted.clone();
            tokio::spawn(async move {
                match svc.oneshot(request()).await {
                    Ok(res) => {
                        let _ = res.into_body().collect().await;
                        false
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.downcast_ref::<AiError>(),
                                Some(AiError::BudgetExceeded { .. })
                            ),
                            "{e}"
                        );
                        true
                    }
                }
            })
        } else {
            let svc = sim.service();
            tokio::spawn(async move {
                let res = svc.oneshot(request()).await.unwrap();
                let _ = res.into_body().collect().await;
                false
            })
        };
        tasks.push(task);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut report = Report {
        offered,
        ..Report::default()
    };
    for t in tasks {
        report.refused_by_budget += u64::from(t.await.unwrap());
    }
    let window = Duration::from_secs(60 * MINUTES);
    for call in sim.calls().iter().filter(|c| c.at < window) {
        report.calls += 1;
        match call.status {
            200 => {
                report.served += 1;
                report.served_tokens += call.prompt_tokens + u64::from(call.completion_tokens);
            }
            429 => report.rate_limited += 1,
            s => panic!("unexpected status {s}: {call:?}"),
        }
    }
    assert_eq!(sim.stats().outcome(Outcome::RequestTooLarge), 0);
    report
}

#[tokio::test(start_paused = true)]
async fn budget_fills_the_provider_without_429s() {
    // Capacity in 5 fixed minutes: 60 requests per window, and 40,000 tokens fit
    // floor(40,000 / 666) = 60 requests of 466 + 200 tokens.
    let per_request = PROMPT + u64::from(COMPLETION);
    let capacity = MINUTES * RPM.min(TPM / per_request);
    let with = run(true).await;
    let without = run(false).await;
    let share = |r: &Report| r.served as f64 / capacity as f64 * 100.0;
    let pct429 = |r: &Report| r.rate_limited as f64 / r.calls.max(1) as f64 * 100.0;
    println!("capacity in {MINUTES} min: {capacity} requests ({per_request} tokens each)");
    for (name, r) in [("with TokenBudget", &with), ("without", &without)] {
        println!(
            "{name:>17}: offered {}, provider calls {}, served {} ({:.1}% of capacity, {} tokens), 429s {} ({:.1}% of calls), refused by the budget {}",
            r.offered,
            r.calls,
            r.served,
            share(r),
            r.served_tokens,
            r.rate_limited,
            pct429(r),
            r.refused_by_budget
        );
    }
    assert!(share(&with) >= 95.0, "{with:?}");
    assert!(pct429(&with) <= 1.0, "{with:?}");
    // Without the budget the provider still fills up, but answers about half the calls 429.
    assert!(pct429(&without) > 40.0, "{without:?}");
}
