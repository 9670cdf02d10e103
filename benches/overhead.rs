//! Overhead per call on the happy path: the same in-memory provider (a ready 200 with a
//! small chat completion) bare, behind each tower-ai layer alone, behind `AiStack` (its
//! defaults, and the full six layers with a budget and a fallback chain), behind tower's
//! `RateLimit` + `Retry` (`TpsBudget`) + `Timeout`, and behind tower-resilience's retry +
//! circuit breaker + rate limiter. One task, and two OS threads each driving its own
//! clone through the same shared layers (time per call as each thread sees it).
//!
//! Requests are built outside the timed loop (in chunks of 256), the same request for every
//! variant; a call is `poll_ready`, `call`, polling the future to its end and dropping the
//! response. No runtime drives anything: the figure is the layers' own cost. Allocations
//! are counted by a separate bench (`allocations.rs`), so the counting allocator does not
//! slow this one. At the end a table of ratios (to the bare service and to
//! tower-resilience's stack) is printed from criterion's estimates of this run
//! (`OVERHEAD_TABLE_ONLY=1 cargo bench --bench overhead` prints it again without measuring).
//!
//! ```text
//! cargo bench --bench overhead -- --warm-up-time 1 --measurement-time 3
//! ```

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::Criterion;
use http::Request;
use tokio::runtime::Handle;
use tower::{Layer, Service};
use tower_ai::AiBody;

use common::*;

const CHUNK: usize = 256;

/// `iters` calls on one thread, requests built outside the timed sections.
fn run<S>(svc: &mut S, iters: u64) -> Duration
where
    S: Service<Request<AiBody>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = noop_cx();
    let mut left = iters;
    let mut total = Duration::ZERO;
    let mut reqs = Vec::with_capacity(CHUNK);
    while left > 0 {
        let n = left.min(CHUNK as u64);
        reqs.extend((0..n).map(|_| request()));
        let t = Instant::now();
        for req in reqs.drain(..) {
            once(svc, &mut cx, req);
        }
        total += t.elapsed();
        left -= n;
    }
    total
}

/// `iters` calls on each of two threads at once, each through its own service from
/// `make`; the slower thread's time.
fn run_two<S, M>(handle: &Handle, make: &M, iters: u64) -> Duration
where
    M: Fn() -> S + Sync,
    S: Service<Request<AiBody>>,
    S::Error: std::fmt::Debug,
{
    let start = Barrier::new(2);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let start = &start;
                scope.spawn(move || {
                    let _rt = handle.enter();
                    let mut svc = make();
                    run(&mut svc, 64); // warm up: per-key state, caches
                    start.wait();
                    run(&mut svc, iters)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

/// The variants, in table order: (criterion id, what it is).
const VARIANTS: &[(&str, &str)] = &[
    ("bare", "bare service"),
    ("classify", "Classify alone"),
    ("ai_retry", "AiRetry alone"),
    ("retry_after", "RetryAfterAware alone"),
    ("circuit_breaker", "CircuitBreaker alone"),
    ("token_budget", "TokenBudget alone"),
    ("model_fallback", "ModelFallback alone (2 routes)"),
    ("stall_detector", "StallDetector alone"),
    (
        "ai_stack_default",
        "AiStack::new() (retry, breaker, cooldown, stall, classify)",
    ),
    (
        "ai_stack_full",
        "AiStack full: + budget + fallback (six layers + classify)",
    ),
    (
        "tower_stack",
        "tower RateLimit + Retry(TpsBudget) + Timeout",
    ),
    (
        "tower_resilience",
        "tower-resilience retry + circuit breaker + rate limiter",
    ),
];

fn benches(c: &mut Criterion, handle: &Handle) {
    let _rt = handle.enter();
    let tower = tower_layer();

    macro_rules! each {
        ($m:ident) => {
            $m!("bare", || Bare);
            $m!("classify", classify);
            $m!("ai_retry", ai_retry);
            $m!("retry_after", retry_after);
            $m!("circuit_breaker", circuit_breaker);
            $m!("token_budget", token_budget);
            $m!("model_fallback", model_fallback);
            $m!("stall_detector", stall_detector);
            $m!("ai_stack_default", ai_stack_default);
            $m!("ai_stack_full", ai_stack_full);
            $m!("tower_stack", || tower.layer(Bare));
            $m!("tower_resilience", tower_resilience);
        };
    }

    let mut g = c.benchmark_group("overhead_1_task");
    macro_rules! single {
        ($id:literal, $make:expr) => {{
            let mut svc = ($make)();
            run(&mut svc, 64);
            g.bench_function($id, |b| b.iter_custom(|iters| run(&mut svc, iters)));
        }};
    }
    each!(single);
    g.finish();

    let mut g = c.benchmark_group("overhead_2_tasks");
    macro_rules! double {
        ($id:literal, $make:expr) => {{
            // clones of one service share its layers' state
            let shared = ($make)();
            let make = || shared.clone();
            g.bench_function($id, |b| {
                b.iter_custom(|iters| run_two(handle, &make, iters))
            });
        }};
    }
    macro_rules! double_each {
        () => {
            double!("bare", || Bare);
            double!("classify", classify);
            double!("ai_retry", ai_retry);
            double!("retry_after", retry_after);
            double!("circuit_breaker", circuit_breaker);
            double!("token_budget", token_budget);
            double!("model_fallback", model_fallback);
            double!("stall_detector", stall_detector);
            double!("ai_stack_default", ai_stack_default);
            double!("ai_stack_full", ai_stack_full);
            double!("tower_resilience", tower_resilience);
        };
    }
    double_each!();
    {
        // tower's RateLimit is not Clone: each thread gets its own from the shared layer
        let make = || tower.layer(Bare);
        g.bench_function("tower_stack", |b| {
            b.iter_custom(|iters| run_two(handle, &make, iters))
        });
    }
    g.finish();
}

/// criterion's point estimate of one benchmark of the last run (ns per call): the slope of
/// its linear sampling, as criterion prints it, else the mean.
fn estimate(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| v["mean"]["point_estimate"].as_f64())
}

fn table() {
    let groups = ["overhead_1_task", "overhead_2_tasks"];
    let base = |g: &str, id: &str| estimate(g, id).unwrap_or(f64::NAN);
    println!("\n| variant | 1 task (ns/call) | × bare | × tower-resilience | 2 tasks (ns/call) | × bare | × tower-resilience |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (id, label) in VARIANTS {
        print!("| {label} |");
        for g in groups {
            let t = base(g, id);
            print!(
                " {t:.1} | {:.2} | {:.2} |",
                t / base(g, "bare"),
                t / base(g, "tower_resilience")
            );
        }
        println!();
    }
}

fn main() {
    // OVERHEAD_TABLE_ONLY=1: print the table of the last run again, measure nothing.
    if std::env::var_os("OVERHEAD_TABLE_ONLY").is_none() {
        let rt = runtime();
        let mut c = Criterion::default().configure_from_args();
        benches(&mut c, rt.handle());
        c.final_summary();
    }
    table();
}
