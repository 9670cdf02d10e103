//! Heap allocations per call of ModelFallback on the happy path, beyond the bare service.
//!
//! cargo bench -p tower-ai-fallback --bench allocations

mod common;

use std::hint::black_box;

use common::*;
use tower_ai_core::try_clone_request;

fn count(f: impl FnOnce()) -> (u64, u64) {
    let info = allocation_counter::measure(f);
    (info.count_total, info.bytes_total)
}

fn report(name: &str, svc: &mut Fallback, bare: u64) {
    once(svc, request()); // warm up
    let req = request();
    let (n, bytes) = count(|| {
        black_box(once(svc, req));
    });
    println!(
        "{name:<44} {n:>2} allocations ({bytes:>3} bytes), {:>2} beyond the bare service",
        n.saturating_sub(bare)
    );
}

fn main() {
    let mut bare = Provider;
    let req = request();
    let (bare_n, _) = count(|| {
        black_box(once(&mut bare, req));
    });
    println!("{:<44} {bare_n:>2} allocations", "bare service");
    let req = request();
    let (copy_n, copy_bytes) = count(|| {
        black_box(try_clone_request(&req));
    });
    println!(
        "{:<44} {copy_n:>2} allocations ({copy_bytes:>3} bytes)",
        "one request copy (try_clone_request)"
    );
    report(
        "fallback, budget not shared",
        &mut fallback(Route::primary("gpt-4o"), false),
        bare_n,
    );
    report(
        "fallback, budget shared (default)",
        &mut fallback(Route::primary("gpt-4o"), true),
        bare_n,
    );
    report(
        "fallback, first route rewrites the model",
        &mut fallback(Route::model("gpt-4.1"), false),
        bare_n,
    );
    report(
        "fallback, one route, budget shared",
        &mut single_route(),
        bare_n,
    );
}
