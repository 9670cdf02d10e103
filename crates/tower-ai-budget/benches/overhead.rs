//! Overhead of TokenBudget on the happy path (every limit far away), against the bare
//! service and against governor's lock-free `check` in front of the same service; one task
//! and two contending tasks; and allocations per call.
//!
//! `cargo bench -p tower-ai-budget --bench overhead -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{AiBody, RequestMeta};

const BODY: &str = r#"{"model":"gpt-4o","max_tokens":256,"messages":[{"role":"user","content":"Say hello in one short sentence, please."}]}"#;

/// The bare provider: always ready, answers at once with a static body.
#[derive(Clone, Copy)]
struct Bare;

impl Service<Request<AiBody>> for Bare {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<AiBody>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    }
}

fn request() -> Request<AiBody> {
    Request::new(AiBody::from(BODY))
}

/// One call: ready, call, poll to completion, drop the response (and its body).
fn once<S>(svc: &mut S, req: Request<AiBody>) -> bool
where
    S: Service<Request<AiBody>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    if svc.poll_ready(&mut cx).is_pending() {
        return false;
    }
    let mut fut = pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => {
            drop(black_box(res));
            true
        }
        _ => false,
    }
}

type Gov = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
>;

fn governor() -> Arc<Gov> {
    Arc::new(RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(u32::MAX).unwrap(),
    )))
}

/// RPM + concurrency: nothing read from the body.
fn rpm_layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .requests_per_minute(u64::MAX / 2)
        .max_concurrent(u32::MAX)
        .build()
        .unwrap()
}

/// RPM + TPM + concurrency: the token estimate, and the usage read from the response.
fn tpm_layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .requests_per_minute(u64::MAX / 2)
        .tokens_per_minute(u64::MAX / 2)
        .max_concurrent(u32::MAX)
        .build()
        .unwrap()
}

fn with_meta() -> Request<AiBody> {
    let mut r = request();
    RequestMeta::get_or_insert(&mut r);
    r
}

/// Runs `f` on `threads` threads, `iters` times each; wall time per iteration.
fn contended(threads: usize, iters: u64, f: impl Fn() + Send + Sync + Clone + 'static) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (f, b) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                for _ in 0..iters {
                    f();
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let mut g = c.benchmark_group("one_task");
    g.bench_function("bare", |b| {
        let mut svc = Bare;
        b.iter(|| once(&mut svc, request()))
    });
    g.bench_function("governor_check+bare", |b| {
        let lim = governor();
        let mut svc = Bare;
        b.iter(|| lim.check().is_ok() && once(&mut svc, request()))
    });
    g.bench_function("budget_rpm_concurrency", |b| {
        let mut svc = rpm_layer().layer(Bare);
        b.iter(|| once(&mut svc, request()))
    });
    g.bench_function("budget_tpm_meta_in_extensions", |b| {
        let mut svc = tpm_layer().layer(Bare);
        b.iter_batched(
            with_meta,
            |r| once(&mut svc, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("bare_meta_in_extensions", |b| {
        let mut svc = Bare;
        b.iter_batched(
            with_meta,
            |r| once(&mut svc, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("budget_tpm_parses_body", |b| {
        let mut svc = tpm_layer().layer(Bare);
        b.iter(|| once(&mut svc, request()))
    });
    g.finish();

    let mut g = c.benchmark_group("two_tasks");
    g.bench_function("bare", |b| {
        b.iter_custom(|iters| {
            contended(2, iters, || {
                once(&mut Bare, request());
            })
        })
    });
    g.bench_function("governor_check+bare", |b| {
        let lim = governor();
        b.iter_custom(|iters| {
            let lim = lim.clone();
            contended(2, iters, move || {
                let _ = lim.check().is_ok() && once(&mut Bare, request());
            })
        })
    });
    g.bench_function("budget_rpm_concurrency", |b| {
        let layer = rpm_layer();
        b.iter_custom(|iters| {
            let svc = layer.layer(Bare);
            contended(2, iters, move || {
                once(&mut svc.clone(), request());
            })
        })
    });
    g.finish();

    // Allocations per call (the request is built outside the measurement).
    let per_call =
        |name: &str, mut f: Box<dyn FnMut(Request<AiBody>)>, make: fn() -> Request<AiBody>| {
            let reqs: Vec<_> = (0..1000).map(|_| make()).collect();
            let info = allocation_counter::measure(|| {
                for r in reqs {
                    f(r);
                }
            });
            println!(
                "allocations per call, {name}: {:.2} ({} bytes per call)",
                info.count_total as f64 / 1000.0,
                info.bytes_total / 1000
            );
        };
    let mut bare = Bare;
    per_call(
        "bare",
        Box::new(move |r| {
            once(&mut bare, r);
        }),
        request,
    );
    let mut svc = rpm_layer().layer(Bare);
    once(&mut svc, request()); // create the key first
    per_call(
        "budget_rpm_concurrency",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        request,
    );
    let mut svc = tpm_layer().layer(Bare);
    once(&mut svc, request());
    per_call(
        "budget_tpm_meta_in_extensions",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        with_meta,
    );
    let mut svc = tpm_layer().layer(Bare);
    once(&mut svc, request());
    per_call(
        "budget_tpm_parses_body",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        request,
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
