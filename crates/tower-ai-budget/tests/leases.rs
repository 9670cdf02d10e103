//! Leases (a budget that counts tokens lends each thread's stripe a chunk of its windows
//! while far from its limits) on a real multi-thread runtime: the token limit is never
//! passed, and no request is refused while the key truly has room for it, however the
//! threads race; then the same windows on a paused clock.
//!
//! The multi-thread tests use the real clock: each runs well inside one minute, so the
//! minute window never slides during it (its slots do: leases last one second).

mod support;

use std::time::Duration;

use support::*;
use tower::Layer;
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::BudgetLimit;

const TASKS: usize = 8;
/// Each request reserves 10 input + 53 output tokens: a chunk is not a multiple of it, so
/// leases are left with room too small for one more.
const COST: u64 = 63;
/// Large enough for a chunk of at least one request even with 64 stripes:
/// 262,144 / (32 × 64) = 128.
const LIMIT: u64 = 1 << 18;

/// `TASKS` tasks on `threads` threads, each sending until refused; the requests admitted.
async fn race(layer: &TokenBudgetLayer, answer: fn() -> http::Response<Chunks>) -> u64 {
    let svc = layer.layer(Provider::new(move |_| Ok(answer())));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut admitted = 0u64;
                loop {
                    match send(&svc, chat(10, Some(53))).await {
                        Ok(res) => {
                            drain(res).await;
                            admitted += 1;
                        }
                        Err(e) => {
                            assert_eq!(exceeded(&e).0, BudgetLimit::TokensPerMinute);
                            return admitted;
                        }
                    }
                    // Let the others in: every task runs on every worker in turn.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_threads_admit_exactly_the_token_limit() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(LIMIT)
        .reject()
        .build()
        .unwrap();
    // No usage in the answers: each request keeps its reservation of exactly COST.
    let admitted = race(&layer, no_usage).await;
    assert_eq!(
        admitted,
        LIMIT / COST,
        "never past the limit, never short of it"
    );
    assert_eq!(snapshot(&layer).tokens, Some(admitted * COST));
    assert_eq!(snapshot(&layer).held, 0, "every reservation settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_threads_with_refunds_stay_under_the_limit_and_use_it() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(LIMIT)
        .reject()
        .build()
        .unwrap();
    // Each request uses 10 of the 63 it reserved: 53 come back when its body ends.
    let admitted = race(&layer, || json_usage(5, 5)).await;
    let used = snapshot(&layer).tokens.unwrap();
    assert_eq!(used, admitted * 10, "every refund taken off the window");
    assert!(used <= LIMIT, "{used} > {LIMIT}");
    // A task stops at its first refusal, which the budget decides exactly: the window then
    // held more than LIMIT - COST, of which the reservations of the other tasks' requests
    // in flight (COST each, at most TASKS - 1 of them) were still to be refunded.
    let floor = LIMIT - COST * TASKS as u64;
    assert!(used > floor, "refused with room: {used} used of {LIMIT}");
}

#[tokio::test(start_paused = true)]
async fn leased_requests_are_counted_in_their_second_and_leave_with_it() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(LIMIT)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|_| Ok(no_usage())));
    // t = 0: the first through the lock lends this thread's stripe a lease, which admits
    // the next ones.
    for _ in 0..5 {
        drain(send(&svc, chat(10, Some(53))).await.unwrap()).await;
    }
    tokio::time::advance(Duration::from_millis(30_500)).await;
    // t = 30.5: the lease of second 0 is over; a new one.
    for _ in 0..3 {
        drain(send(&svc, chat(10, Some(53))).await.unwrap()).await;
    }
    assert_eq!(snapshot(&layer).tokens, Some(8 * COST), "no chunk counted");
    // (A snapshot reads the windows as of the key's last request: one moves them.)
    let one = || async { drain(send(&svc, chat(10, Some(53))).await.unwrap()).await };
    tokio::time::advance(Duration::from_secs(30)).await;
    one().await;
    // t = 60.5: slot 0 still counts (61 slots of a second).
    assert_eq!(snapshot(&layer).tokens, Some(9 * COST));
    tokio::time::advance(Duration::from_secs(1)).await;
    one().await;
    // t = 61.5: the five of second 0 left.
    assert_eq!(snapshot(&layer).tokens, Some(5 * COST));
    tokio::time::advance(Duration::from_secs(30)).await;
    one().await;
    // t = 91.5: the three of second 30 left.
    assert_eq!(snapshot(&layer).tokens, Some(3 * COST));
}
