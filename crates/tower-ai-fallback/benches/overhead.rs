//! Overhead of ModelFallback on the happy path (the first route serves) against the bare
//! service, and heap allocations per call.
//!
//! cargo bench -p tower-ai-fallback --bench overhead -- --warm-up-time 1 --measurement-time 3

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use tower::Service;
use tower_ai_core::{AiBody, BoxError};
use tower_ai_fallback::{FallbackChain, ModelFallback, Route};

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a haiku about resilient middleware and the models that fail behind it."}],"max_tokens":256,"temperature":0.7,"stream":false}"#;

/// The cheapest provider there is: a ready 200.
#[derive(Clone)]
struct Provider;

impl Service<Request<AiBody>> for Provider {
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Bytes>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        black_box(&req);
        std::future::ready(Ok(Response::new(Bytes::from_static(b"{}"))))
    }
}

fn request() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(AiBody::from(BODY))
        .unwrap()
}

fn once<S>(svc: &mut S, req: Request<AiBody>) -> Response<Bytes>
where
    S: Service<Request<AiBody>, Response = Response<Bytes>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => unreachable!("the provider is always ready"),
    }
}

fn chain(first: Route<AiBody, Bytes>, share: bool) -> FallbackChain<AiBody, Bytes> {
    FallbackChain::builder()
        .route(first)
        .route(Route::model("gpt-4o-mini"))
        .route(Route::model("o3-mini"))
        .share_budget(share)
        .build()
        .unwrap()
}

fn allocations<S>(name: &str, svc: &mut S, bare: u64)
where
    S: Service<Request<AiBody>, Response = Response<Bytes>>,
    S::Error: std::fmt::Debug,
{
    once(svc, request()); // warm
    let req = request();
    let info = allocation_counter::measure(|| {
        black_box(once(svc, req));
    });
    println!(
        "allocations per call {name:<32} {:>2} total, {:>2} beyond the bare service ({} bytes)",
        info.count_total,
        info.count_total.saturating_sub(bare),
        info.bytes_total
    );
}

fn bench(c: &mut Criterion) {
    let mut bare = Provider;
    let mut unshared = ModelFallback::new(Provider, chain(Route::primary("gpt-4o"), false));
    let mut shared = ModelFallback::new(Provider, chain(Route::primary("gpt-4o"), true));
    let mut rewrite = ModelFallback::new(Provider, chain(Route::model("gpt-4.1"), false));
    let mut single = ModelFallback::new(
        Provider,
        FallbackChain::builder()
            .route(Route::primary("gpt-4o"))
            .build()
            .unwrap(),
    );

    let req = request();
    let bare_allocs = allocation_counter::measure(|| {
        black_box(once(&mut bare, req));
    })
    .count_total;
    println!("allocations per call {:<32} {bare_allocs:>2} total", "bare");
    allocations("fallback, budget not shared", &mut unshared, bare_allocs);
    allocations("fallback, budget shared", &mut shared, bare_allocs);
    allocations("fallback, first route rewrites", &mut rewrite, bare_allocs);
    allocations("fallback, one route", &mut single, bare_allocs);
    let info = allocation_counter::measure(|| {
        black_box(request());
    });
    println!(
        "allocations to build the request (not counted above): {}",
        info.count_total
    );

    let mut g = c.benchmark_group("happy_path");
    g.bench_function("bare", |b| {
        b.iter_batched(
            request,
            |r| once(&mut bare, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("fallback_unshared_budget", |b| {
        b.iter_batched(
            request,
            |r| once(&mut unshared, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("fallback_shared_budget", |b| {
        b.iter_batched(
            request,
            |r| once(&mut shared, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("fallback_first_route_rewrites", |b| {
        b.iter_batched(
            request,
            |r| once(&mut rewrite, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("fallback_one_route", |b| {
        b.iter_batched(
            request,
            |r| once(&mut single, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
