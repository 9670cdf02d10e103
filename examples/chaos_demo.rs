//! The main demo: one bad afternoon at an AI provider, and three ways through it.
//!
//! The simulator plays a provider in a storm (see `tower_ai_workspace::storm`): rate
//! limits, a burst of 503 overload, a 60 s outage of the primary model, stalled streams,
//! and a quota that runs out half-way. The same 600 requests go through (a) a bare client,
//! (b) the retry loop most tutorials show (3 retries, 1/2/4 s backoff plus a little jitter,
//! Retry-After ignored, no fallback) and (c) the tower-ai stack, on a paused clock: five
//! minutes of provider time take a second or two. The table is computed, not typed in.
//!
//! Run with:
//!
//! ```text
//! cargo run --example chaos_demo            # seed 7
//! cargo run --example chaos_demo -- 42      # another seed
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_ai::fallback::{rewrite_model, FallbackChain, Route};
use tower_ai::prelude::*;
use tower_ai_core::{try_clone_request, AiBody};
use tower_ai_workspace::storm::{
    self, Served, Storm, StormConfig, Verdict, BACKUP_MODEL, SECONDARY_MODEL,
};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let config = StormConfig {
        seed,
        ..StormConfig::default()
    };
    let wall = std::time::Instant::now();
    println!(
        "tower-ai chaos demo: {} requests over {} virtual seconds, seed {seed}",
        config.requests,
        (config.interval * config.requests).as_secs()
    );

    let mut reports = Vec::new();

    // (a) A bare client: one call, whatever comes back.
    let s = Storm::new(config);
    let client = ClassifyLayer::new().layer(s.primary.service());
    reports.push(
        storm::run(
            "bare",
            &s,
            |req| {
                let client = client.clone();
                async move {
                    match client.oneshot(req).await {
                        Ok(res) => (storm::consume(res).await, Served::default()),
                        Err(_) => (Verdict::Failed, Served::default()),
                    }
                }
            },
            progress("bare"),
        )
        .await,
    );

    // (b) The tutorial retry loop.
    let s = Storm::new(config);
    let client = ClassifyLayer::new().layer(s.primary.service());
    let seeds = Arc::new(AtomicU64::new(seed));
    reports.push(
        storm::run(
            "naive retry",
            &s,
            |req| {
                let client = client.clone();
                let mut rng = fastrand::Rng::with_seed(seeds.fetch_add(1, Ordering::Relaxed));
                async move {
                    for attempt in 0..=3u32 {
                        let again = try_clone_request(&req).expect("in-memory body");
                        if let Ok(res) = client.clone().oneshot(again).await {
                            if res.status().is_success() {
                                return (storm::consume(res).await, Served::default());
                            }
                        }
                        if attempt < 3 {
                            let backoff = Duration::from_secs(1 << attempt)
                                + Duration::from_millis(rng.u64(0..250));
                            tokio::time::sleep(backoff).await;
                        }
                    }
                    (Verdict::Failed, Served::default())
                }
            },
            progress("naive retry"),
        )
        .await,
    );

    // (c) The tower-ai stack: the primary account, its smaller model, then the backup
    // provider; a requests-per-minute budget at the account's own limit, so excess
    // traffic goes to the backup before the provider says no.
    let s = Storm::new(config);
    let backup_budget = TokenBudgetLayer::builder()
        .requests_per_minute(1000)
        .reject()
        .build()
        .expect("a valid budget");
    let backup = AiStack::new()
        .budget(backup_budget)
        .layer(s.backup.service());
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model(SECONDARY_MODEL))
        .route(
            Route::service("backup", backup)
                .model_name(BACKUP_MODEL)
                .rewrite(|req: &mut http::Request<AiBody>| {
                    let body = req
                        .body()
                        .as_bytes()
                        .and_then(|b| rewrite_model(b, BACKUP_MODEL));
                    *req.body_mut() = AiBody::from(body.ok_or("request without a model")?);
                    Ok(())
                }),
        )
        .build()
        .expect("a valid chain");
    let budget = TokenBudgetLayer::builder()
        .requests_per_minute(100)
        .reject()
        .build()
        .expect("a valid budget");
    let stack = AiStack::new()
        .budget(budget)
        .fallback(ModelFallbackLayer::new(chain));
    let client = stack.layer(s.primary.service());
    reports.push(
        storm::run(
            "tower-ai",
            &s,
            |req| {
                let client = client.clone();
                async move {
                    match client.oneshot(req).await {
                        Ok(res) => {
                            let fallback = res
                                .extensions()
                                .get::<tower_ai::fallback::Served>()
                                .is_some_and(|s| s.index > 0);
                            (storm::consume(res).await, Served { fallback })
                        }
                        Err(e) => match AiError::find(&*e) {
                            Some(AiError::Stalled { .. }) => {
                                (Verdict::StallCaught, Served::default())
                            }
                            _ => (Verdict::Failed, Served::default()),
                        },
                    }
                }
            },
            progress("tower-ai"),
        )
        .await,
    );

    println!();
    print!("{}", storm::table(&reports));
    println!("\n(wall-clock time: {:.2} s)", wall.elapsed().as_secs_f64());
}

fn progress(name: &'static str) -> impl FnMut(u64, u32, u32) {
    move |secs, served, finished| {
        eprintln!("  [{name}] t={secs:>3}s  finished {finished:>3}  served {served:>3}")
    }
}
