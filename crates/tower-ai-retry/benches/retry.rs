//! Happy-path overhead of AiRetry against the bare service and tower's `Retry` with
//! `TpsBudget`, on one task and on two OS threads driving their own clones through one
//! shared layer/budget. Also prints allocations per call, and the per-call cost of each
//! service measured in alternation (rounds of 20,000 calls; median and minimum of 15
//! rounds), so that the load of a shared machine hits all of them alike: compare the
//! ratios of that table.
//!
//! `cargo bench -p tower-ai-retry --bench retry -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
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

/// The services of the bench: bare, AiRetry (default: budget, idempotency key, attempt
/// header), AiRetry without the idempotency key, tower's Retry + TpsBudget, and AiRetry
/// with neither header (what the two headers cost).
fn services() -> (
    Bare,
    impl Service<Request<AiBody>> + Clone + Send + 'static,
    impl Service<Request<AiBody>> + Clone + Send + 'static,
    impl Service<Request<AiBody>> + Clone + Send + 'static,
    impl Service<Request<AiBody>> + Clone + Send + 'static,
) {
    let ai = AiRetryLayer::builder().build().unwrap();
    let ai_no_key = AiRetryLayer::builder()
        .idempotency_header(None)
        .build()
        .unwrap();
    let ai_no_headers = AiRetryLayer::builder()
        .idempotency_header(None)
        .attempt_header(None)
        .build()
        .unwrap();
    let tower_layer = RetryLayer::new(TowerPolicy(Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    ))));
    (
        Bare,
        ai.layer(Bare),
        ai_no_key.layer(Bare),
        tower_layer.layer(Bare),
        ai_no_headers.layer(Bare),
    )
}

/// Nanoseconds per call of `calls` calls on one task.
fn per_call<S: Service<Request<AiBody>>>(svc: &mut S, calls: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..calls {
        once(svc);
    }
    t.elapsed().as_nanos() as f64 / f64::from(calls)
}

/// Nanoseconds per call of each thread when two threads make `calls` calls each.
fn per_call_2<S>(svc: &S, calls: u32) -> f64
where
    S: Service<Request<AiBody>> + Clone + Send + 'static,
{
    two_threads(svc, u64::from(calls)).as_nanos() as f64 / f64::from(calls)
}

fn interleaved() {
    let (bare, ai, ai_no_key, tower, ai_no_headers) = services();
    let (mut b1, mut a1, mut k1, mut t1) = (bare, ai.clone(), ai_no_key.clone(), tower.clone());
    let mut h1 = ai_no_headers.clone();
    const CALLS: u32 = 20_000;
    const ROUNDS: usize = 15;
    // bare, ai_retry, ai_retry_no_idempotency_key, tower, then the same on 2 threads
    // (without the no-key variant), then AiRetry without either header.
    let mut samples: [Vec<f64>; 8] = Default::default();
    for _ in 0..ROUNDS {
        samples[0].push(per_call(&mut b1, CALLS));
        samples[1].push(per_call(&mut a1, CALLS));
        samples[2].push(per_call(&mut k1, CALLS));
        samples[3].push(per_call(&mut t1, CALLS));
        samples[4].push(per_call_2(&bare, CALLS));
        samples[5].push(per_call_2(&ai, CALLS));
        samples[6].push(per_call_2(&tower, CALLS));
        samples[7].push(per_call(&mut h1, CALLS));
    }
    for (stat, median) in [("median", true), ("min", false)] {
        let [b, a, k, t, b2, a2, t2, h] = samples.clone().map(|mut v| {
            v.sort_by(f64::total_cmp);
            if median {
                v[v.len() / 2]
            } else {
                v[0]
            }
        });
        println!(
            "interleaved ({stat} of {ROUNDS} rounds of {CALLS} calls), ns per call:\n  \
             1 task:    bare {b:.0}, ai_retry {a:.0}, ai_retry_no_idempotency_key {k:.0}, \
             tower_retry_tps_budget {t:.0}\n  \
             2 threads: bare {b2:.0}, ai_retry {a2:.0}, tower_retry_tps_budget {t2:.0}\n  \
             overhead over bare: ai_retry {:.0}, no key {:.0}, no headers {:.0}, tower {:.0}\n  \
             ai_retry / tower: {:.2} (1 task), {:.2} (2 threads)\n  \
             2 threads / 1 task: bare {:.2}, ai_retry {:.2}, tower {:.2}",
            a - b,
            k - b,
            h - b,
            t - b,
            a / t,
            a2 / t2,
            b2 / b,
            a2 / a,
            t2 / t,
        );
    }
}

fn bench(c: &mut Criterion) {
    let (bare, ai_svc, ai_no_key_svc, tower_svc, ai_no_headers_svc) = services();
    allocations("bare", &mut bare.clone());
    allocations("AiRetry", &mut ai_svc.clone());
    allocations(
        "AiRetry without idempotency key",
        &mut ai_no_key_svc.clone(),
    );
    allocations("tower Retry + TpsBudget", &mut tower_svc.clone());
    allocations(
        "AiRetry without either header",
        &mut ai_no_headers_svc.clone(),
    );

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

fn main() {
    // `--profile-time` (under perf) and `--test` run only what criterion runs.
    let quick = std::env::args().any(|a| a == "--profile-time" || a == "--test");
    if !quick {
        interleaved();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
