//! Time per call of ModelFallback on the happy path (the first route serves) against the
//! bare service, and against the bare service plus the one request copy any layer that
//! can send a request again must keep (what `tower::retry` and AiRetry also pay).
//! Allocation counts are in `benches/allocations.rs` (a counting allocator would slow
//! every allocation here).
//!
//! cargo bench -p tower-ai-fallback --bench overhead -- --warm-up-time 1 --measurement-time 3

mod common;

use common::*;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tower_ai_core::try_clone_request;

fn bench(c: &mut Criterion) {
    let mut bare = Provider;
    let mut unshared = fallback(Route::primary("gpt-4o"), false);
    let mut shared = fallback(Route::primary("gpt-4o"), true);
    let mut rewrite = fallback(Route::model("gpt-4.1"), false);
    let mut single = single_route();

    let mut g = c.benchmark_group("happy_path");
    g.bench_function("bare", |b| {
        b.iter_batched(request, |r| once(&mut bare, r), BatchSize::SmallInput)
    });
    g.bench_function("bare_plus_request_copy", |b| {
        b.iter_batched(
            request,
            |r| {
                let copy = try_clone_request(&r);
                let res = once(&mut bare, r);
                drop(std::hint::black_box(copy));
                res
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("fallback_budget_not_shared", |b| {
        b.iter_batched(request, |r| once(&mut unshared, r), BatchSize::SmallInput)
    });
    g.bench_function("fallback_budget_shared", |b| {
        b.iter_batched(request, |r| once(&mut shared, r), BatchSize::SmallInput)
    });
    g.bench_function("fallback_first_route_rewrites_model", |b| {
        b.iter_batched(request, |r| once(&mut rewrite, r), BatchSize::SmallInput)
    });
    g.bench_function("fallback_one_route_budget_shared", |b| {
        b.iter_batched(request, |r| once(&mut single, r), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
