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
use tower_ai::{AiBody, RequestMeta};
use tower_ai_core::try_clone_request;

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

/// (future, service) sizes: the future is moved by value through every layer's `call`.
fn sizes<S: Service<Request<AiBody>>>(_: &S) -> (usize, usize) {
    (std::mem::size_of::<S::Future>(), std::mem::size_of::<S>())
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
    // What the layers' own steps cost alone, to attribute the figures above.
    let per = |f: &mut dyn FnMut(Request<AiBody>)| {
        let reqs: Vec<_> = (0..N).map(|_| request()).collect();
        let info = allocation_counter::measure(|| reqs.into_iter().for_each(&mut *f));
        (
            info.count_total as f64 / N as f64,
            info.bytes_total as f64 / N as f64,
        )
    };
    let steps = [
        (
            "a copy of the request to replay (`try_clone_request`, 2 headers)",
            per(&mut |r| drop(std::hint::black_box(try_clone_request(&r)))),
        ),
        (
            "`RequestMeta::get_or_insert` (model, token estimate into the extensions)",
            per(&mut |mut r| {
                std::hint::black_box(RequestMeta::get_or_insert(&mut r));
            }),
        ),
    ];
    for (name, (n, bytes)) in steps {
        println!("| *step:* {name} | {n:.2} | {bytes:.0} |");
    }
    println!("\n| variant | size of the response future (bytes) | size of the service (bytes) |");
    println!("|---|---:|---:|");
    let sizes = [
        ("bare service", sizes(&Bare)),
        ("Classify alone", sizes(&classify())),
        ("StallDetector alone", sizes(&stall_detector())),
        ("RetryAfterAware alone", sizes(&retry_after())),
        ("CircuitBreaker alone", sizes(&circuit_breaker())),
        ("AiRetry alone", sizes(&ai_retry())),
        ("ModelFallback alone (2 routes)", sizes(&model_fallback())),
        ("TokenBudget alone", sizes(&token_budget())),
        ("AiStack::new()", sizes(&ai_stack_default())),
        ("AiStack full", sizes(&ai_stack_full())),
        ("tower stack", sizes(&tower_layer().layer(Bare))),
        ("tower-resilience stack", sizes(&tower_resilience())),
    ];
    for (name, (f, s)) in sizes {
        println!("| {name} | {f} | {s} |");
    }
}
