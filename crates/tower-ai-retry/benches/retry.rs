//! Happy-path overhead of AiRetry against the bare service and tower's `Retry` with
//! `TpsBudget`, on one task and on two OS threads driving their own clones through one
//! shared layer/budget. Also prints allocations per call.
//!
//! `cargo bench -p tower-ai-retry --bench retry -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, RetryLayer};
use tower::{Layer, Service};
use tower_ai_core::{try_clone_request, AiBody, BoxError};
use tower_ai_retry::AiRetryLayer;

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there, how are you today?"}],"max_tokens":100}"#;

fn request() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(AiBody::from(BODY))
        .unwrap()
}

/// The bare "client": answers at once.
#[derive(Clone, Copy)]
struct Bare;

impl Service<Request<AiBody>> for Bare {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<()>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        drop(black_box(req));
        std::future::ready(Ok(Response::new(())))
    }
}

/// tower's Retry with a TpsBudget: deposit on success, withdraw on failure.
#[derive(Clone)]
struct TowerPolicy(Arc<TpsBudget>);

impl Policy<Request<AiBody>, Response<()>, BoxError> for TowerPolicy {
    type Future = std::future::Ready<()>;
    fn retry(
        &mut self,
        _: &mut Request<AiBody>,
        r: &mut Result<Response<()>, BoxError>,
    ) -> Option<Self::Future> {
        match r {
            Ok(res) if res.status().is_success() => {
                self.0.deposit();
                None
            }
            _ => self.0.withdraw().then(|| std::future::ready(())),
        }
    }
    fn clone_request(&mut self, req: &Request<AiBody>) -> Option<Request<AiBody>> {
        try_clone_request(req)
    }
}

fn once<S>(svc: &mut S)
where
    S: Service<Request<AiBody>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(request()));
    match fut.poll(&mut cx) {
        Poll::Ready(r) => {
            black_box(r.is_ok());
        }
        Poll::Pending => panic!("the bench service never waits"),
    }
}

fn two_threads<S>(svc: &S, iters: u64) -> Duration
where
    S: Service<Request<AiBody>> + Clone + Send + 'static,
{
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mut s = svc.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    once(&mut s);
                }
                start.elapsed()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap()
}

fn allocations<S: Service<Request<AiBody>>>(name: &str, svc: &mut S) {
    once(svc);
    let n = 1000;
    let request_alone = allocation_counter::measure(|| {
        for _ in 0..n {
            black_box(request());
        }
    });
    let info = allocation_counter::measure(|| {
        for _ in 0..n {
            once(svc);
        }
    });
    eprintln!(
        "allocations per call, {name}: {:.1} (of which building the request: {:.1})",
        info.count_total as f64 / n as f64,
        request_alone.count_total as f64 / n as f64
    );
}

fn bench(c: &mut Criterion) {
    let ai = AiRetryLayer::builder().build().unwrap();
    let ai_no_key = AiRetryLayer::builder()
        .idempotency_header(None)
        .build()
        .unwrap();
    let tower_layer = RetryLayer::new(TowerPolicy(Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    ))));
    let bare = Bare;
    let ai_svc = ai.layer(Bare);
    let ai_no_key_svc = ai_no_key.layer(Bare);
    let tower_svc = tower_layer.layer(Bare);

    allocations("bare", &mut bare.clone());
    allocations("AiRetry", &mut ai_svc.clone());
    allocations(
        "AiRetry without idempotency key",
        &mut ai_no_key_svc.clone(),
    );
    allocations("tower Retry + TpsBudget", &mut tower_svc.clone());

    let mut g = c.benchmark_group("retry_happy_path");
    g.bench_function("bare", |b| {
        let mut s = bare;
        b.iter(|| once(&mut s))
    });
    g.bench_function("ai_retry", |b| {
        let mut s = ai_svc.clone();
        b.iter(|| once(&mut s))
    });
    g.bench_function("ai_retry_no_idempotency_key", |b| {
        let mut s = ai_no_key_svc.clone();
        b.iter(|| once(&mut s))
    });
    g.bench_function("tower_retry_tps_budget", |b| {
        let mut s = tower_svc.clone();
        b.iter(|| once(&mut s))
    });
    g.bench_function("bare_2_threads", |b| {
        b.iter_custom(|n| two_threads(&bare, n))
    });
    g.bench_function("ai_retry_2_threads", |b| {
        b.iter_custom(|n| two_threads(&ai_svc, n))
    });
    g.bench_function("tower_retry_tps_budget_2_threads", |b| {
        b.iter_custom(|n| two_threads(&tower_svc, n))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
