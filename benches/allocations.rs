//! Heap allocations per call on the happy path, for every variant of `overhead.rs` (same
//! provider, same request, same stacks). Requests are built before the counted section, so
//! the figures are the stack's own allocations (the bare service's 0 included). A separate
//! bench because the counting allocator would slow the timing one.
//!
//! ```text
//! cargo bench --bench allocations
//! ```

mod common;

use http::Request;
use tower::{Layer, Service};
use tower_ai::AiBody;

use common::*;

const N: usize = 1_000;

/// (allocations, bytes) per call over `N` calls after a warm-up.
fn count<S>(mut svc: S) -> (f64, f64)
where
    S: Service<Request<AiBody>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = noop_cx();
    for _ in 0..64 {
        once(&mut svc, &mut cx, request()); // warm up: per-key state, caches
    }
    let reqs: Vec<_> = (0..N).map(|_| request()).collect();
    let info = allocation_counter::measure(|| {
        for req in reqs {
            once(&mut svc, &mut cx, req);
        }
    });
    (
        info.count_total as f64 / N as f64,
        info.bytes_total as f64 / N as f64,
    )
}

fn main() {
    let rt = runtime();
    let _rt = rt.enter();
    let building = allocation_counter::measure(|| {
        for _ in 0..N {
            drop(std::hint::black_box(request()));
        }
    });
    let rows: Vec<(&str, (f64, f64))> = vec![
        ("bare service", count(Bare)),
        ("Classify alone", count(classify())),
        ("AiRetry alone", count(ai_retry())),
        ("RetryAfterAware alone", count(retry_after())),
        ("CircuitBreaker alone", count(circuit_breaker())),
        ("TokenBudget alone", count(token_budget())),
        ("ModelFallback alone (2 routes)", count(model_fallback())),
        ("StallDetector alone", count(stall_detector())),
        (
            "AiStack::new() (retry, breaker, cooldown, stall, classify)",
            count(ai_stack_default()),
        ),
        (
            "AiStack full: + budget + fallback (six layers + classify)",
            count(ai_stack_full()),
        ),
        (
            "tower RateLimit + Retry(TpsBudget) + Timeout",
            count(tower_layer().layer(Bare)),
        ),
        (
            "tower-resilience retry + circuit breaker + rate limiter",
            count(tower_resilience()),
        ),
    ];
    println!(
        "building the request (not counted below): {:.1} allocations, {:.0} bytes\n",
        building.count_total as f64 / N as f64,
        building.bytes_total as f64 / N as f64
    );
    println!("| variant | allocations per call | bytes per call |");
    println!("|---|---:|---:|");
    for (name, (n, bytes)) in rows {
        println!("| {name} | {n:.2} | {bytes:.0} |");
    }
}
