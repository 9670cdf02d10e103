//! Happy-path overhead of RetryAfterAware (no cooldown on the request's key) against the
//! bare service, on one task and on two OS threads sharing one layer. Also prints
//! allocations per call.
//!
//! `cargo bench -p tower-ai-retry-after --bench retry_after -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use tower::{Layer, Service};
use tower_ai_core::{AiBody, BoxError};
use tower_ai_retry_after::RetryAfterAwareLayer;

fn request(model: &'static str) -> Request<AiBody> {
    let body: &'static str = match model {
        "gpt-4o" => {
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there, how are you today?"}],"max_tokens":100}"#
        }
        _ => r#"{"model":"other","messages":[]}"#,
    };
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(AiBody::from(body))
        .unwrap()
}

/// The bare "client": answers at once; a 429 with a wait for the model "other".
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
        let other = req.body().as_bytes().is_some_and(|b| b.len() < 40);
        drop(black_box(req));
        let mut res = Response::new(());
        if other {
            *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            res.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("3600"));
        }
        std::future::ready(Ok(res))
    }
}

fn once<S: Service<Request<AiBody>>>(svc: &mut S, model: &'static str) {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(request(model)));
    match fut.poll(&mut cx) {
        Poll::Ready(r) => {
            black_box(r.is_ok());
        }
        Poll::Pending => panic!("never waits on the happy path"),
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
                    once(&mut s, "gpt-4o");
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
    once(svc, "gpt-4o");
    let n = 1000;
    let info = allocation_counter::measure(|| {
        for _ in 0..n {
            once(svc, "gpt-4o");
        }
    });
    eprintln!(
        "allocations per call, {name}: {:.1}",
        info.count_total as f64 / n as f64
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let quiet = RetryAfterAwareLayer::new().layer(Bare);
    // Another key ("other") is cooling down: the request's key takes the map path.
    let busy_layer = RetryAfterAwareLayer::new();
    let mut busy = busy_layer.layer(Bare);
    once(&mut busy, "other");
    assert_eq!(busy_layer.tracked_keys(), 1);

    allocations("bare", &mut Bare);
    allocations("RetryAfterAware, no key has state", &mut quiet.clone());
    allocations(
        "RetryAfterAware, another key cooling down",
        &mut busy.clone(),
    );

    let mut g = c.benchmark_group("retry_after_happy_path");
    g.bench_function("bare", |b| b.iter(|| once(&mut Bare, "gpt-4o")));
    g.bench_function("retry_after_aware", |b| {
        let mut s = quiet.clone();
        b.iter(|| once(&mut s, "gpt-4o"))
    });
    g.bench_function("retry_after_aware_other_key_cooling", |b| {
        let mut s = busy.clone();
        b.iter(|| once(&mut s, "gpt-4o"))
    });
    g.bench_function("bare_2_threads", |b| {
        b.iter_custom(|n| two_threads(&Bare, n))
    });
    g.bench_function("retry_after_aware_2_threads", |b| {
        b.iter_custom(|n| two_threads(&quiet, n))
    });
    g.bench_function("retry_after_aware_other_key_cooling_2_threads", |b| {
        b.iter_custom(|n| two_threads(&busy, n))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
