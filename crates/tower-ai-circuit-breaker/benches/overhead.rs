//! Closed-state overhead per call: `cargo bench -p tower-ai-circuit-breaker --bench overhead`.
//!
//! The same always-ready service, bare and behind: this crate's breaker (default key
//! function, host + model read from the body; and one global key), tower-resilience's
//! circuit breaker, failsafe's. Each call is `poll_ready`, `call`, one poll of the future
//! (which is ready) with a no-op waker: no runtime, so the figure is the layer's own cost.
//! Measured on one thread, and on two threads at once through clones of one service
//! (per-call time as each thread sees it). Allocations per call are counted after
//! warm-up and printed before the timings.

use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::futures::CircuitBreaker as _;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_ai_circuit_breaker::CircuitBreakerLayer;
use tower_ai_core::keys::{Global, HostModel, KeyFn};
use tower_ai_core::BoxError;

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}"#;

/// The provider: always ready, answers 200 at once.
#[derive(Clone, Copy, Debug)]
struct Bare;

impl Service<Request<&'static str>> for Bare {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Ready<Result<Response<()>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<&'static str>) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(())))
    }
}

/// failsafe's breaker as a Tower service (it has none of its own).
#[derive(Clone)]
struct Failsafe<S> {
    cb: failsafe::StateMachine<
        failsafe::failure_policy::OrElse<
            failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
            failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
        >,
        (),
    >,
    inner: S,
}

impl<S> Service<Request<&'static str>> for Failsafe<S>
where
    S: Service<Request<&'static str>>,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        failsafe::failure_policy::OrElse<
            failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
            failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
        >,
        (),
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Request<&'static str>) -> Self::Future {
        self.cb.call(self.inner.call(req))
    }
}

/// One call, start to finish.
#[inline]
fn one<S>(svc: &mut S, cx: &mut Context<'_>)
where
    S: Service<Request<&'static str>>,
{
    assert!(svc.poll_ready(cx).is_ready());
    let mut fut = pin!(svc.call(Request::new(BODY)));
    loop {
        match fut.as_mut().poll(cx) {
            Poll::Ready(Ok(r)) => {
                black_box(r);
                return;
            }
            Poll::Ready(Err(_)) => panic!("the bare service does not fail"),
            // Only tower-resilience's future waits: for its tokio Mutex, when the other
            // thread holds it. Poll again, as a runtime would once woken.
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

fn allocations_per_call<S>(mut svc: S) -> f64
where
    S: Service<Request<&'static str>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        one(&mut svc, &mut cx); // warm up: keys, lanes, caches
    }
    const N: u64 = 1_000;
    let info = allocation_counter::measure(|| {
        for _ in 0..N {
            one(&mut svc, &mut cx);
        }
    });
    info.count_total as f64 / N as f64
}

/// Per-call time as each of two threads sees it, running at once through clones of `svc`.
fn two_threads<S>(svc: &S, iters: u64) -> Duration
where
    S: Service<Request<&'static str>> + Clone + Send,
{
    let start = Arc::new(Barrier::new(2));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut svc = svc.clone();
                let start = start.clone();
                scope.spawn(move || {
                    let mut cx = Context::from_waker(Waker::noop());
                    for _ in 0..100 {
                        one(&mut svc, &mut cx);
                    }
                    start.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        one(&mut svc, &mut cx);
                    }
                    t.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn tower_resilience_layer() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .unwrap()
}

fn failsafe_layer<S>(inner: S) -> Failsafe<S> {
    Failsafe {
        cb: failsafe::Config::new().build(),
        inner,
    }
}

fn bench(c: &mut Criterion) {
    println!(
        "allocations per call: bare {:.2}, tower-ai {:.2}, tower-ai (global key) {:.2}, \
         tower-resilience {:.2}, failsafe {:.2}",
        allocations_per_call(Bare),
        allocations_per_call(CircuitBreakerLayer::new().layer(Bare)),
        allocations_per_call(
            CircuitBreakerLayer::builder()
                .key_fn(Global)
                .build()
                .unwrap()
                .layer(Bare)
        ),
        allocations_per_call(tower_resilience_layer().layer(Bare)),
        allocations_per_call(failsafe_layer(Bare)),
    );

    let mut g = c.benchmark_group("closed_1_task");
    macro_rules! single {
        ($name:literal, $svc:expr) => {
            g.bench_function($name, |b| {
                let mut svc = $svc;
                let mut cx = Context::from_waker(Waker::noop());
                b.iter(|| one(&mut svc, &mut cx))
            });
        };
    }
    single!("bare", Bare);
    // what the default key function costs by itself (tower-ai-core's HostModel)
    g.bench_function("host_model_key_only", |b| {
        b.iter(|| black_box(HostModel.key(&Request::new(black_box(BODY)))))
    });
    single!("tower_ai", CircuitBreakerLayer::new().layer(Bare));
    single!(
        "tower_ai_global_key",
        CircuitBreakerLayer::builder()
            .key_fn(Global)
            .build()
            .unwrap()
            .layer(Bare)
    );
    single!("tower_resilience", tower_resilience_layer().layer(Bare));
    single!("failsafe", failsafe_layer(Bare));
    g.finish();

    let mut g = c.benchmark_group("closed_2_tasks");
    macro_rules! double {
        ($name:literal, $svc:expr) => {
            g.bench_function($name, |b| {
                let svc = $svc;
                b.iter_custom(|iters| two_threads(&svc, iters))
            });
        };
    }
    double!("bare", Bare);
    double!("tower_ai", CircuitBreakerLayer::new().layer(Bare));
    double!(
        "tower_ai_global_key",
        CircuitBreakerLayer::builder()
            .key_fn(Global)
            .build()
            .unwrap()
            .layer(Bare)
    );
    double!("tower_resilience", tower_resilience_layer().layer(Bare));
    double!("failsafe", failsafe_layer(Bare));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
